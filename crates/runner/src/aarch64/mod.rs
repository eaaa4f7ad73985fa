//! AArch64 guest boot: device tree.
pub mod fdt;
