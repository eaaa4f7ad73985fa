//! Where the guest reports its exit status: supermachine's power block, a
//! paravirtual device whose register window is part of the guest ABI. The VMM
//! places the device here (`devices::power`, `runner`'s layouts) and guest-init
//! writes the status here before it powers off, so both sides read these
//! constants and neither spells the addresses itself.

/// x86_64: first I/O port of the power block (8 ports: ACPI sleep control,
/// sleep status and reset registers, then the exit status).
pub const X86_64_PORT_BASE: u16 = 0x600;

/// aarch64: guest-physical base of the power block's MMIO window (one page).
/// The device tree does not describe it; guest-init maps it through `/dev/mem`.
pub const AARCH64_MMIO_BASE: u64 = 0x0902_0000;

/// Offset of the 32-bit little-endian exit-status register in the window.
pub const EXIT_STATUS_OFFSET: u16 = 4;

/// x86_64: the exit-status register's port.
pub const X86_64_EXIT_STATUS_PORT: u16 = X86_64_PORT_BASE + EXIT_STATUS_OFFSET;
