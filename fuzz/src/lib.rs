//! Shared setup for the virtio fuzz targets: a small guest memory, a block
//! device over a scratch image, a driver that brings the transport up through
//! its registers, and the structure-aware inputs (`arbitrary`).
//!
//! Every target checks what the devices promise a hostile guest: no panic, no
//! hang, no access outside guest memory (vm-memory refuses those; a panic would
//! be the finding), and the used ring never runs ahead of the available ring.

use std::fs::File;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use devices::virtio::block::Block;
use devices::virtio::mmio::{reg, MmioTransport, MMIO_WINDOW_SIZE};
use devices::virtio::{status, GuestMemoryMmap, IrqMode};
use devices::{BusDevice, Interrupt, InterruptError};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM: 64 KiB at 0, small so random addresses often hit it.
pub const MEM_SIZE: u64 = 0x1_0000;
/// The scratch disk: 64 sectors.
pub const DISK_SIZE: u64 = 64 * 512;
/// Queue size the block driver sets up.
pub const QUEUE_SIZE: u16 = 16;
/// Ring layout used by [`Driver::bring_up`].
pub const DESC_TABLE: u64 = 0x1000;
/// Available ring.
pub const AVAIL_RING: u64 = 0x1100;
/// Used ring.
pub const USED_RING: u64 = 0x1200;

/// An interrupt line that goes nowhere.
#[derive(Debug, Default)]
pub struct NullIrq;

impl Interrupt for NullIrq {
    fn trigger(&self) -> Result<(), InterruptError> {
        Ok(())
    }

    fn set_level(&self, _asserted: bool) -> Result<(), InterruptError> {
        Ok(())
    }
}

/// Fresh guest memory.
pub fn guest_memory() -> Arc<GuestMemoryMmap> {
    match GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) {
        Ok(m) => Arc::new(m),
        Err(e) => panic!("cannot map fuzz guest memory: {e}"),
    }
}

/// One scratch image per process (in /dev/shm when there is one, so flushes are
/// cheap), cloned for each run.
fn disk() -> File {
    static DISK: OnceLock<File> = OnceLock::new();
    let file = DISK.get_or_init(|| {
        let file = tempfile::tempfile_in("/dev/shm")
            .or_else(|_| tempfile::tempfile())
            .unwrap_or_else(|e| panic!("cannot create the fuzz disk image: {e}"));
        file.set_len(DISK_SIZE)
            .unwrap_or_else(|e| panic!("cannot size the fuzz disk image: {e}"));
        file
    });
    file.try_clone()
        .unwrap_or_else(|e| panic!("cannot clone the fuzz disk image: {e}"))
}

/// A transport with a block device (read-only or not) over `mem`.
pub fn block_transport(mem: Arc<GuestMemoryMmap>, read_only: bool) -> MmioTransport {
    let block = Block::new(disk(), read_only, "fuzz")
        .unwrap_or_else(|e| panic!("cannot create the fuzz block device: {e}"));
    MmioTransport::new(Box::new(block), mem, Arc::new(NullIrq), IrqMode::Edge)
        .unwrap_or_else(|e| panic!("cannot create the fuzz transport: {e}"))
}

fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    let _ = t.write(offset, &value.to_le_bytes());
}

fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// One step of the register fuzzer.
#[derive(Arbitrary, Debug, Clone)]
pub enum RegOp {
    /// Read `width` bytes at `offset` (mod the window).
    Read {
        /// Offset in the window.
        offset: u16,
        /// Access width selector (1, 2, 4 or 8 bytes).
        width: u8,
    },
    /// Write `value` with `width` bytes at `offset`.
    Write {
        /// Offset in the window.
        offset: u16,
        /// Value (little-endian, truncated to the width).
        value: u64,
        /// Access width selector.
        width: u8,
    },
    /// An aligned 32-bit write to one of the real registers: the fuzzer reaches
    /// deep states much faster than with raw offsets.
    Register {
        /// Index into the register list.
        which: u8,
        /// Value.
        value: u32,
    },
    /// The ioeventfd path.
    Notify(u32),
    /// The guest scribbles on its memory (rings, descriptors, buffers).
    Poke {
        /// Address (mod memory size).
        addr: u16,
        /// Bytes.
        bytes: Vec<u8>,
    },
    /// A well-behaved driver setup, so the sequence can continue from DRIVER_OK.
    BringUp {
        /// Features to ask for (low and high words).
        features: u64,
    },
}

const REGISTERS: [u64; 22] = [
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_DRIVER_LOW,
    reg::QUEUE_DRIVER_HIGH,
    reg::QUEUE_DEVICE_LOW,
    reg::QUEUE_DEVICE_HIGH,
    reg::SHM_SEL,
    reg::CONFIG,
    reg::CONFIG + 8,
    reg::MAGIC_VALUE,
    reg::CONFIG_GENERATION,
    reg::INTERRUPT_STATUS,
];

fn width(selector: u8) -> usize {
    [1, 2, 4, 8][usize::from(selector % 4)]
}

/// Brings the transport up as a correct driver would (virtio 1.2 §3.1.1), with
/// queue 0 at [`DESC_TABLE`]/[`AVAIL_RING`]/[`USED_RING`]. Returns whether the
/// device ended up live.
pub fn bring_up(t: &mut MmioTransport, features: u64) -> bool {
    write_reg(t, reg::STATUS, 0);
    write_reg(t, reg::STATUS, status::ACKNOWLEDGE);
    write_reg(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write_reg(t, reg::DRIVER_FEATURES_SEL, 0);
    write_reg(t, reg::DRIVER_FEATURES, features as u32);
    write_reg(t, reg::DRIVER_FEATURES_SEL, 1);
    write_reg(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write_reg(t, reg::STATUS, s);
    if read_reg(t, reg::STATUS) & status::FEATURES_OK == 0 {
        return false;
    }
    write_reg(t, reg::QUEUE_SEL, 0);
    write_reg(t, reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
    write_reg(t, reg::QUEUE_DESC_LOW, DESC_TABLE as u32);
    write_reg(t, reg::QUEUE_DESC_HIGH, 0);
    write_reg(t, reg::QUEUE_DRIVER_LOW, AVAIL_RING as u32);
    write_reg(t, reg::QUEUE_DRIVER_HIGH, 0);
    write_reg(t, reg::QUEUE_DEVICE_LOW, USED_RING as u32);
    write_reg(t, reg::QUEUE_DEVICE_HIGH, 0);
    write_reg(t, reg::QUEUE_READY, 1);
    write_reg(t, reg::STATUS, s | status::DRIVER_OK);
    t.is_active()
}

/// The `virtio_mmio_registers` target.
pub fn run_register_ops(ops: &[RegOp]) {
    let mem = guest_memory();
    let mut t = block_transport(mem.clone(), false);
    for op in ops.iter().take(512) {
        match op {
            RegOp::Read { offset, width: w } => {
                let offset = u64::from(*offset) % MMIO_WINDOW_SIZE;
                let w = width(*w);
                // The bus never hands a device an access past its window.
                if offset + w as u64 <= MMIO_WINDOW_SIZE {
                    let mut buf = [0u8; 8];
                    t.read(offset, &mut buf[..w]);
                }
            }
            RegOp::Write {
                offset,
                value,
                width: w,
            } => {
                let offset = u64::from(*offset) % MMIO_WINDOW_SIZE;
                let w = width(*w);
                if offset + w as u64 <= MMIO_WINDOW_SIZE {
                    let _ = t.write(offset, &value.to_le_bytes()[..w]);
                }
            }
            RegOp::Register { which, value } => {
                let offset = REGISTERS[usize::from(*which) % REGISTERS.len()];
                write_reg(&mut t, offset, *value);
            }
            RegOp::Notify(q) => t.notify(*q),
            RegOp::Poke { addr, bytes } => {
                let _ = mem.write_slice(bytes, GuestAddress(u64::from(*addr)));
            }
            RegOp::BringUp { features } => {
                bring_up(&mut t, *features);
            }
        }
        // Reading a snapshot of the state must always work.
        let _ = t.state();
    }
}

/// Where a fuzzed descriptor points.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FuzzAddr {
    /// Inside guest memory (mod its size).
    InMemory(u16),
    /// Near the end of guest memory, to straddle it.
    NearEnd(u8),
    /// Anything.
    Raw(u64),
}

impl FuzzAddr {
    fn resolve(self) -> u64 {
        match self {
            FuzzAddr::InMemory(a) => u64::from(a) % MEM_SIZE,
            FuzzAddr::NearEnd(back) => MEM_SIZE - u64::from(back),
            FuzzAddr::Raw(a) => a,
        }
    }
}

/// A fuzzed descriptor.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct FuzzDesc {
    /// Buffer address.
    pub addr: FuzzAddr,
    /// Buffer length (small lengths are likelier to be in range).
    pub len: u32,
    /// NEXT/WRITE/INDIRECT flags (and junk).
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

/// The `virtio_blk_request` input.
#[derive(Arbitrary, Debug, Clone)]
pub struct BlkInput {
    /// A read-only disk.
    pub read_only: bool,
    /// Negotiate EVENT_IDX and INDIRECT_DESC (else only VERSION_1 + FLUSH).
    pub ring_features: bool,
    /// The descriptor table (up to the queue size).
    pub descs: Vec<FuzzDesc>,
    /// Heads put on the available ring.
    pub heads: Vec<u16>,
    /// The available index the driver publishes (may lie).
    pub avail_idx: Option<u16>,
    /// Request headers written at the start of each 4 KiB page from 0x2000:
    /// (type, sector).
    pub headers: Vec<(u32, u64)>,
    /// Extra guest memory content (indirect tables, used_event, ...).
    pub pokes: Vec<(u16, Vec<u8>)>,
}

/// The `virtio_blk_request` target. Returns the number of used entries.
pub fn run_blk_request(input: &BlkInput) -> u16 {
    let mem = guest_memory();
    let mut t = block_transport(mem.clone(), input.read_only);
    let ring_features = if input.ring_features {
        (1 << 28) | (1 << 29)
    } else {
        0
    };
    let features = (1u64 << 32) | (1 << 9) | ring_features;
    if !bring_up(&mut t, features) {
        panic!("a correct driver could not bring the block device up");
    }
    for (i, (req_type, sector)) in input.headers.iter().take(8).enumerate() {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        let _ = mem.write_slice(&h, GuestAddress(0x2000 + 0x1000 * i as u64));
    }
    for (addr, bytes) in input.pokes.iter().take(8) {
        let _ = mem.write_slice(bytes, GuestAddress(u64::from(*addr)));
    }
    for (i, d) in input.descs.iter().take(usize::from(QUEUE_SIZE)).enumerate() {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr.resolve().to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..].copy_from_slice(&d.next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(DESC_TABLE + 16 * i as u64));
    }
    let heads = &input.heads[..input.heads.len().min(usize::from(QUEUE_SIZE))];
    for (i, head) in heads.iter().enumerate() {
        let _ = mem.write_obj(*head, GuestAddress(AVAIL_RING + 4 + 2 * i as u64));
    }
    let avail_idx = input.avail_idx.unwrap_or(heads.len() as u16);
    let _ = mem.write_obj(avail_idx, GuestAddress(AVAIL_RING + 2));
    t.notify(0);
    // Twice: a second notification with nothing new must not redo work.
    t.notify(0);

    // The device's own count of used entries: the guest may scribble over the
    // used ring in memory (a poke, or a buffer it asked the device to fill that
    // overlaps the ring), so memory is not the reference.
    let used_idx = t.state().queues[0].next_used;
    let needs_reset = t.status() & status::DEVICE_NEEDS_RESET != 0;
    // The device consumes exactly what is published, unless it gave up. Read
    // the available index again: a buffer the device filled may overlap it.
    let avail_now: u16 = mem
        .read_obj(GuestAddress(AVAIL_RING + 2))
        .unwrap_or(avail_idx);
    if !needs_reset {
        assert_eq!(
            used_idx, avail_now,
            "the device used {used_idx} chains of {avail_now} published"
        );
    }
    used_idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bring_up_correct_driver_goes_live() {
        let mut t = block_transport(guest_memory(), false);
        assert!(bring_up(&mut t, (1 << 32) | (1 << 9)));
    }

    #[test]
    fn blk_request_valid_read_completes_one_entry() {
        let input = BlkInput {
            read_only: false,
            ring_features: false,
            descs: vec![
                FuzzDesc {
                    addr: FuzzAddr::InMemory(0x2000),
                    len: 16,
                    flags: 1,
                    next: 1,
                },
                FuzzDesc {
                    addr: FuzzAddr::InMemory(0x4000),
                    len: 512,
                    flags: 3,
                    next: 2,
                },
                FuzzDesc {
                    addr: FuzzAddr::InMemory(0x5000),
                    len: 1,
                    flags: 2,
                    next: 0,
                },
            ],
            heads: vec![0],
            avail_idx: None,
            headers: vec![(0, 1)],
            pokes: vec![],
        };
        assert_eq!(run_blk_request(&input), 1);
    }

    #[test]
    fn blk_request_lying_avail_index_needs_reset_not_panic() {
        let input = BlkInput {
            read_only: true,
            ring_features: true,
            descs: vec![],
            heads: vec![],
            avail_idx: Some(9999),
            headers: vec![],
            pokes: vec![],
        };
        assert_eq!(run_blk_request(&input), 0);
    }

    #[test]
    fn register_ops_random_sequence_does_not_panic() {
        run_register_ops(&[
            RegOp::BringUp {
                features: (1 << 32) | (1 << 29),
            },
            RegOp::Poke {
                addr: AVAIL_RING as u16 + 2,
                bytes: vec![5, 0],
            },
            RegOp::Notify(0),
            RegOp::Register { which: 8, value: 0 },
            RegOp::Read {
                offset: 0xfff,
                width: 3,
            },
        ]);
    }
}
