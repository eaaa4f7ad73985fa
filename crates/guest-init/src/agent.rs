//! The guest end of the agent protocol's control channel: a vsock listener on
//! port [`CONTROL_PORT`] (docs/agent-protocol.md, "Transport") and a blocking
//! framed connection to the host.
//!
//! The guest listens and the host connects: a listening socket survives a
//! snapshot/restore, where established vsock connections are reset (virtio
//! 1.2 §5.10.6.6: the device sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` after
//! migration), so a restored VM is reachable the same way as a fresh one.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use agent_protocol::{
    encode_frame, Frame, FrameDecoder, FrameError, Message, MessageError, CONTROL_PORT, MAX_PAYLOAD,
};

use crate::sys;

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` (include/uapi/linux/vm_sockets.h): `_IO(7, 0xb9)`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// The guest's vsock CID once a virtio-vsock device has probed, `None` while
/// the guest-to-host transport has no device (the ioctl answers
/// `VMADDR_CID_ANY` then).
fn local_cid() -> Option<u32> {
    let f = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = libc::VMADDR_CID_ANY;
    // SAFETY: the ioctl writes one u32 CID to the pointer, which is valid.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID as _, &mut cid) };
    (rc == 0 && cid != libc::VMADDR_CID_ANY).then_some(cid)
}

/// Waits for the virtio-vsock device (probed asynchronously after the module
/// load), then listens on [`CONTROL_PORT`]. Returns the listener and the CID.
pub fn listen(device_timeout: Duration) -> io::Result<(OwnedFd, u32)> {
    let deadline = Instant::now() + device_timeout;
    let cid = loop {
        if let Some(cid) = local_cid() {
            break cid;
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no virtio-vsock device (the vsock guest transport reports no CID)",
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok((listen_on(CONTROL_PORT, 4)?, cid))
}

/// Listens on vsock `port` (the device has probed: [`listen`] waited for it)
/// with room for `backlog` pending connections.
pub fn listen_on(port: u32, backlog: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket succeeded; the fd is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zeroes are valid (and required for the
    // reserved bytes).
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm and the length is its size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on our bound socket.
    if unsafe { libc::listen(sock.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Stack of the threads [`serve_port`] starts: their buffers are on the heap.
const CONNECTION_STACK: usize = 256 << 10;

/// Listens on vsock `port` and, for as long as the VM runs, serves every
/// connection with `serve` on a thread of its own (named `name`); failures
/// are printed with `what` (published ports, exec), never a panic.
pub fn serve_port(
    port: u32,
    backlog: i32,
    name: &'static str,
    what: &'static str,
    serve: impl Fn(OwnedFd) + Clone + Send + 'static,
) -> io::Result<()> {
    let listener = listen_on(port, backlog)?;
    let report = move |e: &dyn std::fmt::Display| {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "supermachine: guest-init: {what}: {e}"
        );
    };
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(CONNECTION_STACK)
        .spawn(move || loop {
            match accept(&listener, Duration::from_secs(3600)) {
                Ok(Some(sock)) => {
                    let serve = serve.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("{name}-conn"))
                        .stack_size(CONNECTION_STACK)
                        .spawn(move || serve(sock));
                    if let Err(e) = spawned {
                        // The connection is dropped: the host sees it end.
                        report(&format!("cannot start a thread for a connection: {e}"));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    report(&format!("accepting a connection: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })?;
    Ok(())
}

/// Accepts one connection within `timeout`; `Ok(None)` when none came.
pub fn accept(listener: &OwnedFd, timeout: Duration) -> io::Result<Option<OwnedFd>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut pfd = [libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        sys::poll(&mut pfd, left)?;
        if pfd[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: accept4 on our listening socket; the peer address is not wanted.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 succeeded; the fd is ours.
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let e = io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EINTR | libc::ECONNABORTED | libc::EAGAIN)
        ) {
            return Err(e);
        }
    }
}

/// What one read from the channel produced.
#[derive(Debug)]
pub enum Incoming {
    /// Decoded frames (and per-frame payload errors, which are not fatal).
    Frames(Vec<Result<Frame, MessageError>>),
    /// The host closed the connection.
    Closed,
    /// The byte stream is broken (bad header); the channel must be dropped.
    Broken(FrameError),
}

/// A framed, blocking connection to the host.
#[derive(Debug)]
pub struct Channel {
    sock: OwnedFd,
    decoder: FrameDecoder,
    out: Vec<u8>,
    alive: bool,
}

impl Channel {
    /// Wraps an accepted connection.
    pub fn new(sock: OwnedFd) -> Self {
        Self {
            sock,
            decoder: FrameDecoder::new(),
            out: Vec::with_capacity(64 * 1024),
            alive: true,
        }
    }

    /// The socket, for `poll`.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// False once a write failed or the host closed its end.
    pub fn alive(&self) -> bool {
        self.alive
    }

    /// Sends one message; a failure marks the channel dead (the caller then
    /// falls back to the console) and is returned.
    pub fn send(&mut self, stream: u32, message: &Message) -> io::Result<()> {
        if !self.alive {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        }
        self.out.clear();
        if let Err(e) = encode_frame(stream, message, &mut self.out) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
        }
        let mut buf = self.out.as_slice();
        while !buf.is_empty() {
            match sys::write(self.sock.as_raw_fd(), buf) {
                Ok(0) => {
                    self.alive = false;
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.alive = false;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Sends process output as Stdout or Stderr frames of at most
    /// [`MAX_PAYLOAD`] bytes each.
    pub fn send_output(&mut self, stream: u32, stderr: bool, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(MAX_PAYLOAD as usize) {
            let m = if stderr {
                Message::Stderr(chunk.to_vec())
            } else {
                Message::Stdout(chunk.to_vec())
            };
            self.send(stream, &m)?;
        }
        Ok(())
    }

    /// Reads what the socket has (call when `poll` says it is readable).
    pub fn receive(&mut self) -> Incoming {
        let mut buf = [0u8; 16 * 1024];
        let n = match sys::read(self.sock.as_raw_fd(), &mut buf) {
            Ok(0) => {
                self.alive = false;
                return Incoming::Closed;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                return Incoming::Frames(Vec::new())
            }
            Err(_) => {
                self.alive = false;
                return Incoming::Closed;
            }
        };
        let mut input = &buf[..n];
        let mut frames = Vec::new();
        loop {
            match self.decoder.decode(&mut input) {
                Ok(Some(raw)) => frames.push(raw.to_frame()),
                Ok(None) => return Incoming::Frames(frames),
                Err(e) => {
                    self.alive = false;
                    return Incoming::Broken(e);
                }
            }
        }
    }

    /// Ends the conversation: half-closes the socket so the host reads EOF
    /// after the last frame, then waits up to `linger` for the host to close
    /// its end, so the frames are out of the guest before power-off.
    pub fn close(self, linger: Duration) {
        // SAFETY: shutdown(2) on our socket.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_WR) };
        let deadline = Instant::now() + linger;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let mut pfd = [libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if sys::poll(&mut pfd, left).is_err() {
                return;
            }
            if pfd[0].revents != 0 {
                match sys::read(self.sock.as_raw_fd(), &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
    }
}
