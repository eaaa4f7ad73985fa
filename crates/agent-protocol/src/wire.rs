//! Payload primitives: fixed-width little-endian integers, `u8` booleans,
//! `u32`-length-prefixed byte strings and UTF-8 strings, `u32`-count-prefixed
//! lists. Layout: docs/agent-protocol.md, "Payload encoding".

use crate::message::MessageError;

/// Appends primitives to a payload.
pub(crate) struct Writer<'a>(pub(crate) &'a mut Vec<u8>);

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    /// A length that does not fit a `u32` is written saturated; the frame cap
    /// (1 MiB) refuses such a payload in `encode_frame` anyway.
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
    }
    pub(crate) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    pub(crate) fn strs(&mut self, v: &[String]) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        for s in v {
            self.str(s);
        }
    }
    pub(crate) fn u32s(&mut self, v: &[u32]) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        for x in v {
            self.u32(*x);
        }
    }
}

/// Reads primitives from a payload; every length is checked against the bytes
/// that remain before anything is allocated.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        if n > self.buf.len() {
            return Err(MessageError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MessageError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, MessageError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, MessageError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn i32(&mut self) -> Result<i32, MessageError> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, MessageError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn bool(&mut self) -> Result<bool, MessageError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(MessageError::BadBool { value: v }),
        }
    }
    pub(crate) fn str(&mut self) -> Result<String, MessageError> {
        let len = self.u32()? as usize;
        let raw = self.take(len)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| MessageError::BadUtf8)
    }
    /// A list never preallocates from its count: each item consumes at least
    /// four bytes, so a hostile count runs into `Truncated` quickly.
    pub(crate) fn strs(&mut self) -> Result<Vec<String>, MessageError> {
        let count = self.u32()?;
        let mut v = Vec::new();
        for _ in 0..count {
            v.push(self.str()?);
        }
        Ok(v)
    }
    pub(crate) fn u32s(&mut self) -> Result<Vec<u32>, MessageError> {
        let count = self.u32()?;
        let mut v = Vec::new();
        for _ in 0..count {
            v.push(self.u32()?);
        }
        Ok(v)
    }
    /// The rest of the payload (for data messages, whose payload is raw bytes).
    pub(crate) fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).to_vec()
    }
    /// Errors if bytes are left: every layout is exact within a version.
    pub(crate) fn finish(&self) -> Result<(), MessageError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(MessageError::TrailingBytes {
                count: self.buf.len(),
            })
        }
    }
}
