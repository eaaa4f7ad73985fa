//! A virtio guest driver in host memory for the benchmarks (`devices` and
//! `supermachine` include this file with `#[path]`): split rings written by
//! hand, notifications and negotiation as MMIO register writes.

use std::sync::Arc;

use devices::virtio::mmio::{reg, MmioTransport};
use devices::virtio::{status, GuestMemoryMmap, IrqMode, VirtioDevice, VIRTIO_F_VERSION_1};
use devices::{BusDevice, Interrupt, InterruptError};
use vm_memory::{Bytes, GuestAddress};

const MIB: usize = 1 << 20;
/// Every queue is this big (the devices' maximum).
pub const QSIZE: u16 = 256;
/// Guest RAM of the simulated VM.
pub const MEM_SIZE: usize = 64 * MIB;
/// Queue `q`'s rings: descriptors, then available, then used, 4 KiB apart.
pub const RINGS: u64 = 0x1_0000;

#[derive(Debug)]
pub struct NullIrq;

impl Interrupt for NullIrq {
    fn trigger(&self) -> Result<(), InterruptError> {
        Ok(())
    }
    fn set_level(&self, _: bool) -> Result<(), InterruptError> {
        Ok(())
    }
}

// ---- the simulated guest driver ----

/// A split queue as the driver sees it (virtio 1.2 §2.7).
pub struct Ring {
    mem: Arc<GuestMemoryMmap>,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    pub fn new(mem: &Arc<GuestMemoryMmap>, q: u16) -> Self {
        let base = RINGS * (u64::from(q) + 1);
        Self {
            mem: mem.clone(),
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(self.desc + 16 * u64::from(i)))
            .unwrap();
    }

    /// Puts `head` in the next available slot; [`Ring::flush`] makes it visible.
    pub fn push(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    pub fn flush(&self) {
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The next used element: (head, written length).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let slot = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(slot)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }
}

pub fn w(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Negotiation and queue setup (virtio 1.2 §3.1.1, §4.2.3.2) with VERSION_1 and
/// the device-specific `features` (bank 0), every queue at [`QSIZE`], then
/// DRIVER_OK.
pub fn bring_up(
    device: Box<dyn VirtioDevice>,
    mem: &Arc<GuestMemoryMmap>,
    features: u32,
) -> MmioTransport {
    let queues = device.queue_max_sizes().len() as u16;
    let mut t = MmioTransport::new(device, mem.clone(), Arc::new(NullIrq), IrqMode::Edge).unwrap();
    let s = status::ACKNOWLEDGE | status::DRIVER;
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    w(&mut t, reg::STATUS, s);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    w(&mut t, reg::DRIVER_FEATURES, features);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(
        &mut t,
        reg::DRIVER_FEATURES,
        (VIRTIO_F_VERSION_1 >> 32) as u32,
    );
    w(&mut t, reg::STATUS, s | status::FEATURES_OK);
    for q in 0..queues {
        let r = Ring::new(mem, q);
        w(&mut t, reg::QUEUE_SEL, u32::from(q));
        w(&mut t, reg::QUEUE_NUM, u32::from(QSIZE));
        w(&mut t, reg::QUEUE_DESC_LOW, r.desc as u32);
        w(&mut t, reg::QUEUE_DRIVER_LOW, r.avail as u32);
        w(&mut t, reg::QUEUE_DEVICE_LOW, r.used as u32);
        w(&mut t, reg::QUEUE_READY, 1);
    }
    w(
        &mut t,
        reg::STATUS,
        s | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(t.is_active(), "the device refused the driver");
    t
}

pub fn guest_memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

#[allow(dead_code)] // the devices bench checks the status; the forwarding bench does not
pub fn t_status(t: &mut MmioTransport) -> u32 {
    let mut b = [0; 4];
    t.read(reg::STATUS, &mut b);
    u32::from_le_bytes(b)
}
