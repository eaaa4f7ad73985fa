//! The byte copy both ends of a published-port connection run once
//! `Forwarding` is said (docs/agent-protocol.md, "Published ports"): one
//! direction, blocking, through one buffer, so a reader that stops stops its
//! writer and nothing is held beyond the buffer.

use std::io::{ErrorKind, Read, Write};

/// Bytes of the one copy buffer per direction.
pub const COPY_BUFFER: usize = 64 << 10;

/// Copies `from` to `to` until end of file (`true`: the caller half-closes
/// `to`) or an error on either side (`false`: the caller shuts both).
pub fn copy(from: &mut impl Read, to: &mut impl Write) -> bool {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_moves_every_byte_and_tells_eof_from_errors() {
        let data: Vec<u8> = (0..3 * COPY_BUFFER + 7).map(|i| i as u8).collect();
        let mut out = Vec::new();
        assert!(copy(&mut data.as_slice(), &mut out));
        assert_eq!(out, data);
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        assert!(!copy(&mut data.as_slice(), &mut Broken));
    }
}
