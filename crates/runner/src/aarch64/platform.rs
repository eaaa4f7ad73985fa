//! The aarch64 platform (aarch64 builds only: linux-loader's PE loader exists only
//! there): the console UART and the power block on the MMIO bus, kernel, initramfs
//! and device tree in RAM, the boot CPU's entry state.

use std::fs::File;
use std::io::{Cursor, Write};
use std::sync::{Arc, Mutex};

use devices::Bus;
use hypervisor::{BootState, Vm};
use linux_loader::loader::pe::PE;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{self, BootError};
use super::fdt;
use super::layout;
use crate::console::ConsoleOut;
use crate::resources::VmResources;
use crate::timings::Timings;
use crate::vmm::{DeviceStates, Platform, RunError};

/// Builds the aarch64 platform in `mem` for `vm` (whose GIC exists): the 16550A at
/// [`layout::UART_BASE`] (to `console`), the power block at [`layout::POWER_BASE`],
/// the kernel Image, initramfs and device tree, and the boot CPU's entry state.
/// Power-off and reset are PSCI calls the backend reports as `Shutdown`/`Reset`.
/// With `saved`, the devices are restored from it instead, and guest memory (which
/// already holds the saved RAM) is left alone: no kernel, no device tree, no boot
/// state.
pub fn setup_platform<V: Vm>(
    vm: &V,
    mem: &Arc<GuestMemoryMmap>,
    res: &VmResources,
    console: Box<dyn Write + Send>,
    timings: &Arc<Timings>,
    saved: Option<&DeviceStates>,
) -> Result<Platform, RunError> {
    boot::check_vcpus(res.vcpus)?;
    let mut mmio = Bus::new();
    let serial = Arc::new(Mutex::new(crate::console::serial(
        vm,
        layout::UART_SPI,
        ConsoleOut::new(console, timings.clone()),
        saved.map(|s| &s.serial),
    )?));
    mmio.insert(layout::UART_BASE, layout::UART_REG_LEN, serial.clone())
        .map_err(|source| RunError::Device {
            what: "serial console",
            source,
        })?;
    let power = Arc::new(Mutex::new(
        saved.map_or_else(devices::power::PowerDevice::new, |s| {
            devices::power::PowerDevice::from_state(&s.power)
        }),
    ));
    mmio.insert(
        layout::POWER_BASE,
        devices::power::POWER_PORT_LEN,
        power.clone(),
    )
    .map_err(|source| RunError::Device {
        what: "power block",
        source,
    })?;

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
            pio: Bus::new(),
            mmio,
            serial,
            i8042: None,
            power,
            boot: None,
            virtio,
        });
    }
    let mem = mem.as_ref();

    let (image, header) = boot::read_kernel(&res.kernel)?;
    let initrd_len = match &res.initrd {
        Some(p) => Some(
            std::fs::metadata(p)
                .map_err(|source| BootError::ReadInitrd {
                    path: p.clone(),
                    source,
                })?
                .len(),
        ),
        None => None,
    };
    let place = boot::plan(res.memory, &header, image.len() as u64, initrd_len)?;

    // The PE loader copies the Image to base + text_offset after checking the magic
    // and the base's 2 MiB alignment.
    let loaded = PE::load(
        mem,
        Some(GuestAddress(place.kernel_base)),
        &mut Cursor::new(image.as_slice()),
        None,
    )
    .map_err(BootError::Load)?;
    debug_assert_eq!(loaded.kernel_load.0, place.kernel_entry);
    timings.phase("kernel_loaded");

    if let (Some(path), Some((start, end))) = (&res.initrd, place.initrd) {
        let read_err = |source| BootError::ReadInitrd {
            path: path.clone(),
            source,
        };
        let mut f = File::open(path).map_err(read_err)?;
        mem.read_exact_volatile_from(GuestAddress(start), &mut f, (end - start) as usize)
            .map_err(|source| BootError::WriteMemory {
                what: "the initramfs",
                source,
            })?;
    }

    let cfg = boot::fdt_config(
        res.vcpus,
        res.memory,
        &res.cmdline,
        place.initrd,
        virtio
            .iter()
            .map(|a| fdt::VirtioMmio {
                base: a.placement.base,
                size: a.len,
                spi: a.placement.irq,
            })
            .collect(),
    );
    let dtb = boot::build_fdt(&cfg)?;
    mem.write_slice(&dtb, GuestAddress(place.fdt))
        .map_err(|source| BootError::WriteMemory {
            what: "the device tree",
            source,
        })?;
    timings.phase("boot_configured");

    Ok(Platform {
        pio: Bus::new(),
        mmio,
        serial,
        i8042: None,
        power,
        boot: Some(BootState::Aarch64(boot::boot_state(&place))),
        virtio,
    })
}

/// VMGenID on aarch64 (the device tree's `microsoft,vmgenid` node) is not
/// offered yet: nothing to write or notify.
pub fn new_generation<L: hypervisor::IrqLine>(
    _mem: &GuestMemoryMmap,
    _notify: Option<&L>,
) -> Result<(), RunError> {
    Ok(())
}

/// No VMGenID device on aarch64 yet: no line.
pub fn generation_line<V: Vm>(_vm: &V) -> Result<Option<V::IrqLine>, RunError> {
    Ok(None)
}
