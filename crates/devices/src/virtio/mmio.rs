//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2).
//!
//! One [`MmioTransport`] per device, inserted on the MMIO bus at a
//! [`MMIO_WINDOW_SIZE`] window and described to the guest (ACPI `LNRO0005` or a
//! device-tree `virtio,mmio` node) with that window and an interrupt.
//!
//! Registers below 0x100 are 32-bit and must be accessed as aligned 32-bit words
//! (§4.2.2.2); any other access reads 0 and writes nothing. Configuration space
//! starts at 0x100 and takes any width.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{
    status, DeviceContext, GuestMemoryMmap, IrqMode, VirtioDevice, VirtioError, VirtioInterrupt,
    MAX_QUEUE_SIZE, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::{BusDevice, BusEvent};
use crate::interrupt::{Interrupt, InterruptError};

/// Size of the MMIO window of one device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The non-legacy virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id ("SM"); drivers do not look at it.
pub const VENDOR_ID: u32 = 0x0000_4d53;

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
pub mod reg {
    /// R: magic value.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// R: interface version.
    pub const VERSION: u64 = 0x004;
    /// R: device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// R: vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// R: 32 feature bits of the bank `DEVICE_FEATURES_SEL` selects.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// W: device feature bank.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// W: 32 feature bits the driver accepts, bank `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// W: driver feature bank.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// W: queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// R: maximum size of the selected queue, 0 if it does not exist.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// W: size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// RW: the selected queue is set up.
    pub const QUEUE_READY: u64 = 0x044;
    /// W: queue index with new buffers.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// R: pending interrupt reasons.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// W: reasons the driver handled.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// RW: device status.
    pub const STATUS: u64 = 0x070;
    /// W: descriptor table address, low half.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// W: descriptor table address, high half.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// W: available ring address, low half.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// W: available ring address, high half.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// W: used ring address, low half.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// W: used ring address, high half.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// W: shared memory region select.
    pub const SHM_SEL: u64 = 0x0ac;
    /// R: shared memory region length, low half.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// R: shared memory region length, high half.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// R: shared memory region base, low half.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// R: shared memory region base, high half.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// R: configuration generation.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// The offset of `QueueNotify` in the window, for a VMM that registers an
/// ioeventfd (with the queue index as datamatch) instead of taking the MMIO exit.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// Building or restoring a transport failed.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device does not offer VIRTIO_F_VERSION_1; virtio-mmio v2 requires it.
    #[error("virtio device type {device_type} does not offer VIRTIO_F_VERSION_1")]
    NoVersion1 {
        /// The device's type id.
        device_type: u32,
    },
    /// A device queue has an invalid maximum size.
    #[error("virtio device type {device_type} queue {index} has invalid maximum size {size} (must be a power of two up to 32768)")]
    InvalidQueueMax {
        /// The device's type id.
        device_type: u32,
        /// Queue index.
        index: usize,
        /// The size it declared.
        size: u16,
    },
    /// A saved state belongs to another device type.
    #[error("saved transport state is for device type {saved}, not {actual}")]
    StateDeviceMismatch {
        /// Type in the state.
        saved: u32,
        /// Type of the device given.
        actual: u32,
    },
    /// A saved state has another number of queues than the device.
    #[error("saved transport state has {saved} queues, the device has {actual}")]
    StateQueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        actual: usize,
    },
    /// A saved queue is invalid (size, alignment or rings outside guest memory).
    #[error("saved virtqueue {index} is invalid: {reason}")]
    StateQueueInvalid {
        /// Queue index.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Re-activating the restored device failed.
    #[error("re-activating the restored virtio device failed")]
    StateActivate(#[source] VirtioError),
    /// Re-raising a pending interrupt failed.
    #[error("re-raising the restored virtio interrupt failed")]
    StateInterrupt(#[source] InterruptError),
}

/// The driver's view of one queue as written through the registers, applied to
/// the live [`Queue`] when the driver sets `QueueReady`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueRegs {
    // u32 as written: QueueNum is a 32-bit register and anything above u16::MAX is
    // refused at QueueReady rather than truncated into something valid.
    size: u32,
    desc: u64,
    avail: u64,
    used: u64,
}

/// The saved state of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSavedState {
    /// Size the driver chose (as written).
    pub size: u32,
    /// Whether the driver enabled it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available ring entry the device will read.
    pub next_avail: u16,
    /// Next used ring entry the device will write.
    pub next_used: u16,
}

/// The saved registers and queues of an [`MmioTransport`]; the device's own state
/// is saved separately by the device type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Device type id, checked on restore.
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// The driver wrote a feature bit in a bank above 1 (refused at FEATURES_OK).
    pub driver_features_out_of_range: bool,
    /// Device feature bank select.
    pub device_features_sel: u32,
    /// Driver feature bank select.
    pub driver_features_sel: u32,
    /// Queue select.
    pub queue_sel: u32,
    /// Interrupt status register.
    pub interrupt_status: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// The interrupt line mode.
    pub irq_mode: IrqMode,
    /// Each queue.
    pub queues: Vec<QueueSavedState>,
}

/// A virtio device behind a virtio-mmio version 2 register window.
pub struct MmioTransport {
    // Field order is drop order: the interrupt line (which holds the VM, for a
    // KVM irq line) goes before guest memory, so a transport that outlives its
    // VMM (a vsock handle kept by a caller) never holds the last reference to
    // the VM after the memory the VM maps is unmapped.
    interrupt: Arc<VirtioInterrupt>,
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    queues: Vec<Queue>,
    queue_regs: Vec<QueueRegs>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    driver_features_out_of_range: bool,
    queue_sel: u32,
    config_generation: u32,
    // Warn once per kind of driver misbehaviour, not once per access.
    warned_bad_access: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field(
                "driver_features",
                &format_args!("{:#x}", self.driver_features),
            )
            .field("interrupt", &self.interrupt)
            .finish()
    }
}

impl MmioTransport {
    /// A transport in its reset state for `device`, over guest memory `mem`,
    /// raising `interrupt` (the device's GSI/SPI) in `mode`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn Interrupt>,
        mode: IrqMode,
    ) -> Result<Self, MmioError> {
        let device_type = device.device_type();
        if device.device_features() & VIRTIO_F_VERSION_1 == 0 {
            return Err(MmioError::NoVersion1 { device_type });
        }
        let mut queues = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            let queue = (size <= MAX_QUEUE_SIZE)
                .then(|| Queue::new(size).ok())
                .flatten()
                .ok_or(MmioError::InvalidQueueMax {
                    device_type,
                    index,
                    size,
                })?;
            queues.push(queue);
        }
        let queue_regs = vec![QueueRegs::default(); queues.len()];
        Ok(Self {
            interrupt: Arc::new(VirtioInterrupt::new(interrupt, mode)),
            device,
            mem,
            queues,
            queue_regs,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_out_of_range: false,
            queue_sel: 0,
            config_generation: 0,
            warned_bad_access: false,
        })
    }

    /// The device, to reach its own API.
    pub fn device<T: 'static>(&self) -> Option<&T> {
        self.device.as_any().downcast_ref()
    }

    /// The device, to reach its own API (vsock: register host sockets).
    pub fn device_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.device.as_any_mut().downcast_mut()
    }

    /// Number of queues, for registering one ioeventfd per queue.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt.status()
    }

    /// Whether the driver finished setup and the device has not failed.
    pub fn is_active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Queue `index` has new buffers: the write to `QueueNotify`, or an ioeventfd
    /// the VMM registered at [`QUEUE_NOTIFY_OFFSET`]. Ignored before DRIVER_OK,
    /// after a failure, and for a queue that does not exist or is not ready.
    pub fn notify(&mut self, index: u32) {
        let Ok(index) = u16::try_from(index) else {
            return;
        };
        let ready = self
            .queues
            .get(usize::from(index))
            .is_some_and(|q| q.ready());
        if !self.is_active() || !ready {
            tracing::debug!(index, status = self.status, "virtio notify ignored");
            return;
        }
        self.with_device(|device, ctx| device.process_queue(ctx, index));
    }

    /// A host-side event for the device (see [`VirtioDevice::process_event`]).
    /// Ignored unless the device is active.
    pub fn process_event(&mut self, token: u32) {
        if self.is_active() {
            self.with_device(|device, ctx| device.process_event(ctx, token));
        }
    }

    /// The device's host fds for the VMM's event loop (see [`VirtioDevice::host_fds`]).
    pub fn host_fds(&self, out: &mut Vec<super::HostFd>) {
        self.device.host_fds(out);
    }

    /// When the device next has timed work (see [`VirtioDevice::deadline`]);
    /// none unless the device is active.
    pub fn deadline(&self) -> Option<std::time::Instant> {
        if self.is_active() {
            self.device.deadline()
        } else {
            None
        }
    }

    /// Hands the device the event loop's waker (see [`super::HostWaker`]).
    pub fn set_host_waker(&mut self, waker: Arc<dyn super::HostWaker>) {
        self.device.set_host_waker(waker);
    }

    /// Runs `f` on the device with a context; a failure marks the device broken.
    fn with_device<F>(&mut self, f: F)
    where
        F: FnOnce(&mut dyn VirtioDevice, &mut DeviceContext<'_>) -> Result<(), VirtioError>,
    {
        let features = self.driver_features;
        let mut ctx = DeviceContext::new(&self.mem, &mut self.queues, &self.interrupt, features);
        let result = f(self.device.as_mut(), &mut ctx);
        let config_changed = ctx.config_changed();
        if config_changed {
            self.config_generation = self.config_generation.wrapping_add(1);
            self.raise_config();
        }
        if let Err(e) = result {
            tracing::warn!(
                device_type = self.device.device_type(),
                error = %e,
                "virtio device failed; it needs a reset by the guest driver"
            );
            self.set_needs_reset();
        }
    }

    /// virtio 1.2 §2.1.2: the device sets DEVICE_NEEDS_RESET and, once the driver
    /// is live, tells it with a configuration-change interrupt.
    fn set_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.raise_config();
        }
    }

    fn raise_config(&self) {
        if let Err(e) = self.interrupt.raise(VIRTIO_MMIO_INT_CONFIG) {
            tracing::warn!(error = %e, "virtio configuration interrupt failed");
        }
    }

    /// Writing 0 to `Status` (virtio 1.2 §4.2.3.1, §2.4): everything back to the
    /// power-on state, the device included.
    fn reset(&mut self) {
        self.device.reset();
        for (queue, regs) in self.queues.iter_mut().zip(&mut self.queue_regs) {
            queue.reset();
            *regs = QueueRegs::default();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_out_of_range = false;
        self.queue_sel = 0;
        if let Err(e) = self.interrupt.clear() {
            tracing::warn!(error = %e, "lowering the virtio interrupt on reset failed");
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        !self.driver_features_out_of_range
            && self.driver_features & !offered == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    /// The driver writes `Status`. It may only add bits, in the order of virtio
    /// 1.2 §3.1.1; a write that clears or skips a step is ignored. FEATURES_OK is
    /// withheld if the accepted features are not acceptable (§2.2.2), and DRIVER_OK
    /// activates the device.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET belongs to the device; the driver cannot set or clear it.
        let requested = value & !status::DEVICE_NEEDS_RESET;
        let current = self.status & !status::DEVICE_NEEDS_RESET;
        if requested & current != current {
            tracing::debug!(value, current, "virtio driver cleared status bits; ignored");
            return;
        }
        let added = requested & !current;
        let has = |bit| requested & bit != 0;
        let order_ok = (added & status::DRIVER == 0 || has(status::ACKNOWLEDGE))
            && (added & status::FEATURES_OK == 0 || has(status::DRIVER))
            && (added & status::DRIVER_OK == 0 || current & status::FEATURES_OK != 0);
        if !order_ok {
            tracing::debug!(value, current, "virtio status step out of order; ignored");
            return;
        }
        let known = status::ACKNOWLEDGE
            | status::DRIVER
            | status::FEATURES_OK
            | status::DRIVER_OK
            | status::FAILED;
        let mut accepted = added & known;
        if accepted & status::FEATURES_OK != 0 && !self.features_acceptable() {
            tracing::debug!(
                driver_features = self.driver_features,
                "virtio features refused; FEATURES_OK not set"
            );
            accepted &= !status::FEATURES_OK;
        }
        self.status |= accepted;
        if accepted & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
        }
        self.with_device(|device, ctx| device.activate(ctx));
    }

    /// Queue registers may change between FEATURES_OK and DRIVER_OK, while the
    /// selected queue is not enabled (virtio 1.2 §4.2.3.2).
    fn selected_queue_writable(&self) -> Option<usize> {
        let setup = self.status & status::FEATURES_OK != 0
            && self.status & (status::DRIVER_OK | status::FAILED) == 0;
        let index = usize::try_from(self.queue_sel).ok()?;
        let ready = self.queues.get(index)?.ready();
        (setup && !ready).then_some(index)
    }

    /// `QueueReady` = 1: checks the queue as the driver described it (size a power
    /// of two no larger than `QueueNumMax`, ring alignment per §2.7, every ring
    /// inside guest memory) and enables it. A queue that fails stays disabled and
    /// the device is marked DEVICE_NEEDS_RESET, so the driver sees why.
    fn enable_queue(&mut self, index: usize) {
        let (Some(queue), Some(regs)) = (self.queues.get_mut(index), self.queue_regs.get(index))
        else {
            return;
        };
        let applied = u16::try_from(regs.size)
            .ok()
            .filter(|&size| size != 0)
            .is_some_and(|size| queue.try_set_size(size).is_ok())
            && queue
                .try_set_desc_table_address(GuestAddress(regs.desc))
                .is_ok()
            && queue
                .try_set_avail_ring_address(GuestAddress(regs.avail))
                .is_ok()
            && queue
                .try_set_used_ring_address(GuestAddress(regs.used))
                .is_ok();
        if applied {
            queue.set_ready(true);
            if queue.is_valid(self.mem.as_ref()) {
                return;
            }
            queue.set_ready(false);
        }
        tracing::warn!(
            index,
            size = regs.size,
            desc = regs.desc,
            avail = regs.avail,
            used = regs.used,
            "virtio driver enabled an invalid queue; device needs reset"
        );
        self.set_needs_reset();
    }

    fn read_register(&self, offset: u64) -> u32 {
        let selected_queue = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i));
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = self.device.device_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => selected_queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => selected_queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: their length reads as -1 (§4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                // Features are settled between DRIVER and FEATURES_OK (§3.1.1).
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    return;
                }
                let value = u64::from(value);
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32);
                    }
                    _ => self.driver_features_out_of_range |= value != 0,
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.with_queue_regs(|r| r.size = value),
            reg::QUEUE_DESC_LOW => self.with_queue_regs(|r| set_low(&mut r.desc, value)),
            reg::QUEUE_DESC_HIGH => self.with_queue_regs(|r| set_high(&mut r.desc, value)),
            reg::QUEUE_DRIVER_LOW => self.with_queue_regs(|r| set_low(&mut r.avail, value)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue_regs(|r| set_high(&mut r.avail, value)),
            reg::QUEUE_DEVICE_LOW => self.with_queue_regs(|r| set_low(&mut r.used, value)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue_regs(|r| set_high(&mut r.used, value)),
            reg::QUEUE_READY => {
                let Ok(index) = usize::try_from(self.queue_sel) else {
                    return;
                };
                if value == 0 {
                    // Linux writes 0 when it tears a queue down after a reset.
                    if let Some(q) = self.queues.get_mut(index) {
                        q.set_ready(false);
                    }
                } else if self.selected_queue_writable() == Some(index) {
                    self.enable_queue(index);
                }
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => {
                if let Err(e) = self.interrupt.ack(value) {
                    tracing::warn!(error = %e, "lowering the virtio interrupt failed");
                }
            }
            reg::STATUS => self.write_status(value),
            // SHMSel selects among no regions; read-only registers ignore writes.
            _ => {}
        }
    }

    fn with_queue_regs(&mut self, f: impl FnOnce(&mut QueueRegs)) {
        if let Some(index) = self.selected_queue_writable() {
            if let Some(regs) = self.queue_regs.get_mut(index) {
                f(regs);
            }
        }
    }

    fn note_bad_access(&mut self, offset: u64, len: usize) {
        if !self.warned_bad_access {
            self.warned_bad_access = true;
            tracing::warn!(
                offset,
                len,
                "virtio-mmio register access is not an aligned 32-bit word; ignored"
            );
        }
    }

    /// The registers and queues, for a snapshot. Save the device's own state with
    /// its type's `state()` alongside.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            driver_features_out_of_range: self.driver_features_out_of_range,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            irq_mode: self.interrupt.mode,
            queues: self
                .queues
                .iter()
                .zip(&self.queue_regs)
                .map(|(q, r)| QueueSavedState {
                    size: r.size,
                    ready: q.ready(),
                    desc_table: r.desc,
                    avail_ring: r.avail,
                    used_ring: r.used,
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
        }
    }

    /// Rebuilds a transport from a snapshot. `device` must already hold its own
    /// restored state; if the driver had set DRIVER_OK, the device is activated
    /// again over the restored queues, and a pending interrupt is re-raised.
    pub fn from_state(
        state: &MmioTransportState,
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<Self, MmioError> {
        let mut t = Self::new(device, mem, interrupt, state.irq_mode)?;
        t.restore(state)?;
        Ok(t)
    }

    /// Whether `state` is one of this transport's device (its kind and queue
    /// count), before anything is changed.
    pub fn check_state(&self, state: &MmioTransportState) -> Result<(), MmioError> {
        let actual = self.device.device_type();
        if state.device_type != actual {
            return Err(MmioError::StateDeviceMismatch {
                saved: state.device_type,
                actual,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(MmioError::StateQueueCount {
                saved: state.queues.len(),
                actual: self.queues.len(),
            });
        }
        Ok(())
    }

    /// Puts this transport, and the device behind it, in the saved `state`: the
    /// device is reset first (as a driver's write of 0 to `Status` does), then
    /// the registers and queues are the saved ones and an active device is
    /// activated again. What [`MmioTransport::from_state`] does to a new
    /// transport, for one that lives on (a VM restored in place).
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), MmioError> {
        self.check_state(state)?;
        self.reset();
        let t = self;
        let event_idx = state.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for (index, (saved, (queue, regs))) in state
            .queues
            .iter()
            .zip(t.queues.iter_mut().zip(&mut t.queue_regs))
            .enumerate()
        {
            *regs = QueueRegs {
                size: saved.size,
                desc: saved.desc_table,
                avail: saved.avail_ring,
                used: saved.used_ring,
            };
            if !saved.ready {
                continue;
            }
            let invalid = |reason| MmioError::StateQueueInvalid { index, reason };
            let size = u16::try_from(saved.size).map_err(|_| invalid("size"))?;
            queue.try_set_size(size).map_err(|_| invalid("size"))?;
            queue
                .try_set_desc_table_address(GuestAddress(saved.desc_table))
                .map_err(|_| invalid("descriptor table alignment"))?;
            queue
                .try_set_avail_ring_address(GuestAddress(saved.avail_ring))
                .map_err(|_| invalid("available ring alignment"))?;
            queue
                .try_set_used_ring_address(GuestAddress(saved.used_ring))
                .map_err(|_| invalid("used ring alignment"))?;
            queue.set_next_avail(saved.next_avail);
            queue.set_next_used(saved.next_used);
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(t.mem.as_ref()) {
                return Err(invalid("rings outside guest memory"));
            }
        }
        t.status = state.status;
        t.driver_features = state.driver_features;
        t.driver_features_out_of_range = state.driver_features_out_of_range;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        if t.is_active() {
            let features = t.driver_features;
            let mut ctx = DeviceContext::new(&t.mem, &mut t.queues, &t.interrupt, features);
            t.device
                .activate(&mut ctx)
                .map_err(MmioError::StateActivate)?;
        }
        t.interrupt
            .restore(state.interrupt_status)
            .map_err(MmioError::StateInterrupt)?;
        Ok(())
    }
}

fn set_low(addr: &mut u64, value: u32) {
    *addr = (*addr & !0xffff_ffff) | u64::from(value);
}

fn set_high(addr: &mut u64, value: u32) {
    *addr = (*addr & 0xffff_ffff) | (u64::from(value) << 32);
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.note_bad_access(offset, data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusEvent> {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return None;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(word)),
            _ => self.note_bad_access(offset, data.len()),
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::interrupt::test_util::CountingInterrupt;
    use crate::virtio::test_util::{
        guest_memory, read_reg, write_reg, Driver, ScratchDevice, QUEUE_BASE,
    };
    use crate::virtio::VIRTIO_MMIO_INT_VRING;

    fn transport() -> (MmioTransport, Arc<CountingInterrupt>, Driver) {
        let irq = Arc::new(CountingInterrupt::default());
        let mem = guest_memory();
        let t = MmioTransport::new(
            Box::new(ScratchDevice::default()),
            mem.clone(),
            irq.clone(),
            IrqMode::Edge,
        )
        .unwrap();
        (t, irq, Driver::new(mem))
    }

    /// An interrupt line that, when dropped, says whether guest memory was
    /// still mapped.
    #[derive(Debug)]
    struct LineHoldingTheVm {
        mem: std::sync::Weak<GuestMemoryMmap>,
        mem_alive_at_drop: Arc<std::sync::Mutex<Option<bool>>>,
    }
    impl Interrupt for LineHoldingTheVm {
        fn trigger(&self) -> Result<(), crate::InterruptError> {
            Ok(())
        }
        fn set_level(&self, _: bool) -> Result<(), crate::InterruptError> {
            Ok(())
        }
    }
    impl Drop for LineHoldingTheVm {
        fn drop(&mut self) {
            *self.mem_alive_at_drop.lock().unwrap() = Some(self.mem.upgrade().is_some());
        }
    }

    #[test]
    fn a_transport_drops_its_interrupt_line_before_guest_memory() {
        let mem = guest_memory();
        let seen = Arc::new(std::sync::Mutex::new(None));
        let line = Arc::new(LineHoldingTheVm {
            mem: Arc::downgrade(&mem),
            mem_alive_at_drop: seen.clone(),
        });
        let t = MmioTransport::new(Box::new(ScratchDevice::default()), mem, line, IrqMode::Edge)
            .unwrap();
        // The transport holds the last reference to both, as one a vsock
        // handle keeps after its VMM is gone.
        drop(t);
        assert_eq!(*seen.lock().unwrap(), Some(true));
    }

    fn scratch(t: &MmioTransport) -> &ScratchDevice {
        t.device::<ScratchDevice>().unwrap()
    }

    #[test]
    fn mmio_identity_registers_read_spec_values() {
        let (mut t, _, _) = transport();
        assert_eq!(read_reg(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read_reg(&mut t, reg::VERSION), 2);
        assert_eq!(read_reg(&mut t, reg::DEVICE_ID), 0x55);
        assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 16);
        write_reg(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 7");
        assert_eq!(read_reg(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn mmio_device_features_read_by_bank() {
        let (mut t, _, _) = transport();
        write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read_reg(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1");
        write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            read_reg(&mut t, reg::DEVICE_FEATURES),
            (1 << 28) | (1 << 29) | 1,
            "indirect, event idx, scratch bit 0"
        );
        write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(read_reg(&mut t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn mmio_full_setup_activates_and_notify_reaches_device() {
        let (mut t, irq, driver) = transport();
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        assert_eq!(
            read_reg(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
        );
        assert_eq!(scratch(&t).activations, 1);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(scratch(&t).notifications, vec![0]);
        // The scratch device signals used on each notify.
        assert_eq!(irq.edges(), 1);
        assert_eq!(
            read_reg(&mut t, reg::INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        write_reg(&mut t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn mmio_ioeventfd_notify_same_as_register_write() {
        let (mut t, _, driver) = transport();
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        t.notify(0);
        assert_eq!(scratch(&t).notifications, vec![0]);
    }

    #[test]
    fn mmio_notify_before_driver_ok_ignored() {
        let (mut t, irq, driver) = transport();
        driver.negotiate(&mut t, VIRTIO_F_VERSION_1).unwrap();
        driver.setup_queue(&mut t, 0, 16);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        t.notify(0);
        assert!(scratch(&t).notifications.is_empty());
        assert_eq!(irq.edges(), 0);
    }

    #[test]
    fn mmio_notify_unknown_or_disabled_queue_ignored() {
        let (mut t, _, driver) = transport();
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        write_reg(&mut t, reg::QUEUE_NOTIFY, 1); // queue 1 exists but is not ready
        write_reg(&mut t, reg::QUEUE_NOTIFY, 9);
        write_reg(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
        assert!(scratch(&t).notifications.is_empty());
    }

    #[test]
    fn mmio_feature_not_offered_refuses_features_ok() {
        let (mut t, _, driver) = transport();
        // Bit 5 is not offered by the scratch device.
        let err = driver
            .negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 5))
            .unwrap_err();
        assert_eq!(err & status::FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK is out of order: ignored, not activated.
        write_reg(&mut t, reg::STATUS, err | status::DRIVER_OK);
        assert_eq!(read_reg(&mut t, reg::STATUS) & status::DRIVER_OK, 0);
        assert_eq!(scratch(&t).activations, 0);
    }

    #[test]
    fn mmio_missing_version_1_refuses_features_ok() {
        let (mut t, _, driver) = transport();
        assert!(driver.negotiate(&mut t, 1).is_err());
    }

    #[test]
    fn mmio_feature_bank_above_one_refuses_features_ok() {
        let (mut t, _, _) = transport();
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write_reg(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write_reg(&mut t, reg::DRIVER_FEATURES, 1);
        write_reg(&mut t, reg::DRIVER_FEATURES_SEL, 5);
        write_reg(&mut t, reg::DRIVER_FEATURES, 1);
        write_reg(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(read_reg(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn mmio_status_out_of_order_or_clearing_ignored() {
        let (mut t, _, _) = transport();
        // DRIVER without ACKNOWLEDGE.
        write_reg(&mut t, reg::STATUS, status::DRIVER);
        assert_eq!(read_reg(&mut t, reg::STATUS), 0);
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // Clearing DRIVER without a reset.
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            read_reg(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // The driver cannot set DEVICE_NEEDS_RESET.
        write_reg(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
        );
        assert_eq!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
        // FAILED may be set at any point.
        write_reg(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
        );
        assert_ne!(read_reg(&mut t, reg::STATUS) & status::FAILED, 0);
    }

    #[test]
    fn mmio_queue_size_not_power_of_two_refused_with_needs_reset() {
        let (mut t, _, driver) = transport();
        driver.negotiate(&mut t, VIRTIO_F_VERSION_1).unwrap();
        driver.setup_queue(&mut t, 0, 12);
        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        assert_ne!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
        // DRIVER_OK now does not activate a broken device.
        let s = read_reg(&mut t, reg::STATUS);
        write_reg(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert_eq!(scratch(&t).activations, 0);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(scratch(&t).notifications.is_empty());
    }

    #[test]
    fn mmio_queue_size_above_max_or_zero_refused() {
        for size in [0, 32, 0x1_0010] {
            let (mut t, _, driver) = transport();
            driver.negotiate(&mut t, VIRTIO_F_VERSION_1).unwrap();
            driver.setup_queue(&mut t, 0, size);
            assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0, "size {size}");
            assert_ne!(
                read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
                0
            );
        }
    }

    #[test]
    fn mmio_queue_rings_outside_memory_refused() {
        let (mut t, _, driver) = transport();
        driver.negotiate(&mut t, VIRTIO_F_VERSION_1).unwrap();
        write_reg(&mut t, reg::QUEUE_SEL, 0);
        write_reg(&mut t, reg::QUEUE_NUM, 16);
        write_reg(&mut t, reg::QUEUE_DESC_LOW, 0);
        write_reg(&mut t, reg::QUEUE_DESC_HIGH, 0x10); // 64 GiB: no memory there
        write_reg(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        assert_ne!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn mmio_queue_misaligned_ring_refused() {
        let (mut t, _, driver) = transport();
        driver.negotiate(&mut t, VIRTIO_F_VERSION_1).unwrap();
        driver.setup_queue(&mut t, 0, 16);
        // setup_queue enabled it; redo with a misaligned used ring on queue 1.
        write_reg(&mut t, reg::QUEUE_SEL, 1);
        write_reg(&mut t, reg::QUEUE_NUM, 16);
        write_reg(&mut t, reg::QUEUE_DESC_LOW, QUEUE_BASE as u32);
        write_reg(&mut t, reg::QUEUE_DRIVER_LOW, QUEUE_BASE as u32 + 0x200);
        write_reg(&mut t, reg::QUEUE_DEVICE_LOW, QUEUE_BASE as u32 + 0x402);
        write_reg(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        assert_ne!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn mmio_queue_registers_before_features_ok_ignored() {
        let (mut t, _, _) = transport();
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write_reg(&mut t, reg::QUEUE_NUM, 16);
        write_reg(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn mmio_reset_returns_to_power_on_state() {
        let (mut t, _, driver) = transport();
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        let resets = scratch(&t).resets;
        write_reg(&mut t, reg::STATUS, 0);
        assert_eq!(read_reg(&mut t, reg::STATUS), 0);
        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(scratch(&t).resets, resets + 1);
        // And it can be brought up again.
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        assert_eq!(scratch(&t).activations, 2);
    }

    #[test]
    fn mmio_device_error_sets_needs_reset_and_config_interrupt() {
        let (mut t, irq, driver) = transport();
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        t.device_mut::<ScratchDevice>().unwrap().fail_next = true;
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_ne!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
        assert_ne!(
            read_reg(&mut t, reg::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
            0
        );
        assert!(irq.edges() >= 1);
        // Broken until reset: further notifications are dropped.
        t.device_mut::<ScratchDevice>()
            .unwrap()
            .notifications
            .clear();
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(scratch(&t).notifications.is_empty());
    }

    #[test]
    fn mmio_unaligned_or_narrow_register_access_ignored() {
        let (mut t, _, _) = transport();
        let mut b = [0xff; 2];
        t.read(reg::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        let mut w = [0xff; 4];
        t.read(reg::MAGIC_VALUE + 1, &mut w);
        assert_eq!(w, [0; 4]);
        assert_eq!(t.write(reg::STATUS, &[1]), None);
        assert_eq!(read_reg(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn mmio_config_space_reaches_device_at_any_width() {
        let (mut t, _, _) = transport();
        let mut b = [0; 3];
        t.read(reg::CONFIG + 1, &mut b);
        assert_eq!(b, [0xb1, 0xb2, 0xb3]);
        let mut far = [0xff; 8];
        t.read(MMIO_WINDOW_SIZE - 8, &mut far);
        assert_eq!(far, [0; 8]);
    }

    #[test]
    fn mmio_level_mode_drops_line_when_acked() {
        let irq = Arc::new(CountingInterrupt::default());
        let mem = guest_memory();
        let mut t = MmioTransport::new(
            Box::new(ScratchDevice::default()),
            mem.clone(),
            irq.clone(),
            IrqMode::Level,
        )
        .unwrap();
        let driver = Driver::new(mem);
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(irq.level.load(std::sync::atomic::Ordering::SeqCst));
        write_reg(&mut t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert!(!irq.level.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn mmio_device_without_version_1_refused() {
        let dev = ScratchDevice {
            features: 0,
            ..ScratchDevice::default()
        };
        let err = MmioTransport::new(
            Box::new(dev),
            guest_memory(),
            Arc::new(CountingInterrupt::default()),
            IrqMode::Edge,
        )
        .unwrap_err();
        assert!(matches!(err, MmioError::NoVersion1 { device_type: 0x55 }));
    }

    #[test]
    fn mmio_state_round_trips_and_reactivates() {
        let (mut t, _, driver) = transport();
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        let state = t.state();
        let json = serde_json::to_string(&state).unwrap();
        let decoded: MmioTransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, state);

        let irq = Arc::new(CountingInterrupt::default());
        let mut restored = MmioTransport::from_state(
            &decoded,
            Box::new(ScratchDevice::default()),
            driver.mem(),
            irq.clone(),
        )
        .unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(scratch(&restored).activations, 1);
        assert_eq!(irq.edges(), 1, "pending VRING interrupt re-raised");
        write_reg(&mut restored, reg::QUEUE_NOTIFY, 0);
        assert_eq!(scratch(&restored).notifications, vec![0]);
    }

    #[test]
    fn mmio_restored_in_place_is_the_saved_transport_again() {
        let (mut t, irq, driver) = transport();
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        let saved = t.state();
        // The guest goes on: a second notify, then it resets the device.
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        write_reg(&mut t, reg::STATUS, 0);
        assert_ne!(t.state(), saved);
        let edges = irq.edges();
        t.restore(&saved).unwrap();
        assert_eq!(t.state(), saved);
        assert_eq!(scratch(&t).activations, 2, "activated again");
        assert_eq!(irq.edges(), edges + 1, "pending VRING interrupt re-raised");
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(scratch(&t).notifications.last(), Some(&0));
        // A state of another device is refused.
        let other = MmioTransportState {
            device_type: saved.device_type + 1,
            ..saved
        };
        assert!(matches!(
            t.restore(&other),
            Err(MmioError::StateDeviceMismatch { .. })
        ));
    }

    #[test]
    fn mmio_from_state_with_rings_outside_memory_refused() {
        let (mut t, _, driver) = transport();
        driver.setup(&mut t, VIRTIO_F_VERSION_1, 16).unwrap();
        let mut state = t.state();
        state.queues[0].used_ring = 1 << 40;
        let err = MmioTransport::from_state(
            &state,
            Box::new(ScratchDevice::default()),
            driver.mem(),
            Arc::new(CountingInterrupt::default()),
        )
        .unwrap_err();
        assert!(matches!(err, MmioError::StateQueueInvalid { index: 0, .. }));
    }
}
