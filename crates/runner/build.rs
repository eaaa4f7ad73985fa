//! Builds the guest's PID 1 (`crates/guest-init`) as a static musl binary and
//! hands its path to the crate as `SUPERMACHINE_GUEST_INIT`, so the initramfs
//! builder can embed it with `include_bytes!`.
//!
//! Only x86_64 Linux hosts build it for now (guest = host arch). Elsewhere the
//! variable points at an empty file and the runner reports at run time that no
//! guest-init is embedded.

#![allow(clippy::expect_used)] // A build script reports failure by panicking.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-linux-musl";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("crates/runner sits two levels below the workspace root")
        .to_path_buf();

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if target_os != "linux" || target_arch != "x86_64" {
        // No guest-init for this host yet (aarch64 comes later): an empty file
        // keeps `include_bytes!` compiling.
        let empty = out_dir.join("guest-init.empty");
        std::fs::write(&empty, b"").expect("writing an empty file into OUT_DIR");
        println!(
            "cargo:rustc-env=SUPERMACHINE_GUEST_INIT={}",
            empty.display()
        );
        return;
    }

    let guest_init = workspace.join("crates/guest-init");
    println!(
        "cargo:rerun-if-changed={}",
        guest_init.join("src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        guest_init.join("Cargo.toml").display()
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
    if !musl_target_installed(&rustc) {
        panic!(
            "the guest-init binary needs the {GUEST_TARGET} Rust target: run \
             `rustup target add {GUEST_TARGET}` and build again"
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
        .arg(GUEST_TARGET)
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
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build guest-init: {e}"));
    if !status.success() {
        panic!(
            "building guest-init for {GUEST_TARGET} failed ({status}); if the error above \
             says the target is missing, run `rustup target add {GUEST_TARGET}`"
        );
    }

    let binary = target_dir
        .join(GUEST_TARGET)
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
fn musl_target_installed(rustc: &std::ffi::OsStr) -> bool {
    let out = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", GUEST_TARGET])
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
