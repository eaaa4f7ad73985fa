//! One vsock stream connection between a guest port and a host-side stream: its
//! state, the credit-based flow control of virtio 1.2 §5.10.6.3 in both
//! directions, and the data waiting to be written to the host.
//!
//! Counters are the spec's free-running `u32`s and wrap; every difference is
//! taken with wrapping arithmetic and a guest-supplied value that makes no sense
//! (more in flight than the guest's buffer) reads as "no credit".

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use super::packet::{op, Header, TYPE_STREAM};

/// Our receive buffer per connection (`buf_alloc` we advertise): how much guest
/// data the host side may hold unwritten. The worst case over all connections
/// is `MAX_CONNECTIONS * BUF_ALLOC` (128 MiB), reached only if the guest fills
/// every connection while no host reader drains it.
pub const BUF_ALLOC: u32 = 128 * 1024;
/// Send CREDIT_UPDATE once the host consumed this much since the guest last
/// heard our `fwd_cnt`, so a guest waiting for credit never stalls
/// (§5.10.6.3: the receiver tells the sender when space frees up).
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Where a connection stands (virtio 1.2 §5.10.6.4-§5.10.6.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent or queued, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host listener's backlog was full; the connect is
    /// retried from the event loop until it goes through or time runs out.
    HostConnecting,
    /// Data flows.
    Established,
}

/// Who opened the connection, which decides what the host side hears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A client of the device's UNIX socket that wrote `CONNECT <port>\n`; it gets
    /// `OK <host port>\n` when the guest accepts.
    HostUds,
    /// [`super::Vsock::connect`]: the caller already holds its stream.
    HostApi,
    /// The guest connected to a host port.
    Guest,
}

/// Control packets owed to the guest, sent before any data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingControl {
    /// Host-initiated connection: REQUEST.
    pub request: bool,
    /// Guest-initiated connection accepted: RESPONSE.
    pub response: bool,
    /// The host stream hit EOF: SHUTDOWN(SEND).
    pub shutdown_send: bool,
    /// Credit changed or the guest asked: CREDIT_UPDATE.
    pub credit_update: bool,
}

/// One connection, keyed in the device by (host port, guest port).
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// The event-loop token of `stream`.
    pub token: u32,
    /// Host port (ours).
    pub local_port: u32,
    /// Guest port.
    pub peer_port: u32,
    /// State.
    pub state: ConnState,
    /// Who opened it.
    pub origin: Origin,
    /// What we owe the guest.
    pub control: PendingControl,
    /// Host-initiated, REQUEST sent: when to give up waiting for the answer.
    pub request_deadline: Option<std::time::Instant>,
    /// REQUESTs sent so far for this connection.
    pub request_attempts: u8,
    /// HostConnecting: the listener's address, when to try again, when to give up.
    pub connecting: Option<Connecting>,
    // Host -> guest flow control: the guest's buffer and how much of what we sent
    // it has consumed, as it last told us; what we sent.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    // Guest -> host: what the guest sent, what the host consumed, and the fwd_cnt
    // the guest last heard.
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest bytes not yet written to the host: at most `BUF_ALLOC` (our
    /// credit), in a ring that never holds more, whatever the bytes moved.
    to_host: VecDeque<u8>,
    /// The host stream may have data (edge-triggered: set on an event, cleared on
    /// `WouldBlock`).
    pub host_readable: bool,
    /// The host stream may take data.
    pub host_writable: bool,
    /// The host stream reached EOF (host sends no more).
    pub host_eof: bool,
    /// The guest sent SHUTDOWN(RCV): it reads no more.
    pub guest_shut_rcv: bool,
    /// The guest sent SHUTDOWN(SEND): it writes no more.
    pub guest_shut_send: bool,
    /// The host stream's write side was shut after the guest's SHUTDOWN(SEND).
    host_write_shut: bool,
}

/// A guest connection's host side still connecting to its listener.
#[derive(Debug)]
pub struct Connecting {
    /// The listener's socket address.
    pub addr: rustix::net::SocketAddrUnix,
    /// When to try again.
    pub retry_at: std::time::Instant,
    /// When to give up (and reset the guest's connection).
    pub give_up_at: std::time::Instant,
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than the credit we gave it.
    #[error("guest exceeded its vsock credit ({pending} bytes pending, {len} more sent, {BUF_ALLOC} allowed)")]
    CreditExceeded {
        /// Bytes not yet consumed.
        pending: u32,
        /// Bytes in the packet.
        len: usize,
    },
    /// Writing to the host stream failed (the host closed it).
    #[error("writing to the host side of a vsock connection failed")]
    HostWrite(#[source] io::Error),
}

impl Connection {
    /// A new connection over `stream`.
    pub fn new(
        stream: UnixStream,
        token: u32,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
        origin: Origin,
    ) -> Self {
        Self {
            stream,
            token,
            local_port,
            peer_port,
            state,
            origin,
            control: PendingControl::default(),
            request_deadline: None,
            request_attempts: 0,
            connecting: None,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            host_readable: true,
            host_writable: true,
            host_eof: false,
            guest_shut_rcv: false,
            guest_shut_send: false,
            host_write_shut: false,
        }
    }

    /// Every guest packet carries its `buf_alloc` and `fwd_cnt` (§5.10.6.3).
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// How many bytes we may still send the guest:
    /// `buf_alloc - (tx_cnt - fwd_cnt)`, zero if the guest's numbers are nonsense.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Unconsumed guest bytes held for the host.
    pub fn pending_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// A header for a packet to the guest, carrying our credit. Sending it tells
    /// the guest our current `fwd_cnt`, so a pending credit update is settled.
    pub fn header(&mut self, guest_cid: u64, op: u16, flags: u32, len: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.control.credit_update = false;
        Header {
            src_cid: super::HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next control packet owed, as (op, flags), clearing it.
    pub fn take_control(&mut self) -> Option<(u16, u32)> {
        let c = &mut self.control;
        if std::mem::take(&mut c.request) {
            return Some((op::REQUEST, 0));
        }
        if self.state != ConnState::Established {
            return None;
        }
        if std::mem::take(&mut c.response) {
            return Some((op::RESPONSE, 0));
        }
        if std::mem::take(&mut c.shutdown_send) {
            return Some((op::SHUTDOWN, super::packet::shutdown::SEND));
        }
        if c.credit_update {
            // Cleared by header().
            return Some((op::CREDIT_UPDATE, 0));
        }
        None
    }

    /// Whether there is a control packet to send.
    pub fn has_control(&self) -> bool {
        let c = &self.control;
        c.request
            || (self.state == ConnState::Established
                && (c.response || c.shutdown_send || c.credit_update))
    }

    /// Whether host data should be read and sent now.
    pub fn wants_host_read(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    /// `n` bytes of host data went to the guest.
    pub fn sent_to_guest(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Guest data for the host: checked against our credit, then written to the
    /// host stream as far as it takes, the rest kept.
    pub fn push_from_guest(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let pending = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        let fits = u32::try_from(data.len())
            .ok()
            .and_then(|len| pending.checked_add(len))
            .is_some_and(|total| total <= BUF_ALLOC);
        if !fits {
            return Err(ConnError::CreditExceeded {
                pending,
                len: data.len(),
            });
        }
        // data.len() <= BUF_ALLOC, fits u32.
        self.rx_cnt = self
            .rx_cnt
            .wrapping_add(u32::try_from(data.len()).unwrap_or(0));
        // Written straight through while the host keeps up; only the rest is held.
        let mut data = data;
        if self.to_host.is_empty() {
            let n = write_host(
                &mut self.stream,
                &mut self.host_writable,
                &mut self.fwd_cnt,
                data,
            )?;
            data = &data[n..];
        }
        self.to_host.extend(data);
        self.flush_to_host()
    }

    /// Writes held guest data to the host stream until it would block. Consumed
    /// bytes advance `fwd_cnt` and may owe the guest a credit update. Once the
    /// guest shut its sending side and everything is written, the host stream's
    /// write side is shut so the host reader sees EOF.
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        while self.host_writable && !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            let len = front.len();
            let n = write_host(
                &mut self.stream,
                &mut self.host_writable,
                &mut self.fwd_cnt,
                front,
            )?;
            self.to_host.drain(..n);
            if n < len {
                break;
            }
        }
        if self.to_host.is_empty() {
            // Free the ring of a connection that went quiet.
            self.to_host = VecDeque::new();
            if self.guest_shut_send && !self.host_write_shut {
                self.host_write_shut = true;
                // The host may have closed already; nothing to tell anyone then.
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.control.credit_update = true;
        }
        Ok(())
    }

    /// The guest asked for our credit (CREDIT_REQUEST).
    pub fn request_credit_update(&mut self) {
        self.control.credit_update = true;
    }

    /// Both directions are shut by the guest and all its data reached the host:
    /// time to answer with RST (§5.10.6.6 clean disconnect).
    pub fn guest_closed(&self) -> bool {
        self.guest_shut_rcv && self.guest_shut_send && self.pending_to_host() == 0
    }
}

/// Writes `data` to the host `stream` until it would block (then clears
/// `writable`); returns how much went. Written bytes advance `fwd_cnt`.
fn write_host(
    stream: &mut UnixStream,
    writable: &mut bool,
    fwd_cnt: &mut u32,
    data: &[u8],
) -> Result<usize, ConnError> {
    let mut done = 0;
    while *writable && done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(ConnError::HostWrite(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                done += n;
                // n <= data.len() <= BUF_ALLOC.
                *fwd_cnt = fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => *writable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConnError::HostWrite(e)),
        }
    }
    Ok(done)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::io::Read;

    use super::*;

    fn conn() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let c = Connection::new(ours, 1, 1024, 5000, ConnState::Established, Origin::Guest);
        (c, theirs)
    }

    fn guest_hdr(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    #[test]
    fn peer_credit_follows_buf_alloc_minus_in_flight() {
        let (mut c, _h) = conn();
        assert_eq!(c.peer_credit(), 0, "no credit before the guest says");
        c.update_peer_credit(&guest_hdr(1000, 0));
        c.sent_to_guest(600);
        assert_eq!(c.peer_credit(), 400);
        c.update_peer_credit(&guest_hdr(1000, 500));
        assert_eq!(c.peer_credit(), 900);
    }

    #[test]
    fn peer_credit_wrapping_counters_stay_correct() {
        let (mut c, _h) = conn();
        c.tx_cnt = u32::MAX - 10;
        c.update_peer_credit(&guest_hdr(100, u32::MAX - 10));
        c.sent_to_guest(50);
        assert_eq!(c.peer_credit(), 50);
    }

    #[test]
    fn peer_credit_hostile_fwd_cnt_ahead_gives_zero() {
        let (mut c, _h) = conn();
        c.update_peer_credit(&guest_hdr(1000, 5000));
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.wants_host_read());
    }

    #[test]
    fn push_from_guest_over_credit_refused() {
        let (mut c, _h) = conn();
        c.host_writable = false; // host not draining
        c.push_from_guest(&vec![1; BUF_ALLOC as usize]).unwrap();
        let err = c.push_from_guest(&[1]).unwrap_err();
        assert!(matches!(err, ConnError::CreditExceeded { .. }));
    }

    #[test]
    fn push_from_guest_written_to_host_and_fwd_cnt_advances() {
        let (mut c, mut h) = conn();
        c.push_from_guest(b"hello").unwrap();
        let mut buf = [0; 5];
        h.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(c.fwd_cnt, 5);
        assert_eq!(c.pending_to_host(), 0);
        assert!(!c.control.credit_update, "5 bytes is below the threshold");
    }

    #[test]
    fn held_guest_bytes_stay_bounded_by_the_credit_whatever_the_total() {
        // A steady host reader that never quite catches up: some bytes are
        // always held. 64 MiB move; the ring never holds more than our credit.
        let (mut c, mut h) = conn();
        h.set_nonblocking(true).unwrap();
        let mut sent: u64 = 0;
        let mut got: u64 = 0;
        let mut next_out = 0u8;
        let mut buf = vec![0u8; 48 * 1024];
        let chunk: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        while sent < 64 << 20 {
            // The guest sends what its credit allows, 4 KiB at a time.
            // (4096 is a multiple of 256: every chunk continues the byte count.)
            while c.pending_to_host() + chunk.len() <= BUF_ALLOC as usize {
                c.push_from_guest(&chunk).unwrap();
                sent += chunk.len() as u64;
            }
            assert!(
                c.to_host.capacity() <= 2 * BUF_ALLOC as usize,
                "ring grew to {}",
                c.to_host.capacity()
            );
            // The host reads part of what is there, then the device flushes.
            if let Ok(n) = h.read(&mut buf) {
                for &b in &buf[..n] {
                    assert_eq!(b, next_out, "byte {got} out of order");
                    next_out = next_out.wrapping_add(1);
                    got += 1;
                }
            }
            c.host_writable = true;
            c.flush_to_host().unwrap();
        }
        assert!(
            c.pending_to_host() > 0,
            "the reader never caught up, as intended"
        );
        assert!(got > 32 << 20, "the host read {got} bytes");
    }

    #[test]
    fn consuming_threshold_owes_credit_update_and_header_settles_it() {
        let (mut c, h) = conn();
        c.push_from_guest(&vec![0; CREDIT_UPDATE_THRESHOLD as usize])
            .unwrap();
        drop(h);
        assert!(c.control.credit_update);
        assert_eq!(c.take_control(), Some((op::CREDIT_UPDATE, 0)));
        let hdr = c.header(3, op::CREDIT_UPDATE, 0, 0);
        assert_eq!(hdr.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
        assert_eq!(hdr.buf_alloc, BUF_ALLOC);
        assert!(!c.has_control());
    }

    #[test]
    fn host_closed_stream_write_fails() {
        let (mut c, h) = conn();
        drop(h);
        assert!(matches!(
            c.push_from_guest(b"x"),
            Err(ConnError::HostWrite(_))
        ));
    }

    #[test]
    fn guest_shutdown_send_shuts_host_write_after_flush() {
        let (mut c, mut h) = conn();
        c.guest_shut_send = true;
        c.push_from_guest(b"bye").unwrap();
        let mut all = Vec::new();
        h.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"bye");
    }

    #[test]
    fn local_init_sends_only_request() {
        let (ours, _h) = UnixStream::pair().unwrap();
        let mut c = Connection::new(ours, 1, 7, 8, ConnState::LocalInit, Origin::HostApi);
        c.control.request = true;
        c.control.credit_update = true;
        assert_eq!(c.take_control(), Some((op::REQUEST, 0)));
        assert_eq!(c.take_control(), None);
        assert!(!c.has_control());
    }
}
