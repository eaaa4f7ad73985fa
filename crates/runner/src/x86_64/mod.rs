//! x86_64 guest layout, boot protocol and firmware tables, and the platform the
//! generic run loop gets on this architecture: legacy devices on the port-I/O bus
//! (COM1, the ACPI power block, i8042), ACPI tables, the kernel and initramfs.
pub mod acpi;
pub mod boot;
pub mod layout;

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::Bus;
use hypervisor::{BootState, Vm};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::console::ConsoleOut;
use crate::resources::VmResources;
use crate::timings::Timings;
use crate::vmm::{LineInterrupt, Platform, RunError};

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
}

/// Builds the x86_64 platform in `mem` for `vm` (whose interrupt controller exists):
/// COM1 (to `console`), the power block and i8042 on the port bus, the ACPI tables,
/// the kernel and initramfs, and the boot CPU's entry state.
pub fn setup_platform<V: Vm>(
    vm: &V,
    mem: &Arc<GuestMemoryMmap>,
    res: &VmResources,
    console: Box<dyn Write + Send>,
    timings: &Arc<Timings>,
) -> Result<Platform, RunError> {
    let mut pio = Bus::new();
    let serial_irq = Arc::new(LineInterrupt::new(
        devices::serial::COM1_GSI,
        vm.irq_line(devices::serial::COM1_GSI)?,
    ));
    let serial =
        devices::serial::Serial::new(serial_irq, ConsoleOut::new(console, timings.clone()));
    pio.insert(
        devices::serial::COM1_PORT_BASE,
        devices::serial::COM1_PORT_LEN,
        Arc::new(Mutex::new(serial)),
    )
    .map_err(|source| RunError::Device {
        what: "serial console",
        source,
    })?;
    let power = Arc::new(Mutex::new(devices::power::PowerDevice::new()));
    pio.insert(
        devices::power::POWER_PORT_BASE,
        devices::power::POWER_PORT_LEN,
        power.clone(),
    )
    .map_err(|source| RunError::Device {
        what: "ACPI power device",
        source,
    })?;
    pio.insert(
        devices::i8042::I8042_PORT_BASE,
        devices::i8042::I8042_PORT_LEN,
        Arc::new(Mutex::new(devices::i8042::I8042::new())),
    )
    .map_err(|source| RunError::Device {
        what: "i8042",
        source,
    })?;

    let mut mmio = Bus::new();
    let virtio = crate::virtio::attach(vm, mem, res, &mut mmio, &layout::VIRTIO_SLOTS)?;
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
        },
    )
    .map_err(PlatformError::from)?;

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
        power,
        boot: BootState::X86_64(boot_state),
        virtio,
    })
}

/// Highest address the initramfs may end at: the kernel's `initrd_addr_max`.
fn initrd_limit(k: &boot::LoadedKernel) -> u64 {
    k.initrd_addr_max()
        .map_or(layout::MMIO_GAP_START, |m| m + 1)
}
