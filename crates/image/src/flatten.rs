//! Applying an image's ordered layer tars to one virtual tree (OCI image-spec
//! layer.md, "Applying Changesets" and "Representing Changes").
//!
//! The tree lives in memory as metadata only. Regular-file contents are handed to
//! a [`DataSink`] while the tar streams by, so a big image is never held in RAM:
//! the EROFS writer puts them straight into the image's data area.
//!
//! Every layer is hostile input. Nothing is ever written to the host file system
//! from a path in a tar: the tree is virtual, `..` that would climb above the root
//! is an error, a leading `/` is stripped (as docker does), and symlinks are only
//! followed inside the tree, clamped at its root (chroot semantics).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::tar_guard::{limit_error, LimitError, Limits, TarGuard, Totals};

/// How a layer blob is compressed (one definition for the whole crate).
pub use crate::manifest::Compression;

/// One layer blob on disk, lowest layer first in a slice of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The blob file (compressed as `compression` says).
    pub path: PathBuf,
    /// How the blob is compressed.
    pub compression: Compression,
}

/// Errors from applying a layer tar to the tree.
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// The blob could not be opened.
    #[error("cannot open layer blob {path}")]
    Open {
        /// The blob path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The tar stream (or its compression) is corrupt or truncated.
    #[error("layer tar is corrupt or truncated")]
    Tar(#[source] io::Error),
    /// A header field of an entry cannot be parsed.
    #[error("tar entry {path:?} has an unreadable header")]
    Header {
        /// The entry path, lossily decoded.
        path: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// A path climbs above the root with `..`.
    #[error("tar entry path {path:?} escapes the image root")]
    PathEscapesRoot {
        /// The raw path, lossily decoded.
        path: String,
    },
    /// A path is malformed: a NUL byte, a component over 255 bytes, or over 4096 bytes.
    #[error("tar entry path {path:?} is invalid: {reason}")]
    InvalidPath {
        /// The raw path, lossily decoded.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// A hardlink names a target that does not exist in the merged tree.
    #[error(
        "hardlink {path:?} points to {target:?}, which does not exist in this or a lower layer"
    )]
    HardlinkTargetMissing {
        /// The link entry.
        path: String,
        /// Its target.
        target: String,
    },
    /// A hardlink names a directory.
    #[error("hardlink {path:?} points to directory {target:?}")]
    HardlinkToDirectory {
        /// The link entry.
        path: String,
        /// Its target.
        target: String,
    },
    /// A hardlink or symlink entry has no link name, or a symlink target is too long.
    #[error("link entry {path:?} has a missing or over-long target")]
    BadLinkTarget {
        /// The link entry.
        path: String,
    },
    /// A path component that must be a directory is a file.
    #[error("tar entry {path:?} needs {component:?} to be a directory, but it is not")]
    NotADirectory {
        /// The entry path.
        path: String,
        /// The offending component.
        component: String,
    },
    /// Too many symlinks while resolving a path (a loop).
    #[error("too many levels of symbolic links resolving {path:?}")]
    SymlinkLoop {
        /// The entry path.
        path: String,
    },
    /// An entry type that has no meaning in a root file system.
    #[error("tar entry {path:?} has unsupported type {kind:?}")]
    UnsupportedEntryType {
        /// The entry path.
        path: String,
        /// The raw type byte as a char.
        kind: char,
    },
    /// The root itself is given as something other than a directory.
    #[error("tar entry {path:?} would replace the root directory with a non-directory")]
    RootNotDirectory {
        /// The entry path.
        path: String,
    },
    /// The layer broke one of the image's [`Limits`].
    #[error("the layer is over a limit")]
    Limit(#[source] LimitError),
    /// The sink could not take a file's data.
    #[error("storing the data of {path:?}")]
    Data {
        /// The entry path.
        path: String,
        /// What failed.
        #[source]
        source: SinkError,
    },
}

/// Errors a [`DataSink`] reports while storing file data.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The layer stream failed while reading the data.
    #[error("reading file data from the layer failed")]
    Read(#[source] io::Error),
    /// The layer ended inside the file data.
    #[error("the layer ends {missing} bytes before the end of this file (truncated tar)")]
    Truncated {
        /// Bytes that were announced but never came.
        missing: u64,
    },
    /// The output could not be written.
    #[error("writing file data to the output failed")]
    Write(#[source] io::Error),
    /// The output format cannot address this much data.
    #[error("the image would exceed the format's size limit")]
    TooLarge,
}

/// An extended attribute, name with its namespace prefix (`user.test`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    /// Full name, e.g. `security.capability`.
    pub name: Vec<u8>,
    /// Raw value.
    pub value: Vec<u8>,
}

/// Where a sink put one regular file's contents. Meaning of the fields is the
/// sink's; the tree only carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileData {
    /// File size in bytes.
    pub size: u64,
    /// First block of the file's block-aligned part (sink-defined).
    pub block: u64,
    /// Offset of the unaligned tail in the sink's tail store.
    pub tail_offset: u64,
    /// Length of that tail; 0 if the whole file is block-aligned in place.
    pub tail_len: u32,
}

/// Receives regular-file contents as the layer streams by.
pub trait DataSink {
    /// Read exactly `size` bytes from `src` and store them. `xattrs` are the
    /// file's extended attributes (they decide whether the tail can be inlined).
    fn store_file(
        &mut self,
        src: &mut dyn Read,
        size: u64,
        xattrs: &[Xattr],
    ) -> Result<FileData, SinkError>;
}

/// Index of an inode in [`Tree::inodes`].
pub type InodeId = usize;

/// A directory entry: the inode it names and the layer that last wrote it,
/// 8 bytes (a tree holds hundreds of thousands of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    inode: u32,
    layer: u32,
}

impl Child {
    /// `inode` and `layer` fit 32 bits: [`Tree::apply_layer`] keeps the inode
    /// count below [`MAX_INODES`], and an image has far fewer layers.
    fn new(inode: InodeId, layer: usize) -> Self {
        Self {
            inode: u32::try_from(inode).unwrap_or(u32::MAX),
            layer: u32::try_from(layer).unwrap_or(u32::MAX),
        }
    }

    /// The inode.
    pub fn inode(&self) -> InodeId {
        self.inode as InodeId
    }

    /// The layer (index into the layer list) that created or last touched the
    /// entry; whiteouts and opaque markers only remove entries of lower layers.
    pub fn layer(&self) -> usize {
        self.layer as usize
    }

    fn touch(&mut self, layer: usize) {
        self.layer = u32::try_from(layer).unwrap_or(u32::MAX);
    }
}

/// A directory's entries by name, sorted by name bytes (the order EROFS needs).
pub type Children = BTreeMap<Box<[u8]>, Child>;

/// Inodes a tree may hold: [`Child`] indexes them in 32 bits, and one entry
/// adds at most a path's worth of directories.
const MAX_INODES: usize = u32::MAX as usize - 2 * MAX_PATH_LEN;

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InodeKind {
    /// A regular file.
    File(FileData),
    /// A directory, children sorted by name bytes (the order EROFS needs).
    Dir(Children),
    /// A symbolic link and its target, stored verbatim.
    Symlink(Vec<u8>),
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One inode of the merged tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Type and type-specific data.
    pub kind: InodeKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch (negative clamps to 0).
    pub mtime: u64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// Extended attributes in the order the tar gave them.
    pub xattrs: Box<[Xattr]>,
}

/// Counters of what applying layers did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlattenStats {
    /// Tar entries read (not counting PAX/GNU meta entries).
    pub entries: u64,
    /// Entries removed by `.wh.<name>` whiteouts.
    pub whiteouts: u64,
    /// Opaque-directory markers applied.
    pub opaque_dirs: u64,
}

/// The merged tree of all layers applied so far.
#[derive(Debug, Clone)]
pub struct Tree {
    /// All inodes ever created; unreachable ones are skipped by writers.
    pub inodes: Vec<Inode>,
    /// Counters.
    pub stats: FlattenStats,
    /// Bounds on the layers applied (entries, sizes), and how far they got.
    limits: Limits,
    totals: Totals,
    /// What the tree holds in memory, as [`Limits::max_tree_bytes`] counts it.
    tree_bytes: u64,
}

/// Memory an inode takes in [`Tree::inodes`] beyond its variable parts (the
/// vector's slack included).
const INODE_COST: u64 = std::mem::size_of::<Inode>() as u64 + 16;
/// Memory a directory entry takes beyond its name: its 24-byte slot in a
/// B-tree node (nodes are little more than half full when names come sorted,
/// as tars give them) and the name's allocation header. Calibrated: a million
/// short-named files peak at 158 MiB, this count says 168.
const CHILD_COST: u64 = 56;

/// The memory a directory entry named `name` takes (allocations are at least 32
/// bytes).
fn child_cost(name: &[u8]) -> u64 {
    CHILD_COST + (name.len() as u64).max(24)
}

/// The memory an inode's variable parts take.
fn inode_cost(inode: &Inode) -> u64 {
    let link = match &inode.kind {
        InodeKind::Symlink(t) => t.len() as u64,
        _ => 0,
    };
    INODE_COST + link + xattrs_cost(&inode.xattrs)
}

fn xattrs_cost(xattrs: &[Xattr]) -> u64 {
    xattrs
        .iter()
        .map(|x| (std::mem::size_of::<Xattr>() + x.name.len() + x.value.len()) as u64 + 32)
        .sum()
}

/// The root directory's inode id.
pub const ROOT: InodeId = 0;

/// Linux `SYMLOOP_MAX`-like bound on symlinks followed while resolving one path.
const MAX_SYMLINK_HOPS: u32 = 40;
/// Linux `PATH_MAX`; longer entry paths are refused.
const MAX_PATH_LEN: usize = 4096;
/// Linux `NAME_MAX`, also EROFS's name limit.
const MAX_NAME_LEN: usize = 255;
/// Whiteout prefix (OCI image-spec layer.md "Whiteouts").
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// AUFS metadata prefix; such entries are not part of the file system.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    /// An empty tree: a root directory `0755 root:root`, mtime 0.
    pub fn new() -> Tree {
        Tree {
            inodes: vec![Inode {
                kind: InodeKind::Dir(BTreeMap::new()),
                perm: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: Box::default(),
            }],
            stats: FlattenStats::default(),
            limits: Limits::default(),
            totals: Totals::default(),
            tree_bytes: INODE_COST,
        }
    }

    /// The children of a directory inode, or `None` if it is not a directory.
    pub fn children(&self, id: InodeId) -> Option<&Children> {
        match &self.inodes.get(id)?.kind {
            InodeKind::Dir(children) => Some(children),
            _ => None,
        }
    }

    /// Look a path up without following its last component (like `lstat`).
    pub fn lookup(&self, path: &[u8]) -> Option<InodeId> {
        let comps = normalize(path).ok()?;
        let mut cur = ROOT;
        for c in &comps {
            cur = self.children(cur)?.get(c.as_slice())?.inode();
        }
        Some(cur)
    }

    fn children_mut(&mut self, id: InodeId) -> Option<&mut Children> {
        match &mut self.inodes.get_mut(id)?.kind {
            InodeKind::Dir(children) => Some(children),
            _ => None,
        }
    }

    fn add_inode(&mut self, inode: Inode) -> InodeId {
        self.tree_bytes += inode_cost(&inode);
        self.inodes.push(inode);
        self.inodes.len() - 1
    }

    /// Walk `comps` from the root. Intermediate symlinks are followed inside the
    /// tree; `..` never climbs above the root. With `create`, missing directories
    /// are made (`0755 root:root`, as docker's MkdirAll) and every directory passed
    /// is tagged with `layer`, so an opaque marker later in the same layer keeps it.
    /// Returns the directory holding the last component, or `None` if a component
    /// is missing and `create` is off.
    fn resolve_parent(
        &mut self,
        comps: &[Vec<u8>],
        layer: usize,
        create: bool,
        display: &str,
    ) -> Result<Option<InodeId>, FlattenError> {
        let Some((_, dirs)) = comps.split_last() else {
            return Ok(Some(ROOT));
        };
        let mut stack: Vec<InodeId> = vec![ROOT];
        let mut queue: std::collections::VecDeque<Vec<u8>> = dirs.iter().cloned().collect();
        let mut hops = 0u32;
        while let Some(comp) = queue.pop_front() {
            if comp.as_slice() == b"." || comp.is_empty() {
                continue;
            }
            if comp.as_slice() == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let cur = *stack.last().unwrap_or(&ROOT);
            let existing = self
                .children(cur)
                .and_then(|c| c.get(comp.as_slice()))
                .copied();
            match existing {
                Some(child) => match &self.inodes[child.inode()].kind {
                    InodeKind::Dir(_) => {
                        if create {
                            if let Some(c) = self
                                .children_mut(cur)
                                .and_then(|c| c.get_mut(comp.as_slice()))
                            {
                                c.touch(layer);
                            }
                        }
                        stack.push(child.inode());
                    }
                    InodeKind::Symlink(target) => {
                        hops += 1;
                        if hops > MAX_SYMLINK_HOPS {
                            return Err(FlattenError::SymlinkLoop {
                                path: display.to_string(),
                            });
                        }
                        if target.first() == Some(&b'/') {
                            stack.truncate(1);
                        }
                        for part in target.split(|&b| b == b'/').rev() {
                            queue.push_front(part.to_vec());
                        }
                    }
                    _ => {
                        return Err(FlattenError::NotADirectory {
                            path: display.to_string(),
                            component: String::from_utf8_lossy(&comp).into_owned(),
                        })
                    }
                },
                None if create => {
                    let id = self.add_inode(Inode {
                        kind: InodeKind::Dir(BTreeMap::new()),
                        perm: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                        mtime_nsec: 0,
                        xattrs: Box::default(),
                    });
                    self.tree_bytes += child_cost(&comp);
                    if let Some(c) = self.children_mut(cur) {
                        c.insert(comp.into_boxed_slice(), Child::new(id, layer));
                    }
                    stack.push(id);
                }
                None => return Ok(None),
            }
        }
        Ok(Some(*stack.last().unwrap_or(&ROOT)))
    }

    /// Put `inode` at `name` in `parent`: a directory over a directory merges
    /// (metadata replaced, children kept); anything else replaces the old entry.
    fn place(&mut self, parent: InodeId, name: Vec<u8>, layer: usize, new: NewEntry) {
        let existing = self
            .children(parent)
            .and_then(|c| c.get(name.as_slice()))
            .copied();
        let id = match new {
            NewEntry::Link(id) => id,
            NewEntry::Inode(inode) => {
                if let (Some(old), InodeKind::Dir(_)) = (existing, &inode.kind) {
                    if let InodeKind::Dir(_) = self.inodes[old.inode()].kind {
                        self.tree_bytes += xattrs_cost(&inode.xattrs);
                        let target = &mut self.inodes[old.inode()];
                        target.perm = inode.perm;
                        target.uid = inode.uid;
                        target.gid = inode.gid;
                        target.mtime = inode.mtime;
                        target.mtime_nsec = inode.mtime_nsec;
                        target.xattrs = inode.xattrs;
                        if let Some(c) = self
                            .children_mut(parent)
                            .and_then(|c| c.get_mut(name.as_slice()))
                        {
                            c.touch(layer);
                        }
                        return;
                    }
                }
                self.add_inode(inode)
            }
        };
        if existing.is_none() {
            self.tree_bytes += child_cost(&name);
        }
        if let Some(children) = self.children_mut(parent) {
            children.insert(name.into_boxed_slice(), Child::new(id, layer));
        }
    }

    /// Opaque directory (layer.md "Opaque Whiteout"): drop every entry below `dir`
    /// that a lower layer wrote; same-layer directories are kept but pruned too.
    fn make_opaque(&mut self, dir: InodeId, layer: usize) {
        let mut work = vec![dir];
        while let Some(d) = work.pop() {
            let Some(children) = self.children_mut(d) else {
                continue;
            };
            children.retain(|_, c| c.layer() >= layer);
            let keep: Vec<InodeId> = children.values().map(Child::inode).collect();
            for id in keep {
                if matches!(self.inodes[id].kind, InodeKind::Dir(_)) {
                    work.push(id);
                }
            }
        }
    }

    /// An empty tree whose layers are held to `limits`.
    pub fn with_limits(limits: Limits) -> Tree {
        Tree {
            limits,
            ..Tree::new()
        }
    }

    /// Apply one layer tar (already decompressed) on top of the tree.
    /// `layer` is the layer's index, lowest first. The tree's [`Limits`] hold
    /// over all layers applied to it.
    pub fn apply_layer<R: Read>(
        &mut self,
        reader: R,
        layer: usize,
        sink: &mut dyn DataSink,
    ) -> Result<(), FlattenError> {
        let mut guard = TarGuard::new(reader, self.limits, self.totals);
        let result = self.apply_entries(&mut guard, layer, sink);
        self.totals = guard.totals();
        result.map_err(lift_limit)
    }

    fn apply_entries<R: Read>(
        &mut self,
        reader: R,
        layer: usize,
        sink: &mut dyn DataSink,
    ) -> Result<(), FlattenError> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(FlattenError::Tar)?;
        for entry in entries {
            let mut entry = entry.map_err(FlattenError::Tar)?;
            self.apply_entry(&mut entry, layer, sink)?;
            if self.tree_bytes > self.limits.max_tree_bytes || self.inodes.len() > MAX_INODES {
                return Err(FlattenError::Limit(LimitError::TreeTooLarge {
                    limit: self.limits.max_tree_bytes,
                    entries: self.stats.entries,
                }));
            }
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        layer: usize,
        sink: &mut dyn DataSink,
    ) -> Result<(), FlattenError> {
        let raw_path = entry.path_bytes().into_owned();
        let display = String::from_utf8_lossy(&raw_path).into_owned();
        let kind_byte = entry.header().entry_type().as_byte();
        // PAX global headers carry no file; everything else is one.
        if kind_byte == b'g' {
            return Ok(());
        }
        self.stats.entries += 1;
        let header_err = |source: io::Error| FlattenError::Header {
            path: display.clone(),
            source,
        };

        let comps = normalize(&raw_path).map_err(|reason| match reason {
            PathProblem::Escapes => FlattenError::PathEscapesRoot {
                path: display.clone(),
            },
            PathProblem::Invalid(reason) => FlattenError::InvalidPath {
                path: display.clone(),
                reason,
            },
        })?;

        // Whiteouts (layer.md "Whiteouts"): never materialized themselves.
        if let Some(name) = comps.last() {
            if name.as_slice() == OPAQUE_MARKER {
                self.stats.opaque_dirs += 1;
                if let Some(dir) = self.resolve_parent(&comps, layer, true, &display)? {
                    self.make_opaque(dir, layer);
                }
                return Ok(());
            }
            if name.starts_with(WHITEOUT_META_PREFIX) {
                return Ok(());
            }
            if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
                if let Some(dir) = self.resolve_parent(&comps, layer, false, &display)? {
                    if let Some(children) = self.children_mut(dir) {
                        // Only lower layers' entries: layer.md says a whiteout never
                        // hides a file of its own layer.
                        if children.get(target).is_some_and(|c| c.layer() < layer) {
                            children.remove(target);
                            self.stats.whiteouts += 1;
                        }
                    }
                }
                return Ok(());
            }
        }

        // Metadata, PAX records overriding the ustar fields.
        let mut uid = entry.header().uid().map_err(header_err)?;
        let mut gid = entry.header().gid().map_err(header_err)?;
        let mut mtime = entry.header().mtime().map_err(header_err)?;
        let mut mtime_nsec = 0u32;
        let perm = (entry.header().mode().map_err(header_err)? & 0o7777) as u16;
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(header_err)? {
            for ext in pax {
                let ext = ext.map_err(header_err)?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push(Xattr {
                        name: name.to_vec(),
                        value: value.to_vec(),
                    });
                } else if key == b"uid" {
                    uid = parse_decimal(value).ok_or_else(|| header_err(bad_pax("uid")))?;
                } else if key == b"gid" {
                    gid = parse_decimal(value).ok_or_else(|| header_err(bad_pax("gid")))?;
                } else if key == b"mtime" {
                    (mtime, mtime_nsec) =
                        parse_pax_time(value).ok_or_else(|| header_err(bad_pax("mtime")))?;
                }
            }
        }
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(header_err(bad_pax("uid/gid above 2^32-1")));
        };
        let meta = |kind| Inode {
            kind,
            perm,
            uid,
            gid,
            mtime,
            mtime_nsec,
            xattrs: xattrs.clone().into_boxed_slice(),
        };

        let Some((name, _)) = comps.split_last() else {
            // The root itself ("./" or "/"): only a directory may describe it.
            if kind_byte == b'5' {
                let root = &mut self.inodes[ROOT];
                root.perm = perm;
                root.uid = uid;
                root.gid = gid;
                root.mtime = mtime;
                root.mtime_nsec = mtime_nsec;
                self.tree_bytes += xattrs_cost(&xattrs);
                let root = &mut self.inodes[ROOT];
                root.xattrs = xattrs.into_boxed_slice();
                return Ok(());
            }
            return Err(FlattenError::RootNotDirectory { path: display });
        };
        let name = name.clone();

        let new = match kind_byte {
            b'0' | b'\0' | b'7' | b'S' => {
                let size = entry.size();
                let data =
                    sink.store_file(entry, size, &xattrs)
                        .map_err(|source| FlattenError::Data {
                            path: display.clone(),
                            source,
                        })?;
                NewEntry::Inode(meta(InodeKind::File(data)))
            }
            b'5' => NewEntry::Inode(meta(InodeKind::Dir(BTreeMap::new()))),
            b'2' => {
                let target = entry
                    .link_name_bytes()
                    .filter(|t| !t.is_empty() && t.len() < MAX_PATH_LEN)
                    .ok_or_else(|| FlattenError::BadLinkTarget {
                        path: display.clone(),
                    })?
                    .into_owned();
                NewEntry::Inode(meta(InodeKind::Symlink(target)))
            }
            b'3' | b'4' => {
                let major = entry
                    .header()
                    .device_major()
                    .map_err(header_err)?
                    .unwrap_or(0);
                let minor = entry
                    .header()
                    .device_minor()
                    .map_err(header_err)?
                    .unwrap_or(0);
                NewEntry::Inode(meta(if kind_byte == b'3' {
                    InodeKind::CharDevice { major, minor }
                } else {
                    InodeKind::BlockDevice { major, minor }
                }))
            }
            b'6' => NewEntry::Inode(meta(InodeKind::Fifo)),
            b'1' => {
                let target = entry
                    .link_name_bytes()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| FlattenError::BadLinkTarget {
                        path: display.clone(),
                    })?
                    .into_owned();
                let target_display = String::from_utf8_lossy(&target).into_owned();
                let missing = || FlattenError::HardlinkTargetMissing {
                    path: display.clone(),
                    target: target_display.clone(),
                };
                let target_comps = match normalize(&target) {
                    Ok(c) => c,
                    Err(PathProblem::Escapes) => return Err(missing()),
                    Err(PathProblem::Invalid(reason)) => {
                        return Err(FlattenError::InvalidPath {
                            path: target_display,
                            reason,
                        })
                    }
                };
                let Some(tname) = target_comps.last() else {
                    return Err(FlattenError::HardlinkToDirectory {
                        path: display,
                        target: target_display,
                    });
                };
                let dir = self
                    .resolve_parent(&target_comps, layer, false, &target_display)?
                    .ok_or_else(missing)?;
                let id = self
                    .children(dir)
                    .and_then(|c| c.get(tname.as_slice()))
                    .ok_or_else(missing)?
                    .inode();
                if matches!(self.inodes[id].kind, InodeKind::Dir(_)) {
                    return Err(FlattenError::HardlinkToDirectory {
                        path: display,
                        target: target_display,
                    });
                }
                NewEntry::Link(id)
            }
            other => {
                return Err(FlattenError::UnsupportedEntryType {
                    path: display,
                    kind: other as char,
                })
            }
        };
        let parent = self
            .resolve_parent(&comps, layer, true, &display)?
            .unwrap_or(ROOT);
        self.place(parent, name, layer, new);
        Ok(())
    }
}

enum NewEntry {
    Inode(Inode),
    Link(InodeId),
}

enum PathProblem {
    Escapes,
    Invalid(&'static str),
}

/// Split a tar path into clean components: leading `/` and `./` dropped, `.`
/// skipped, `..` applied lexically (as Go's `filepath.Clean`, which docker uses).
/// A `..` above the root is refused rather than clamped: such an entry is hostile.
fn normalize(raw: &[u8]) -> Result<Vec<Vec<u8>>, PathProblem> {
    if raw.len() > MAX_PATH_LEN {
        return Err(PathProblem::Invalid("longer than 4096 bytes"));
    }
    if raw.contains(&0) {
        return Err(PathProblem::Invalid("contains a NUL byte"));
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(PathProblem::Escapes);
                }
            }
            name if name.len() > MAX_NAME_LEN => {
                return Err(PathProblem::Invalid("a component is longer than 255 bytes"))
            }
            name => out.push(name.to_vec()),
        }
    }
    Ok(out)
}

fn bad_pax(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad PAX {what} record"))
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// PAX `mtime` is decimal seconds with an optional fraction, possibly negative
/// (POSIX pax "mtime"). Negative times clamp to 0.
fn parse_pax_time(v: &[u8]) -> Option<(u64, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: u64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nsec = 0u32;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    if negative {
        return Some((0, 0));
    }
    Some((secs, nsec))
}

/// Open a layer blob and undo its compression, as a plain tar stream.
pub fn open_layer(layer: &Layer) -> Result<Box<dyn Read>, FlattenError> {
    let file = File::open(&layer.path).map_err(|source| FlattenError::Open {
        path: layer.path.clone(),
        source,
    })?;
    let buffered = BufReader::with_capacity(1 << 20, file);
    Ok(match layer.compression {
        Compression::None => Box::new(buffered),
        // Multi-member: some tools write a gzip stream per chunk.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        // ruzstd: a pure-Rust decoder, so the crate builds for every target without
        // a C toolchain (the macOS lint cross-compiles from Linux).
        Compression::Zstd => Box::new(ruzstd::decoding::StreamingDecoder::new(buffered).map_err(
            |e| FlattenError::Open {
                path: layer.path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            },
        )?),
    })
}

/// A [`TarGuard`] refusal, wherever the tar crate or the sink surfaced it, as
/// [`FlattenError::Limit`].
fn lift_limit(e: FlattenError) -> FlattenError {
    let io = match &e {
        FlattenError::Tar(io) | FlattenError::Header { source: io, .. } => Some(io),
        FlattenError::Data {
            source: SinkError::Read(io),
            ..
        } => Some(io),
        _ => None,
    };
    match io.and_then(limit_error) {
        Some(limit) => FlattenError::Limit(limit.clone()),
        None => e,
    }
}

/// Apply `layers` (lowest first) into a fresh tree, within the default
/// [`Limits`].
pub fn flatten(layers: &[Layer], sink: &mut dyn DataSink) -> Result<Tree, LayerError> {
    flatten_with(layers, sink, Limits::default())
}

/// Apply `layers` (lowest first) into a fresh tree, within `limits`.
pub fn flatten_with(
    layers: &[Layer],
    sink: &mut dyn DataSink,
    limits: Limits,
) -> Result<Tree, LayerError> {
    let mut tree = Tree::with_limits(limits);
    for (index, layer) in layers.iter().enumerate() {
        let reader = open_layer(layer).map_err(|source| LayerError {
            index,
            path: layer.path.clone(),
            source,
        })?;
        tree.apply_layer(reader, index, sink)
            .map_err(|source| LayerError {
                index,
                path: layer.path.clone(),
                source,
            })?;
    }
    Ok(tree)
}

/// A [`FlattenError`] with the layer it happened in.
#[derive(Debug, thiserror::Error)]
#[error("layer {index} ({path}) cannot be applied")]
pub struct LayerError {
    /// Index in the layer list, lowest first.
    pub index: usize,
    /// The blob.
    pub path: PathBuf,
    /// What went wrong.
    #[source]
    pub source: FlattenError,
}

/// Convenience for callers holding a path and a media type.
pub fn layer_from_media_type(path: &Path, media_type: &str) -> Option<Layer> {
    Some(Layer {
        path: path.to_path_buf(),
        compression: Compression::from_media_type(media_type).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps file contents in memory; `block` is the index into `files`.
    #[derive(Default)]
    struct MemSink {
        files: Vec<Vec<u8>>,
    }

    impl DataSink for MemSink {
        fn store_file(
            &mut self,
            src: &mut dyn Read,
            size: u64,
            _xattrs: &[Xattr],
        ) -> Result<FileData, SinkError> {
            let mut buf = Vec::new();
            src.take(size)
                .read_to_end(&mut buf)
                .map_err(SinkError::Read)?;
            if (buf.len() as u64) < size {
                return Err(SinkError::Truncated {
                    missing: size - buf.len() as u64,
                });
            }
            self.files.push(buf);
            Ok(FileData {
                size,
                block: self.files.len() as u64 - 1,
                ..FileData::default()
            })
        }
    }

    enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match e {
                E::File(p, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    // Raw name: the tar crate's set_path refuses `..`, hostile tars don't.
                    h.as_old_mut().name[..p.len()].copy_from_slice(p.as_bytes());
                    h.set_cksum();
                    b.append(&h, *data).unwrap();
                }
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    h.as_old_mut().name[..p.len()].copy_from_slice(p.as_bytes());
                    h.set_cksum();
                    b.append(&h, &[][..]).unwrap();
                }
                E::Sym(p, t) | E::Hard(p, t) => {
                    h.set_entry_type(if matches!(e, E::Sym(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    h.set_size(0);
                    h.as_old_mut().name[..p.len()].copy_from_slice(p.as_bytes());
                    h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                    h.set_cksum();
                    b.append(&h, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn apply(tree: &mut Tree, layer: usize, entries: &[E<'_>]) -> Result<(), FlattenError> {
        tree.apply_layer(&tar_of(entries)[..], layer, &mut MemSink::default())
    }

    #[test]
    fn whiteout_lower_file_removed() {
        let mut t = Tree::new();
        apply(
            &mut t,
            0,
            &[
                E::Dir("etc"),
                E::File("etc/a", b"1"),
                E::File("etc/b", b"2"),
            ],
        )
        .unwrap();
        apply(&mut t, 1, &[E::File("etc/.wh.a", b"")]).unwrap();
        assert!(t.lookup(b"etc/a").is_none());
        assert!(t.lookup(b"etc/b").is_some());
        assert!(t.lookup(b"etc/.wh.a").is_none());
        assert_eq!(t.stats.whiteouts, 1);
    }

    #[test]
    fn whiteout_same_layer_entry_kept() {
        let mut t = Tree::new();
        apply(&mut t, 0, &[E::File("a", b"1"), E::File(".wh.a", b"")]).unwrap();
        assert!(t.lookup(b"a").is_some());
    }

    #[test]
    fn the_tree_budget_counts_names_and_link_targets() {
        let limits = Limits {
            max_tree_bytes: 27_000,
            ..Limits::default()
        };
        // 100 short names fit in 27,000 bytes (about 220 each)...
        let short: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
        let entries: Vec<E<'_>> = short.iter().map(|n| E::File(n, b"")).collect();
        apply(&mut Tree::with_limits(limits), 0, &entries).unwrap();
        // ...the same count of 99-byte symlink targets does not.
        let target = "t".repeat(99);
        let links: Vec<E<'_>> = short.iter().map(|n| E::Sym(n, &target)).collect();
        let mut tree = Tree::with_limits(limits);
        let err = apply(&mut tree, 0, &links).unwrap_err();
        let FlattenError::Limit(LimitError::TreeTooLarge { limit, entries }) = err else {
            panic!("expected the tree limit, got {err}");
        };
        assert_eq!(limit, 27_000);
        assert!((50..100).contains(&entries), "refused at entry {entries}");
        assert!(tree.tree_bytes > 27_000);
    }

    #[test]
    fn opaque_dir_hides_lower_children_keeps_same_layer() {
        let mut t = Tree::new();
        apply(
            &mut t,
            0,
            &[
                E::Dir("d"),
                E::File("d/old", b"1"),
                E::Dir("d/sub"),
                E::File("d/sub/x", b""),
            ],
        )
        .unwrap();
        apply(
            &mut t,
            1,
            &[
                E::File("d/new", b"2"),
                E::File("d/sub/y", b""),
                E::File("d/.wh..wh..opq", b""),
            ],
        )
        .unwrap();
        assert!(t.lookup(b"d/old").is_none());
        assert!(t.lookup(b"d/new").is_some());
        // d/sub was passed through in this layer: kept, but its lower child is gone.
        assert!(t.lookup(b"d/sub/y").is_some());
        assert!(t.lookup(b"d/sub/x").is_none());
    }

    #[test]
    fn dotdot_above_root_is_error() {
        let mut t = Tree::new();
        let err = apply(&mut t, 0, &[E::File("a/../../etc/passwd", b"x")]).unwrap_err();
        assert!(matches!(err, FlattenError::PathEscapesRoot { .. }), "{err}");
    }

    #[test]
    fn absolute_path_is_rooted() {
        let mut t = Tree::new();
        apply(&mut t, 0, &[E::File("/abs/file", b"x")]).unwrap();
        assert!(t.lookup(b"abs/file").is_some());
    }

    #[test]
    fn hardlink_missing_target_is_error() {
        let mut t = Tree::new();
        let err = apply(&mut t, 0, &[E::Hard("b", "nope")]).unwrap_err();
        assert!(
            matches!(err, FlattenError::HardlinkTargetMissing { .. }),
            "{err}"
        );
    }

    #[test]
    fn hardlink_outside_root_is_error() {
        let mut t = Tree::new();
        let err = apply(&mut t, 0, &[E::File("a", b"1"), E::Hard("b", "../a")]).unwrap_err();
        assert!(
            matches!(err, FlattenError::HardlinkTargetMissing { .. }),
            "{err}"
        );
    }

    #[test]
    fn hardlink_shares_inode() {
        let mut t = Tree::new();
        apply(&mut t, 0, &[E::File("a", b"1"), E::Hard("b", "/a")]).unwrap();
        assert_eq!(t.lookup(b"a"), t.lookup(b"b"));
    }

    #[test]
    fn symlink_parent_followed_inside_root() {
        let mut t = Tree::new();
        apply(
            &mut t,
            0,
            &[E::Dir("usr/bin"), E::Sym("bin", "../../../usr/bin")],
        )
        .unwrap();
        apply(&mut t, 1, &[E::File("bin/tool", b"x")]).unwrap();
        // The escape attempt clamps at the root: the file lands in /usr/bin.
        assert!(t.lookup(b"usr/bin/tool").is_some());
        assert!(matches!(
            t.inodes[t.lookup(b"bin").unwrap()].kind,
            InodeKind::Symlink(_)
        ));
    }

    #[test]
    fn symlink_loop_is_error() {
        let mut t = Tree::new();
        apply(&mut t, 0, &[E::Sym("a", "b"), E::Sym("b", "a")]).unwrap();
        let err = apply(&mut t, 1, &[E::File("a/x", b"")]).unwrap_err();
        assert!(matches!(err, FlattenError::SymlinkLoop { .. }), "{err}");
    }

    #[test]
    fn file_over_dir_replaces_dir() {
        let mut t = Tree::new();
        apply(&mut t, 0, &[E::Dir("x"), E::File("x/inner", b"")]).unwrap();
        apply(&mut t, 1, &[E::File("x", b"now a file")]).unwrap();
        assert!(matches!(
            t.inodes[t.lookup(b"x").unwrap()].kind,
            InodeKind::File(_)
        ));
        assert!(t.lookup(b"x/inner").is_none());
    }

    #[test]
    fn truncated_tar_is_error() {
        let mut data = tar_of(&[E::File("big", &[7u8; 5000])]);
        data.truncate(512 + 1000);
        let err = Tree::new()
            .apply_layer(&data[..], 0, &mut MemSink::default())
            .unwrap_err();
        assert!(
            matches!(
                err,
                FlattenError::Data {
                    source: SinkError::Truncated { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn pax_time_fraction_parsed() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"-3.2"), Some((0, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
    }

    #[test]
    fn media_type_maps_to_compression() {
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip").ok(),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").ok(),
            Some(Compression::Zstd)
        );
        assert!(Compression::from_media_type("application/json").is_err());
    }
}
