//! The aarch64 guest-physical memory map supermachine builds. Devices sit below RAM
//! at the addresses QEMU's `virt` board uses, so the guest sees a familiar machine;
//! RAM starts at 1 GiB as on `virt` and Firecracker.
//!
//! ```text
//! 0x0800_0000  GICv3 distributor, 64 KiB        (GIC_DIST_BASE)
//! 0x080a_0000  GICv3 redistributors, 128 KiB per vCPU, up to MAX_VCPUS
//! 0x0900_0000  16550A UART, SPI 1                (UART_BASE)
//! 0x0902_0000  power block: exit status at +4    (POWER_BASE)
//! 0x0a00_0000  virtio-mmio windows, SPI 16 + n   (VIRTIO_MMIO_BASE)
//! 0x4000_0000  RAM                               (RAM_BASE)
//!   +0         kernel Image (2 MiB aligned base + text_offset)
//!   ...        initramfs, below the device tree
//!   top-2 MiB  device tree                       (fdt_addr)
//! ```

/// GICv3 distributor base (the HVF backend's `DEFAULT_GIC_LAYOUT` uses the same).
pub const GIC_DIST_BASE: u64 = 0x0800_0000;
/// GICv3 distributor size (GICv3 spec §12.9: one 64 KiB frame).
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// First GICv3 redistributor frame.
pub const GIC_REDIST_BASE: u64 = 0x080a_0000;
/// Redistributor size per vCPU: RD_base and SGI_base frames, 64 KiB each (GICv3 §12.10).
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
/// The console UART (a 16550A with byte-wide registers).
pub const UART_BASE: u64 = 0x0900_0000;
/// Size of the UART's window.
pub const UART_SIZE: u64 = 0x1000;
/// Registers the 16550A decodes.
pub const UART_REG_LEN: u64 = 8;
/// The UART's SPI number (INTID 33), as on QEMU `virt`.
pub const UART_SPI: u32 = 1;
/// Input clock of the UART: 1.8432 MHz, so the classic divisors mean what they say.
pub const UART_CLOCK_HZ: u32 = 1_843_200;
/// supermachine's power block (`devices::power`) on the MMIO bus. Only its 32-bit
/// exit-status register at offset 4 is used on aarch64 (power-off and reset are PSCI
/// calls); guest-init writes it through `/dev/mem`, so this address is part of the
/// guest ABI and must not move.
pub const POWER_BASE: u64 = agent_protocol::power::AARCH64_MMIO_BASE;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// SPI of the first virtio-mmio device; device n uses `VIRTIO_SPI_BASE + n`.
pub const VIRTIO_SPI_BASE: u32 = 16;
/// virtio-mmio devices the layout has windows and SPIs reserved for.
pub const VIRTIO_MAX_DEVICES: usize = 32;
/// Where virtio-mmio devices go.
pub const VIRTIO_SLOTS: crate::virtio::Slots = crate::virtio::Slots {
    base: VIRTIO_MMIO_BASE,
    stride: VIRTIO_MMIO_SIZE,
    first_irq: VIRTIO_SPI_BASE,
    max: VIRTIO_MAX_DEVICES,
};
/// Guest RAM base.
pub const RAM_BASE: u64 = 0x4000_0000;
/// Largest device tree the layout leaves room for (Linux `booting.rst` caps a DTB at
/// 2 MiB and wants it 8-byte aligned, within one 2 MiB-aligned block).
pub const FDT_MAX_SIZE: u64 = 0x20_0000;
/// The kernel Image's base alignment (`booting.rst`: "2MB aligned base address").
pub const KERNEL_ALIGN: u64 = 0x20_0000;

/// Most vCPUs whose redistributors fit between the redistributor base and the UART.
pub const MAX_VCPUS: u32 = ((UART_BASE - GIC_REDIST_BASE) / GIC_REDIST_SIZE_PER_CPU) as u32;

// The device windows do not overlap and sit below RAM (checked when compiling).
const _: () = {
    assert!(GIC_DIST_BASE + GIC_DIST_SIZE <= GIC_REDIST_BASE);
    assert!(GIC_REDIST_BASE + MAX_VCPUS as u64 * GIC_REDIST_SIZE_PER_CPU <= UART_BASE);
    assert!(UART_BASE + UART_SIZE <= POWER_BASE);
    assert!(POWER_BASE + 0x1000 <= VIRTIO_MMIO_BASE);
    assert!(VIRTIO_MMIO_BASE < RAM_BASE);
    assert!(MAX_VCPUS == 123);
};

/// The RAM ranges `(guest address, length)` for `size` bytes of guest RAM: one range
/// from [`RAM_BASE`].
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    vec![(RAM_BASE, size)]
}

/// MPIDR_EL1 of vCPU `index`: clusters of 16 (Aff0 = index % 16, Aff1 = index / 16)
/// with bit 31 (RES1) set. The backend programs the same value (HVF's
/// `psci::mpidr_for_index`; the runner's backend module checks they agree) and the
/// device tree's CPU `reg` is its affinity part.
pub const fn mpidr(index: u32) -> u64 {
    let aff0 = (index % 16) as u64;
    let aff1 = ((index / 16) & 0xff) as u64;
    (1 << 31) | (aff1 << 8) | aff0
}

/// Guest address of the device tree for `ram_size` bytes of RAM: the last 2 MiB-aligned
/// 2 MiB block of RAM (or 0 if RAM is smaller than that).
pub fn fdt_addr(ram_size: u64) -> Option<u64> {
    let end = RAM_BASE.checked_add(ram_size)?;
    let addr = (end.checked_sub(FDT_MAX_SIZE)?) & !(FDT_MAX_SIZE - 1);
    (addr >= RAM_BASE).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpidr_clusters_of_sixteen_have_bit_31_set() {
        assert_eq!(mpidr(0), 0x8000_0000);
        assert_eq!(mpidr(15), 0x8000_000f);
        assert_eq!(mpidr(16), 0x8000_0100);
        assert_eq!(mpidr(33), 0x8000_0201);
    }

    #[test]
    fn fdt_addr_is_last_aligned_two_mib_of_ram() {
        assert_eq!(fdt_addr(256 << 20), Some(RAM_BASE + (254 << 20)));
        // An unaligned RAM end rounds down to a whole 2 MiB block.
        assert_eq!(fdt_addr((256 << 20) + 0x1000), Some(RAM_BASE + (254 << 20)));
    }

    #[test]
    fn fdt_addr_ram_smaller_than_two_mib_is_none() {
        assert_eq!(fdt_addr(0x10_0000), None);
        assert_eq!(fdt_addr(u64::MAX), None);
    }

    #[test]
    fn ram_ranges_is_one_range_at_ram_base() {
        assert_eq!(ram_ranges(1 << 30), vec![(RAM_BASE, 1 << 30)]);
    }
}
