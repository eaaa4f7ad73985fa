//! A [`super::Vmm`] in a snapshot file (`crates/snapshot`,
//! docs/snapshot-format.md): the resources it was built from and its whole
//! state as the file's typed state, guest RAM as the file's RAM section,
//! mapped copy-on-write on restore.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{RunError, VmmState};
use crate::resources::VmResources;

/// What a snapshot file holds besides guest RAM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// What the VM was built from: a restore opens the same disks, sockets and
    /// network again.
    pub resources: VmResources,
    /// Every vCPU, the VM-wide state, every device.
    pub vmm: VmmState,
}

/// The guest architecture of this build.
const ARCH: snapshot::Arch = if cfg!(target_arch = "aarch64") {
    snapshot::Arch::Aarch64
} else {
    snapshot::Arch::X86_64
};

/// The backend of this build.
const BACKEND: snapshot::Backend = if cfg!(target_os = "macos") {
    snapshot::Backend::Hvf
} else {
    snapshot::Backend::Kvm
};

/// A snapshot file opened and checked (header, checksums, layout, state): what
/// [`super::Vmm::restore`] builds a VM from. The file stays open, so the RAM a
/// restore maps is the file that was checked.
#[derive(Debug)]
pub struct Snapshot {
    path: PathBuf,
    file: File,
    meta: snapshot::Meta<SnapshotState>,
}

impl Snapshot {
    /// Opens and checks the snapshot at `path` (nothing is mapped yet).
    pub fn open(path: &Path) -> Result<Self, RunError> {
        let file = File::open(path).map_err(|source| snapshot::SnapshotError::Io {
            what: "opening",
            path: path.to_path_buf(),
            source,
        })?;
        let meta = snapshot::load_meta_from(&file, path, ARCH, BACKEND)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            meta,
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The resources the saved VM was built from.
    pub fn resources(&self) -> &VmResources {
        &self.meta.state.resources
    }

    /// The saved state.
    pub fn state(&self) -> &SnapshotState {
        &self.meta.state
    }

    /// Maps the saved RAM copy-on-write over `mem`, the RAM of a paused VM of
    /// the same shape, region by region at the same addresses (`MAP_FIXED`): the
    /// old pages, the guest's private copies included, are dropped, and `mem`'s
    /// regions go on owning the new mappings.
    pub(super) fn remap_ram(&self, mem: &GuestMemoryMmap) -> Result<(), RunError> {
        let have: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let saved: Vec<(u64, u64)> = self
            .meta
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.len))
            .collect();
        if have != saved {
            return Err(RunError::StateMismatch {
                what: format!("RAM regions {saved:x?} saved, {have:x?} in this VM"),
            });
        }
        let file_len = self
            .file
            .metadata()
            .map_err(|source| snapshot::SnapshotError::Io {
                what: "reading",
                path: self.path.clone(),
                source,
            })?
            .len();
        for (region, saved) in mem.iter().zip(&self.meta.regions) {
            let at = self.meta.header.ram_offset + saved.offset;
            let len = usize::try_from(saved.len).unwrap_or(usize::MAX);
            if at.saturating_add(saved.len) > file_len {
                return Err(snapshot::SnapshotError::Truncated {
                    path: self.path.clone(),
                    what: "guest RAM",
                    needed: at + saved.len,
                    len: file_len,
                }
                .into());
            }
            let offset = libc::off_t::try_from(at).map_err(|_| RunError::StateMismatch {
                what: format!("RAM at file offset {at:#x} does not fit this host"),
            })?;
            // SAFETY: the target is exactly the live mapping of `region` (its
            // address and length), which `mem` owns and goes on owning: its unmap
            // on drop covers the new mapping. The VM is paused (every vCPU parked,
            // the device loop held), so nothing reads or writes guest RAM while it
            // is replaced; KVM's memslot names the address range, and the kernel
            // drops its stale translations of it when the range is remapped. The
            // file is open, the offset page-aligned (load_meta) and inside it.
            let p = unsafe {
                libc::mmap(
                    region.as_ptr().cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    offset,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(snapshot::SnapshotError::Map {
                    path: self.path.clone(),
                    source: std::io::Error::last_os_error(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Guest RAM for `res`, mapped copy-on-write from the file; its regions
    /// must be the ones `res` gives a VM.
    pub(super) fn map_ram(&self, res: &VmResources) -> Result<GuestMemoryMmap, RunError> {
        let want = crate::arch::ram_ranges(res.memory);
        let got: Vec<(u64, u64)> = self
            .meta
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.len))
            .collect();
        if got != want {
            return Err(RunError::StateMismatch {
                what: format!(
                    "RAM regions {got:x?} saved, {want:x?} for {} bytes of memory",
                    res.memory
                ),
            });
        }
        let regions = snapshot::map_ram(&self.file, &self.path, &self.meta)?;
        GuestMemoryMmap::from_regions(regions).map_err(RunError::RestoredMemory)
    }
}

/// Writes `state` and the RAM of `mem` (a paused VM's) to `path`.
pub(super) fn write(
    path: &Path,
    state: &SnapshotState,
    mem: &GuestMemoryMmap,
) -> Result<(), RunError> {
    let ram: Vec<snapshot::RamSource<'_>> = mem
        .iter()
        .map(|r| snapshot::RamSource {
            guest_addr: r.start_addr().0,
            // SAFETY: the region is a live mapping of `r.len()` bytes that
            // `mem` owns for the whole borrow; the VM is paused (vCPUs parked,
            // device loop held), so nothing writes it while it is read.
            bytes: unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) },
        })
        .collect();
    snapshot::write(path, ARCH, BACKEND, state, &ram)?;
    Ok(())
}
