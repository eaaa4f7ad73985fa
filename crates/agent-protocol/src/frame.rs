//! Frame layer: the 12-byte header, the streaming decoder and the encoder.
//! Layout: docs/agent-protocol.md, "Frame".

use crate::message::{Frame, Message};

/// First header byte of every frame (`'S'`).
pub const MAGIC: u8 = 0x53;

/// The wire version this crate speaks (second header byte). A frame of any
/// other version is refused: layouts of different versions are not compatible.
pub const VERSION: u8 = 1;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// Largest payload a frame may carry (1 MiB). The decoder refuses a longer
/// length from the header before allocating anything; senders split stdout,
/// stderr and stdin data into frames of at most this size.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type code ([`crate::MessageType`] for the known ones).
    pub kind: u16,
    /// Stream the frame belongs to (0: control channel).
    pub stream: u32,
    /// Payload length in bytes, at most [`MAX_PAYLOAD`].
    pub len: u32,
}

impl FrameHeader {
    /// Parses and checks a header: magic, version and the payload cap.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        if bytes[0] != MAGIC {
            return Err(FrameError::BadMagic { found: bytes[0] });
        }
        if bytes[1] != VERSION {
            return Err(FrameError::UnsupportedVersion { found: bytes[1] });
        }
        let kind = u16::from_le_bytes([bytes[2], bytes[3]]);
        let stream = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_PAYLOAD,
            });
        }
        Ok(Self { kind, stream, len })
    }

    /// The header's 12 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = MAGIC;
        b[1] = VERSION;
        b[2..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.stream.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// A frame whose header is valid and whose payload is complete, not yet
/// interpreted as a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Message type code.
    pub kind: u16,
    /// Stream id.
    pub stream: u32,
    /// The payload, at most [`MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// Interprets the payload as the message its type code names.
    pub fn to_frame(&self) -> Result<Frame, crate::MessageError> {
        Ok(Frame {
            stream: self.stream,
            message: Message::decode(self.kind, &self.payload)?,
        })
    }
}

/// Errors of the frame layer. All are fatal for the connection: after one, the
/// byte stream cannot be trusted to be at a frame boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first header byte is not [`MAGIC`]: the peer does not speak this
    /// protocol, or the stream lost sync.
    #[error("agent frame has magic byte {found:#04x}, expected {MAGIC:#04x}: the peer does not speak the supermachine agent protocol or the stream is corrupt")]
    BadMagic {
        /// The byte found.
        found: u8,
    },
    /// The peer speaks a wire version this build does not.
    #[error("agent frame has protocol version {found}, this build speaks version {VERSION}: update the guest initramfs and the host together")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The header announces a payload longer than [`MAX_PAYLOAD`].
    #[error("agent frame announces a {len}-byte payload, more than the {max}-byte limit")]
    TooLarge {
        /// Announced payload length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The decoder already failed; the stream is out of sync.
    #[error("agent frame decoder already failed on this stream; the connection must be closed")]
    Poisoned,
}

/// Errors of encoding a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded payload is longer than [`MAX_PAYLOAD`]; split data messages.
    #[error("agent message payload of {len} bytes exceeds the {max}-byte frame limit; split it into smaller frames")]
    TooLarge {
        /// Encoded payload length.
        len: usize,
        /// The limit.
        max: u32,
    },
}

/// Streaming frame decoder. Feed it whatever a read returned; it keeps at most
/// one partial frame (header bytes plus a payload buffer no larger than the
/// length the checked header announced).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Set once the header is complete and valid.
    current: Option<FrameHeader>,
    payload: Vec<u8>,
    poisoned: bool,
}

impl FrameDecoder {
    /// A decoder at a frame boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes bytes from the front of `input` until one frame is complete and
    /// returns it, leaving the rest of `input` for the next call. Returns
    /// `Ok(None)` once `input` is empty without a complete frame (the partial
    /// frame is kept). Call it in a loop until it returns `None`.
    ///
    /// A [`FrameError`] poisons the decoder: every later call returns
    /// [`FrameError::Poisoned`].
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<RawFrame>, FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        let header = match self.current {
            Some(h) => h,
            None => {
                let want = HEADER_LEN - self.header_len;
                let take = want.min(input.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&input[..take]);
                self.header_len += take;
                *input = &input[take..];
                if self.header_len < HEADER_LEN {
                    return Ok(None);
                }
                match FrameHeader::parse(&self.header) {
                    Ok(h) => {
                        self.current = Some(h);
                        // Bounded by MAX_PAYLOAD: parse() checked it.
                        self.payload = Vec::with_capacity(h.len as usize);
                        h
                    }
                    Err(e) => {
                        self.poisoned = true;
                        return Err(e);
                    }
                }
            }
        };
        let want = header.len as usize - self.payload.len();
        let take = want.min(input.len());
        self.payload.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.payload.len() < header.len as usize {
            return Ok(None);
        }
        self.current = None;
        self.header_len = 0;
        Ok(Some(RawFrame {
            kind: header.kind,
            stream: header.stream,
            payload: std::mem::take(&mut self.payload),
        }))
    }

    /// True when no partial frame is buffered (a clean place for the stream to
    /// end).
    pub fn is_at_boundary(&self) -> bool {
        self.header_len == 0 && self.current.is_none()
    }
}

/// Appends one frame carrying `message` on `stream` to `out`.
pub fn encode_frame(stream: u32, message: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    message.encode_payload(out);
    let len = out.len() - start - HEADER_LEN;
    let Some(len32) = u32::try_from(len).ok().filter(|l| *l <= MAX_PAYLOAD) else {
        out.truncate(start);
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    };
    let header = FrameHeader {
        kind: message.kind() as u16,
        stream,
        len: len32,
    };
    out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(())
}

/// Appends one frame with an arbitrary type code and payload to `out` (for
/// tests and tools that must produce frames this build does not know).
pub fn encode_raw(
    kind: u16,
    stream: u32,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(EncodeError::TooLarge {
            len: payload.len(),
            max: MAX_PAYLOAD,
        })?;
    out.extend_from_slice(&FrameHeader { kind, stream, len }.to_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MessageType;

    fn decode_all(dec: &mut FrameDecoder, mut input: &[u8]) -> Result<Vec<RawFrame>, FrameError> {
        let mut frames = Vec::new();
        while let Some(f) = dec.decode(&mut input)? {
            frames.push(f);
        }
        assert!(input.is_empty());
        Ok(frames)
    }

    #[test]
    fn header_layout_matches_docs() {
        let h = FrameHeader {
            kind: 0x0102,
            stream: 0x0304_0506,
            len: 7,
        };
        assert_eq!(
            h.to_bytes(),
            [0x53, 0x01, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 7, 0, 0, 0]
        );
        assert_eq!(FrameHeader::parse(&h.to_bytes()), Ok(h));
    }

    #[test]
    fn decode_byte_at_a_time_yields_frames() {
        let mut wire = Vec::new();
        encode_frame(3, &Message::Stdout(b"hello".to_vec()), &mut wire).unwrap();
        encode_frame(0, &Message::Start, &mut wire).unwrap();
        let mut dec = FrameDecoder::new();
        let mut frames = Vec::new();
        for b in &wire {
            let mut one: &[u8] = std::slice::from_ref(b);
            if let Some(f) = dec.decode(&mut one).unwrap() {
                frames.push(f);
            }
            assert!(one.is_empty());
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].stream, 3);
        assert_eq!(frames[0].payload, b"hello");
        assert_eq!(frames[1].kind, MessageType::Start as u16);
        assert!(frames[1].payload.is_empty());
        assert!(dec.is_at_boundary());
    }

    #[test]
    fn decode_one_call_returns_one_frame_and_leaves_rest() {
        let mut wire = Vec::new();
        encode_frame(1, &Message::StdinEof, &mut wire).unwrap();
        encode_frame(2, &Message::StdinEof, &mut wire).unwrap();
        let mut dec = FrameDecoder::new();
        let mut input = wire.as_slice();
        let first = dec.decode(&mut input).unwrap().unwrap();
        assert_eq!(first.stream, 1);
        assert_eq!(input.len(), HEADER_LEN);
        let second = dec.decode(&mut input).unwrap().unwrap();
        assert_eq!(second.stream, 2);
        assert_eq!(dec.decode(&mut input).unwrap(), None);
    }

    #[test]
    fn decode_truncated_frame_waits_without_output() {
        let mut wire = Vec::new();
        encode_frame(1, &Message::Stderr(vec![9; 100]), &mut wire).unwrap();
        let mut dec = FrameDecoder::new();
        assert_eq!(
            decode_all(&mut dec, &wire[..wire.len() - 1]).unwrap(),
            vec![]
        );
        assert!(!dec.is_at_boundary());
        let frames = decode_all(&mut dec, &wire[wire.len() - 1..]).unwrap();
        assert_eq!(frames[0].payload, vec![9; 100]);
    }

    #[test]
    fn decode_wrong_magic_rejected_and_poisoned() {
        let mut dec = FrameDecoder::new();
        let bad = [0x54, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decode_all(&mut dec, &bad),
            Err(FrameError::BadMagic { found: 0x54 })
        );
        let mut good = Vec::new();
        encode_frame(0, &Message::Start, &mut good).unwrap();
        assert_eq!(decode_all(&mut dec, &good), Err(FrameError::Poisoned));
    }

    #[test]
    fn decode_other_version_rejected() {
        let mut dec = FrameDecoder::new();
        let bad = [MAGIC, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decode_all(&mut dec, &bad),
            Err(FrameError::UnsupportedVersion { found: 2 })
        );
    }

    #[test]
    fn decode_oversize_length_rejected_before_payload() {
        let mut dec = FrameDecoder::new();
        let mut bad = FrameHeader {
            kind: MessageType::Stdout as u16,
            stream: 1,
            len: 0,
        }
        .to_bytes();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        // Only the header is given: the error comes before any payload arrives.
        assert_eq!(
            decode_all(&mut dec, &bad),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: MAX_PAYLOAD
            })
        );
        assert_eq!(dec.payload.capacity(), 0);
    }

    #[test]
    fn decode_max_payload_accepted() {
        let mut wire = Vec::new();
        let data = vec![0xab; MAX_PAYLOAD as usize];
        encode_frame(5, &Message::Stdout(data.clone()), &mut wire).unwrap();
        let frames = decode_all(&mut FrameDecoder::new(), &wire).unwrap();
        assert_eq!(frames[0].payload, data);
    }

    #[test]
    fn encode_oversize_payload_refused_and_output_untouched() {
        let mut out = vec![1, 2, 3];
        let data = vec![0; MAX_PAYLOAD as usize + 1];
        assert_eq!(
            encode_frame(1, &Message::Stdout(data), &mut out),
            Err(EncodeError::TooLarge {
                len: MAX_PAYLOAD as usize + 1,
                max: MAX_PAYLOAD
            })
        );
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn decode_unknown_type_stays_in_sync() {
        let mut wire = Vec::new();
        encode_raw(0x7777, 0, b"future", &mut wire).unwrap();
        encode_frame(0, &Message::Heartbeat { seq: 4 }, &mut wire).unwrap();
        let frames = decode_all(&mut FrameDecoder::new(), &wire).unwrap();
        assert_eq!(
            frames[0].to_frame(),
            Err(crate::MessageError::UnknownType { kind: 0x7777 })
        );
        assert_eq!(
            frames[1].to_frame().unwrap().message,
            Message::Heartbeat { seq: 4 }
        );
    }
    #[test]
    fn decode_mutated_streams_in_random_chunks_never_panic() {
        // Deterministic xorshift: valid frames with random bytes flipped, fed
        // in random chunk sizes (the fuzz target does this at scale).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut base = Vec::new();
        encode_frame(1, &Message::Stdout(b"out".to_vec()), &mut base).unwrap();
        encode_frame(0, &Message::Heartbeat { seq: 9 }, &mut base).unwrap();
        encode_frame(
            1,
            &Message::ProcessSpec(crate::ProcessSpec {
                argv: vec!["sh".into()],
                ..Default::default()
            }),
            &mut base,
        )
        .unwrap();
        for _ in 0..2000 {
            let mut wire = base.clone();
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % wire.len();
                wire[i] = next() as u8;
            }
            let mut dec = FrameDecoder::new();
            let mut rest = wire.as_slice();
            'feed: while !rest.is_empty() {
                let n = ((next() as usize) % 17 + 1).min(rest.len());
                let (mut piece, tail) = rest.split_at(n);
                rest = tail;
                loop {
                    match dec.decode(&mut piece) {
                        Ok(Some(raw)) => {
                            assert!(raw.payload.len() <= MAX_PAYLOAD as usize);
                            let _ = raw.to_frame();
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
        }
    }
}
