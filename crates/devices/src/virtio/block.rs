//! virtio-blk over a raw image file (virtio 1.2 §5.2).
//!
//! One request queue. Every request is parsed from guest-controlled descriptors
//! with every length and address checked ([`walk_chain`]): a chain that cannot be
//! trusted at all is returned unused (length 0); a well-formed chain with a bad
//! request gets `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP` in its status byte.
//!
//! I/O is positioned (`pread`/`pwrite`), through a bounded bounce buffer, so the
//! crate stays free of `unsafe`; requests are served synchronously on the thread
//! that delivers the queue notification. Several disks are several devices.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress};

use super::{
    device_type, read_config_bytes, segments_len, split_segments, walk_chain, DeviceContext,
    GuestMemoryMmap, Segment, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Sector size of the virtio-blk protocol, whatever the host disk's.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID answer (`VIRTIO_BLK_ID_BYTES`).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Largest single segment we advertise (`size_max`). Longer segments from a
/// driver that ignores it are still served, in bounce-buffer-sized pieces.
pub const SIZE_MAX: u32 = 1 << 20;
/// Segments per request we advertise (`seg_max`): the queue size minus the
/// header and status descriptors, as a driver without indirect descriptors needs.
pub const SEG_MAX: u32 = BLOCK_QUEUE_SIZE as u32 - 2;
/// Bounce buffer size: I/O moves through at most this much host memory at once.
const BOUNCE_SIZE: usize = 128 * 1024;

/// Feature bits (virtio 1.2 §5.2.3).
pub mod features {
    /// `size_max` in the configuration is valid.
    pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` in the configuration is valid.
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    /// `blk_size` in the configuration is valid.
    pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
}
use features::*;

/// Request types (virtio 1.2 §5.2.6).
pub mod request {
    /// Read.
    pub const VIRTIO_BLK_T_IN: u32 = 0;
    /// Write.
    pub const VIRTIO_BLK_T_OUT: u32 = 1;
    /// Flush the write cache.
    pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
    /// Device id string.
    pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
    /// Success.
    pub const VIRTIO_BLK_S_OK: u8 = 0;
    /// Error.
    pub const VIRTIO_BLK_S_IOERR: u8 = 1;
    /// Unsupported request.
    pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
}
use request::*;

/// The request header: le32 type, le32 reserved, le64 sector.
const HEADER_LEN: u64 = 16;

/// Opening or restoring a block device failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image file cannot be opened.
    #[error("cannot open disk image {}{}", .path.display(), if *.read_only { " (read-only)" } else { "" })]
    Open {
        /// The image.
        path: PathBuf,
        /// Whether it was opened read-only.
        read_only: bool,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image size cannot be determined.
    #[error("cannot determine the size of the disk image")]
    Size(#[source] std::io::Error),
    /// The serial is longer than virtio-blk carries.
    #[error("disk serial is {len} bytes; virtio-blk allows at most 20")]
    SerialTooLong {
        /// Its length.
        len: usize,
    },
    /// A saved state does not match the image given on restore.
    #[error("saved disk state has {saved} sectors but the image has {actual}; the image changed since the snapshot")]
    StateCapacityMismatch {
        /// Sectors in the state.
        saved: u64,
        /// Sectors of the image.
        actual: u64,
    },
}

/// The saved state of a [`Block`]. The image itself is the runner's to reopen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Read-only disk.
    pub read_only: bool,
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// The GET_ID serial.
    pub serial: Vec<u8>,
}

/// A virtio-blk device over a raw image.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    serial_len: usize,
    // Negotiated at activation.
    write_through: bool,
    bounce: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("read_only", &self.read_only)
            .field("capacity_sectors", &self.capacity_sectors)
            .finish()
    }
}

impl Block {
    /// Opens the image at `path` (read-only if `read_only`) as a disk whose
    /// GET_ID answer is `serial` (at most 20 bytes).
    pub fn open(path: &Path, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                read_only,
                source,
            })?;
        Self::new(file, read_only, serial)
    }

    /// A disk over an open image. The capacity is the image size rounded down to
    /// whole sectors.
    pub fn new(file: File, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        let serial = serial.as_bytes();
        if serial.len() > VIRTIO_BLK_ID_BYTES {
            return Err(BlockError::SerialTooLong { len: serial.len() });
        }
        // Seeking to the end works for regular files and block devices alike.
        let size = (&file).seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                size,
                "disk image size is not a multiple of 512; the tail is not visible to the guest"
            );
        }
        let mut id = [0; VIRTIO_BLK_ID_BYTES];
        id[..serial.len()].copy_from_slice(serial);
        Ok(Self {
            file,
            read_only,
            capacity_sectors: size / SECTOR_SIZE,
            serial: id,
            serial_len: serial.len(),
            write_through: true,
            bounce: Vec::new(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The saved state.
    pub fn state(&self) -> BlockState {
        BlockState {
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            serial: self.serial[..self.serial_len].to_vec(),
        }
    }

    /// Rebuilds the device over `file`, which must be the same image (same size).
    pub fn from_state(state: &BlockState, file: File) -> Result<Self, BlockError> {
        let serial = String::from_utf8_lossy(&state.serial).into_owned();
        let block = Self::new(file, state.read_only, &serial)?;
        if block.capacity_sectors != state.capacity_sectors {
            return Err(BlockError::StateCapacityMismatch {
                saved: state.capacity_sectors,
                actual: block.capacity_sectors,
            });
        }
        Ok(block)
    }

    /// virtio 1.2 §5.2.4 `struct virtio_blk_config`: capacity, size_max, seg_max,
    /// geometry (unused, 0), blk_size.
    fn config(&self) -> [u8; 24] {
        let mut c = [0; 24];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// Serves one request; returns the used length (§2.7.8: bytes written into
    /// the chain, status byte included).
    fn handle_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let buffers = match walk_chain(mem, chain) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "virtio-blk request dropped");
                return 0;
            }
        };
        // The status byte is the last device-writable byte (§5.2.6).
        let writable_len = segments_len(&buffers.writable);
        let Some(status_offset) = writable_len.checked_sub(1) else {
            tracing::debug!("virtio-blk request has no status byte; dropped");
            return 0;
        };
        let (data_in, status_seg) = split_segments(&buffers.writable, status_offset);
        let Some(status_addr) = status_seg.first().map(|s| s.addr) else {
            return 0;
        };
        let (status, data_written) = self.execute(mem, &buffers.readable, &data_in);
        if mem.write_obj(status, status_addr).is_err() {
            // walk_chain checked it; a failure here means the chain is unusable.
            return 0;
        }
        // data_written <= writable_len - 1 < 4 GiB: the chain total fits in u32.
        u32::try_from(data_written + 1).unwrap_or(u32::MAX)
    }

    /// Runs the request in `readable` (header + OUT data) / `data_in` (IN data):
    /// returns the status and how many data bytes were written to the guest.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        readable: &[Segment],
        data_in: &[Segment],
    ) -> (u8, u64) {
        if segments_len(readable) < HEADER_LEN {
            tracing::debug!("virtio-blk request header shorter than 16 bytes");
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let (header_segs, data_out) = split_segments(readable, HEADER_LEN);
        let mut header = [0u8; HEADER_LEN as usize];
        if gather(mem, &header_segs, &mut header).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        // Data must travel in the direction the request type implies (§5.2.6).
        let out_len = segments_len(&data_out);
        let in_len = segments_len(data_in);
        match req_type {
            VIRTIO_BLK_T_IN if out_len == 0 => match self.read(mem, sector, data_in) {
                Ok(()) => (VIRTIO_BLK_S_OK, in_len),
                Err(()) => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_OUT if in_len == 0 => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                match self.write(mem, sector, &data_out) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(()) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH if in_len == 0 && out_len == 0 => match self.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-blk flush failed");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID if out_len == 0 => {
                let n = in_len.min(VIRTIO_BLK_ID_BYTES as u64);
                let id = &self.serial[..n as usize];
                match scatter(mem, data_in, id) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(()) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_GET_ID => {
                tracing::debug!(req_type, "virtio-blk data buffers in the wrong direction");
                (VIRTIO_BLK_S_IOERR, 0)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// The byte offset of `sector` if `len` bytes from there are inside the disk
    /// and `len` is whole sectors (§5.2.6.1).
    fn checked_range(&self, sector: u64, len: u64) -> Result<u64, ()> {
        if len % SECTOR_SIZE != 0 {
            return Err(());
        }
        let end_sector = sector.checked_add(len / SECTOR_SIZE).ok_or(())?;
        if end_sector > self.capacity_sectors {
            tracing::debug!(sector, len, "virtio-blk request beyond the end of the disk");
            return Err(());
        }
        Ok(sector * SECTOR_SIZE)
    }

    /// Runs `io` with the bounce buffer, allocated on first use and kept.
    fn with_bounce<T>(&mut self, io: impl FnOnce(&File, &mut [u8]) -> T) -> T {
        let mut bounce = std::mem::take(&mut self.bounce);
        if bounce.is_empty() {
            bounce = vec![0; BOUNCE_SIZE];
        }
        let result = io(&self.file, &mut bounce);
        self.bounce = bounce;
        result
    }

    /// Disk -> guest.
    fn read(&mut self, mem: &GuestMemoryMmap, sector: u64, segs: &[Segment]) -> Result<(), ()> {
        let mut offset = self.checked_range(sector, segments_len(segs))?;
        self.with_bounce(|file, bounce| {
            for piece in pieces(segs, bounce.len()) {
                let buf = &mut bounce[..piece.len as usize];
                file.read_exact_at(buf, offset).map_err(|e| {
                    tracing::warn!(error = %e, offset, "virtio-blk read failed");
                })?;
                mem.write_slice(buf, piece.addr).map_err(|_| ())?;
                offset += u64::from(piece.len);
            }
            Ok(())
        })
    }

    /// Guest -> disk.
    fn write(&mut self, mem: &GuestMemoryMmap, sector: u64, segs: &[Segment]) -> Result<(), ()> {
        let mut offset = self.checked_range(sector, segments_len(segs))?;
        let write_through = self.write_through;
        self.with_bounce(|file, bounce| {
            for piece in pieces(segs, bounce.len()) {
                let buf = &mut bounce[..piece.len as usize];
                mem.read_slice(buf, piece.addr).map_err(|_| ())?;
                file.write_all_at(buf, offset).map_err(|e| {
                    tracing::warn!(error = %e, offset, "virtio-blk write failed");
                })?;
                offset += u64::from(piece.len);
            }
            if write_through {
                file.sync_data().map_err(|e| {
                    tracing::warn!(error = %e, "virtio-blk write-through sync failed");
                })?;
            }
            Ok(())
        })
    }
}

/// `segs` cut into pieces of at most `max` bytes.
fn pieces(segs: &[Segment], max: usize) -> impl Iterator<Item = Segment> + '_ {
    let max = u32::try_from(max).unwrap_or(u32::MAX).max(1);
    segs.iter().flat_map(move |seg| {
        let count = seg.len.div_ceil(max);
        (0..count).map(move |i| {
            let start = i * max;
            Segment {
                addr: seg.addr.unchecked_add(u64::from(start)),
                len: (seg.len - start).min(max),
            }
        })
    })
}

/// Reads `buf.len()` bytes spread over `segs` (which hold at least that many).
fn gather(mem: &GuestMemoryMmap, segs: &[Segment], buf: &mut [u8]) -> Result<(), ()> {
    let mut at = 0;
    for seg in segs {
        let n = (seg.len as usize).min(buf.len() - at);
        mem.read_slice(&mut buf[at..at + n], seg.addr)
            .map_err(|_| ())?;
        at += n;
    }
    if at == buf.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Writes `data` over the start of `segs` (which hold at least that many bytes).
fn scatter(mem: &GuestMemoryMmap, segs: &[Segment], data: &[u8]) -> Result<(), ()> {
    let mut at = 0;
    for seg in segs {
        if at == data.len() {
            break;
        }
        let n = (seg.len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], GuestAddress(seg.addr.raw_value()))
            .map_err(|_| ())?;
        at += n;
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[BLOCK_QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), VirtioError> {
        if !ctx.queue_ready(0) {
            return Err(VirtioError::QueueNotReady { index: 0 });
        }
        // A driver that did not accept FLUSH cannot ask for one, so it assumes a
        // write-through disk (as Linux's virtblk_get_cache_mode does): every write
        // is synced before it completes.
        self.write_through = ctx.features() & VIRTIO_BLK_F_FLUSH == 0;
        Ok(())
    }

    fn process_queue(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        index: u16,
    ) -> Result<(), VirtioError> {
        if index != 0 {
            return Ok(());
        }
        let mem = ctx.mem();
        ctx.drain_queue(0, |chain| self.handle_chain(mem, chain))?;
        Ok(())
    }

    fn reset(&mut self) {
        self.write_through = true;
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use super::*;
    use crate::interrupt::test_util::CountingInterrupt;
    use crate::virtio::mmio::reg;
    use crate::virtio::test_util::{
        desc, guest_memory, read_reg, write_reg, Driver, DATA_BASE, F_INDIRECT, F_NEXT, F_WRITE,
        MEM_SIZE,
    };
    use crate::virtio::{status, IrqMode, MmioTransport};
    use crate::BusDevice;

    const HDR: u64 = DATA_BASE;
    const DATA: u64 = DATA_BASE + 0x1000;
    const STATUS: u64 = DATA_BASE + 0x100;
    const DISK_SECTORS: u64 = 64;

    struct Rig {
        t: MmioTransport,
        d: Driver,
        file: tempfile::NamedTempFile,
    }

    fn rig_with(read_only: bool, features: u64) -> Rig {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        file.write_all(&content).unwrap();
        let block = Block::open(file.path(), read_only, "disk-serial-1").unwrap();
        let mem = guest_memory();
        let mut t = MmioTransport::new(
            Box::new(block),
            mem.clone(),
            Arc::new(CountingInterrupt::default()),
            IrqMode::Edge,
        )
        .unwrap();
        let d = Driver::new(mem);
        d.setup(&mut t, features, 16).unwrap();
        Rig { t, d, file }
    }

    fn rig() -> Rig {
        rig_with(false, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH)
    }

    impl Rig {
        fn header(&self, req_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&req_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.d.mem().write_slice(&h, GuestAddress(HDR)).unwrap();
            self.d
                .mem()
                .write_obj(0xffu8, GuestAddress(STATUS))
                .unwrap();
        }

        /// Submits `descs` as one chain (NEXT links filled in) and returns (used
        /// len, status byte).
        fn submit(&mut self, descs: &[virtio_queue::desc::RawDescriptor]) -> (u32, u8) {
            let ring = self.d.ring(0, 16);
            let used_before = ring.used_idx();
            for (i, d) in descs.iter().enumerate() {
                let d = virtio_queue::desc::split::Descriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = if last { d.flags() } else { d.flags() | F_NEXT };
                ring.write_desc(i as u16, desc(d.addr().0, d.len(), flags, i as u16 + 1));
            }
            ring.publish(0);
            write_reg(&mut self.t, reg::QUEUE_NOTIFY, 0);
            assert_eq!(
                ring.used_idx(),
                used_before.wrapping_add(1),
                "request completed"
            );
            let (head, len) = ring.used(used_before);
            assert_eq!(head, 0);
            let status: u8 = self.d.mem().read_obj(GuestAddress(STATUS)).unwrap();
            (len, status)
        }

        fn status_reg(&mut self) -> u32 {
            read_reg(&mut self.t, reg::STATUS)
        }

        fn disk(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            self.file.reopen().unwrap().read_to_end(&mut v).unwrap();
            v
        }
    }

    #[test]
    fn block_config_reports_capacity_and_limits() {
        let mut r = rig();
        let mut cap = [0; 8];
        r.t.read(reg::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
        let mut seg = [0; 4];
        r.t.read(reg::CONFIG + 12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    }

    #[test]
    fn block_read_returns_disk_content() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 3);
        let (len, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA, 1024, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK));
        let mut got = vec![0; 1024];
        r.d.mem().read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got[..512], &[3u8; 512][..]);
        assert_eq!(&got[512..], &[4u8; 512][..]);
    }

    #[test]
    fn block_write_then_read_round_trips_through_file() {
        let mut r = rig();
        r.d.mem()
            .write_slice(&[0xab; 512], GuestAddress(DATA))
            .unwrap();
        r.header(VIRTIO_BLK_T_OUT, 10);
        let (len, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA, 512, 0, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
        assert_eq!(&r.disk()[10 * 512..11 * 512], &[0xab; 512][..]);

        r.header(VIRTIO_BLK_T_IN, 10);
        let (_, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA + 0x1000, 512, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let mut got = vec![0; 512];
        r.d.mem()
            .read_slice(&mut got, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(got, vec![0xab; 512]);
    }

    #[test]
    fn block_header_split_across_descriptors_and_shared_status_accepted() {
        // Framing is the driver's choice (§2.7.4): header in two pieces, data and
        // status in one writable buffer.
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 1);
        r.d.mem()
            .write_obj(0xffu8, GuestAddress(DATA + 512))
            .unwrap();
        let (len, _) = r.submit(&[
            desc(HDR, 5, 0, 0),
            desc(HDR + 5, 11, 0, 0),
            desc(DATA, 513, F_WRITE, 0),
        ]);
        assert_eq!(len, 513);
        let status: u8 = r.d.mem().read_obj(GuestAddress(DATA + 512)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let b: u8 = r.d.mem().read_obj(GuestAddress(DATA)).unwrap();
        assert_eq!(b, 1);
    }

    #[test]
    fn block_flush_and_get_id_succeed() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_FLUSH, 0);
        let (len, status) = r.submit(&[desc(HDR, 16, 0, 0), desc(STATUS, 1, F_WRITE, 0)]);
        assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));

        r.header(VIRTIO_BLK_T_GET_ID, 0);
        let (len, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA, 20, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!((len, status), (21, VIRTIO_BLK_S_OK));
        let mut id = [0; 20];
        r.d.mem().read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..13], b"disk-serial-1");
        assert_eq!(&id[13..], &[0; 7]);
    }

    #[test]
    fn block_read_only_write_gets_ioerr_and_disk_unchanged() {
        let mut r = rig_with(true, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO);
        let before = r.disk();
        r.d.mem()
            .write_slice(&[0xcd; 512], GuestAddress(DATA))
            .unwrap();
        r.header(VIRTIO_BLK_T_OUT, 0);
        let (len, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA, 512, 0, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR));
        assert_eq!(r.disk(), before);
        let mut features = [0; 4];
        r.t.write(reg::DEVICE_FEATURES_SEL, &0u32.to_le_bytes());
        r.t.read(reg::DEVICE_FEATURES, &mut features);
        assert_ne!(u32::from_le_bytes(features) & (1 << 5), 0, "RO offered");
    }

    #[test]
    fn block_request_beyond_capacity_gets_ioerr() {
        let mut r = rig();
        for sector in [DISK_SECTORS, DISK_SECTORS - 1, u64::MAX, u64::MAX / 512] {
            r.header(VIRTIO_BLK_T_IN, sector);
            let (len, status) = r.submit(&[
                desc(HDR, 16, 0, 0),
                desc(DATA, 1024, F_WRITE, 0),
                desc(STATUS, 1, F_WRITE, 0),
            ]);
            assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR), "sector {sector}");
        }
    }

    #[test]
    fn block_partial_sector_gets_ioerr() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        let (_, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA, 100, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn block_unknown_type_gets_unsupp() {
        let mut r = rig();
        for t in [2, 11, 13, 0xffff_ffff] {
            r.header(t, 0);
            let (_, status) = r.submit(&[desc(HDR, 16, 0, 0), desc(STATUS, 1, F_WRITE, 0)]);
            assert_eq!(status, VIRTIO_BLK_S_UNSUPP, "type {t}");
        }
    }

    #[test]
    fn block_data_in_wrong_direction_gets_ioerr() {
        let mut r = rig();
        // A read whose data buffer is device-readable.
        r.header(VIRTIO_BLK_T_IN, 0);
        let (_, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA, 512, 0, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        // A write whose data buffer is device-writable: nothing reaches the disk.
        let before = r.disk();
        r.header(VIRTIO_BLK_T_OUT, 0);
        let (_, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA, 512, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert_eq!(r.disk(), before);
    }

    #[test]
    fn block_write_only_header_gets_ioerr() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        let (len, status) = r.submit(&[desc(HDR, 16, F_WRITE, 0), desc(STATUS, 1, F_WRITE, 0)]);
        assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR));
    }

    #[test]
    fn block_short_header_gets_ioerr() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        let (_, status) = r.submit(&[desc(HDR, 8, 0, 0), desc(STATUS, 1, F_WRITE, 0)]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn block_readable_status_dropped() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        let (len, status) = r.submit(&[desc(HDR, 16, 0, 0), desc(STATUS, 1, 0, 0)]);
        assert_eq!(
            (len, status),
            (0, 0xff),
            "no writable byte: nothing written"
        );
    }

    #[test]
    fn block_readable_after_writable_dropped() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        let (len, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA, 512, F_WRITE, 0),
            desc(DATA + 512, 16, 0, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!((len, status), (0, 0xff));
    }

    #[test]
    fn block_buffer_outside_memory_dropped() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        for (addr, len) in [
            (MEM_SIZE - 256, 512),
            (MEM_SIZE, 512),
            (u64::MAX - 100, 512),
            (DATA, u32::MAX),
        ] {
            let (used, status) = r.submit(&[
                desc(HDR, 16, 0, 0),
                desc(addr, len, F_WRITE, 0),
                desc(STATUS, 1, F_WRITE, 0),
            ]);
            assert_eq!((used, status), (0, 0xff), "{addr:#x}+{len:#x}");
        }
        assert_eq!(r.status_reg() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn block_zero_length_descriptors_ignored() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 2);
        let (len, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(0xdead_0000, 0, F_WRITE, 0),
            desc(DATA, 512, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!((len, status), (513, VIRTIO_BLK_S_OK));
    }

    #[test]
    fn block_descriptor_loop_dropped_without_hang() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        let vq = r.d.ring(0, 16);
        vq.write_desc(0, desc(HDR, 16, F_NEXT, 1));
        vq.write_desc(1, desc(DATA, 512, F_WRITE | F_NEXT, 2));
        vq.write_desc(2, desc(STATUS, 1, F_WRITE | F_NEXT, 1));
        vq.publish(0);
        write_reg(&mut r.t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(vq.used_idx(), 1);
        assert_eq!(vq.used(0), (0, 0));
        let status: u8 = r.d.mem().read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, 0xff);
    }

    #[test]
    fn block_next_index_past_table_dropped() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        let vq = r.d.ring(0, 16);
        vq.write_desc(0, desc(HDR, 16, F_NEXT, 200));
        vq.publish(0);
        write_reg(&mut r.t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(vq.used(0), (0, 0));
    }

    #[test]
    fn block_chain_longer_than_queue_dropped() {
        // 16-entry queue, a 20-descriptor indirect table still fits; but a direct
        // chain can never exceed the table, so build one through an indirect table
        // whose entries chain forever (0 -> 1 -> 0).
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        let table = DATA_BASE + 0x8000;
        let mem = r.d.mem();
        mem.write_obj(desc(HDR, 16, F_NEXT, 1), GuestAddress(table))
            .unwrap();
        mem.write_obj(
            desc(DATA, 512, F_WRITE | F_NEXT, 0),
            GuestAddress(table + 16),
        )
        .unwrap();
        let vq = r.d.ring(0, 16);
        vq.write_desc(0, desc(table, 32, F_INDIRECT, 0));
        vq.publish(0);
        write_reg(&mut r.t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(vq.used(0), (0, 0));
    }

    #[test]
    fn block_indirect_chain_served() {
        let mut r = rig_with(
            false,
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_BLK_F_FLUSH,
        );
        r.header(VIRTIO_BLK_T_IN, 5);
        let table = DATA_BASE + 0x8000;
        let mem = r.d.mem();
        for (i, d) in [
            desc(HDR, 16, F_NEXT, 1),
            desc(DATA, 512, F_WRITE | F_NEXT, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ]
        .into_iter()
        .enumerate()
        {
            mem.write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let vq = r.d.ring(0, 16);
        vq.write_desc(0, desc(table, 48, F_INDIRECT, 0));
        vq.publish(0);
        write_reg(&mut r.t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(vq.used(0), (0, 513));
        let b: u8 = mem.read_obj(GuestAddress(DATA)).unwrap();
        assert_eq!(b, 5);
    }

    #[test]
    fn block_huge_read_within_memory_but_beyond_disk_gets_ioerr() {
        let mut r = rig();
        r.header(VIRTIO_BLK_T_IN, 0);
        let len = (MEM_SIZE - DATA - 0x1000) as u32 & !511;
        let (_, status) = r.submit(&[
            desc(HDR, 16, 0, 0),
            desc(DATA, len, F_WRITE, 0),
            desc(STATUS, 1, F_WRITE, 0),
        ]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn block_serial_too_long_refused() {
        let file = tempfile::tempfile().unwrap();
        let err = Block::new(file, false, "012345678901234567890").unwrap_err();
        assert!(matches!(err, BlockError::SerialTooLong { len: 21 }));
    }

    #[test]
    fn block_open_missing_file_names_path() {
        let err = Block::open(Path::new("/nonexistent/disk.img"), true, "").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"));
    }

    #[test]
    fn block_state_round_trips() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[0; 4096]).unwrap();
        let b = Block::open(file.path(), true, "abc").unwrap();
        let state = b.state();
        let json = serde_json::to_string(&state).unwrap();
        let decoded: BlockState = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, state);
        let restored = Block::from_state(&decoded, file.reopen().unwrap()).unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(restored.capacity_sectors(), 8);

        file.write_all(&[0; 512]).unwrap();
        let err = Block::from_state(&decoded, file.reopen().unwrap()).unwrap_err();
        assert!(matches!(
            err,
            BlockError::StateCapacityMismatch {
                saved: 8,
                actual: 9
            }
        ));
    }
}
