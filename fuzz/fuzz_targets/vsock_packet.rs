//! Random vsock packets and descriptor chains on the TX queue of a live
//! virtio-vsock device, interleaved with host-side activity (writes, closes,
//! events, host-initiated connections), RX buffers and resets.
//!
//! What must hold: no panic, no hang, and the connection table stays within
//! its bound.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::virtio::mmio::{reg, MmioTransport};
use devices::virtio::vsock::packet::Header;
use devices::virtio::vsock::{Vsock, HOST_CID, MAX_CONNECTIONS};
use devices::virtio::{status, GuestMemoryMmap, IrqMode, TOKEN_WAKE};
use devices::{BusDevice, Interrupt, InterruptError};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: u64 = 0x1_0000;
const QSIZE: u16 = 16;
const CID: u64 = 3;
const DATA: u64 = 0x4000;

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
struct FuzzHeader {
    /// Use the right CIDs (most packets should get past the CID check).
    right_cids: bool,
    src_cid: u64,
    dst_cid: u64,
    src_port: u8,
    dst_port: u8,
    len: u32,
    type_: u16,
    op: u8,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

#[derive(Arbitrary, Debug)]
struct FuzzDesc {
    addr: u16,
    len: u16,
    flags: u16,
    next: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A packet in one buffer (header + `payload`), or split into `split`
    /// descriptors.
    Packet {
        hdr: FuzzHeader,
        payload: Vec<u8>,
        split: u8,
        /// Extra length claimed for the buffer (lie about its size).
        slack: i16,
    },
    /// Raw descriptors; `head` goes on the TX available ring.
    RawChain { descs: Vec<FuzzDesc>, head: u8 },
    /// The TX available index jumps.
    AvailIdx(u16),
    /// RX buffers: `count` chains of `len` bytes with `flags`.
    RxBuffers { count: u8, len: u16, flags: u16 },
    /// Event buffer.
    EventBuffer { len: u8 },
    /// The host writes to one of its streams.
    HostWrite { which: u8, bytes: Vec<u8> },
    /// The host closes one of its streams.
    HostClose(u8),
    /// The host opens a connection to a guest port.
    HostConnect(u8),
    /// The event loop delivers events for all host fds.
    HostEvents,
    /// reset_transport().
    TransportReset,
    /// The driver resets and brings the device up again.
    DriverReset,
    /// Scribble on guest memory.
    Poke { addr: u16, bytes: Vec<u8> },
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
    for q in 0..3u16 {
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

fuzz_target!(|ops: Vec<Op>| {
    let mem = match GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) {
        Ok(m) => Arc::new(m),
        Err(e) => panic!("cannot map fuzz guest memory: {e}"),
    };
    let streams: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
    let mut vsock = Vsock::new(CID, None).unwrap_or_else(|e| panic!("vsock: {e}"));
    for port in 0..4 {
        let streams = streams.clone();
        vsock.listen(
            port,
            Box::new(move |s| {
                if let Ok(mut v) = streams.lock() {
                    v.push(s);
                }
            }),
        );
    }
    let mut t = MmioTransport::new(
        Box::new(vsock),
        mem.clone(),
        Arc::new(NullIrq),
        IrqMode::Edge,
    )
    .unwrap_or_else(|e| panic!("transport: {e}"));
    bring_up(&mut t);
    let rx = Ring { mem: &mem, q: 0 };
    let tx = Ring { mem: &mem, q: 1 };
    let ev = Ring { mem: &mem, q: 2 };
    let mut slot: u16 = 0;

    for op in ops.into_iter().take(64) {
        match op {
            Op::Packet {
                hdr,
                payload,
                split,
                slack,
            } => {
                let (src_cid, dst_cid) = if hdr.right_cids {
                    (CID, HOST_CID)
                } else {
                    (hdr.src_cid, hdr.dst_cid)
                };
                let h = Header {
                    src_cid,
                    dst_cid,
                    src_port: u32::from(hdr.src_port % 8),
                    dst_port: u32::from(hdr.dst_port % 8),
                    len: hdr.len,
                    type_: hdr.type_ % 3,
                    op: u16::from(hdr.op % 9),
                    flags: hdr.flags,
                    buf_alloc: hdr.buf_alloc,
                    fwd_cnt: hdr.fwd_cnt,
                };
                let mut bytes = h.to_bytes().to_vec();
                bytes.extend(payload.iter().take(0x8000));
                let _ = mem.write_slice(&bytes, GuestAddress(DATA));
                let total = (bytes.len() as i64 + i64::from(slack)).max(0) as u64;
                let pieces = u64::from(split % 4) + 1;
                let piece = (total / pieces).max(1);
                let mut off = 0;
                let first = slot;
                let mut i = 0;
                while off < total && i < pieces {
                    let len = if i + 1 == pieces { total - off } else { piece };
                    let more = i + 1 < pieces && off + len < total;
                    let flags = if more { 1 } else { 0 };
                    tx.desc(slot, DATA + off, len as u32, flags, (slot + 1) % QSIZE);
                    slot = (slot + 1) % QSIZE;
                    off += len;
                    i += 1;
                }
                tx.publish(first);
                t.notify(1);
            }
            Op::RawChain { descs, head } => {
                for (i, d) in descs.iter().take(usize::from(QSIZE)).enumerate() {
                    tx.desc(
                        i as u16,
                        u64::from(d.addr),
                        u32::from(d.len),
                        d.flags,
                        u16::from(d.next),
                    );
                }
                tx.publish(u16::from(head));
                t.notify(1);
            }
            Op::AvailIdx(i) => {
                let _ = mem.write_obj(i, GuestAddress(queue_base(1) + 0x102));
                t.notify(1);
            }
            Op::RxBuffers { count, len, flags } => {
                for _ in 0..(count % 8) {
                    let idx = rx.avail_idx() % QSIZE;
                    let addr = 0xc000 + u64::from(idx) * 0x400;
                    rx.desc(idx, addr, u32::from(len % 0x800), flags & !1, 0);
                    rx.publish(idx);
                }
                t.notify(0);
            }
            Op::EventBuffer { len } => {
                let idx = ev.avail_idx() % QSIZE;
                ev.desc(idx, 0xb000, u32::from(len % 16), 2, 0);
                ev.publish(idx);
                t.notify(2);
            }
            Op::HostWrite { which, bytes } => {
                if let Ok(mut v) = streams.lock() {
                    let n = v.len();
                    if n > 0 {
                        let _ = v[usize::from(which) % n].write(&bytes);
                    }
                }
            }
            Op::HostClose(which) => {
                if let Ok(mut v) = streams.lock() {
                    let n = v.len();
                    if n > 0 {
                        v.remove(usize::from(which) % n);
                    }
                }
            }
            Op::HostConnect(port) => {
                if let Some(v) = t.device_mut::<Vsock>() {
                    if let Ok(s) = v.connect(u32::from(port % 8)) {
                        let _ = s.set_nonblocking(true);
                        if let Ok(mut v) = streams.lock() {
                            v.push(s);
                        }
                    }
                }
                t.process_event(TOKEN_WAKE);
            }
            Op::HostEvents => {
                let mut fds = Vec::new();
                t.host_fds(&mut fds);
                for f in fds {
                    t.process_event(f.token);
                }
            }
            Op::TransportReset => {
                if let Some(v) = t.device_mut::<Vsock>() {
                    v.reset_transport();
                }
                t.process_event(TOKEN_WAKE);
            }
            Op::DriverReset => bring_up(&mut t),
            Op::Poke { addr, bytes } => {
                let _ = mem.write_slice(&bytes, GuestAddress(u64::from(addr) % MEM_SIZE));
            }
        }
        if let Some(v) = t.device::<Vsock>() {
            assert!(v.connection_count() <= MAX_CONNECTIONS);
        }
    }
});
