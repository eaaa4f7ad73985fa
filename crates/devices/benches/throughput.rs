//! Device-model throughput, no hypervisor: this bench plays the guest driver in
//! host memory (split rings written by hand, notifications as register writes,
//! as `tests/vsock_e2e.rs` does) and measures how fast the device models move
//! bytes. It is the ceiling the devices put on a guest; what a real guest gets
//! also pays for exits and its own stack (see `guest_throughput` in the
//! supermachine crate for that, on hosts with hardware virtualization).
//!
//! Prints medians (and min/max) over N runs (default 5, `SM_BENCH_RUNS`) of
//! `SM_BENCH_MIB` MiB (default 256) each:
//! - virtio-blk sequential read and write in 64 KiB and 128 KiB requests, 32 in
//!   flight per notification, against a temp file (in `SM_BENCH_DIR`, default the
//!   system temp dir; page cache, no fsync), next to `std::fs` positioned reads and
//!   writes of the same file in the same chunks as the peer;
//! - virtio-vsock streams guest -> host and host -> guest into / from a UNIX
//!   socket, next to a plain UNIX socketpair copy as the peer.
//!
//! Run: `cargo bench -p devices --bench throughput`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::block::features::VIRTIO_BLK_F_FLUSH;
use devices::virtio::block::request::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use devices::virtio::block::{Block, SECTOR_SIZE};
use devices::virtio::mmio::{reg, MmioTransport};
use devices::virtio::vsock::packet::{op, Header, HEADER_LEN, TYPE_STREAM};
use devices::virtio::vsock::{Vsock, HOST_CID};
use devices::virtio::{status, GuestMemoryMmap};
use vm_memory::{Bytes, GuestAddress};

const KIB: usize = 1 << 10;
#[path = "common/stats.rs"]
mod stats;
use stats::{env_usize, mib_per_s, report};
#[path = "common/driver.rs"]
mod driver;
use driver::{bring_up, guest_memory, t_status, w, Ring};

const MIB: usize = 1 << 20;
/// Small per-request data (blk headers and status bytes, vsock TX headers).
const SMALL: u64 = 0x10_0000;
/// Bulk buffers.
const BULK: u64 = 0x40_0000;
/// blk requests in flight per notification, as a driver with a queue depth has.
const BLK_DEPTH: u16 = 32;
/// vsock: RX buffers the guest keeps posted and their payload room (Linux posts
/// 4 KiB + header; bigger buffers show the device's own cost, not the split).
const RX_BUFS: u16 = 128;
const RX_PAYLOAD: u32 = 64 * 1024;
/// vsock: largest RW payload the guest sends, TX packets per notification, and
/// the guest's receive buffer (Linux's default `buf_alloc`).
const TX_PAYLOAD: u32 = 64 * 1024;
const TX_BATCH: u16 = 32;
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
const CID: u64 = 3;

// ---- virtio-blk ----

/// One sequential pass over the file through the device; returns its duration.
fn blk_pass(path: &Path, total: usize, chunk: usize, write: bool) -> Duration {
    let mem = guest_memory();
    let blk = Block::open(path, false, "bench").unwrap();
    // FLUSH, as Linux negotiates it: without it the device must write through
    // (virtio 1.2 §5.2.5) and every write would wait for the disk.
    let mut t = bring_up(Box::new(blk), &mem, VIRTIO_BLK_F_FLUSH as u32);
    let mut ring = Ring::new(&mem, 0);
    // Request j: descriptors 3j (header), 3j+1 (data), 3j+2 (status), fixed.
    let data_flags = if write { 1 } else { 1 | 2 };
    for j in 0..BLK_DEPTH {
        let hdr = SMALL + 16 * u64::from(j);
        let status = SMALL + 0x1000 + u64::from(j);
        let data = BULK + (chunk * usize::from(j)) as u64;
        ring.write_desc(3 * j, hdr, 16, 1, 3 * j + 1);
        ring.write_desc(3 * j + 1, data, chunk as u32, data_flags, 3 * j + 2);
        ring.write_desc(3 * j + 2, status, 1, 2, 0);
        if write {
            mem.write_slice(&vec![0x5a; chunk], GuestAddress(data))
                .unwrap();
        }
    }
    let kind = if write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let requests = total / chunk;
    let mut next = 0usize;
    let t0 = Instant::now();
    while next < requests {
        let batch = (requests - next).min(usize::from(BLK_DEPTH)) as u16;
        for j in 0..batch {
            let sector = (next + usize::from(j)) as u64 * chunk as u64 / SECTOR_SIZE;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(SMALL + 16 * u64::from(j)))
                .unwrap();
            mem.write_obj(0xffu8, GuestAddress(SMALL + 0x1000 + u64::from(j)))
                .unwrap();
            ring.push(3 * j);
        }
        ring.flush();
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        for _ in 0..batch {
            let (head, _) = ring.pop_used().expect("the device served the batch");
            let status: u8 = mem
                .read_obj(GuestAddress(SMALL + 0x1000 + u64::from(head / 3)))
                .unwrap();
            assert_eq!(status, VIRTIO_BLK_S_OK, "request failed");
        }
        next += usize::from(batch);
    }
    t0.elapsed()
}

/// The same pass with `std::fs` positioned I/O on the same file.
fn file_pass(path: &Path, total: usize, chunk: usize, write: bool) -> Duration {
    let f = File::options().read(true).write(true).open(path).unwrap();
    let mut buf = vec![0x5a; chunk];
    let t0 = Instant::now();
    for off in (0..total).step_by(chunk) {
        if write {
            f.write_all_at(&buf, off as u64).unwrap();
        } else {
            f.read_exact_at(&mut buf, off as u64).unwrap();
        }
    }
    t0.elapsed()
}

fn bench_blk(runs: usize, total: usize) {
    let dir = std::env::var_os("SM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let file = tempfile::NamedTempFile::new_in(&dir).unwrap();
    let path = file.path().to_path_buf();
    {
        let mut f = File::options().write(true).open(&path).unwrap();
        let block = vec![0xa5u8; MIB];
        for _ in 0..total / MIB {
            f.write_all(&block).unwrap();
        }
    }
    println!(
        "virtio-blk: {} MiB file in {} (page cache, no fsync), {BLK_DEPTH} requests per notify",
        total / MIB,
        dir.display()
    );
    for chunk in [64 * KIB, 128 * KIB] {
        for write in [false, true] {
            // One warm-up pass each, then alternate device and peer.
            blk_pass(&path, total, chunk, write);
            file_pass(&path, total, chunk, write);
            let (mut ours, mut peer) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                ours.push(mib_per_s(total, blk_pass(&path, total, chunk, write)));
                peer.push(mib_per_s(total, file_pass(&path, total, chunk, write)));
            }
            let dir = if write { "write" } else { "read" };
            report(
                &format!("blk seq {dir} {} KiB", chunk / KIB),
                ours,
                &format!("std::fs {dir}_at"),
                peer,
            );
        }
    }
}

// ---- virtio-vsock ----

/// The guest side of one vsock stream (virtio 1.2 §5.10.6): RX buffers kept
/// posted, credit accounting both ways, TX from a payload area the guest filled
/// once (a driver hands the device its socket buffers the same way).
struct VsockGuest {
    t: MmioTransport,
    mem: Arc<GuestMemoryMmap>,
    rx: Ring,
    tx: Ring,
    /// The connection: (guest port, host port).
    key: (u32, u32),
    established: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_sent: u32,
    received: usize,
}

fn rx_addr(i: u16) -> u64 {
    BULK + u64::from(i) * (HEADER_LEN as u64 + u64::from(RX_PAYLOAD))
}

/// TX payloads are read from here; it sits after the RX buffers.
const TX_DATA: u64 = BULK + 32 * MIB as u64;

impl VsockGuest {
    fn new(vsock: Vsock) -> Self {
        let mem = guest_memory();
        let t = bring_up(Box::new(vsock), &mem, 0);
        let mut g = Self {
            t,
            rx: Ring::new(&mem, 0),
            tx: Ring::new(&mem, 1),
            mem,
            key: (0, 0),
            established: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            received: 0,
        };
        for i in 0..RX_BUFS {
            g.rx.write_desc(i, rx_addr(i), HEADER_LEN as u32 + RX_PAYLOAD, 2, 0);
            g.rx.push(i);
        }
        g.rx.flush();
        w(&mut g.t, reg::QUEUE_NOTIFY, 0);
        g.mem
            .write_slice(&vec![0x3c; TX_PAYLOAD as usize], GuestAddress(TX_DATA))
            .unwrap();
        g
    }

    fn header(&mut self, op: u16, len: u32) -> Header {
        self.last_fwd_sent = self.fwd_cnt;
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: self.key.0,
            dst_port: self.key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Queues packets (header, payload length) on TX and notifies once; the
    /// device consumes TX chains during the notification.
    fn send(&mut self, packets: &[(Header, u32)]) {
        for (n, (h, len)) in packets.iter().enumerate() {
            let n = n as u16;
            let hdr_addr = SMALL + 64 * u64::from(n);
            self.mem
                .write_slice(&h.to_bytes(), GuestAddress(hdr_addr))
                .unwrap();
            if *len == 0 {
                self.tx.write_desc(2 * n, hdr_addr, HEADER_LEN as u32, 0, 0);
            } else {
                self.tx
                    .write_desc(2 * n, hdr_addr, HEADER_LEN as u32, 1, 2 * n + 1);
                self.tx.write_desc(2 * n + 1, TX_DATA, *len, 0, 0);
            }
            self.tx.push(2 * n);
        }
        self.tx.flush();
        w(&mut self.t, reg::QUEUE_NOTIFY, 1);
        for _ in packets {
            self.tx.pop_used().expect("the device consumed TX");
        }
    }

    /// Host events, then every received packet.
    fn turn(&mut self) {
        let mut fds = Vec::new();
        self.t.host_fds(&mut fds);
        for f in fds {
            self.t.process_event(f.token);
        }
        let mut any = false;
        let mut reply = None;
        while let Some((id, _)) = self.rx.pop_used() {
            let mut raw = [0u8; HEADER_LEN];
            self.mem
                .read_slice(&mut raw, GuestAddress(rx_addr(id)))
                .unwrap();
            let h = Header::from_bytes(&raw);
            self.rx.push(id);
            any = true;
            self.peer_buf_alloc = h.buf_alloc;
            self.peer_fwd_cnt = h.fwd_cnt;
            match h.op {
                op::REQUEST => {
                    self.key = (h.dst_port, h.src_port);
                    self.established = true;
                    reply = Some(op::RESPONSE);
                }
                op::RESPONSE => self.established = true,
                op::RW => {
                    self.received += h.len as usize;
                    // The application reads it at once.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(h.len);
                }
                _ => {}
            }
        }
        if any {
            self.rx.flush();
            w(&mut self.t, reg::QUEUE_NOTIFY, 0);
        }
        if let Some(op) = reply {
            let h = self.header(op, 0);
            self.send(&[(h, 0)]);
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_sent) >= GUEST_BUF_ALLOC / 4 {
            let h = self.header(op::CREDIT_UPDATE, 0);
            self.send(&[(h, 0)]);
        }
        assert_eq!(t_status(&mut self.t) & status::DEVICE_NEEDS_RESET, 0);
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

/// Guest -> host: the guest connects to a host port and sends `total` bytes; the
/// clock stops when a host thread has read them all from its UNIX socket.
fn vsock_to_host(total: usize) -> Duration {
    let mut v = Vsock::new(CID, None).unwrap();
    let (tx, streams) = mpsc::channel();
    v.listen(
        6000,
        Box::new(move |s| {
            let _ = tx.send(s);
        }),
    );
    let mut g = VsockGuest::new(v);
    g.key = (3000, 6000);
    let h = g.header(op::REQUEST, 0);
    g.send(&[(h, 0)]);
    until("the host to accept", || {
        g.turn();
        g.established
    });
    let mut s = streams.recv_timeout(Duration::from_secs(10)).unwrap();
    let reader: JoinHandle<Instant> = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * KIB];
        let mut got = 0;
        while got < total {
            let n = s.read(&mut buf).unwrap();
            assert_ne!(n, 0, "the stream ended early");
            got += n;
        }
        Instant::now()
    });
    let t0 = Instant::now();
    let mut sent = 0usize;
    until("the host reader", || {
        g.turn();
        let mut batch = Vec::new();
        while batch.len() < usize::from(TX_BATCH) && sent < total {
            let n = (total - sent)
                .min(TX_PAYLOAD as usize)
                .min(g.credit() as usize) as u32;
            if n == 0 {
                break;
            }
            g.tx_cnt = g.tx_cnt.wrapping_add(n);
            sent += n as usize;
            let h = g.header(op::RW, n);
            batch.push((h, n));
        }
        if !batch.is_empty() {
            g.send(&batch);
        }
        reader.is_finished()
    });
    reader.join().unwrap() - t0
}

/// Host -> guest: a host thread writes `total` bytes into the socket the device
/// gave it; the clock stops when the guest has received them all.
fn vsock_from_host(total: usize) -> Duration {
    let mut g = VsockGuest::new(Vsock::new(CID, None).unwrap());
    let mut s = g.t.device_mut::<Vsock>().unwrap().connect(2000).unwrap();
    until("the connection", || {
        g.turn();
        g.established
    });
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || {
        let buf = vec![0xc3u8; 256 * KIB];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            s.write_all(&buf[..n]).unwrap();
            left -= n;
        }
        s
    });
    until("the guest to receive everything", || {
        g.turn();
        g.received >= total
    });
    let d = t0.elapsed();
    drop(writer.join().unwrap());
    d
}

/// The peer: a plain UNIX socketpair, one thread writing, this one reading.
fn socketpair_copy(total: usize) -> Duration {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || {
        let buf = vec![0xc3u8; 256 * KIB];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            a.write_all(&buf[..n]).unwrap();
            left -= n;
        }
    });
    let mut buf = vec![0u8; 256 * KIB];
    let mut got = 0;
    while got < total {
        got += b.read(&mut buf).unwrap();
    }
    let d = t0.elapsed();
    writer.join().unwrap();
    d
}

fn bench_vsock(runs: usize, total: usize) {
    println!(
        "virtio-vsock: one stream of {} MiB, {} KiB packets, guest buf_alloc {} KiB",
        total / MIB,
        TX_PAYLOAD / 1024,
        GUEST_BUF_ALLOC / 1024
    );
    vsock_to_host(total.min(16 * MIB));
    vsock_from_host(total.min(16 * MIB));
    let (mut out, mut inn, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        out.push(mib_per_s(total, vsock_to_host(total)));
        inn.push(mib_per_s(total, vsock_from_host(total)));
        peer.push(mib_per_s(total, socketpair_copy(total)));
    }
    report("vsock guest -> host", out, "socketpair", peer.clone());
    report("vsock host -> guest", inn, "socketpair", peer);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; this bench has no unit tests
    }
    let runs = env_usize("SM_BENCH_RUNS", 5);
    let total = env_usize("SM_BENCH_MIB", 256) * MIB;
    println!(
        "device-model throughput, {runs} runs each (SM_BENCH_RUNS), {} MiB per run (SM_BENCH_MIB)",
        total / MIB
    );
    bench_blk(runs, total);
    bench_vsock(runs, total);
}
