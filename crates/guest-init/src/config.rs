//! Pure decisions of guest-init, tested on any host: the kernel command line
//! options, the container environment (docker's defaults), and exit statuses.

#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

use agent_protocol::ExitStatus;

/// docker's default `PATH` when the image sets none (moby `oci/defaults.go`).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Hostname when the host gives none.
pub const DEFAULT_HOSTNAME: &str = "supermachine";

/// Status of a failure of guest-init itself in container mode (docker run's
/// "error of the daemon" code), so it is distinguishable from the container's.
pub const STATUS_CONTAINER_INIT_FAILED: u32 = 125;
/// The command exists but could not be executed (docker: 126).
pub const STATUS_CANNOT_EXECUTE: u32 = 126;
/// The command was not found (docker: 127).
pub const STATUS_NOT_FOUND: u32 = 127;

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
/// empty (the host's `runner::resources::GuestIpConfig::cmdline_arg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface address.
    pub addr: std::net::Ipv4Addr,
    /// Prefix length, 0 to 32.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Name server for `/etc/resolv.conf`.
    pub dns: Option<std::net::Ipv4Addr>,
}

impl NetConfig {
    /// Parses the value of `sm.net=`; `None` when malformed.
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
        let optional = |p: Option<&str>| -> Option<Option<std::net::Ipv4Addr>> {
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
    pub fn netmask(&self) -> std::net::Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix.min(32)))
            .unwrap_or(0);
        std::net::Ipv4Addr::from(bits)
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
            "sm.exit" => opts.exit_status = v.parse().map_err(|_| BadOption(word))?,
            "sm.run" => {
                opts.mode = match v {
                    "1" => Mode::Container,
                    "0" => Mode::Boot,
                    _ => return Err(BadOption(word)),
                }
            }
            "sm.mode" => {
                opts.mode = match v {
                    "boot" => Mode::Boot,
                    "container" => Mode::Container,
                    _ => return Err(BadOption(word)),
                }
            }
            "sm.root" if valid_root(v) => opts.root = v.to_owned(),
            "sm.rootfstype" => {
                opts.rootfstype = match v {
                    "erofs" => RootFsType::Erofs,
                    "ext4" => RootFsType::Ext4,
                    _ => return Err(BadOption(word)),
                }
            }
            "sm.hostname" if valid_hostname(v) => opts.hostname = v.to_owned(),
            "sm.agent" => {
                opts.agent = match v {
                    "vsock" => Agent::Vsock,
                    "console" => Agent::Console,
                    _ => return Err(BadOption(word)),
                }
            }
            "sm.net" => {
                opts.network = match NetConfig::parse(v) {
                    Some(c) => Network::Ipv4(c),
                    None => Network::Invalid(v.to_owned()),
                }
            }
            "sm.root" | "sm.hostname" => return Err(BadOption(word)),
            _ => {}
        }
    }
    Ok(opts)
}

/// The container's environment, as docker builds it: `HOSTNAME` first, then
/// the spec's `KEY=VALUE` entries (a later entry replaces an earlier one with
/// the same key; entries without `=` are dropped), then `PATH`, `HOME` and, on
/// a TTY, `TERM=xterm` where the spec did not set them.
pub fn container_env(spec_env: &[String], hostname: &str, home: &str, tty: bool) -> Vec<String> {
    let mut env: Vec<String> = vec![format!("HOSTNAME={hostname}")];
    for entry in spec_env {
        let Some((key, _)) = entry.split_once('=') else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        if let Some(slot) = env
            .iter_mut()
            .find(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
        {
            slot.clone_from(entry);
        } else {
            env.push(entry.clone());
        }
    }
    let has = |env: &[String], key: &str| {
        env.iter()
            .any(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
    };
    if !has(&env, "PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={home}"));
    }
    if tty && !has(&env, "TERM") {
        env.push("TERM=xterm".to_owned());
    }
    env
}

/// Decodes a `waitpid(2)` status word (Linux layout, `<bits/waitstatus.h>`:
/// low 7 bits the terminating signal, 0 for a normal exit with the code in
/// bits 8-15). `None` for stopped/continued reports.
pub fn decode_wait_status(raw: i32) -> Option<ExitStatus> {
    let sig = raw & 0x7f;
    if sig == 0 {
        Some(ExitStatus::Code((raw >> 8) & 0xff))
    } else if sig != 0x7f && (raw & 0xffff) != 0xffff {
        Some(ExitStatus::Signaled(sig))
    } else {
        None
    }
}

/// The status docker reports when the command could not be started:
/// 127 when it does not exist, 126 otherwise (permission, bad format).
pub fn spawn_failure_status(kind: std::io::ErrorKind) -> u32 {
    if kind == std::io::ErrorKind::NotFound {
        STATUS_NOT_FOUND
    } else {
        STATUS_CANNOT_EXECUTE
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
                addr: std::net::Ipv4Addr::UNSPECIFIED,
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
    fn container_env_empty_gets_docker_defaults() {
        assert_eq!(
            container_env(&[], "box", "/root", false),
            vec![
                "HOSTNAME=box".to_owned(),
                format!("PATH={DEFAULT_PATH}"),
                "HOME=/root".to_owned()
            ]
        );
    }

    #[test]
    fn container_env_spec_values_win_and_later_entries_replace() {
        let spec: Vec<String> = ["PATH=/opt/bin", "A=1", "HOME=/h", "A=2", "NOEQ", "=x", "B="]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            container_env(&spec, "box", "/root", true),
            vec![
                "HOSTNAME=box",
                "PATH=/opt/bin",
                "A=2",
                "HOME=/h",
                "B=",
                "TERM=xterm"
            ]
        );
    }

    #[test]
    fn container_env_hostname_overridable() {
        let env = container_env(&["HOSTNAME=mine".into()], "box", "/", false);
        assert_eq!(env[0], "HOSTNAME=mine");
        assert_eq!(env.iter().filter(|e| e.starts_with("HOSTNAME=")).count(), 1);
    }

    #[test]
    fn decode_wait_status_exit_and_signal() {
        assert_eq!(decode_wait_status(0), Some(ExitStatus::Code(0)));
        assert_eq!(decode_wait_status(42 << 8), Some(ExitStatus::Code(42)));
        assert_eq!(decode_wait_status(9), Some(ExitStatus::Signaled(9)));
        // SIGSEGV with the core-dump bit (0x80).
        assert_eq!(
            decode_wait_status(0x80 | 11),
            Some(ExitStatus::Signaled(11))
        );
        // Stopped by SIGSTOP (0x137f) and continued (0xffff).
        assert_eq!(decode_wait_status(0x137f), None);
        assert_eq!(decode_wait_status(0xffff), None);
        assert_eq!(
            decode_wait_status(15).map(ExitStatus::docker_code),
            Some(143)
        );
    }

    #[test]
    fn spawn_failure_status_follows_docker() {
        assert_eq!(spawn_failure_status(std::io::ErrorKind::NotFound), 127);
        assert_eq!(
            spawn_failure_status(std::io::ErrorKind::PermissionDenied),
            126
        );
    }
}
