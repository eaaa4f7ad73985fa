//! The virtio-net frame path of a live device: random transmit chains and
//! receive buffers from the guest, random bytes (valid frames, bogus length
//! prefixes, partial frames) from the passt side of the stream backend,
//! backpressure (the passt side stops reading), resets and scribbles on
//! guest memory.
//!
//! What must hold: no panic, no hang, and everything the device writes to the
//! passt side is well-framed (a non-zero length no larger than a frame, then
//! exactly that many bytes).
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use arbitrary::Arbitrary;
use devices::virtio::mmio::{reg, MmioTransport};
use devices::virtio::net::{Net, StreamBackend, MAX_FRAME_LEN};
use devices::virtio::{status, GuestMemoryMmap, IrqMode};
use devices::{BusDevice, Interrupt, InterruptError};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: u64 = 0x2_0000;
const QSIZE: u16 = 16;
const DATA: u64 = 0x8000;

struct NullIrq;

impl Interrupt for NullIrq {
    fn trigger(&self) -> Result<(), InterruptError> {
        Ok(())
    }
    fn set_level(&self, _: bool) -> Result<(), InterruptError> {
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
struct FuzzDesc {
    addr: u32,
    len: u32,
    flags: u16,
    next: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A frame on the TX queue: header + `frame`, in `split` descriptors,
    /// claiming `slack` more or fewer bytes than written.
    Transmit { frame: Vec<u8>, split: u8, slack: i16 },
    /// Raw TX descriptors; `head` goes on the available ring.
    RawTx { descs: Vec<FuzzDesc>, head: u8 },
    /// The TX available index jumps.
    TxAvailIdx(u16),
    /// RX buffers: `count` chains of `len` bytes with `flags`.
    RxBuffers { count: u8, len: u16, flags: u16 },
    /// passt sends a well-framed frame of `len` bytes.
    PeerFrame { len: u16, fill: u8 },
    /// passt sends raw bytes (maybe a bogus length).
    PeerBytes(Vec<u8>),
    /// The event loop says the backend fd is ready.
    Event,
    /// passt reads what is waiting (otherwise the socket fills up).
    PeerDrain,
    /// The driver resets and brings the device up again.
    DriverReset,
    /// Scribble on guest memory.
    Poke { addr: u32, bytes: Vec<u8> },
}

fn queue_base(q: u16) -> u64 {
    0x1000 * (u64::from(q) + 1)
}

fn w(t: &mut MmioTransport, offset: u64, v: u32) {
    let _ = t.write(offset, &v.to_le_bytes());
}

fn bring_up(t: &mut MmioTransport) {
    w(t, reg::STATUS, 0);
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, 1);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w(t, reg::STATUS, s);
    for q in 0..2u16 {
        let base = queue_base(q);
        w(t, reg::QUEUE_SEL, u32::from(q));
        w(t, reg::QUEUE_NUM, u32::from(QSIZE));
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x100) as u32);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x200) as u32);
        w(t, reg::QUEUE_READY, 1);
    }
    w(t, reg::STATUS, s | status::DRIVER_OK);
}

struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    q: u16,
}

impl Ring<'_> {
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = queue_base(self.q) + 16 * u64::from(i % QSIZE);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        let _ = self.mem.write_slice(&b, GuestAddress(at));
    }

    fn avail_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(queue_base(self.q) + 0x102))
            .unwrap_or(0)
    }

    fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = queue_base(self.q) + 0x104 + 2 * u64::from(idx % QSIZE);
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        let _ = self.mem.write_obj(
            idx.wrapping_add(1),
            GuestAddress(queue_base(self.q) + 0x102),
        );
    }
}

/// Reads what the device sent and checks its framing; keeps a partial frame
/// in `pending`.
fn drain_and_check(peer: &mut UnixStream, pending: &mut Vec<u8>) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match peer.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
    loop {
        if pending.len() < 4 {
            return;
        }
        let len = u32::from_be_bytes([pending[0], pending[1], pending[2], pending[3]]) as usize;
        assert!(len > 0 && len <= MAX_FRAME_LEN, "device sent a bad frame length {len}");
        if pending.len() < 4 + len {
            return;
        }
        pending.drain(..4 + len);
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mem = match GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) {
        Ok(m) => Arc::new(m),
        Err(e) => panic!("cannot map fuzz guest memory: {e}"),
    };
    let (ours, mut peer) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
    let _ = peer.set_nonblocking(true);
    let backend = StreamBackend::new(ours, "fuzz").unwrap_or_else(|e| panic!("backend: {e}"));
    let net = Net::new([2, 0, 0, 0, 0, 1], Box::new(backend));
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), Arc::new(NullIrq), IrqMode::Edge)
        .unwrap_or_else(|e| panic!("transport: {e}"));
    bring_up(&mut t);
    let rx = Ring { mem: &mem, q: 0 };
    let tx = Ring { mem: &mem, q: 1 };
    let mut slot: u16 = 0;
    let mut pending = Vec::new();

    for op in ops.into_iter().take(64) {
        match op {
            Op::Transmit { frame, split, slack } => {
                let mut bytes = vec![0u8; 12];
                bytes.extend(frame.iter().take(0x4000));
                let _ = mem.write_slice(&bytes, GuestAddress(DATA));
                let total = (bytes.len() as i64 + i64::from(slack)).max(0) as u64;
                let pieces = u64::from(split % 4) + 1;
                let piece = (total / pieces).max(1);
                let (mut off, mut i) = (0, 0);
                let first = slot;
                while off < total && i < pieces {
                    let len = if i + 1 == pieces { total - off } else { piece };
                    let more = i + 1 < pieces && off + len < total;
                    tx.desc(slot, DATA + off, len as u32, u16::from(more), (slot + 1) % QSIZE);
                    slot = (slot + 1) % QSIZE;
                    off += len;
                    i += 1;
                }
                tx.publish(first);
                t.notify(1);
            }
            Op::RawTx { descs, head } => {
                for (i, d) in descs.iter().take(usize::from(QSIZE)).enumerate() {
                    tx.desc(i as u16, u64::from(d.addr), d.len, d.flags, u16::from(d.next));
                }
                tx.publish(u16::from(head));
                t.notify(1);
            }
            Op::TxAvailIdx(i) => {
                let _ = mem.write_obj(i, GuestAddress(queue_base(1) + 0x102));
                t.notify(1);
            }
            Op::RxBuffers { count, len, flags } => {
                for _ in 0..(count % 8) {
                    let idx = rx.avail_idx() % QSIZE;
                    let addr = 0x1_0000 + u64::from(idx) * 0x1000;
                    rx.desc(idx, addr, u32::from(len % 0x1800), flags & !1, 0);
                    rx.publish(idx);
                }
                t.notify(0);
            }
            Op::PeerFrame { len, fill } => {
                let len = usize::from(len).clamp(1, MAX_FRAME_LEN);
                let mut b = (len as u32).to_be_bytes().to_vec();
                b.extend(std::iter::repeat(fill).take(len));
                let _ = peer.write(&b);
                t.process_event(0);
            }
            Op::PeerBytes(bytes) => {
                let _ = peer.write(&bytes);
                t.process_event(0);
            }
            Op::Event => t.process_event(0),
            Op::PeerDrain => {
                drain_and_check(&mut peer, &mut pending);
                t.process_event(0);
            }
            Op::DriverReset => bring_up(&mut t),
            Op::Poke { addr, bytes } => {
                let _ = mem.write_slice(&bytes, GuestAddress(u64::from(addr) % MEM_SIZE));
            }
        }
    }
    drain_and_check(&mut peer, &mut pending);
});
