//! Host backends of the virtio-net device: where guest frames go and host
//! frames come from.
//!
//! A backend moves whole Ethernet frames (no virtio-net header) and never
//! blocks: `recv` and `send` report "would block" and the device retries when
//! the event loop sees the backend's fd readable or writable again.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// The largest Ethernet frame a backend carries: a 64 KiB IP packet plus the
/// Ethernet header and a VLAN tag. Anything longer is not a frame.
pub const MAX_FRAME_LEN: usize = 65535 + 14 + 4;

/// A host-side frame transport for [`Net`](super::Net).
pub trait NetBackend: Send {
    /// The fd the event loop watches (readable: frames may be waiting;
    /// writable: a refused `send` may succeed now).
    fn fd(&self) -> RawFd;

    /// Receives one frame into `buf` (at least [`MAX_FRAME_LEN`] long).
    /// `Ok(None)`: nothing waiting. `Err`: the backend is gone for good.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Sends one frame. `Ok(false)`: the host side is full, nothing was taken;
    /// retry the same frame once the fd is writable. `Err`: the backend is gone.
    fn send(&mut self, frame: &[u8]) -> io::Result<bool>;

    /// A name for messages ("passt", "tap0").
    fn name(&self) -> &str;

    /// Why the backend stopped, if it can tell (a helper process's exit status),
    /// for the warning the device prints when it gives the backend up.
    fn exit_status(&mut self) -> Option<String> {
        None
    }
}

/// The qemu/passt stream framing: each frame is preceded by its length as a
/// 4-byte big-endian integer, over a connected `SOCK_STREAM` UNIX socket (what
/// `passt --fd` and `passt --socket` speak).
#[derive(Debug)]
pub struct StreamBackend {
    stream: UnixStream,
    name: String,
    /// Bytes read but not yet returned as a frame: at most one partial frame
    /// plus what one read brought.
    rbuf: Vec<u8>,
    /// Start of unconsumed data in `rbuf`.
    rpos: usize,
    /// The rest of a frame the socket took only part of.
    wbuf: Vec<u8>,
    wpos: usize,
}

/// Bytes one `read` asks for.
const READ_CHUNK: usize = 256 * 1024;

impl StreamBackend {
    /// Wraps a connected stream (set non-blocking here).
    pub fn new(stream: UnixStream, name: impl Into<String>) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            name: name.into(),
            rbuf: Vec::with_capacity(READ_CHUNK),
            rpos: 0,
            wbuf: Vec::new(),
            wpos: 0,
        })
    }

    /// A complete frame at the front of `rbuf`, if there is one: its body's
    /// range. A length prefix above [`MAX_FRAME_LEN`] (or zero) means the
    /// stream is corrupt.
    fn frame_in_buffer(&self) -> io::Result<Option<(usize, usize)>> {
        let avail = &self.rbuf[self.rpos..];
        let Some(prefix) = avail.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: frame length {len} in the stream is not a frame",
                    self.name
                ),
            ));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let start = self.rpos + 4;
        Ok(Some((start, start + len)))
    }

    /// Writes what is left of a partly sent frame. `Ok(true)`: nothing left.
    fn flush_partial(&mut self) -> io::Result<bool> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Ok(true)
    }
}

impl NetBackend for StreamBackend {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            if let Some((start, end)) = self.frame_in_buffer()? {
                let len = end - start;
                let dst = buf.get_mut(..len).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "receive buffer too small")
                })?;
                dst.copy_from_slice(&self.rbuf[start..end]);
                self.rpos = end;
                return Ok(Some(len));
            }
            // Compact before reading so the buffer never grows past one
            // partial frame plus one read.
            if self.rpos > 0 {
                self.rbuf.drain(..self.rpos);
                self.rpos = 0;
            }
            let old = self.rbuf.len();
            self.rbuf.resize(old + READ_CHUNK, 0);
            let r = self.stream.read(&mut self.rbuf[old..]);
            let got = match r {
                Ok(n) => n,
                Err(e) => {
                    self.rbuf.truncate(old);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return Ok(None),
                        io::ErrorKind::Interrupted => continue,
                        _ => return Err(e),
                    }
                }
            };
            self.rbuf.truncate(old + got);
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} closed its socket", self.name),
                ));
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if !self.flush_partial()? {
            return Ok(false);
        }
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|&l| l as usize <= MAX_FRAME_LEN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
        let prefix = len.to_be_bytes();
        let bufs = [io::IoSlice::new(&prefix), io::IoSlice::new(frame)];
        let total = 4 + frame.len();
        let written = loop {
            match self.stream.write_vectored(&bufs) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if written < total {
            // The frame is taken; the rest goes out before the next one.
            self.wbuf.clear();
            self.wbuf.extend_from_slice(&prefix);
            self.wbuf.extend_from_slice(frame);
            self.wpos = written;
            let _ = self.flush_partial()?;
        }
        Ok(true)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn pair() -> (StreamBackend, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (StreamBackend::new(a, "test").unwrap(), b)
    }

    #[test]
    fn stream_backend_reassembles_frames_split_across_reads() {
        let (mut be, mut peer) = pair();
        let mut buf = vec![0; MAX_FRAME_LEN];
        peer.write_all(&[0, 0, 0, 5, b'h', b'e']).unwrap();
        assert_eq!(be.recv(&mut buf).unwrap(), None);
        peer.write_all(&[b'l', b'l', b'o', 0, 0, 0, 1, b'!'])
            .unwrap();
        assert_eq!(be.recv(&mut buf).unwrap(), Some(5));
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(be.recv(&mut buf).unwrap(), Some(1));
        assert_eq!(&buf[..1], b"!");
        assert_eq!(be.recv(&mut buf).unwrap(), None);
    }

    #[test]
    fn stream_backend_corrupt_length_is_an_error() {
        let (mut be, mut peer) = pair();
        let mut buf = vec![0; MAX_FRAME_LEN];
        peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert_eq!(
            be.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let (mut be, mut peer) = pair();
        peer.write_all(&[0, 0, 0, 0]).unwrap();
        assert!(be.recv(&mut buf).is_err());
    }

    #[test]
    fn stream_backend_peer_closed_is_an_error() {
        let (mut be, peer) = pair();
        drop(peer);
        let mut buf = vec![0; MAX_FRAME_LEN];
        assert_eq!(
            be.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn stream_backend_send_frames_with_length_prefix_and_reports_full() {
        let (mut be, mut peer) = pair();
        assert!(be.send(b"abc").unwrap());
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, [0, 0, 0, 3, b'a', b'b', b'c']);
        // Fill the socket until it refuses; the refused frame is not taken, and
        // every frame the backend accepted arrives whole and in order.
        let frame = vec![0x5a; 1500];
        let mut accepted = 0usize;
        while be.send(&frame).unwrap() {
            accepted += 1;
            assert!(accepted < 1_000_000, "socket never filled");
        }
        peer.set_nonblocking(true).unwrap();
        let mut received = Vec::new();
        let mut chunk = vec![0; 65536];
        loop {
            match peer.read(&mut chunk) {
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Drained: the backend can push the rest of a partial frame.
                    if be.wbuf.is_empty() {
                        break;
                    }
                    be.flush_partial().unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(received.len(), accepted * (4 + 1500));
        for rec in received.chunks(4 + 1500) {
            assert_eq!(&rec[..4], &1500u32.to_be_bytes());
            assert!(rec[4..].iter().all(|&b| b == 0x5a));
        }
    }
}
