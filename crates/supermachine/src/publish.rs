//! Published ports (`run -p`): a host listener (TCP, or a UNIX socket) whose
//! every connection is carried over virtio-vsock to the guest agent's
//! [`FORWARD_PORT`], which connects it to the guest port on the guest's
//! loopback (docs/agent-protocol.md, "Published ports"). No TAP, no root, the
//! same on every backend.
//!
//! Each connection has two threads with blocking I/O, one per direction: a
//! slow client stops the guest through vsock credit, a slow guest stops the
//! client through TCP's window, and nothing is buffered beyond one copy
//! buffer per direction. A guest port nobody listens on resets the client's
//! connection; the VM runs on.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_protocol::forward::copy;
use agent_protocol::{encode_frame, FrameDecoder, Message, CONTROL_STREAM, FORWARD_PORT};

use crate::Error;

/// Where a published port listens on the host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HostEnd {
    /// A TCP address (`-p [IP:]PORT:GUEST`; the IP defaults to 127.0.0.1).
    Tcp(SocketAddr),
    /// A UNIX socket path (`-p unix:PATH:GUEST`).
    Unix(PathBuf),
    /// A UNIX socket path over which other processes hand over connections
    /// they accepted (`-p handoff:PATH:GUEST`): each file descriptor passed
    /// with `SCM_RIGHTS` (a connected TCP or UNIX stream socket) is carried to
    /// the guest port as if it had been accepted here.
    Handoff(PathBuf),
}

/// One `-p`: a host end and the guest's TCP port.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Publish {
    /// The host end.
    pub host: HostEnd,
    /// The guest's TCP port.
    pub guest_port: u16,
    /// Terminate TLS on the host end (`/tls`; the guest port gets plaintext).
    pub tls: bool,
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            HostEnd::Tcp(a) if self.tls => {
                write!(f, "{a} (TLS) -> guest port {}", self.guest_port)
            }
            HostEnd::Tcp(a) => write!(f, "{a} -> guest port {}", self.guest_port),
            HostEnd::Unix(p) => write!(f, "{} -> guest port {}", p.display(), self.guest_port),
            HostEnd::Handoff(p) => write!(
                f,
                "handoff {} -> guest port {}",
                p.display(),
                self.guest_port
            ),
        }
    }
}

impl Publish {
    /// As `docker ps` shows a port: `127.0.0.1:8080->80/tcp`,
    /// `unix:/tmp/web.sock->80`, `handoff:PATH->80` (`/tls` when terminated).
    pub fn ps_form(&self) -> String {
        let proto = if self.tls { "tls" } else { "tcp" };
        match &self.host {
            HostEnd::Tcp(a) => format!("{a}->{}/{proto}", self.guest_port),
            HostEnd::Unix(p) => format!("unix:{}->{}/{proto}", p.display(), self.guest_port),
            HostEnd::Handoff(p) => {
                format!("handoff:{}->{}/{proto}", p.display(), self.guest_port)
            }
        }
    }

    /// Parses docker's `-p` syntax: `HOST_PORT:GUEST_PORT`,
    /// `HOST_IP:HOST_PORT:GUEST_PORT` (an IPv6 address in brackets), each with
    /// an optional `/tcp` (or `/tls`: TLS terminated on the host end), or
    /// `unix:PATH:GUEST_PORT`. A host port of 0 takes a free one.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "bad published port {spec:?}: {why} (want \
                 [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/tls], unix:PATH:GUEST_PORT or \
                 handoff:PATH:GUEST_PORT)"
            )
        };
        let port = |s: &str, what: &str| -> Result<u16, String> {
            s.parse::<u16>()
                .map_err(|_| bad(&format!("{what} {s:?} is not a port number")))
        };
        let unix = spec
            .strip_prefix("unix:")
            .map(|r| (r, false))
            .or_else(|| spec.strip_prefix("handoff:").map(|r| (r, true)));
        if let Some((rest, handoff)) = unix {
            let (path, guest) = rest.rsplit_once(':').ok_or_else(|| bad("no guest port"))?;
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            let path = PathBuf::from(path);
            return Ok(Self {
                host: if handoff {
                    HostEnd::Handoff(path)
                } else {
                    HostEnd::Unix(path)
                },
                guest_port: nonzero(port(guest, "guest port")?)
                    .ok_or_else(|| bad("guest port 0"))?,
                tls: false,
            });
        }
        let (spec_tcp, tls) = match spec.rsplit_once('/') {
            Some((s, "tcp")) => (s, false),
            Some((s, "tls")) => (s, true),
            Some((_, proto)) => {
                return Err(bad(&format!(
                    "protocol {proto:?}: only tcp (or tls over it) is published"
                )))
            }
            None => (spec, false),
        };
        let (host, guest) = spec_tcp
            .rsplit_once(':')
            .ok_or_else(|| bad("no guest port"))?;
        let guest_port = nonzero(port(guest, "guest port")?).ok_or_else(|| bad("guest port 0"))?;
        let (ip, host_port) = match host.rsplit_once(':') {
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), host),
            Some((ip, p)) => {
                let ip = ip
                    .strip_prefix('[')
                    .and_then(|i| i.strip_suffix(']'))
                    .unwrap_or(ip);
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| bad(&format!("host address {ip:?} is not an IP address")))?;
                (ip, p)
            }
        };
        Ok(Self {
            host: HostEnd::Tcp(SocketAddr::new(ip, port(host_port, "host port")?)),
            guest_port,
            tls,
        })
    }
}

fn nonzero(p: u16) -> Option<u16> {
    (p != 0).then_some(p)
}

/// `-P`: the image's `ExposedPorts` (`PORT/tcp`, or a bare `PORT`) not already
/// published by `taken`, each on a free port of 127.0.0.1. Returns them and the
/// entries that cannot be published (UDP, SCTP, garbage), for a warning.
pub fn exposed(exposed_ports: &[String], taken: &[Publish]) -> (Vec<Publish>, Vec<String>) {
    let mut publish: Vec<Publish> = Vec::new();
    let mut skipped = Vec::new();
    for e in exposed_ports {
        let (port, proto) = e.split_once('/').unwrap_or((e.as_str(), "tcp"));
        match (port.parse::<u16>().ok().and_then(nonzero), proto) {
            (Some(p), "tcp") => {
                let known = taken
                    .iter()
                    .chain(publish.iter())
                    .any(|t| t.guest_port == p);
                if !known {
                    publish.push(Publish {
                        host: HostEnd::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)),
                        guest_port: p,
                        tls: false,
                    });
                }
            }
            _ => skipped.push(e.clone()),
        }
    }
    (publish, skipped)
}

/// A bound host end.
#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    Handoff(UnixListener, PathBuf),
}

/// The host ends of a run's published ports, bound before anything is pulled
/// or booted (a port in use fails the run at once).
#[derive(Debug, Default)]
pub struct Bound {
    /// Each listener, its guest port, whether the user asked for a free
    /// host port (so is told which), and whether it terminates TLS.
    ports: Vec<(Listener, u16, bool, bool)>,
    /// The certificate of the ports that terminate TLS.
    tls: Option<crate::tls::TlsConfig>,
    /// No port was marked `/tls`: with a certificate, every TCP port is.
    tls_all: bool,
}

impl Bound {
    /// Binds every `publish` (TCP with `SO_REUSEADDR`, as std does; a UNIX
    /// path that exists is an error, never removed). With `tls`, the ports
    /// marked `/tls` terminate TLS, or every TCP port when none is marked.
    pub fn bind(publish: &[Publish], tls: Option<crate::tls::TlsConfig>) -> Result<Self, Error> {
        let marked = publish.iter().any(|p| p.tls);
        if marked && tls.is_none() {
            return Err(Error::Tls(
                "a port published with /tls needs --tls-cert and --tls-key".into(),
            ));
        }
        // Built as it goes: a later failure drops (and removes) the sockets
        // already bound.
        let mut bound = Self {
            ports: Vec::new(),
            tls_all: tls.is_some() && !marked,
            tls,
        };
        bound.bind_more(publish)?;
        Ok(bound)
    }

    /// Binds more (`-P`'s, once the image's config is known).
    pub fn bind_more(&mut self, publish: &[Publish]) -> Result<(), Error> {
        for p in publish {
            let fail = |source| Error::Publish {
                what: p.to_string(),
                source,
            };
            let l = match &p.host {
                HostEnd::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(fail)?),
                HostEnd::Unix(path) => {
                    Listener::Unix(UnixListener::bind(path).map_err(fail)?, path.clone())
                }
                HostEnd::Handoff(path) => {
                    Listener::Handoff(UnixListener::bind(path).map_err(fail)?, path.clone())
                }
            };
            let free = matches!(p.host, HostEnd::Tcp(a) if a.port() == 0);
            let tls = matches!(p.host, HostEnd::Tcp(_)) && (p.tls || self.tls_all);
            self.ports.push((l, p.guest_port, free, tls));
        }
        Ok(())
    }

    /// Tells the user (on stderr) where each port asked to take a free host
    /// port was published.
    pub fn announce(&self) {
        for (l, guest, free, tls) in &self.ports {
            if let (Listener::Tcp(t), true) = (l, free) {
                if let Ok(a) = t.local_addr() {
                    let tls = if *tls { " (TLS)" } else { "" };
                    eprintln!("supermachine: published {a}{tls} -> guest port {guest}");
                }
            }
        }
    }

    /// Each port as `ps` shows it, with the host address actually bound (a
    /// free port's number, not 0).
    pub fn ps_forms(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|(l, guest_port, _, tls)| {
                let host = match l {
                    Listener::Tcp(t) => match t.local_addr() {
                        Ok(a) => HostEnd::Tcp(a),
                        Err(_) => HostEnd::Tcp(SocketAddr::from(([0, 0, 0, 0], 0))),
                    },
                    Listener::Unix(_, p) => HostEnd::Unix(p.clone()),
                    Listener::Handoff(_, p) => HostEnd::Handoff(p.clone()),
                };
                Publish {
                    host,
                    guest_port: *guest_port,
                    tls: *tls,
                }
                .ps_form()
            })
            .collect()
    }

    /// The TCP addresses actually bound (a host port 0 is a free one), in
    /// order, for the user.
    pub fn tcp_addrs(&self) -> Vec<(SocketAddr, u16)> {
        self.ports
            .iter()
            .filter_map(|(l, g, _, _)| match l {
                Listener::Tcp(t) => t.local_addr().ok().map(|a| (a, *g)),
                Listener::Unix(..) | Listener::Handoff(..) => None,
            })
            .collect()
    }

    /// The UNIX socket paths, for the sandbox (their directories) and the
    /// cleanup.
    pub fn unix_paths(&self) -> Vec<PathBuf> {
        self.ports
            .iter()
            .filter_map(|(l, _, _, _)| match l {
                Listener::Unix(_, p) | Listener::Handoff(_, p) => Some(p.clone()),
                Listener::Tcp(_) => None,
            })
            .collect()
    }

    /// Whether nothing is published.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        for p in self.unix_paths() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A connection accepted on a host end.
pub(crate) enum Client {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Client {
    fn try_clone(&self) -> std::io::Result<Client> {
        Ok(match self {
            Client::Tcp(s) => Client::Tcp(s.try_clone()?),
            Client::Unix(s) => Client::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: std::net::Shutdown) {
        let _ = match self {
            Client::Tcp(s) => s.shutdown(how),
            Client::Unix(s) => s.shutdown(how),
        };
    }

    /// Ends the client's connection with a reset (TCP: `SO_LINGER` 0, then
    /// close), as a refused connection to the guest port would have.
    fn reset(self) {
        if let Client::Tcp(s) = &self {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt reads a valid `linger` of the size given on
            // a socket this process owns.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
        }
    }
}

impl Read for Client {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Client::Tcp(s) => s.read(buf),
            Client::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Client {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Client::Tcp(s) => s.write(buf),
            Client::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How often an accept loop looks at whether the VM ended.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// How long a connection waits for the guest agent's forwarder (a VM still
/// booting under nested emulation takes seconds).
const GUEST_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Between attempts while the guest's forwarder is not listening yet.
const RETRY: Duration = Duration::from_millis(5);
/// How long the guest has to answer a `Forward`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Stack of the forwarding threads (their buffers are on the heap).
const THREAD_STACK: usize = 256 << 10;

/// Serves `bound` for the VM behind `vsock` until `vm` ends: one accept
/// thread per host end, started here (inside the caller's sandbox, which the
/// threads inherit), and a thread per connection that asks the guest agent to
/// connect it to its guest port and splices both ways. Join the handles after
/// the VM's end. `run` serves its `-p` this way; a library user who built a
/// [`runner::vmm::Vmm`] passes its [`runner::vmm::Vmm::vsock`] and
/// [`runner::vmm::Vmm::stop_handle`]. The guest side is guest-init's forward
/// port ([`FORWARD_PORT`]).
///
/// ```no_run
/// # fn demo<V: hypervisor::Vm>(vmm: &runner::vmm::Vmm<V>) -> Result<(), supermachine::Error> {
/// use std::sync::Arc;
/// use supermachine::publish::{self, Bound, Publish};
/// let web = Publish::parse("127.0.0.1:8080:80").map_err(supermachine::Error::Usage)?;
/// let bound = Arc::new(Bound::bind(&[web], None)?);
/// let vsock = vmm.vsock().expect("the VM has a vsock device");
/// let threads = publish::serve(&bound, &vsock, &vmm.stop_handle())?;
/// // ... once the VM has ended:
/// for t in threads {
///     let _ = t.join();
/// }
/// # Ok(()) }
/// ```
pub fn serve(
    bound: &Arc<Bound>,
    vsock: &runner::virtio::VsockHandle,
    vm: &runner::vmm::StopHandle,
) -> Result<Vec<std::thread::JoinHandle<()>>, Error> {
    let mut threads = Vec::new();
    for i in 0..bound.ports.len() {
        let (bound, vsock, vm) = (bound.clone(), vsock.clone(), vm.clone());
        let t = std::thread::Builder::new()
            .name("sm-publish".into())
            .stack_size(THREAD_STACK)
            .spawn(move || accept_loop(&bound, i, &vsock, &vm))
            .map_err(|source| Error::Thread {
                what: "a published port's accept thread",
                source,
            })?;
        threads.push(t);
    }
    Ok(threads)
}

fn accept_loop(
    bound: &Bound,
    i: usize,
    vsock: &runner::virtio::VsockHandle,
    vm: &runner::vmm::StopHandle,
) {
    let Some((listener, guest_port, _, tls)) = bound.ports.get(i) else {
        return;
    };
    let tls = bound.tls.clone().filter(|_| *tls);
    let fd = match listener {
        Listener::Tcp(l) => l.as_raw_fd(),
        Listener::Unix(l, _) | Listener::Handoff(l, _) => l.as_raw_fd(),
    };
    while !vm.is_ending() {
        if !readable_soon(fd) {
            continue;
        }
        let client = match listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Client::Tcp(s)
            }),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Client::Unix(s)),
            Listener::Handoff(l, _) => {
                match l.accept() {
                    Ok((s, _)) => {
                        let (vsock, vm, port, tls) =
                            (vsock.clone(), vm.clone(), *guest_port, tls.clone());
                        let spawned = std::thread::Builder::new()
                            .name("sm-handoff".into())
                            .stack_size(THREAD_STACK)
                            .spawn(move || handoffs(&s, &vsock, port, &vm, tls.as_ref()));
                        if let Err(e) = spawned {
                            tracing::warn!("handoff socket: cannot start a thread: {e}");
                        }
                    }
                    Err(e) => tracing::debug!("handoff socket: accept: {e}"),
                }
                continue;
            }
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("published port {guest_port}: accept: {e}");
                continue;
            }
        };
        let (vsock, vm, port, tls) = (vsock.clone(), vm.clone(), *guest_port, tls.clone());
        let spawned = std::thread::Builder::new()
            .name("sm-forward".into())
            .stack_size(THREAD_STACK)
            .spawn(move || forward(client, &vsock, port, &vm, tls.as_ref()));
        if let Err(e) = spawned {
            tracing::warn!(
                "published port {guest_port}: cannot start a thread for a connection: {e}"
            );
        }
    }
}

/// Connections handed over on one handoff connection: every file
/// descriptor that arrives is forwarded on a thread of its own, until the
/// sender closes.
fn handoffs(
    from: &UnixStream,
    vsock: &runner::virtio::VsockHandle,
    port: u16,
    vm: &runner::vmm::StopHandle,
    tls: Option<&crate::tls::TlsConfig>,
) {
    while !vm.is_ending() {
        let fds = match receive_fds(from) {
            Ok(Some(fds)) => fds,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("handoff socket: {e}");
                return;
            }
        };
        for fd in fds {
            let Some(client) = client_of(fd) else {
                tracing::debug!("handoff socket: a descriptor that is no connected stream socket");
                continue;
            };
            let (vsock, vm, tls) = (vsock.clone(), vm.clone(), tls.cloned());
            let spawned = std::thread::Builder::new()
                .name("sm-forward".into())
                .stack_size(THREAD_STACK)
                .spawn(move || forward(client, &vsock, port, &vm, tls.as_ref()));
            if let Err(e) = spawned {
                tracing::warn!("handoff socket: cannot start a thread for a connection: {e}");
            }
        }
    }
}

/// Received descriptors are close-on-exec from the start where the kernel
/// can do it (Linux); the VMM never executes anything once it runs anyway.
#[cfg(target_os = "linux")]
const RECV_FLAGS: libc::c_int = libc::MSG_CMSG_CLOEXEC;
#[cfg(not(target_os = "linux"))]
const RECV_FLAGS: libc::c_int = 0;

/// File descriptors one passes at most per message.
const MAX_HANDOFF_FDS: usize = 16;

/// One message's descriptors (`SCM_RIGHTS`, received close-on-exec); its
/// bytes are ignored. `None` once the sender closed.
fn receive_fds(from: &UnixStream) -> std::io::Result<Option<Vec<std::os::fd::OwnedFd>>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let fd_bytes = (MAX_HANDOFF_FDS * std::mem::size_of::<libc::c_int>()) as libc::c_uint;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    // u64s: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut data = [0u8; 256];
    loop {
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain data; zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = (control.len() * 8) as _;
        // SAFETY: msg points at a valid iovec and control buffer of the
        // lengths given, which live across the call.
        let n = unsafe { libc::recvmsg(from.as_raw_fd(), &mut msg, RECV_FLAGS) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut fds = Vec::new();
        // SAFETY: the CMSG macros walk the control buffer recvmsg filled,
        // within msg_controllen; each SCM_RIGHTS payload is an array of ints
        // (read unaligned), each a descriptor now owned by this process.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let p = libc::CMSG_DATA(c).cast::<libc::c_int>();
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        return Ok(Some(fds));
    }
}

/// A handed-over descriptor as a client: a connected TCP (IPv4 or IPv6) or
/// UNIX stream socket; `None` (and closed) for anything else.
fn client_of(fd: std::os::fd::OwnedFd) -> Option<Client> {
    let opt = |name: libc::c_int| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int to a valid pointer of the length given.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(v)
    };
    if opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return None;
    }
    // Linux: SO_DOMAIN (getsockopt is in the VMM's sandbox; getsockname is not).
    #[cfg(target_os = "linux")]
    let family = opt(libc::SO_DOMAIN)?;
    #[cfg(not(target_os = "linux"))]
    let family = {
        // SAFETY: sockaddr_storage is plain data; getsockname fills at most
        // its length, given.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: as above; the pointer and length describe `addr`.
        let rc = unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return None;
        }
        libc::c_int::from(addr.ss_family)
    };
    match family {
        libc::AF_INET | libc::AF_INET6 => {
            let s = TcpStream::from(fd);
            let _ = s.set_nodelay(true);
            Some(Client::Tcp(s))
        }
        libc::AF_UNIX => Some(Client::Unix(UnixStream::from(fd))),
        _ => None,
    }
}

/// Whether the listener `fd` has a connection waiting within
/// [`ACCEPT_POLL`], so that an accept loop looks at the VM's end that often.
pub(crate) fn readable_soon(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd for a listener the caller keeps open.
    let rc = unsafe { libc::poll(pfd.as_mut_ptr(), 1, ACCEPT_POLL.as_millis() as i32) };
    rc > 0 && pfd[0].revents != 0
}

/// How a `Forward` went.
enum Answer {
    /// Spliced; bytes the guest sent after its `Forwarding`.
    Forwarding(UnixStream, Vec<u8>),
    /// The guest's forwarder is not listening (yet): try again.
    NotListening,
    /// The guest refused (nothing on the port): its reason.
    Refused(String),
}

/// Opens a forwarding connection to guest `port`.
fn open(vsock: &runner::virtio::VsockHandle, port: u16) -> std::io::Result<Answer> {
    let mut conn = vsock.connect(FORWARD_PORT)?;
    let mut frame = Vec::new();
    encode_frame(CONTROL_STREAM, &Message::Forward { port }, &mut frame)
        .map_err(std::io::Error::other)?;
    let refused = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    };
    match conn.write_all(&frame) {
        Err(e) if refused(&e) => return Ok(Answer::NotListening),
        other => other?,
    }
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return Ok(Answer::NotListening),
            Ok(n) => n,
            Err(e) if refused(&e) => return Ok(Answer::NotListening),
            Err(e) => return Err(e),
        };
        let mut input = &buf[..n];
        if let Some(raw) = dec.decode(&mut input).map_err(std::io::Error::other)? {
            let early = input.to_vec();
            conn.set_read_timeout(None)?;
            return match raw.to_frame().map(|f| f.message) {
                Ok(Message::Forwarding) => Ok(Answer::Forwarding(conn, early)),
                Ok(Message::Error { message }) => Ok(Answer::Refused(message)),
                Ok(other) => Ok(Answer::Refused(format!(
                    "the guest answered {:?} to Forward",
                    other.kind()
                ))),
                Err(e) => Ok(Answer::Refused(e.to_string())),
            };
        }
    }
}

/// Carries one client connection to guest `port` and back.
fn forward(
    client: Client,
    vsock: &runner::virtio::VsockHandle,
    port: u16,
    vm: &runner::vmm::StopHandle,
    tls: Option<&crate::tls::TlsConfig>,
) {
    let deadline = Instant::now() + GUEST_READY_TIMEOUT;
    let (conn, early) = loop {
        match open(vsock, port) {
            Ok(Answer::Forwarding(c, early)) => break (c, early),
            Ok(Answer::NotListening) if Instant::now() < deadline && !vm.is_ending() => {
                std::thread::sleep(RETRY)
            }
            Ok(Answer::NotListening) => {
                tracing::debug!("published port {port}: the guest's forwarder did not answer");
                return client.reset();
            }
            Ok(Answer::Refused(why)) => {
                tracing::debug!("published port {port}: {why}");
                return client.reset();
            }
            Err(e) => {
                tracing::debug!("published port {port}: {e}");
                return client.reset();
            }
        }
    };
    match (tls, client) {
        (Some(cfg), Client::Tcp(tcp)) => crate::tls::splice(cfg, tcp, &early, conn),
        (_, client) => splice(client, &early, conn, vm),
    }
}

/// Carries `client` to the guest connection `conn` and back until both
/// directions are closed (half-closes passed on), after sending `early` (the
/// guest's bytes that came with its answer) to the client. Used by every
/// connection vsock carries for a host client: published ports and exec.
pub(crate) fn splice(
    mut client: Client,
    early: &[u8],
    conn: UnixStream,
    vm: &runner::vmm::StopHandle,
) {
    if !early.is_empty() && client.write_all(early).is_err() {
        return;
    }
    let (Ok(mut client_in), Ok(mut guest_out)) = (client.try_clone(), conn.try_clone()) else {
        return client.reset();
    };
    let mut guest_in = conn;
    // Client -> guest on its own thread.
    let up = std::thread::Builder::new()
        .name("sm-forward-up".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let clean = copy(&mut client_in, &mut guest_out);
            let _ = guest_out.shutdown(if clean {
                std::net::Shutdown::Write
            } else {
                std::net::Shutdown::Both
            });
        });
    let Ok(up) = up else {
        return client.reset();
    };
    // Guest -> client here.
    let clean = copy(&mut guest_in, &mut client);
    client.shutdown(if clean && !vm.is_ending() {
        std::net::Shutdown::Write
    } else {
        // The VM is gone (or the guest side broke): the client's reads end too.
        std::net::Shutdown::Both
    });
    let _ = up.join();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn publish_all_takes_the_exposed_tcp_ports_not_yet_published() {
        let taken = [Publish::parse("8080:80").unwrap()];
        let ports: Vec<String> = [
            "80/tcp", "443/tcp", "53/udp", "9000", "443", "x/tcp", "0/tcp",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (publish, skipped) = exposed(&ports, &taken);
        let free = HostEnd::Tcp("127.0.0.1:0".parse().unwrap());
        assert_eq!(
            publish,
            [443, 9000].map(|guest_port| Publish {
                host: free.clone(),
                guest_port,
                tls: false,
            })
        );
        assert_eq!(skipped, ["53/udp", "x/tcp", "0/tcp"]);
    }

    #[test]
    fn free_host_ports_are_bound_and_reported() {
        let mut b = Bound::bind(&[Publish::parse("0:80").unwrap()], None).unwrap();
        b.bind_more(&exposed(&["81/tcp".into()], &[]).0).unwrap();
        let addrs = b.tcp_addrs();
        assert_eq!(addrs.len(), 2);
        assert!(addrs
            .iter()
            .all(|(a, _)| a.ip().is_loopback() && a.port() != 0));
        assert_eq!(addrs.iter().map(|(_, g)| *g).collect::<Vec<_>>(), [80, 81]);
        // ps shows the ports as bound, not as asked for.
        let shown = b.ps_forms();
        let want: Vec<String> = addrs
            .iter()
            .map(|(a, g)| format!("127.0.0.1:{}->{g}/tcp", a.port()))
            .collect();
        assert_eq!(shown, want);
    }

    #[test]
    fn publish_specs_parse_as_docker_reads_them() {
        let tcp = |s: &str| Publish::parse(s).unwrap();
        assert_eq!(
            tcp("8080:80"),
            Publish {
                host: HostEnd::Tcp("127.0.0.1:8080".parse().unwrap()),
                guest_port: 80,
                tls: false,
            }
        );
        assert!(tcp("8443:80/tls").tls && !tcp("8443:80/tcp").tls);
        assert_eq!(
            tcp("0.0.0.0:8080:80/tcp").host,
            HostEnd::Tcp("0.0.0.0:8080".parse().unwrap())
        );
        assert_eq!(
            tcp("[::1]:8443:443").host,
            HostEnd::Tcp("[::1]:8443".parse().unwrap())
        );
        assert_eq!(
            tcp("0:80").host,
            HostEnd::Tcp("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            tcp("unix:/tmp/a:b.sock:80"),
            Publish {
                host: HostEnd::Unix("/tmp/a:b.sock".into()),
                guest_port: 80,
                tls: false,
            }
        );
        assert_eq!(
            tcp("handoff:/run/h.sock:8080").host,
            HostEnd::Handoff("/run/h.sock".into())
        );
        for bad in [
            "",
            "80",
            "x:80",
            "8080:y",
            "8080:0",
            "70000:80",
            "8080:80/udp",
            "1.2.3:8080:80",
            "unix::80",
            "unix:/s",
            "unix:/s:0",
            "handoff:/s",
        ] {
            let e = Publish::parse(bad).unwrap_err();
            assert!(e.contains("bad published port"), "{bad}: {e}");
        }
    }
}
