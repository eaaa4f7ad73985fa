//! The virtio-vsock packet header (virtio 1.2 §5.10.6) and its parsing from and
//! writing into guest descriptor chains.
//!
//! Every length here comes from the guest: the header must be fully readable
//! from the chain's device-readable buffers, and the payload length it claims is
//! checked against both [`MAX_PAYLOAD`] and what the chain really holds before
//! anything is allocated.

use vm_memory::{Address, Bytes};

use super::super::{ChainBuffers, GuestMemoryMmap, Segment};

/// Size of `struct virtio_vsock_hdr` (virtio 1.2 §5.10.6).
pub const HEADER_LEN: usize = 44;
/// The largest payload one packet may carry in either direction. Linux sends at
/// most 64 KiB (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); anything larger is hostile.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `type`: stream socket (virtio 1.2 §5.10.6). The only type we offer
/// (no `VIRTIO_VSOCK_F_SEQPACKET`).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2 §5.10.6).
pub mod op {
    /// Never valid.
    pub const INVALID: u16 = 0;
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Accept.
    pub const RESPONSE: u16 = 2;
    /// Reset (refuse or abort).
    pub const RST: u16 = 3;
    /// No more data in the directions the flags say.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's `buf_alloc`/`fwd_cnt` changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of a SHUTDOWN packet (virtio 1.2 §5.10.6.6).
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
}

/// `struct virtio_vsock_hdr`, all fields little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the 44 wire bytes.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the 44 wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a TX chain is not a usable packet. All of them drop the packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The readable buffers hold fewer than 44 bytes.
    #[error("vsock packet shorter than its {HEADER_LEN}-byte header ({0} bytes)")]
    ShortHeader(u64),
    /// The header claims more than [`MAX_PAYLOAD`].
    #[error("vsock packet claims a {0}-byte payload, more than the {MAX_PAYLOAD}-byte cap")]
    PayloadTooLarge(u32),
    /// The header claims more payload than the chain holds.
    #[error("vsock packet claims a {claimed}-byte payload but its buffers hold {available}")]
    PayloadTruncated {
        /// `len` in the header.
        claimed: u32,
        /// Readable bytes after the header.
        available: u64,
    },
    /// Reading guest memory failed (checked beforehand, so a bug or a race).
    #[error("reading the vsock packet from guest memory failed")]
    GuestMemory,
}

/// A packet the guest put on the TX queue.
#[derive(Debug, PartialEq, Eq)]
pub struct TxPacket {
    /// The header.
    pub header: Header,
    /// Exactly `header.len` bytes (zero for anything but RW).
    pub payload: Vec<u8>,
}

/// Parses a TX chain's device-readable buffers (already checked to lie in guest
/// memory by `walk_chain`). Writable buffers are ignored. Readable bytes beyond
/// `header.len` are ignored too (a driver may post a bigger buffer). A payload on
/// anything but RW is ignored, not read.
pub fn parse_tx(mem: &GuestMemoryMmap, buffers: &ChainBuffers) -> Result<TxPacket, PacketError> {
    let total = super::super::segments_len(&buffers.readable);
    if total < HEADER_LEN as u64 {
        return Err(PacketError::ShortHeader(total));
    }
    let mut raw = [0u8; HEADER_LEN];
    gather(mem, &buffers.readable, 0, &mut raw)?;
    let header = Header::from_bytes(&raw);
    if header.op != op::RW || header.len == 0 {
        return Ok(TxPacket {
            header,
            payload: Vec::new(),
        });
    }
    if header.len > MAX_PAYLOAD {
        return Err(PacketError::PayloadTooLarge(header.len));
    }
    let available = total - HEADER_LEN as u64;
    if u64::from(header.len) > available {
        return Err(PacketError::PayloadTruncated {
            claimed: header.len,
            available,
        });
    }
    // Bounded by MAX_PAYLOAD above and by what the chain really holds.
    let mut payload = vec![0u8; header.len as usize];
    gather(mem, &buffers.readable, HEADER_LEN as u64, &mut payload)?;
    Ok(TxPacket { header, payload })
}

/// Reads `buf.len()` bytes of `segs`, starting `skip` bytes in.
pub fn gather(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<(), PacketError> {
    let mut done = 0usize;
    for seg in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        // seg.len is u32 and skip < len, so both fit in usize on our targets.
        let avail = usize::try_from(len - skip).map_err(|_| PacketError::GuestMemory)?;
        let n = avail.min(buf.len() - done);
        let addr = seg.addr.checked_add(skip).ok_or(PacketError::GuestMemory)?;
        mem.read_slice(&mut buf[done..done + n], addr)
            .map_err(|_| PacketError::GuestMemory)?;
        done += n;
        skip = 0;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(PacketError::GuestMemory)
    }
}

/// Writes `data` into `segs` starting `skip` bytes in; returns how many bytes
/// fit.
pub fn scatter(mem: &GuestMemoryMmap, segs: &[Segment], mut skip: u64, data: &[u8]) -> usize {
    let mut done = 0usize;
    for seg in segs {
        if done == data.len() {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let Ok(avail) = usize::try_from(len - skip) else {
            break;
        };
        let n = avail.min(data.len() - done);
        let Some(addr) = seg.addr.checked_add(skip) else {
            break;
        };
        if mem.write_slice(&data[done..done + n], addr).is_err() {
            break;
        }
        done += n;
        skip = 0;
    }
    done
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn rw_header(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 2000,
            len,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_through_wire_bytes() {
        let h = rw_header(12);
        let b = h.to_bytes();
        assert_eq!(&b[24..28], &12u32.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn parse_tx_header_split_across_buffers_with_payload() {
        let m = mem();
        let b = rw_header(5).to_bytes();
        m.write_slice(&b[..10], GuestAddress(0x100)).unwrap();
        m.write_slice(&b[10..], GuestAddress(0x200)).unwrap();
        m.write_slice(b"hello", GuestAddress(0x300)).unwrap();
        let bufs = ChainBuffers {
            readable: vec![seg(0x100, 10), seg(0x200, 34), seg(0x300, 100)],
            writable: vec![],
        };
        let p = parse_tx(&m, &bufs).unwrap();
        assert_eq!(p.header, rw_header(5));
        assert_eq!(p.payload, b"hello");
    }

    #[test]
    fn parse_tx_short_header_refused() {
        let m = mem();
        let bufs = ChainBuffers {
            readable: vec![seg(0x100, 43)],
            writable: vec![seg(0x200, 100)],
        };
        assert_eq!(parse_tx(&m, &bufs), Err(PacketError::ShortHeader(43)));
    }

    #[test]
    fn parse_tx_huge_len_refused_before_allocation() {
        let m = mem();
        m.write_slice(&rw_header(u32::MAX).to_bytes(), GuestAddress(0x100))
            .unwrap();
        let bufs = ChainBuffers {
            readable: vec![seg(0x100, 44)],
            writable: vec![],
        };
        assert_eq!(
            parse_tx(&m, &bufs),
            Err(PacketError::PayloadTooLarge(u32::MAX))
        );
    }

    #[test]
    fn parse_tx_len_beyond_buffers_refused() {
        let m = mem();
        m.write_slice(&rw_header(100).to_bytes(), GuestAddress(0x100))
            .unwrap();
        let bufs = ChainBuffers {
            readable: vec![seg(0x100, 44), seg(0x200, 99)],
            writable: vec![],
        };
        assert_eq!(
            parse_tx(&m, &bufs),
            Err(PacketError::PayloadTruncated {
                claimed: 100,
                available: 99
            })
        );
    }

    #[test]
    fn parse_tx_payload_on_control_op_ignored() {
        let m = mem();
        let mut h = rw_header(50_000_000);
        h.op = op::CREDIT_UPDATE;
        m.write_slice(&h.to_bytes(), GuestAddress(0x100)).unwrap();
        let bufs = ChainBuffers {
            readable: vec![seg(0x100, 44)],
            writable: vec![],
        };
        let p = parse_tx(&m, &bufs).unwrap();
        assert_eq!(p.header.op, op::CREDIT_UPDATE);
        assert!(p.payload.is_empty());
    }

    #[test]
    fn scatter_stops_at_end_of_buffers() {
        let m = mem();
        let segs = [seg(0x100, 4), seg(0x200, 4)];
        assert_eq!(scatter(&m, &segs, 2, b"abcdefghij"), 6);
        let mut out = [0u8; 4];
        m.read_slice(&mut out, GuestAddress(0x200)).unwrap();
        assert_eq!(&out, b"cdef");
    }
}
