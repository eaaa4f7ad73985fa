//! ACPI tables for x86_64 guests: RSDP, XSDT, FADT (hardware-reduced), MADT and a
//! DSDT listing COM1 and the virtio-mmio devices.
//!
//! Debian's cloud kernel has no MP-table parser and no virtio-mmio command-line
//! discovery, so ACPI is how it learns about CPUs, the IOAPIC, the power-off and
//! reset registers, and devices.
//!
//! All tables live in the legacy BIOS area [`ACPI_REGION_START`] ..
//! [`ACPI_REGION_END`] (0xe0000 .. 1 MiB), which the e820 map must mark reserved.
//! The RSDP is at its start ([`RSDP_ADDR`]), on a 16-byte boundary inside the range
//! Linux scans when no RSDP address is passed in `boot_params` (ACPI 6.5 §5.2.5.1),
//! so the runner may also pass it there or leave it to the scan.
//!
//! Choices, consistent with the devices in the `devices` crate:
//! - FADT: `HW_REDUCED_ACPI` (ACPI 6.5 §4.1): no PM1/GPE blocks, no SCI, no FACS.
//!   Sleep control / status registers at ports 0x600 / 0x601 and the reset register
//!   at 0x602 (value 0x01), all 8-bit SystemIO (`devices::power`).
//! - FADT `IAPC_BOOT_ARCH` (ACPI 6.5 §5.2.9.3): no VGA, no MSI, no CMOS RTC, and no
//!   8042 *advertised*: Linux then skips the i8042 driver probe, while its reboot
//!   fallback still writes 0xFE to port 0x64, which `devices::i8042` answers.
//! - MADT (ACPI 6.5 §5.2.12): local APIC 0xfee00000, one enabled Processor Local
//!   APIC per vCPU with APIC ID = vCPU index (KVM's default), the IOAPIC at
//!   0xfec00000 with GSI base 0 and ID 0 (its reset value in KVM), `PCAT_COMPAT`
//!   since KVM's irqchip includes the dual 8259. No interrupt source overrides:
//!   ISA IRQs map 1:1 to GSIs with the ISA default polarity and trigger, which is
//!   what KVM's default routing does.
//! - VMGenID (Microsoft's "Virtual Machine Generation ID" spec, Linux's
//!   `drivers/virt/vmgenid.c`): a `VGEN` device with `_HID` "VMGENCTR" (the id
//!   Linux matches) and `_CID`/`_DDN` "VM_Gen_Counter", whose `ADDR` package
//!   gives the guest-physical address of a 16-byte generation ID
//!   ([`VMGENID_ADDR`], 8-byte aligned, in the reserved range's last page). A
//!   Generic Event Device (`GED0`, ACPI0013, ACPI 6.5 §5.6.9) owns one
//!   edge-triggered GSI; its `_EVT` does `Notify(\_SB.VGEN, 0x80)`, which tells
//!   the guest to read the new ID after the VMM wrote it (every restore).
//! - virtio-mmio devices are `LNRO0005` with an edge-triggered, active-high
//!   extended interrupt, as Firecracker and Cloud Hypervisor declare them on x86
//!   (irqfd raises edges; Linux's virtio-mmio driver reads and acknowledges
//!   `InterruptStatus` on each edge).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use devices::power::{
    POWER_PORT_BASE, RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
    SLP_TYP_S5,
};
use devices::serial::{COM1_GSI, COM1_PORT_BASE, COM1_PORT_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// First byte of the guest-physical range holding the ACPI tables (reserved in
/// e820).
pub const ACPI_REGION_START: u64 = 0xe_0000;
/// End (exclusive) of the ACPI table range: 1 MiB.
pub const ACPI_REGION_END: u64 = 0x10_0000;
/// Size of the ACPI table range.
pub const ACPI_REGION_SIZE: u64 = ACPI_REGION_END - ACPI_REGION_START;
/// Where the RSDP is written.
pub const RSDP_ADDR: u64 = ACPI_REGION_START;
/// The VMGenID generation ID (16 bytes): the reserved range's last page, which
/// the tables never reach.
pub const VMGENID_ADDR: u64 = ACPI_REGION_END - 0x1000;
/// Bytes of the generation ID.
pub const VMGENID_LEN: usize = 16;
/// The tables end below the VMGenID page.
const TABLES_END: u64 = VMGENID_ADDR;

/// Local APIC base every vCPU sees.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC register window.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// IOAPIC input pins (KVM's IOAPIC has 24); GSIs start at 0.
pub const IOAPIC_PINS: u32 = 24;
/// Most vCPUs the xAPIC MADT entries can describe (APIC IDs 0..=254; 255 is the
/// broadcast ID).
pub const MAX_VCPUS: u32 = 255;
/// Most virtio-mmio devices the DSDT names (`V000` .. `VFFF`).
pub const MAX_VIRTIO_MMIO_DEVICES: usize = 0x1000;

const OEM_ID: [u8; 6] = *b"SPRMCH";
const OEM_REVISION: u32 = 1;
// Ours, for FADT "Hypervisor Vendor Identity" (ACPI 6.5 §5.2.9).
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"SUPERMCH";
// Tables are placed on this boundary (8 is the minimum for the 64-bit fields).
const TABLE_ALIGN: u64 = 16;
// The DSDT holds 64-bit integers from revision 2 on (ACPI 6.5 §5.2.11.1).
const DSDT_REVISION: u8 = 2;
const MADT_REVISION: u8 = 5;
const MADT_FLAG_PCAT_COMPAT: u32 = 1;

// FADT IAPC_BOOT_ARCH flags (ACPI 6.5 Table 5.11).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// One virtio-mmio transport to describe in the DSDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Window length in bytes.
    pub len: u64,
    /// The IOAPIC input (GSI) the device's interrupt line drives.
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC IDs `0 .. vcpus`).
    pub vcpus: u32,
    /// virtio-mmio transports, in `_UID` order.
    pub virtio_mmio: Vec<MmioDeviceInfo>,
    /// The GSI of the VMGenID device's Generic Event Device; `None` = no
    /// VMGenID device.
    pub vmgenid_gsi: Option<u32>,
}

/// Building or writing the ACPI tables failed.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The VM has no vCPU.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than xAPIC IDs.
    #[error("{vcpus} vCPUs requested; at most {max} are supported")]
    TooManyVcpus {
        /// Requested.
        vcpus: u32,
        /// Supported.
        max: u32,
    },
    /// More virtio-mmio devices than the DSDT names.
    #[error("{count} virtio-mmio devices requested; at most {max} are supported")]
    TooManyMmioDevices {
        /// Requested.
        count: usize,
        /// Supported.
        max: usize,
    },
    /// A virtio-mmio window is empty or not entirely below 4 GiB.
    #[error(
        "virtio-mmio device {index}: window {base:#x} + {len:#x} must be non-empty and below 4 GiB"
    )]
    MmioWindow {
        /// Device index.
        index: usize,
        /// Window base.
        base: u64,
        /// Window length.
        len: u64,
    },
    /// A virtio-mmio interrupt is not an IOAPIC input or is already taken.
    #[error(
        "virtio-mmio device {index}: GSI {gsi} is not a free IOAPIC input \
         (0..{IOAPIC_PINS}, not COM1's {COM1_GSI}, not shared)"
    )]
    MmioGsi {
        /// Device index.
        index: usize,
        /// Requested GSI.
        gsi: u32,
    },
    /// The VMGenID event's interrupt is not an IOAPIC input or is taken.
    #[error(
        "VMGenID: GSI {gsi} is not a free IOAPIC input (0..{IOAPIC_PINS}, not COM1's \
         {COM1_GSI}, not a virtio-mmio device's)"
    )]
    VmGenIdGsi {
        /// Requested GSI.
        gsi: u32,
    },
    /// The tables do not fit in the reserved range.
    #[error(
        "the ACPI tables need {needed} bytes; the reserved range holds {}",
        TABLES_END - ACPI_REGION_START
    )]
    TooLarge {
        /// Bytes needed.
        needed: u64,
    },
    /// Writing a table into guest memory failed.
    #[error("writing the ACPI {table} table at {addr:#x} into guest memory failed")]
    WriteMemory {
        /// Table signature.
        table: String,
        /// Guest-physical address.
        addr: u64,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// One built table and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// Signature (`RSD PTR ` is shortened to `RSDP`).
    pub signature: [u8; 4],
    /// Guest-physical address.
    pub addr: u64,
    /// The table's bytes, checksummed.
    pub bytes: Vec<u8>,
}

/// The full table set, laid out in the reserved range; RSDP first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// RSDP, DSDT, FADT, MADT, XSDT in address order.
    pub tables: Vec<AcpiTable>,
}

impl AcpiTables {
    /// Where the RSDP is.
    pub fn rsdp_addr(&self) -> GuestAddress {
        GuestAddress(RSDP_ADDR)
    }
}

fn align_up(value: u64) -> u64 {
    value.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    if cfg.vcpus > MAX_VCPUS {
        return Err(AcpiError::TooManyVcpus {
            vcpus: cfg.vcpus,
            max: MAX_VCPUS,
        });
    }
    if cfg.virtio_mmio.len() > MAX_VIRTIO_MMIO_DEVICES {
        return Err(AcpiError::TooManyMmioDevices {
            count: cfg.virtio_mmio.len(),
            max: MAX_VIRTIO_MMIO_DEVICES,
        });
    }
    for (index, dev) in cfg.virtio_mmio.iter().enumerate() {
        let fits_32 = dev
            .base
            .checked_add(dev.len)
            .is_some_and(|end| end <= 1 << 32);
        if dev.len == 0 || !fits_32 {
            return Err(AcpiError::MmioWindow {
                index,
                base: dev.base,
                len: dev.len,
            });
        }
        let shared = cfg.virtio_mmio[..index].iter().any(|d| d.gsi == dev.gsi);
        if dev.gsi >= IOAPIC_PINS || dev.gsi == COM1_GSI || shared {
            return Err(AcpiError::MmioGsi {
                index,
                gsi: dev.gsi,
            });
        }
    }
    if let Some(gsi) = cfg.vmgenid_gsi {
        if gsi >= IOAPIC_PINS || gsi == COM1_GSI || cfg.virtio_mmio.iter().any(|d| d.gsi == gsi) {
            return Err(AcpiError::VmGenIdGsi { gsi });
        }
    }
    Ok(())
}

/// An SDT with our OEM fields and `body` after the header, checksummed.
fn sdt(signature: [u8; 4], revision: u8, table_id: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut table = Sdt::new(signature, 36, revision, OEM_ID, *table_id, OEM_REVISION);
    table.append_slice(body);
    table.as_slice().to_vec()
}

/// The DSDT: `_S5_`, COM1 and the virtio-mmio devices under `\_SB`.
fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();

    // ACPI 6.5 §7.4.2: the `_S5_` package gives SLP_TYPa / SLP_TYPb for soft-off;
    // Linux offers ACPI power-off only when it exists. In hardware-reduced mode only
    // SLP_TYPa is used (written to the sleep control register).
    let s5_typ = SLP_TYP_S5;
    let zero = 0u8;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_typ, &s5_typ, &zero, &zero]),
    )
    .to_aml_bytes(&mut body);

    let com1_uid = 0u8;
    // Port constants are small (0x3f8, 8); the casts cannot truncate.
    let com1_io = aml::IO::new(
        COM1_PORT_BASE as u16,
        COM1_PORT_BASE as u16,
        1,
        COM1_PORT_LEN as u8,
    );
    // ISA IRQ 4: edge-triggered, active-high, exclusive.
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let mut com1 = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &com1_hid),
            &aml::Name::new("_UID".into(), &com1_uid),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut com1);

    let mut sb_children: Vec<RawAml> = Vec::with_capacity(3 + cfg.virtio_mmio.len());
    sb_children.push(RawAml(com1));

    for (index, dev) in cfg.virtio_mmio.iter().enumerate() {
        // `validate` keeps the window below 4 GiB and the index below 0x1000.
        let window = aml::Memory32Fixed::new(true, dev.base as u32, dev.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        let uid = index as u32;
        let name = format!("V{index:03X}");
        let mut bytes = Vec::new();
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                // Cache-coherent DMA (ACPI 6.5 §6.2.17).
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut bytes);
        sb_children.push(RawAml(bytes));
    }

    if let Some(gsi) = cfg.vmgenid_gsi {
        sb_children.extend(vmgenid_devices(gsi));
    }

    let children: Vec<&dyn Aml> = sb_children.iter().map(|b| b as &dyn Aml).collect();
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);

    sdt(*b"DSDT", DSDT_REVISION, b"SMDSDT  ", &body)
}

/// The VMGenID device and the Generic Event Device that notifies it on `gsi`.
fn vmgenid_devices(gsi: u32) -> [RawAml; 2] {
    // The address as two 32-bit halves (the driver reads a package of two
    // integers, low first); it is below 1 MiB, so the high half is 0.
    let (low, high) = (VMGENID_ADDR as u32, (VMGENID_ADDR >> 32) as u32);
    let mut vgen = Vec::new();
    aml::Device::new(
        "VGEN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"VMGENCTR"),
            &aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
            &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &aml::Name::new("ADDR".into(), &aml::Package::new(vec![&low, &high])),
        ],
    )
    .to_aml_bytes(&mut vgen);

    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let target = aml::Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&target, &0x80u8);
    let this_gsi = aml::Equal::new(&aml::Arg(0), &gsi);
    let on_gsi = aml::If::new(&this_gsi, vec![&notify]);
    let uid = 0u8;
    let mut ged = Vec::new();
    aml::Device::new(
        "GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
            // ACPI 6.5 §5.6.9.3: _EVT gets the GSI that fired.
            &aml::Method::new("_EVT".into(), 1, true, vec![&on_gsi]),
        ],
    )
    .to_aml_bytes(&mut ged);
    [RawAml(vgen), RawAml(ged)]
}

/// AML already encoded, to put devices built in a loop into one scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::with_capacity(8 + 8 * cfg.vcpus as usize + 12);
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&MADT_FLAG_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cfg.vcpus {
        // `validate` keeps `vcpus <= 255`, so the index fits a u8.
        let id = cpu as u8;
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(0, IOAPIC_ADDR, 0).to_aml_bytes(&mut body);
    sdt(*b"APIC", MADT_REVISION, b"SMMADT  ", &body)
}

fn system_io_byte(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, *b"SMFADT  ", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // Power and sleep buttons, if any, are control-method devices, not fixed
        // hardware (there are none).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    builder.iapc_boot_arch = (IAPC_BOOT_ARCH_VGA_NOT_PRESENT
        | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED
        | IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS
        | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
        .into();
    builder.reset_reg = system_io_byte(POWER_PORT_BASE + RESET_OFFSET);
    builder.reset_value = RESET_VALUE;
    builder.sleep_control_reg = system_io_byte(POWER_PORT_BASE + SLEEP_CONTROL_OFFSET);
    builder.sleep_status_reg = system_io_byte(POWER_PORT_BASE + SLEEP_STATUS_OFFSET);
    builder.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    let mut bytes = Vec::new();
    builder.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// Builds every table for `cfg` and lays them out from [`RSDP_ADDR`].
pub fn build_acpi_tables(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    validate(cfg)?;

    let rsdp_len = Rsdp::len() as u64;
    let dsdt = dsdt(cfg);
    let dsdt_addr = align_up(RSDP_ADDR + rsdp_len);
    let fadt = fadt(dsdt_addr);
    let fadt_addr = align_up(dsdt_addr + dsdt.len() as u64);
    let madt = madt(cfg);
    let madt_addr = align_up(fadt_addr + fadt.len() as u64);
    let xsdt_addr = align_up(madt_addr + madt.len() as u64);

    let mut xsdt = XSDT::new(OEM_ID, *b"SMXSDT  ", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);

    let end = xsdt_addr + xsdt_bytes.len() as u64;
    if end > TABLES_END {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_REGION_START,
        });
    }

    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);

    Ok(AcpiTables {
        tables: vec![
            AcpiTable {
                signature: *b"RSDP",
                addr: RSDP_ADDR,
                bytes: rsdp_bytes,
            },
            AcpiTable {
                signature: *b"DSDT",
                addr: dsdt_addr,
                bytes: dsdt,
            },
            AcpiTable {
                signature: *b"FACP",
                addr: fadt_addr,
                bytes: fadt,
            },
            AcpiTable {
                signature: *b"APIC",
                addr: madt_addr,
                bytes: madt,
            },
            AcpiTable {
                signature: *b"XSDT",
                addr: xsdt_addr,
                bytes: xsdt_bytes,
            },
        ],
    })
}

/// Builds the tables for `cfg` and writes them into `mem` in
/// [`ACPI_REGION_START`] .. [`ACPI_REGION_END`]. Returns the RSDP's address.
pub fn write_acpi_tables<M: GuestMemory + ?Sized>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_acpi_tables(cfg)?;
    for table in &tables.tables {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(|source| AcpiError::WriteMemory {
                table: String::from_utf8_lossy(&table.signature).into_owned(),
                addr: table.addr,
                source,
            })?;
    }
    Ok(tables.rsdp_addr())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn config(vcpus: u32, devices: usize) -> AcpiConfig {
        AcpiConfig {
            vcpus,
            virtio_mmio: (0..devices)
                .map(|i| MmioDeviceInfo {
                    base: 0xd000_0000 + 0x1000 * i as u64,
                    len: 0x1000,
                    gsi: 5 + i as u32,
                })
                .collect(),
            vmgenid_gsi: Some(23),
        }
    }

    #[test]
    fn a_vmgenid_gsi_that_is_taken_or_not_an_ioapic_input_is_refused() {
        for gsi in [COM1_GSI, 5, IOAPIC_PINS] {
            let mut cfg = config(1, 2);
            cfg.vmgenid_gsi = Some(gsi);
            assert!(
                matches!(build_acpi_tables(&cfg), Err(AcpiError::VmGenIdGsi { gsi: g }) if g == gsi),
                "GSI {gsi}"
            );
        }
    }

    fn guest_memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads the SDT at `addr`, checks its signature, length and checksum.
    fn read_sdt(mem: &GuestMemoryMmap<()>, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, 36);
        assert_eq!(&header[..4], signature, "signature at {addr:#x}");
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36);
        let table = read(mem, addr, len);
        assert_eq!(
            sum(&table),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        assert!(addr >= ACPI_REGION_START && addr + len as u64 <= ACPI_REGION_END);
        table
    }

    /// Follows RSDP -> XSDT -> FADT/MADT -> DSDT as an OS does.
    fn parse(mem: &GuestMemoryMmap<()>, rsdp: GuestAddress) -> [Vec<u8>; 4] {
        let rsdp = read(mem, rsdp.0, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(u32_at(&rsdp, 20), 36);
        let xsdt = read_sdt(mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let fadt = read_sdt(mem, u64_at(&xsdt, 36), b"FACP");
        let madt = read_sdt(mem, u64_at(&xsdt, 44), b"APIC");
        // X_DSDT at offset 140 (ACPI 6.5 Table 5.9); the 32-bit DSDT field is 0.
        assert_eq!(u32_at(&fadt, 40), 0);
        let dsdt = read_sdt(mem, u64_at(&fadt, 140), b"DSDT");
        [xsdt, fadt, madt, dsdt]
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn write_acpi_tables_parse_back_with_valid_checksums() {
        let mem = guest_memory();
        let rsdp = write_acpi_tables(&mem, &config(2, 3)).unwrap();
        assert_eq!(rsdp, GuestAddress(RSDP_ADDR));
        assert_eq!(RSDP_ADDR % 16, 0, "RSDP must be on a 16-byte boundary");
        let [_, _, _, dsdt] = parse(&mem, rsdp);
        assert!(contains(&dsdt, b"LNRO0005"));
        assert!(contains(&dsdt, b"_S5_"));
        for name in [b"V000", b"V001", b"V002"] {
            assert!(contains(&dsdt, name));
        }
        assert!(!contains(&dsdt, b"V003"));
    }

    #[test]
    fn fadt_is_hw_reduced_with_power_registers() {
        let mem = guest_memory();
        let rsdp = write_acpi_tables(&mem, &config(1, 0)).unwrap();
        let [_, fadt, _, _] = parse(&mem, rsdp);
        assert_eq!(fadt.len(), 276, "ACPI 6.x FADT length");
        assert_eq!(fadt[8], 6, "FADT major revision");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(iapc & 0b10, 0, "no 8042 advertised");
        assert_ne!(iapc & (1 << 5), 0, "no CMOS RTC");
        // RESET_REG GAS at 116, RESET_VALUE at 128.
        assert_eq!(
            &fadt[116..120],
            &[1, 8, 0, 1],
            "SystemIO, 8 bits, byte access"
        );
        assert_eq!(u64_at(&fadt, 120), 0x602);
        assert_eq!(fadt[128], 0x01);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 248), 0x600);
        assert_eq!(&fadt[256..260], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 260), 0x601);
    }

    #[test]
    fn madt_has_one_local_apic_per_vcpu_and_the_ioapic() {
        for vcpus in [1, 4, MAX_VCPUS] {
            let mem = guest_memory();
            let rsdp = write_acpi_tables(&mem, &config(vcpus, 1)).unwrap();
            let [_, _, madt, _] = parse(&mem, rsdp);
            assert_eq!(u32_at(&madt, 36), LAPIC_ADDR);
            assert_eq!(u32_at(&madt, 40), MADT_FLAG_PCAT_COMPAT);
            let mut off = 44;
            let mut lapic_ids = Vec::new();
            let mut ioapics = Vec::new();
            while off < madt.len() {
                let (kind, len) = (madt[off], madt[off + 1] as usize);
                assert!(len >= 2 && off + len <= madt.len(), "entry fits");
                match kind {
                    0 => {
                        assert_eq!(u32_at(&madt, off + 4) & 1, 1, "enabled");
                        lapic_ids.push(madt[off + 3]);
                    }
                    1 => ioapics.push((u32_at(&madt, off + 4), u32_at(&madt, off + 8))),
                    other => panic!("unexpected MADT entry type {other}"),
                }
                off += len;
            }
            assert_eq!(lapic_ids.len(), vcpus as usize);
            assert_eq!(lapic_ids, (0..vcpus).map(|i| i as u8).collect::<Vec<_>>());
            assert_eq!(ioapics, vec![(IOAPIC_ADDR, 0)]);
        }
    }

    #[test]
    fn build_acpi_tables_invalid_config_refused() {
        assert!(matches!(
            build_acpi_tables(&config(0, 0)),
            Err(AcpiError::NoVcpus)
        ));
        assert!(matches!(
            build_acpi_tables(&config(MAX_VCPUS + 1, 0)),
            Err(AcpiError::TooManyVcpus { .. })
        ));
        let mut cfg = config(1, 2);
        cfg.virtio_mmio[1].gsi = cfg.virtio_mmio[0].gsi;
        assert!(matches!(
            build_acpi_tables(&cfg),
            Err(AcpiError::MmioGsi { index: 1, .. })
        ));
        cfg.virtio_mmio[1].gsi = COM1_GSI;
        assert!(matches!(
            build_acpi_tables(&cfg),
            Err(AcpiError::MmioGsi { index: 1, .. })
        ));
        cfg.virtio_mmio[1].gsi = IOAPIC_PINS;
        assert!(matches!(
            build_acpi_tables(&cfg),
            Err(AcpiError::MmioGsi { index: 1, .. })
        ));
        let mut cfg = config(1, 1);
        cfg.virtio_mmio[0].base = 0xffff_f000;
        cfg.virtio_mmio[0].len = 0x2000;
        assert!(matches!(
            build_acpi_tables(&cfg),
            Err(AcpiError::MmioWindow { index: 0, .. })
        ));
        cfg.virtio_mmio[0].base = 0xd000_0000;
        cfg.virtio_mmio[0].len = 0;
        assert!(matches!(
            build_acpi_tables(&cfg),
            Err(AcpiError::MmioWindow { index: 0, .. })
        ));
    }

    #[test]
    fn write_acpi_tables_memory_too_small_reports_write_error() {
        // Guest memory that ends before the ACPI range.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        let err = write_acpi_tables(&mem, &config(1, 0)).unwrap_err();
        assert!(matches!(err, AcpiError::WriteMemory { .. }), "{err}");
    }

    #[test]
    fn build_acpi_tables_many_devices_fit_region() {
        // The largest configuration must still fit the reserved range.
        let mut cfg = config(MAX_VCPUS, 0);
        // Every IOAPIC pin from 5 on but the VMGenID event's (the last).
        cfg.virtio_mmio = (0..IOAPIC_PINS - 6)
            .map(|i| MmioDeviceInfo {
                base: 0xd000_0000 + 0x1000 * u64::from(i),
                len: 0x1000,
                gsi: 5 + i,
            })
            .collect();
        let tables = build_acpi_tables(&cfg).unwrap();
        let last = tables.tables.last().unwrap();
        assert!(last.addr + last.bytes.len() as u64 <= VMGENID_ADDR);
        // Tables do not overlap and are aligned.
        for pair in tables.tables.windows(2) {
            assert!(pair[0].addr + pair[0].bytes.len() as u64 <= pair[1].addr);
            assert_eq!(pair[1].addr % 8, 0);
        }
    }

    /// Disassembles every table with ACPICA's `iasl -d` and checks it decodes
    /// without errors. Skipped (with a message) when `iasl` is not installed.
    #[test]
    fn acpi_tables_disassemble_cleanly_with_iasl() {
        use std::process::Command;

        if Command::new("iasl").arg("-v").output().is_err() {
            eprintln!("skipping: iasl (Debian package acpica-tools) is not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!(
            "supermachine-acpi-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();

        let tables = build_acpi_tables(&config(2, 2)).unwrap();
        let mut dsl = std::collections::HashMap::new();
        for table in tables.tables.iter().filter(|t| &t.signature != b"RSDP") {
            let name = String::from_utf8_lossy(&table.signature).into_owned();
            let dat = dir.join(format!("{name}.dat"));
            std::fs::write(&dat, &table.bytes).unwrap();
            let out = Command::new("iasl")
                .arg("-d")
                .arg(&dat)
                .current_dir(&dir)
                .output()
                .unwrap();
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl -d {name} failed:\n{log}");
            for bad in ["Error ", "error:", "Invalid", "checksum is incorrect"] {
                assert!(
                    !log.contains(bad),
                    "iasl -d {name} reported `{bad}`:\n{log}"
                );
            }
            let text = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            assert!(
                !text.contains("Incorrect checksum") && !text.contains("**** "),
                "{name} disassembly flags a problem:\n{text}"
            );
            dsl.insert(name, text);
        }

        let dsdt = &dsl["DSDT"];
        for needle in [
            "LNRO0005",
            "_S5_",
            "PNP0501",
            "V000",
            "V001",
            "0xD0001000",
            // VMGenID: the id Linux matches, the ID's address (low, high) and
            // the GED that notifies it on GSI 23.
            "\"VMGENCTR\"",
            "\"VM_Gen_Counter\"",
            "0x000FF000",
            "\"ACPI0013\"",
            "Method (_EVT, 1, Serialized)",
            "If ((Arg0 == 0x17))",
            "Notify (\\_SB.VGEN, 0x80)",
            "0x00000017,",
        ] {
            assert!(dsdt.contains(needle), "DSDT lacks {needle}:\n{dsdt}");
        }
        let fadt = &dsl["FACP"];
        assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
        let madt = &dsl["APIC"];
        assert_eq!(madt.matches("[Processor Local APIC]").count(), 2, "{madt}");
        assert!(madt.contains("[I/O APIC]"), "{madt}");

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
