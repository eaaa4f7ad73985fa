//! A minimal virtio 1.2 driver over the virtio-mmio transport (§4.2): device
//! initialization (§3.1.1), one split virtqueue (§2.7) with one request in
//! flight, and interrupt acknowledgement (§4.2.2, InterruptStatus/InterruptACK).
//!
//! Everything read from the device is untrusted: ring indices and ids are checked
//! before they are used, and nothing read from the device indexes memory unchecked.

use core::sync::atomic::{fence, Ordering};

use crate::hw::{mmio_read32, mmio_write32};

/// "virt" (§4.2.2).
pub const MAGIC: u32 = 0x7472_6976;

/// Register offsets (virtio 1.2 §4.2.2, "MMIO Device Register Layout").
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (§2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// VIRTIO_F_VERSION_1 (§6), bit 32.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// InterruptStatus bit: used buffer notification (§4.2.2).
pub const INT_USED_BUFFER: u32 = 1;

/// Descriptor flags (§2.7.5).
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Queue size the driver uses (a power of two, §2.7).
pub const QUEUE_SIZE: usize = 8;

/// One virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Transport {
    pub base: u64,
}

impl Transport {
    /// Reads a 32-bit register (or config word).
    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: `base` is one of the platform's virtio-mmio windows, inside the
        // identity-mapped MMIO hole; offsets are 4-byte aligned register offsets.
        unsafe { mmio_read32(self.base + offset) }
    }

    /// Writes a 32-bit register.
    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { mmio_write32(self.base + offset, value) }
    }

    fn write_addr(&self, low: u64, high: u64, addr: u64) {
        self.write(low, addr as u32);
        self.write(high, (addr >> 32) as u32);
    }

    /// The device's 64 feature bits (banks 0 and 1).
    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(reg::DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Reads the InterruptStatus register and acknowledges what it reports.
    pub fn ack_interrupt(&self) -> u32 {
        let s = self.read(reg::INTERRUPT_STATUS);
        if s != 0 {
            self.write(reg::INTERRUPT_ACK, s);
        }
        s
    }

    /// Marks the device FAILED (§3.1.1: the driver gives up on it).
    fn fail(&self) {
        let s = self.read(reg::STATUS);
        self.write(reg::STATUS, s | status::FAILED);
    }
}

/// A split-virtqueue descriptor (§2.7.5).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE],
    used_event: u16,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C)]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE],
    avail_event: u16,
}

/// The three parts of one virtqueue, in one page. repr(C) places them at 0, 128
/// and 152: the alignments §2.7 requires (16, 2, 4) hold.
#[repr(C, align(4096))]
pub struct Ring {
    desc: [Desc; QUEUE_SIZE],
    avail: Avail,
    used: Used,
}

impl Ring {
    /// An all-zero ring.
    pub const ZERO: Ring = Ring {
        desc: [Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        }; QUEUE_SIZE],
        avail: Avail {
            flags: 0,
            idx: 0,
            ring: [0; QUEUE_SIZE],
            used_event: 0,
        },
        used: Used {
            flags: 0,
            idx: 0,
            ring: [UsedElem { id: 0, len: 0 }; QUEUE_SIZE],
            avail_event: 0,
        },
    };
}

/// Why device initialization stopped; the step's exit code adds [`InitError::code`].
#[derive(Clone, Copy, Debug)]
pub enum InitError {
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// FEATURES_OK did not stick (§3.1.1 step 6).
    FeaturesRefused,
    /// Queue 0 is missing, too small, already live, or QueueReady did not stick.
    Queue,
    /// The device set DEVICE_NEEDS_RESET (or dropped DRIVER_OK) after DRIVER_OK.
    NeedsReset,
}

impl InitError {
    /// Offset of this failure within its step's exit codes.
    pub fn code(self) -> u32 {
        match self {
            InitError::NoVersion1 => 0,
            InitError::FeaturesRefused => 1,
            InitError::Queue => 2,
            InitError::NeedsReset => 3,
        }
    }
}

/// Runs virtio 1.2 §3.1.1 on `t`, accepting only VIRTIO_F_VERSION_1, and sets up
/// queue 0 on `ring` with [`QUEUE_SIZE`] entries (§4.2.3.2). Returns the device's
/// feature bits.
pub fn init(t: &Transport, ring: *mut Ring) -> Result<u64, InitError> {
    // 1. Reset, and wait for it to read back 0 (§4.2.3.1), boundedly.
    t.write(reg::STATUS, 0);
    let mut tries = 0;
    while t.read(reg::STATUS) != 0 {
        tries += 1;
        if tries > 1000 {
            return Err(InitError::NeedsReset);
        }
    }
    // 2-3. ACKNOWLEDGE, DRIVER.
    t.write(reg::STATUS, status::ACKNOWLEDGE);
    t.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    // 4. Features: VERSION_1 only.
    let features = t.device_features();
    if features & VIRTIO_F_VERSION_1 == 0 {
        t.fail();
        return Err(InitError::NoVersion1);
    }
    t.write(reg::DRIVER_FEATURES_SEL, 0);
    t.write(reg::DRIVER_FEATURES, 0);
    t.write(reg::DRIVER_FEATURES_SEL, 1);
    t.write(reg::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
    // 5-6. FEATURES_OK, and re-read it.
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    t.write(reg::STATUS, s);
    if t.read(reg::STATUS) & status::FEATURES_OK == 0 {
        t.fail();
        return Err(InitError::FeaturesRefused);
    }
    // 7. Queue 0 (§4.2.3.2).
    t.write(reg::QUEUE_SEL, 0);
    let max = t.read(reg::QUEUE_NUM_MAX);
    if t.read(reg::QUEUE_READY) != 0 || max < QUEUE_SIZE as u32 {
        t.fail();
        return Err(InitError::Queue);
    }
    // SAFETY: `ring` points at a live, page-aligned Ring that only this driver
    // and (through the addresses below) the device touch; zeroing it before the
    // device learns of it races with nothing.
    unsafe { ring.write(Ring::ZERO) };
    t.write(reg::QUEUE_NUM, QUEUE_SIZE as u32);
    // Identity mapping: the virtual address is the guest-physical address.
    let base = ring as u64;
    t.write_addr(
        reg::QUEUE_DESC_LOW,
        reg::QUEUE_DESC_HIGH,
        base + core::mem::offset_of!(Ring, desc) as u64,
    );
    t.write_addr(
        reg::QUEUE_DRIVER_LOW,
        reg::QUEUE_DRIVER_HIGH,
        base + core::mem::offset_of!(Ring, avail) as u64,
    );
    t.write_addr(
        reg::QUEUE_DEVICE_LOW,
        reg::QUEUE_DEVICE_HIGH,
        base + core::mem::offset_of!(Ring, used) as u64,
    );
    t.write(reg::QUEUE_READY, 1);
    if t.read(reg::QUEUE_READY) != 1 {
        t.fail();
        return Err(InitError::Queue);
    }
    // 8. DRIVER_OK.
    t.write(reg::STATUS, s | status::DRIVER_OK);
    let now = t.read(reg::STATUS);
    if now & status::DEVICE_NEEDS_RESET != 0 || now & status::DRIVER_OK == 0 {
        t.fail();
        return Err(InitError::NeedsReset);
    }
    Ok(features)
}

/// One buffer of a request: guest-physical address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// The driver's side of queue 0 of one device.
pub struct Queue {
    ring: *mut Ring,
    /// Next avail index the driver publishes.
    next_avail: u16,
    /// Used index the driver has consumed up to.
    last_used: u16,
}

/// What the used ring said about a request.
#[derive(Clone, Copy, Debug)]
pub enum Completion {
    /// One element for our head: the bytes the device says it wrote.
    Done { len: u32 },
    /// Used index did not advance.
    Pending,
    /// Used index advanced by something other than 1, or the id is not our head.
    Malformed { used_idx: u16, id: u32 },
}

impl Queue {
    /// The driver state for a ring [`init`] just set up.
    pub fn new(ring: *mut Ring) -> Self {
        Self {
            ring,
            next_avail: 0,
            last_used: 0,
        }
    }

    /// Puts `bufs` (at most [`QUEUE_SIZE`]) as one chain from descriptor 0 on the
    /// available ring and notifies queue 0 (§2.7.13). Returns the head id.
    pub fn submit(&mut self, t: &Transport, bufs: &[Buf]) -> u16 {
        let n = bufs.len().min(QUEUE_SIZE);
        let ring = self.ring;
        for (i, b) in bufs.iter().take(n).enumerate() {
            let mut flags = if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let d = Desc {
                addr: b.addr,
                len: b.len,
                flags,
                next: (i + 1) as u16,
            };
            // SAFETY: `ring` is the live Ring of this queue and i < QUEUE_SIZE; the
            // device reads descriptors only after the avail index below moves.
            unsafe { core::ptr::addr_of_mut!((*ring).desc[i]).write_volatile(d) };
        }
        let head = 0u16;
        let slot = usize::from(self.next_avail) % QUEUE_SIZE;
        // SAFETY: as above; slot < QUEUE_SIZE.
        unsafe { core::ptr::addr_of_mut!((*ring).avail.ring[slot]).write_volatile(head) };
        // §2.7.13.3: the ring entry must be visible before the index that exposes it.
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        // SAFETY: as above.
        unsafe { core::ptr::addr_of_mut!((*ring).avail.idx).write_volatile(self.next_avail) };
        // §2.7.13.4: the index must be visible before the notification.
        fence(Ordering::SeqCst);
        t.write(reg::QUEUE_NOTIFY, 0);
        head
    }

    /// Checks the used ring for the completion of the request with head `head`.
    pub fn completion(&mut self, head: u16) -> Completion {
        let ring = self.ring;
        // SAFETY: `ring` is this queue's live Ring; the device writes `used`, so read
        // it volatile.
        let used_idx = unsafe { core::ptr::addr_of!((*ring).used.idx).read_volatile() };
        if used_idx == self.last_used {
            return Completion::Pending;
        }
        // §2.7.14: read the element only after seeing the index.
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used) % QUEUE_SIZE;
        // SAFETY: as above; slot < QUEUE_SIZE.
        let elem = unsafe { core::ptr::addr_of!((*ring).used.ring[slot]).read_volatile() };
        if used_idx != self.last_used.wrapping_add(1) || elem.id != u32::from(head) {
            return Completion::Malformed {
                used_idx,
                id: elem.id,
            };
        }
        self.last_used = used_idx;
        Completion::Done { len: elem.len }
    }
}
