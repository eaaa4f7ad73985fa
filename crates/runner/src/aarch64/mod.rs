//! AArch64 guest layout, boot protocol (arm64 `Image`, device tree) and, on aarch64
//! builds, the platform the generic run loop gets: a 16550A console and the power
//! block's exit-status register on the MMIO bus, the kernel, initramfs and DTB in RAM,
//! and the boot CPU's entry state. The layout, Image parsing, placement and the device
//! tree are plain Rust compiled and tested on every host; only the setup that loads
//! through linux-loader's aarch64-only PE loader is compiled for aarch64 alone.
pub mod boot;
pub mod fdt;
pub mod layout;
#[cfg(target_arch = "aarch64")]
mod platform;

pub use boot::BootError as PlatformError;
pub use layout::ram_ranges;
#[cfg(target_arch = "aarch64")]
pub use platform::{generation_line, new_generation, setup_platform};
