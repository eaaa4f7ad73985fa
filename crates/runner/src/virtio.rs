//! Attaching virtio-mmio devices (block, entropy, ...) to a VM: one transport per
//! device on the MMIO bus, each with its own window and edge-triggered interrupt
//! line. The architecture decides where windows and lines are (`place`); the
//! firmware tables (ACPI DSDT / FDT) list what this returns.

use std::sync::{Arc, Mutex};

use devices::virtio::block::{Block, BlockError};
use devices::virtio::mmio::{MmioTransport, MmioTransportState, MMIO_WINDOW_SIZE};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::{IrqMode, VirtioDevice};
use devices::Bus;
use hypervisor::Vm;
use thiserror::Error;

use crate::resources::VmResources;
use crate::vmm::{LineInterrupt, RunError, VirtioDeviceState, VirtioState};

/// Errors attaching virtio devices.
#[derive(Debug, Error)]
pub enum VirtioAttachError {
    /// A disk image could not be opened.
    #[error("cannot attach disk {path}")]
    Disk {
        /// The image path.
        path: String,
        /// The device error.
        #[source]
        source: devices::virtio::block::BlockError,
    },
    /// The vsock device could not be created (its host socket).
    #[error("cannot create the vsock device (CID {cid})")]
    Vsock {
        /// The guest CID.
        cid: u64,
        /// The device error.
        #[source]
        source: devices::virtio::vsock::VsockError,
    },
    /// The network device could not be set up (passt, TAP).
    #[error("cannot attach the network device")]
    Net(#[source] crate::net::NetError),
    /// The transport refused the device.
    #[error("cannot create the virtio-mmio transport for {what}")]
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

/// A device to attach, its name for messages, and the transport state to restore
/// it with (when restoring).
struct NamedDevice {
    what: String,
    device: Box<dyn VirtioDevice>,
    transport: Option<MmioTransportState>,
}

/// The devices `res` asks for, in guest discovery order: disks first (the first one
/// is `/dev/vda`), then vsock, the network device and the entropy device. With
/// `saved`, each is rebuilt from its saved state, which must list the same devices
/// in the same order.
fn devices_for(
    res: &VmResources,
    saved: Option<&[VirtioState]>,
) -> Result<Vec<NamedDevice>, RunError> {
    let mut saved = saved.map(|s| s.iter());
    let mut next_saved = |what: &str| -> Result<Option<&VirtioState>, RunError> {
        match saved.as_mut() {
            None => Ok(None),
            Some(it) => it.next().map(Some).ok_or_else(|| RunError::StateMismatch {
                what: format!("no saved state for the {what}"),
            }),
        }
    };
    let mismatch = |what: &str, s: &VirtioState| RunError::StateMismatch {
        what: format!(
            "the saved {} device is where this VM has its {what}",
            s.device.kind()
        ),
    };
    let mut out: Vec<NamedDevice> = Vec::new();
    for (i, d) in res.disks.iter().enumerate() {
        let what = format!("disk {}", d.path.display());
        let disk_error = |source| VirtioAttachError::Disk {
            path: d.path.display().to_string(),
            source,
        };
        let (blk, transport) = match next_saved(&what)? {
            None => (
                Block::open(&d.path, d.read_only, &format!("sm-disk{i}")).map_err(disk_error)?,
                None,
            ),
            Some(s) => {
                let VirtioDeviceState::Block(b) = &s.device else {
                    return Err(mismatch(&what, s));
                };
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(!b.read_only)
                    .open(&d.path)
                    .map_err(|source| BlockError::Open {
                        path: d.path.clone(),
                        read_only: b.read_only,
                        source,
                    })
                    .map_err(disk_error)?;
                (
                    Block::from_state(b, file).map_err(disk_error)?,
                    Some(s.transport.clone()),
                )
            }
        };
        out.push(NamedDevice {
            what,
            device: Box::new(blk),
            transport,
        });
    }
    if let Some(v) = &res.vsock {
        let what = format!("vsock (CID {})", v.cid);
        let vsock_error = |source| VirtioAttachError::Vsock { cid: v.cid, source };
        let (dev, transport) = match next_saved(&what)? {
            None => (
                Vsock::new(v.cid, v.uds_path.as_deref()).map_err(vsock_error)?,
                None,
            ),
            Some(s) => {
                let VirtioDeviceState::Vsock(vs) = &s.device else {
                    return Err(mismatch(&what, s));
                };
                (
                    Vsock::from_state(vs, v.uds_path.as_deref()).map_err(vsock_error)?,
                    Some(s.transport.clone()),
                )
            }
        };
        out.push(NamedDevice {
            what,
            device: Box::new(dev),
            transport,
        });
    }
    if let Some(n) = &res.network {
        let what = "network device".to_string();
        let (saved_net, transport) = match next_saved(&what)? {
            None => (None, None),
            Some(s) => {
                let VirtioDeviceState::Net(n) = &s.device else {
                    return Err(mismatch(&what, s));
                };
                (Some(*n), Some(s.transport.clone()))
            }
        };
        let dev =
            crate::net::create_device(n, saved_net.as_ref()).map_err(VirtioAttachError::Net)?;
        out.push(NamedDevice {
            what,
            device: Box::new(dev),
            transport,
        });
    }
    if res.rng {
        let what = "entropy device".to_string();
        let transport = match next_saved(&what)? {
            None => None,
            Some(s) if s.device == VirtioDeviceState::Rng => Some(s.transport.clone()),
            Some(s) => return Err(mismatch(&what, s)),
        };
        out.push(NamedDevice {
            what,
            device: Box::new(Rng::new()),
            transport,
        });
    }
    if let Some(mut rest) = saved {
        if let Some(s) = rest.next() {
            return Err(RunError::StateMismatch {
                what: format!(
                    "the saved state has a {} device this VM does not",
                    s.device.kind()
                ),
            });
        }
    }
    Ok(out)
}

/// Creates a transport for every virtio device `res` asks for and puts it on `mmio`
/// in the platform's `slots`; with `saved`, each device and transport is restored
/// from its saved state.
pub fn attach<V: Vm>(
    vm: &V,
    mem: &Arc<devices::virtio::GuestMemoryMmap>,
    res: &VmResources,
    mmio: &mut Bus,
    slots: &Slots,
    saved: Option<&[VirtioState]>,
) -> Result<Vec<Attached>, RunError> {
    let devs = devices_for(res, saved)?;
    if devs.len() > slots.max {
        return Err(VirtioAttachError::TooMany {
            count: devs.len(),
            max: slots.max,
        }
        .into());
    }
    let mut attached = Vec::with_capacity(devs.len());
    for (i, d) in devs.into_iter().enumerate() {
        let placement = slots.place(i).ok_or(VirtioAttachError::TooMany {
            count: i + 1,
            max: slots.max,
        })?;
        let irq = Arc::new(LineInterrupt::new(
            placement.irq,
            vm.irq_line(placement.irq)?,
        ));
        let transport_error = |source| VirtioAttachError::Transport {
            what: d.what.clone(),
            source,
        };
        let transport = match &d.transport {
            None => MmioTransport::new(d.device, mem.clone(), irq, IrqMode::Edge)
                .map_err(transport_error)?,
            Some(state) => MmioTransport::from_state(state, d.device, mem.clone(), irq)
                .map_err(transport_error)?,
        };
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(placement.base, MMIO_WINDOW_SIZE, transport.clone())
            .map_err(|source| RunError::Device {
                what: "virtio-mmio device",
                source,
            })?;
        attached.push(Attached {
            placement,
            len: MMIO_WINDOW_SIZE,
            what: d.what,
            transport,
        });
    }
    Ok(attached)
}

/// Opens host-initiated connections to guest vsock ports through the VM's own
/// vsock device, from any thread: no filesystem socket, no handshake line (see
/// `devices::virtio::vsock::Vsock::connect`).
#[derive(Clone)]
pub struct VsockHandle {
    transport: Arc<Mutex<MmioTransport>>,
}

impl std::fmt::Debug for VsockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHandle").finish_non_exhaustive()
    }
}

impl VsockHandle {
    /// The vsock device among `attached`, if there is one.
    pub fn find(attached: &[Attached]) -> Option<Self> {
        attached.iter().find_map(|a| Self::new(a.transport.clone()))
    }

    /// A handle on `transport` if it holds a vsock device: for a device set
    /// the caller assembled and drives itself (the VMM's own is
    /// [`crate::vmm::Vmm::vsock`]).
    pub fn new(transport: Arc<Mutex<MmioTransport>>) -> Option<Self> {
        let is_vsock = transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .device::<Vsock>()
            .is_some();
        is_vsock.then_some(Self { transport })
    }

    /// Ends every connection of the device (host streams read end-of-file), as
    /// when the VM is gone: nobody on the host waits for a guest that will never
    /// answer.
    pub fn close_connections(&self) {
        let mut t = self
            .transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = t.device_mut::<Vsock>() {
            v.reset_transport();
        }
    }

    /// A connection to guest port `port`. If nobody listens there yet the
    /// stream reads end-of-file before any byte, and the caller connects again.
    pub fn connect(&self, port: u32) -> std::io::Result<std::os::unix::net::UnixStream> {
        let mut t = self
            .transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // `find` only hands out vsock transports, and a transport's device never
        // changes; the error is for completeness.
        let v = t
            .device_mut::<Vsock>()
            .ok_or_else(|| std::io::Error::other("the transport holds no vsock device"))?;
        v.connect(port).map_err(std::io::Error::other)
    }
}

/// The thread that serves the devices' host side (vsock sockets, ...) and, where
/// the backend has them, their queue notifications (ioeventfd) while the VM runs;
/// stopped and joined on drop, which also unregisters the notifications.
#[derive(Debug)]
pub struct DeviceEvents {
    handle: crate::event_loop::EventLoopHandle,
    thread: Option<std::thread::JoinHandle<Vec<hypervisor::IoEvent>>>,
    /// The loop's I/O events once it has stopped, still registered until dropped.
    stopped: Vec<hypervisor::IoEvent>,
    /// Queue notifications that reach the devices without a vCPU exit.
    ioevents: usize,
}

impl DeviceEvents {
    /// Starts serving `attached`, with one I/O event per queue registered with
    /// `vm` at the device's `QueueNotify` (datamatch: the queue index, which is
    /// what the driver writes there, virtio 1.2 §4.2.3.3). A backend without
    /// them (Hypervisor.framework), or a registration it refuses, leaves that
    /// queue's notifications on the MMIO-exit path, which handles them the same
    /// way. If the loop fails later, `on_error` gets its error (the VMM ends the
    /// run with it).
    pub fn start<V: Vm>(
        vm: &V,
        attached: &[Attached],
        on_error: impl FnOnce(Box<dyn std::error::Error + Send + Sync>) + Send + 'static,
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
        let thread = Some(el.spawn(move |e| on_error(Box::new(e)))?);
        Ok(Self {
            handle,
            thread,
            stopped: Vec::new(),
            ioevents,
        })
    }

    /// How many queues are notified through I/O events rather than MMIO exits.
    pub fn ioevents(&self) -> usize {
        self.ioevents
    }

    /// Asks the loop to hold between events; [`DeviceEvents::wait_paused`] waits
    /// until it does. From then on no device touches guest memory from the host
    /// side until [`DeviceEvents::resume`].
    pub fn request_pause(&self) {
        self.handle.request_pause();
    }

    /// Waits until a requested hold is in effect.
    pub fn wait_paused(&self) {
        self.handle.wait_paused();
    }

    /// Hands `f` to the loop's thread; its result arrives on the receiver.
    /// `None` if the loop has ended.
    pub fn send_to_loop<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<std::sync::mpsc::Receiver<R>> {
        self.handle.send_to_loop(f)
    }

    /// Ends the loop and joins its thread. Its queue notifications stay
    /// registered until this is dropped: drop it after the VM, whose destruction
    /// releases them at once, rather than one SRCU grace period each.
    pub fn stop(&mut self) {
        self.handle.stop();
        if let Some(t) = self.thread.take() {
            if let Ok(events) = t.join() {
                self.stopped = events;
            }
        }
    }

    /// Whether [`DeviceEvents::stop`] has ended the loop.
    pub fn stopped(&self) -> bool {
        self.thread.is_none()
    }

    /// Lets a held loop go on.
    pub fn resume(&self) {
        self.handle.resume();
    }
}

/// Registers an I/O event for each queue of `device` at its `QueueNotify`; empty
/// when the backend has none. A refused registration is logged and skipped: that
/// queue keeps the MMIO-exit path.
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
        self.stop();
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
