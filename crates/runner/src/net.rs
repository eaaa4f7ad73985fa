//! The host side of virtio-net: a `passt` process (default) or a TAP device,
//! and the guest's IPv4 configuration.
//!
//! passt (Debian package `passt`) gives a guest rootless user-mode networking:
//! its TCP/UDP/ICMP go out through ordinary host sockets, and connections to
//! the gateway address reach the host's loopback. The VMM starts it with one
//! end of a UNIX socketpair (`passt --fd`), over which frames travel with the
//! qemu stream framing ([`devices::virtio::net::StreamBackend`]); passt exits
//! when that socket closes, and is killed if it has not.
//!
//! The guest's address, gateway and prefix are the host's default-route
//! interface's, as passt itself chooses them; they are given to passt
//! explicitly and to guest-init on the kernel command line (`sm.net=`), so both
//! sides agree without DHCP in the boot path. DNS: the host's first IPv4
//! resolver when the guest can reach it through passt; a loopback resolver
//! (systemd-resolved's 127.0.0.53, say) is reached through passt's DNS
//! forwarding at [`DNS_FORWARD_ADDR`].

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::resources::{GuestIpConfig, NetBackendSpec, NetSpec, VmResources};

/// The address guests use as name server when the host's resolver is on its
/// loopback: passt forwards UDP port 53 sent there to that resolver
/// (`--dns-forward`). Link-local, so it never collides with a real network.
pub const DNS_FORWARD_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Errors setting up the network.
#[derive(Debug, Error)]
pub enum NetError {
    /// passt is not installed.
    #[error(
        "cannot start passt ({program}): {source}; install it (Debian: apt install passt) \
         or run with --network none"
    )]
    PasstMissing {
        /// What was run.
        program: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socketpair for passt could not be made.
    #[error("cannot create the socket pair for passt")]
    SocketPair(#[source] io::Error),
    /// The host has no IPv4 default route, so passt has nothing to copy.
    #[error(
        "the host has no IPv4 default route, so passt cannot give the guest an address; \
         connect the host or run with --network none"
    )]
    NoDefaultRoute,
    /// The default-route interface has no IPv4 address.
    #[error("the host's default-route interface {iface} has no IPv4 address")]
    NoAddress {
        /// The interface.
        iface: String,
    },
    /// Reading the host's routes or addresses failed.
    #[error("cannot read the host's network configuration ({what})")]
    HostConfig {
        /// What was read.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The TAP device could not be opened.
    #[error("cannot open TAP interface {name} (create it with `ip tuntap add {name} mode tap` and run as its owner or root)")]
    Tap {
        /// The interface name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Networking is not available on this host OS yet.
    #[error("--network {what} is not supported on this host yet; use --network none")]
    Unsupported {
        /// The backend asked for.
        what: &'static str,
    },
}

/// The host's IPv4 default route and the address of its interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoute {
    /// Interface name.
    pub iface: String,
    /// Next hop.
    pub gateway: Ipv4Addr,
    /// The interface's address.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
}

/// The first IPv4 default route in `/proc/net/route` text (lowest metric
/// wins), as (interface, gateway).
pub fn parse_default_route(text: &str) -> Option<(String, Ipv4Addr)> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let mut best: Option<(u32, String, Ipv4Addr)> = None;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(gw), Some(flags), Some(metric), Some(mask)) = (
            hex(f[1]),
            hex(f[2]),
            hex(f[3]),
            f[6].parse::<u32>().ok(),
            hex(f[7]),
        ) else {
            continue;
        };
        if dest != 0 || mask != 0 || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            continue;
        }
        // The kernel prints the network-order address as a native u32.
        let gateway = Ipv4Addr::from(gw.to_ne_bytes());
        if best.as_ref().is_none_or(|(m, _, _)| metric < *m) {
            best = Some((metric, f[0].to_string(), gateway));
        }
    }
    best.map(|(_, iface, gw)| (iface, gw))
}

/// The first IPv4 `nameserver` in resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> Option<Ipv4Addr> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next())
            .flatten()
            .and_then(|a| a.parse().ok())
    })
}

/// The guest configuration passt will serve: the host's default-route
/// address, prefix and gateway, and a name server the guest can reach.
pub fn guest_config_from(route: &HostRoute, resolver: Option<Ipv4Addr>) -> GuestIpConfig {
    GuestIpConfig {
        addr: route.addr,
        prefix: route.prefix,
        gateway: Some(route.gateway),
        dns: resolver.map(|r| if r.is_loopback() { DNS_FORWARD_ADDR } else { r }),
    }
}

/// Fills in the guest configuration `res.network` needs and appends `sm.net=`
/// to the kernel command line: what the VMM boots with.
pub fn prepare(res: &VmResources) -> Result<VmResources, NetError> {
    let mut out = res.clone();
    let Some(net) = out.network.as_mut() else {
        return Ok(out);
    };
    if matches!(net.backend, NetBackendSpec::Passt { .. }) {
        let route = host_route()?;
        let resolver = std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|t| parse_resolv_conf(&t));
        net.guest = Some(guest_config_from(&route, resolver));
    }
    if let Some(g) = net.guest {
        agent_protocol::cmdline::append(&mut out.cmdline, &[agent_protocol::cmdline::Arg::Net(g)]);
    }
    Ok(out)
}

/// A locally administered unicast MAC, random per VM (`02:xx:...`).
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    let mut seed = [0u8; 5];
    if getrandom_fill(&mut seed).is_err() {
        // Not fatal: a fixed address only matters with several guests on one TAP bridge.
        seed = [0x73, 0x6d, 0x00, 0x00, 0x01];
    }
    mac[0] = 0x02;
    mac[1..].copy_from_slice(&seed);
    mac
}

fn getrandom_fill(buf: &mut [u8]) -> io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// The virtio-net device for `spec` (already [`prepare`]d): restored from `saved`
/// (its MAC, which the guest knows) or new with a random MAC.
#[cfg(target_os = "linux")]
pub fn create_device(
    spec: &NetSpec,
    saved: Option<&devices::virtio::net::NetState>,
) -> Result<devices::virtio::net::Net, NetError> {
    let backend: Box<dyn devices::virtio::net::NetBackend> = match &spec.backend {
        NetBackendSpec::Passt { host_loopback } => {
            Box::new(linux::Passt::start(spec.guest, *host_loopback)?)
        }
        NetBackendSpec::Tap { name } => Box::new(linux::Tap::open(name)?),
    };
    Ok(match saved {
        Some(state) => devices::virtio::net::Net::from_state(state, backend),
        None => devices::virtio::net::Net::new(random_mac(), backend),
    })
}

/// No backends on this host OS yet.
#[cfg(not(target_os = "linux"))]
pub fn create_device(
    spec: &NetSpec,
    _saved: Option<&devices::virtio::net::NetState>,
) -> Result<devices::virtio::net::Net, NetError> {
    Err(NetError::Unsupported {
        what: match spec.backend {
            NetBackendSpec::Passt { .. } => "passt",
            NetBackendSpec::Tap { .. } => "tap",
        },
    })
}

/// The host's default route and its interface address.
#[cfg(target_os = "linux")]
pub fn host_route() -> Result<HostRoute, NetError> {
    // thread-self: the network namespace of this thread, which is the one
    // passt (spawned from it) and getifaddrs (a netlink socket) see too.
    let text = std::fs::read_to_string("/proc/thread-self/net/route")
        .or_else(|_| std::fs::read_to_string("/proc/net/route"))
        .map_err(|source| NetError::HostConfig {
            what: "/proc/net/route",
            source,
        })?;
    let (iface, gateway) = parse_default_route(&text).ok_or(NetError::NoDefaultRoute)?;
    let (addr, prefix) = linux::iface_ipv4(&iface)?.ok_or(NetError::NoAddress {
        iface: iface.clone(),
    })?;
    Ok(HostRoute {
        iface,
        gateway,
        addr,
        prefix,
    })
}

/// Not available on this host OS yet.
#[cfg(not(target_os = "linux"))]
pub fn host_route() -> Result<HostRoute, NetError> {
    Err(NetError::Unsupported { what: "passt" })
}

#[cfg(target_os = "linux")]
pub use linux::{Passt, Tap};

/// The passt program: `$SUPERMACHINE_PASST` or `passt` on `PATH`.
pub fn passt_program() -> PathBuf {
    std::env::var_os("SUPERMACHINE_PASST")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new("passt").to_path_buf())
}

#[cfg(target_os = "linux")]
mod linux {
    use std::ffi::CStr;
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::net::Ipv4Addr;
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::net::UnixStream;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use devices::virtio::net::{NetBackend, StreamBackend};

    use super::NetError;
    use crate::resources::GuestIpConfig;

    /// A running passt and the stream to it.
    #[derive(Debug)]
    pub struct Passt {
        stream: StreamBackend,
        child: Child,
    }

    impl Passt {
        /// Starts passt serving `guest` (the addresses it hands out and maps).
        /// Unless `host_loopback`, the gateway address is just the gateway
        /// (`--no-map-gw`), not a door to the host's own loopback services.
        pub fn start(guest: Option<GuestIpConfig>, host_loopback: bool) -> Result<Self, NetError> {
            let (ours, theirs) = UnixStream::pair().map_err(NetError::SocketPair)?;
            let program = super::passt_program();
            let fd = theirs.as_raw_fd();
            // passt inherits `theirs` under its own number. Clearing FD_CLOEXEC
            // here (instead of a dup2 in a pre_exec hook) keeps std on its
            // posix_spawn path: no fork of this process, whose address space
            // already holds guest memory (a fork cost ~2 ms here).
            // SAFETY: fcntl(F_SETFD) on an fd this function owns; no memory involved.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                return Err(NetError::SocketPair(io::Error::last_os_error()));
            }
            let mut cmd = Command::new(&program);
            cmd.args(["--foreground", "--quiet", "--fd"])
                .arg(fd.to_string());
            if !host_loopback {
                cmd.arg("--no-map-gw");
            }
            if let Some(g) = guest {
                cmd.arg("--address").arg(g.addr.to_string());
                cmd.arg("--netmask").arg(g.prefix.to_string());
                if let Some(gw) = g.gateway {
                    cmd.arg("--gateway").arg(gw.to_string());
                }
                if g.dns == Some(super::DNS_FORWARD_ADDR) {
                    cmd.arg("--dns-forward")
                        .arg(super::DNS_FORWARD_ADDR.to_string());
                }
            }
            // passt talks even with --quiet (running as root, no IPv6 route):
            // its lines go to the log at debug level, not to the user's terminal.
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let spawned = cmd.spawn();
            // Another process spawned meanwhile could inherit the fd; that only
            // delays passt's exit until that process closes it.
            let mut child = spawned.map_err(|source| NetError::PasstMissing {
                program: program.display().to_string(),
                source,
            })?;
            drop(theirs);
            if let Some(err) = child.stderr.take() {
                let _ = std::thread::Builder::new()
                    .name("passt-log".into())
                    .spawn(move || {
                        use std::io::BufRead;
                        if let Err(e) = crate::sandbox::confine_helper_thread() {
                            tracing::warn!("the passt log thread is not sandboxed: {e}");
                        }
                        for line in io::BufReader::new(err).lines().map_while(Result::ok) {
                            tracing::debug!(target: "passt", "{line}");
                        }
                    });
            }
            let stream = StreamBackend::new(ours, "passt").map_err(NetError::SocketPair)?;
            Ok(Self { stream, child })
        }
    }

    impl Drop for Passt {
        fn drop(&mut self) {
            // passt exits by itself once its socket closes (`--fd` implies
            // one-off); give it a moment, then make sure.
            let deadline = Instant::now() + Duration::from_millis(200);
            loop {
                match self.child.try_wait() {
                    Ok(Some(_)) => return,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => break,
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl NetBackend for Passt {
        fn fd(&self) -> RawFd {
            self.stream.fd()
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
            self.stream.recv(buf)
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
            self.stream.send(frame)
        }
        fn name(&self) -> &str {
            "passt"
        }
        fn exit_status(&mut self) -> Option<String> {
            // The socket closing is usually passt exiting; it may take a moment
            // to be reaped by the kernel after its socket is gone.
            for _ in 0..20 {
                match self.child.try_wait() {
                    Ok(Some(st)) => return Some(format!("passt {st}")),
                    Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    Err(_) => return None,
                }
            }
            Some("passt is still running".into())
        }
    }

    impl Passt {
        /// The passt process's id.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    /// A TAP interface: one frame per read and write, no packet-info prefix.
    #[derive(Debug)]
    pub struct Tap {
        file: File,
        name: String,
    }

    /// `_IOW('T', 202, int)`.
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

    impl Tap {
        /// Attaches to TAP interface `name` (created if the caller may).
        pub fn open(name: &str) -> Result<Self, NetError> {
            let err = |source| NetError::Tap {
                name: name.to_string(),
                source,
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(err)?;
            // SAFETY: ifreq is plain old data; all-zero is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            let bytes = name.as_bytes();
            if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
                return Err(err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "interface names are 1-15 bytes",
                )));
            }
            for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
                *d = *s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
            // is, for the duration of the call; the fd is the tun device we own.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
            if rc < 0 {
                return Err(err(io::Error::last_os_error()));
            }
            Ok(Self {
                file,
                name: name.to_string(),
            })
        }
    }

    impl NetBackend for Tap {
        fn fd(&self) -> RawFd {
            self.file.as_raw_fd()
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
            loop {
                match self.file.read(buf) {
                    Ok(n) => return Ok(Some(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
            loop {
                match self.file.write(frame) {
                    Ok(_) => return Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The interface is down: the frame is lost, as on a cable.
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(true),
                    Err(e) => return Err(e),
                }
            }
        }
        fn name(&self) -> &str {
            &self.name
        }
    }

    /// The IPv4 address and prefix length of interface `iface`, if it has one.
    pub fn iface_ipv4(iface: &str) -> Result<Option<(Ipv4Addr, u8)>, NetError> {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs writes a list head we free with freeifaddrs below.
        if unsafe { libc::getifaddrs(&mut head) } < 0 {
            return Err(NetError::HostConfig {
                what: "getifaddrs",
                source: io::Error::last_os_error(),
            });
        }
        let mut found = None;
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list getifaddrs returned, valid
            // until freeifaddrs; its fields are read-only here.
            let ifa = unsafe { &*cur };
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
            // SAFETY: ifa_addr is non-null and points to a sockaddr of the list.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if name.to_bytes() != iface.as_bytes() || i32::from(family) != libc::AF_INET {
                continue;
            }
            // SAFETY: family AF_INET means the sockaddr is a sockaddr_in.
            let addr = unsafe { *(ifa.ifa_addr as *const libc::sockaddr_in) };
            let prefix = if ifa.ifa_netmask.is_null() {
                32
            } else {
                // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
                let mask = unsafe { *(ifa.ifa_netmask as *const libc::sockaddr_in) };
                u32::from_be(mask.sin_addr.s_addr).count_ones() as u8
            };
            found = Some((Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), prefix));
            break;
        }
        // SAFETY: `head` came from getifaddrs and is freed once; no node is used after.
        unsafe { libc::freeifaddrs(head) };
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
        eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn parse_default_route_picks_lowest_metric_gateway() {
        assert_eq!(
            parse_default_route(ROUTES),
            Some(("eth0".to_string(), Ipv4Addr::new(10, 0, 0, 1)))
        );
    }

    #[test]
    fn parse_default_route_none_without_default() {
        let only_local = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\n";
        assert_eq!(parse_default_route(only_local), None);
        assert_eq!(parse_default_route(""), None);
        assert_eq!(
            parse_default_route("garbage\nmore garbage here x y z w\n"),
            None
        );
    }

    #[test]
    fn parse_resolv_conf_first_ipv4_nameserver() {
        let t = "# comment\nsearch example\nnameserver fe80::1\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
        assert_eq!(parse_resolv_conf(t), Some(Ipv4Addr::new(192, 0, 2, 53)));
        assert_eq!(parse_resolv_conf("search x\n"), None);
    }

    #[test]
    fn guest_config_loopback_resolver_goes_through_dns_forward() {
        let route = HostRoute {
            iface: "eth0".into(),
            gateway: Ipv4Addr::new(192, 0, 2, 254),
            addr: Ipv4Addr::new(192, 0, 2, 1),
            prefix: 24,
        };
        let g = guest_config_from(&route, Some(Ipv4Addr::new(127, 0, 0, 53)));
        assert_eq!(g.dns, Some(DNS_FORWARD_ADDR));
        assert_eq!(g.to_string(), "192.0.2.1/24,192.0.2.254,169.254.1.1");
        let g = guest_config_from(&route, Some(Ipv4Addr::new(192, 0, 2, 53)));
        assert_eq!(g.dns, Some(Ipv4Addr::new(192, 0, 2, 53)));
        assert_eq!(guest_config_from(&route, None).dns, None);
    }

    #[test]
    fn prepare_tap_with_addresses_appends_sm_net() {
        let mut res = VmResources::new("/k");
        res.cmdline = "console=ttyS0".into();
        res.network = NetSpec::parse("tap:tap0,ip=10.0.0.2/24,gw=10.0.0.1").unwrap();
        let out = prepare(&res).unwrap();
        assert_eq!(out.cmdline, "console=ttyS0 sm.net=10.0.0.2/24,10.0.0.1,");
        let mut res = VmResources::new("/k");
        res.cmdline = "x".into();
        assert_eq!(prepare(&res).unwrap().cmdline, "x");
    }

    #[test]
    fn random_mac_is_local_unicast() {
        let m = random_mac();
        assert_eq!(m[0] & 0x03, 0x02);
    }
}
