//! What a VM is made of, validated before anything is built.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Smallest guest RAM supermachine accepts (a tiny guest; Linux wants far more).
pub const MIN_MEMORY: u64 = 16 << 20;
/// Guest RAM must be a multiple of this (2 MiB: the huge-page size, and what the
/// identity map and memory slots are built from).
pub const MEMORY_ALIGN: u64 = 2 << 20;
/// Largest vCPU count accepted before asking the backend.
pub const MAX_VCPUS: u32 = 254;
/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Errors in a VM description; each message says what to change.
#[derive(Debug, Error)]
pub enum ResourceError {
    /// No kernel was given.
    #[error("no kernel given")]
    NoKernel,
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    KernelUnreadable {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs file cannot be read.
    #[error("cannot read initramfs {path}: {source}")]
    InitrdUnreadable {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Too little memory.
    #[error("memory {got} bytes is too small: at least {} MiB is needed", MIN_MEMORY >> 20)]
    MemoryTooSmall {
        /// Bytes requested.
        got: u64,
    },
    /// Memory size not a multiple of 2 MiB.
    #[error("memory {got} bytes is not a multiple of {} MiB", MEMORY_ALIGN >> 20)]
    MemoryUnaligned {
        /// Bytes requested.
        got: u64,
    },
    /// vCPU count out of range.
    #[error("{got} vCPUs requested: give between 1 and {MAX_VCPUS}")]
    Vcpus {
        /// Count requested.
        got: u32,
    },
    /// A disk cannot be opened as asked.
    #[error("cannot use disk {path}: {source}")]
    DiskUnusable {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A vsock context id out of range.
    #[error("vsock CID {got} is reserved or too large: use 3 or more (below 2^32)")]
    VsockCid {
        /// The CID given.
        got: u64,
    },
    /// A `--disk` value could not be parsed.
    #[error("cannot parse disk {0:?}: use PATH or PATH,ro")]
    BadDisk(String),
    /// A size string could not be parsed.
    #[error("cannot parse size {0:?}: use a number of bytes or a suffix K, M, G (e.g. 512M)")]
    BadSize(String),
}

/// A disk image attached as a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Raw image file (or block device).
    pub path: PathBuf,
    /// Attach read-only (the guest's writes fail).
    pub read_only: bool,
}

impl DiskSpec {
    /// Parses the CLI form `PATH[,ro]`.
    pub fn parse(s: &str) -> Result<Self, ResourceError> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            _ => (s, false),
        };
        if path.is_empty() {
            return Err(ResourceError::BadDisk(s.to_string()));
        }
        Ok(Self {
            path: path.into(),
            read_only,
        })
    }
}

/// A virtio-vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockSpec {
    /// The guest's context id (3 or more; 0-2 are reserved by the spec).
    pub cid: u64,
    /// Host UNIX socket for host-initiated connections (`CONNECT <port>\n`, as
    /// Firecracker's); guest-initiated connections to port P go to `<path>_<P>`.
    pub uds_path: Option<PathBuf>,
}

/// How a VM is built and booted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmResources {
    /// Guest kernel (bzImage, or ELF with a PVH entry).
    pub kernel: PathBuf,
    /// Initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// virtio-blk disks, in order (the first is the guest's `/dev/vda`).
    pub disks: Vec<DiskSpec>,
    /// A virtio entropy device fed from the host's getrandom.
    pub rng: bool,
    /// A virtio-vsock device.
    pub vsock: Option<VsockSpec>,
}

impl VmResources {
    /// A VM with default memory and one vCPU booting `kernel`.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            memory: DEFAULT_MEMORY,
            vcpus: 1,
            disks: Vec::new(),
            rng: true,
            vsock: None,
        }
    }

    /// Checks everything that can be checked without a hypervisor.
    pub fn validate(&self) -> Result<(), ResourceError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ResourceError::NoKernel);
        }
        check_readable(&self.kernel).map_err(|source| ResourceError::KernelUnreadable {
            path: self.kernel.clone(),
            source,
        })?;
        if let Some(i) = &self.initrd {
            check_readable(i).map_err(|source| ResourceError::InitrdUnreadable {
                path: i.clone(),
                source,
            })?;
        }
        for d in &self.disks {
            check_disk(d).map_err(|source| ResourceError::DiskUnusable {
                path: d.path.clone(),
                source,
            })?;
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid > u64::from(u32::MAX) {
                return Err(ResourceError::VsockCid { got: v.cid });
            }
        }
        if self.memory < MIN_MEMORY {
            return Err(ResourceError::MemoryTooSmall { got: self.memory });
        }
        if self.memory % MEMORY_ALIGN != 0 {
            return Err(ResourceError::MemoryUnaligned { got: self.memory });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ResourceError::Vcpus { got: self.vcpus });
        }
        Ok(())
    }
}

/// Opens a disk as the device will (read-write unless read-only).
fn check_disk(d: &DiskSpec) -> std::io::Result<()> {
    std::fs::File::options()
        .read(true)
        .write(!d.read_only)
        .open(&d.path)
        .map(drop)
}

/// Opens the file for reading and checks it is a regular file.
fn check_readable(p: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(p)?;
    let md = f.metadata()?;
    if !md.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(())
}

/// Parses a size such as `512M`, `1G`, `65536`, `2048K` (binary units).
pub fn parse_size(s: &str) -> Result<u64, ResourceError> {
    let bad = || ResourceError::BadSize(s.to_string());
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim_end_matches(['i', 'I'])
        .parse()
        .map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_file(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("sm-res-{}-{name}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        p
    }

    #[test]
    fn parse_size_suffixes_are_binary_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2048K").unwrap(), 2 << 20);
        assert_eq!(parse_size("65536").unwrap(), 65536);
    }

    #[test]
    fn parse_size_garbage_is_an_error() {
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12T").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn disk_spec_parse_read_only_suffix() {
        let d = DiskSpec::parse("/img/a.raw,ro").unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a.raw"));
        assert!(d.read_only);
        assert!(!DiskSpec::parse("/img/b.raw").unwrap().read_only);
        assert!(DiskSpec::parse(",ro").is_err());
    }

    #[test]
    fn validate_missing_disk_is_refused() {
        let mut r = VmResources::new(tmp_file("k4"));
        r.disks
            .push(DiskSpec::parse("/nonexistent/disk.img").unwrap());
        assert!(matches!(
            r.validate(),
            Err(ResourceError::DiskUnusable { .. })
        ));
    }

    #[test]
    fn validate_zero_vcpus_is_refused() {
        let k = tmp_file("k0");
        let mut r = VmResources::new(&k);
        r.vcpus = 0;
        assert!(matches!(r.validate(), Err(ResourceError::Vcpus { got: 0 })));
    }

    #[test]
    fn validate_small_or_unaligned_memory_is_refused() {
        let k = tmp_file("k1");
        let mut r = VmResources::new(&k);
        r.memory = 8 << 20;
        assert!(matches!(
            r.validate(),
            Err(ResourceError::MemoryTooSmall { .. })
        ));
        r.memory = (64 << 20) + 4096;
        assert!(matches!(
            r.validate(),
            Err(ResourceError::MemoryUnaligned { .. })
        ));
    }

    #[test]
    fn validate_missing_kernel_and_initrd_are_refused() {
        let r = VmResources::new("/nonexistent/kernel");
        assert!(matches!(
            r.validate(),
            Err(ResourceError::KernelUnreadable { .. })
        ));
        let mut r = VmResources::new(tmp_file("k2"));
        r.initrd = Some("/nonexistent/initrd".into());
        assert!(matches!(
            r.validate(),
            Err(ResourceError::InitrdUnreadable { .. })
        ));
        let mut r = VmResources::new(tmp_file("k3"));
        r.initrd = Some(std::env::temp_dir());
        assert!(matches!(
            r.validate(),
            Err(ResourceError::InitrdUnreadable { .. })
        ));
    }
}
