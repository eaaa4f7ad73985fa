//! A writer for uncompressed EROFS images, and [`build_rootfs`], which turns an
//! image's layer tars into one such image without root.
//!
//! On-disk format: Linux `fs/erofs/erofs_fs.h` (the 6.1 kernel is the oldest
//! reader we target). The subset written, and why, is in docs/erofs.md. In short:
//! 4 KiB blocks; block 0 holds the superblock at byte 1024; file data blocks are
//! written as the tars stream by (blocks 1..), then the metadata area (inodes,
//! inline xattrs, inline tails), then directory blocks too big to inline. Nothing
//! compressed, no shared xattrs, no chunk indexes: the image needs only the base
//! format plus the superblock checksum.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::flatten::{
    self, DataSink, FileData, InodeId, InodeKind, Layer, LayerError, SinkError, Tree, Xattr, ROOT,
};
use crate::tar_guard::Limits;

/// Block size (`blkszbits` 12); the only size a 4 KiB-page kernel mounts everywhere.
pub const BLOCK_SIZE: u64 = 4096;
const BLKSZ: usize = BLOCK_SIZE as usize;
/// `EROFS_SUPER_OFFSET`.
const SUPERBLOCK_OFFSET: usize = 1024;
/// `EROFS_SUPER_MAGIC_V1`.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// `EROFS_FEATURE_COMPAT_SB_CHKSUM`: crc32c of the superblock's block from byte 1024.
const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// `EROFS_NULL_ADDR`, what mkfs.erofs writes for "no data blocks".
const NULL_ADDR: u32 = u32::MAX;
/// `erofs_inode_compact` and `erofs_inode_extended` sizes.
const COMPACT_INODE: usize = 32;
const EXTENDED_INODE: usize = 64;
/// Inode slots are 32 bytes: nid = (offset from meta_blkaddr) / 32.
const SLOT: u64 = 32;
/// `EROFS_INODE_FLAT_PLAIN` / `EROFS_INODE_FLAT_INLINE` (i_format bits 1..3).
const FLAT_PLAIN: u16 = 0;
const FLAT_INLINE: u16 = 2;
/// `struct erofs_dirent`: nid u64, nameoff u16, file_type u8, reserved u8.
const DIRENT: usize = 12;
/// `struct erofs_xattr_ibody_header`.
const XATTR_IBODY_HEADER: usize = 12;
/// `EROFS_FT_*`.
const FT_REG: u8 = 1;
const FT_DIR: u8 = 2;
const FT_CHRDEV: u8 = 3;
const FT_BLKDEV: u8 = 4;
const FT_FIFO: u8 = 5;
const FT_SYMLINK: u8 = 7;
/// `S_IF*`.
const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
const S_IFLNK: u16 = 0o120000;
const S_IFCHR: u16 = 0o020000;
const S_IFBLK: u16 = 0o060000;
const S_IFIFO: u16 = 0o010000;

/// Errors of the EROFS writer.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    /// Writing or reading the output (or the tail spool) failed.
    #[error("{what} failed")]
    Io {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Block addresses are 32-bit: the image would exceed 16 TiB.
    #[error("the image would exceed EROFS's 2^32-block limit")]
    TooLarge,
    /// An inode's extended attributes do not fit the inline xattr area (256 KiB).
    #[error("extended attributes of {path:?} are too large for EROFS")]
    XattrsTooLarge {
        /// Path of the file in the image.
        path: String,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ErofsError {
    move |source| ErofsError::Io { what, source }
}

/// Errors of [`build_rootfs`].
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The output file could not be created, synced or renamed into place.
    #[error("cannot write the rootfs image {path}")]
    Output {
        /// The output path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A layer is unreadable or hostile.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The EROFS writer failed.
    #[error("writing the EROFS image failed")]
    Erofs(#[from] ErofsError),
}

/// What [`build_rootfs`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootfsStats {
    /// Layers applied.
    pub layers: usize,
    /// Tar entries read over all layers.
    pub entries: u64,
    /// Lower-layer entries removed by `.wh.` whiteouts.
    pub whiteouts: u64,
    /// Opaque-directory markers applied.
    pub opaque_dirs: u64,
    /// Inodes in the image.
    pub inodes: u64,
    /// Regular files (inodes, so hardlinks count once).
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Device nodes and fifos.
    pub specials: u64,
    /// Inodes with more than one name.
    pub hardlinked: u64,
    /// Bytes of regular-file content in the image.
    pub file_bytes: u64,
    /// Bytes of file data written for entries that a later layer removed or
    /// replaced (kept as dead blocks: the data was streamed before it was known).
    pub dead_bytes: u64,
    /// Extended attributes dropped because EROFS has no prefix for their namespace.
    pub xattrs_dropped: u64,
    /// Size of the image file.
    pub image_bytes: u64,
}

/// Build the EROFS root file system of an image from its layers (lowest first)
/// at `out`, atomically: a temporary file in `out`'s directory is synced and
/// renamed over `out`, so `out` is either absent, the old image, or complete.
/// The layers are held to `limits` (`Limits::default()` suits every real image
/// we know of).
pub fn build_rootfs(
    layers: &[Layer],
    out: &Path,
    limits: Limits,
) -> Result<RootfsStats, RootfsError> {
    let out_err = |source| RootfsError::Output {
        path: out.to_path_buf(),
        source,
    };
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    remove_stale_temps(dir);
    let tmp = tempfile::Builder::new()
        .prefix(".erofs-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(out_err)?;
    // Unnamed: vanishes with the process whatever happens.
    let tails = tempfile::tempfile_in(dir).map_err(out_err)?;
    let image = tmp.as_file().try_clone().map_err(out_err)?;
    let mut writer = ErofsWriter::new(image, tails)?;
    let tree = flatten::flatten_with(layers, &mut writer, limits)?;
    let mut stats = writer.finish(&tree)?;
    stats.layers = layers.len();
    // tempfile creates 0600; the image is not secret and other tools of the
    // same store (or a carried store) read it.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .map_err(out_err)?;
    tmp.persist(out).map_err(|e| out_err(e.error))?;
    // Make the rename itself durable.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(out_err)?;
    Ok(stats)
}

/// How old a `.erofs-*.tmp` must be before it counts as a killed build's leftover.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes `.erofs-*.tmp` files in `dir` left by builds that were killed (a
/// running build's file is younger than [`STALE_TEMP_AGE`]); best effort.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(".erofs-") && name.ends_with(".tmp")) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Streams file data into an EROFS image as a [`DataSink`], then lays out and
/// writes the metadata for a finished [`Tree`] with [`ErofsWriter::finish`].
#[derive(Debug)]
pub struct ErofsWriter {
    image: BufWriter<File>,
    /// Next free block; data starts at block 1 (block 0 is the superblock's).
    next_block: u64,
    /// Unaligned file tails, inlined after their inodes at the end.
    tails: BufWriter<File>,
    tails_len: u64,
    buf: Vec<u8>,
    data_bytes: u64,
}

impl ErofsWriter {
    /// Start an image in `image` (truncated) with `tails` as scratch space.
    pub fn new(image: File, tails: File) -> Result<ErofsWriter, ErofsError> {
        image.set_len(0).map_err(io_err("truncating the image"))?;
        // Smaller than the copy buffer: file data chunks then bypass the
        // BufWriter (no extra memcpy); only metadata writes are buffered.
        let mut image = BufWriter::with_capacity(1 << 17, image);
        image
            .write_all(&[0u8; BLKSZ])
            .map_err(io_err("writing the image"))?;
        Ok(ErofsWriter {
            image,
            next_block: 1,
            tails: BufWriter::with_capacity(1 << 16, tails),
            tails_len: 0,
            buf: vec![0u8; 1 << 20],
            data_bytes: 0,
        })
    }

    /// Lay out and write inodes, directories and the superblock for `tree`;
    /// syncs the image file. Returns statistics (layer count left at 0).
    pub fn finish(self, tree: &Tree) -> Result<RootfsStats, ErofsError> {
        let ErofsWriter {
            image,
            next_block,
            tails,
            data_bytes,
            ..
        } = self;
        let tails = tails.into_inner().map_err(|e| ErofsError::Io {
            what: "flushing the tail spool",
            source: e.into_error(),
        })?;
        let mut image = image;
        let meta_blkaddr = next_block;
        let (order, parents, nlink, stats0) = walk(tree);

        // Compact inodes take their mtime from the superblock: pick the most
        // common one so most inodes can be compact.
        let mut times: HashMap<(u64, u32), u64> = HashMap::new();
        for &id in &order {
            let i = &tree.inodes[id];
            *times.entry((i.mtime, i.mtime_nsec)).or_default() += 1;
        }
        let build_time = times
            .iter()
            .max_by_key(|(t, n)| (**n, std::cmp::Reverse(**t)))
            .map(|(t, _)| *t)
            .unwrap_or((0, 0));

        // Pass 1: sizes and positions, so every nid is known before any dirent.
        let mut slot_of = vec![usize::MAX; tree.inodes.len()];
        for (slot, &id) in order.iter().enumerate() {
            slot_of[id] = slot;
        }
        let mut plans: Vec<Plan> = Vec::with_capacity(order.len());
        let mut pos: u64 = SLOT; // nid 0 would be inode number 0, which tools treat as "no inode"
        let mut late_blocks: u64 = 0;
        let mut xattrs_dropped = 0u64;
        for (slot, &id) in order.iter().enumerate() {
            let inode = &tree.inodes[id];
            let (xattr_body, dropped) =
                xattr_ibody(&inode.xattrs).ok_or_else(|| ErofsError::XattrsTooLarge {
                    path: path_of(tree, &order, &parents, &slot_of, slot),
                })?;
            xattrs_dropped += u64::from(dropped);
            let size = match &inode.kind {
                InodeKind::File(d) => d.size,
                InodeKind::Symlink(t) => t.len() as u64,
                InodeKind::Dir(children) => dir_size(&dir_names(children.keys().map(|k| &k[..]))),
                _ => 0,
            };
            let extended = !(inode.uid <= 0xffff
                && inode.gid <= 0xffff
                && nlink[id] <= 0xffff
                && size <= u64::from(u32::MAX)
                && (inode.mtime, inode.mtime_nsec) == build_time);
            let isize = if extended {
                EXTENDED_INODE
            } else {
                COMPACT_INODE
            };
            let head = isize + xattr_body.len();
            let tail_fits = |len: u64| head as u64 + len <= BLOCK_SIZE;
            let (layout, inline_len, nlate) = match &inode.kind {
                InodeKind::File(d) if d.tail_len > 0 => {
                    if !tail_fits(u64::from(d.tail_len)) {
                        // The sink sized the tail for a 64-byte inode and these xattrs.
                        return Err(ErofsError::XattrsTooLarge {
                            path: path_of(tree, &order, &parents, &slot_of, slot),
                        });
                    }
                    (FLAT_INLINE, d.tail_len as usize, 0)
                }
                InodeKind::Symlink(_) | InodeKind::Dir(_)
                    if size % BLOCK_SIZE != 0 && tail_fits(size % BLOCK_SIZE) =>
                {
                    (FLAT_INLINE, (size % BLOCK_SIZE) as usize, size / BLOCK_SIZE)
                }
                InodeKind::Symlink(_) | InodeKind::Dir(_) => {
                    (FLAT_PLAIN, 0, size.div_ceil(BLOCK_SIZE))
                }
                _ => (FLAT_PLAIN, 0, 0),
            };
            let total = (head + inline_len) as u64;
            pos = pos.next_multiple_of(SLOT);
            // Keep an inode with its xattrs and inline tail inside one block: the
            // kernel refuses inline data that crosses a block (erofs_fs.h,
            // "inline data should be located in the same meta block").
            if total <= BLOCK_SIZE && pos % BLOCK_SIZE + total > BLOCK_SIZE {
                pos = pos.next_multiple_of(BLOCK_SIZE);
            }
            plans.push(Plan {
                nid: pos / SLOT,
                extended,
                layout,
                size,
                inline_len: inline_len as u32,
                late_first: late_blocks,
                late_count: nlate,
                xattr_body,
            });
            pos += total;
            late_blocks += nlate;
        }
        let meta_blocks = pos.div_ceil(BLOCK_SIZE);
        let late_base = meta_blkaddr + meta_blocks;
        let total_blocks = late_base + late_blocks;
        if total_blocks > u64::from(u32::MAX) {
            return Err(ErofsError::TooLarge);
        }
        let nid_of = |id: InodeId| plans[slot_of[id]].nid;
        let root_nid = u16::try_from(plans[0].nid).map_err(|_| ErofsError::TooLarge)?;

        // Pass 2: write the metadata area sequentially, directory blocks in place.
        let image_file = image
            .get_ref()
            .try_clone()
            .map_err(io_err("writing the image"))?;
        let mut written: u64 = 0;
        let zeros = [0u8; BLKSZ];
        let mut tail_buf = vec![0u8; BLKSZ];
        for (slot, &id) in order.iter().enumerate() {
            let inode = &tree.inodes[id];
            let plan = &plans[slot];
            let target = plan.nid * SLOT;
            while written < target {
                let n = (target - written).min(BLOCK_SIZE) as usize;
                image
                    .write_all(&zeros[..n])
                    .map_err(io_err("writing the image"))?;
                written += n as u64;
            }
            let (type_bits, i_u, dir_data) = match &inode.kind {
                InodeKind::File(d) => (S_IFREG, file_blkaddr(d), None),
                InodeKind::Dir(children) => {
                    let parent = parents[slot];
                    let mut entries: Vec<(&[u8], u64, u8)> = Vec::with_capacity(children.len() + 2);
                    entries.push((b".", plan.nid, FT_DIR));
                    entries.push((b"..", nid_of(parent), FT_DIR));
                    for (name, child) in children {
                        entries.push((
                            name,
                            nid_of(child.inode()),
                            file_type(&tree.inodes[child.inode()].kind),
                        ));
                    }
                    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                    let data = dir_blocks(&entries);
                    (S_IFDIR, late_addr(plan, late_base), Some(data))
                }
                InodeKind::Symlink(t) => (S_IFLNK, late_addr(plan, late_base), Some(t.clone())),
                InodeKind::CharDevice { major, minor } => {
                    (S_IFCHR, encode_dev(*major, *minor), None)
                }
                InodeKind::BlockDevice { major, minor } => {
                    (S_IFBLK, encode_dev(*major, *minor), None)
                }
                InodeKind::Fifo => (S_IFIFO, 0, None),
            };
            let mode = type_bits | (inode.perm & 0o7777);
            let ino = (slot + 1) as u32;
            let raw = encode_inode(plan, mode, i_u, ino, inode, nlink[id]);
            image.write_all(&raw).map_err(io_err("writing the image"))?;
            image
                .write_all(&plan.xattr_body)
                .map_err(io_err("writing the image"))?;
            written += (raw.len() + plan.xattr_body.len()) as u64;
            match (&inode.kind, dir_data) {
                (InodeKind::File(d), _) if plan.inline_len > 0 => {
                    let t = &mut tail_buf[..d.tail_len as usize];
                    tails
                        .read_exact_at(t, d.tail_offset)
                        .map_err(io_err("reading the tail spool"))?;
                    image.write_all(t).map_err(io_err("writing the image"))?;
                }
                (_, Some(mut data)) => {
                    let full = (plan.late_count as usize * BLKSZ).min(data.len());
                    if plan.inline_len > 0 {
                        image
                            .write_all(&data[full..])
                            .map_err(io_err("writing the image"))?;
                        data.truncate(full);
                    }
                    if plan.late_count > 0 {
                        data.resize(plan.late_count as usize * BLKSZ, 0);
                        image_file
                            .write_all_at(&data, (late_base + plan.late_first) * BLOCK_SIZE)
                            .map_err(io_err("writing the image"))?;
                    }
                }
                _ => {}
            }
            written += u64::from(plan.inline_len);
        }
        let mut image = image.into_inner().map_err(|e| ErofsError::Io {
            what: "writing the image",
            source: e.into_error(),
        })?;
        let image_bytes = total_blocks * BLOCK_SIZE;
        image
            .set_len(image_bytes)
            .map_err(io_err("sizing the image"))?;

        let sb = superblock(&SuperblockFields {
            root_nid,
            inos: order.len() as u64,
            build_time,
            blocks: total_blocks as u32,
            meta_blkaddr: meta_blkaddr as u32,
        });
        image
            .seek(io::SeekFrom::Start(0))
            .map_err(io_err("writing the superblock"))?;
        image
            .write_all(&sb)
            .map_err(io_err("writing the superblock"))?;
        image.sync_all().map_err(io_err("syncing the image"))?;

        let file_bytes: u64 = order
            .iter()
            .filter_map(|&id| match &tree.inodes[id].kind {
                InodeKind::File(d) => Some(d.size),
                _ => None,
            })
            .sum();
        Ok(RootfsStats {
            layers: 0,
            entries: tree.stats.entries,
            whiteouts: tree.stats.whiteouts,
            opaque_dirs: tree.stats.opaque_dirs,
            inodes: order.len() as u64,
            files: stats0.files,
            dirs: stats0.dirs,
            symlinks: stats0.symlinks,
            specials: stats0.specials,
            hardlinked: stats0.hardlinked,
            file_bytes,
            dead_bytes: data_bytes.saturating_sub(file_bytes),
            xattrs_dropped,
            image_bytes,
        })
    }
}

impl DataSink for ErofsWriter {
    fn store_file(
        &mut self,
        src: &mut dyn Read,
        size: u64,
        xattrs: &[Xattr],
    ) -> Result<FileData, SinkError> {
        let tail = size % BLOCK_SIZE;
        // Inline the tail if it fits beside the largest (extended) inode and the
        // xattrs in one block; the layout pass then always finds room for it.
        let head = xattr_ibody(xattrs).map_or(usize::MAX / 2, |(body, _)| body.len());
        let inline = tail != 0 && (EXTENDED_INODE + head) as u64 + tail <= BLOCK_SIZE;
        let aligned = if inline { size - tail } else { size };
        let blocks = aligned.div_ceil(BLOCK_SIZE);
        if self.next_block + blocks > u64::from(u32::MAX) {
            return Err(SinkError::TooLarge);
        }
        let block = if blocks > 0 { self.next_block } else { 0 };
        copy_exact(src, &mut self.image, aligned, &mut self.buf)?;
        let pad = (blocks * BLOCK_SIZE - aligned) as usize;
        if pad > 0 {
            self.image
                .write_all(&vec![0u8; pad])
                .map_err(SinkError::Write)?;
        }
        self.next_block += blocks;
        let tail_offset = self.tails_len;
        let tail_len = if inline { tail } else { 0 };
        if inline {
            copy_exact(src, &mut self.tails, tail, &mut self.buf)?;
            self.tails_len += tail;
        }
        self.data_bytes += size;
        Ok(FileData {
            size,
            block,
            tail_offset,
            tail_len: tail_len as u32,
        })
    }
}

/// Copy exactly `len` bytes; a short source is a truncated layer.
fn copy_exact(
    src: &mut dyn Read,
    dst: &mut dyn Write,
    len: u64,
    buf: &mut [u8],
) -> Result<(), SinkError> {
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match src.read(&mut buf[..want]) {
            Ok(0) => return Err(SinkError::Truncated { missing: left }),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SinkError::Read(e)),
        };
        dst.write_all(&buf[..n]).map_err(SinkError::Write)?;
        left -= n as u64;
    }
    Ok(())
}

/// Layout decisions for one inode, from pass 1.
#[derive(Debug)]
struct Plan {
    nid: u64,
    extended: bool,
    layout: u16,
    size: u64,
    inline_len: u32,
    /// First block in the late (after-metadata) area, relative to its start.
    late_first: u64,
    late_count: u64,
    xattr_body: Vec<u8>,
}

fn late_addr(plan: &Plan, late_base: u64) -> u32 {
    if plan.late_count == 0 {
        NULL_ADDR
    } else {
        // Bounded by the total-blocks check before pass 2.
        (late_base + plan.late_first) as u32
    }
}

fn file_blkaddr(d: &FileData) -> u32 {
    if d.size == 0 {
        0
    } else if d.size - u64::from(d.tail_len) == 0 {
        NULL_ADDR
    } else {
        // The sink refused blocks beyond u32.
        d.block as u32
    }
}

#[derive(Debug, Default)]
struct KindCounts {
    files: u64,
    dirs: u64,
    symlinks: u64,
    specials: u64,
    hardlinked: u64,
}

/// Breadth-first order of the reachable inodes (root first, so its nid is
/// small: the superblock's root_nid is 16 bits), and every inode's link count.
fn walk(tree: &Tree) -> (Vec<InodeId>, Vec<InodeId>, Vec<u32>, KindCounts) {
    let mut order = vec![ROOT];
    let mut parents = vec![ROOT];
    let mut seen = vec![false; tree.inodes.len()];
    let mut nlink = vec![0u32; tree.inodes.len()];
    seen[ROOT] = true;
    let mut next = 0;
    while next < order.len() {
        let id = order[next];
        next += 1;
        let Some(children) = tree.children(id) else {
            continue;
        };
        let mut subdirs = 0u32;
        for child in children.values() {
            if tree.children(child.inode()).is_some() {
                subdirs = subdirs.saturating_add(1);
            } else {
                nlink[child.inode()] = nlink[child.inode()].saturating_add(1);
            }
            if !seen[child.inode()] {
                seen[child.inode()] = true;
                order.push(child.inode());
                parents.push(id);
            }
        }
        nlink[id] = subdirs.saturating_add(2);
    }
    let mut counts = KindCounts::default();
    for &id in &order {
        match tree.inodes[id].kind {
            InodeKind::File(_) => counts.files += 1,
            InodeKind::Dir(_) => counts.dirs += 1,
            InodeKind::Symlink(_) => counts.symlinks += 1,
            _ => counts.specials += 1,
        }
        if tree.children(id).is_none() && nlink[id] > 1 {
            counts.hardlinked += 1;
        }
    }
    (order, parents, nlink, counts)
}

/// A readable path for error messages (slow; errors only).
fn path_of(
    tree: &Tree,
    order: &[InodeId],
    parents: &[InodeId],
    slot_of: &[usize],
    slot: usize,
) -> String {
    let mut parts = Vec::new();
    let mut id = order[slot];
    let mut guard = 0;
    while id != ROOT && guard < 4096 {
        let parent = parents[slot_of[id]];
        if let Some((name, _)) = tree
            .children(parent)
            .and_then(|c| c.iter().find(|(_, c)| c.inode() == id))
        {
            parts.push(String::from_utf8_lossy(name).into_owned());
        }
        id = parent;
        guard += 1;
    }
    parts.reverse();
    format!("/{}", parts.join("/"))
}

fn file_type(kind: &InodeKind) -> u8 {
    match kind {
        InodeKind::File(_) => FT_REG,
        InodeKind::Dir(_) => FT_DIR,
        InodeKind::Symlink(_) => FT_SYMLINK,
        InodeKind::CharDevice { .. } => FT_CHRDEV,
        InodeKind::BlockDevice { .. } => FT_BLKDEV,
        InodeKind::Fifo => FT_FIFO,
    }
}

/// Linux `new_encode_dev`, which `erofs_read_inode` undoes for `i_u.rdev`.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Names of a directory including `.` and `..`, sorted as EROFS requires
/// (byte order; the kernel binary-searches them).
fn dir_names<'a>(children: impl Iterator<Item = &'a [u8]>) -> Vec<&'a [u8]> {
    let mut names: Vec<&[u8]> = vec![b".", b".."];
    names.extend(children);
    names.sort_unstable();
    names
}

/// Start index of each directory block: a block holds dirents then names and
/// may not exceed 4096 bytes; an entry never straddles blocks.
fn dir_splits(names: &[&[u8]]) -> (Vec<usize>, usize) {
    let mut splits = vec![0];
    let mut used = 0usize;
    for (i, name) in names.iter().enumerate() {
        let need = DIRENT + name.len();
        if used + need > BLKSZ {
            splits.push(i);
            used = 0;
        }
        used += need;
    }
    (splits, used)
}

fn dir_size(names: &[&[u8]]) -> u64 {
    let (splits, last_used) = dir_splits(names);
    (splits.len() as u64 - 1) * BLOCK_SIZE + last_used as u64
}

/// Directory data: blocks of `erofs_dirent` followed by their names; all blocks
/// but the last padded to 4096 bytes (the last one ends at i_size).
fn dir_blocks(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let names: Vec<&[u8]> = entries.iter().map(|e| e.0).collect();
    let (splits, _) = dir_splits(&names);
    let mut out = Vec::new();
    for (b, &start) in splits.iter().enumerate() {
        let end = splits.get(b + 1).copied().unwrap_or(entries.len());
        let block_start = out.len();
        let chunk = &entries[start..end];
        let mut nameoff = chunk.len() * DIRENT;
        for (name, nid, ft) in chunk {
            out.extend_from_slice(&nid.to_le_bytes());
            out.extend_from_slice(&(nameoff as u16).to_le_bytes());
            out.push(*ft);
            out.push(0);
            nameoff += name.len();
        }
        for (name, _, _) in chunk {
            out.extend_from_slice(name);
        }
        if b + 1 < splits.len() {
            out.resize(block_start + BLKSZ, 0);
        }
    }
    out
}

/// EROFS xattr name index for a full name (erofs_fs.h `EROFS_XATTR_INDEX_*`),
/// with the suffix stored on disk; `None` if the namespace has no index.
fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => return Some((2, b"")),
        b"system.posix_acl_default" => return Some((3, b"")),
        _ => {}
    }
    for (prefix, index) in [(&b"user."[..], 1u8), (b"trusted.", 4), (b"security.", 6)] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return (!rest.is_empty()).then_some((index, rest));
        }
    }
    None
}

/// The inline xattr area: `erofs_xattr_ibody_header` (no shared xattrs), then
/// `erofs_xattr_entry`s each padded to 4 bytes. Returns the bytes (empty if no
/// xattrs) and how many xattrs had no EROFS namespace and were dropped; `None`
/// if a name or value or the whole area exceeds the format's fields.
fn xattr_ibody(xattrs: &[Xattr]) -> Option<(Vec<u8>, u32)> {
    let mut body = Vec::new();
    let mut dropped = 0u32;
    for x in xattrs {
        let Some((index, suffix)) = xattr_index(&x.name) else {
            dropped += 1;
            continue;
        };
        if body.is_empty() {
            body.resize(XATTR_IBODY_HEADER, 0);
        }
        let name_len = u8::try_from(suffix.len()).ok()?;
        let value_len = u16::try_from(x.value.len()).ok()?;
        body.push(name_len);
        body.push(index);
        body.extend_from_slice(&value_len.to_le_bytes());
        body.extend_from_slice(suffix);
        body.extend_from_slice(&x.value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    // i_xattr_icount is 16 bits: size = 12 + 4 * (icount - 1).
    if !body.is_empty() && (body.len() - XATTR_IBODY_HEADER) / 4 + 1 > usize::from(u16::MAX) {
        return None;
    }
    Some((body, dropped))
}

fn encode_inode(
    plan: &Plan,
    mode: u16,
    i_u: u32,
    ino: u32,
    inode: &flatten::Inode,
    nlink: u32,
) -> Vec<u8> {
    let icount: u16 = if plan.xattr_body.is_empty() {
        0
    } else {
        // Checked in xattr_ibody.
        ((plan.xattr_body.len() - XATTR_IBODY_HEADER) / 4 + 1) as u16
    };
    let mut b = Vec::with_capacity(EXTENDED_INODE);
    let format = (plan.layout << 1) | u16::from(plan.extended);
    b.extend_from_slice(&format.to_le_bytes());
    b.extend_from_slice(&icount.to_le_bytes());
    b.extend_from_slice(&mode.to_le_bytes());
    if plan.extended {
        // erofs_inode_extended
        b.extend_from_slice(&0u16.to_le_bytes()); // i_reserved
        b.extend_from_slice(&plan.size.to_le_bytes());
        b.extend_from_slice(&i_u.to_le_bytes());
        b.extend_from_slice(&ino.to_le_bytes());
        b.extend_from_slice(&inode.uid.to_le_bytes());
        b.extend_from_slice(&inode.gid.to_le_bytes());
        b.extend_from_slice(&inode.mtime.to_le_bytes());
        b.extend_from_slice(&inode.mtime_nsec.to_le_bytes());
        b.extend_from_slice(&nlink.to_le_bytes());
        b.resize(EXTENDED_INODE, 0);
    } else {
        // erofs_inode_compact; the checks in pass 1 make these casts exact.
        b.extend_from_slice(&(nlink as u16).to_le_bytes());
        b.extend_from_slice(&(plan.size as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // i_reserved (mtime needs COMPAT_MTIME)
        b.extend_from_slice(&i_u.to_le_bytes());
        b.extend_from_slice(&ino.to_le_bytes());
        b.extend_from_slice(&(inode.uid as u16).to_le_bytes());
        b.extend_from_slice(&(inode.gid as u16).to_le_bytes());
        b.resize(COMPACT_INODE, 0);
    }
    b
}

struct SuperblockFields {
    root_nid: u16,
    inos: u64,
    build_time: (u64, u32),
    blocks: u32,
    meta_blkaddr: u32,
}

/// Block 0: zeros, then `erofs_super_block` at 1024, checksummed.
fn superblock(f: &SuperblockFields) -> Vec<u8> {
    let mut block = vec![0u8; BLKSZ];
    let sb = &mut block[SUPERBLOCK_OFFSET..];
    sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    // 4..8 checksum, filled below.
    sb[8..12].copy_from_slice(&FEATURE_COMPAT_SB_CHKSUM.to_le_bytes());
    sb[12] = 12; // blkszbits
    sb[13] = 0; // sb_extslots
    sb[14..16].copy_from_slice(&f.root_nid.to_le_bytes());
    sb[16..24].copy_from_slice(&f.inos.to_le_bytes());
    sb[24..32].copy_from_slice(&f.build_time.0.to_le_bytes());
    sb[32..36].copy_from_slice(&f.build_time.1.to_le_bytes());
    sb[36..40].copy_from_slice(&f.blocks.to_le_bytes());
    sb[40..44].copy_from_slice(&f.meta_blkaddr.to_le_bytes());
    // xattr_blkaddr 0 (no shared xattrs), uuid and volume name zero,
    // feature_incompat 0: nothing beyond the base format is used.
    let crc = crc32c_raw(!0, sb);
    sb[4..8].copy_from_slice(&crc.to_le_bytes());
    block
}

/// CRC-32C as the kernel's `crc32c(seed, ...)`: reflected polynomial 0x82F63B78,
/// no final inversion (erofs `erofs_superblock_csum_verify` passes seed ~0).
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = seed;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_raw_matches_standard_vector() {
        // CRC-32C("123456789") = 0xE3069283 with the final inversion.
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn encode_dev_null_device_is_0x103() {
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(259, 0x12345), 0x1231_0345);
    }

    #[test]
    fn dir_blocks_split_without_straddling() {
        let long = vec![b'x'; 200];
        let names: Vec<Vec<u8>> = (0..100)
            .map(|i| {
                let mut n = long.clone();
                n.extend_from_slice(format!("{i:03}").as_bytes());
                n
            })
            .collect();
        let entries: Vec<(&[u8], u64, u8)> =
            names.iter().map(|n| (n.as_slice(), 7, FT_REG)).collect();
        let data = dir_blocks(&entries);
        let refs: Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
        assert_eq!(data.len() as u64, dir_size(&refs));
        // 19 entries of 215 bytes fit a block (4085), the 20th would not.
        let first_nameoff = u16::from_le_bytes([data[8], data[9]]) as usize;
        assert_eq!(first_nameoff / DIRENT, 19);
        let second = &data[BLKSZ..];
        let nameoff = u16::from_le_bytes([second[8], second[9]]) as usize;
        assert_eq!(&second[nameoff..nameoff + 203], names[19].as_slice());
    }

    #[test]
    fn xattr_ibody_drops_unknown_namespace_and_pads() {
        let (body, dropped) = xattr_ibody(&[
            Xattr {
                name: b"user.test".to_vec(),
                value: b"v".to_vec(),
            },
            Xattr {
                name: b"system.nfs4_acl".to_vec(),
                value: b"z".to_vec(),
            },
        ])
        .unwrap();
        assert_eq!(dropped, 1);
        // header 12 + entry (4 + "test" + "v" = 9, padded to 12)
        assert_eq!(body.len(), 24);
        assert_eq!(&body[12..16], &[4, 1, 1, 0]);
        assert_eq!(&body[16..21], b"testv");
    }

    #[test]
    fn xattr_ibody_value_over_64k_is_refused() {
        assert!(xattr_ibody(&[Xattr {
            name: b"user.big".to_vec(),
            value: vec![0; 70_000],
        }])
        .is_none());
    }

    #[test]
    fn superblock_has_magic_and_valid_checksum() {
        let block = superblock(&SuperblockFields {
            root_nid: 1,
            inos: 3,
            build_time: (5, 0),
            blocks: 10,
            meta_blkaddr: 4,
        });
        let sb = &block[SUPERBLOCK_OFFSET..];
        assert_eq!(&sb[0..4], &MAGIC.to_le_bytes());
        let mut zeroed = sb.to_vec();
        zeroed[4..8].fill(0);
        assert_eq!(
            u32::from_le_bytes([sb[4], sb[5], sb[6], sb[7]]),
            crc32c_raw(!0, &zeroed)
        );
    }
}
