//! A guest driver for unit tests: negotiates through the registers of an
//! [`MmioTransport`] and places descriptor chains in the split rings.
//!
//! The rings are written by hand ([`Ring`]) rather than with
//! `virtio_queue::mock::MockSplitQueue`: the 0.18 mock computes the used ring's
//! address from the available ring's element count instead of its byte size, so
//! for a 16-entry queue the used ring overlaps available entries 8..16.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::any::Any;
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

use super::mmio::{reg, MmioTransport};
use super::{
    read_config_bytes, status, DeviceContext, GuestMemoryMmap, VirtioDevice, VirtioError,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::bus::BusDevice;

/// Guest RAM size of the test VM: 1 MiB at address 0.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Where queue 0's rings start; queue `n` is at `QUEUE_BASE + n * 0x1000`.
pub const QUEUE_BASE: u64 = 0x1000;
/// A place for data buffers, clear of the rings.
pub const DATA_BASE: u64 = 0x2_0000;

/// `VRING_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

pub fn guest_memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap())
}

pub fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    assert_eq!(t.write(offset, &value.to_le_bytes()), None);
}

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// The guest side.
pub struct Driver {
    mem: Arc<GuestMemoryMmap>,
}

impl Driver {
    pub fn new(mem: Arc<GuestMemoryMmap>) -> Self {
        Self { mem }
    }

    pub fn mem(&self) -> Arc<GuestMemoryMmap> {
        self.mem.clone()
    }

    /// virtio 1.2 §3.1.1 steps 1-6. `Ok(status)` if the device took FEATURES_OK,
    /// `Err(status)` if not.
    pub fn negotiate(&self, t: &mut MmioTransport, features: u64) -> Result<u32, u32> {
        write_reg(t, reg::STATUS, 0);
        write_reg(t, reg::STATUS, status::ACKNOWLEDGE);
        write_reg(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for bank in 0..2 {
            write_reg(t, reg::DRIVER_FEATURES_SEL, bank);
            write_reg(t, reg::DRIVER_FEATURES, (features >> (32 * bank)) as u32);
        }
        write_reg(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        let s = read_reg(t, reg::STATUS);
        if s & status::FEATURES_OK != 0 {
            Ok(s)
        } else {
            Err(s)
        }
    }

    /// Writes queue `index`'s registers (size as given, rings where the mock puts
    /// them) and sets `QueueReady`.
    pub fn setup_queue(&self, t: &mut MmioTransport, index: u16, size: u32) {
        let ring = self.ring(index, size as u16);
        ring.clear();
        write_reg(t, reg::QUEUE_SEL, u32::from(index));
        write_reg(t, reg::QUEUE_NUM, size);
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, ring.desc),
            (reg::QUEUE_DRIVER_LOW, ring.avail),
            (reg::QUEUE_DEVICE_LOW, ring.used),
        ] {
            write_reg(t, low, addr as u32);
            write_reg(t, low + 4, (addr >> 32) as u32);
        }
        write_reg(t, reg::QUEUE_READY, 1);
    }

    /// Negotiation, queue 0 of `size`, DRIVER_OK. `Err(status)` on refusal.
    pub fn setup(&self, t: &mut MmioTransport, features: u64, size: u32) -> Result<(), u32> {
        let s = self.negotiate(t, features)?;
        self.setup_queue(t, 0, size);
        write_reg(t, reg::STATUS, s | status::DRIVER_OK);
        let s = read_reg(t, reg::STATUS);
        if s & status::DRIVER_OK != 0 && s & status::DEVICE_NEEDS_RESET == 0 {
            Ok(())
        } else {
            Err(s)
        }
    }
}

/// A device that records what the transport asks of it.
#[derive(Debug)]
pub struct ScratchDevice {
    pub features: u64,
    pub activations: usize,
    pub resets: usize,
    pub notifications: Vec<u16>,
    pub fail_next: bool,
}

impl Default for ScratchDevice {
    fn default() -> Self {
        Self {
            features: VIRTIO_F_VERSION_1
                | VIRTIO_RING_F_INDIRECT_DESC
                | VIRTIO_RING_F_EVENT_IDX
                | 1,
            activations: 0,
            resets: 0,
            notifications: Vec::new(),
            fail_next: false,
        }
    }
}

impl VirtioDevice for ScratchDevice {
    fn device_type(&self) -> u32 {
        0x55
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[0xb0, 0xb1, 0xb2, 0xb3], offset, data);
    }

    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
        if !ctx.queue_ready(0) {
            return Err(VirtioError::QueueNotReady { index: 0 });
        }
        self.activations += 1;
        Ok(())
    }

    fn process_queue(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        index: u16,
    ) -> Result<(), VirtioError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(VirtioError::Device {
                what: "scratch failure".into(),
                source: None,
            });
        }
        self.notifications.push(index);
        ctx.drain_queue(index, |_| 0)?;
        ctx.signal_used(index)
    }

    fn reset(&mut self) {
        self.resets += 1;
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A driver-side view of a split queue's rings that, unlike the mock, does not
/// zero them when created, so it can be used again between requests.
pub struct Ring {
    mem: Arc<GuestMemoryMmap>,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
}

impl Ring {
    /// Zeroes the available and used rings (a fresh queue).
    pub fn clear(&self) {
        let avail_len = 6 + 2 * usize::from(self.size);
        let used_len = 6 + 8 * usize::from(self.size);
        self.mem
            .write_slice(&vec![0; avail_len], GuestAddress(self.avail))
            .unwrap();
        self.mem
            .write_slice(&vec![0; used_len], GuestAddress(self.used))
            .unwrap();
    }

    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    pub fn used_addr(&self) -> u64 {
        self.used
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Writes `descs` at table entries `first..`, linked with NEXT, and publishes
    /// the chain.
    pub fn add_chain(&self, first: u16, descs: &[RawDescriptor]) {
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let index = first + i as u16;
            let flags = if i + 1 == descs.len() {
                d.flags() & !F_NEXT
            } else {
                d.flags() | F_NEXT
            };
            self.write_desc(index, desc(d.addr().0, d.len(), flags, index + 1));
        }
        self.publish(first);
    }

    pub fn write_desc(&self, index: u16, d: RawDescriptor) {
        self.mem
            .write_obj(d, GuestAddress(self.desc + 16 * u64::from(index)))
            .unwrap();
    }

    pub fn publish(&self, head: u16) {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring entry for used index `i`: (head id, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let slot = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(slot)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).unwrap();
        (id, len)
    }
}

impl Driver {
    /// A reusable view of queue `index` as [`Driver::setup_queue`] laid it out.
    pub fn ring(&self, index: u16, size: u16) -> Ring {
        let base = QUEUE_BASE + u64::from(index) * 0x1000;
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Ring {
            mem: self.mem.clone(),
            desc: base,
            avail,
            used,
            size,
        }
    }
}
