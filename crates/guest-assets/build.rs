//! Builds the guest's PID 1 (`crates/guest-init`) as a static musl binary and
//! hands its path to the crate as `SUPERMACHINE_GUEST_INIT`, so the initramfs
//! builder can embed it with `include_bytes!`.
//!
//! The guest runs the host's architecture: x86_64 Linux hosts build it for
//! `x86_64-unknown-linux-musl`, aarch64 hosts (macOS with Hypervisor.framework, or
//! Linux) for `aarch64-unknown-linux-musl`, linked with the toolchain's `rust-lld`
//! so no C cross-toolchain is needed. Elsewhere the variable points at an empty file
//! and building an initramfs reports that no guest-init is embedded.

#![allow(clippy::expect_used)] // A build script reports failure by panicking.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest-init target for a host (`target_os`, `target_arch`), if there is one.
fn guest_target(os: &str, arch: &str) -> Option<&'static str> {
    match (os, arch) {
        ("linux", "x86_64") => Some("x86_64-unknown-linux-musl"),
        ("linux" | "macos", "aarch64") => Some("aarch64-unknown-linux-musl"),
        _ => None,
    }
}

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("crates/guest-assets sits two levels below the workspace root")
        .to_path_buf();

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let Some(guest_target) = guest_target(&target_os, &target_arch) else {
        // No guest-init for this host: an empty file keeps `include_bytes!` compiling.
        let empty = out_dir.join("guest-init.empty");
        std::fs::write(&empty, b"").expect("writing an empty file into OUT_DIR");
        println!(
            "cargo:rustc-env=SUPERMACHINE_GUEST_INIT={}",
            empty.display()
        );
        return;
    };

    let guest_init = workspace.join("crates/guest-init");
    println!(
        "cargo:rerun-if-changed={}",
        guest_init.join("src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        guest_init.join("Cargo.toml").display()
    );
    // guest-init's protocol crate is compiled into it too.
    let protocol = workspace.join("crates/agent-protocol");
    println!("cargo:rerun-if-changed={}", protocol.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        protocol.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    if !musl_target_installed(&rustc, guest_target) {
        panic!(
            "the guest-init binary needs the {guest_target} Rust target: run \
             `rustup target add {guest_target}` and build again"
        );
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // A separate target dir: the outer build holds the lock on its own.
    let target_dir = out_dir.join("guest-init-target");
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("-p")
        .arg("guest-init")
        .arg("--target")
        .arg(guest_target)
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir);
    // Flags and wrappers meant for the outer build (coverage, sanitizers, clippy's
    // driver, a forced target) must not leak into the guest binary.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS",
        "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    // The host's `cc` cannot link aarch64 objects (or, on macOS, ELF at all); the
    // toolchain's lld with musl's self-contained startup files can. A linker the user
    // chose is kept.
    const AARCH64_LINKER: &str = "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER";
    if guest_target.starts_with("aarch64") && env::var_os(AARCH64_LINKER).is_none() {
        cmd.env(AARCH64_LINKER, "rust-lld");
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build guest-init: {e}"));
    if !status.success() {
        panic!(
            "building guest-init for {guest_target} failed ({status}); if the error above \
             says the target is missing, run `rustup target add {guest_target}`"
        );
    }

    let binary = target_dir
        .join(guest_target)
        .join("release")
        .join("guest-init");
    if !binary.is_file() {
        panic!(
            "guest-init build succeeded but {} is missing",
            binary.display()
        );
    }
    println!(
        "cargo:rustc-env=SUPERMACHINE_GUEST_INIT={}",
        binary.display()
    );
}

/// True when the Rust standard library for the musl target is installed
/// (rustup prints the libdir even when the target is absent, so check it exists).
fn musl_target_installed(rustc: &std::ffi::OsStr, target: &str) -> bool {
    let out = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", target])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let dir = String::from_utf8_lossy(&out.stdout);
            let dir = Path::new(dir.trim());
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
                })
                .unwrap_or(false)
        }
        _ => false,
    }
}
