//! Builds, boots and runs supermachine VMs: resources and their validation, guest
//! memory, kernel and initramfs loading, ACPI (x86_64) or FDT (aarch64), the device
//! bus and event loop, the host network backends, and the [`vmm::Vmm`] with its vCPU
//! threads. Where the kernel and initramfs come from is `guest-assets`' business:
//! the runner boots the paths it is given.
//!
//! The runner sees a backend only through the `hypervisor` traits; the one place
//! that chooses a backend by `target_os` is the `backend` module, and the one place
//! that chooses the guest platform by `target_arch` is the `arch` alias below.

pub mod aarch64;
pub mod backend;
pub mod console;
pub mod event_loop;
pub mod net;
pub mod resources;
pub mod sandbox;
pub mod timings;
pub mod virtio;
pub mod vmm;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

// The one place `target_arch` picks the guest platform (the guest runs the host's
// architecture): each arch module provides `ram_ranges`, `setup_platform` and
// `PlatformError`, and `vmm` uses them through this name only.
#[cfg(target_arch = "aarch64")]
use aarch64 as arch;
#[cfg(target_arch = "x86_64")]
use x86_64 as arch;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("supermachine runs x86_64 or aarch64 guests only");
