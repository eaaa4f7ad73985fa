//! The kernel command-line keys through which the host configures guest-init
//! (`sm.mode=container`, `sm.net=...`): written by the host with [`Arg`] and read
//! by guest-init with [`parse_cmdline`], so the keys and their value spellings
//! have one owner. Unknown `sm.*` keys and everything else on the line are the
//! kernel's and are ignored.

use std::fmt;
use std::net::Ipv4Addr;

/// `sm.exit=N`: the status boot mode reports.
pub const KEY_EXIT: &str = "sm.exit";
/// `sm.run=1`: the older spelling of `sm.mode=container`.
pub const KEY_RUN: &str = "sm.run";
/// `sm.mode=boot|container`.
pub const KEY_MODE: &str = "sm.mode";
/// `sm.root=/dev/NAME`: the image disk.
pub const KEY_ROOT: &str = "sm.root";
/// `sm.rootfstype=erofs|ext4`.
pub const KEY_ROOTFSTYPE: &str = "sm.rootfstype";
/// `sm.hostname=NAME`.
pub const KEY_HOSTNAME: &str = "sm.hostname";
/// `sm.agent=vsock|console`.
pub const KEY_AGENT: &str = "sm.agent";
/// `sm.net=ADDR/PREFIX,GW,DNS`.
pub const KEY_NET: &str = "sm.net";

/// Hostname when the host gives none.
pub const DEFAULT_HOSTNAME: &str = "supermachine";

/// What guest-init runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `supermachine boot`: ready marker, report `sm.exit`, power off.
    #[default]
    Boot,
    /// Run an OCI image's process from the disk `sm.root` (`sm.mode=container`,
    /// or the older `sm.run=1`).
    Container,
}

/// Where the container's stdio goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Agent {
    /// The serial console (fallback; stdout and stderr mixed).
    #[default]
    Console,
    /// The agent protocol on vsock port 1024; the host connects.
    Vsock,
}

/// Root filesystem types guest-init accepts for the image disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RootFsType {
    /// EROFS (the image crate's output).
    #[default]
    Erofs,
    /// ext4.
    Ext4,
}

impl RootFsType {
    /// The name `mount(2)` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Erofs => "erofs",
            Self::Ext4 => "ext4",
        }
    }
}

/// The container's network, from `sm.net=` (docker's `--network none` when
/// absent: loopback only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// No `sm.net=`: only `lo` is up.
    #[default]
    Loopback,
    /// Configure `eth0` as given.
    Ipv4(NetConfig),
    /// `sm.net=` could not be parsed: reported on the console, and the container
    /// runs without network rather than not at all.
    Invalid(String),
}

/// The guest's IPv4 setup: `sm.net=ADDR/PREFIX,GW,DNS` where GW and DNS may be
/// empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetConfig {
    /// The interface address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0 to 32.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Name server for `/etc/resolv.conf`.
    pub dns: Option<Ipv4Addr>,
}

impl NetConfig {
    /// Parses the value of `sm.net=` (what [`Arg::Net`] writes); `None` when
    /// malformed.
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.split(',');
        let (addr, prefix) = parts.next()?.split_once('/')?;
        let addr = addr.parse().ok()?;
        // Digits only: u8's parser would take a leading `+`.
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let prefix: u8 = prefix.parse().ok()?;
        if prefix > 32 {
            return None;
        }
        let optional = |p: Option<&str>| -> Option<Option<Ipv4Addr>> {
            match p {
                None | Some("") => Some(None),
                Some(a) => a.parse().ok().map(Some),
            }
        };
        let gateway = optional(parts.next())?;
        let dns = optional(parts.next())?;
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            addr,
            prefix,
            gateway,
            dns,
        })
    }

    /// The netmask of `prefix` (`/24` is 255.255.255.0).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix.min(32)))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// `/etc/resolv.conf` for the container (resolv.conf(5)), when a name server
    /// was given.
    pub fn resolv_conf(&self) -> Option<String> {
        self.dns.map(|d| format!("nameserver {d}\n"))
    }
}

/// What guest-init was asked to do on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `sm.mode=boot|container` (`sm.run=1` = container).
    pub mode: Mode,
    /// `sm.exit=N`: the status boot mode reports (u32, default 0).
    pub exit_status: u32,
    /// `sm.root=/dev/NAME`: the image disk (default `/dev/vda`).
    pub root: String,
    /// `sm.rootfstype=erofs|ext4` (default erofs).
    pub rootfstype: RootFsType,
    /// `sm.hostname=NAME` (default `supermachine`).
    pub hostname: String,
    /// `sm.agent=vsock|console` (default console).
    pub agent: Agent,
    /// `sm.net=ADDR/PREFIX,GW,DNS` (default: loopback only).
    pub network: Network,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: Mode::Boot,
            exit_status: 0,
            root: "/dev/vda".to_owned(),
            rootfstype: RootFsType::Erofs,
            hostname: DEFAULT_HOSTNAME.to_owned(),
            agent: Agent::Console,
            network: Network::Loopback,
        }
    }
}

/// An option on the command line that guest-init could not understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadOption<'a>(pub &'a str);

/// A hostname as `sethostname(2)` and RFC 1123 accept it: 1 to 64 bytes of
/// letters, digits, `-` and `.`.
pub fn valid_hostname(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A block device path under `/dev/` with a plain name (no `..`, no nesting).
fn valid_root(path: &str) -> bool {
    path.strip_prefix("/dev/").is_some_and(|n| {
        !n.is_empty() && n != "." && n != ".." && !n.contains('/') && n.len() <= 32
    })
}

/// Parses guest-init's `sm.*` options out of a kernel command line. Unknown
/// `sm.*` keys and everything else are ignored (the kernel and modules own them).
pub fn parse_cmdline(cmdline: &str) -> Result<Options, BadOption<'_>> {
    let mut opts = Options::default();
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, v)) = word.split_once('=') else {
            continue;
        };
        match key {
            KEY_EXIT => opts.exit_status = v.parse().map_err(|_| BadOption(word))?,
            KEY_RUN => {
                opts.mode = match v {
                    "1" => Mode::Container,
                    "0" => Mode::Boot,
                    _ => return Err(BadOption(word)),
                }
            }
            KEY_MODE => {
                opts.mode = match v {
                    "boot" => Mode::Boot,
                    "container" => Mode::Container,
                    _ => return Err(BadOption(word)),
                }
            }
            KEY_ROOT if valid_root(v) => opts.root = v.to_owned(),
            KEY_ROOTFSTYPE => {
                opts.rootfstype = match v {
                    "erofs" => RootFsType::Erofs,
                    "ext4" => RootFsType::Ext4,
                    _ => return Err(BadOption(word)),
                }
            }
            KEY_HOSTNAME if valid_hostname(v) => opts.hostname = v.to_owned(),
            KEY_AGENT => {
                opts.agent = match v {
                    "vsock" => Agent::Vsock,
                    "console" => Agent::Console,
                    _ => return Err(BadOption(word)),
                }
            }
            KEY_NET => {
                opts.network = match NetConfig::parse(v) {
                    Some(c) => Network::Ipv4(c),
                    None => Network::Invalid(v.to_owned()),
                }
            }
            KEY_ROOT | KEY_HOSTNAME => return Err(BadOption(word)),
            _ => {}
        }
    }
    Ok(opts)
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::Container => "container",
        }
    }
}

impl Agent {
    fn name(self) -> &'static str {
        match self {
            Self::Console => "console",
            Self::Vsock => "vsock",
        }
    }
}

impl fmt::Display for NetConfig {
    /// The value of `sm.net=`: `ADDR/PREFIX,GW,DNS`, GW and DNS empty when absent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |a: Option<Ipv4Addr>| a.map(|a| a.to_string()).unwrap_or_default();
        write!(
            f,
            "{}/{},{},{}",
            self.addr,
            self.prefix,
            opt(self.gateway),
            opt(self.dns)
        )
    }
}

/// One option for guest-init, as the host writes it on the kernel command line
/// (`Display` gives `key=value`, which [`parse_cmdline`] reads back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// `sm.exit=N`.
    Exit(u32),
    /// `sm.mode=...`.
    Mode(Mode),
    /// `sm.root=/dev/NAME`.
    Root(String),
    /// `sm.rootfstype=...`.
    RootFsType(RootFsType),
    /// `sm.hostname=NAME`.
    Hostname(String),
    /// `sm.agent=...`.
    Agent(Agent),
    /// `sm.net=ADDR/PREFIX,GW,DNS`.
    Net(NetConfig),
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exit(n) => write!(f, "{KEY_EXIT}={n}"),
            Self::Mode(m) => write!(f, "{KEY_MODE}={}", m.name()),
            Self::Root(r) => write!(f, "{KEY_ROOT}={r}"),
            Self::RootFsType(t) => write!(f, "{KEY_ROOTFSTYPE}={}", t.name()),
            Self::Hostname(h) => write!(f, "{KEY_HOSTNAME}={h}"),
            Self::Agent(a) => write!(f, "{KEY_AGENT}={}", a.name()),
            Self::Net(n) => write!(f, "{KEY_NET}={n}"),
        }
    }
}

/// Appends `args` to a kernel command line, each after one space.
pub fn append(cmdline: &mut String, args: &[Arg]) {
    for a in args {
        cmdline.push(' ');
        cmdline.push_str(&a.to_string());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parse_cmdline_no_options_defaults() {
        let opts = parse_cmdline("console=ttyS0 reboot=k panic=1 quiet").unwrap();
        assert_eq!(opts, Options::default());
        assert_eq!(opts.mode, Mode::Boot);
    }

    #[test]
    fn parse_cmdline_exit_and_run_parsed() {
        let opts = parse_cmdline("console=ttyS0 sm.exit=42 sm.run=1\n").unwrap();
        assert_eq!(opts.exit_status, 42);
        assert_eq!(opts.mode, Mode::Container);
    }

    #[test]
    fn parse_cmdline_full_u32_status_accepted() {
        let opts = parse_cmdline("sm.exit=4294967295").unwrap();
        assert_eq!(opts.exit_status, u32::MAX);
    }

    #[test]
    fn parse_cmdline_last_exit_wins() {
        assert_eq!(parse_cmdline("sm.exit=3 sm.exit=7").unwrap().exit_status, 7);
    }

    #[test]
    fn parse_cmdline_bad_exit_rejected() {
        assert_eq!(parse_cmdline("sm.exit=-1"), Err(BadOption("sm.exit=-1")));
        assert_eq!(parse_cmdline("sm.exit=x"), Err(BadOption("sm.exit=x")));
        assert_eq!(
            parse_cmdline("sm.exit=4294967296"),
            Err(BadOption("sm.exit=4294967296"))
        );
        assert_eq!(parse_cmdline("sm.run=yes"), Err(BadOption("sm.run=yes")));
    }

    #[test]
    fn parse_cmdline_similar_keys_ignored() {
        let opts = parse_cmdline("xsm.exit=9 sm.exitx=9 sm.exit sm.mode").unwrap();
        assert_eq!(opts, Options::default());
    }

    #[test]
    fn parse_cmdline_container_keys_parsed() {
        let opts = parse_cmdline(
            "console=ttyS0 quiet sm.mode=container sm.root=/dev/vdb sm.rootfstype=ext4 \
             sm.hostname=web-1.local sm.agent=vsock",
        )
        .unwrap();
        assert_eq!(
            opts,
            Options {
                mode: Mode::Container,
                exit_status: 0,
                root: "/dev/vdb".into(),
                rootfstype: RootFsType::Ext4,
                hostname: "web-1.local".into(),
                agent: Agent::Vsock,
                network: Network::Loopback,
            }
        );
    }

    #[test]
    fn parse_cmdline_bad_container_values_rejected() {
        for bad in [
            "sm.mode=vm",
            "sm.root=/etc/passwd/../x",
            "sm.root=/dev/../etc",
            "sm.root=vda",
            "sm.root=/dev/",
            "sm.rootfstype=xfs",
            "sm.hostname=a_b",
            "sm.hostname=",
            "sm.agent=tcp",
        ] {
            assert_eq!(parse_cmdline(bad), Err(BadOption(bad)), "{bad}");
        }
    }

    #[test]
    fn parse_cmdline_net_full_and_with_empty_gateway_and_dns() {
        let opts =
            parse_cmdline("sm.mode=container sm.net=10.0.2.15/24,10.0.2.2,10.0.2.3").unwrap();
        let want = NetConfig {
            addr: "10.0.2.15".parse().unwrap(),
            prefix: 24,
            gateway: Some("10.0.2.2".parse().unwrap()),
            dns: Some("10.0.2.3".parse().unwrap()),
        };
        assert_eq!(opts.network, Network::Ipv4(want));
        let bare = parse_cmdline("sm.net=192.0.2.7/32,,").unwrap();
        assert_eq!(
            bare.network,
            Network::Ipv4(NetConfig {
                addr: "192.0.2.7".parse().unwrap(),
                prefix: 32,
                gateway: None,
                dns: None,
            })
        );
        // Trailing empty fields may be left out.
        let short = NetConfig::parse("192.0.2.7/8").unwrap();
        assert_eq!((short.gateway, short.dns), (None, None));
        let dns_only = NetConfig::parse("192.0.2.7/24,,192.0.2.53").unwrap();
        assert_eq!(dns_only.gateway, None);
        assert_eq!(
            dns_only.resolv_conf().as_deref(),
            Some("nameserver 192.0.2.53\n")
        );
    }

    #[test]
    fn parse_cmdline_net_absent_is_loopback_only() {
        assert_eq!(
            parse_cmdline("sm.mode=container").unwrap().network,
            Network::Loopback
        );
    }

    #[test]
    fn parse_cmdline_bad_net_kept_as_invalid_not_an_error() {
        for bad in [
            "",
            "10.0.0.2",
            "10.0.0.2/",
            "10.0.0.2/33",
            "10.0.0.2/+8",
            "10.0.0.2/024",
            "10.0.0.256/24",
            "10.0.0.2/24,gw",
            "10.0.0.2/24,10.0.0.1,dns",
            "10.0.0.2/24,10.0.0.1,10.0.0.1,extra",
            "::1/64",
        ] {
            let word = format!("sm.net={bad}");
            assert_eq!(
                parse_cmdline(&word).unwrap().network,
                Network::Invalid(bad.to_owned()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn net_config_netmask_from_prefix() {
        let mask = |p| {
            NetConfig {
                addr: Ipv4Addr::UNSPECIFIED,
                prefix: p,
                gateway: None,
                dns: None,
            }
            .netmask()
            .to_string()
        };
        assert_eq!(mask(0), "0.0.0.0");
        assert_eq!(mask(8), "255.0.0.0");
        assert_eq!(mask(24), "255.255.255.0");
        assert_eq!(mask(31), "255.255.255.254");
        assert_eq!(mask(32), "255.255.255.255");
    }

    #[test]
    fn net_config_without_dns_has_no_resolv_conf() {
        assert_eq!(
            NetConfig::parse("10.0.0.2/24,10.0.0.1,")
                .unwrap()
                .resolv_conf(),
            None
        );
    }

    #[test]
    fn valid_hostname_length_bounds() {
        assert!(valid_hostname(&"a".repeat(64)));
        assert!(!valid_hostname(&"a".repeat(65)));
        assert!(!valid_hostname("a b"));
    }

    #[test]
    fn every_arg_written_by_the_host_parses_back() {
        let net = NetConfig {
            addr: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns: None,
        };
        let mut line = "console=ttyS0 quiet".to_string();
        append(
            &mut line,
            &[
                Arg::Exit(7),
                Arg::Mode(Mode::Container),
                Arg::Root("/dev/vdb".into()),
                Arg::RootFsType(RootFsType::Ext4),
                Arg::Hostname("web-1".into()),
                Arg::Agent(Agent::Vsock),
                Arg::Net(net),
            ],
        );
        assert_eq!(
            line,
            "console=ttyS0 quiet sm.exit=7 sm.mode=container sm.root=/dev/vdb \
             sm.rootfstype=ext4 sm.hostname=web-1 sm.agent=vsock sm.net=10.0.2.15/24,10.0.2.2,"
        );
        let o = parse_cmdline(&line).unwrap();
        assert_eq!(o.exit_status, 7);
        assert_eq!(o.mode, Mode::Container);
        assert_eq!(o.root, "/dev/vdb");
        assert_eq!(o.rootfstype, RootFsType::Ext4);
        assert_eq!(o.hostname, "web-1");
        assert_eq!(o.agent, Agent::Vsock);
        assert_eq!(o.network, Network::Ipv4(net));
    }

    #[test]
    fn boot_mode_and_console_agent_parse_back() {
        let mut line = String::new();
        append(
            &mut line,
            &[Arg::Mode(Mode::Boot), Arg::Agent(Agent::Console)],
        );
        let o = parse_cmdline(&line).unwrap();
        assert_eq!((o.mode, o.agent), (Mode::Boot, Agent::Console));
    }
}
