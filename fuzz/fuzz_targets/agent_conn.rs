//! The host side of the agent conversation (`supermachine::agent::AgentConn`,
//! compiled in from its source: the facade crate itself builds guest assets
//! that have no place in a fuzz build) against a hostile guest.
//!
//! The first byte picks how the guest's bytes are cut into reads; the rest is
//! what the guest sends. Checked: no panic, the conversation ends (the bytes
//! are finite), everything the host writes is well-formed frames, and what
//! reaches stdout and stderr is exactly the Stdout and Stderr payloads the
//! guest sent after Ready on any stream, in order, up to the main process's
//! Exited (all of them when the run succeeds, a prefix when it fails), and
//! the heartbeats and listening ports of the control stream reach the event
//! callback the same way. The first byte's low bit also picks whether the
//! host starts a process or attaches to a restored one.
#![no_main]

#[path = "../../crates/supermachine/src/agent.rs"]
#[allow(dead_code)]
mod agent;

use std::io::{Read, Write};

use agent_protocol::{FrameDecoder, Message, CONTROL_STREAM, MAIN_PROCESS_STREAM};
use libfuzzer_sys::fuzz_target;

struct Guest<'a> {
    reply: &'a [u8],
    chunk: usize,
    written: Vec<u8>,
}

impl Read for Guest<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = b.len().min(self.chunk).min(self.reply.len());
        b[..n].copy_from_slice(&self.reply[..n]);
        self.reply = &self.reply[n..];
        Ok(n)
    }
}

impl Write for Guest<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a correct host shows for `bytes`.
struct Seen {
    out: Vec<u8>,
    err: Vec<u8>,
    events: Vec<agent::Event>,
    status: Option<agent_protocol::ExitStatus>,
}

/// What a correct host shows for `bytes`: stdout, stderr, the events and the
/// exit status, if the guest's bytes get that far.
fn oracle(bytes: &[u8]) -> Seen {
    let mut dec = FrameDecoder::new();
    let mut input = bytes;
    let (mut out, mut err, mut events) = (Vec::new(), Vec::new(), Vec::new());
    let mut ready = false;
    while let Ok(Some(raw)) = dec.decode(&mut input) {
        let Ok(frame) = raw.to_frame() else { continue };
        match frame.message {
            Message::Ready { .. } if !ready => ready = true,
            Message::Error { .. } if !ready => break,
            Message::Stdout(d) if ready => out.extend_from_slice(&d),
            Message::Stderr(d) if ready => err.extend_from_slice(&d),
            Message::Heartbeat { seq } if ready && frame.stream == CONTROL_STREAM => {
                events.push(agent::Event::Heartbeat(seq))
            }
            Message::Listening { port } if ready && frame.stream == CONTROL_STREAM => {
                events.push(agent::Event::Listening(port))
            }
            Message::Exited(st) if ready && frame.stream == MAIN_PROCESS_STREAM => {
                return Seen {
                    out,
                    err,
                    events,
                    status: Some(st),
                };
            }
            _ => {}
        }
    }
    Seen {
        out,
        err,
        events,
        status: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, reply)) = data.split_first() else {
        return;
    };
    let guest = Guest {
        reply,
        chunk: usize::from(chunk).max(1),
        written: Vec::new(),
    };
    let want = oracle(reply);
    let (mut out, mut err, mut events) = (Vec::new(), Vec::new(), Vec::new());
    let written = match agent::AgentConn::hello(guest) {
        Ok(mut conn) => {
            let spec = agent_protocol::ProcessSpec {
                argv: vec!["sh".into()],
                env: vec![],
                cwd: String::new(),
                user: agent_protocol::User::Name(String::new()),
                tty: false,
                stdin: false,
            };
            let begin = if chunk & 1 == 1 {
                agent::Begin::Attach
            } else {
                agent::Begin::Start {
                    spec,
                    watch_listen: chunk & 2 == 2,
                    size: (chunk & 4 == 4).then_some((24, 80)),
                }
            };
            let r = conn.run_process(begin, &mut out, &mut err, &mut |e| events.push(e));
            // Started comes first, once, as the spec (or Attach) is sent; the
            // rest is what the guest said.
            assert_eq!(events.first(), Some(&agent::Event::Started));
            events.remove(0);
            assert!(!events.contains(&agent::Event::Started));
            match r {
                Ok(status) => {
                    assert_eq!(Some(status), want.status);
                    assert_eq!(out, want.out);
                    assert_eq!(events, want.events);
                    // A process that never ran has its reason appended.
                    assert!(err.starts_with(&want.err));
                }
                Err(_) => {
                    assert!(want.out.starts_with(&out));
                    assert!(want.err.starts_with(&err));
                    assert!(want.events.starts_with(&events));
                }
            }
            conn.into_inner().written
        }
        Err(_) => return,
    };
    // The host's own bytes are frames, every one of them.
    let mut dec = FrameDecoder::new();
    let mut w = written.as_slice();
    while !w.is_empty() {
        let raw = dec
            .decode(&mut w)
            .expect("the host wrote a bad frame")
            .expect("the host wrote a partial frame");
        raw.to_frame().expect("the host wrote an undecodable message");
    }
});
