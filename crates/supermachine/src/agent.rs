//! The host side of the agent conversation (docs/agent-protocol.md): Hello/Ready,
//! clock, the process spec and Start, then the process's output until `Exited`.

use std::io::{Read, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use agent_protocol::{
    encode_frame, ExitStatus, FrameDecoder, Message, ProcessSpec, CONTROL_STREAM,
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

/// Runs `spec` through the agent on `conn`; the process's stdout and stderr go to
/// `out` and `err` as they arrive. Returns how the process ended.
pub fn run_process<C: Read + Write>(
    conn: &mut C,
    spec: ProcessSpec,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<ExitStatus, AgentError> {
    let version = concat!("supermachine ", env!("CARGO_PKG_VERSION")).to_string();
    send(
        conn,
        CONTROL_STREAM,
        &Message::Hello {
            protocol_version: u16::from(agent_protocol::VERSION),
            agent_version: version,
        },
    )?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    send(conn, CONTROL_STREAM, &Message::TimeSync { unix_nanos: now })?;
    let mut seed = vec![0u8; 64];
    if getrandom::fill(&mut seed).is_ok() {
        send(conn, CONTROL_STREAM, &Message::Entropy(seed))?;
    }
    send(conn, MAIN_PROCESS_STREAM, &Message::ProcessSpec(spec))?;
    send(conn, MAIN_PROCESS_STREAM, &Message::Start)?;

    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut guest_error: Option<String> = None;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Err(guest_error.map_or(AgentError::Closed, AgentError::Guest));
        }
        let mut input = &buf[..n];
        while let Some(raw) = decoder.decode(&mut input)? {
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
                Message::Heartbeat { .. } | Message::Ready { .. } => {}
                Message::Error { message } => guest_error = Some(message),
                Message::Exited(status) if frame.stream == MAIN_PROCESS_STREAM => {
                    if let Some(m) = guest_error.take() {
                        // The process never ran (126/127): say why, as docker does.
                        let _ = writeln!(err, "supermachine: {m}");
                    }
                    return Ok(status);
                }
                _ => {}
            }
        }
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
        let mut conn = Fake {
            reply: std::io::Cursor::new(reply),
            written: Vec::new(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let st = run_process(&mut conn, spec(), &mut out, &mut err).unwrap();
        assert_eq!(st, ExitStatus::Code(3));
        assert_eq!(out, b"out");
        assert_eq!(err, b"err");
        // The host spoke first with a Hello frame.
        assert_eq!(conn.written[0], agent_protocol::MAGIC);
    }

    #[test]
    fn run_process_garbage_from_guest_is_an_error_not_a_panic() {
        let mut conn = Fake {
            reply: std::io::Cursor::new(vec![0xff; 64]),
            written: Vec::new(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(matches!(
            run_process(&mut conn, spec(), &mut out, &mut err),
            Err(AgentError::Frame(_))
        ));
    }

    #[test]
    fn run_process_closed_early_is_an_error() {
        let mut conn = Fake {
            reply: std::io::Cursor::new(Vec::new()),
            written: Vec::new(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(matches!(
            run_process(&mut conn, spec(), &mut out, &mut err),
            Err(AgentError::Closed)
        ));
    }
}
