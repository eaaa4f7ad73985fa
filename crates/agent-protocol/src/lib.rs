//! The host<->guest agent protocol of supermachine: the messages that the VMM and
//! the guest's PID 1 (`guest-init`) exchange over virtio-vsock, and their wire
//! format. `docs/agent-protocol.md` specifies the format byte for byte; this
//! crate is its only implementation, shared by both sides.
//!
//! A frame is a 12-byte little-endian header and a payload:
//!
//! ```text
//! magic u8 = 0x53 | version u8 = 1 | type u16 | stream id u32 | payload length u32 | payload
//! ```
//!
//! - [`FrameDecoder`] is fed arbitrary byte chunks (as `read(2)` returns them) and
//!   yields [`RawFrame`]s; it checks magic, version and the [`MAX_PAYLOAD`] cap on
//!   the header *before* allocating the payload, and never buffers more than one
//!   frame.
//! - [`Message::decode`] turns a raw frame into a typed [`Message`]; unknown
//!   types and malformed payloads are typed errors that leave the decoder in sync.
//! - [`encode_frame`] writes one frame.
//!
//! The bytes come from the other side of a VM boundary, so everything here treats
//! them as hostile: no panics, no allocation sized by an unchecked length, no
//! `unsafe` (forbidden). The payload encoding is hand-written (fixed-width
//! little-endian integers, `u32`-length-prefixed strings and byte strings): the
//! message set is small and flat, a hand-written layout is specified exactly in
//! the docs without pointing at a third-party format's versioning, and the guest
//! binary keeps no encoding dependency.
//!
//! This crate must never depend on the VMM, a hypervisor backend or an async
//! runtime: the guest links it into a static musl binary.
#![forbid(unsafe_code)]

pub mod cmdline;
pub mod forward;
mod frame;
mod message;
pub mod power;
mod wire;

pub use frame::{
    encode_frame, encode_raw, EncodeError, FrameDecoder, FrameError, FrameHeader, RawFrame,
    HEADER_LEN, MAGIC, MAX_PAYLOAD, VERSION,
};
pub use message::{ExitStatus, Frame, Message, MessageError, MessageType, ProcessSpec, User};

/// The vsock port the guest agent listens on for the control channel
/// (connection from the host, CID 2, to the guest's CID).
pub const CONTROL_PORT: u32 = 1024;

/// The vsock port the guest agent listens on for published ports: each
/// connection starts with [`Message::Forward`] and then carries one TCP
/// connection to a guest port (docs/agent-protocol.md, "Published ports").
pub const FORWARD_PORT: u32 = 1025;

/// The vsock port the guest agent listens on for `exec`: each connection
/// carries one new process in the container, started by its first frames
/// (`ProcessSpec`, optional `Resize`, `Start`) and then talked to like the
/// main process (docs/agent-protocol.md, "Exec").
pub const EXEC_PORT: u32 = 1026;

/// Stream id of the control channel: messages about the VM as a whole (Hello,
/// Ready, Heartbeat, TimeSync, Entropy, VM-level Error).
pub const CONTROL_STREAM: u32 = 0;

/// Stream id of the container's main process (the image's Entrypoint + Cmd).
pub const MAIN_PROCESS_STREAM: u32 = 1;

/// Stream id supermachine gives the process of an exec connection (one
/// process per connection; the guest answers on whichever non-zero stream
/// its `ProcessSpec` came on).
pub const EXEC_STREAM: u32 = 2;
