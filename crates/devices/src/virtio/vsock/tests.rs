//! Unit tests of the vsock device, driven through the MMIO transport by the
//! test driver with hand-built descriptor chains.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::connection::{BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use super::packet::shutdown;
use super::*;
use crate::interrupt::test_util::CountingInterrupt;
use crate::virtio::mmio::reg;
use crate::virtio::test_util::{
    desc, guest_memory, read_reg, write_reg, Driver, Ring, DATA_BASE, F_NEXT, F_WRITE, MEM_SIZE,
};
use crate::virtio::{status, IrqMode, MmioTransport};

const CID: u64 = 3;
const QSIZE: u16 = 16;
/// RX buffers: 8 of them, each header + 4 KiB.
const RX_BUFS: u16 = 8;
const RX_BUF_LEN: u32 = HEADER_LEN as u32 + 4096;
const RX_BASE: u64 = DATA_BASE;
/// TX packets are written here (one at a time; the device consumes them
/// synchronously on notify).
const TX_BASE: u64 = 0x4_0000;

struct Rig {
    t: MmioTransport,
    d: Driver,
    rx: Ring,
    tx: Ring,
    ev: Ring,
    rx_seen: u16,
    tx_slot: u16,
}

impl Rig {
    fn new(vsock: Vsock) -> Self {
        let irq = Arc::new(CountingInterrupt::default());
        let mem = guest_memory();
        let t = MmioTransport::new(Box::new(vsock), mem.clone(), irq, IrqMode::Edge).unwrap();
        Self::new_on(t, mem)
    }

    /// A driver bringing up `t` over `mem` (new, or reset by an earlier driver)
    /// afresh.
    fn new_on(mut t: MmioTransport, mem: Arc<GuestMemoryMmap>) -> Self {
        let d = Driver::new(mem);
        let s = d.negotiate(&mut t, VIRTIO_F_VERSION_1).unwrap();
        for q in 0..3 {
            d.setup_queue(&mut t, q, u32::from(QSIZE));
        }
        write_reg(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert_eq!(
            read_reg(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
        let rx = d.ring(RX_QUEUE, QSIZE);
        let tx = d.ring(TX_QUEUE, QSIZE);
        let ev = d.ring(EVENT_QUEUE, QSIZE);
        let mut rig = Self {
            t,
            d,
            rx,
            tx,
            ev,
            rx_seen: 0,
            tx_slot: 0,
        };
        for i in 0..RX_BUFS {
            rig.rx
                .write_desc(i, desc(rx_addr(i), RX_BUF_LEN, F_WRITE, 0));
            rig.rx.publish(i);
        }
        write_reg(&mut rig.t, reg::QUEUE_NOTIFY, u32::from(RX_QUEUE));
        rig
    }

    fn vsock(&mut self) -> &mut Vsock {
        self.t.device_mut::<Vsock>().unwrap()
    }

    fn status(&mut self) -> u32 {
        read_reg(&mut self.t, reg::STATUS)
    }

    /// Puts one packet on the TX queue and notifies.
    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&[desc(TX_BASE, bytes.len() as u32, 0, 0)], &bytes);
    }

    fn send_raw(&mut self, descs: &[virtio_queue::desc::RawDescriptor], bytes: &[u8]) {
        self.d
            .mem()
            .write_slice(bytes, GuestAddress(TX_BASE))
            .unwrap();
        let first = self.tx_slot;
        self.tx_slot = (self.tx_slot + descs.len() as u16) % (QSIZE - 4);
        self.tx.add_chain(first, descs);
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    }

    /// Every packet the device put on the RX queue since the last call; each
    /// buffer is given back to the device.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx() {
            let (id, len) = self.rx.used(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let id = id as u16;
            let mut raw = [0u8; HEADER_LEN];
            self.d
                .mem()
                .read_slice(&mut raw, GuestAddress(rx_addr(id)))
                .unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(len, HEADER_LEN as u32 + hdr.len, "used length");
            let mut data = vec![0; hdr.len as usize];
            self.d
                .mem()
                .read_slice(&mut data, GuestAddress(rx_addr(id) + HEADER_LEN as u64))
                .unwrap();
            out.push((hdr, data));
            self.rx.publish(id);
        }
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, u32::from(RX_QUEUE));
        out
    }

    /// What the event loop does: an event for every host fd.
    fn poll_host(&mut self) {
        let mut fds = Vec::new();
        self.t.host_fds(&mut fds);
        for f in fds {
            self.t.process_event(f.token);
        }
    }

    /// Guest REQUEST from `guest_port` to host `host_port`; returns the reply.
    fn guest_connect(&mut self, guest_port: u32, host_port: u32, buf_alloc: u32) -> Header {
        self.send(
            hdr(op::REQUEST, guest_port, host_port, 0, buf_alloc, 0),
            &[],
        );
        let replies = self.recv();
        assert_eq!(replies.len(), 1, "{replies:?}");
        replies[0].0
    }
}

fn rx_addr(i: u16) -> u64 {
    RX_BASE + u64::from(i) * 0x2000
}

fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// A device whose host port 5000 hands connections to the returned channel.
fn rig_with_listener() -> (Rig, mpsc::Receiver<UnixStream>) {
    let mut v = Vsock::new(CID, None).unwrap();
    let (tx, rx) = mpsc::channel();
    v.listen(
        5000,
        Box::new(move |s| {
            let _ = tx.send(s);
        }),
    );
    (Rig::new(v), rx)
}

fn established() -> (Rig, UnixStream) {
    let (mut rig, streams) = rig_with_listener();
    let reply = rig.guest_connect(1234, 5000, 64 * 1024);
    assert_eq!(reply.op, op::RESPONSE);
    let host = streams.try_recv().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (rig, host)
}

#[test]
fn vsock_config_space_holds_guest_cid() {
    let mut rig = Rig::new(Vsock::new(0x1_2345, None).unwrap());
    let mut b = [0u8; 8];
    crate::BusDevice::read(&mut rig.t, reg::CONFIG, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1_2345);
    assert_eq!(read_reg(&mut rig.t, reg::DEVICE_ID), 19);
}

#[test]
fn vsock_reserved_cid_refused() {
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(cid, None),
            Err(VsockError::InvalidCid(c)) if c == cid
        ));
    }
}

#[test]
fn vsock_guest_request_to_listened_port_gets_response() {
    let (mut rig, streams) = rig_with_listener();
    let reply = rig.guest_connect(1234, 5000, 4096);
    assert_eq!(reply.op, op::RESPONSE);
    assert_eq!((reply.src_cid, reply.dst_cid), (HOST_CID, CID));
    assert_eq!((reply.src_port, reply.dst_port), (5000, 1234));
    assert_eq!(reply.buf_alloc, BUF_ALLOC);
    assert!(streams.try_recv().is_ok(), "handler got the host end");
    assert_eq!(rig.vsock().connection_count(), 1);
}

#[test]
fn vsock_data_flows_both_ways() {
    let (mut rig, mut host) = established();
    rig.send(hdr(op::RW, 1234, 5000, 4, 64 * 1024, 0), b"ping");
    let mut buf = [0; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    host.write_all(b"pong").unwrap();
    rig.poll_host();
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::RW);
    assert_eq!(
        pkts[0].0.fwd_cnt, 4,
        "our fwd_cnt counts what the host took"
    );
    assert_eq!(pkts[0].1, b"pong");
}

#[test]
fn vsock_guest_request_to_unknown_port_gets_rst() {
    let (mut rig, _) = rig_with_listener();
    let reply = rig.guest_connect(1234, 6000, 4096);
    assert_eq!(reply.op, op::RST);
    assert_eq!((reply.src_port, reply.dst_port), (6000, 1234));
    assert_eq!(rig.vsock().connection_count(), 0);
}

#[test]
fn vsock_wrong_cid_dropped_silently() {
    let (mut rig, streams) = rig_with_listener();
    let mut h = hdr(op::REQUEST, 1234, 5000, 0, 4096, 0);
    h.src_cid = 99;
    rig.send(h, &[]);
    let mut h = hdr(op::REQUEST, 1234, 5000, 0, 4096, 0);
    h.dst_cid = 7;
    rig.send(h, &[]);
    assert!(rig.recv().is_empty());
    assert!(streams.try_recv().is_err());
    assert_eq!(rig.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn vsock_seqpacket_type_gets_rst() {
    let (mut rig, streams) = rig_with_listener();
    let mut h = hdr(op::REQUEST, 1234, 5000, 0, 4096, 0);
    h.type_ = 2;
    rig.send(h, &[]);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::RST);
    assert!(streams.try_recv().is_err());
}

#[test]
fn vsock_short_header_dropped() {
    let (mut rig, mut host) = established();
    let bytes = hdr(op::RW, 1234, 5000, 0, 4096, 0).to_bytes();
    rig.send_raw(&[desc(TX_BASE, 43, 0, 0)], &bytes);
    assert_eq!(rig.tx.used_idx(), 2, "chain returned");
    assert!(rig.recv().is_empty());
    assert_eq!(rig.status() & status::DEVICE_NEEDS_RESET, 0);
    host.set_nonblocking(true).unwrap();
    assert!(host.read(&mut [0; 8]).is_err(), "nothing reached the host");
}

#[test]
fn vsock_huge_len_dropped_connection_survives() {
    let (mut rig, mut host) = established();
    let bytes = hdr(op::RW, 1234, 5000, u32::MAX, 4096, 0).to_bytes();
    rig.send_raw(&[desc(TX_BASE, 44, 0, 0)], &bytes);
    let bytes = hdr(op::RW, 1234, 5000, 1000, 4096, 0).to_bytes();
    rig.send_raw(&[desc(TX_BASE, 44 + 10, 0, 0)], &bytes);
    assert!(rig.recv().is_empty());
    rig.send(hdr(op::RW, 1234, 5000, 2, 4096, 0), b"ok");
    let mut buf = [0; 2];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
}

#[test]
fn vsock_descriptor_loop_dropped_without_hang() {
    let (mut rig, _host) = established();
    rig.tx.write_desc(0, desc(TX_BASE, 20, F_NEXT, 1));
    rig.tx.write_desc(1, desc(TX_BASE + 20, 30, F_NEXT, 0));
    rig.tx.publish(0);
    write_reg(&mut rig.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert!(rig.recv().is_empty());
    assert_eq!(rig.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(rig.vsock().connection_count(), 1);
}

#[test]
fn vsock_tx_buffer_outside_memory_dropped() {
    let (mut rig, _host) = established();
    rig.tx.add_chain(0, &[desc(MEM_SIZE - 10, 44, 0, 0)]);
    write_reg(&mut rig.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert!(rig.recv().is_empty());
    assert_eq!(rig.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn vsock_tx_avail_index_jump_needs_reset() {
    let (mut rig, _host) = established();
    rig.tx.set_avail_idx(1000);
    write_reg(&mut rig.t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
    assert_ne!(rig.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn vsock_rw_on_unknown_connection_gets_rst() {
    let (mut rig, _) = rig_with_listener();
    rig.send(hdr(op::RW, 1, 2, 3, 4096, 0), b"abc");
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::RST);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (2, 1));
}

#[test]
fn vsock_rst_for_unknown_connection_not_answered() {
    let (mut rig, _) = rig_with_listener();
    rig.send(hdr(op::RST, 1, 2, 0, 0, 0), &[]);
    assert!(rig.recv().is_empty());
}

#[test]
fn vsock_bad_op_resets_connection() {
    let (mut rig, mut host) = established();
    rig.send(hdr(0x77, 1234, 5000, 0, 4096, 0), &[]);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::RST);
    assert_eq!(rig.vsock().connection_count(), 0);
    assert_eq!(host.read(&mut [0; 4]).unwrap(), 0, "host end closed");
}

#[test]
fn vsock_rx_chain_without_room_returned_empty() {
    let (mut rig, _) = rig_with_listener();
    // Replace the posted RX buffers: the device sees first a too-small one,
    // then a readable one, then a good one.
    rig.rx
        .write_desc(10, desc(RX_BASE + 0x10_000, 10, F_WRITE, 0));
    rig.rx.write_desc(11, desc(RX_BASE + 0x11_000, 100, 0, 0));
    // Drain the good buffers first by sending 8 RSTs.
    for port in 0..u32::from(RX_BUFS) {
        rig.send(hdr(op::RW, port, 9, 0, 0, 0), &[]);
    }
    assert_eq!(rig.rx.used_idx(), RX_BUFS);
    rig.rx_seen = rig.rx.used_idx();
    rig.rx.publish(10);
    rig.rx.publish(11);
    rig.rx.publish(0);
    rig.send(hdr(op::RW, 100, 9, 0, 0, 0), &[]);
    let used = rig.rx.used_idx().wrapping_sub(rig.rx_seen);
    assert_eq!(used, 3);
    assert_eq!(rig.rx.used(rig.rx_seen), (10, 0));
    assert_eq!(rig.rx.used(rig.rx_seen + 1), (11, 0));
    assert_eq!(rig.rx.used(rig.rx_seen + 2), (0, HEADER_LEN as u32));
    assert_eq!(rig.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn vsock_rst_waits_for_rx_buffer() {
    let (mut rig, _) = rig_with_listener();
    for port in 0..u32::from(RX_BUFS) + 3 {
        rig.send(hdr(op::RW, port, 9, 0, 0, 0), &[]);
    }
    // 8 buffers: 8 RSTs now, the other 3 as buffers come back.
    let first = rig.recv();
    let second = rig.recv();
    assert_eq!(first.len() + second.len(), usize::from(RX_BUFS) + 3);
    assert!(first.iter().chain(&second).all(|(h, _)| h.op == op::RST));
}

#[test]
fn vsock_host_data_limited_to_guest_credit() {
    let (mut rig, streams) = rig_with_listener();
    assert_eq!(rig.guest_connect(1234, 5000, 100).op, op::RESPONSE);
    let mut host = streams.try_recv().unwrap();
    host.write_all(&[7; 1000]).unwrap();
    rig.poll_host();
    let got: usize = rig.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 100, "never more than the guest's buf_alloc");
    rig.poll_host();
    assert!(rig.recv().is_empty(), "still no credit");
    // The guest consumed 60: 60 more may go.
    rig.send(hdr(op::CREDIT_UPDATE, 1234, 5000, 0, 100, 60), &[]);
    let got: usize = rig.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 60);
}

#[test]
fn vsock_credit_update_sent_after_host_consumes_threshold() {
    let (mut rig, mut host) = established();
    let chunk = vec![1u8; CREDIT_UPDATE_THRESHOLD as usize];
    rig.send(hdr(op::RW, 1234, 5000, chunk.len() as u32, 4096, 0), &chunk);
    let mut buf = vec![0; chunk.len()];
    host.read_exact(&mut buf).unwrap();
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].0.op, op::CREDIT_UPDATE);
    assert_eq!(pkts[0].0.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
}

#[test]
fn vsock_credit_request_answered() {
    let (mut rig, _host) = established();
    rig.send(hdr(op::CREDIT_REQUEST, 1234, 5000, 0, 4096, 0), &[]);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::CREDIT_UPDATE);
    assert_eq!(pkts[0].0.buf_alloc, BUF_ALLOC);
}

#[test]
fn vsock_guest_exceeding_credit_reset() {
    let (mut rig, _host_kept_unread) = established();
    // Fill the host socket and our buffer: the host never reads.
    let chunk = vec![0u8; 60 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        rig.send(hdr(op::RW, 1234, 5000, chunk.len() as u32, 4096, 0), &chunk);
        if rig.recv().iter().any(|(h, _)| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring our credit is reset");
    assert_eq!(rig.vsock().connection_count(), 0);
}

#[test]
fn vsock_guest_shutdown_send_gives_host_eof_then_full_shutdown_rst() {
    let (mut rig, mut host) = established();
    rig.send(hdr(op::RW, 1234, 5000, 3, 4096, 0), b"end");
    let mut sh = hdr(op::SHUTDOWN, 1234, 5000, 0, 4096, 0);
    sh.flags = shutdown::SEND;
    rig.send(sh, &[]);
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"end");
    // The host can still answer.
    host.write_all(b"ack").unwrap();
    rig.poll_host();
    let pkts = rig.recv();
    assert_eq!(pkts[0].1, b"ack");
    sh.flags = shutdown::SEND | shutdown::RCV;
    rig.send(sh, &[]);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::RST, "clean disconnect answered with RST");
    assert_eq!(rig.vsock().connection_count(), 0);
}

#[test]
fn vsock_host_close_sends_shutdown_send() {
    let (mut rig, host) = established();
    drop(host);
    rig.poll_host();
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].0.op, op::SHUTDOWN);
    assert_eq!(pkts[0].0.flags, shutdown::SEND);
    // The guest closes too: RST, gone.
    let mut sh = hdr(op::SHUTDOWN, 1234, 5000, 0, 4096, 0);
    sh.flags = shutdown::SEND | shutdown::RCV;
    rig.send(sh, &[]);
    assert_eq!(rig.recv()[0].0.op, op::RST);
    assert_eq!(rig.vsock().connection_count(), 0);
}

#[test]
fn vsock_guest_rst_closes_host_stream() {
    let (mut rig, mut host) = established();
    rig.send(hdr(op::RST, 1234, 5000, 0, 4096, 0), &[]);
    assert!(rig.recv().is_empty(), "RST is not answered");
    assert_eq!(rig.vsock().connection_count(), 0);
    assert_eq!(host.read(&mut [0; 4]).unwrap(), 0);
}

#[test]
fn vsock_duplicate_request_resets() {
    let (mut rig, _host) = established();
    let reply = rig.guest_connect(1234, 5000, 4096);
    assert_eq!(reply.op, op::RST);
    assert_eq!(rig.vsock().connection_count(), 0);
}

#[test]
fn vsock_host_connect_sends_request_and_streams_after_response() {
    let mut rig = Rig::new(Vsock::new(CID, None).unwrap());
    let mut host = rig.vsock().connect(1024).unwrap();
    host.write_all(b"early").unwrap();
    rig.poll_host();
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    let req = pkts[0].0;
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(req.dst_port, 1024);
    assert!(req.src_port >= EPHEMERAL_PORT_BASE);
    rig.send(hdr(op::RESPONSE, 1024, req.src_port, 0, 4096, 0), &[]);
    rig.poll_host();
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].1, b"early", "data held until the guest accepted");
}

#[test]
fn vsock_host_connect_refused_closes_stream() {
    let mut rig = Rig::new(Vsock::new(CID, None).unwrap());
    let mut host = rig.vsock().connect(1024).unwrap();
    rig.t.process_event(TOKEN_WAKE); // what the event loop does when woken
    let req = rig.recv()[0].0;
    rig.send(hdr(op::RST, 1024, req.src_port, 0, 0, 0), &[]);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut [0; 4]).unwrap(), 0);
}

#[test]
fn vsock_host_connect_unanswered_is_asked_again_then_given_up() {
    let mut rig = Rig::new(Vsock::new(CID, None).unwrap());
    let mut host = rig.vsock().connect(1024).unwrap();
    assert_eq!(
        rig.t.deadline(),
        None,
        "no deadline before the REQUEST is out"
    );
    let before = std::time::Instant::now();
    rig.t.process_event(TOKEN_WAKE);
    let req = rig.recv()[0].0;
    assert_eq!(req.op, op::REQUEST);
    let mut deadline = rig.t.deadline().expect("a REQUEST out means a deadline");
    assert!(deadline >= before + REQUEST_TIMEOUT);
    // Not yet due: nothing happens.
    rig.vsock()
        .expire_requests(deadline - Duration::from_millis(1));
    rig.t.process_event(TOKEN_WAKE);
    assert!(rig.recv().is_empty());
    // Due: the pair is reset and asked again, until the attempts are used up.
    for _ in 1..REQUEST_ATTEMPTS {
        rig.vsock().expire_requests(deadline);
        rig.t.process_event(TOKEN_WAKE);
        let ops: Vec<(u16, u32, u32)> = rig
            .recv()
            .iter()
            .map(|(h, _)| (h.op, h.src_port, h.dst_port))
            .collect();
        assert_eq!(
            ops,
            [
                (op::RST, req.src_port, 1024),
                (op::REQUEST, req.src_port, 1024)
            ]
        );
        deadline = rig.t.deadline().expect("asked again: a new deadline");
    }
    // The last one unanswered: the guest hears an RST, the host end reads EOF.
    rig.vsock().expire_requests(deadline);
    rig.t.process_event(TOKEN_WAKE);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let rst = pkts[0].0;
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (op::RST, req.src_port, 1024)
    );
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut [0; 4]).unwrap(), 0);
    assert_eq!(rig.t.deadline(), None);
    // A late RESPONSE belongs to no connection: it is answered with an RST.
    rig.send(hdr(op::RESPONSE, 1024, req.src_port, 0, 4096, 0), &[]);
    rig.t.process_event(TOKEN_WAKE);
    assert_eq!(rig.recv()[0].0.op, op::RST);
}

#[test]
fn vsock_host_connect_before_the_driver_is_up_is_served_once_it_is() {
    let mut v = Vsock::new(CID, None).unwrap();
    let mut host = v.connect(1024).unwrap();
    host.write_all(b"early").unwrap();
    let mut rig = Rig::new(v);
    let req = rig.recv()[0].0;
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 1024));
    rig.send(hdr(op::RESPONSE, 1024, req.src_port, 0, 4096, 0), &[]);
    rig.poll_host();
    assert_eq!(rig.recv()[0].1, b"early");
}

#[test]
fn vsock_host_connect_waiting_for_an_answer_survives_a_driver_reset() {
    let mut rig = Rig::new(Vsock::new(CID, None).unwrap());
    let mut host = rig.vsock().connect(1024).unwrap();
    rig.t.process_event(TOKEN_WAKE);
    assert_eq!(rig.recv()[0].0.op, op::REQUEST);
    // The driver resets the device and comes up again (as Linux's probe does).
    write_reg(&mut rig.t, reg::STATUS, 0);
    assert_eq!(rig.vsock().connection_count(), 1);
    assert_eq!(
        rig.t.deadline(),
        None,
        "nothing is out while the driver is down"
    );
    let mem = rig.d.mem();
    let mut rig = Rig::new_on(rig.t, mem);
    let req = rig.recv()[0].0;
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 1024), "asked again");
    rig.send(hdr(op::RESPONSE, 1024, req.src_port, 0, 4096, 0), &[]);
    host.write_all(b"after").unwrap();
    rig.poll_host();
    assert_eq!(rig.recv()[0].1, b"after");
}

#[test]
fn vsock_host_connect_answered_has_no_deadline() {
    let mut rig = Rig::new(Vsock::new(CID, None).unwrap());
    let _host = rig.vsock().connect(1024).unwrap();
    rig.t.process_event(TOKEN_WAKE);
    let req = rig.recv()[0].0;
    rig.send(hdr(op::RESPONSE, 1024, req.src_port, 0, 4096, 0), &[]);
    assert_eq!(rig.t.deadline(), None);
    rig.vsock()
        .expire_requests(std::time::Instant::now() + REQUEST_TIMEOUT * 2);
    assert_eq!(
        rig.vsock().connection_count(),
        1,
        "an established connection stays"
    );
}

#[test]
fn vsock_uds_connect_handshake_gets_ok_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut rig = Rig::new(Vsock::new(CID, Some(&path)).unwrap());
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\nhello").unwrap();
    rig.poll_host(); // accept
    rig.poll_host(); // handshake line
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = pkts[0].0;
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 52));
    rig.send(hdr(op::RESPONSE, 52, req.src_port, 0, 4096, 0), &[]);
    rig.poll_host();
    let pkts = rig.recv();
    assert_eq!(pkts[0].1, b"hello", "bytes after the line are stream data");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = [0u8; 14];
    client.read_exact(&mut line).unwrap();
    assert_eq!(&line, format!("OK {}\n", req.src_port).as_bytes());
}

#[test]
fn vsock_uds_bad_handshake_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut rig = Rig::new(Vsock::new(CID, Some(&path)).unwrap());
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"HELLO there\n").unwrap();
    rig.poll_host();
    rig.poll_host();
    assert!(rig.recv().is_empty());
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(client.read(&mut [0; 4]).unwrap(), 0);
    let mut endless = UnixStream::connect(&path).unwrap();
    endless.write_all(&[b'A'; 100]).unwrap();
    rig.poll_host();
    rig.poll_host();
    endless
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Closed with unread bytes: EOF or a reset, never data or a timeout.
    match endless.read(&mut [0; 4]) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("overlong line not closed: {other:?}"),
    }
}

#[test]
fn vsock_guest_connect_forwarded_to_uds_port_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let fwd = UnixListener::bind(dir.path().join("v.sock_7000")).unwrap();
    let mut rig = Rig::new(Vsock::new(CID, Some(&path)).unwrap());
    assert_eq!(rig.guest_connect(1, 7000, 4096).op, op::RESPONSE);
    let (mut host, _) = fwd.accept().unwrap();
    rig.send(hdr(op::RW, 1, 7000, 2, 4096, 0), b"hi");
    let mut buf = [0; 2];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");
    assert_eq!(rig.guest_connect(1, 7001, 4096).op, op::RST, "nobody there");
}

#[test]
fn vsock_stale_socket_file_replaced_other_file_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(Vsock::new(CID, Some(&path)).is_ok());
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Vsock::new(CID, Some(&file)),
        Err(VsockError::PathInUse { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "the file is intact");
}

#[test]
fn vsock_live_socket_of_someone_else_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let theirs = UnixListener::bind(&path).unwrap();
    assert!(matches!(
        Vsock::new(CID, Some(&path)),
        Err(VsockError::SocketInUse { .. })
    ));
    // Still theirs: a client reaches their listener.
    let _client = UnixStream::connect(&path).unwrap();
    theirs.set_nonblocking(true).unwrap();
    assert!(theirs.accept().is_ok(), "their listener got the connection");
}

#[test]
fn vsock_connection_table_bounded() {
    let mut v = Vsock::new(CID, None).unwrap();
    v.listen(5000, Box::new(drop));
    let mut rig = Rig::new(v);
    let mut rst = 0;
    for port in 0..=MAX_CONNECTIONS as u32 {
        rig.send(hdr(op::REQUEST, port, 5000, 0, 4096, 0), &[]);
        rst += rig.recv().iter().filter(|(h, _)| h.op == op::RST).count();
    }
    assert_eq!(rig.vsock().connection_count(), MAX_CONNECTIONS);
    assert!(rst >= 1, "the request past the bound is refused");
}

#[test]
fn vsock_transport_reset_event_delivered_and_connections_dropped() {
    let (mut rig, mut host) = established();
    rig.ev.write_desc(0, desc(0x7_0000, 4, F_WRITE, 0));
    rig.d
        .mem()
        .write_obj(0xffu32, GuestAddress(0x7_0000))
        .unwrap();
    rig.ev.publish(0);
    write_reg(&mut rig.t, reg::QUEUE_NOTIFY, u32::from(EVENT_QUEUE));
    assert_eq!(rig.ev.used_idx(), 0, "no event yet");

    rig.vsock().reset_transport();
    assert_eq!(rig.vsock().connection_count(), 0);
    assert_eq!(host.read(&mut [0; 4]).unwrap(), 0);
    rig.t.process_event(TOKEN_WAKE);
    assert_eq!(rig.ev.used_idx(), 1);
    assert_eq!(rig.ev.used(0), (0, 4));
    let id: u32 = rig.d.mem().read_obj(GuestAddress(0x7_0000)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert!(!rig.vsock().transport_reset_pending());
}

#[test]
fn vsock_restored_device_owes_transport_reset() {
    let v = Vsock::new(9, None).unwrap();
    let state = v.state();
    let restored = Vsock::from_state(&state, None).unwrap();
    assert_eq!(restored.guest_cid(), 9);
    assert!(restored.transport_reset_pending());
    let json = serde_json::to_string(&state).unwrap();
    assert_eq!(serde_json::from_str::<VsockState>(&json).unwrap(), state);
}

#[test]
fn vsock_driver_reset_drops_connections() {
    let (mut rig, mut host) = established();
    write_reg(&mut rig.t, reg::STATUS, 0);
    assert_eq!(rig.vsock().connection_count(), 0);
    assert_eq!(host.read(&mut [0; 4]).unwrap(), 0);
}

#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl HostWaker for CountingWaker {
    fn wake(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn vsock_waker_called_when_fd_set_changes() {
    let (mut rig, streams) = rig_with_listener();
    let waker = Arc::new(CountingWaker::default());
    rig.t.set_host_waker(waker.clone());
    assert_eq!(rig.guest_connect(1234, 5000, 4096).op, op::RESPONSE);
    assert!(waker.0.load(Ordering::SeqCst) >= 1);
    let mut fds = Vec::new();
    rig.t.host_fds(&mut fds);
    assert_eq!(fds.len(), 1);
    drop(streams);
    let before = waker.0.load(Ordering::SeqCst);
    rig.send(hdr(op::RST, 1234, 5000, 0, 0, 0), &[]);
    assert!(waker.0.load(Ordering::SeqCst) > before);
    fds.clear();
    rig.t.host_fds(&mut fds);
    assert!(fds.is_empty());
}

/// A listener at `path` with room for one pending connection (backlog 0),
/// already taken by the returned client: the next connect finds it full.
fn full_listener(path: &std::path::Path) -> (UnixListener, UnixStream) {
    use rustix::net::{bind, listen, socket, AddressFamily, SocketAddrUnix, SocketType};
    let fd = socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
    bind(&fd, &SocketAddrUnix::new(path).unwrap()).unwrap();
    listen(&fd, 0).unwrap();
    let listener = UnixListener::from(fd);
    let filler = UnixStream::connect(path).unwrap();
    (listener, filler)
}

#[test]
fn vsock_guest_connect_to_a_busy_host_listener_never_blocks_and_completes_later() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, _filler) = full_listener(&dir.path().join("v.sock_6000"));
    let mut rig = Rig::new(Vsock::new(CID, Some(&dir.path().join("v.sock"))).unwrap());
    // A blocking connect would hang here: the listener has no room.
    rig.send(hdr(op::REQUEST, 1234, 6000, 0, 4096, 0), &[]);
    assert!(
        rig.recv().is_empty(),
        "no answer while the host side connects"
    );
    assert!(rig.t.deadline().is_some(), "the retry is timed");
    // The host makes room; the next retry goes through.
    let (_first, _) = listener.accept().unwrap();
    std::thread::sleep(HOST_CONNECT_RETRY);
    rig.t.process_event(TOKEN_WAKE);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
        (op::RESPONSE, 6000, 1234)
    );
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    rig.send(hdr(op::RW, 1234, 6000, 2, 4096, 0), b"hi");
    let mut got = [0u8; 2];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
}

#[test]
fn vsock_guest_connect_to_a_host_listener_that_stays_full_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (_listener, _filler) = full_listener(&dir.path().join("v.sock_6000"));
    let mut rig = Rig::new(Vsock::new(CID, Some(&dir.path().join("v.sock"))).unwrap());
    rig.send(hdr(op::REQUEST, 1234, 6000, 0, 4096, 0), &[]);
    assert!(rig.recv().is_empty());
    let late = std::time::Instant::now() + HOST_CONNECT_TIMEOUT + Duration::from_millis(1);
    rig.vsock().retry_host_connects(late);
    rig.t.process_event(TOKEN_WAKE);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (op::RST, 1234));
    assert_eq!(rig.vsock().connection_count(), 0);
    assert_eq!(rig.t.deadline(), None);
}

#[test]
fn vsock_uds_client_that_connected_during_boot_is_served_on_activation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let v = Vsock::new(CID, Some(&path)).unwrap();
    // Before the driver is up: the event loop does not call the device, so
    // these events are never delivered one by one.
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let mut rig = Rig::new(v);
    let pkts = rig.recv();
    assert_eq!(
        pkts.len(),
        1,
        "the REQUEST goes out on activation: {pkts:?}"
    );
    let req = pkts[0].0;
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 52));
    rig.send(hdr(op::RESPONSE, 52, req.src_port, 0, 4096, 0), &[]);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = [0u8; 14];
    client.read_exact(&mut line).unwrap();
    assert_eq!(&line, format!("OK {}\n", req.src_port).as_bytes());
}
