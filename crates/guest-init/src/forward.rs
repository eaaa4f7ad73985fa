//! Published ports, the guest's end (docs/agent-protocol.md, "Published
//! ports"): a vsock listener on [`FORWARD_PORT`]; each connection the host
//! opens names a guest TCP port in its first frame ([`Message::Forward`]), is
//! connected to that port on the guest's loopback, answered
//! [`Message::Forwarding`] (or `Error` when nothing accepts there), and then
//! carries the TCP stream's bytes both ways, half-closes included.
//!
//! One thread accepts; each connection gets two (one per direction) with
//! blocking I/O, so a slow reader on either side stops its writer (vsock
//! credit on one side, TCP windows on the other) and nothing is buffered past
//! one copy buffer. Nothing here may panic: a panic in any thread of PID 1
//! ends the VM.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::forward::copy;
use agent_protocol::{encode_frame, FrameDecoder, Message, CONTROL_STREAM, FORWARD_PORT};

use crate::{agent, sys};

/// How long the host has to send its `Forward` frame.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest port has to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pending connections the listener holds (the host retries past them).
const BACKLOG: i32 = 256;
/// Stack of the forwarding threads: their buffers are on the heap.
const THREAD_STACK: usize = 256 << 10;

macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "supermachine: guest-init: published ports: ");
        let _ = writeln!(err, $($arg)*);
    }};
}

/// Listens on [`FORWARD_PORT`] and serves every connection on its own
/// threads, for as long as the VM runs.
pub fn start() -> io::Result<()> {
    agent::serve_port(FORWARD_PORT, BACKLOG, "forward", "published ports", serve)
}

/// A vsock connection shared by the two directions.
struct Vsock(Arc<OwnedFd>);

impl Vsock {
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn shutdown(&self, how: libc::c_int) {
        // SAFETY: shutdown(2) on a socket this connection owns.
        unsafe { libc::shutdown(self.fd(), how) };
    }
}

impl Read for Vsock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::read(self.fd(), buf)
    }
}

impl Write for Vsock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::write(self.fd(), buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends one control frame; errors mean the host is gone.
fn send(v: &mut Vsock, m: &Message) -> io::Result<()> {
    let mut out = Vec::new();
    encode_frame(CONTROL_STREAM, m, &mut out)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    v.write_all(&out)
}

/// Reads the host's first frame: the guest port, and any bytes that came
/// after the frame in the same read.
fn read_header(v: &mut Vsock) -> Result<(u16, Vec<u8>), String> {
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let mut pfd = [libc::pollfd {
            fd: v.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        sys::poll(&mut pfd, HEADER_TIMEOUT).map_err(|e| e.to_string())?;
        if pfd[0].revents == 0 {
            return Err(format!("no Forward frame within {HEADER_TIMEOUT:?}"));
        }
        let n = match v.read(&mut buf) {
            Ok(0) => return Err("closed before its Forward frame".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        let mut input = &buf[..n];
        match dec.decode(&mut input) {
            Ok(Some(raw)) => {
                return match raw.to_frame().map(|f| f.message) {
                    Ok(Message::Forward { port }) => Ok((port, input.to_vec())),
                    Ok(other) => Err(format!("expected Forward, got {:?}", other.kind())),
                    Err(e) => Err(e.to_string()),
                };
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Connects to `port` on the guest's loopback, IPv4 first, then IPv6.
fn connect(port: u16) -> io::Result<TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(s) => Ok(s),
        Err(e4) => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| e4)
        }
    }
}

/// Tells the host why its connection ends.
fn refuse(v: &mut Vsock, message: String) {
    let _ = send(v, &Message::Error { message });
}

fn serve(sock: OwnedFd) {
    let mut v = Vsock(Arc::new(sock));
    let (port, early) = match read_header(&mut v) {
        Ok(h) => h,
        Err(e) => return refuse(&mut v, format!("a published-port connection: {e}")),
    };
    let tcp = match connect(port) {
        Ok(t) => t,
        Err(e) => {
            return refuse(
                &mut v,
                format!("nothing accepts connections on the guest's port {port}: {e}"),
            )
        }
    };
    let _ = tcp.set_nodelay(true);
    if send(&mut v, &Message::Forwarding).is_err() {
        return;
    }
    let mut tcp_in = match tcp.try_clone() {
        Ok(t) => t,
        Err(e) => {
            note!("port {port}: {e}");
            return;
        }
    };
    let mut tcp_out = tcp;
    if !early.is_empty() && tcp_out.write_all(&early).is_err() {
        return;
    }
    // Guest port -> host, on a thread of its own.
    let mut v_out = Vsock(v.0.clone());
    let down = std::thread::Builder::new()
        .name("forward-down".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let clean = copy(&mut tcp_in, &mut v_out);
            // The server closed (or reset) its side: so does the host's.
            v_out.shutdown(if clean {
                libc::SHUT_WR
            } else {
                libc::SHUT_RDWR
            });
        });
    let down = match down {
        Ok(d) => d,
        Err(e) => {
            note!("port {port}: cannot start a thread: {e}");
            return;
        }
    };
    // Host -> guest port, here.
    let clean = copy(&mut v, &mut tcp_out);
    let _ = tcp_out.shutdown(if clean {
        Shutdown::Write
    } else {
        Shutdown::Both
    });
    let _ = down.join();
}
