//! virtio 1.2 devices over the virtio-mmio transport.
//!
//! The pieces:
//! - [`MmioTransport`] (in [`mmio`]): the virtio-mmio version 2 register window
//!   (virtio 1.2 §4.2.2) a VMM puts on its MMIO [`Bus`](crate::Bus). It owns the
//!   device, the split virtqueues, the guest memory handle and the interrupt line,
//!   and runs the device status state machine (§2.1, §3.1).
//! - [`VirtioDevice`]: what a device type implements (block, rng; vsock and net
//!   build on the same trait). A device never sees a transport register, a backend
//!   or an eventfd: each call hands it a [`DeviceContext`] with guest memory, its
//!   queues and a way to signal the driver.
//!
//! # Threading and events
//! Everything runs under the lock of the `Arc<Mutex<MmioTransport>>` the VMM keeps
//! (the same one it inserted on the bus). Queue notifications reach
//! [`VirtioDevice::process_queue`] through [`MmioTransport::notify`], called either
//! by the bus on a write to `QueueNotify` (the plain MMIO-exit path) or by the VMM's
//! event loop when an ioeventfd fires. Host-side events a device cares about (a
//! vsock host socket became readable, a frame arrived from passt) reach
//! [`VirtioDevice::process_event`] through [`MmioTransport::process_event`] with a
//! device-defined `u32` token. The device's own API (registering sockets, say) is
//! reached with [`MmioTransport::device_mut`].
//!
//! # Guest memory
//! Devices get `&GuestMemoryMmap` for the duration of a call; the transport holds
//! an `Arc<GuestMemoryMmap>` given at construction. The guest memory layout of a
//! supermachine VM is fixed for its lifetime (no hotplug, no balloon), so an `Arc`
//! is enough; `GuestMemoryAtomic` would cost an atomic load per access to support
//! swapping regions that we never swap. A restore builds new transports with
//! [`MmioTransport::from_state`] over the new memory.

use std::any::Any;
use std::error::Error as StdError;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemory as _, Permissions};

use crate::interrupt::{Interrupt, InterruptError};

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_util;

pub use mmio::{MmioTransport, MmioTransportState};

/// The guest memory type devices work on.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// virtio 1.2 §6: the device conforms to virtio 1.x (not legacy). Required.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// virtio 1.2 §6: the driver may use indirect descriptor tables (§2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// virtio 1.2 §6: `used_event`/`avail_event` notification suppression (§2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and the device is live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from until reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Device type ids (virtio 1.2 §5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// A host file descriptor a device wants the VMM's event loop to watch
/// (a vsock host socket, a net backend socket). The loop watches it
/// edge-triggered for readable and writable and calls
/// [`VirtioDevice::process_event`] with `token`; the device then reads and writes
/// until the fd would block, so it never needs to change interest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFd {
    /// The fd, owned by the device; it stays open while listed.
    pub fd: std::os::fd::RawFd,
    /// Device-defined; never [`TOKEN_WAKE`].
    pub token: u32,
}

/// The token [`VirtioDevice::process_event`] gets after the device called its
/// [`HostWaker`]: do the deferred work (the fd set may have changed too).
pub const TOKEN_WAKE: u32 = u32::MAX;

/// How a device tells the VMM's event loop that its [`HostFd`] set changed or
/// that it has work to do outside a queue notification (a host connection
/// opened through the device's own API). The loop then re-reads the fd set and
/// calls `process_event(TOKEN_WAKE)`. Implemented by the VMM (an eventfd write).
pub trait HostWaker: Send + Sync {
    /// Wakes the loop. Cheap, never blocks.
    fn wake(&self);
}

/// Interrupt status bit: a queue has used buffers (virtio 1.2 §4.2.2).
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration space changed (virtio 1.2 §4.2.2).
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// The largest queue size a split virtqueue can have (virtio 1.2 §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors of the virtio layer. A device returning one from a queue or event
/// handler marks itself broken (`DEVICE_NEEDS_RESET`) until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A virtqueue operation failed, usually because the driver put something
    /// invalid in the rings (an available index that jumped by more than the queue
    /// size, a head index past the end of the table).
    #[error("virtqueue {index}")]
    Queue {
        /// Queue index.
        index: u16,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device needs a queue the driver did not enable.
    #[error("virtqueue {index} is not ready; the driver must enable it before DRIVER_OK")]
    QueueNotReady {
        /// Queue index.
        index: u16,
    },
    /// Raising the interrupt failed in the VMM's backend.
    #[error("raising the virtio interrupt failed")]
    Interrupt(#[source] InterruptError),
    /// A device-specific failure.
    #[error("{what}")]
    Device {
        /// What failed, for the log.
        what: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },
}

/// How the VMM's interrupt line behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IrqMode {
    /// One [`Interrupt::trigger`] per raise (an irqfd or an edge-triggered IOAPIC
    /// pin, as Linux sets up virtio-mmio from ACPI).
    Edge,
    /// The line follows `InterruptStatus != 0` ([`Interrupt::set_level`]), as a
    /// level-triggered GIC SPI wants.
    Level,
}

/// The virtio-mmio interrupt: the `InterruptStatus` register plus the line.
///
/// Shared (`Arc`) between the transport, which reads and acknowledges it for the
/// guest, and the device context, which raises it.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: Arc<dyn Interrupt>,
    mode: IrqMode,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status())
            .field("mode", &self.mode)
            .finish()
    }
}

impl VirtioInterrupt {
    /// An interrupt with nothing pending on `line`.
    pub fn new(line: Arc<dyn Interrupt>, mode: IrqMode) -> Self {
        Self {
            status: AtomicU32::new(0),
            line,
            mode,
        }
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets `reason` ([`VIRTIO_MMIO_INT_VRING`] or [`VIRTIO_MMIO_INT_CONFIG`]) and
    /// signals the line.
    pub fn raise(&self, reason: u32) -> Result<(), InterruptError> {
        self.status.fetch_or(reason, Ordering::SeqCst);
        match self.mode {
            IrqMode::Edge => self.line.trigger(),
            IrqMode::Level => self.line.set_level(true),
        }
    }

    /// The driver's write to `InterruptACK`: clears `bits`; a level line drops once
    /// nothing is pending.
    pub(crate) fn ack(&self, bits: u32) -> Result<(), InterruptError> {
        let before = self.status.fetch_and(!bits, Ordering::SeqCst);
        if self.mode == IrqMode::Level && before & !bits == 0 {
            self.line.set_level(false)?;
        }
        Ok(())
    }

    /// Clears everything (device reset) and drops a level line.
    pub(crate) fn clear(&self) -> Result<(), InterruptError> {
        self.status.store(0, Ordering::SeqCst);
        if self.mode == IrqMode::Level {
            self.line.set_level(false)?;
        }
        Ok(())
    }

    /// Restores the register from a snapshot and re-signals anything pending.
    pub(crate) fn restore(&self, status: u32) -> Result<(), InterruptError> {
        self.status.store(status, Ordering::SeqCst);
        if status != 0 {
            self.raise(0)?;
        }
        Ok(())
    }
}

/// What a device sees during a call: guest memory, its queues (as the driver set
/// them up) and the interrupt.
pub struct DeviceContext<'a> {
    mem: &'a GuestMemoryMmap,
    queues: &'a mut [Queue],
    interrupt: &'a VirtioInterrupt,
    features: u64,
    config_changed: bool,
}

impl std::fmt::Debug for DeviceContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceContext")
            .field("queues", &self.queues.len())
            .field("features", &format_args!("{:#x}", self.features))
            .finish()
    }
}

impl<'a> DeviceContext<'a> {
    pub(crate) fn new(
        mem: &'a GuestMemoryMmap,
        queues: &'a mut [Queue],
        interrupt: &'a VirtioInterrupt,
        features: u64,
    ) -> Self {
        Self {
            mem,
            queues,
            interrupt,
            features,
            config_changed: false,
        }
    }

    /// Guest memory.
    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// The features the driver accepted (a subset of the device's offer).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// How many queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Whether the driver enabled queue `index`.
    pub fn queue_ready(&self, index: u16) -> bool {
        self.queues
            .get(usize::from(index))
            .is_some_and(|q| q.ready())
    }

    /// Queue `index` and guest memory together, for devices that pop chains and
    /// complete them later (a vsock RX queue waits for host data). `None` if the
    /// queue does not exist or is not ready.
    pub fn queue_mut(&mut self, index: u16) -> Option<(&'a GuestMemoryMmap, &mut Queue)> {
        let mem = self.mem;
        self.queues
            .get_mut(usize::from(index))
            .filter(|q| q.ready())
            .map(|q| (mem, q))
    }

    /// Processes every available chain of queue `index` with `handle`, which
    /// returns the number of bytes it wrote into the chain's device-writable
    /// buffers (the used length, virtio 1.2 §2.7.8). Each chain goes back on the
    /// used ring, then the driver is notified if it asked to be (honouring
    /// `VIRTIO_RING_F_EVENT_IDX`, §2.7.10). Returns how many chains were handled.
    ///
    /// With EVENT_IDX the driver only notifies when the available index passes
    /// `avail_event`, so the loop re-arms it after draining and drains again if
    /// chains slipped in meanwhile (§2.7.10, "Driver notifications").
    pub fn drain_queue<F>(&mut self, index: u16, mut handle: F) -> Result<usize, VirtioError>
    where
        F: FnMut(DescriptorChain<&'a GuestMemoryMmap>) -> u32,
    {
        let mem = self.mem;
        let queue_err = |source| VirtioError::Queue { index, source };
        let Some(queue) = self
            .queues
            .get_mut(usize::from(index))
            .filter(|q| q.ready())
        else {
            return Ok(0);
        };
        let mut handled = 0;
        loop {
            queue.disable_notification(mem).map_err(queue_err)?;
            loop {
                // A statement of its own, so the iterator's borrow of the queue
                // ends before add_used.
                let next = queue.iter(mem).map_err(queue_err)?.next();
                let Some(chain) = next else { break };
                let head = chain.head_index();
                let len = handle(chain);
                queue.add_used(mem, head, len).map_err(queue_err)?;
                handled += 1;
            }
            if !queue.enable_notification(mem).map_err(queue_err)? {
                break;
            }
        }
        if handled > 0 {
            self.signal_used(index)?;
        }
        Ok(handled)
    }

    /// After adding used buffers to queue `index`: raises the used-buffer
    /// interrupt unless the driver suppressed it (§2.7.10).
    pub fn signal_used(&mut self, index: u16) -> Result<(), VirtioError> {
        let mem = self.mem;
        let Some(queue) = self.queues.get_mut(usize::from(index)) else {
            return Ok(());
        };
        // An unreadable used_event is the driver's bug; notifying is the safe side.
        let needed = queue.needs_notification(mem).unwrap_or(true);
        if needed {
            self.interrupt
                .raise(VIRTIO_MMIO_INT_VRING)
                .map_err(VirtioError::Interrupt)?;
        }
        Ok(())
    }

    /// The device changed its configuration space: the transport bumps
    /// `ConfigGeneration` and raises the configuration-change interrupt after the
    /// call returns (virtio 1.2 §2.5.1, §4.2.2).
    pub fn signal_config_change(&mut self) {
        self.config_changed = true;
    }

    pub(crate) fn config_changed(&self) -> bool {
        self.config_changed
    }
}

/// A virtio device type behind a transport.
///
/// Call order, driven by the transport: `read_config`/`write_config` at any time;
/// `activate` once when the driver sets DRIVER_OK; then `process_queue` and
/// `process_event` until `reset` (driver wrote 0 to `Status`), after which the
/// device is back to its pre-activation state and may be activated again.
pub trait VirtioDevice: Send {
    /// The virtio device id (virtio 1.2 §5, see [`device_type`]).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue (`QueueNumMax`); the length is the number of
    /// queues. Each must be a power of two no larger than [`MAX_QUEUE_SIZE`].
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers. Must include [`VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;

    /// The driver reads `data.len()` bytes of device configuration space at
    /// `offset` (relative to 0x100 in the MMIO window). Bytes beyond the device's
    /// configuration read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// The driver writes configuration space. Most fields are read-only; the
    /// default ignores the write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// The driver set DRIVER_OK: queues are set up, `ctx.features()` holds the
    /// negotiated features. An error marks the device DEVICE_NEEDS_RESET.
    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError>;

    /// The driver notified queue `index` (only called while activated, for a ready
    /// queue). An error marks the device DEVICE_NEEDS_RESET.
    fn process_queue(&mut self, ctx: &mut DeviceContext<'_>, index: u16)
        -> Result<(), VirtioError>;

    /// A host-side event the VMM's event loop routes to this device (only called
    /// while activated). `token` is device-defined (e.g. vsock: "host socket N is
    /// readable"; net: "the backend has frames"). The default does nothing.
    fn process_event(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        token: u32,
    ) -> Result<(), VirtioError> {
        let _ = (ctx, token);
        Ok(())
    }

    /// The host fds the event loop should watch for this device (see
    /// [`HostFd`]). The default has none.
    fn host_fds(&self, out: &mut Vec<HostFd>) {
        let _ = out;
    }

    /// The earliest moment the device has timed work (e.g. vsock: a connection
    /// request the guest has not answered); the event loop then calls
    /// `process_event` with [`TOKEN_WAKE`] at or after it. Asked again after
    /// every round of events; a device that sets a deadline outside the loop's
    /// own calls (on a vCPU thread) wakes the loop. The default has none.
    fn deadline(&self) -> Option<std::time::Instant> {
        None
    }

    /// Gives the device the event loop's waker (see [`HostWaker`]). The default
    /// drops it.
    fn set_host_waker(&mut self, waker: Arc<dyn HostWaker>) {
        let _ = waker;
    }

    /// The driver reset the device: drop any in-flight work and negotiated state.
    fn reset(&mut self);

    /// For [`MmioTransport::device`].
    fn as_any(&self) -> &dyn Any;

    /// For [`MmioTransport::device_mut`].
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Copies `config` bytes at `offset` into `data`; what lies outside reads as 0.
/// A helper for [`VirtioDevice::read_config`].
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// One guest buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// The buffers of a descriptor chain, split by direction and checked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChainBuffers {
    /// Device-readable buffers, in chain order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in chain order.
    pub writable: Vec<Segment>,
}

/// Why a descriptor chain cannot be used at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain does not end: a `next` loop, a `next` index past the table, an
    /// unreadable descriptor, or more than 4 GiB in total (virtio 1.2 §2.7.5.2).
    #[error("descriptor chain is malformed (loop, bad next index or unreadable descriptor)")]
    Malformed,
    /// The chain holds no descriptor (head index past the table).
    #[error("descriptor chain is empty")]
    Empty,
    /// A device-readable buffer follows a device-writable one (virtio 1.2 §2.7.4.2).
    #[error("a device-readable buffer follows a device-writable one")]
    ReadableAfterWritable,
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
}

/// Walks `chain` and checks what every device needs before touching a buffer:
/// the chain terminates, readable buffers come first, and every buffer lies in
/// guest memory. Zero-length buffers are skipped.
///
/// virtio-queue's iterator stops silently on a loop (after queue-size steps), an
/// out-of-range `next` or an unreadable descriptor; the last descriptor it yields
/// then still has `NEXT` set, which is how a broken chain is told apart from a
/// complete one.
pub fn walk_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<ChainBuffers, ChainError> {
    let mut buffers = ChainBuffers::default();
    let mut last_has_next = None;
    for desc in chain {
        last_has_next = Some(desc.has_next());
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            if seg.len > 0 {
                buffers.writable.push(seg);
            }
        } else if !buffers.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        } else if seg.len > 0 {
            buffers.readable.push(seg);
        }
    }
    match last_has_next {
        None => return Err(ChainError::Empty),
        Some(true) => return Err(ChainError::Malformed),
        Some(false) => {}
    }
    for seg in buffers.readable.iter().chain(&buffers.writable) {
        let in_memory = usize::try_from(seg.len).is_ok_and(|len| {
            let perm = Permissions::ReadWrite;
            seg.addr.checked_add(u64::from(seg.len)).is_some()
                && mem.check_range(seg.addr, len, perm)
        });
        if !in_memory {
            return Err(ChainError::OutOfMemory {
                addr: seg.addr.raw_value(),
                len: seg.len,
            });
        }
    }
    Ok(buffers)
}

/// Total length of `segs`.
pub fn segments_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segs` after `n` bytes. If `segs` holds fewer than `n`, the second half
/// is empty and the first holds everything.
pub fn split_segments(segs: &[Segment], n: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut front = Vec::new();
    let mut back = Vec::new();
    let mut left = n;
    for seg in segs {
        let len = u64::from(seg.len);
        if left >= len {
            front.push(*seg);
            left -= len;
        } else if left == 0 {
            back.push(*seg);
        } else {
            // left < len fits in u32 because len does.
            let head = u32::try_from(left).unwrap_or(seg.len);
            front.push(Segment {
                addr: seg.addr,
                len: head,
            });
            back.push(Segment {
                addr: seg.addr.unchecked_add(u64::from(head)),
                len: seg.len - head,
            });
            left = 0;
        }
    }
    (front, back)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn split_segments_inside_a_buffer_splits_it() {
        let segs = [seg(0x1000, 10), seg(0x2000, 10)];
        let (front, back) = split_segments(&segs, 14);
        assert_eq!(front, vec![seg(0x1000, 10), seg(0x2000, 4)]);
        assert_eq!(back, vec![seg(0x2004, 6)]);
    }

    #[test]
    fn split_segments_past_end_keeps_everything_in_front() {
        let segs = [seg(0x1000, 10)];
        let (front, back) = split_segments(&segs, 100);
        assert_eq!(front, segs.to_vec());
        assert!(back.is_empty());
    }

    #[test]
    fn read_config_bytes_past_end_reads_zero() {
        let mut data = [0xff; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut data);
        assert_eq!(data, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
