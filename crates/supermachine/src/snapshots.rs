//! The snapshots `run` keeps: one per VM configuration, captured the first time
//! a VM of it is ready (its guest agent answered: the root filesystem is
//! mounted and guest-init waits for the process), restored by every later run
//! of it whatever the command, env or user (docs/architecture.md, "run
//! snapshots").
//!
//! A snapshot lives at `snapshots/<image digest>/<key>.snap` in the cache. The
//! key hashes everything that shapes the VM: the resolved resources (kernel,
//! initramfs, command line with the guest's network addresses, memory, vCPUs,
//! disks, network, vsock), the identity (size, modification time) of the
//! kernel, the initramfs and supermachine's own executable, and its version.
//! A file at the key that does not open, or whose recorded resources are not
//! this run's, is removed with a warning and the run boots (and captures anew):
//! a snapshot is never used for a VM it was not taken of.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::{Error, PreparedImage, VmResources};

/// One snapshot in the cache.
#[derive(Clone, Debug)]
pub struct SnapshotEntry {
    /// The file.
    pub path: PathBuf,
    /// The image's manifest digest (`sha256:...`).
    pub digest: String,
    /// The VM configuration's key.
    pub key: String,
    /// Bytes on disk (its untouched guest RAM is holes).
    pub allocated: u64,
    /// The file's length.
    pub len: u64,
    /// When it was written.
    pub modified: Option<SystemTime>,
}

/// Where the snapshots of the image with manifest `digest` are.
pub fn image_dir(digest: &str) -> Result<PathBuf, Error> {
    let hex = digest.trim_start_matches("sha256:");
    Ok(crate::cache()?.snapshots().join(hex))
}

/// The key of a VM configuration run by the supermachine `executable`: a hex
/// SHA-256 prefix over what shapes it.
pub fn key(digest: &str, res: &VmResources, executable: &Path) -> String {
    let mut h = Sha256::new();
    h.update(b"supermachine run snapshot 1\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update([0]);
    h.update(digest.as_bytes());
    h.update([0]);
    // serde_json renders a struct's fields in their declared order.
    h.update(serde_json::to_vec(res).unwrap_or_default());
    for file in [
        Some(res.kernel.as_path()),
        res.initrd.as_deref(),
        Some(executable),
    ] {
        let (len, mtime) = file.map_or((0, 0), identity);
        h.update(len.to_le_bytes());
        h.update(mtime.to_le_bytes());
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A file's size and modification time in nanoseconds (zeros if it cannot be
/// read: the key then differs from any it had when it could).
fn identity(path: &Path) -> (u64, u128) {
    std::fs::metadata(path).map_or((0, 0), |m| {
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        (m.len(), mtime)
    })
}

/// The snapshot file for running `img` in `res`, its directory created; `None`
/// (said on stderr) when the VM must not be captured: a writable disk would be
/// written by the snapshot's VM and by every restore of it.
pub(crate) fn for_run(img: &PreparedImage, res: &VmResources) -> Result<Option<PathBuf>, Error> {
    if let Some(d) = res.disks.iter().find(|d| !d.read_only) {
        eprintln!(
            "supermachine: note: no snapshot for this run: the writable disk {} would be \
             shared by the snapshot and every restore of it (attach it with ,ro to have one)",
            d.path.display()
        );
        return Ok(None);
    }
    let dir = image_dir(&img.digest)?;
    std::fs::create_dir_all(&dir).map_err(|source| Error::CacheDir {
        path: dir.clone(),
        source,
    })?;
    // Before the sandbox, which would not let this look at other processes.
    remove_stale_temps(&dir);
    let exe = std::env::current_exe().unwrap_or_default();
    Ok(Some(
        dir.join(format!("{}.snap", key(&img.digest, res, &exe))),
    ))
}

/// The snapshot at `path`, when there is one and it is of `res`. One that
/// cannot be used is removed, with a warning.
pub(crate) fn open_matching(path: &Path, res: &VmResources) -> Option<runner::vmm::Snapshot> {
    if std::fs::symlink_metadata(path).is_err() {
        return None;
    }
    let why = match runner::vmm::Snapshot::open(path) {
        Ok(snap) if snap.resources() == res => return Some(snap),
        Ok(_) => "it was taken of another VM configuration".to_string(),
        Err(e) => crate::error_chain(&e),
    };
    eprintln!(
        "supermachine: warning: the snapshot {} cannot be used ({why}); booting afresh and \
         capturing a new one",
        path.display()
    );
    let _ = std::fs::remove_file(path);
    None
}

/// Every snapshot in the cache, newest first.
pub fn list() -> Result<Vec<SnapshotEntry>, Error> {
    list_in(&crate::cache()?.snapshots())
}

fn list_in(root: &Path) -> Result<Vec<SnapshotEntry>, Error> {
    use std::os::unix::fs::MetadataExt;
    let mut entries = Vec::new();
    let images = match std::fs::read_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(entries),
        Err(source) => {
            return Err(Error::CacheDir {
                path: root.to_owned(),
                source,
            })
        }
    };
    for image in images.flatten() {
        let digest = format!("sha256:{}", image.file_name().to_string_lossy());
        let Ok(files) = std::fs::read_dir(image.path()) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "snap") {
                continue;
            }
            let Ok(m) = f.metadata() else { continue };
            entries.push(SnapshotEntry {
                key: path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path,
                digest: digest.clone(),
                allocated: m.blocks() * 512,
                len: m.len(),
                modified: m.modified().ok(),
            });
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.modified));
    Ok(entries)
}

/// Removes the snapshots of the image with manifest `digest` (when no image
/// names it any more).
pub fn remove_image(digest: &str) -> Result<(), Error> {
    let dir = image_dir(digest)?;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::CacheDir { path: dir, source }),
    }
}

/// Removes the temporary files `snapshot::write` writes a snapshot through
/// (`.NAME.PID.tmp`) whose writer is gone: a capture killed mid-write leaves
/// one as large as the RAM it had written. Best effort; a file of a live
/// process (or of one whose pid was reused) stays.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('.'))
            .and_then(|(_, pid)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 sends nothing; it only asks whether the
        // process exists (ESRCH when it does not).
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes every snapshot (and the leftovers of killed captures); returns what
/// was removed.
pub fn prune() -> Result<Vec<SnapshotEntry>, Error> {
    let root = crate::cache()?.snapshots();
    if let Ok(dirs) = std::fs::read_dir(&root) {
        for d in dirs.flatten() {
            remove_stale_temps(&d.path());
            // Gone once empty.
            let _ = std::fs::remove_dir(d.path());
        }
    }
    let all = list_in(&root)?;
    let mut removed = Vec::new();
    for e in all {
        let dir = e.path.parent().map(Path::to_path_buf);
        match std::fs::remove_file(&e.path) {
            Ok(()) => removed.push(e),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::CacheDir {
                    path: e.path.clone(),
                    source,
                })
            }
        }
        if let Some(dir) = dir {
            // Gone once empty.
            let _ = std::fs::remove_dir(dir);
        }
    }
    Ok(removed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn res() -> VmResources {
        VmResources {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: Some("/nonexistent/initrd".into()),
            cmdline: "console=ttyS0".into(),
            memory: 512 << 20,
            vcpus: 1,
            disks: vec![crate::DiskSpec {
                path: "/cache/rootfs/abc.erofs".into(),
                read_only: true,
            }],
            rng: true,
            vsock: None,
            network: None,
        }
    }

    #[test]
    fn the_key_is_stable_and_changes_with_what_shapes_the_vm() {
        let base = key("sha256:aa", &res(), Path::new("/bin/sh"));
        assert_eq!(base.len(), 32);
        assert_eq!(
            key("sha256:aa", &res(), Path::new("/bin/sh")),
            base,
            "the same VM, the same key"
        );
        assert_ne!(
            key("sha256:bb", &res(), Path::new("/bin/sh")),
            base,
            "another image"
        );
        let mut r = res();
        r.memory = 1 << 30;
        assert_ne!(key("sha256:aa", &r, Path::new("/bin/sh")), base, "memory");
        let mut r = res();
        r.vcpus = 2;
        assert_ne!(key("sha256:aa", &r, Path::new("/bin/sh")), base, "vCPUs");
        let mut r = res();
        r.cmdline.push_str(" loglevel=7");
        assert_ne!(
            key("sha256:aa", &r, Path::new("/bin/sh")),
            base,
            "command line"
        );
        let mut r = res();
        r.disks.push(crate::DiskSpec {
            path: "/data.img".into(),
            read_only: true,
        });
        assert_ne!(key("sha256:aa", &r, Path::new("/bin/sh")), base, "disks");
    }

    #[test]
    fn the_key_follows_the_kernel_file() {
        let d = std::env::temp_dir().join(format!("sm-snapkey-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let k = d.join("vmlinuz");
        std::fs::write(&k, b"one").unwrap();
        let mut r = res();
        r.kernel = k.clone();
        let before = key("sha256:aa", &r, Path::new("/bin/sh"));
        std::fs::write(&k, b"another kernel").unwrap();
        assert_ne!(key("sha256:aa", &r, Path::new("/bin/sh")), before);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn listing_finds_snap_files_by_image_with_their_sizes() {
        let root = std::env::temp_dir().join(format!("sm-snaplist-{}", std::process::id()));
        let dir = root.join("abcd");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0123.snap"), vec![1u8; 8192]).unwrap();
        std::fs::write(dir.join("0123.snap.tmp"), b"partial").unwrap();
        let l = list_in(&root).unwrap();
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!(l[0].digest, "sha256:abcd");
        assert_eq!(l[0].key, "0123");
        assert_eq!(l[0].len, 8192);
        assert!(l[0].allocated >= 8192);
        assert!(list_in(&root.join("none")).unwrap().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_killed_captures_temporary_file_is_swept_and_a_live_ones_stays() {
        let dir = std::env::temp_dir().join(format!("sm-snaptmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // No process has a pid past the kernel's limit (4194304 at most).
        let dead = dir.join(".0123.snap.9999999.tmp");
        let live = dir.join(format!(".0123.snap.{}.tmp", std::process::id()));
        let other = dir.join(".notes.tmp");
        for f in [&dead, &live, &other] {
            std::fs::write(f, b"partial").unwrap();
        }
        remove_stale_temps(&dir);
        assert!(!dead.exists(), "a dead writer's file is removed");
        assert!(live.exists(), "a running capture's file stays");
        assert!(other.exists(), "files that are not ours stay");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
