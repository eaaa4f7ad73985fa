//! x86_64 guest layout, boot protocol and firmware tables, and the platform the
//! generic run loop gets on this architecture: legacy devices on the port-I/O bus
//! (COM1, the ACPI power block, i8042), ACPI tables, the kernel and initramfs.
pub mod acpi;
pub mod boot;
pub mod layout;

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::Bus;
use hypervisor::{BootState, IrqLine, Vm};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::console::ConsoleOut;
use crate::resources::VmResources;
use crate::timings::Timings;
use crate::vmm::{DeviceStates, Platform, RunError};

pub use layout::ram_ranges;

/// Errors of the x86_64 platform setup.
#[derive(Debug, Error)]
pub enum PlatformError {
    /// Loading the kernel or initramfs failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Writing the ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A new VMGenID generation ID could not be made or written.
    #[error("cannot give the VM a new VMGenID generation ID: {0}")]
    GenerationId(String),
}

/// Writes a fresh VMGenID generation ID (16 bytes from the OS's random source)
/// into guest memory at [`acpi::VMGENID_ADDR`]; with `notify` (a restored VM,
/// whose guest holds the previous ID) also raises the Generic Event Device's
/// edge, whose `_EVT` tells the guest's vmgenid driver to read it again, so a
/// kernel with that driver reseeds its random state in every clone. Called
/// for a restored VM once its interrupt controller and vCPUs hold their saved
/// state: the edge then stays pending until the guest runs.
pub fn new_generation<L: IrqLine>(
    mem: &GuestMemoryMmap,
    notify: Option<&L>,
) -> Result<(), RunError> {
    use vm_memory::{Bytes, GuestAddress};
    let mut id = [0u8; acpi::VMGENID_LEN];
    getrandom::fill(&mut id).map_err(|e| PlatformError::GenerationId(e.to_string()))?;
    mem.write_slice(&id, GuestAddress(acpi::VMGENID_ADDR))
        .map_err(|e| PlatformError::GenerationId(e.to_string()))?;
    if let Some(line) = notify {
        line.trigger()?;
    }
    Ok(())
}

/// The VMGenID device's interrupt line (its GED's GSI), made once per VM while
/// it is built, so a restore (in place, in a sandboxed worker) makes none.
pub fn generation_line<V: Vm>(vm: &V) -> Result<Option<V::IrqLine>, RunError> {
    Ok(Some(vm.irq_line(layout::VMGENID_GSI)?))
}

/// Builds the x86_64 platform in `mem` for `vm` (whose interrupt controller exists):
/// COM1 (to `console`), the power block and i8042 on the port bus, the ACPI tables,
/// the kernel and initramfs, and the boot CPU's entry state. With `saved`, the
/// devices are restored from it instead, and guest memory (which already holds
/// the saved RAM) is left alone: no tables, no kernel, no boot state.
pub fn setup_platform<V: Vm>(
    vm: &V,
    mem: &Arc<GuestMemoryMmap>,
    res: &VmResources,
    console: Box<dyn Write + Send>,
    timings: &Arc<Timings>,
    saved: Option<&DeviceStates>,
) -> Result<Platform, RunError> {
    let mut pio = Bus::new();
    let serial = Arc::new(Mutex::new(crate::console::serial(
        vm,
        devices::serial::COM1_GSI,
        ConsoleOut::new(console, timings.clone()),
        saved.map(|s| &s.serial),
    )?));
    pio.insert(
        devices::serial::COM1_PORT_BASE,
        devices::serial::COM1_PORT_LEN,
        serial.clone(),
    )
    .map_err(|source| RunError::Device {
        what: "serial console",
        source,
    })?;
    let power = Arc::new(Mutex::new(
        saved.map_or_else(devices::power::PowerDevice::new, |s| {
            devices::power::PowerDevice::from_state(&s.power)
        }),
    ));
    pio.insert(
        devices::power::POWER_PORT_BASE,
        devices::power::POWER_PORT_LEN,
        power.clone(),
    )
    .map_err(|source| RunError::Device {
        what: "ACPI power device",
        source,
    })?;
    let i8042 = Arc::new(Mutex::new(match saved.and_then(|s| s.i8042.as_ref()) {
        Some(s) => devices::i8042::I8042::from_state(s),
        None => devices::i8042::I8042::new(),
    }));
    pio.insert(
        devices::i8042::I8042_PORT_BASE,
        devices::i8042::I8042_PORT_LEN,
        i8042.clone(),
    )
    .map_err(|source| RunError::Device {
        what: "i8042",
        source,
    })?;

    let mut mmio = Bus::new();
    let virtio = crate::virtio::attach(
        vm,
        mem,
        res,
        &mut mmio,
        &layout::VIRTIO_SLOTS,
        saved.map(|s| s.virtio.as_slice()),
    )?;
    if saved.is_some() {
        return Ok(Platform {
            pio,
            mmio,
            serial,
            i8042: Some(i8042),
            power,
            boot: None,
            virtio,
        });
    }
    let rsdp = acpi::write_acpi_tables(
        mem.as_ref(),
        &acpi::AcpiConfig {
            vcpus: res.vcpus,
            virtio_mmio: virtio
                .iter()
                .map(|a| acpi::MmioDeviceInfo {
                    base: a.placement.base,
                    len: a.len,
                    gsi: a.placement.irq,
                })
                .collect(),
            vmgenid_gsi: Some(layout::VMGENID_GSI),
        },
    )
    .map_err(PlatformError::from)?;
    new_generation::<V::IrqLine>(mem, None)?;

    timings.phase("devices_ready");
    let mem = mem.as_ref();
    let kernel = boot::load_kernel(mem, &res.kernel).map_err(PlatformError::from)?;
    timings.phase("kernel_loaded");
    let initrd = match &res.initrd {
        Some(p) => {
            Some(boot::load_initrd(mem, p, initrd_limit(&kernel)).map_err(PlatformError::from)?)
        }
        None => None,
    };
    let boot_state = boot::configure_boot(mem, &kernel, &res.cmdline, initrd, Some(rsdp.0))
        .map_err(PlatformError::from)?;
    timings.phase("boot_configured");

    Ok(Platform {
        pio,
        mmio,
        serial,
        i8042: Some(i8042),
        power,
        boot: Some(BootState::X86_64(boot_state)),
        virtio,
    })
}

/// Highest address the initramfs may end at: the kernel's `initrd_addr_max`.
fn initrd_limit(k: &boot::LoadedKernel) -> u64 {
    k.initrd_addr_max()
        .map_or(layout::MMIO_GAP_START, |m| m + 1)
}
