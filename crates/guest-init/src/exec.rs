//! `exec`, the guest's end (docs/agent-protocol.md, "Exec"): a vsock
//! listener on [`EXEC_PORT`]; each connection the host opens carries one new
//! process in the container: its `ProcessSpec`, an optional `Resize` and
//! `Start`, then the same stdio, signal and exit messages as the main process.
//!
//! PID 1's main thread reaps every child (`waitpid(-1)`); a child that is not
//! the main process is looked up in the process table here and its status
//! handed to the connection's thread through a pipe. The table's lock is held
//! from before the fork until the pid is in it, so a child that exits at once
//! is never reaped before it is known.
//!
//! One thread accepts; each connection gets one thread that polls its
//! channel, the process's pipes (or pty) and its status pipe. A connection
//! that ends before its process does kills the process's session (it is a
//! session leader: `setsid` before exec). Nothing here may panic: a panic in
//! any thread of PID 1 ends the VM.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent_protocol::cmdline::Options;
use agent_protocol::{ExitStatus, Message, ProcessSpec, CONTROL_STREAM, EXEC_PORT};

use crate::agent::{self, Channel, Incoming};
use crate::config::{decode_wait_status, STATUS_CONTAINER_INIT_FAILED};
use crate::container::Process;
use crate::sys;

/// How long the host has to send ProcessSpec and Start.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After the process exited, how long its output may take to close (a
/// background child that keeps the pipe open is not waited for longer).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the host gets to read the last frames before the socket closes.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Stdin buffered for a process that does not read it; past this the channel
/// is not read until the process catches up.
const STDIN_BACKLOG: usize = 4 << 20;
/// Pending connections the listener holds.
const BACKLOG: i32 = 256;

macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "supermachine: guest-init: exec: ");
        let _ = writeln!(err, $($arg)*);
    }};
}

/// Where the container's main process is: an exec waits (up to
/// [`MAIN_START_WAIT`]) while it has not started (the root filesystem may not
/// be set up; the host's `run -d` returns once it sent `Start`, so an `exec`
/// right after it can arrive first), and is refused after it ended (the VM
/// is going down).
static MAIN: AtomicU8 = AtomicU8::new(MAIN_NOT_YET);
const MAIN_NOT_YET: u8 = 0;
const MAIN_RUNNING: u8 = 1;
const MAIN_ENDED: u8 = 2;
/// How long an exec waits for the main process to start.
const MAIN_START_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The exec'd processes not reaped yet: pid and the write end of the pipe
/// their connection's thread reads the wait status from.
static TABLE: Mutex<Vec<(libc::pid_t, OwnedFd)>> = Mutex::new(Vec::new());

/// The main thread says the main process started (`true`) or ended.
pub fn set_main_running(running: bool) {
    MAIN.store(
        if running { MAIN_RUNNING } else { MAIN_ENDED },
        Ordering::SeqCst,
    );
}

/// Reaps one exited child of PID 1 (the main thread calls it on SIGCHLD):
/// an exec'd process's status goes to its connection; every reaped pid and
/// its raw status come back (the main process's is the caller's). `None`
/// when no child has exited.
///
/// The table's lock is taken before the child is reaped: an exec thread
/// holds it while it spawns, and std's spawn itself reaps a child whose
/// `execve` failed (and panics if someone else did), so such a child is
/// gone by the time the lock is ours.
pub fn reap_next() -> Option<(libc::pid_t, i32)> {
    loop {
        let pid = sys::exited_child()?;
        let mut table = TABLE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(raw) = sys::reap(pid) else {
            // Reaped meanwhile by the spawn that made it.
            continue;
        };
        if let Some(i) = table.iter().position(|(p, _)| *p == pid) {
            let (_, wake) = table.swap_remove(i);
            // Four bytes into an empty pipe never block; the reader may be
            // gone (its host left), which is EPIPE and nothing else.
            let _ = sys::write(wake.as_raw_fd(), &raw.to_le_bytes());
        }
        return Some((pid, raw));
    }
}

/// Listens on [`EXEC_PORT`] and serves every connection on a thread of its
/// own, for as long as the VM runs.
pub fn start(opts: &Options) -> io::Result<()> {
    let opts = opts.clone();
    agent::serve_port(EXEC_PORT, BACKLOG, "exec", "exec", move |sock| {
        serve(Channel::new(sock), &opts)
    })
}

/// What the host sent before Start.
struct Request {
    stream: u32,
    spec: ProcessSpec,
    size: Option<(u16, u16)>,
    stdin: Vec<u8>,
    stdin_eof: bool,
}

/// Reads ProcessSpec, then optionally Resize and Stdin, then Start, all on one stream.
fn read_request(chan: &mut Channel) -> Result<Request, String> {
    let deadline = Instant::now() + HEADER_TIMEOUT;
    let mut spec: Option<(u32, ProcessSpec)> = None;
    let (mut size, mut stdin, mut stdin_eof) = (None, Vec::new(), false);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no ProcessSpec and Start within {HEADER_TIMEOUT:?}"
            ));
        }
        let mut pfd = [libc::pollfd {
            fd: chan.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        sys::poll(&mut pfd, left).map_err(|e| e.to_string())?;
        if pfd[0].revents == 0 {
            continue;
        }
        let frames = match chan.receive() {
            Incoming::Frames(f) => f,
            Incoming::Closed => return Err("closed before Start".into()),
            Incoming::Broken(e) => return Err(e.to_string()),
        };
        for frame in frames {
            let frame = frame.map_err(|e| e.to_string())?;
            let on_spec = spec.as_ref().is_some_and(|(s, _)| *s == frame.stream);
            match frame.message {
                Message::ProcessSpec(p) if spec.is_none() && frame.stream != CONTROL_STREAM => {
                    spec = Some((frame.stream, p));
                }
                Message::Resize { rows, cols } if on_spec => size = Some((rows, cols)),
                Message::Stdin(d) if on_spec && stdin.len() + d.len() <= STDIN_BACKLOG => {
                    stdin.extend_from_slice(&d);
                }
                Message::StdinEof if on_spec => stdin_eof = true,
                Message::Start if on_spec => {
                    let Some((stream, spec)) = spec.take() else {
                        return Err("Start before ProcessSpec".into());
                    };
                    return Ok(Request {
                        stream,
                        spec,
                        size,
                        stdin,
                        stdin_eof,
                    });
                }
                other => {
                    return Err(format!(
                        "an exec connection starts with ProcessSpec, [Resize] and Start on one \
                         process stream; got {:?} on stream {}",
                        other.kind(),
                        frame.stream
                    ))
                }
            }
        }
    }
}

/// Serves one exec connection to its end.
fn serve(mut chan: Channel, opts: &Options) {
    let req = match read_request(&mut chan) {
        Ok(r) => r,
        Err(e) => {
            let _ = chan.send(
                CONTROL_STREAM,
                &Message::Error {
                    message: format!("exec: {e}"),
                },
            );
            return chan.close(CLOSE_LINGER);
        }
    };
    let stream = req.stream;
    let status = match spawn(&req, opts) {
        Ok((mut proc, wake)) => pump(&mut chan, &mut proc, &wake, req),
        Err((code, message)) => {
            let _ = chan.send(stream, &Message::Error { message });
            Some(ExitStatus::Code(code as i32))
        }
    };
    if let Some(s) = status {
        let _ = chan.send(stream, &Message::Exited(s));
    }
    chan.close(CLOSE_LINGER);
}

/// Starts the process and enters it in the table; the read end of its
/// status pipe comes back with it.
fn spawn(req: &Request, opts: &Options) -> Result<(Process, OwnedFd), (u32, String)> {
    let failed = |m: String| (STATUS_CONTAINER_INIT_FAILED, m);
    let deadline = std::time::Instant::now() + MAIN_START_WAIT;
    while MAIN.load(Ordering::SeqCst) == MAIN_NOT_YET && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if MAIN.load(Ordering::SeqCst) != MAIN_RUNNING {
        return Err(failed(
            "the container's main process is not running (it has not started yet, or it \
             ended and the VM is stopping)"
                .into(),
        ));
    }
    let (wake_r, wake_w) =
        sys::pipe().map_err(|e| failed(format!("creating a status pipe: {e}")))?;
    let mut table = TABLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let proc = Process::spawn(&req.spec, opts, true, req.size)?;
    table.push((proc.pid, wake_w));
    Ok((proc, wake_r))
}

/// Carries the process's stdio until it exited and its output is drained;
/// its status, or `None` when the host left first (the process's session is
/// killed then, and nobody is told).
fn pump(chan: &mut Channel, p: &mut Process, wake: &OwnedFd, req: Request) -> Option<ExitStatus> {
    let stream = req.stream;
    let mut pending = req.stdin;
    let mut stdin_eof = req.stdin_eof;
    let mut status: Option<ExitStatus> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let host_left = |p: &Process| {
        // The session the process leads: itself and what it started.
        let _ = sys::kill(-p.pid, libc::SIGKILL);
        None
    };
    loop {
        if drain_deadline.is_some_and(|d| Instant::now() >= d) {
            p.stdout = None;
            p.stderr = None;
        }
        if stdin_eof && pending.is_empty() && p.pty.is_none() {
            p.stdin = None;
        }
        if status.is_some() && p.stdout.is_none() && p.stderr.is_none() {
            return status;
        }
        let chan_events = if pending.len() < STDIN_BACKLOG {
            libc::POLLIN
        } else {
            0
        };
        let fd = |o: &Option<OwnedFd>| o.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let stdin_fd = if pending.is_empty() { -1 } else { fd(&p.stdin) };
        let wake_fd = if status.is_none() {
            wake.as_raw_fd()
        } else {
            -1
        };
        let mut fds = [
            pollfd(chan.fd(), chan_events),
            pollfd(fd(&p.stdout), libc::POLLIN),
            pollfd(fd(&p.stderr), libc::POLLIN),
            pollfd(stdin_fd, libc::POLLOUT),
            pollfd(wake_fd, libc::POLLIN),
        ];
        let wait = drain_deadline.map_or(Duration::from_secs(1), |d| {
            d.saturating_duration_since(Instant::now())
        });
        if let Err(e) = sys::poll(&mut fds, wait) {
            note!("poll: {e}");
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if fds[4].revents != 0 {
            let mut word = [0u8; 4];
            if let Ok(4) = sys::read(wake.as_raw_fd(), &mut word) {
                status = decode_wait_status(i32::from_le_bytes(word));
                if status.is_some() {
                    drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT);
                }
            }
        }
        for (i, is_err) in [(1, false), (2, true)] {
            if fds[i].revents == 0 {
                continue;
            }
            let slot = if is_err { &mut p.stderr } else { &mut p.stdout };
            let Some(out) = slot.as_ref().map(AsRawFd::as_raw_fd) else {
                continue;
            };
            match sys::read(out, &mut buf) {
                Ok(0) => *slot = None,
                Ok(n) => {
                    if chan.send_output(stream, is_err, &buf[..n]).is_err() {
                        return host_left(p);
                    }
                }
                Err(e) if would_block(&e) => {}
                // EIO: the pty's last slave closed.
                Err(_) => *slot = None,
            }
            if slot.is_none() && !is_err && p.pty.is_some() {
                p.pty = None;
                p.stdin = None;
            }
        }
        if fds[0].revents != 0 {
            match chan.receive() {
                Incoming::Frames(frames) => {
                    for f in frames {
                        match f {
                            Ok(f) if f.stream == stream => {
                                message(chan, p, stream, f.message, &mut pending, &mut stdin_eof)
                            }
                            Ok(f) => {
                                let _ = chan.send(
                                    stream,
                                    &Message::Error {
                                        message: format!(
                                            "unexpected {:?} on stream {} of an exec connection \
                                             for stream {stream}",
                                            f.message.kind(),
                                            f.stream
                                        ),
                                    },
                                );
                            }
                            Err(e) => {
                                let _ = chan.send(
                                    stream,
                                    &Message::Error {
                                        message: e.to_string(),
                                    },
                                );
                            }
                        }
                    }
                }
                Incoming::Closed | Incoming::Broken(_) => {
                    if status.is_none() {
                        return host_left(p);
                    }
                    return status;
                }
            }
        }
        if fds[3].revents != 0 {
            if let Some(input) = p.stdin.as_ref().map(AsRawFd::as_raw_fd) {
                match sys::write(input, &pending) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(e) if would_block(&e) => {}
                    Err(_) => {
                        // The process closed its stdin: what it did not read
                        // is dropped, as a pipe would.
                        pending.clear();
                        if p.pty.is_none() {
                            p.stdin = None;
                        }
                    }
                }
            }
        }
    }
}

/// One host message for the exec'd process.
fn message(
    chan: &mut Channel,
    p: &Process,
    stream: u32,
    m: Message,
    pending: &mut Vec<u8>,
    stdin_eof: &mut bool,
) {
    match m {
        Message::Stdin(d) => {
            if p.stdin.is_some() && !*stdin_eof {
                pending.extend_from_slice(&d);
            }
        }
        Message::StdinEof => *stdin_eof = true,
        Message::Signal { signo } if (1..=64).contains(&signo) => {
            let _ = sys::kill(p.pid, signo);
        }
        Message::Resize { rows, cols } => {
            if let Some(fd) = p.pty {
                // The kernel sends SIGWINCH to the foreground group.
                let _ = sys::set_winsize(fd, rows, cols);
            }
        }
        other => {
            let what = match other {
                Message::Signal { signo } => format!("invalid signal number {signo}"),
                o => format!("unexpected {:?} on stream {stream}", o.kind()),
            };
            let _ = chan.send(stream, &Message::Error { message: what });
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
