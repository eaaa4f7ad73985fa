//! The host side of the agent conversation (docs/agent-protocol.md): Hello/Ready,
//! clock, the process spec and Start, then the process's output until `Exited`,
//! over any byte stream (the VMM's in-process vsock connection in `run`).

use std::io::{Read, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use agent_protocol::{
    encode_frame, ExitStatus, FrameDecoder, Message, ProcessSpec, CONTROL_STREAM, EXEC_STREAM,
    MAIN_PROCESS_STREAM,
};

/// Errors of the agent conversation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Reading or writing the control connection failed.
    #[error("agent connection")]
    Io(#[from] std::io::Error),
    /// The guest sent bytes that are not protocol frames.
    #[error("agent protocol")]
    Frame(#[from] agent_protocol::FrameError),
    /// A frame could not be encoded (too large).
    #[error("agent protocol")]
    Encode(#[from] agent_protocol::EncodeError),
    /// The guest reported an error.
    #[error("the guest reported: {0}")]
    Guest(String),
    /// The connection ended before the process exited.
    #[error("the guest closed the agent connection before the process exited")]
    Closed,
}

fn send(conn: &mut impl Write, stream: u32, m: &Message) -> Result<(), AgentError> {
    let mut buf = Vec::new();
    encode_frame(stream, m, &mut buf)?;
    conn.write_all(&buf)?;
    Ok(())
}

/// The host's end of the control channel once the guest agent has answered.
#[derive(Debug)]
pub struct AgentConn<C> {
    conn: C,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    /// Bytes read after `Ready` in the same read, for `run_process`.
    pending: Vec<u8>,
}

/// How the main process of a conversation comes to be.
#[derive(Debug, Clone)]
pub enum Begin {
    /// Start it from `spec`; with `watch_listen`, the guest reports the first
    /// TCP port it listens on ([`Event::Listening`]).
    Start {
        /// The process.
        spec: ProcessSpec,
        /// Ask for [`Event::Listening`].
        watch_listen: bool,
        /// The terminal's size (rows, columns) for a process on a TTY.
        size: Option<(u16, u16)>,
    },
    /// Carry on the process a restored VM runs (captured mid-process).
    Attach,
}

/// What the guest reports besides the process's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The process spec and `Start` (or `Attach`) are sent: the process's
    /// stdin may follow.
    Started,
    /// The guest's `seq`th heartbeat (one a second while the process runs).
    Heartbeat(u64),
    /// A process in the guest listens on this TCP port.
    Listening(u16),
}

/// How the opening of the control channel failed.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The connection ended before the guest said anything: nobody listened yet
    /// (the device refuses a connection to a port without a listener), so the
    /// caller connects again.
    #[error("the guest agent is not listening yet")]
    NotListening,
    /// Anything else.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl<C: Read + Write> AgentConn<C> {
    /// Says `Hello` on `conn` and waits for the guest's `Ready`
    /// (docs/agent-protocol.md); an `Error` instead is [`AgentError::Guest`].
    pub fn hello(mut conn: C) -> Result<Self, HelloError> {
        // A refused connection may already be closed when Hello is written.
        let refused = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        };
        let version = concat!("supermachine ", env!("CARGO_PKG_VERSION")).to_string();
        match send(
            &mut conn,
            CONTROL_STREAM,
            &Message::Hello {
                protocol_version: u16::from(agent_protocol::VERSION),
                agent_version: version,
            },
        ) {
            Err(AgentError::Io(e)) if refused(&e) => return Err(HelloError::NotListening),
            other => other?,
        }
        let mut me = Self {
            conn,
            decoder: FrameDecoder::new(),
            buf: vec![0u8; 64 * 1024],
            pending: Vec::new(),
        };
        let mut heard = false;
        loop {
            let n = match me.conn.read(&mut me.buf) {
                Ok(n) => n,
                Err(e) if refused(&e) && !heard => return Err(HelloError::NotListening),
                Err(e) => return Err(AgentError::Io(e).into()),
            };
            if n == 0 {
                return Err(if heard {
                    AgentError::Closed.into()
                } else {
                    HelloError::NotListening
                });
            }
            heard = true;
            let mut input = &me.buf[..n];
            while let Some(raw) = me.decoder.decode(&mut input).map_err(AgentError::Frame)? {
                match raw.to_frame().map(|f| f.message) {
                    Ok(Message::Ready { .. }) => {
                        // Whatever came with it (a heartbeat) is the
                        // conversation's next bytes.
                        me.pending = input.to_vec();
                        return Ok(me);
                    }
                    Ok(Message::Error { message }) => return Err(AgentError::Guest(message).into()),
                    _ => {}
                }
            }
        }
    }

    /// The connection itself (to set timeouts on).
    pub fn get_ref(&self) -> &C {
        &self.conn
    }

    /// Runs the main process: the clock and entropy, then the process spec
    /// and `Start` (or `Attach` to the one a restored VM runs), then its stdout
    /// and stderr go to `out` and `err` as they arrive, and what else the guest
    /// reports to `events`. Returns how the process ended.
    pub fn run_process(
        &mut self,
        begin: Begin,
        out: &mut dyn Write,
        err: &mut dyn Write,
        events: &mut dyn FnMut(Event),
    ) -> Result<ExitStatus, AgentError> {
        let conn = &mut self.conn;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        send(conn, CONTROL_STREAM, &Message::TimeSync { unix_nanos: now })?;
        let mut seed = vec![0u8; 64];
        if getrandom::fill(&mut seed).is_ok() {
            send(conn, CONTROL_STREAM, &Message::Entropy(seed))?;
        }
        match begin {
            Begin::Start {
                spec,
                watch_listen,
                size,
            } => {
                if watch_listen {
                    send(conn, CONTROL_STREAM, &Message::WatchListen)?;
                }
                if let Some((rows, cols)) = size {
                    send(conn, MAIN_PROCESS_STREAM, &Message::Resize { rows, cols })?;
                }
                send(conn, MAIN_PROCESS_STREAM, &Message::ProcessSpec(spec))?;
                send(conn, MAIN_PROCESS_STREAM, &Message::Start)?;
            }
            Begin::Attach => send(conn, MAIN_PROCESS_STREAM, &Message::Attach)?,
        }
        events(Event::Started);

        self.follow(MAIN_PROCESS_STREAM, out, err, events)
    }

    /// Opens an exec connection (docs/agent-protocol.md, "Exec"): `spec`,
    /// the terminal's size when it has one, and `Start`, all on
    /// [`EXEC_STREAM`]; [`AgentConn::follow`] then carries the process.
    pub fn exec(
        mut conn: C,
        spec: ProcessSpec,
        size: Option<(u16, u16)>,
    ) -> Result<Self, AgentError> {
        send(&mut conn, EXEC_STREAM, &Message::ProcessSpec(spec))?;
        if let Some((rows, cols)) = size {
            send(&mut conn, EXEC_STREAM, &Message::Resize { rows, cols })?;
        }
        send(&mut conn, EXEC_STREAM, &Message::Start)?;
        Ok(Self {
            conn,
            decoder: FrameDecoder::new(),
            buf: vec![0u8; 64 * 1024],
            pending: Vec::new(),
        })
    }

    /// The process on `stream` from here to its end: its stdout and stderr
    /// go to `out` and `err` as they arrive, and what else the guest reports
    /// to `events`. Returns how the process ended.
    pub fn follow(
        &mut self,
        stream: u32,
        out: &mut dyn Write,
        err: &mut dyn Write,
        events: &mut dyn FnMut(Event),
    ) -> Result<ExitStatus, AgentError> {
        let conn = &mut self.conn;
        let mut guest_error: Option<String> = None;
        let mut pending = std::mem::take(&mut self.pending);
        loop {
            let mut input: &[u8] = if pending.is_empty() {
                let n = conn.read(&mut self.buf)?;
                if n == 0 {
                    return Err(guest_error.map_or(AgentError::Closed, AgentError::Guest));
                }
                &self.buf[..n]
            } else {
                &pending
            };
            while let Some(raw) = self.decoder.decode(&mut input)? {
                // An undecodable payload is not fatal (the decoder is at a frame
                // boundary): skip it.
                let Ok(frame) = raw.to_frame() else { continue };
                match frame.message {
                    Message::Stdout(data) => {
                        out.write_all(&data)?;
                        out.flush()?;
                    }
                    Message::Stderr(data) => {
                        err.write_all(&data)?;
                        err.flush()?;
                    }
                    Message::Heartbeat { seq } if frame.stream == CONTROL_STREAM => {
                        events(Event::Heartbeat(seq))
                    }
                    Message::Listening { port } if frame.stream == CONTROL_STREAM => {
                        events(Event::Listening(port))
                    }
                    Message::Error { message } => guest_error = Some(message),
                    Message::Exited(status) if frame.stream == stream => {
                        if let Some(m) = guest_error.take() {
                            // The process never ran (126/127): say why, as docker does.
                            let _ = writeln!(err, "supermachine: {m}");
                        }
                        return Ok(status);
                    }
                    _ => {}
                }
            }
            pending.clear();
        }
    }

    /// Closes the connection (which tells the guest it may power off).
    pub fn into_inner(self) -> C {
        self.conn
    }
}

/// docker's exit code for a process status: the code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    match status {
        ExitStatus::Code(c) => c & 0xff,
        ExitStatus::Signaled(s) => 128 + s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_maps_signals_like_docker() {
        assert_eq!(exit_code(ExitStatus::Code(42)), 42);
        assert_eq!(exit_code(ExitStatus::Signaled(9)), 137);
    }

    /// A fake guest: what the host wrote is captured, the guest's reply is canned.
    struct Fake {
        reply: std::io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }
    impl Read for Fake {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            // One byte at a time: the decoder must cope with any chunking.
            let n = b.len().min(1);
            self.reply.read(&mut b[..n])
        }
    }
    impl Write for Fake {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn spec() -> ProcessSpec {
        ProcessSpec {
            argv: vec!["sh".into()],
            env: vec![],
            cwd: String::new(),
            user: agent_protocol::User::Name(String::new()),
            tty: false,
            stdin: false,
        }
    }

    fn start() -> Begin {
        Begin::Start {
            spec: spec(),
            watch_listen: false,
            size: None,
        }
    }

    /// Every frame the host wrote, decoded.
    fn frames(written: &[u8]) -> Vec<(u32, Message)> {
        let mut dec = agent_protocol::FrameDecoder::new();
        let mut w = written;
        let mut all = Vec::new();
        while let Some(raw) = dec.decode(&mut w).unwrap() {
            let f = raw.to_frame().unwrap();
            all.push((f.stream, f.message));
        }
        all
    }

    #[test]
    fn attach_sends_no_spec_and_events_reach_the_callback() {
        let mut reply = Vec::new();
        for (s, m) in [
            (
                0,
                Message::Ready {
                    protocol_version: 1,
                    agent_version: "g".into(),
                },
            ),
            (0, Message::Heartbeat { seq: 7 }),
            (1, Message::Stdout(b"held".to_vec())),
            (0, Message::Listening { port: 8080 }),
            // A heartbeat on a process stream is not the guest's.
            (1, Message::Heartbeat { seq: 99 }),
            (1, Message::Exited(ExitStatus::Code(0))),
        ] {
            encode_frame(s, &m, &mut reply).unwrap();
        }
        let conn = Fake {
            reply: std::io::Cursor::new(reply),
            written: Vec::new(),
        };
        let (mut out, mut err, mut events) = (Vec::new(), Vec::new(), Vec::new());
        let mut agent = AgentConn::hello(conn).unwrap();
        let st = agent
            .run_process(Begin::Attach, &mut out, &mut err, &mut |e| events.push(e))
            .unwrap();
        assert_eq!(st, ExitStatus::Code(0));
        assert_eq!(out, b"held");
        assert_eq!(
            events,
            [Event::Started, Event::Heartbeat(7), Event::Listening(8080)]
        );
        let sent = frames(&agent.into_inner().written);
        assert!(sent.contains(&(MAIN_PROCESS_STREAM, Message::Attach)));
        assert!(!sent
            .iter()
            .any(|(_, m)| matches!(m, Message::ProcessSpec(_) | Message::Start)));
    }

    #[test]
    fn watch_listen_and_the_terminal_size_are_sent_before_start() {
        let mut reply = Vec::new();
        for (s, m) in [
            (
                0,
                Message::Ready {
                    protocol_version: 1,
                    agent_version: "g".into(),
                },
            ),
            (1, Message::Exited(ExitStatus::Code(0))),
        ] {
            encode_frame(s, &m, &mut reply).unwrap();
        }
        let conn = Fake {
            reply: std::io::Cursor::new(reply),
            written: Vec::new(),
        };
        let mut agent = AgentConn::hello(conn).unwrap();
        let begin = Begin::Start {
            spec: spec(),
            watch_listen: true,
            size: Some((30, 100)),
        };
        agent
            .run_process(begin, &mut Vec::new(), &mut Vec::new(), &mut |_| {})
            .unwrap();
        let sent = frames(&agent.into_inner().written);
        let at = |want: &Message| sent.iter().position(|(_, m)| m == want).unwrap();
        assert_eq!(sent[at(&Message::WatchListen)].0, CONTROL_STREAM);
        assert!(at(&Message::WatchListen) < at(&Message::Start));
        // A terminal's size goes to the process's stream before Start.
        let resize = at(&Message::Resize {
            rows: 30,
            cols: 100,
        });
        assert_eq!(sent[resize].0, MAIN_PROCESS_STREAM);
        assert!(resize < at(&Message::Start));
    }

    #[test]
    fn run_process_splits_stdout_and_stderr_and_returns_status() {
        let mut reply = Vec::new();
        for (s, m) in [
            (
                0,
                Message::Ready {
                    protocol_version: 1,
                    agent_version: "g".into(),
                },
            ),
            (1, Message::Stdout(b"out".to_vec())),
            (1, Message::Stderr(b"err".to_vec())),
            (1, Message::Exited(ExitStatus::Code(3))),
        ] {
            encode_frame(s, &m, &mut reply).unwrap();
        }
        let conn = Fake {
            reply: std::io::Cursor::new(reply),
            written: Vec::new(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut agent = AgentConn::hello(conn).unwrap();
        let st = agent
            .run_process(start(), &mut out, &mut err, &mut |_| {})
            .unwrap();
        assert_eq!(st, ExitStatus::Code(3));
        assert_eq!(out, b"out");
        assert_eq!(err, b"err");
        // The host spoke first with a Hello frame.
        assert_eq!(agent.into_inner().written[0], agent_protocol::MAGIC);
    }

    /// A fake guest whose whole reply arrives in one read.
    struct Whole(std::io::Cursor<Vec<u8>>);
    impl Read for Whole {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Whole {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_that_arrive_with_ready_in_one_read_are_not_lost() {
        let mut reply = Vec::new();
        for (s, m) in [
            (
                0,
                Message::Ready {
                    protocol_version: 1,
                    agent_version: "g".into(),
                },
            ),
            (0, Message::Heartbeat { seq: 1 }),
            (1, Message::Stdout(b"early".to_vec())),
            (1, Message::Exited(ExitStatus::Code(7))),
        ] {
            encode_frame(s, &m, &mut reply).unwrap();
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut agent = AgentConn::hello(Whole(std::io::Cursor::new(reply))).unwrap();
        let st = agent
            .run_process(start(), &mut out, &mut err, &mut |_| {})
            .unwrap();
        assert_eq!(st, ExitStatus::Code(7));
        assert_eq!(out, b"early");
    }

    #[test]
    fn garbage_from_guest_is_an_error_not_a_panic() {
        let conn = Fake {
            reply: std::io::Cursor::new(vec![0xff; 64]),
            written: Vec::new(),
        };
        assert!(matches!(
            AgentConn::hello(conn),
            Err(HelloError::Agent(AgentError::Frame(_)))
        ));
    }

    #[test]
    fn closed_before_any_reply_is_not_listening() {
        let conn = Fake {
            reply: std::io::Cursor::new(Vec::new()),
            written: Vec::new(),
        };
        assert!(matches!(
            AgentConn::hello(conn),
            Err(HelloError::NotListening)
        ));
    }

    /// A connection the other side has closed: writes fail with EPIPE.
    struct Refused;
    impl Read for Refused {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::ConnectionReset.into())
        }
    }
    impl Write for Refused {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn refused_before_hello_is_not_listening() {
        assert!(matches!(
            AgentConn::hello(Refused),
            Err(HelloError::NotListening)
        ));
    }

    #[test]
    fn closed_after_ready_before_exit_is_closed() {
        let mut reply = Vec::new();
        encode_frame(
            0,
            &Message::Ready {
                protocol_version: 1,
                agent_version: "g".into(),
            },
            &mut reply,
        )
        .unwrap();
        let conn = Fake {
            reply: std::io::Cursor::new(reply),
            written: Vec::new(),
        };
        let mut agent = AgentConn::hello(conn).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(matches!(
            agent.run_process(start(), &mut out, &mut err, &mut |_| {}),
            Err(AgentError::Closed)
        ));
    }

    #[test]
    fn guest_error_instead_of_ready_is_reported() {
        let mut reply = Vec::new();
        encode_frame(
            0,
            &Message::Error {
                message: "no rootfs".into(),
            },
            &mut reply,
        )
        .unwrap();
        let conn = Fake {
            reply: std::io::Cursor::new(reply),
            written: Vec::new(),
        };
        assert!(matches!(
            AgentConn::hello(conn),
            Err(HelloError::Agent(AgentError::Guest(m))) if m == "no rootfs"
        ));
    }
}
