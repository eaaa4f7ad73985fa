//! Builds, boots and runs supermachine VMs: resources and their validation, guest
//! memory, kernel and initramfs loading, ACPI (x86_64) or FDT (aarch64), the device
//! bus, vCPU threads and their exit dispatch.
//!
//! The runner sees a backend only through the `hypervisor` traits; the one place
//! that chooses a backend by `target_os` is the `backend` module.

pub mod aarch64;
pub mod backend;
pub mod console;
pub mod initramfs;
pub mod kernel;
pub mod pvm;
pub mod resources;
pub mod timings;
pub mod vmm;
pub mod x86_64;
