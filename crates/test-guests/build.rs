//! Builds the freestanding virtio driver guest (`virtio-driver/`, not a member of
//! the workspace) for `x86_64-unknown-none` and hands its path to the crate as
//! `SUPERMACHINE_VIRTIO_DRIVER_GUEST`, so `lib.rs` can embed it with
//! `include_bytes!`.
//!
//! The guest is an x86_64 PVH ELF whatever the host is (it is only booted on
//! x86_64 Linux hosts with /dev/kvm), so it is built everywhere the target is
//! installed; a missing target is a build error naming the `rustup` command.

#![allow(clippy::expect_used)] // A build script reports failure by panicking.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-none";
const GUEST_BIN: &str = "virtio-driver-guest";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest = manifest_dir.join("virtio-driver");
    for f in [
        "src",
        "Cargo.toml",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    if !target_installed(&rustc, GUEST_TARGET) {
        panic!(
            "the virtio driver test guest needs the {GUEST_TARGET} Rust target: run \
             `rustup target add {GUEST_TARGET}` and build again"
        );
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // A separate target dir: the outer build holds the lock on its own.
    let target_dir = out_dir.join("virtio-driver-target");
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        // The guest's .cargo/config.toml (static relocation model) is found from
        // the working directory.
        .current_dir(&guest)
        .env("CARGO_TARGET_DIR", &target_dir);
    // Flags and wrappers meant for the outer build (coverage, sanitizers, clippy's
    // driver, a forced target) must not leak into the guest; an empty
    // CARGO_ENCODED_RUSTFLAGS would also hide the guest's own config.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_X86_64_UNKNOWN_NONE_RUSTFLAGS",
        "CARGO_TARGET_X86_64_UNKNOWN_NONE_LINKER",
        "CARGO_PROFILE_RELEASE_PANIC",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build the virtio driver guest: {e}"));
    if !status.success() {
        panic!(
            "building the virtio driver guest for {GUEST_TARGET} failed ({status}); if the \
             error above says the target is missing, run `rustup target add {GUEST_TARGET}`"
        );
    }

    let binary = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BIN);
    if !binary.is_file() {
        panic!(
            "the virtio driver guest build succeeded but {} is missing",
            binary.display()
        );
    }
    println!(
        "cargo:rustc-env=SUPERMACHINE_VIRTIO_DRIVER_GUEST={}",
        binary.display()
    );
}

/// True when the core library for `target` is installed (rustup prints the libdir
/// even when the target is absent, so check that it holds libcore).
fn target_installed(rustc: &std::ffi::OsStr, target: &str) -> bool {
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
                        .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
                })
                .unwrap_or(false)
        }
        _ => false,
    }
}
