//! macOS Hypervisor.framework backend (Apple silicon, aarch64) of supermachine's
//! `hypervisor` traits.
//!
//! The crate has two halves. The platform-neutral half — exit-syndrome decoding
//! ([`esr`]), PSCI ([`psci`]), the system-register id mapping ([`sysreg`]), state
//! conversion, timer arithmetic and the GIC blob ([`state`]), the trapped-register
//! policy and exception injection ([`trap`]), the virtual timer's interrupt
//! ([`vtimer`]), the WFI wait ([`wfi`]) and the GIC layout checks ([`layout`]) — is
//! plain Rust compiled and unit-tested on every host. The FFI half (`bindings`, `gic`, and the
//! `HvfHypervisor`/`HvfVm`/`HvfVcpu` types) exists only on
//! `cfg(all(target_os = "macos", target_arch = "aarch64"))`, which is the one place this
//! crate is gated; on Linux it is type-checked with `--target aarch64-apple-darwin`.
//!
//! This crate depends only on `hypervisor` (never on the runner or devices), and no
//! `hv_*` type leaves it. See docs/hvf.md for what HVF forces and what has been verified.

// Tests may unwrap: a failing unwrap is a failing test.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod esr;
pub mod hv_error;
pub mod layout;
pub mod psci;
pub mod state;
pub mod sysreg;
pub mod trap;
pub mod vtimer;
pub mod wfi;

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
mod bindings;
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
mod gic;
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
mod hvf;
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub use hvf::{HvfHypervisor, HvfIrqLine, HvfKicker, HvfVcpu, HvfVm};
pub use layout::{GicLayout, DEFAULT_GIC_LAYOUT};
