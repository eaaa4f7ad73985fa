#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::interrupt::test_util::CountingInterrupt;
use crate::virtio::mmio::reg;
use crate::virtio::test_util::{desc, read_reg, write_reg, Driver, DATA_BASE, F_WRITE, MEM_SIZE};
use crate::virtio::{status, IrqMode, MmioTransport};

const MAC: [u8; 6] = [0x02, 0x73, 0x6d, 0x01, 0x02, 0x03];
const Q: u16 = 16;

/// A backend whose behaviour the test scripts.
#[derive(Default)]
struct Script {
    incoming: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    full: bool,
    broken: bool,
}

struct ScriptBackend(Arc<Mutex<Script>>);

impl NetBackend for ScriptBackend {
    fn fd(&self) -> std::os::fd::RawFd {
        -1
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut s = self.0.lock().unwrap();
        if s.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        Ok(s.incoming.pop_front().map(|f| {
            buf[..f.len()].copy_from_slice(&f);
            f.len()
        }))
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        let mut s = self.0.lock().unwrap();
        if s.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if s.full {
            return Ok(false);
        }
        s.sent.push(frame.to_vec());
        Ok(true)
    }
    fn name(&self) -> &str {
        "script"
    }
}

struct Rig {
    t: MmioTransport,
    d: Driver,
    irq: Arc<CountingInterrupt>,
    rx: crate::virtio::test_util::Ring,
    tx: crate::virtio::test_util::Ring,
}

fn rig_with(backend: Box<dyn NetBackend>) -> Rig {
    let irq = Arc::new(CountingInterrupt::default());
    let mem = crate::virtio::test_util::guest_memory();
    let mut t = MmioTransport::new(
        Box::new(Net::new(MAC, backend)),
        mem.clone(),
        irq.clone(),
        IrqMode::Edge,
    )
    .unwrap();
    let d = Driver::new(mem);
    let s = d
        .negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC)
        .unwrap();
    d.setup_queue(&mut t, RX_QUEUE, u32::from(Q));
    d.setup_queue(&mut t, TX_QUEUE, u32::from(Q));
    write_reg(&mut t, reg::STATUS, s | status::DRIVER_OK);
    assert_eq!(
        read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
        0
    );
    let rx = d.ring(RX_QUEUE, Q);
    let tx = d.ring(TX_QUEUE, Q);
    Rig { t, d, irq, rx, tx }
}

fn scripted() -> (Rig, Arc<Mutex<Script>>) {
    let s = Arc::new(Mutex::new(Script::default()));
    (rig_with(Box::new(ScriptBackend(s.clone()))), s)
}

fn frame(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Puts a 12-byte header and `f` in guest memory at `at` and queues a
/// two-descriptor TX chain at table index `idx`.
fn queue_tx(r: &Rig, idx: u16, at: u64, f: &[u8]) {
    r.d.mem()
        .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(at))
        .unwrap();
    let data = at + NET_HDR_LEN as u64;
    r.d.mem().write_slice(f, GuestAddress(data)).unwrap();
    r.tx.add_chain(
        idx,
        &[
            desc(at, NET_HDR_LEN as u32, 0, 0),
            desc(data, f.len() as u32, 0, 0),
        ],
    );
}

fn read_guest(r: &Rig, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    r.d.mem().read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn stats(r: &Rig) -> NetStats {
    r.t.device::<Net>().unwrap().stats()
}

#[test]
fn net_config_space_holds_mac_and_link_up() {
    let (mut r, _) = scripted();
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = read_reg(&mut r.t, reg::CONFIG + i as u64) as u8;
    }
    assert_eq!(mac, MAC);
    assert_eq!(read_reg(&mut r.t, reg::CONFIG + 6) & 0xffff, 1);
    assert_eq!(read_reg(&mut r.t, reg::DEVICE_ID), device_type::NET);
}

#[test]
fn net_tx_frame_reaches_passt_stream_without_header() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    let mut r = rig_with(Box::new(StreamBackend::new(a, "passt").unwrap()));
    let f = frame(60, 1);
    queue_tx(&r, 0, DATA_BASE, &f);
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    let mut got = vec![0u8; 4 + 60];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got[..4], &60u32.to_be_bytes());
    assert_eq!(&got[4..], &f[..]);
    assert_eq!(r.tx.used_idx(), 1);
    assert_eq!(r.tx.used(0), (0, 0));
    assert_eq!(r.irq.edges(), 1);
    assert_eq!(stats(&r).tx_frames, 1);
}

#[test]
fn net_rx_frame_from_passt_stream_lands_with_header() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    let mut r = rig_with(Box::new(StreamBackend::new(a, "passt").unwrap()));
    r.rx.add_chain(0, &[desc(DATA_BASE, 1526, F_WRITE, 0)]);
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(RX_QUEUE));
    let f = frame(98, 7);
    peer.write_all(&98u32.to_be_bytes()).unwrap();
    peer.write_all(&f).unwrap();
    r.t.process_event(0);
    assert_eq!(r.rx.used_idx(), 1);
    assert_eq!(r.rx.used(0), (0, (NET_HDR_LEN + 98) as u32));
    let hdr = read_guest(&r, DATA_BASE, NET_HDR_LEN);
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(read_guest(&r, DATA_BASE + NET_HDR_LEN as u64, 98), f);
    assert_eq!(stats(&r).rx_frames, 1);
}

#[test]
fn net_rx_frame_waits_for_a_buffer_then_arrives_in_order() {
    let (mut r, s) = scripted();
    s.lock()
        .unwrap()
        .incoming
        .extend([frame(64, 1), frame(70, 2)]);
    r.t.process_event(0);
    assert_eq!(r.rx.used_idx(), 0, "no buffers yet: nothing delivered");
    r.rx.add_chain(0, &[desc(DATA_BASE, 2048, F_WRITE, 0)]);
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(RX_QUEUE));
    assert_eq!(r.rx.used_idx(), 1);
    assert_eq!(read_guest(&r, DATA_BASE + 12, 64), frame(64, 1));
    r.rx.add_chain(1, &[desc(DATA_BASE + 4096, 2048, F_WRITE, 0)]);
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(RX_QUEUE));
    assert_eq!(r.rx.used(1), (1, 12 + 70));
    assert_eq!(read_guest(&r, DATA_BASE + 4096 + 12, 70), frame(70, 2));
    assert!(s.lock().unwrap().incoming.is_empty());
}

#[test]
fn net_rx_buffer_smaller_than_frame_drops_frame_not_memory() {
    let (mut r, s) = scripted();
    let guard = DATA_BASE + 100;
    r.d.mem()
        .write_slice(&[0xee; 64], GuestAddress(guard))
        .unwrap();
    r.rx.add_chain(0, &[desc(DATA_BASE, 100, F_WRITE, 0)]);
    r.rx.add_chain(1, &[desc(DATA_BASE + 4096, 2048, F_WRITE, 0)]);
    s.lock()
        .unwrap()
        .incoming
        .extend([frame(1000, 3), frame(50, 4)]);
    r.t.process_event(0);
    assert_eq!(r.rx.used(0), (0, 0), "too small: returned empty");
    assert_eq!(read_guest(&r, guard, 64), vec![0xee; 64], "nothing past it");
    // The dropped frame does not take the next buffer with it.
    assert_eq!(r.rx.used(1), (1, 12 + 50));
    assert_eq!(stats(&r).rx_dropped, 1);
}

#[test]
fn net_rx_chain_with_readable_part_returned_unused() {
    let (mut r, s) = scripted();
    r.rx.add_chain(
        0,
        &[
            desc(DATA_BASE, 64, 0, 0),
            desc(DATA_BASE + 64, 2048, F_WRITE, 0),
        ],
    );
    r.rx.add_chain(2, &[desc(DATA_BASE + 8192, 2048, F_WRITE, 0)]);
    s.lock().unwrap().incoming.push_back(frame(60, 5));
    r.t.process_event(0);
    assert_eq!(r.rx.used(0), (0, 0));
    assert_eq!(r.rx.used(1), (2, 12 + 60));
}

#[test]
fn net_tx_hostile_chains_are_returned_and_counted() {
    let (mut r, s) = scripted();
    // Shorter than the header.
    r.tx.add_chain(0, &[desc(DATA_BASE, 8, 0, 0)]);
    // Header only, no frame.
    r.tx.add_chain(1, &[desc(DATA_BASE, NET_HDR_LEN as u32, 0, 0)]);
    // Out of guest memory.
    r.tx.add_chain(2, &[desc(MEM_SIZE - 16, 4096, 0, 0)]);
    // Longer than any frame.
    r.tx.add_chain(
        3,
        &[desc(
            DATA_BASE,
            (NET_HDR_LEN + MAX_FRAME_LEN + 1) as u32,
            0,
            0,
        )],
    );
    // Write-only where the device must read.
    r.tx.add_chain(4, &[desc(DATA_BASE, 200, F_WRITE, 0)]);
    // A descriptor loop: 5 -> 6 -> 5.
    r.tx.write_desc(5, desc(DATA_BASE, 100, 1, 6));
    r.tx.write_desc(6, desc(DATA_BASE, 100, 1, 5));
    r.tx.publish(5);
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert_eq!(r.tx.used_idx(), 6);
    for i in 0..6 {
        assert_eq!(r.tx.used(i).1, 0);
    }
    assert_eq!(stats(&r).tx_dropped, 6);
    assert!(s.lock().unwrap().sent.is_empty());
    // Still working afterwards.
    queue_tx(&r, 8, DATA_BASE + 8192, &frame(42, 9));
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert_eq!(s.lock().unwrap().sent, vec![frame(42, 9)]);
    assert_eq!(
        read_reg(&mut r.t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
        0
    );
}

#[test]
fn net_tx_backpressure_holds_the_queue_until_backend_drains() {
    let (mut r, s) = scripted();
    s.lock().unwrap().full = true;
    for i in 0..3u16 {
        queue_tx(
            &r,
            i * 2,
            DATA_BASE + u64::from(i) * 4096,
            &frame(100, i as u8),
        );
    }
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    // The first frame is copied and held; the others stay on the ring.
    assert_eq!(r.tx.used_idx(), 1);
    assert!(s.lock().unwrap().sent.is_empty());
    // A notification while still full takes nothing more.
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert_eq!(r.tx.used_idx(), 1);
    s.lock().unwrap().full = false;
    r.t.process_event(0); // the backend fd became writable
    assert_eq!(r.tx.used_idx(), 3);
    assert_eq!(
        s.lock().unwrap().sent,
        vec![frame(100, 0), frame(100, 1), frame(100, 2)]
    );
}

#[test]
fn net_backend_failure_keeps_the_device_alive_and_quiet() {
    let (mut r, s) = scripted();
    s.lock().unwrap().broken = true;
    queue_tx(&r, 0, DATA_BASE, &frame(60, 1));
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert_eq!(r.tx.used_idx(), 1, "the chain still comes back");
    assert!(!r.t.device::<Net>().unwrap().backend_alive());
    queue_tx(&r, 2, DATA_BASE, &frame(60, 2));
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert_eq!(r.tx.used_idx(), 2);
    assert_eq!(stats(&r).tx_dropped, 1);
    let mut fds = Vec::new();
    r.t.host_fds(&mut fds);
    assert!(fds.is_empty(), "a dead backend is not watched");
    assert_eq!(
        read_reg(&mut r.t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
        0
    );
}

#[test]
fn net_notify_before_driver_ok_does_nothing() {
    let s = Arc::new(Mutex::new(Script::default()));
    let irq = Arc::new(CountingInterrupt::default());
    let mem = crate::virtio::test_util::guest_memory();
    let mut t = MmioTransport::new(
        Box::new(Net::new(MAC, Box::new(ScriptBackend(s.clone())))),
        mem.clone(),
        irq.clone(),
        IrqMode::Edge,
    )
    .unwrap();
    let d = Driver::new(mem);
    d.negotiate(&mut t, VIRTIO_F_VERSION_1).unwrap();
    d.setup_queue(&mut t, TX_QUEUE, u32::from(Q));
    let tx = d.ring(TX_QUEUE, Q);
    tx.add_chain(0, &[desc(DATA_BASE, 100, 0, 0)]);
    write_reg(&mut t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert_eq!(tx.used_idx(), 0);
    assert!(s.lock().unwrap().sent.is_empty());
    assert_eq!(irq.edges(), 0);
}

#[test]
fn net_state_round_trips_and_restores_the_mac() {
    let (r, _script) = scripted();
    let state = r.t.device::<Net>().unwrap().state();
    assert_eq!(state.mac, MAC);
    let json = serde_json::to_string(&state).unwrap();
    let decoded: NetState = serde_json::from_str(&json).unwrap();
    assert_eq!(decoded, state);
    let backend = ScriptBackend(Arc::new(Mutex::new(Script::default())));
    let restored = Net::from_state(&decoded, Box::new(backend));
    assert_eq!(restored.mac(), state.mac);
}

#[test]
fn net_egress_denied_syn_never_reaches_the_backend_and_is_answered_in_the_guest() {
    let (mut r, s) = scripted();
    let policy = egress::Policy {
        allow: vec!["192.0.2.1:80".parse().unwrap()],
        deny: Vec::new(),
    };
    r.t.device_mut::<Net>().unwrap().set_egress(policy);
    r.rx.add_chain(0, &[desc(DATA_BASE + 0x8000, 2048, F_WRITE, 0)]);
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(RX_QUEUE));
    // A TCP SYN from 10.0.2.15:40000 to port 80 (allowed) and to 81 (denied).
    let syn = |dport: u16| {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&MAC);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 2, 15]);
        ip[16..20].copy_from_slice(&[192, 0, 2, 1]);
        let t = &mut f[34..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x02;
        f
    };
    queue_tx(&r, 0, DATA_BASE, &syn(80));
    queue_tx(&r, 2, DATA_BASE + 0x1000, &syn(81));
    write_reg(&mut r.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert_eq!(
        s.lock().unwrap().sent,
        vec![syn(80)],
        "only the allowed SYN left"
    );
    assert_eq!(r.tx.used_idx(), 2, "both chains went back");
    // The RST arrived in the guest's receive buffer, from port 81 to 40000.
    assert_eq!(r.rx.used_idx(), 1);
    let rst = read_guest(&r, DATA_BASE + 0x8000 + NET_HDR_LEN as u64, 54);
    assert_eq!(&rst[0..6], &MAC);
    assert_eq!(&rst[34..36], &81u16.to_be_bytes());
    assert_eq!(&rst[36..38], &40000u16.to_be_bytes());
    assert_eq!(rst[34 + 13], 0x14, "RST|ACK");
    let e = r.t.device::<Net>().unwrap().egress_stats();
    assert_eq!((e.passed, e.denied), (1, 1));
}
