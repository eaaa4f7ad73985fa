//! The supermachine snapshot file (docs/snapshot-format.md): a fixed header, the
//! VM's typed state, then guest RAM page-aligned so that a restore maps it
//! copy-on-write (`MAP_PRIVATE`) instead of reading it.
//!
//! The crate knows nothing of VMs beyond "a serializable state and some RAM
//! regions": the runner hands it its `VmmState`; another VMM could hand it its
//! own. Pages the guest never touched are holes in the file, so writing costs
//! what the guest used, not what it was given.
//!
//! A snapshot file is hostile input: [`load_meta`] checks the header (magic,
//! checksum, version, arch, backend, page size), every length and offset
//! against the file's size and the limits, and the state's checksum, before
//! decoding anything; [`map_ram`] maps only what [`load_meta`] accepted.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

/// The file's first eight bytes.
pub const MAGIC: [u8; 8] = *b"SMSNAPSH";
/// The format version this crate writes and reads (independent of crate versions).
pub const FORMAT_VERSION: u32 = 2;
/// The header's size on disk; the state starts right after it.
pub const HEADER_LEN: u64 = 4096;
/// The largest state section accepted (the state of a VM is kilobytes).
pub const MAX_STATE_LEN: u64 = 16 << 20;
/// The most RAM regions accepted.
pub const MAX_REGIONS: usize = 64;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);
/// Bytes of the header covered by its checksum (everything before it).
const HEADER_SUMMED: usize = 64;

/// The guest architecture a snapshot is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// x86_64.
    X86_64,
    /// aarch64.
    Aarch64,
}

/// The hypervisor backend that captured it (its state blobs are its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Linux KVM.
    Kvm,
    /// macOS Hypervisor.framework.
    Hvf,
}

impl Arch {
    fn code(self) -> u16 {
        match self {
            Self::X86_64 => 1,
            Self::Aarch64 => 2,
        }
    }

    fn from_code(c: u16) -> Option<Self> {
        match c {
            1 => Some(Self::X86_64),
            2 => Some(Self::Aarch64),
            _ => None,
        }
    }
}

impl Backend {
    fn code(self) -> u16 {
        match self {
            Self::Kvm => 1,
            Self::Hvf => 2,
        }
    }

    fn from_code(c: u16) -> Option<Self> {
        match c {
            1 => Some(Self::Kvm),
            2 => Some(Self::Hvf),
            _ => None,
        }
    }
}

/// The fixed part at the start of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`FORMAT_VERSION`] when written by this crate.
    pub version: u32,
    /// The guest architecture.
    pub arch: Arch,
    /// The backend that captured it.
    pub backend: Backend,
    /// The host page size the RAM section is aligned to.
    pub page_size: u32,
    /// Reserved; 0.
    pub flags: u32,
    /// Where the state starts ([`HEADER_LEN`]).
    pub state_offset: u64,
    /// The state's length.
    pub state_len: u64,
    /// CRC-64/ECMA-182 of the state bytes.
    pub state_crc: u64,
    /// Where guest RAM starts (page-aligned, after the state).
    pub ram_offset: u64,
    /// Guest RAM bytes, all regions back to back.
    pub ram_len: u64,
}

/// One region of guest RAM in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    /// Guest physical address of its first byte.
    pub guest_addr: u64,
    /// Length (a multiple of the page size).
    pub len: u64,
    /// Offset of its first byte from the start of the RAM section.
    pub offset: u64,
}

/// What the state section holds: the RAM layout and the caller's state.
#[derive(Serialize, Deserialize)]
struct Contents<S> {
    regions: Vec<RamRegion>,
    state: S,
}

/// A snapshot's header, RAM layout and state, as [`load_meta`] accepted them.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta<S> {
    /// The header.
    pub header: Header,
    /// The RAM regions, in file order.
    pub regions: Vec<RamRegion>,
    /// The caller's state.
    pub state: S,
}

/// Guest RAM to write: a region's guest address and its bytes, as mapped in the
/// writer's address space (page-aligned).
#[derive(Clone, Copy, Debug)]
pub struct RamSource<'a> {
    /// Guest physical address.
    pub guest_addr: u64,
    /// The bytes.
    pub bytes: &'a [u8],
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be created, written, opened or read.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than its header says, or than a header.
    #[error("{path} is truncated: {what} needs {needed} bytes, the file has {len}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Which part.
        what: &'static str,
        /// Bytes that part needs.
        needed: u64,
        /// The file's length.
        len: u64,
    },
    /// Not a snapshot file.
    #[error("{path} is not a supermachine snapshot (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The header's checksum does not match.
    #[error("{path}: the snapshot header is corrupt (checksum mismatch)")]
    HeaderChecksum {
        /// The file.
        path: PathBuf,
    },
    /// Written by another format version.
    #[error("{path} is snapshot format {found}; this supermachine reads format {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// A field of the header has a value no writer produces.
    #[error("{path}: the snapshot header is invalid: {why}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Captured on another architecture or backend.
    #[error("{path} was captured for {found}, not {expected}")]
    WrongTarget {
        /// The file.
        path: PathBuf,
        /// What it is for.
        found: String,
        /// What this host runs.
        expected: String,
    },
    /// The state section is larger than any VM's state.
    #[error("{path}: the snapshot's state is {len} bytes, over the {MAX_STATE_LEN}-byte limit")]
    StateTooLarge {
        /// The file.
        path: PathBuf,
        /// Its declared length.
        len: u64,
    },
    /// The state's checksum does not match.
    #[error("{path}: the snapshot's state is corrupt (checksum mismatch)")]
    StateChecksum {
        /// The file.
        path: PathBuf,
    },
    /// The state does not decode as the caller's type.
    #[error("{path}: the snapshot's state does not decode (another supermachine wrote it?)")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: postcard::Error,
    },
    /// The state could not be encoded.
    #[error("encoding the snapshot state")]
    Encode(#[source] postcard::Error),
    /// The RAM layout is inconsistent (overlaps, misalignment, outside the file).
    #[error("{path}: the snapshot's RAM layout is invalid: {why}")]
    BadLayout {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Guest RAM given to the writer is not page-aligned.
    #[error("guest RAM region at {guest_addr:#x} is not page-aligned in address or length")]
    Unaligned {
        /// The region.
        guest_addr: u64,
    },
    /// Mapping the RAM section failed.
    #[error("mapping guest RAM from {path}")]
    Map {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// This host's page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

fn align_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

impl Header {
    fn to_bytes(self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..14].copy_from_slice(&self.arch.code().to_le_bytes());
        b[14..16].copy_from_slice(&self.backend.code().to_le_bytes());
        b[16..20].copy_from_slice(&self.page_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.flags.to_le_bytes());
        b[24..32].copy_from_slice(&self.state_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.state_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.state_crc.to_le_bytes());
        b[48..56].copy_from_slice(&self.ram_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.ram_len.to_le_bytes());
        let sum = CRC.checksum(&b[..HEADER_SUMMED]);
        b[64..72].copy_from_slice(&sum.to_le_bytes());
        b
    }

    fn parse(b: &[u8; HEADER_LEN as usize], path: &Path) -> Result<Self, SnapshotError> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if b[0..8] != MAGIC {
            return Err(SnapshotError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        if CRC.checksum(&b[..HEADER_SUMMED]) != u64_at(64) {
            return Err(SnapshotError::HeaderChecksum {
                path: path.to_path_buf(),
            });
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let bad = |why: String| SnapshotError::BadHeader {
            path: path.to_path_buf(),
            why,
        };
        let arch =
            Arch::from_code(u16_at(12)).ok_or_else(|| bad(format!("arch {}", u16_at(12))))?;
        let backend =
            Backend::from_code(u16_at(14)).ok_or_else(|| bad(format!("backend {}", u16_at(14))))?;
        Ok(Self {
            version,
            arch,
            backend,
            page_size: u32_at(16),
            flags: u32_at(20),
            state_offset: u64_at(24),
            state_len: u64_at(32),
            state_crc: u64_at(40),
            ram_offset: u64_at(48),
            ram_len: u64_at(56),
        })
    }
}

/// Which pages of `bytes` (page-aligned) are resident: the ones a guest ever
/// touched. Anonymous memory that was never touched reads as zeros, so a
/// non-resident page is a hole in the file. Where `mincore` is refused, every
/// page counts as resident (correct, just not sparse).
fn resident_pages(bytes: &[u8], page: u64) -> Vec<bool> {
    let pages = (bytes.len() as u64).div_ceil(page) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: `bytes` is a live, page-aligned mapping of `bytes.len()` bytes
    // (checked by the caller), and `vec` has one byte per page of it, which is
    // what mincore writes.
    let rc = unsafe {
        libc::mincore(
            bytes.as_ptr() as *mut libc::c_void,
            bytes.len(),
            vec.as_mut_ptr().cast(),
        )
    };
    if rc != 0 {
        return vec![true; pages];
    }
    vec.into_iter().map(|v| v & 1 != 0).collect()
}

/// Writes a snapshot of `state` and `ram` to `path` (atomically: a temporary file
/// in the same directory, fsynced, then renamed). Untouched and all-zero pages
/// are holes.
pub fn write<S: Serialize>(
    path: &Path,
    arch: Arch,
    backend: Backend,
    state: &S,
    ram: &[RamSource<'_>],
) -> Result<(), SnapshotError> {
    let page = page_size();
    let mut regions = Vec::with_capacity(ram.len());
    let mut offset = 0u64;
    for r in ram {
        let len = r.bytes.len() as u64;
        if r.guest_addr % page != 0 || len % page != 0 || (r.bytes.as_ptr() as u64) % page != 0 {
            return Err(SnapshotError::Unaligned {
                guest_addr: r.guest_addr,
            });
        }
        regions.push(RamRegion {
            guest_addr: r.guest_addr,
            len,
            offset,
        });
        offset += len;
    }
    let encoded = postcard::to_stdvec(&Contents {
        regions: regions.clone(),
        state,
    })
    .map_err(SnapshotError::Encode)?;
    let state_len = encoded.len() as u64;
    let ram_offset = align_up(HEADER_LEN + state_len, page).unwrap_or(u64::MAX);
    let header = Header {
        version: FORMAT_VERSION,
        arch,
        backend,
        page_size: u32::try_from(page).unwrap_or(4096),
        flags: 0,
        state_offset: HEADER_LEN,
        state_len,
        state_crc: CRC.checksum(&encoded),
        ram_offset,
        ram_len: offset,
    };

    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let io = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| SnapshotError::Io {
            what,
            path: p,
            source,
        }
    };
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(&header.to_bytes())
            .map_err(io("writing", &tmp))?;
        f.write_all(&encoded).map_err(io("writing", &tmp))?;
        for (r, src) in regions.iter().zip(ram) {
            let resident = resident_pages(src.bytes, page);
            let page_len = page as usize;
            let mut i = 0;
            while i < resident.len() {
                // A run of pages that hold data.
                let has_data = |j: usize| {
                    resident[j]
                        && src.bytes[j * page_len..(j + 1) * page_len]
                            .iter()
                            .any(|&b| b != 0)
                };
                if !has_data(i) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < resident.len() && has_data(i) {
                    i += 1;
                }
                let at = ram_offset + r.offset + start as u64 * page;
                f.write_all_at(&src.bytes[start * page_len..i * page_len], at)
                    .map_err(io("writing", &tmp))?;
            }
        }
        // Trailing untouched pages are holes too, but part of the file's length.
        f.set_len(ram_offset + offset).map_err(io("sizing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into place", path))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads and checks the header, the RAM layout and the state of the snapshot at
/// `path`, which must be for `arch` and `backend`. Nothing is mapped.
pub fn load_meta<S: DeserializeOwned>(
    path: &Path,
    arch: Arch,
    backend: Backend,
) -> Result<Meta<S>, SnapshotError> {
    let f = File::open(path).map_err(|source| SnapshotError::Io {
        what: "opening",
        path: path.to_path_buf(),
        source,
    })?;
    load_meta_from(&f, path, arch, backend)
}

/// [`load_meta`] on a file already open (`path` names it in errors): a
/// restore keeps the descriptor, so the RAM it maps is the file it checked.
pub fn load_meta_from<S: DeserializeOwned>(
    file: &File,
    path: &Path,
    arch: Arch,
    backend: Backend,
) -> Result<Meta<S>, SnapshotError> {
    let mut f = file;
    read_meta(&mut f, path, arch, backend)
}

fn read_meta<S: DeserializeOwned>(
    f: &mut &File,
    path: &Path,
    arch: Arch,
    backend: Backend,
) -> Result<Meta<S>, SnapshotError> {
    let io = |what: &'static str| {
        move |source| SnapshotError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let file_len = f.metadata().map_err(io("reading"))?.len();
    let truncated = |what: &'static str, needed: u64| SnapshotError::Truncated {
        path: path.to_path_buf(),
        what,
        needed,
        len: file_len,
    };
    if file_len < HEADER_LEN {
        return Err(truncated("the header", HEADER_LEN));
    }
    let mut hb = [0u8; HEADER_LEN as usize];
    f.seek(SeekFrom::Start(0)).map_err(io("reading"))?;
    f.read_exact(&mut hb).map_err(io("reading"))?;
    let header = Header::parse(&hb, path)?;
    if header.arch != arch || header.backend != backend {
        return Err(SnapshotError::WrongTarget {
            path: path.to_path_buf(),
            found: format!("{:?}/{:?}", header.arch, header.backend),
            expected: format!("{arch:?}/{backend:?}"),
        });
    }
    let bad = |why: String| SnapshotError::BadHeader {
        path: path.to_path_buf(),
        why,
    };
    let page = page_size();
    if u64::from(header.page_size) != page {
        return Err(bad(format!(
            "page size {} (this host's is {page})",
            header.page_size
        )));
    }
    if header.flags != 0 {
        return Err(bad(format!("unknown flags {:#x}", header.flags)));
    }
    if header.state_offset != HEADER_LEN {
        return Err(bad(format!("state at {}", header.state_offset)));
    }
    if header.state_len > MAX_STATE_LEN {
        return Err(SnapshotError::StateTooLarge {
            path: path.to_path_buf(),
            len: header.state_len,
        });
    }
    let state_end = HEADER_LEN + header.state_len;
    if header.ram_offset % page != 0 || header.ram_offset < state_end {
        return Err(bad(format!("RAM at {}", header.ram_offset)));
    }
    let ram_end = header
        .ram_offset
        .checked_add(header.ram_len)
        .ok_or_else(|| bad("RAM length overflows".into()))?;
    if state_end > file_len {
        return Err(truncated("the state", state_end));
    }
    if ram_end > file_len {
        return Err(truncated("guest RAM", ram_end));
    }
    // state_len <= MAX_STATE_LEN, so this allocation is bounded.
    let mut state = vec![0u8; header.state_len as usize];
    f.read_exact(&mut state).map_err(io("reading"))?;
    if CRC.checksum(&state) != header.state_crc {
        return Err(SnapshotError::StateChecksum {
            path: path.to_path_buf(),
        });
    }
    let contents: Contents<S> =
        postcard::from_bytes(&state).map_err(|source| SnapshotError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    check_layout(&contents.regions, &header, page, path)?;
    Ok(Meta {
        header,
        regions: contents.regions,
        state: contents.state,
    })
}

/// The regions tile the RAM section in order, page-aligned, without overlap.
fn check_layout(
    regions: &[RamRegion],
    header: &Header,
    page: u64,
    path: &Path,
) -> Result<(), SnapshotError> {
    let bad = |why: String| SnapshotError::BadLayout {
        path: path.to_path_buf(),
        why,
    };
    if regions.len() > MAX_REGIONS {
        return Err(bad(format!("{} regions", regions.len())));
    }
    let mut next = 0u64;
    for r in regions {
        if r.offset != next {
            return Err(bad(format!(
                "region at {:#x} is at offset {}",
                r.guest_addr, r.offset
            )));
        }
        if r.len == 0 || r.len % page != 0 || r.guest_addr % page != 0 {
            return Err(bad(format!(
                "region at {:#x} of {} bytes",
                r.guest_addr, r.len
            )));
        }
        r.guest_addr
            .checked_add(r.len)
            .ok_or_else(|| bad(format!("region at {:#x} wraps", r.guest_addr)))?;
        next = next
            .checked_add(r.len)
            .ok_or_else(|| bad("regions overflow".into()))?;
    }
    if next != header.ram_len {
        return Err(bad(format!(
            "regions hold {next} bytes, the header says {}",
            header.ram_len
        )));
    }
    Ok(())
}

/// Maps every RAM region of `meta` from the snapshot `file` (the one
/// [`load_meta`] read it from) copy-on-write (`MAP_PRIVATE | MAP_NORESERVE`):
/// reads come from the file (holes read as zeros), writes go to private pages
/// and never reach the file. The regions own their mappings (vm-memory unmaps
/// them when the last user lets go), ready for a `GuestMemoryMmap`.
pub fn map_ram<S>(
    file: &File,
    path: &Path,
    meta: &Meta<S>,
) -> Result<Vec<GuestRegionMmap>, SnapshotError> {
    let file_len = file
        .metadata()
        .map_err(|source| SnapshotError::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut out = Vec::with_capacity(meta.regions.len());
    for r in &meta.regions {
        let at = meta.header.ram_offset + r.offset;
        let end = at.saturating_add(r.len);
        // The file may have changed since load_meta: checked again here.
        if end > file_len {
            return Err(SnapshotError::Truncated {
                path: path.to_path_buf(),
                what: "guest RAM",
                needed: end,
                len: file_len,
            });
        }
        let Ok(len) = usize::try_from(r.len) else {
            return Err(SnapshotError::BadLayout {
                path: path.to_path_buf(),
                why: format!("region at {:#x} does not fit this host", r.guest_addr),
            });
        };
        let map_err = |source: io::Error| SnapshotError::Map {
            path: path.to_path_buf(),
            source,
        };
        let own = file.try_clone().map_err(map_err)?;
        // The offset is page-aligned and the region lies inside the file
        // (load_meta and the check above); vm-memory maps it and owns it.
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(own, at))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(io::Error::other(e.to_string())))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr)).ok_or_else(|| {
            SnapshotError::BadLayout {
                path: path.to_path_buf(),
                why: format!("region at {:#x} wraps the address space", r.guest_addr),
            }
        })?;
        out.push(region);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
