//! Message layer: the typed messages and their payload layouts.
//! Every layout: docs/agent-protocol.md, "Messages".

use crate::wire::{Reader, Writer};

/// Type codes of the messages (the header's `type` field). Control messages
/// are `0x00xx`, process messages `0x01xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    /// [`Message::Hello`].
    Hello = 0x0001,
    /// [`Message::Ready`].
    Ready = 0x0002,
    /// [`Message::Heartbeat`].
    Heartbeat = 0x0003,
    /// [`Message::Error`].
    Error = 0x0004,
    /// [`Message::TimeSync`].
    TimeSync = 0x0005,
    /// [`Message::Entropy`].
    Entropy = 0x0006,
    /// [`Message::WatchListen`].
    WatchListen = 0x0007,
    /// [`Message::Listening`].
    Listening = 0x0008,
    /// [`Message::Forward`].
    Forward = 0x0009,
    /// [`Message::Forwarding`].
    Forwarding = 0x000a,
    /// [`Message::Egress`].
    Egress = 0x000b,
    /// [`Message::ProcessSpec`].
    ProcessSpec = 0x0100,
    /// [`Message::Start`].
    Start = 0x0101,
    /// [`Message::Stdin`].
    Stdin = 0x0102,
    /// [`Message::StdinEof`].
    StdinEof = 0x0103,
    /// [`Message::Stdout`].
    Stdout = 0x0104,
    /// [`Message::Stderr`].
    Stderr = 0x0105,
    /// [`Message::Signal`].
    Signal = 0x0106,
    /// [`Message::Resize`].
    Resize = 0x0107,
    /// [`Message::Exited`].
    Exited = 0x0108,
    /// [`Message::Attach`].
    Attach = 0x0109,
}

impl MessageType {
    /// Every known type, for tests and tools.
    pub const ALL: [MessageType; 21] = [
        Self::Hello,
        Self::Ready,
        Self::Heartbeat,
        Self::Error,
        Self::TimeSync,
        Self::Entropy,
        Self::WatchListen,
        Self::Listening,
        Self::Forward,
        Self::Forwarding,
        Self::Egress,
        Self::ProcessSpec,
        Self::Start,
        Self::Stdin,
        Self::StdinEof,
        Self::Stdout,
        Self::Stderr,
        Self::Signal,
        Self::Resize,
        Self::Exited,
        Self::Attach,
    ];

    /// The type for a wire code, `None` when this build does not know it.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u16 == code)
    }
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    /// Docker's `User` syntax (`""`, `name`, `uid`, `name:group`, `uid:gid`),
    /// resolved by the guest through the image's own `/etc/passwd` and
    /// `/etc/group`; `""` is root. Supplementary groups come from `/etc/group`.
    Name(String),
    /// Numeric ids used as given, no lookup.
    Ids {
        /// User id.
        uid: u32,
        /// Primary group id.
        gid: u32,
        /// Supplementary group ids.
        groups: Vec<u32>,
    },
}

impl Default for User {
    fn default() -> Self {
        Self::Name(String::new())
    }
}

/// What process to start (Entrypoint + Cmd already joined by the host).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessSpec {
    /// argv; `argv[0]` is looked up in the process's `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Environment as `KEY=VALUE` strings; the guest adds docker's defaults
    /// (`PATH`, `HOME`, `HOSTNAME`, `TERM` with a TTY) where missing.
    pub env: Vec<String>,
    /// Working directory inside the container; `""` means `/`. Created when
    /// missing, as docker does.
    pub cwd: String,
    /// The user to run as.
    pub user: User,
    /// Run on a pseudo-terminal (stdout and stderr merge into `Stdout`).
    pub tty: bool,
    /// Keep stdin open for `Stdin` frames; otherwise stdin is `/dev/null`.
    pub stdin: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`; `code` is the low 8 bits the kernel keeps.
    Code(i32),
    /// Killed by signal `signo`.
    Signaled(i32),
}

impl ExitStatus {
    /// The status `docker run` exits with: the code, or 128 + the signal.
    pub fn docker_code(self) -> i32 {
        match self {
            Self::Code(c) => c & 0xff,
            Self::Signaled(s) => 128 + (s & 0x7f),
        }
    }
}

/// One message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame from the host on a new control connection.
    Hello {
        /// Wire version the sender speaks.
        protocol_version: u16,
        /// Sender's software version (free text, for logs).
        agent_version: String,
    },
    /// The guest's answer to Hello: it is up and accepts process messages.
    Ready {
        /// Wire version the guest speaks.
        protocol_version: u16,
        /// guest-init's version.
        agent_version: String,
    },
    /// Liveness tick; the guest sends one per second with a growing `seq`, and
    /// echoes any Heartbeat the host sends.
    Heartbeat {
        /// Sequence number.
        seq: u64,
    },
    /// A failure the peer should show the user.
    Error {
        /// Human-readable message.
        message: String,
    },
    /// Host -> guest: set the wall clock (after a restore).
    TimeSync {
        /// Nanoseconds since the Unix epoch, UTC.
        unix_nanos: u64,
    },
    /// Host -> guest: randomness to mix into (and credit to) the guest's RNG.
    Entropy(Vec<u8>),
    /// Host -> guest: report the first TCP port the container listens on
    /// (with [`Message::Listening`]).
    WatchListen,
    /// Guest -> host: a process in the guest listens on this TCP port (sent
    /// once, for the ports of the first scan that found any, after
    /// [`Message::WatchListen`]).
    Listening {
        /// The port (IPv4 or IPv6, any address).
        port: u16,
    },
    /// Host -> guest, first on a connection to [`crate::FORWARD_PORT`]: connect
    /// this connection to the guest's TCP `port` on its loopback (a published
    /// port). The guest answers [`Message::Forwarding`] or `Error`; after
    /// `Forwarding` the connection carries the TCP stream's raw bytes.
    Forward {
        /// The guest's TCP port.
        port: u16,
    },
    /// Guest -> host: the [`Message::Forward`] connection is spliced to the
    /// guest port; raw bytes follow.
    Forwarding,
    /// A `supermachine` command -> a VM's supervisor, on its control socket
    /// (never to the guest): the egress policy from now on (rules as
    /// `--egress-allow`/`--egress-deny` take them; the same frame comes back
    /// once it is in force).
    Egress {
        /// Allow rules.
        allow: Vec<String>,
        /// Deny rules.
        deny: Vec<String>,
    },
    /// Host -> guest: the process to run on this frame's stream.
    ProcessSpec(ProcessSpec),
    /// Host -> guest: start the process of this stream.
    Start,
    /// Host -> guest: bytes for the process's stdin.
    Stdin(Vec<u8>),
    /// Host -> guest: close the process's stdin.
    StdinEof,
    /// Guest -> host: bytes the process wrote to stdout (or the TTY).
    Stdout(Vec<u8>),
    /// Guest -> host: bytes the process wrote to stderr.
    Stderr(Vec<u8>),
    /// Host -> guest: deliver a signal to the process.
    Signal {
        /// Linux signal number.
        signo: i32,
    },
    /// Host -> guest: the TTY's new size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Guest -> host: the process ended; all its output was sent before.
    Exited(ExitStatus),
    /// Host -> guest: this connection carries on the running process of this
    /// stream (after a restore reset the one it started on): its output from
    /// here, and the rest of the conversation, as after Start.
    Attach,
}

/// A decoded frame: the stream it travelled on and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Stream id.
    pub stream: u32,
    /// The message.
    pub message: Message,
}

/// Errors of interpreting a payload. Not fatal for the connection: the frame
/// decoder is still at a frame boundary, so a receiver may answer with an
/// Error message and go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The type code is not one this build knows.
    #[error("unknown agent message type {kind:#06x}: the peer is newer than this build")]
    UnknownType {
        /// The code.
        kind: u16,
    },
    /// The payload ended inside a field.
    #[error("agent message payload is truncated")]
    Truncated,
    /// Bytes were left after the last field.
    #[error("agent message payload has {count} unexpected trailing bytes")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A string field is not UTF-8.
    #[error("agent message has a string field that is not valid UTF-8")]
    BadUtf8,
    /// A boolean byte other than 0 or 1.
    #[error("agent message has boolean byte {value}, expected 0 or 1")]
    BadBool {
        /// The byte.
        value: u8,
    },
    /// A tag byte (user kind, exit kind) out of range.
    #[error("agent message has {field} tag {value}, which this build does not know")]
    BadTag {
        /// Which field.
        field: &'static str,
        /// The tag.
        value: u8,
    },
}

impl Message {
    /// This message's type.
    pub fn kind(&self) -> MessageType {
        match self {
            Self::Hello { .. } => MessageType::Hello,
            Self::Ready { .. } => MessageType::Ready,
            Self::Heartbeat { .. } => MessageType::Heartbeat,
            Self::Error { .. } => MessageType::Error,
            Self::TimeSync { .. } => MessageType::TimeSync,
            Self::Entropy(_) => MessageType::Entropy,
            Self::ProcessSpec(_) => MessageType::ProcessSpec,
            Self::Start => MessageType::Start,
            Self::Stdin(_) => MessageType::Stdin,
            Self::StdinEof => MessageType::StdinEof,
            Self::Stdout(_) => MessageType::Stdout,
            Self::Stderr(_) => MessageType::Stderr,
            Self::Signal { .. } => MessageType::Signal,
            Self::Resize { .. } => MessageType::Resize,
            Self::Exited(_) => MessageType::Exited,
            Self::WatchListen => MessageType::WatchListen,
            Self::Listening { .. } => MessageType::Listening,
            Self::Attach => MessageType::Attach,
            Self::Forward { .. } => MessageType::Forward,
            Self::Forwarding => MessageType::Forwarding,
            Self::Egress { .. } => MessageType::Egress,
        }
    }

    /// Appends the payload (not the header) to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        match self {
            Self::Hello {
                protocol_version,
                agent_version,
            }
            | Self::Ready {
                protocol_version,
                agent_version,
            } => {
                w.u16(*protocol_version);
                w.str(agent_version);
            }
            Self::Heartbeat { seq } => w.u64(*seq),
            Self::Error { message } => w.str(message),
            Self::TimeSync { unix_nanos } => w.u64(*unix_nanos),
            Self::Entropy(d) | Self::Stdin(d) | Self::Stdout(d) | Self::Stderr(d) => {
                w.0.extend_from_slice(d)
            }
            Self::ProcessSpec(p) => {
                w.strs(&p.argv);
                w.strs(&p.env);
                w.str(&p.cwd);
                match &p.user {
                    User::Name(n) => {
                        w.u8(0);
                        w.str(n);
                    }
                    User::Ids { uid, gid, groups } => {
                        w.u8(1);
                        w.u32(*uid);
                        w.u32(*gid);
                        w.u32s(groups);
                    }
                }
                w.bool(p.tty);
                w.bool(p.stdin);
            }
            Self::Start | Self::StdinEof | Self::WatchListen | Self::Attach | Self::Forwarding => {}
            Self::Listening { port } | Self::Forward { port } => w.u16(*port),
            Self::Egress { allow, deny } => {
                w.strs(allow);
                w.strs(deny);
            }
            Self::Signal { signo } => w.i32(*signo),
            Self::Resize { rows, cols } => {
                w.u16(*rows);
                w.u16(*cols);
            }
            Self::Exited(s) => match s {
                ExitStatus::Code(c) => {
                    w.u8(0);
                    w.i32(*c);
                }
                ExitStatus::Signaled(s) => {
                    w.u8(1);
                    w.i32(*s);
                }
            },
        }
    }

    /// Decodes the payload of a frame of type `kind`. Layouts are exact: short
    /// or trailing bytes are errors.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Self, MessageError> {
        let t = MessageType::from_code(kind).ok_or(MessageError::UnknownType { kind })?;
        let mut r = Reader::new(payload);
        let msg = match t {
            MessageType::Hello => Self::Hello {
                protocol_version: r.u16()?,
                agent_version: r.str()?,
            },
            MessageType::Ready => Self::Ready {
                protocol_version: r.u16()?,
                agent_version: r.str()?,
            },
            MessageType::Heartbeat => Self::Heartbeat { seq: r.u64()? },
            MessageType::Error => Self::Error { message: r.str()? },
            MessageType::TimeSync => Self::TimeSync {
                unix_nanos: r.u64()?,
            },
            MessageType::Entropy => Self::Entropy(r.rest()),
            MessageType::WatchListen => Self::WatchListen,
            MessageType::Listening => Self::Listening { port: r.u16()? },
            MessageType::Attach => Self::Attach,
            MessageType::Forward => Self::Forward { port: r.u16()? },
            MessageType::Forwarding => Self::Forwarding,
            MessageType::Egress => Self::Egress {
                allow: r.strs()?,
                deny: r.strs()?,
            },
            MessageType::Stdin => Self::Stdin(r.rest()),
            MessageType::Stdout => Self::Stdout(r.rest()),
            MessageType::Stderr => Self::Stderr(r.rest()),
            MessageType::ProcessSpec => {
                let argv = r.strs()?;
                let env = r.strs()?;
                let cwd = r.str()?;
                let user = match r.u8()? {
                    0 => User::Name(r.str()?),
                    1 => User::Ids {
                        uid: r.u32()?,
                        gid: r.u32()?,
                        groups: r.u32s()?,
                    },
                    v => {
                        return Err(MessageError::BadTag {
                            field: "user",
                            value: v,
                        })
                    }
                };
                Self::ProcessSpec(ProcessSpec {
                    argv,
                    env,
                    cwd,
                    user,
                    tty: r.bool()?,
                    stdin: r.bool()?,
                })
            }
            MessageType::Start => Self::Start,
            MessageType::StdinEof => Self::StdinEof,
            MessageType::Signal => Self::Signal { signo: r.i32()? },
            MessageType::Resize => Self::Resize {
                rows: r.u16()?,
                cols: r.u16()?,
            },
            MessageType::Exited => match r.u8()? {
                0 => Self::Exited(ExitStatus::Code(r.i32()?)),
                1 => Self::Exited(ExitStatus::Signaled(r.i32()?)),
                v => {
                    return Err(MessageError::BadTag {
                        field: "exit status",
                        value: v,
                    })
                }
            },
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_frame, FrameDecoder};

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                protocol_version: 1,
                agent_version: "supermachine 0.1.0".into(),
            },
            Message::Ready {
                protocol_version: 1,
                agent_version: "guest-init 0.1.0".into(),
            },
            Message::Heartbeat { seq: u64::MAX },
            Message::Error {
                message: "no such file: /bin/nope ✗".into(),
            },
            Message::TimeSync {
                unix_nanos: 1_700_000_000_123_456_789,
            },
            Message::Entropy(vec![1, 2, 3, 4]),
            Message::ProcessSpec(ProcessSpec {
                argv: vec!["/bin/sh".into(), "-c".into(), "exit 42".into()],
                env: vec!["A=1".into(), "EMPTY=".into()],
                cwd: "/work".into(),
                user: User::Name("nobody:nogroup".into()),
                tty: false,
                stdin: true,
            }),
            Message::ProcessSpec(ProcessSpec {
                user: User::Ids {
                    uid: 1000,
                    gid: 100,
                    groups: vec![10, 20],
                },
                tty: true,
                ..ProcessSpec::default()
            }),
            Message::Start,
            Message::Stdin(b"input\n".to_vec()),
            Message::StdinEof,
            Message::Stdout(Vec::new()),
            Message::Stderr(vec![0xff, 0x00]),
            Message::Signal { signo: 15 },
            Message::Resize { rows: 24, cols: 80 },
            Message::Exited(ExitStatus::Code(42)),
            Message::Exited(ExitStatus::Signaled(9)),
            Message::WatchListen,
            Message::Listening { port: 8080 },
            Message::Attach,
            Message::Forward { port: 80 },
            Message::Forwarding,
            Message::Egress {
                allow: vec!["192.0.2.1:80".into(), "dns".into()],
                deny: vec![],
            },
        ]
    }

    #[test]
    fn message_every_sample_round_trips_through_frames() {
        let mut wire = Vec::new();
        let msgs = samples();
        for (i, m) in msgs.iter().enumerate() {
            encode_frame(i as u32, m, &mut wire).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut input = wire.as_slice();
        let mut got = Vec::new();
        while let Some(raw) = dec.decode(&mut input).unwrap() {
            got.push(raw.to_frame().unwrap());
        }
        assert_eq!(got.len(), msgs.len());
        for (i, (f, m)) in got.iter().zip(&msgs).enumerate() {
            assert_eq!(f.stream, i as u32);
            assert_eq!(&f.message, m);
        }
    }

    #[test]
    fn message_type_codes_unique_and_mapped() {
        for t in MessageType::ALL {
            assert_eq!(MessageType::from_code(t as u16), Some(t));
        }
        let mut codes: Vec<u16> = MessageType::ALL.iter().map(|t| *t as u16).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), MessageType::ALL.len());
        assert_eq!(MessageType::from_code(0), None);
    }

    #[test]
    fn message_every_truncation_rejected() {
        // Every strict prefix of a fixed-layout payload is an error, never a panic.
        for m in samples() {
            let mut p = Vec::new();
            m.encode_payload(&mut p);
            let raw_data = matches!(
                m,
                Message::Entropy(_) | Message::Stdin(_) | Message::Stdout(_) | Message::Stderr(_)
            );
            for cut in 0..p.len() {
                let r = Message::decode(m.kind() as u16, &p[..cut]);
                if raw_data {
                    assert!(r.is_ok());
                } else {
                    assert!(r.is_err(), "{m:?} cut at {cut} decoded: {r:?}");
                }
            }
        }
    }

    #[test]
    fn message_trailing_bytes_rejected() {
        assert_eq!(
            Message::decode(MessageType::Start as u16, &[0]),
            Err(MessageError::TrailingBytes { count: 1 })
        );
        assert_eq!(
            Message::decode(MessageType::Signal as u16, &[15, 0, 0, 0, 1, 2]),
            Err(MessageError::TrailingBytes { count: 2 })
        );
    }

    #[test]
    fn message_hostile_string_length_rejected_without_allocation() {
        // Error { message } with a length of 4 GiB - 1 in a 4-byte payload.
        assert_eq!(
            Message::decode(MessageType::Error as u16, &[0xff, 0xff, 0xff, 0xff]),
            Err(MessageError::Truncated)
        );
    }

    #[test]
    fn message_hostile_list_count_rejected() {
        // argv count u32::MAX with no items.
        assert_eq!(
            Message::decode(MessageType::ProcessSpec as u16, &[0xff, 0xff, 0xff, 0xff]),
            Err(MessageError::Truncated)
        );
    }

    #[test]
    fn message_bad_utf8_bool_and_tags_rejected() {
        assert_eq!(
            Message::decode(MessageType::Error as u16, &[1, 0, 0, 0, 0xff]),
            Err(MessageError::BadUtf8)
        );
        let mut p = Vec::new();
        Message::ProcessSpec(ProcessSpec::default()).encode_payload(&mut p);
        let last = p.len() - 1;
        p[last] = 2;
        assert_eq!(
            Message::decode(MessageType::ProcessSpec as u16, &p),
            Err(MessageError::BadBool { value: 2 })
        );
        // User tag sits after argv count, env count and cwd length (3 x u32).
        let mut p = Vec::new();
        Message::ProcessSpec(ProcessSpec::default()).encode_payload(&mut p);
        p[12] = 7;
        assert_eq!(
            Message::decode(MessageType::ProcessSpec as u16, &p),
            Err(MessageError::BadTag {
                field: "user",
                value: 7
            })
        );
        assert_eq!(
            Message::decode(MessageType::Exited as u16, &[3, 0, 0, 0, 0]),
            Err(MessageError::BadTag {
                field: "exit status",
                value: 3
            })
        );
    }

    #[test]
    fn message_payload_layout_matches_docs() {
        let mut p = Vec::new();
        Message::Exited(ExitStatus::Signaled(15)).encode_payload(&mut p);
        assert_eq!(p, [1, 15, 0, 0, 0]);
        let mut p = Vec::new();
        Message::Resize { rows: 24, cols: 80 }.encode_payload(&mut p);
        assert_eq!(p, [24, 0, 80, 0]);
        let mut p = Vec::new();
        Message::Hello {
            protocol_version: 1,
            agent_version: "v".into(),
        }
        .encode_payload(&mut p);
        assert_eq!(p, [1, 0, 1, 0, 0, 0, b'v']);
    }

    #[test]
    fn message_docs_example_bytes_match() {
        let mut wire = Vec::new();
        encode_frame(1, &Message::Exited(ExitStatus::Signaled(15)), &mut wire).unwrap();
        assert_eq!(
            wire,
            [0x53, 0x01, 0x08, 0x01, 1, 0, 0, 0, 5, 0, 0, 0, 1, 0x0f, 0, 0, 0]
        );
    }

    #[test]
    fn exit_status_docker_code_maps_signals_to_128_plus() {
        assert_eq!(ExitStatus::Code(0).docker_code(), 0);
        assert_eq!(ExitStatus::Code(42).docker_code(), 42);
        assert_eq!(ExitStatus::Code(256 + 3).docker_code(), 3);
        assert_eq!(ExitStatus::Signaled(9).docker_code(), 137);
        assert_eq!(ExitStatus::Signaled(15).docker_code(), 143);
    }
}
