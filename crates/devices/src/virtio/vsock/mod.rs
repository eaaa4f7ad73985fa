//! virtio-vsock, the socket device (virtio 1.2 §5.10), with a host side that
//! speaks Firecracker's UNIX-socket convention so existing tools work.
//!
//! # Host side
//! - **Host-initiated**: a client connects to the device's UNIX socket
//!   (`uds_path`), writes `CONNECT <port>\n`, and once the guest accepts reads
//!   `OK <host port>\n` followed by the byte stream of guest port `<port>`. If the
//!   guest refuses, the client's stream is closed. [`Vsock::connect`] does the
//!   same for the VMM itself and returns a [`UnixStream`] (no `OK` line).
//! - **Guest-initiated**: a guest connecting to host port `P` is handed to the
//!   handler registered with [`Vsock::listen`] for `P`, else forwarded to the
//!   UNIX socket `<uds_path>_<P>` if something listens there, else refused (RST).
//!
//! A host-initiated connection waits for the guest: one made before the driver
//! is up (or across a driver reset) sends its REQUEST once the driver is live.
//! One the guest has not answered (RESPONSE or RST) [`REQUEST_TIMEOUT`] after
//! its REQUEST went out is asked again (an RST for the pair, then a new REQUEST),
//! up to [`REQUEST_ATTEMPTS`] times, then given up: the guest gets an RST and the
//! host stream is closed, as after a refusal. A guest can lose a REQUEST: Linux
//! drops the RST it owes one that arrives while its vsock driver is still
//! probing (the transport is not published yet), so without this the host would
//! wait forever for a guest that booted.
//!
//! # Event loop
//! The device owns its host sockets and lists them with
//! [`VirtioDevice::host_fds`]; the VMM's event loop watches them edge-triggered
//! and calls `process_event(token)`. The device reads and writes until a socket
//! would block, remembering which may still have data, so the watched set only
//! changes when a socket opens or closes; then it calls the [`HostWaker`].
//!
//! # Bounds
//! At most [`MAX_CONNECTIONS`] connections (further requests get RST),
//! [`MAX_HANDSHAKES`] UNIX clients that have not yet sent their `CONNECT` line,
//! [`MAX_PENDING_RST`] queued resets (the guest must supply RX buffers to hear
//! more), and [`connection::BUF_ALLOC`] bytes held per connection.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueOwnedT, QueueT};

use super::{
    device_type, walk_chain, DeviceContext, GuestMemoryMmap, HostFd, HostWaker, Segment,
    VirtioDevice, VirtioError, TOKEN_WAKE, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

pub mod connection;
pub mod packet;

use connection::{ConnState, Connection, Origin};
use packet::{op, Header, HEADER_LEN, MAX_PAYLOAD, TYPE_STREAM};

/// The host's CID (virtio 1.2 §5.10.4: `VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// RX queue index: device-to-driver packets.
pub const RX_QUEUE: u16 = 0;
/// TX queue index: driver-to-device packets.
pub const TX_QUEUE: u16 = 1;
/// Event queue index.
pub const EVENT_QUEUE: u16 = 2;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most UNIX clients waiting to send their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Most resets waiting for an RX buffer.
pub const MAX_PENDING_RST: usize = 256;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2 §5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Host ports for host-initiated connections are allocated from here up, far
/// from the well-known ports a guest connects to.
pub const EPHEMERAL_PORT_BASE: u32 = 1 << 30;
/// The longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE_LINE: usize = 32;
/// The token of the UNIX listener.
const LISTENER_TOKEN: u32 = 0;
/// How long the guest has to answer a host-initiated REQUEST (as Firecracker's
/// vsock device gives it).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How many REQUESTs a host-initiated connection sends before it gives up.
pub const REQUEST_ATTEMPTS: u8 = 3;
/// How long a guest connection waits for a host listener whose backlog is
/// full (Linux gives a guest's vsock connect 2 s by default, too).
pub const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Between attempts to connect to a host listener whose backlog is full.
const HOST_CONNECT_RETRY: Duration = Duration::from_millis(5);

/// Building the device failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved (hypervisor, local, host) and `u32::MAX` means "any".
    #[error("guest CID {0} is reserved; use 3 or above (below 4294967295)")]
    InvalidCid(u64),
    /// Binding the host UNIX socket failed.
    #[error("cannot listen on the vsock UNIX socket {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Something that is not a socket is at `uds_path`; we do not delete it.
    #[error("{path} exists and is not a socket; remove it or choose another vsock path")]
    PathInUse {
        /// The path.
        path: PathBuf,
    },
    /// Something listens on the socket at `uds_path` already.
    #[error("{path} is a socket something is listening on; stop it or choose another vsock path")]
    SocketInUse {
        /// The path.
        path: PathBuf,
    },
    /// Creating a socket pair for an in-process connection failed.
    #[error("cannot create a socket pair for a vsock connection")]
    SocketPair(#[source] io::Error),
    /// The connection table is full.
    #[error("the vsock connection table is full ({MAX_CONNECTIONS} connections)")]
    TooManyConnections,
}

/// Snapshot state. Connections are not saved: a restored device tells the guest
/// with a transport reset (§5.10.6.7) and the guest drops its connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
}

/// Handler for guest connections to one host port; gets the host end of the
/// connection. Runs on the thread that processes the guest's request, under the
/// transport lock: hand the stream off (a channel), do not block.
pub type PortHandler = Box<dyn FnMut(UnixStream) + Send>;

/// The host side of a guest connection, as [`Vsock::open_host_side`] found it.
enum HostSide {
    /// Connected (or a handler's stream).
    Ready(UnixStream),
    /// The listener's backlog is full: connect again later.
    Connecting(UnixStream, rustix::net::SocketAddrUnix),
}

/// One non-blocking connect attempt of `stream` to `addr`: `Ok(true)` once
/// connected, `Ok(false)` while the listener has no room (EAGAIN), an error if
/// there is no listener.
fn try_connect(stream: &UnixStream, addr: &rustix::net::SocketAddrUnix) -> io::Result<bool> {
    match rustix::net::connect(stream, addr) {
        Ok(()) => Ok(true),
        // Linux answers a full backlog with EAGAIN; EISCONN: an earlier attempt
        // went through after all.
        Err(
            rustix::io::Errno::AGAIN | rustix::io::Errno::INPROGRESS | rustix::io::Errno::ALREADY,
        ) => Ok(false),
        Err(rustix::io::Errno::ISCONN) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// What an event-loop token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenTarget {
    Handshake,
    Conn(ConnKey),
}

/// (host port, guest port).
type ConnKey = (u32, u32);

#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// An RX chain popped but not yet used.
#[derive(Debug)]
struct RxChain {
    head: u16,
    writable: Vec<Segment>,
    capacity: u64,
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: Option<PathBuf>,
    listener: Option<UnixListener>,
    handlers: HashMap<u32, PortHandler>,
    conns: BTreeMap<ConnKey, Connection>,
    tokens: HashMap<u32, TokenTarget>,
    handshakes: HashMap<u32, Handshake>,
    rst_queue: VecDeque<Header>,
    spare_rx: Option<RxChain>,
    next_token: u32,
    next_ephemeral: u32,
    waker: Option<Arc<dyn HostWaker>>,
    transport_reset_pending: bool,
    active: bool,
    bounce: Vec<u8>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .field("active", &self.active)
            .finish()
    }
}

impl Vsock {
    /// A device giving the guest `guest_cid`. With `uds_path`, it listens there
    /// for host clients (a stale socket file left by a previous run is replaced)
    /// and forwards guest connections to host port `P` to `<uds_path>_<P>`.
    pub fn new(guest_cid: u64, uds_path: Option<&Path>) -> Result<Self, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let listener = uds_path.map(bind_listener).transpose()?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.map(Path::to_path_buf),
            listener,
            handlers: HashMap::new(),
            conns: BTreeMap::new(),
            tokens: HashMap::new(),
            handshakes: HashMap::new(),
            rst_queue: VecDeque::new(),
            spare_rx: None,
            next_token: LISTENER_TOKEN + 1,
            next_ephemeral: EPHEMERAL_PORT_BASE,
            waker: None,
            transport_reset_pending: false,
            active: false,
            bounce: Vec::new(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host UNIX socket, if any.
    pub fn uds_path(&self) -> Option<&Path> {
        self.uds_path.as_deref()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Opens a connection from the host to guest port `port` and returns the
    /// host end. The REQUEST goes out once the driver is live and has RX
    /// buffers; if the guest refuses (nobody listens) or the driver resets the
    /// device first, the stream reads EOF, so callers retry. Bytes written
    /// before the guest accepts wait in the socket.
    pub fn connect(&mut self, port: u32) -> Result<UnixStream, VsockError> {
        let (ours, theirs) = UnixStream::pair().map_err(VsockError::SocketPair)?;
        let token = self.alloc_token();
        self.start_host_conn(ours, token, port, Origin::HostApi)?;
        Ok(theirs)
    }

    /// Routes guest connections to host port `port` to `handler` (instead of the
    /// `<uds_path>_<port>` socket). Replaces an earlier handler of that port.
    pub fn listen(&mut self, port: u32, handler: PortHandler) {
        self.handlers.insert(port, handler);
    }

    /// Removes the handler of `port`.
    pub fn unlisten(&mut self, port: u32) {
        self.handlers.remove(&port);
    }

    /// Drops every connection and tells the guest with
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue (§5.10.6.7), as a
    /// snapshot restore must: the guest's peers are gone. The event is delivered
    /// as soon as the driver has an event buffer.
    pub fn reset_transport(&mut self) {
        self.drop_all_connections();
        self.transport_reset_pending = true;
        self.wake();
    }

    /// Whether a transport-reset event waits for an event buffer.
    pub fn transport_reset_pending(&self) -> bool {
        self.transport_reset_pending
    }

    /// State for a snapshot.
    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
        }
    }

    /// A device restored from `state`; it owes the guest a transport reset.
    pub fn from_state(state: &VsockState, uds_path: Option<&Path>) -> Result<Self, VsockError> {
        let mut v = Self::new(state.guest_cid, uds_path)?;
        v.transport_reset_pending = true;
        Ok(v)
    }

    fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake();
        }
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = match self.next_token.wrapping_add(1) {
                TOKEN_WAKE | LISTENER_TOKEN => LISTENER_TOKEN + 1,
                n => n,
            };
            if !self.tokens.contains_key(&t) {
                return t;
            }
        }
    }

    fn alloc_ephemeral(&mut self, peer_port: u32) -> u32 {
        // The table holds at most MAX_CONNECTIONS keys, so this ends quickly.
        loop {
            let p = self.next_ephemeral;
            self.next_ephemeral = match self.next_ephemeral.checked_add(1) {
                Some(n) if n != u32::MAX => n,
                _ => EPHEMERAL_PORT_BASE,
            };
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn start_host_conn(
        &mut self,
        stream: UnixStream,
        token: u32,
        peer_port: u32,
        origin: Origin,
    ) -> Result<(), VsockError> {
        if self.conns.len() >= MAX_CONNECTIONS {
            return Err(VsockError::TooManyConnections);
        }
        stream
            .set_nonblocking(true)
            .map_err(VsockError::SocketPair)?;
        let local = self.alloc_ephemeral(peer_port);
        let mut conn = Connection::new(
            stream,
            token,
            local,
            peer_port,
            ConnState::LocalInit,
            origin,
        );
        conn.control.request = true;
        self.conns.insert((local, peer_port), conn);
        self.tokens
            .insert(token, TokenTarget::Conn((local, peer_port)));
        self.wake();
        Ok(())
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
            self.wake();
        }
    }

    /// Removes the connection and owes the guest an RST for it.
    fn reset_conn(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            let hdr = conn.header(self.guest_cid, op::RST, 0, 0);
            self.queue_rst(hdr);
        }
        self.remove_conn(key);
    }

    /// Asks again, or gives up, for the host-initiated connections whose
    /// REQUEST the guest has not answered by `now` (see [`REQUEST_TIMEOUT`]).
    fn expire_requests(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == ConnState::LocalInit && c.request_deadline.is_some_and(|d| d <= now)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            let cid = self.guest_cid;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.request_attempts >= REQUEST_ATTEMPTS {
                tracing::debug!(
                    guest_port = key.1,
                    "the guest never answered a vsock connection request; giving up"
                );
                self.reset_conn(key);
                continue;
            }
            // Whatever the guest half-knows of this pair is cleared first.
            let rst = conn.header(cid, op::RST, 0, 0);
            conn.request_deadline = None;
            conn.control.request = true;
            self.queue_rst(rst);
        }
    }

    fn queue_rst(&mut self, hdr: Header) {
        if self.rst_queue.len() < MAX_PENDING_RST {
            self.rst_queue.push_back(hdr);
        } else {
            tracing::debug!("vsock RST queue full; the guest gets no RX buffers");
        }
    }

    /// An RST answering guest packet `hdr` that belongs to no connection.
    fn rst_reply(&mut self, hdr: &Header) {
        if hdr.op == op::RST {
            // Never answer a reset with a reset: two devices would loop.
            return;
        }
        self.queue_rst(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Drops every connection but the host-initiated ones waiting for the
    /// guest's answer, which send their REQUEST again once the driver is live.
    fn drop_guest_connections(&mut self) {
        let gone: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state != ConnState::LocalInit)
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            self.remove_conn(key);
        }
        for c in self.conns.values_mut() {
            c.control = Default::default();
            c.control.request = true;
            c.request_deadline = None;
            c.request_attempts = 0;
        }
        self.rst_queue.clear();
    }

    fn drop_all_connections(&mut self) {
        let had = !self.conns.is_empty() || !self.handshakes.is_empty();
        self.conns.clear();
        self.handshakes.clear();
        self.tokens.clear();
        self.rst_queue.clear();
        if had {
            self.wake();
        }
    }

    // ---- guest -> host ----

    fn handle_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) {
        let buffers = match walk_chain(mem, chain) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "vsock TX chain dropped");
                return;
            }
        };
        match packet::parse_tx(mem, &buffers) {
            Ok(pkt) => self.handle_packet(&pkt.header, &pkt.payload),
            Err(e) => tracing::debug!(error = %e, "vsock TX packet dropped"),
        }
    }

    /// One guest packet (virtio 1.2 §5.10.6.3-§5.10.6.6).
    fn handle_packet(&mut self, hdr: &Header, payload: &[u8]) {
        // §5.10.6.3: packets not from the guest's CID to the host are dropped; a
        // guest cannot speak for another CID.
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock packet with wrong CIDs dropped"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.rst_reply(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == op::REQUEST {
            self.handle_request(hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.rst_reply(hdr);
            return;
        };
        conn.update_peer_credit(hdr);
        match hdr.op {
            op::RESPONSE if conn.state == ConnState::LocalInit => {
                conn.state = ConnState::Established;
                if conn.origin == Origin::HostUds {
                    let line = format!("OK {}\n", conn.local_port);
                    // A fresh socket's buffer takes a dozen bytes; anything else
                    // means the client is gone.
                    if !matches!(conn.stream.write(line.as_bytes()), Ok(n) if n == line.len()) {
                        self.reset_conn(key);
                    }
                }
            }
            op::RW if conn.state == ConnState::Established && !conn.guest_shut_send => {
                if let Err(e) = conn.push_from_guest(payload) {
                    tracing::debug!(error = %e, "vsock connection reset");
                    self.reset_conn(key);
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => conn.request_credit_update(),
            op::SHUTDOWN if conn.state == ConnState::Established => {
                conn.guest_shut_rcv |= hdr.flags & packet::shutdown::RCV != 0;
                conn.guest_shut_send |= hdr.flags & packet::shutdown::SEND != 0;
                if let Err(e) = conn.flush_to_host() {
                    tracing::debug!(error = %e, "vsock connection reset");
                    self.reset_conn(key);
                } else if conn.guest_closed() {
                    self.reset_conn(key);
                }
            }
            op::RST => self.remove_conn(key),
            _ => {
                // A RESPONSE to an established connection, data after SHUTDOWN,
                // an unknown op: protocol violations end the connection.
                tracing::debug!(op = hdr.op, "unexpected vsock packet; connection reset");
                self.reset_conn(key);
            }
        }
    }

    fn handle_request(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            // A second REQUEST on a live connection: the guest's state is not
            // ours; reset both.
            self.reset_conn(key);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.rst_reply(hdr);
            return;
        }
        let (stream, connecting) = match self.open_host_side(hdr.dst_port) {
            Some(HostSide::Ready(s)) => (s, None),
            Some(HostSide::Connecting(s, addr)) => {
                let now = Instant::now();
                let c = connection::Connecting {
                    addr,
                    retry_at: now + HOST_CONNECT_RETRY,
                    give_up_at: now + HOST_CONNECT_TIMEOUT,
                };
                (s, Some(c))
            }
            None => {
                self.rst_reply(hdr);
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            self.rst_reply(hdr);
            return;
        }
        let token = self.alloc_token();
        let state = if connecting.is_some() {
            ConnState::HostConnecting
        } else {
            ConnState::Established
        };
        let mut conn = Connection::new(
            stream,
            token,
            hdr.dst_port,
            hdr.src_port,
            state,
            Origin::Guest,
        );
        conn.update_peer_credit(hdr);
        conn.control.response = connecting.is_none();
        conn.connecting = connecting;
        self.conns.insert(key, conn);
        self.tokens.insert(token, TokenTarget::Conn(key));
        self.wake();
    }

    /// The host end for a guest connection to host port `port`: a handler's
    /// stream, or a non-blocking connect to `<uds_path>_<port>` (which may still
    /// be waiting for room in the listener's backlog: the device thread never
    /// blocks on it).
    fn open_host_side(&mut self, port: u32) -> Option<HostSide> {
        if let Some(handler) = self.handlers.get_mut(&port) {
            let (ours, theirs) = UnixStream::pair()
                .map_err(|e| tracing::warn!(error = %e, "vsock socket pair failed"))
                .ok()?;
            handler(theirs);
            return Some(HostSide::Ready(ours));
        }
        let base = self.uds_path.as_ref()?;
        let mut path = base.clone().into_os_string();
        path.push(format!("_{port}"));
        let started = (|| -> io::Result<HostSide> {
            let addr = rustix::net::SocketAddrUnix::new(Path::new(&path))?;
            let fd = rustix::net::socket(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::STREAM,
                None,
            )?;
            rustix::io::ioctl_fionbio(&fd, true)?;
            let stream = UnixStream::from(fd);
            Ok(match try_connect(&stream, &addr)? {
                true => HostSide::Ready(stream),
                false => HostSide::Connecting(stream, addr),
            })
        })();
        match started {
            Ok(side) => Some(side),
            Err(e) => {
                tracing::debug!(port, error = %e, "no host listener for guest vsock connection");
                None
            }
        }
    }

    /// Retries the connects of guest connections whose host listener was busy,
    /// as due by `now`; one that goes through is answered with RESPONSE, one out
    /// of time (or refused) with RST.
    fn retry_host_connects(&mut self, now: Instant) {
        let due: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.connecting.as_ref().is_some_and(|k| k.retry_at <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let Some(k) = conn.connecting.as_mut() else {
                continue;
            };
            match try_connect(&conn.stream, &k.addr) {
                Ok(true) => {
                    conn.connecting = None;
                    conn.state = ConnState::Established;
                    conn.control.response = true;
                    // Its stream joins the watched set.
                    self.wake();
                }
                Ok(false) if now < k.give_up_at => k.retry_at = now + HOST_CONNECT_RETRY,
                result => {
                    tracing::debug!(
                        host_port = key.0,
                        "the host listener did not take a guest vsock connection: {result:?}"
                    );
                    self.reset_conn(key);
                }
            }
        }
    }

    // ---- host events ----

    fn accept_clients(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES
                        || self.conns.len() >= MAX_CONNECTIONS
                        || stream.set_nonblocking(true).is_err()
                    {
                        tracing::debug!("vsock UNIX client refused: too many connections");
                        continue;
                    }
                    let token = self.alloc_token();
                    self.handshakes.insert(
                        token,
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                    self.tokens.insert(token, TokenTarget::Handshake);
                    self.wake();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!(error = %e, "vsock UNIX socket accept failed");
                    }
                    return;
                }
            }
        }
    }

    /// Reads a client's `CONNECT <port>\n` a byte at a time, so nothing after
    /// the newline (the client's first stream bytes) is consumed.
    fn read_handshake(&mut self, token: u32) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let outcome = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(Some(parse_connect(&hs.line))),
                Ok(_) if hs.line.len() >= MAX_HANDSHAKE_LINE => break Err(()),
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(Some(port))) => {
                if let Some(hs) = self.handshakes.remove(&token) {
                    self.tokens.remove(&token);
                    if let Err(e) = self.start_host_conn(hs.stream, token, port, Origin::HostUds) {
                        tracing::debug!(error = %e, "vsock UNIX client refused");
                        self.wake();
                    }
                }
            }
            Ok(Some(None)) | Err(()) => {
                tracing::debug!("vsock UNIX client sent no valid CONNECT line; closed");
                self.handshakes.remove(&token);
                self.tokens.remove(&token);
                self.wake();
            }
        }
    }

    /// Serves what happened on the host side while the driver was not up: the
    /// event loop does not call an inactive device, and its events are
    /// edge-triggered, so clients that connected (and wrote their `CONNECT`
    /// line) during boot would otherwise wait for an event that never comes.
    fn catch_up(&mut self) {
        self.accept_clients();
        let handshakes: Vec<u32> = self.handshakes.keys().copied().collect();
        for token in handshakes {
            self.read_handshake(token);
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.host_stream_event(key);
        }
    }

    fn host_stream_event(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.host_readable = true;
        conn.host_writable = true;
        if let Err(e) = conn.flush_to_host() {
            tracing::debug!(error = %e, "vsock connection reset");
            self.reset_conn(key);
        } else if conn.guest_closed() {
            self.reset_conn(key);
        }
    }

    // ---- host -> guest ----

    /// Takes an RX chain that can hold at least a header. Unusable chains (no
    /// room for a header, malformed) are returned with length 0.
    fn take_rx(&mut self, ctx: &mut DeviceContext<'_>) -> Result<Option<RxChain>, VirtioError> {
        if let Some(c) = self.spare_rx.take() {
            return Ok(Some(c));
        }
        let Some((mem, queue)) = ctx.queue_mut(RX_QUEUE) else {
            return Ok(None);
        };
        let queue_err = |source| VirtioError::Queue {
            index: RX_QUEUE,
            source,
        };
        loop {
            let next = queue.iter(mem).map_err(queue_err)?.next();
            let Some(chain) = next else {
                // With EVENT_IDX, re-arm and look again for chains that slipped in.
                if queue.enable_notification(mem).map_err(queue_err)? {
                    continue;
                }
                return Ok(None);
            };
            let head = chain.head_index();
            match walk_chain(mem, chain) {
                Ok(b) if b.readable.is_empty() => {
                    let capacity = super::segments_len(&b.writable);
                    if capacity >= HEADER_LEN as u64 {
                        return Ok(Some(RxChain {
                            head,
                            writable: b.writable,
                            capacity,
                        }));
                    }
                }
                _ => {}
            }
            tracing::debug!(head, "unusable vsock RX chain returned empty");
            queue.add_used(mem, head, 0).map_err(queue_err)?;
        }
    }

    fn put_rx(
        ctx: &mut DeviceContext<'_>,
        rx: &RxChain,
        hdr: &Header,
        data: &[u8],
    ) -> Result<(), VirtioError> {
        let Some((mem, queue)) = ctx.queue_mut(RX_QUEUE) else {
            return Ok(());
        };
        let written = packet::scatter(mem, &rx.writable, 0, &hdr.to_bytes())
            + packet::scatter(mem, &rx.writable, HEADER_LEN as u64, data);
        let len = u32::try_from(written).unwrap_or(0);
        queue
            .add_used(mem, rx.head, len)
            .map_err(|source| VirtioError::Queue {
                index: RX_QUEUE,
                source,
            })
    }

    /// Sends everything owed to the guest while it has RX buffers: resets,
    /// then per connection control packets and host data, one packet per
    /// connection per round so busy connections do not starve others.
    fn pump(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
        let mut used = 0usize;
        let result = self.pump_inner(ctx, &mut used);
        if used > 0 {
            ctx.signal_used(RX_QUEUE)?;
        }
        result
    }

    fn pump_inner(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        used: &mut usize,
    ) -> Result<(), VirtioError> {
        if !ctx.queue_ready(RX_QUEUE) {
            return Ok(());
        }
        while let Some(hdr) = self.rst_queue.front().copied() {
            let Some(rx) = self.take_rx(ctx)? else {
                return Ok(());
            };
            Self::put_rx(ctx, &rx, &hdr, &[])?;
            *used += 1;
            self.rst_queue.pop_front();
        }
        loop {
            let mut progress = false;
            let keys: Vec<ConnKey> = self
                .conns
                .iter()
                .filter(|(_, c)| c.has_control() || c.wants_host_read())
                .map(|(k, _)| *k)
                .collect();
            for key in keys {
                let Some(rx) = self.take_rx(ctx)? else {
                    return Ok(());
                };
                match self.send_one(ctx, key, rx)? {
                    Some(rx) => self.spare_rx = Some(rx),
                    None => {
                        *used += 1;
                        progress = true;
                    }
                }
                // Resets queued while reading (host stream errors) go first.
                while let Some(hdr) = self.rst_queue.front().copied() {
                    let Some(rx) = self.take_rx(ctx)? else {
                        return Ok(());
                    };
                    Self::put_rx(ctx, &rx, &hdr, &[])?;
                    *used += 1;
                    progress = true;
                    self.rst_queue.pop_front();
                }
            }
            if !progress {
                return Ok(());
            }
        }
    }

    /// One packet of connection `key` into `rx`. Gives `rx` back if nothing was
    /// sent.
    fn send_one(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        key: ConnKey,
        rx: RxChain,
    ) -> Result<Option<RxChain>, VirtioError> {
        let cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else {
            return Ok(Some(rx));
        };
        if let Some((op, flags)) = conn.take_control() {
            if op == op::REQUEST {
                conn.request_attempts = conn.request_attempts.saturating_add(1);
                conn.request_deadline = Some(Instant::now() + REQUEST_TIMEOUT);
                // This may run on a vCPU thread (a queue notify by MMIO exit):
                // the loop learns the new deadline when woken.
                if let Some(w) = &self.waker {
                    w.wake();
                }
            }
            let hdr = conn.header(cid, op, flags, 0);
            Self::put_rx(ctx, &rx, &hdr, &[])?;
            return Ok(None);
        }
        if !conn.wants_host_read() {
            return Ok(Some(rx));
        }
        let room = rx.capacity - HEADER_LEN as u64;
        let max = u64::from(conn.peer_credit().min(MAX_PAYLOAD)).min(room);
        // max <= MAX_PAYLOAD.
        let max = usize::try_from(max).unwrap_or(0);
        if max == 0 {
            return Ok(Some(rx));
        }
        if self.bounce.len() < max {
            self.bounce.resize(max, 0);
        }
        let result = conn.stream.read(&mut self.bounce[..max]);
        match result {
            Ok(0) => {
                // The host sends no more: SHUTDOWN(SEND), in this buffer.
                conn.host_eof = true;
                conn.control.shutdown_send = true;
                match conn.take_control() {
                    Some((op, flags)) => {
                        let hdr = conn.header(cid, op, flags, 0);
                        Self::put_rx(ctx, &rx, &hdr, &[])?;
                        Ok(None)
                    }
                    None => Ok(Some(rx)),
                }
            }
            Ok(n) => {
                let len = u32::try_from(n).unwrap_or(0);
                conn.sent_to_guest(len);
                let hdr = conn.header(cid, op::RW, 0, len);
                Self::put_rx(ctx, &rx, &hdr, &self.bounce[..n])?;
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.host_readable = false;
                Ok(Some(rx))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Some(rx)),
            Err(e) => {
                tracing::debug!(error = %e, "reading the host side of a vsock connection failed");
                self.reset_conn(key);
                Ok(Some(rx))
            }
        }
    }

    /// Delivers a pending transport-reset event (§5.10.6.7).
    fn deliver_event(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
        if !self.transport_reset_pending {
            return Ok(());
        }
        let Some((mem, queue)) = ctx.queue_mut(EVENT_QUEUE) else {
            return Ok(());
        };
        let queue_err = |source| VirtioError::Queue {
            index: EVENT_QUEUE,
            source,
        };
        loop {
            let next = queue.iter(mem).map_err(queue_err)?.next();
            let Some(chain) = next else {
                queue.enable_notification(mem).map_err(queue_err)?;
                return Ok(());
            };
            let head = chain.head_index();
            let written = match walk_chain(mem, chain) {
                Ok(b) if super::segments_len(&b.writable) >= 4 => {
                    packet::scatter(mem, &b.writable, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())
                }
                _ => 0,
            };
            queue
                .add_used(mem, head, u32::try_from(written).unwrap_or(0))
                .map_err(queue_err)?;
            if written == 4 {
                self.transport_reset_pending = false;
                break;
            }
        }
        ctx.signal_used(EVENT_QUEUE)
    }
}

fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VsockError::PathInUse {
                path: path.to_path_buf(),
            });
        }
        // A live socket belongs to someone else (another VMM, another tool):
        // never taken over. One nobody listens on is a leftover of an earlier
        // VMM, and bind fails while it exists.
        if UnixStream::connect(path).is_ok() {
            return Err(VsockError::SocketInUse {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// `CONNECT <port>` (Firecracker's host-initiated handshake), surrounding
/// whitespace allowed.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    let (Some(verb), Some(port), None) = (words.next(), words.next(), words.next()) else {
        return None;
    };
    if !verb.eq_ignore_ascii_case("CONNECT") {
        return None;
    }
    port.parse().ok()
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    }

    /// `struct virtio_vsock_config { le64 guest_cid; }` (§5.10.4).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
        for index in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
            if !ctx.queue_ready(index) {
                return Err(VirtioError::QueueNotReady { index });
            }
        }
        self.active = true;
        self.catch_up();
        self.deliver_event(ctx)?;
        self.pump(ctx)
    }

    fn process_queue(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        index: u16,
    ) -> Result<(), VirtioError> {
        match index {
            TX_QUEUE => {
                let mem = ctx.mem();
                ctx.drain_queue(TX_QUEUE, |chain| {
                    self.handle_tx_chain(mem, chain);
                    0
                })?;
                self.pump(ctx)
            }
            RX_QUEUE => self.pump(ctx),
            EVENT_QUEUE => self.deliver_event(ctx),
            _ => Ok(()),
        }
    }

    fn process_event(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        token: u32,
    ) -> Result<(), VirtioError> {
        match token {
            TOKEN_WAKE => {
                let now = Instant::now();
                self.expire_requests(now);
                self.retry_host_connects(now);
                self.deliver_event(ctx)?;
            }
            LISTENER_TOKEN => self.accept_clients(),
            t => match self.tokens.get(&t).copied() {
                Some(TokenTarget::Handshake) => self.read_handshake(t),
                Some(TokenTarget::Conn(key)) => self.host_stream_event(key),
                None => {}
            },
        }
        self.pump(ctx)
    }

    fn host_fds(&self, out: &mut Vec<HostFd>) {
        if let Some(l) = &self.listener {
            out.push(HostFd {
                fd: l.as_raw_fd(),
                token: LISTENER_TOKEN,
            });
        }
        for (token, hs) in &self.handshakes {
            out.push(HostFd {
                fd: hs.stream.as_raw_fd(),
                token: *token,
            });
        }
        // A socket still connecting has nothing to say until it is connected.
        for conn in self.conns.values().filter(|c| c.connecting.is_none()) {
            out.push(HostFd {
                fd: conn.stream.as_raw_fd(),
                token: conn.token,
            });
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| match c.state {
                ConnState::LocalInit => c.request_deadline,
                ConnState::HostConnecting => c.connecting.as_ref().map(|k| k.retry_at),
                ConnState::Established => None,
            })
            .min()
    }

    fn set_host_waker(&mut self, waker: Arc<dyn HostWaker>) {
        self.waker = Some(waker);
    }

    /// The driver reset the device: every connection the guest knew of is gone
    /// (§5.10.6.7 says the same of a transport reset). Host-initiated connections
    /// still waiting for an answer stay and ask the next driver; host listeners
    /// and handlers stay.
    fn reset(&mut self) {
        self.drop_guest_connections();
        self.spare_rx = None;
        self.transport_reset_pending = false;
        self.active = false;
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests;
