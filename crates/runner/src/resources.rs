//! What a VM is made of, validated before anything is built.

use serde::{Deserialize, Serialize};
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
    #[error("cannot read kernel {path}")]
    KernelUnreadable {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs file cannot be read.
    #[error("cannot read initramfs {path}")]
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
    #[error("cannot use disk {path}")]
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
    /// A `--network` value could not be parsed.
    #[error("cannot parse network {0:?}: use passt, passt:host-loopback, none, or tap:NAME[,ip=ADDR/PREFIX][,gw=ADDR][,dns=ADDR]")]
    BadNetwork(String),
    /// A size string could not be parsed.
    #[error("cannot parse size {0:?}: use a number of bytes or a suffix K, M, G (e.g. 512M)")]
    BadSize(String),
}

/// A disk image attached as a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSpec {
    /// The guest's context id (3 or more; 0-2 are reserved by the spec).
    pub cid: u64,
    /// Host UNIX socket for host-initiated connections (`CONNECT <port>\n`, as
    /// Firecracker's); guest-initiated connections to port P go to `<path>_<P>`.
    pub uds_path: Option<PathBuf>,
}

/// Where a virtio-net device's frames go on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetBackendSpec {
    /// A `passt` process the VMM starts (rootless user-mode networking: the guest
    /// reaches what the host reaches). The guest's addresses follow the host's
    /// default-route interface.
    Passt {
        /// Whether the gateway address reaches the host's own loopback (its
        /// 127.0.0.1 services). Off by default, as a docker container cannot
        /// reach them either; `passt:host-loopback` turns it on.
        host_loopback: bool,
    },
    /// An existing TAP interface (`ip tuntap add NAME mode tap`), for hosts that
    /// bridge or route guests themselves.
    Tap {
        /// Interface name.
        name: String,
    },
}

/// The guest's IPv4 configuration, applied by guest-init before the workload
/// starts; it reaches the guest as [`agent_protocol::cmdline::Arg::Net`]
/// (`sm.net=ADDR/PREFIX,GW,DNS`).
pub type GuestIpConfig = agent_protocol::cmdline::NetConfig;

/// serde for the guest's IPv4 setup, which agent-protocol (serde-free by
/// design) defines: a snapshot records the resources.
mod guest_ip_serde {
    use std::net::Ipv4Addr;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::GuestIpConfig;

    #[derive(Serialize, Deserialize)]
    struct Ip {
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        dns: Option<Ipv4Addr>,
    }

    pub(super) fn serialize<S: Serializer>(
        v: &Option<GuestIpConfig>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.map(|c| Ip {
            addr: c.addr,
            prefix: c.prefix,
            gateway: c.gateway,
            dns: c.dns,
        })
        .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<GuestIpConfig>, D::Error> {
        Ok(Option::<Ip>::deserialize(d)?.map(|i| GuestIpConfig {
            addr: i.addr,
            prefix: i.prefix,
            gateway: i.gateway,
            dns: i.dns,
        }))
    }
}

/// A virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// The host side.
    pub backend: NetBackendSpec,
    /// The guest's IPv4 setup; for passt the runner derives it (and any value
    /// here is replaced), for TAP it is what the user gave, if anything.
    #[serde(with = "guest_ip_serde")]
    pub guest: Option<GuestIpConfig>,
}

impl NetSpec {
    /// Parses the CLI form: `passt`, `passt:host-loopback`, `none` (no device:
    /// `Ok(None)`), or `tap:NAME[,ip=ADDR/PREFIX][,gw=ADDR][,dns=ADDR]`.
    pub fn parse(s: &str) -> Result<Option<Self>, ResourceError> {
        let bad = || ResourceError::BadNetwork(s.to_string());
        match s {
            "none" => return Ok(None),
            "passt" | "passt:host-loopback" => {
                return Ok(Some(Self {
                    backend: NetBackendSpec::Passt {
                        host_loopback: s == "passt:host-loopback",
                    },
                    guest: None,
                }))
            }
            _ => {}
        }
        let rest = s.strip_prefix("tap:").ok_or_else(bad)?;
        let mut parts = rest.split(',');
        let name = parts.next().unwrap_or_default();
        // IFNAMSIZ is 16 including the terminating NUL.
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return Err(bad());
        }
        let (mut ip, mut gateway, mut dns) = (None, None, None);
        for p in parts {
            let (k, v) = p.split_once('=').ok_or_else(bad)?;
            match k {
                "ip" => {
                    let (a, pfx) = v.split_once('/').ok_or_else(bad)?;
                    let addr = a.parse().map_err(|_| bad())?;
                    let prefix: u8 = pfx.parse().map_err(|_| bad())?;
                    if prefix > 32 {
                        return Err(bad());
                    }
                    ip = Some((addr, prefix));
                }
                "gw" => gateway = Some(v.parse().map_err(|_| bad())?),
                "dns" => dns = Some(v.parse().map_err(|_| bad())?),
                _ => return Err(bad()),
            }
        }
        if ip.is_none() && (gateway.is_some() || dns.is_some()) {
            return Err(bad());
        }
        Ok(Some(Self {
            backend: NetBackendSpec::Tap {
                name: name.to_string(),
            },
            guest: ip.map(|(addr, prefix)| GuestIpConfig {
                addr,
                prefix,
                gateway,
                dns,
            }),
        }))
    }
}

/// How a VM is built and booted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A virtio-net device.
    pub network: Option<NetSpec>,
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
            network: None,
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
    fn net_spec_parse_accepts_passt_none_and_tap_with_addresses() {
        assert_eq!(NetSpec::parse("none").unwrap(), None);
        assert_eq!(
            NetSpec::parse("passt").unwrap().unwrap().backend,
            NetBackendSpec::Passt {
                host_loopback: false
            }
        );
        let t = NetSpec::parse("tap:tap0,ip=10.0.0.2/24,gw=10.0.0.1,dns=10.0.0.1")
            .unwrap()
            .unwrap();
        assert_eq!(
            t.backend,
            NetBackendSpec::Tap {
                name: "tap0".into()
            }
        );
        let g = t.guest.unwrap();
        assert_eq!(g.to_string(), "10.0.0.2/24,10.0.0.1,10.0.0.1");
        let bare = NetSpec::parse("tap:tap1").unwrap().unwrap();
        assert_eq!(bare.guest, None);
    }

    #[test]
    fn net_spec_parse_rejects_malformed_values() {
        for bad in [
            "",
            "pasta",
            "tap:",
            "tap:averyveryverylongname",
            "tap:t0,ip=10.0.0.2",
            "tap:t0,ip=10.0.0.2/33",
            "tap:t0,gw=10.0.0.1",
            "tap:t0,ip=10.0.0.2/24,mtu=9000",
        ] {
            assert!(
                matches!(NetSpec::parse(bad), Err(ResourceError::BadNetwork(_))),
                "{bad:?} accepted"
            );
        }
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
