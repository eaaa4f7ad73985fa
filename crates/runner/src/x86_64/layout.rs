//! The x86_64 guest-physical memory map supermachine builds.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (left zero)
//! 0x0000_0500  boot GDT                     (BOOT_GDT)
//! 0x0000_0520  boot IDT (empty)              (BOOT_IDT)
//! 0x0000_6000  PVH hvm_start_info + modlist  (PVH_INFO)
//! 0x0000_6800  PVH memory map                (PVH_MEMMAP)
//! 0x0000_7000  Linux boot_params "zero page" (ZERO_PAGE)
//! 0x0000_8ff0  boot stack top                (BOOT_STACK)
//! 0x0000_9000  PML4, PDPT, 4 page directories identity-mapping 4 GiB
//! 0x0002_0000  kernel command line           (CMDLINE, CMDLINE_MAX bytes)
//! 0x0009_fc00  EBDA .. 1 MiB: reserved (ACPI tables live in 0xe0000..,
//!              the VMGenID generation ID at 0xff000)
//! 0x0010_0000  kernel load address           (HIMEM_START)
//! ...          RAM up to MMIO_GAP_START, the rest above 4 GiB
//! 0xc000_0000  MMIO gap: virtio-mmio windows, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! ```

/// Boot GDT.
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT (limit 0: any exception before the kernel installs its own is fatal).
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP: u64 = 0x6800;
/// Maximum PVH memory map entries that fit before `ZERO_PAGE`.
pub const PVH_MEMMAP_MAX: usize = (ZERO_PAGE - PVH_MEMMAP) as usize / 24;
/// Linux `boot_params`.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// First of four page directories (2 MiB pages, 4 GiB identity map).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Room for the command line including its NUL.
pub const CMDLINE_MAX: usize = 0x10000;
/// Start of the extended BIOS data area; everything from here to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; each next device takes the next GSI.
/// 0-4 are the PIT, keyboard, cascade and COM1 lines Linux expects.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// virtio-mmio devices that fit: one IOAPIC pin each, GSIs 5..=22.
pub const VIRTIO_MAX_DEVICES: usize = 18;
/// The VMGenID Generic Event Device's interrupt: the IOAPIC's last pin.
pub const VMGENID_GSI: u32 = 23;
/// Where virtio-mmio devices go.
pub const VIRTIO_SLOTS: crate::virtio::Slots = crate::virtio::Slots {
    base: VIRTIO_MMIO_BASE,
    stride: VIRTIO_MMIO_SIZE,
    first_irq: VIRTIO_FIRST_GSI,
    max: VIRTIO_MAX_DEVICES,
};
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// The RAM ranges `(guest address, length)` for `size` bytes of guest RAM: below the
/// MMIO gap first, the remainder from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_small_guest_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn ram_ranges_large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn layout_fixed_areas_do_not_overlap() {
        const { assert!(BOOT_IDT + 8 <= PVH_INFO) };
        const { assert!(PVH_MODLIST + 32 <= PVH_MEMMAP) };
        const { assert!(ZERO_PAGE + 4096 <= BOOT_STACK + 16) };
        const { assert!(PD + 4 * 4096 <= CMDLINE) };
        const { assert!(CMDLINE + CMDLINE_MAX as u64 <= EBDA_START) };
    }
}
