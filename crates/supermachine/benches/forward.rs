//! The host side of a published port, without a guest: a host TCP client ->
//! `publish::serve` (the code behind `run -p`: accept, `Forward` to the guest
//! agent's forward port, splice) -> the virtio-vsock device model -> a guest
//! simulated in this process (split rings driven by hand, as the devices crate's
//! throughput bench does) that answers `Forward` as guest-init does and then
//! echoes, or streams a bulk response. Beside it, in the same run: a plain
//! loopback TCP proxy (accept, connect to a backend, two copy threads) in front
//! of the same echo and bulk servers speaking TCP.
//!
//! Prints medians over N runs (default 5, `SM_BENCH_RUNS`):
//! - 1 KiB request/response round trips on one connection (`SM_BENCH_RR`, default
//!   5000 per run): requests/s and the p99 round trip;
//! - a bulk download of `SM_BENCH_MIB` MiB (default 128) on one connection: MiB/s.
//!
//! What a real guest adds (exits, its own TCP stack, guest-init's splice) is in
//! `guest_throughput`, on hosts with hardware virtualization.
//!
//! Run: `cargo bench -p supermachine --bench forward`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_protocol::{encode_frame, FrameDecoder, Message, CONTROL_STREAM, FORWARD_PORT};
use devices::virtio::mmio::{reg, MmioTransport};
use devices::virtio::vsock::packet::{op, shutdown, Header, HEADER_LEN, TYPE_STREAM};
use devices::virtio::vsock::{Vsock, HOST_CID};
use devices::virtio::GuestMemoryMmap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use supermachine::publish::{self, Bound, HostEnd, Publish};
use vm_memory::{Bytes, GuestAddress};

#[path = "../../devices/benches/common/stats.rs"]
mod stats;
use stats::{env_usize, mib_per_s, report, stats};
#[path = "../../devices/benches/common/driver.rs"]
mod driver;
use driver::{bring_up, guest_memory, w, Ring};

const MIB: usize = 1 << 20;
const CID: u64 = 3;
/// The simulated guest's services (as guest ports a `-p` names).
const ECHO_PORT: u16 = 7;
const BULK_PORT: u16 = 19;
/// Request and response size of the round trips.
const RR_LEN: usize = 1024;
/// RX buffers the guest keeps posted (Linux posts 4 KiB + header; bigger
/// buffers show the host path's cost, not the split).
const RX_BUFS: u16 = 128;
const RX_PAYLOAD: u32 = 64 * 1024;
/// Largest RW payload the guest sends, and packets per TX notification.
const TX_PAYLOAD: u32 = 64 * 1024;
const TX_BATCH: u16 = 32;
/// The guest's receive buffer per connection (Linux's default `buf_alloc`).
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// Guest memory layout: TX headers, RX buffers, TX payloads.
const SMALL: u64 = 0x10_0000;
const RX_BASE: u64 = 0x40_0000;
const TX_DATA: u64 = RX_BASE + 32 * MIB as u64;

fn rx_addr(i: u16) -> u64 {
    RX_BASE + u64::from(i) * (HEADER_LEN as u64 + u64::from(RX_PAYLOAD))
}

// ---- the simulated guest ----

/// What a guest connection does once its `Forward` has been answered.
enum Service {
    /// Waiting for the host's `Forward` frame.
    Handshake(FrameDecoder),
    Echo,
    /// Bytes of the bulk response still to send.
    Bulk(usize),
}

/// One guest stream (virtio 1.2 §5.10.6): credit both ways and what the guest
/// application has to send.
struct Conn {
    service: Service,
    out: VecDeque<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_sent: u32,
    /// A SHUTDOWN went out (the bulk response is complete).
    shut: bool,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// guest-init's forward port and the services behind it, on a vsock device
/// the bench drives: host fds through mio (edge-triggered, as the VMM's event
/// loop watches them), every used RX buffer read and posted again.
struct SimGuest {
    transport: Arc<Mutex<MmioTransport>>,
    mem: Arc<GuestMemoryMmap>,
    rx: Ring,
    tx: Ring,
    conns: HashMap<(u32, u32), Conn>,
    bulk_len: usize,
    /// Packets to send this turn: (header, payload).
    pending: Vec<(Header, Vec<u8>)>,
}

impl SimGuest {
    fn new(bulk_len: usize) -> Self {
        let mem = guest_memory();
        let mut t = bring_up(Box::new(Vsock::new(CID, None).unwrap()), &mem, 0);
        let mut rx = Ring::new(&mem, 0);
        for i in 0..RX_BUFS {
            rx.write_desc(i, rx_addr(i), HEADER_LEN as u32 + RX_PAYLOAD, 2, 0);
            rx.push(i);
        }
        rx.flush();
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        Self {
            transport: Arc::new(Mutex::new(t)),
            tx: Ring::new(&mem, 1),
            rx,
            mem,
            conns: HashMap::new(),
            bulk_len,
            pending: Vec::new(),
        }
    }

    fn header(c: &mut Conn, key: (u32, u32), op: u16, len: u32, flags: u32) -> Header {
        c.last_fwd_sent = c.fwd_cnt;
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        }
    }

    /// One round: host events, received packets, then what the guest sends.
    /// `true` if anything moved.
    fn turn(&mut self, fds: &mut Vec<devices::virtio::HostFd>) -> bool {
        let transport = self.transport.clone();
        let mut t = transport.lock().unwrap();
        fds.clear();
        t.host_fds(fds);
        for f in fds.iter() {
            t.process_event(f.token);
        }
        let mut moved = false;
        let mut any_rx = false;
        while let Some((id, _)) = self.rx.pop_used() {
            any_rx = true;
            moved = true;
            let mut raw = [0u8; HEADER_LEN];
            self.mem
                .read_slice(&mut raw, GuestAddress(rx_addr(id)))
                .unwrap();
            let h = Header::from_bytes(&raw);
            let mut payload = vec![0u8; h.len.min(RX_PAYLOAD) as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(rx_addr(id) + HEADER_LEN as u64))
                .unwrap();
            self.rx.push(id);
            self.receive(&h, &payload);
        }
        if any_rx {
            self.rx.flush();
            w(&mut t, reg::QUEUE_NOTIFY, 0);
        }
        self.produce();
        while !self.pending.is_empty() {
            let n = self.pending.len().min(usize::from(TX_BATCH));
            let batch: Vec<_> = self.pending.drain(..n).collect();
            self.send(&mut t, &batch);
            moved = true;
        }
        moved
    }

    fn receive(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            let mut c = Conn {
                service: Service::Handshake(FrameDecoder::new()),
                out: VecDeque::new(),
                peer_buf_alloc: h.buf_alloc,
                peer_fwd_cnt: h.fwd_cnt,
                tx_cnt: 0,
                fwd_cnt: 0,
                last_fwd_sent: 0,
                shut: false,
            };
            let reply = if h.dst_port == FORWARD_PORT {
                op::RESPONSE
            } else {
                op::RST
            };
            let hdr = Self::header(&mut c, key, reply, 0, 0);
            self.pending.push((hdr, Vec::new()));
            if reply == op::RESPONSE {
                self.conns.insert(key, c);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RW => {
                // The application reads it at once.
                c.fwd_cnt = c.fwd_cnt.wrapping_add(payload.len() as u32);
                match &mut c.service {
                    Service::Handshake(dec) => {
                        let mut input = payload;
                        let frame = dec.decode(&mut input).expect("a Forward frame");
                        let rest = input.to_vec();
                        if let Some(raw) = frame {
                            let Message::Forward { port } = raw.to_frame().unwrap().message else {
                                panic!("the host sent something else than Forward");
                            };
                            let mut f = Vec::new();
                            encode_frame(CONTROL_STREAM, &Message::Forwarding, &mut f).unwrap();
                            c.out.extend(f);
                            c.service = match port {
                                ECHO_PORT => Service::Echo,
                                BULK_PORT => Service::Bulk(self.bulk_len),
                                other => panic!("no service on guest port {other}"),
                            };
                            if matches!(c.service, Service::Echo) {
                                c.out.extend(rest);
                            }
                        }
                    }
                    Service::Echo => c.out.extend(payload),
                    Service::Bulk(_) => {}
                }
            }
            op::CREDIT_REQUEST => {
                let hdr = Self::header(c, key, op::CREDIT_UPDATE, 0, 0);
                self.pending.push((hdr, Vec::new()));
            }
            op::SHUTDOWN => {
                // The host is done: end the stream.
                let hdr = Self::header(c, key, op::RST, 0, 0);
                self.pending.push((hdr, Vec::new()));
                self.conns.remove(&key);
            }
            op::RST => {
                self.conns.remove(&key);
            }
            _ => {}
        }
    }

    /// What every connection may send now, within its peer's credit.
    fn produce(&mut self) {
        for (&key, c) in &mut self.conns {
            loop {
                if self.pending.len() >= usize::from(TX_BATCH) * 4 {
                    return;
                }
                let room = c.credit().min(TX_PAYLOAD) as usize;
                let queued = c.out.len();
                let bulk = match c.service {
                    Service::Bulk(left) if queued == 0 => left,
                    _ => 0,
                };
                let n = room.min(if queued > 0 { queued } else { bulk });
                if n == 0 {
                    break;
                }
                let data: Vec<u8> = if queued > 0 {
                    c.out.drain(..n).collect()
                } else {
                    if let Service::Bulk(left) = &mut c.service {
                        *left -= n;
                    }
                    vec![0x5a; n]
                };
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                let hdr = Self::header(c, key, op::RW, n as u32, 0);
                self.pending.push((hdr, data));
            }
            if matches!(c.service, Service::Bulk(0)) && c.out.is_empty() && !c.shut {
                c.shut = true;
                let hdr = Self::header(c, key, op::SHUTDOWN, 0, shutdown::RCV | shutdown::SEND);
                self.pending.push((hdr, Vec::new()));
            }
            if c.fwd_cnt.wrapping_sub(c.last_fwd_sent) >= GUEST_BUF_ALLOC / 4 {
                let hdr = Self::header(c, key, op::CREDIT_UPDATE, 0, 0);
                self.pending.push((hdr, Vec::new()));
            }
        }
    }

    /// Queues `packets` on TX and notifies once; the device consumes them
    /// during the notification.
    fn send(&mut self, t: &mut MmioTransport, packets: &[(Header, Vec<u8>)]) {
        for (n, (h, data)) in packets.iter().enumerate() {
            let n = n as u16;
            let hdr_addr = SMALL + 64 * u64::from(n);
            let data_addr = TX_DATA + u64::from(n) * u64::from(TX_PAYLOAD);
            self.mem
                .write_slice(&h.to_bytes(), GuestAddress(hdr_addr))
                .unwrap();
            if data.is_empty() {
                self.tx.write_desc(2 * n, hdr_addr, HEADER_LEN as u32, 0, 0);
            } else {
                self.mem.write_slice(data, GuestAddress(data_addr)).unwrap();
                self.tx
                    .write_desc(2 * n, hdr_addr, HEADER_LEN as u32, 1, 2 * n + 1);
                self.tx
                    .write_desc(2 * n + 1, data_addr, data.len() as u32, 0, 0);
            }
            self.tx.push(2 * n);
        }
        self.tx.flush();
        w(t, reg::QUEUE_NOTIFY, 1);
        for _ in packets {
            self.tx.pop_used().expect("the device consumed TX");
        }
    }
}

/// Runs `guest` until `stop`: a turn whenever a host fd is ready (or at once
/// while packets move), watching every fd the device lists.
fn drive(mut guest: SimGuest, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(64);
        let mut fds = Vec::new();
        let mut watched: HashMap<RawFd, u32> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            let moved = guest.turn(&mut fds);
            for f in &fds {
                if watched.get(&f.fd) != Some(&f.token) {
                    // A new fd, or a number reused by a new connection (epoll
                    // dropped the old one when it closed).
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    let token = Token(f.fd as usize);
                    if poll
                        .registry()
                        .register(&mut SourceFd(&f.fd), token, interest)
                        .is_err()
                    {
                        let _ = poll
                            .registry()
                            .reregister(&mut SourceFd(&f.fd), token, interest);
                    }
                    watched.insert(f.fd, f.token);
                }
            }
            watched.retain(|fd, _| fds.iter().any(|f| f.fd == *fd));
            if !moved {
                let _ = poll.poll(&mut events, Some(Duration::from_millis(1)));
            }
        }
    })
}

// ---- the peer: a loopback TCP proxy in front of TCP servers ----

fn echo_server(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn bulk_server(mut s: TcpStream, len: usize) {
    let buf = vec![0x5au8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
        left -= n;
    }
}

/// Serves each connection of `l` with `f` on a thread of its own.
fn serve_tcp(l: TcpListener, f: impl Fn(TcpStream) + Send + Sync + 'static) {
    let f = Arc::new(f);
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            let _ = s.set_nodelay(true);
            let f = f.clone();
            std::thread::spawn(move || f(s));
        }
    });
}

/// A plain TCP proxy on a free loopback port in front of `backend`: accept,
/// connect, one copy thread per direction, half-closes passed on.
fn tcp_proxy(backend: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    serve_tcp(l, move |client| {
        let server = TcpStream::connect(backend).unwrap();
        let _ = server.set_nodelay(true);
        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut c_in, &mut s_out);
            let _ = s_out.shutdown(Shutdown::Write);
        });
        let (mut s_in, mut c_out) = (server, client);
        let _ = std::io::copy(&mut s_in, &mut c_out);
        let _ = c_out.shutdown(Shutdown::Write);
        let _ = up.join();
    });
    addr
}

// ---- the client ----

/// `n` round trips of [`RR_LEN`] bytes on one connection: (requests/s, p99
/// round trip in µs).
fn round_trips(addr: SocketAddr, n: usize) -> (f64, f64) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let req = vec![0xa5u8; RR_LEN];
    let mut resp = vec![0u8; RR_LEN];
    // The first answer includes the connection's setup to the guest.
    s.write_all(&req).unwrap();
    s.read_exact(&mut resp).unwrap();
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&req).unwrap();
        s.read_exact(&mut resp).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let rps = n as f64 / t0.elapsed().as_secs_f64();
    assert_eq!(resp, req, "the echo came back changed");
    lat.sort_by(f64::total_cmp);
    (rps, lat[(lat.len() * 99 / 100).min(lat.len() - 1)])
}

/// Reads the whole bulk response: its duration.
fn download(addr: SocketAddr, len: usize) -> Duration {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, len, "the download ended early");
    t0.elapsed()
}

fn line(what: &str, ours: Vec<f64>, unit: &str, peer: Vec<f64>) {
    let (m, lo, hi) = stats(ours);
    let (pm, plo, phi) = stats(peer);
    println!(
        "{what:<34} {m:>8.0} {unit} (min {lo:.0}, max {hi:.0})   loopback TCP proxy: {pm:.0} {unit} \
         (min {plo:.0}, max {phi:.0})   ratio {:.2}",
        m / pm
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; this bench has no unit tests
    }
    let runs = env_usize("SM_BENCH_RUNS", 5);
    let rr = env_usize("SM_BENCH_RR", 5000);
    let bulk = env_usize("SM_BENCH_MIB", 128) * MIB;

    let guest = SimGuest::new(bulk);
    let vsock = runner::virtio::VsockHandle::new(guest.transport.clone()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let driver = drive(guest, stop.clone());
    let free = HostEnd::Tcp("127.0.0.1:0".parse().unwrap());
    let ports = [ECHO_PORT, BULK_PORT].map(|guest_port| Publish {
        host: free.clone(),
        guest_port,
        tls: false,
    });
    let bound = Arc::new(Bound::bind(&ports, None).unwrap());
    let vm = runner::vmm::StopHandle::detached();
    let publishers = publish::serve(&bound, &vsock, &vm).unwrap();
    let addrs = bound.tcp_addrs();
    let (pub_echo, pub_bulk) = (addrs[0].0, addrs[1].0);

    let backend_echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_bulk = TcpListener::bind("127.0.0.1:0").unwrap();
    let (be, bb) = (
        backend_echo.local_addr().unwrap(),
        backend_bulk.local_addr().unwrap(),
    );
    serve_tcp(backend_echo, echo_server);
    serve_tcp(backend_bulk, move |s| bulk_server(s, bulk));
    let (proxy_echo, proxy_bulk) = (tcp_proxy(be), tcp_proxy(bb));

    println!(
        "published-port forwarding on the host (host TCP -> publish -> vsock device -> simulated guest), \
         {runs} runs (SM_BENCH_RUNS): {rr} round trips of {RR_LEN} B (SM_BENCH_RR), {} MiB down (SM_BENCH_MIB)",
        bulk / MIB
    );
    // Warm both paths once.
    round_trips(pub_echo, 100);
    round_trips(proxy_echo, 100);
    let (mut rps, mut p99, mut mbs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut peer_rps, mut peer_p99, mut peer_mbs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (r, p) = round_trips(pub_echo, rr);
        rps.push(r);
        p99.push(p);
        let (r, p) = round_trips(proxy_echo, rr);
        peer_rps.push(r);
        peer_p99.push(p);
        mbs.push(mib_per_s(bulk, download(pub_bulk, bulk)));
        peer_mbs.push(mib_per_s(bulk, download(proxy_bulk, bulk)));
    }
    line("1 KiB request/response", rps, "req/s", peer_rps);
    line("1 KiB request/response p99", p99, "us", peer_p99);
    report("bulk download", mbs, "loopback TCP proxy", peer_mbs);

    vm.stop();
    for t in publishers {
        t.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    driver.join().unwrap();
}
