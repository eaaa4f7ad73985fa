//! Attaching virtio-mmio devices (block, entropy, ...) to a VM: one transport per
//! device on the MMIO bus, each with its own window and edge-triggered interrupt
//! line. The architecture decides where windows and lines are (`place`); the
//! firmware tables (ACPI DSDT / FDT) list what this returns.

use std::sync::{Arc, Mutex};

use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use devices::virtio::rng::Rng;
use devices::virtio::{IrqMode, VirtioDevice};
use devices::Bus;
use hypervisor::Vm;
use thiserror::Error;

use crate::resources::VmResources;
use crate::vmm::{LineInterrupt, RunError};

/// Errors attaching virtio devices.
#[derive(Debug, Error)]
pub enum VirtioAttachError {
    /// A disk image could not be opened.
    #[error("cannot attach disk {path}: {source}")]
    Disk {
        /// The image path.
        path: String,
        /// The device error.
        #[source]
        source: devices::virtio::block::BlockError,
    },
    /// The vsock device could not be created (its host socket).
    #[error("cannot create the vsock device (CID {cid}): {source}")]
    Vsock {
        /// The guest CID.
        cid: u64,
        /// The device error.
        #[source]
        source: devices::virtio::vsock::VsockError,
    },
    /// The network device could not be set up (passt, TAP).
    #[error("cannot attach the network device: {0}")]
    Net(#[source] crate::net::NetError),
    /// The transport refused the device.
    #[error("cannot create the virtio-mmio transport for {what}: {source}")]
    Transport {
        /// Which device.
        what: String,
        /// The transport error.
        #[source]
        source: devices::virtio::mmio::MmioError,
    },
    /// More devices than the platform has windows or interrupt lines for.
    #[error("too many virtio devices ({count}); this platform has room for {max}")]
    TooMany {
        /// Devices requested.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Where one virtio-mmio device lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Base of its 4 KiB register window.
    pub base: u64,
    /// Its interrupt line (GSI on x86, SPI number on aarch64).
    pub irq: u32,
}

/// The virtio-mmio windows and interrupt lines a platform reserves: device `n` gets
/// the window at `base + n * stride` and line `first_irq + n`, for `n < max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    /// First window.
    pub base: u64,
    /// Distance between windows (at least the 4 KiB window).
    pub stride: u64,
    /// Interrupt line of the first device.
    pub first_irq: u32,
    /// How many devices fit.
    pub max: usize,
}

impl Slots {
    /// Where device `index` goes, if it fits.
    pub fn place(&self, index: usize) -> Option<Placement> {
        if index >= self.max {
            return None;
        }
        Some(Placement {
            base: self.base + index as u64 * self.stride,
            irq: self.first_irq + u32::try_from(index).ok()?,
        })
    }
}

/// A device that was attached.
#[derive(Debug)]
pub struct Attached {
    /// Where it is.
    pub placement: Placement,
    /// Length of its window.
    pub len: u64,
    /// What it is, for messages.
    pub what: String,
    /// The transport, shared with the bus (and the event loop for host-side events).
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The devices `res` asks for, in guest discovery order: disks first (the first one
/// is `/dev/vda`), then vsock, the network device and the entropy device.
/// A device to attach and its name for messages.
type NamedDevice = (String, Box<dyn VirtioDevice>);

fn devices_for(res: &VmResources) -> Result<Vec<NamedDevice>, RunError> {
    let mut out: Vec<NamedDevice> = Vec::new();
    for (i, d) in res.disks.iter().enumerate() {
        let serial = format!("sm-disk{i}");
        let blk = Block::open(&d.path, d.read_only, &serial).map_err(|source| {
            VirtioAttachError::Disk {
                path: d.path.display().to_string(),
                source,
            }
        })?;
        out.push((format!("disk {}", d.path.display()), Box::new(blk)));
    }
    if let Some(v) = &res.vsock {
        let dev = devices::virtio::vsock::Vsock::new(v.cid, v.uds_path.as_deref())
            .map_err(|source| VirtioAttachError::Vsock { cid: v.cid, source })?;
        out.push((format!("vsock (CID {})", v.cid), Box::new(dev)));
    }
    if let Some(n) = &res.network {
        let dev = crate::net::create_device(n).map_err(VirtioAttachError::Net)?;
        out.push(("network device".to_string(), Box::new(dev)));
    }
    if res.rng {
        out.push(("entropy device".to_string(), Box::new(Rng::new())));
    }
    Ok(out)
}

/// Creates a transport for every virtio device `res` asks for and puts it on `mmio`
/// in the platform's `slots`.
pub fn attach<V: Vm>(
    vm: &V,
    mem: &Arc<devices::virtio::GuestMemoryMmap>,
    res: &VmResources,
    mmio: &mut Bus,
    slots: &Slots,
) -> Result<Vec<Attached>, RunError> {
    let devs = devices_for(res)?;
    if devs.len() > slots.max {
        return Err(VirtioAttachError::TooMany {
            count: devs.len(),
            max: slots.max,
        }
        .into());
    }
    let mut attached = Vec::with_capacity(devs.len());
    for (i, (what, dev)) in devs.into_iter().enumerate() {
        let placement = slots.place(i).ok_or(VirtioAttachError::TooMany {
            count: i + 1,
            max: slots.max,
        })?;
        let irq = Arc::new(LineInterrupt::new(
            placement.irq,
            vm.irq_line(placement.irq)?,
        ));
        let transport =
            MmioTransport::new(dev, mem.clone(), irq, IrqMode::Edge).map_err(|source| {
                VirtioAttachError::Transport {
                    what: what.clone(),
                    source,
                }
            })?;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(placement.base, MMIO_WINDOW_SIZE, transport.clone())
            .map_err(|source| RunError::Device {
                what: "virtio-mmio device",
                source,
            })?;
        attached.push(Attached {
            placement,
            len: MMIO_WINDOW_SIZE,
            what,
            transport,
        });
    }
    Ok(attached)
}

/// The thread that serves the devices' host side (vsock sockets, ...) and, where
/// the backend has them, their queue notifications (ioeventfd) while the VM runs;
/// stopped and joined on drop, which also unregisters the notifications.
#[derive(Debug)]
pub struct DeviceEvents {
    #[cfg(target_os = "linux")]
    handle: crate::event_loop::EventLoopHandle,
    #[cfg(target_os = "linux")]
    thread: Option<std::thread::JoinHandle<Result<(), crate::event_loop::EventLoopError>>>,
    /// Queue notifications that reach the devices without a vCPU exit.
    ioevents: usize,
}

impl DeviceEvents {
    /// Starts serving `attached`, with one I/O event per queue registered with
    /// `vm` at the device's `QueueNotify` (datamatch: the queue index, which is
    /// what the driver writes there, virtio 1.2 §4.2.3.3). A backend without
    /// them, or a registration it refuses, leaves that queue's notifications on
    /// the MMIO-exit path, which handles them the same way.
    #[cfg(target_os = "linux")]
    pub fn start<V: Vm>(
        vm: &V,
        attached: &[Attached],
    ) -> Result<Self, crate::event_loop::EventLoopError> {
        let mut el = crate::event_loop::EventLoop::new()?;
        let mut ioevents = 0;
        for a in attached {
            el.add_transport(a.transport.clone())?;
            for (queue, event) in register_queue_notify(vm, a) {
                el.add_ioevent(event, a.transport.clone(), queue)?;
                ioevents += 1;
            }
        }
        let handle = el.handle();
        let thread = Some(el.spawn()?);
        Ok(Self {
            handle,
            thread,
            ioevents,
        })
    }

    /// No host-side device events on this platform yet; queue notifications
    /// arrive as MMIO exits (Hypervisor.framework has no ioeventfd).
    #[cfg(not(target_os = "linux"))]
    pub fn start<V: Vm>(_vm: &V, _attached: &[Attached]) -> Result<Self, std::convert::Infallible> {
        Ok(Self { ioevents: 0 })
    }

    /// How many queues are notified through I/O events rather than MMIO exits.
    pub fn ioevents(&self) -> usize {
        self.ioevents
    }
}

/// Registers an I/O event for each queue of `device` at its `QueueNotify`; empty
/// when the backend has none. A refused registration is logged and skipped: that
/// queue keeps the MMIO-exit path.
#[cfg(target_os = "linux")]
fn register_queue_notify<V: Vm>(vm: &V, device: &Attached) -> Vec<(u32, hypervisor::IoEvent)> {
    use devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
    let queues = device
        .transport
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .queue_count();
    let addr = hypervisor::IoEventAddress::Mmio(device.placement.base + QUEUE_NOTIFY_OFFSET);
    let mut out = Vec::with_capacity(queues);
    for queue in (0..queues).filter_map(|q| u32::try_from(q).ok()) {
        match vm.register_ioevent(addr, Some(queue)) {
            Ok(Some(event)) => out.push((queue, event)),
            // The backend has no I/O events: no queue will get one.
            Ok(None) => break,
            Err(e) => tracing::warn!(
                device = %device.what,
                queue,
                "queue notifications stay on MMIO exits: {e}"
            ),
        }
    }
    out
}

impl Drop for DeviceEvents {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        {
            self.handle.stop();
            if let Some(t) = self.thread.take() {
                if let Ok(Err(e)) = t.join() {
                    tracing::warn!("device event loop: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_place_linear_and_refuse_past_max() {
        let s = Slots {
            base: 0xd000_0000,
            stride: 0x1000,
            first_irq: 5,
            max: 2,
        };
        assert_eq!(
            s.place(1),
            Some(Placement {
                base: 0xd000_1000,
                irq: 6
            })
        );
        assert_eq!(s.place(2), None);
    }
}
