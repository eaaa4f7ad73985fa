//! Container mode: mount the image disk under an overlayfs, switch into it,
//! run the image's process as PID 1's only child, forward its stdio and
//! signals, reap zombies, and return the docker-style status.
//! The host's side of the contract: docs/agent-protocol.md, "Container mode".

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::{
    ExitStatus, FrameDecoder, Message, ProcessSpec, User, CONTROL_STREAM, MAIN_PROCESS_STREAM,
    MAX_PAYLOAD, VERSION,
};

use crate::agent::{self, Channel, Incoming};
use crate::config::{
    container_env, decode_wait_status, spawn_failure_status, STATUS_CONTAINER_INIT_FAILED,
};
use crate::sys;
use crate::user::{self, ExecUser};
use agent_protocol::cmdline::{Agent, Network, Options};

/// Spec file the host may put into the initramfs: agent frames, the first
/// ProcessSpec of which is the process to run.
const SPEC_FILE: &str = "/sm/spec";
const LOWER: &str = "/run/sm/lower";
const RW: &str = "/run/sm/rw";
const ROOT: &str = "/run/sm/root";

const DISK_TIMEOUT: Duration = Duration::from_secs(10);
const VSOCK_DEVICE_TIMEOUT: Duration = Duration::from_secs(5);
const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// After the main process exits, how long the rest get to close the pipes
/// once killed (they are SIGKILLed, so this only covers scheduling).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Largest stdin backlog buffered for a process that does not read it; past
/// this the channel is not read until the process catches up.
const STDIN_BACKLOG: usize = 4 << 20;
const FORWARDED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

const AGENT_VERSION: &str = concat!("guest-init ", env!("CARGO_PKG_VERSION"));

macro_rules! fail {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "supermachine: guest-init: ");
        let _ = writeln!(err, $($arg)*);
    }};
}

/// Runs the container described by the spec file or the host, returning the
/// status to report (docker's: the exit code, 128+signal, or 125-127).
pub fn run(opts: &Options) -> u32 {
    // Signals are blocked before any child exists, so none is lost.
    let mut signals = FORWARDED_SIGNALS.to_vec();
    signals.push(libc::SIGCHLD);
    let sigfd = match sys::signalfd(&signals) {
        Ok(fd) => fd,
        Err(e) => {
            fail!("signalfd: {e}");
            return STATUS_CONTAINER_INIT_FAILED;
        }
    };

    let listener = match opts.agent {
        Agent::Vsock => match agent::listen(VSOCK_DEVICE_TIMEOUT) {
            Ok((l, _cid)) => {
                // Published ports reach the container from the start, and
                // through every restore (a listener survives it).
                if let Err(e) = crate::forward::start() {
                    fail!("published ports are unavailable: {e}");
                }
                if let Err(e) = crate::exec::start(opts) {
                    fail!("exec is unavailable: {e}");
                }
                Some(l)
            }
            Err(e) => {
                fail!("vsock control channel unavailable, output goes to the console: {e}");
                None
            }
        },
        Agent::Console => None,
    };

    let file_spec = read_spec_file();
    let setup = setup_rootfs(opts);

    // The host may give up on a connection attempt (its handshake timed out while
    // the driver was still coming up) after we accepted it: a connection that closes
    // before saying Hello is abandoned, and the next one is accepted, until the
    // deadline.
    let mut pre = PreStart::default();
    let mut chan: Option<Channel> = None;
    if let Some(l) = listener.as_ref() {
        let mut deadline = std::time::Instant::now() + HOST_CONNECT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let sock = match agent::accept(l, left) {
                Ok(Some(sock)) => sock,
                Ok(None) => {
                    fail!("the host did not connect to vsock port {} in {HOST_CONNECT_TIMEOUT:?}; output goes to the console", agent_protocol::CONTROL_PORT);
                    break;
                }
                Err(e) => {
                    fail!("accepting the host's vsock connection: {e}");
                    break;
                }
            };
            let mut c = Channel::new(sock);
            pre = PreStart::default();
            match handshake(&mut c, setup.as_ref().err(), &mut pre) {
                Ok(()) => {
                    chan = Some(c);
                    break;
                }
                Err(Handshake::Abandoned) => continue,
                Err(Handshake::Reset) => {
                    // A restored VM's host connects after the restore, however
                    // long after the capture that is (the guest's clocks
                    // resume where they were captured).
                    deadline = std::time::Instant::now() + HOST_CONNECT_TIMEOUT;
                    continue;
                }
                Err(Handshake::Failed(msg)) => {
                    fail!("{msg}");
                    let _ = c.send(CONTROL_STREAM, &Message::Error { message: msg });
                    return finish_channel(Some(c), STATUS_CONTAINER_INIT_FAILED);
                }
            }
        }
    }
    if let Err(msg) = setup {
        fail!("{msg}");
        return finish_channel(chan, STATUS_CONTAINER_INIT_FAILED);
    }

    let (stream, spec) = match (pre.spec.take(), file_spec) {
        (Some(s), _) => s,
        (None, Ok(Some(spec))) => (pre.start_stream.unwrap_or(MAIN_PROCESS_STREAM), spec),
        (None, Ok(None)) => {
            let msg = format!(
                "no process to run: {SPEC_FILE} is absent and the host sent no ProcessSpec"
            );
            return report_failure(&mut chan, CONTROL_STREAM, STATUS_CONTAINER_INIT_FAILED, msg);
        }
        (None, Err(msg)) => {
            return report_failure(&mut chan, CONTROL_STREAM, STATUS_CONTAINER_INIT_FAILED, msg)
        }
    };

    let status = match Process::spawn(
        &spec,
        opts,
        chan.as_ref().is_some_and(Channel::alive),
        pre.size,
    ) {
        Ok(mut p) => {
            crate::exec::set_main_running(true);
            let status = p.supervise(
                sigfd.as_raw_fd(),
                listener.as_ref(),
                &mut chan,
                stream,
                (pre.stdin, pre.watch_listen),
            );
            if let Some(c) = chan.as_mut() {
                let _ = c.send(stream, &Message::Exited(status));
            }
            status.docker_code() as u32
        }
        Err((code, msg)) => {
            let s = report_failure(&mut chan, stream, code, msg);
            if let Some(c) = chan.as_mut() {
                let _ = c.send(stream, &Message::Exited(ExitStatus::Code(code as i32)));
            }
            s
        }
    };
    finish_channel(chan, status)
}

fn report_failure(chan: &mut Option<Channel>, stream: u32, code: u32, msg: String) -> u32 {
    fail!("{msg}");
    if let Some(c) = chan.as_mut() {
        let _ = c.send(stream, &Message::Error { message: msg });
    }
    code
}

fn finish_channel(chan: Option<Channel>, status: u32) -> u32 {
    if let Some(c) = chan {
        c.close(CLOSE_LINGER);
    }
    status
}

/// Reads the optional spec file: `Ok(None)` when absent.
fn read_spec_file() -> Result<Option<ProcessSpec>, String> {
    let file = match std::fs::File::open(SPEC_FILE) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("opening {SPEC_FILE}: {e}")),
    };
    let mut bytes = Vec::new();
    // One max-size frame plus a little; anything longer is not ours.
    let limit = u64::from(MAX_PAYLOAD) + 4096;
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading {SPEC_FILE}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{SPEC_FILE} is larger than {limit} bytes"));
    }
    let mut dec = FrameDecoder::new();
    let mut input = bytes.as_slice();
    while let Some(raw) = dec
        .decode(&mut input)
        .map_err(|e| format!("{SPEC_FILE}: {e}"))?
    {
        match raw.to_frame() {
            Ok(f) => {
                if let Message::ProcessSpec(spec) = f.message {
                    return Ok(Some(spec));
                }
            }
            Err(e) => return Err(format!("{SPEC_FILE}: {e}")),
        }
    }
    Err(format!("{SPEC_FILE} holds no complete ProcessSpec frame"))
}

fn mkdir_p(path: &str) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("creating {path}: {e}"))
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    sys::mount(src, target, Some(fstype), flags, data)
        .map_err(|e| format!("mounting {fstype} {src} on {target}: {e}"))
}

/// Image disk (read-only) + tmpfs upper under an overlayfs, the pseudo
/// filesystems inside it, then switch_root into it (the initramfs is rootfs,
/// which pivot_root(2) cannot move: Documentation/filesystems/
/// ramfs-rootfs-initramfs.rst), hostname and loopback.
fn setup_rootfs(opts: &Options) -> Result<(), String> {
    if !sys::wait_for_path(&opts.root, DISK_TIMEOUT) {
        return Err(format!(
            "image disk {} did not appear within {DISK_TIMEOUT:?} (is the virtio-blk device attached?)",
            opts.root
        ));
    }
    for d in [LOWER, RW, ROOT] {
        mkdir_p(d)?;
    }
    mount(
        &opts.root,
        LOWER,
        opts.rootfstype.name(),
        libc::MS_RDONLY,
        None,
    )?;
    mount(
        "tmpfs",
        RW,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )?;
    mkdir_p(&format!("{RW}/upper"))?;
    mkdir_p(&format!("{RW}/work"))?;
    let data = format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work");
    mount("overlay", ROOT, "overlay", 0, Some(&data))?;

    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let inner: [(&str, &str, &str, libc::c_ulong, Option<&str>); 6] = [
        ("proc", "/proc", "proc", nosuid_nodev_noexec, None),
        (
            "sysfs",
            "/sys",
            "sysfs",
            nosuid_nodev_noexec | libc::MS_RDONLY,
            None,
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            libc::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (src, target, fstype, flags, data) in inner {
        let path = format!("{ROOT}{target}");
        mkdir_p(&path)?;
        mount(src, &path, fstype, flags, data)?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        // devtmpfs does not create these; an existing one is kept.
        let _ = std::os::unix::fs::symlink(to, format!("{ROOT}/dev/{link}"));
    }
    // Like docker's bind-mounted /etc/hostname, /etc/hosts and /etc/resolv.conf,
    // written into the (tmpfs) upper layer; docker creates /etc for them too.
    write_etc_files(opts);

    std::env::set_current_dir(ROOT).map_err(|e| format!("chdir {ROOT}: {e}"))?;
    sys::mount(".", "/", None, libc::MS_MOVE, None)
        .map_err(|e| format!("moving {ROOT} to /: {e}"))?;
    sys::chroot(".").map_err(|e| format!("chroot into the container root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;

    sys::sethostname(&opts.hostname).map_err(|e| format!("sethostname {}: {e}", opts.hostname))?;
    if let Err(e) = sys::loopback_up() {
        // Not fatal: only programs using 127.0.0.1 notice.
        fail!("bringing up the loopback interface: {e}");
    }
    configure_network(&opts.network);
    Ok(())
}

/// The container's /etc/hostname, /etc/hosts and (with a name server)
/// /etc/resolv.conf. Failures are printed: the workload still runs.
fn write_etc_files(opts: &Options) {
    let etc = format!("{ROOT}/etc");
    if let Err(e) = std::fs::create_dir_all(&etc) {
        fail!("creating {etc}: {e}");
        return;
    }
    let h = &opts.hostname;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{h}\n"
    );
    let mut files = vec![("hostname", format!("{h}\n")), ("hosts", hosts)];
    if let Network::Ipv4(net) = &opts.network {
        if let Some(conf) = net.resolv_conf() {
            files.push(("resolv.conf", conf));
        }
    }
    for (name, text) in files {
        let path = format!("{etc}/{name}");
        // An image's symlink here (e.g. resolv.conf -> /run/...) would be followed
        // by a plain write: replace the entry itself, as docker's bind mount does.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            let _ = std::fs::remove_file(&path);
        }
        if let Err(e) = std::fs::write(&path, text) {
            fail!("writing /etc/{name}: {e}");
        }
    }
}

/// The network interface virtio-net gives the guest (the first and only one).
const NET_INTERFACE: &str = "eth0";
/// How long the interface may take to appear after virtio_net was loaded (the
/// probe runs asynchronously to the module load).
const NET_INTERFACE_TIMEOUT: Duration = Duration::from_secs(2);

/// Brings up `eth0` with the host's IPv4 setup and a default route. Failures
/// are printed and the container runs without network (never aborts it).
fn configure_network(network: &Network) {
    let net = match network {
        Network::Loopback => return,
        Network::Invalid(v) => {
            fail!(
                "cannot parse sm.net={v:?} (want ADDR/PREFIX,GW,DNS); the container has no network"
            );
            return;
        }
        Network::Ipv4(net) => net,
    };
    let sysfs = format!("/sys/class/net/{NET_INTERFACE}");
    if !sys::wait_for_path(&sysfs, NET_INTERFACE_TIMEOUT) {
        fail!(
            "network interface {NET_INTERFACE} did not appear within {NET_INTERFACE_TIMEOUT:?} \
             (is the virtio-net device attached?); the container has no network"
        );
        return;
    }
    let step = sys::set_ipv4(NET_INTERFACE, net.addr, net.netmask())
        .and_then(|()| sys::interface_up(NET_INTERFACE));
    if let Err(e) = step {
        fail!("configuring {NET_INTERFACE}: {e}; the container has no network");
        return;
    }
    if let Some(gw) = net.gateway {
        if let Err(e) = sys::add_default_route(gw) {
            fail!("adding the default route via {gw}: {e}");
        }
    }
}

/// What the host sent before Start.
#[derive(Debug, Default)]
struct PreStart {
    spec: Option<(u32, ProcessSpec)>,
    start_stream: Option<u32>,
    size: Option<(u16, u16)>,
    stdin: Vec<u8>,
    /// The host asked for [`Message::Listening`].
    watch_listen: bool,
}

/// Why a handshake did not reach Start.
enum Handshake {
    /// The connection closed before the host said Hello: try the next one.
    Abandoned,
    /// The connection ended after Ready and before Start: this VM was restored
    /// from a snapshot taken there (or its host is gone). The next connection
    /// is awaited afresh.
    Reset,
    /// Protocol misuse or a failed setup: the message for the host.
    Failed(String),
}

impl From<String> for Handshake {
    fn from(msg: String) -> Self {
        Handshake::Failed(msg)
    }
}

/// Hello -> Ready (or Error when the rootfs failed), then control messages
/// until Start.
fn handshake(
    chan: &mut Channel,
    setup_error: Option<&String>,
    pre: &mut PreStart,
) -> Result<(), Handshake> {
    let mut greeted = false;
    let mut seq = 0u64;
    loop {
        let mut pfd = [libc::pollfd {
            fd: chan.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        sys::poll(&mut pfd, HEARTBEAT_EVERY)
            .map_err(|e| format!("poll on the control channel: {e}"))?;
        if pfd[0].revents == 0 {
            if greeted {
                seq += 1;
                let _ = chan.send(CONTROL_STREAM, &Message::Heartbeat { seq });
            }
            continue;
        }
        let frames = match chan.receive() {
            Incoming::Frames(f) => f,
            Incoming::Closed | Incoming::Broken(_) if !greeted => return Err(Handshake::Abandoned),
            // After Ready: a restore of this VM reset every vsock connection
            // (the device's transport reset), or the host went away; either way
            // the next host connection is the one to serve.
            Incoming::Closed | Incoming::Broken(_) => return Err(Handshake::Reset),
        };
        for frame in frames {
            let Some(frame) = report_undecodable(chan, frame) else {
                continue;
            };
            match frame.message {
                Message::Hello { .. } => {
                    greeted = true;
                    if let Some(e) = setup_error {
                        // The caller sends this to the host as an Error.
                        return Err(Handshake::Failed(e.clone()));
                    }
                    let _ = chan.send(
                        CONTROL_STREAM,
                        &Message::Ready {
                            protocol_version: u16::from(VERSION),
                            agent_version: AGENT_VERSION.into(),
                        },
                    );
                }
                Message::ProcessSpec(spec) => pre.spec = Some((frame.stream, spec)),
                Message::Start => {
                    if !greeted {
                        return Err(Handshake::Failed("Start before Hello".into()));
                    }
                    if let Some((s, _)) = &pre.spec {
                        if *s != frame.stream {
                            return Err(Handshake::Failed(format!(
                                "Start on stream {} but the ProcessSpec came on stream {s}",
                                frame.stream
                            )));
                        }
                    }
                    pre.start_stream = Some(frame.stream);
                    return Ok(());
                }
                Message::Resize { rows, cols } => pre.size = Some((rows, cols)),
                Message::WatchListen => pre.watch_listen = true,
                Message::Attach => {
                    return Err(Handshake::Failed(
                        "Attach: no process runs in this VM yet (was it captured before its \
                         process started?)"
                            .into(),
                    ))
                }
                Message::Stdin(d) if pre.stdin.len() + d.len() <= STDIN_BACKLOG => {
                    pre.stdin.extend_from_slice(&d)
                }
                other => control_message(chan, other),
            }
        }
    }
}

/// Messages valid at any time on the control stream.
fn control_message(chan: &mut Channel, message: Message) {
    match message {
        Message::Heartbeat { seq } => {
            let _ = chan.send(CONTROL_STREAM, &Message::Heartbeat { seq });
        }
        Message::TimeSync { unix_nanos } => {
            if let Err(e) = sys::set_realtime(unix_nanos) {
                let _ = chan.send(
                    CONTROL_STREAM,
                    &Message::Error {
                        message: format!("TimeSync: {e}"),
                    },
                );
            }
        }
        Message::Entropy(bytes) => {
            if let Err(e) = sys::add_entropy(&bytes) {
                let _ = chan.send(
                    CONTROL_STREAM,
                    &Message::Error {
                        message: format!("Entropy: {e}"),
                    },
                );
            }
        }
        Message::Error { message } => fail!("host reported: {message}"),
        other => {
            let _ = chan.send(
                CONTROL_STREAM,
                &Message::Error {
                    message: format!("unexpected {:?} message at this point", other.kind()),
                },
            );
        }
    }
}

/// A running process (the main one, or an exec'd one: `crate::exec`) and the
/// parent ends of its stdio.
pub(crate) struct Process {
    pub(crate) pid: libc::pid_t,
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
    pub(crate) stdin: Option<OwnedFd>,
    /// The pty master when the process has a TTY (also in `stdout`/`stdin`
    /// as duplicates).
    pub(crate) pty: Option<RawFd>,
}

fn read_optional(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Process {
    /// Resolves user, env and cwd inside the (already entered) container root
    /// and starts the process. Errors carry docker's status (125/126/127).
    pub(crate) fn spawn(
        spec: &ProcessSpec,
        opts: &Options,
        channel: bool,
        size: Option<(u16, u16)>,
    ) -> Result<Self, (u32, String)> {
        let fail = |m: String| (STATUS_CONTAINER_INIT_FAILED, m);
        let Some(program) = spec.argv.first().filter(|p| !p.is_empty()) else {
            return Err(fail(
                "no command specified (the image has no Entrypoint or Cmd and none was given)"
                    .into(),
            ));
        };
        let passwd = read_optional("/etc/passwd");
        let who: ExecUser = match &spec.user {
            User::Name(name) => user::resolve(name, &passwd, &read_optional("/etc/group"))
                .map_err(|e| fail(e.to_string()))?,
            User::Ids { uid, gid, groups } => {
                let home = user::resolve(&uid.to_string(), &passwd, "")
                    .map(|u| u.home)
                    .unwrap_or_else(|_| "/".into());
                ExecUser {
                    uid: *uid,
                    gid: *gid,
                    groups: groups.clone(),
                    home,
                }
            }
        };
        let cwd = if spec.cwd.is_empty() {
            "/"
        } else {
            spec.cwd.as_str()
        };
        if !cwd.starts_with('/') {
            return Err(fail(format!(
                "working directory {cwd:?} is invalid: it must be an absolute path"
            )));
        }
        // docker creates a missing WorkingDir.
        mkdir_p(cwd).map_err(fail)?;
        let env = container_env(&spec.env, &opts.hostname, &who.home, spec.tty);

        let mut cmd = Command::new(program);
        cmd.args(&spec.argv[1..]).env_clear().current_dir(cwd);
        for e in &env {
            if let Some((k, v)) = e.split_once('=') {
                cmd.env(k, v);
            }
        }

        let io = |e: io::Error| fail(format!("setting up the process's stdio: {e}"));
        let mut proc = Process {
            pid: 0,
            stdout: None,
            stderr: None,
            stdin: None,
            pty: None,
        };
        let tty = spec.tty && channel;
        if tty {
            let (rows, cols) = size.unwrap_or((24, 80));
            let (master, slave) = sys::openpty(rows, cols).map_err(io)?;
            sys::set_nonblocking(master.as_raw_fd()).map_err(io)?;
            cmd.stdin(Stdio::from(slave.try_clone().map_err(io)?))
                .stdout(Stdio::from(slave.try_clone().map_err(io)?))
                .stderr(Stdio::from(slave));
            proc.pty = Some(master.as_raw_fd());
            proc.stdin = Some(master.try_clone().map_err(io)?);
            proc.stdout = Some(master);
        } else if channel {
            let (out_r, out_w) = sys::pipe().map_err(io)?;
            let (err_r, err_w) = sys::pipe().map_err(io)?;
            sys::set_nonblocking(out_r.as_raw_fd()).map_err(io)?;
            sys::set_nonblocking(err_r.as_raw_fd()).map_err(io)?;
            cmd.stdout(Stdio::from(out_w)).stderr(Stdio::from(err_w));
            proc.stdout = Some(out_r);
            proc.stderr = Some(err_r);
            if spec.stdin {
                let (in_r, in_w) = sys::pipe().map_err(io)?;
                sys::set_nonblocking(in_w.as_raw_fd()).map_err(io)?;
                cmd.stdin(Stdio::from(in_r));
                proc.stdin = Some(in_w);
            } else {
                cmd.stdin(Stdio::null());
            }
        } else {
            // Console fallback: the process writes to the serial console
            // directly (stdout and stderr mixed).
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
            cmd.stdin(if spec.stdin {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        }

        let (uid, gid, groups) = (who.uid, who.gid, who.groups.clone());
        // SAFETY: the closure runs in the forked child before exec and calls
        // only async-signal-safe functions (signal(7)): sigprocmask, setsid,
        // ioctl, setgroups, setgid, setuid. It allocates nothing: `groups` was
        // built before the fork and is only read.
        unsafe {
            cmd.pre_exec(move || {
                // std resets the mask too; being explicit costs one syscall.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => {
                proc.pid = child.id() as libc::pid_t;
                // The child is reaped by `crate::exec::reap_next`; `Child` is dropped
                // without waiting, which std allows.
                drop(child);
                Ok(proc)
            }
            Err(e) => Err((
                spawn_failure_status(e.kind()),
                format!("cannot run {program:?}: {e}"),
            )),
        }
    }

    /// PID 1's loop until the main process is gone and its output drained.
    ///
    /// With a `listener`, a control channel that ends while the process runs
    /// (a restore's vsock transport reset) detaches the process rather than
    /// sending its output to the console: the output is held (up to
    /// [`DETACHED_BACKLOG`], then the process waits on its pipes) until a host
    /// connects again and says Hello and Attach, and then goes to that host.
    /// A process that ends while detached waits up to [`HOST_CONNECT_TIMEOUT`]
    /// for the host to attach, so that its output and status reach it.
    fn supervise(
        &mut self,
        sigfd: RawFd,
        listener: Option<&OwnedFd>,
        chan: &mut Option<Channel>,
        stream: u32,
        (mut stdin_pending, mut watch_listen): (Vec<u8>, bool),
    ) -> ExitStatus {
        let mut status: Option<ExitStatus> = None;
        let mut drain_deadline: Option<Instant> = None;
        let mut next_beat = Instant::now() + HEARTBEAT_EVERY;
        let mut next_scan = Instant::now();
        let mut seq = 0u64;
        let mut stdin_eof = false;
        let mut buf = vec![0u8; 64 * 1024];
        let mut held = Held::default();
        // A connection accepted while detached that has not said Attach yet.
        let mut joining: Option<(Channel, bool)> = None;
        let mut attach_deadline: Option<Instant> = None;
        loop {
            if drain_deadline.is_some_and(|d| Instant::now() >= d) {
                self.stdout = None;
                self.stderr = None;
            }
            if status.is_some() && self.stdout.is_none() && self.stderr.is_none() {
                if !held.detached {
                    break;
                }
                let d =
                    *attach_deadline.get_or_insert_with(|| Instant::now() + HOST_CONNECT_TIMEOUT);
                if Instant::now() >= d {
                    fail!("no host attached within {HOST_CONNECT_TIMEOUT:?} of the process's end; its held output goes to the console");
                    held.spill_to_console();
                    break;
                }
            }
            let chan_fd = chan.as_ref().filter(|c| c.alive()).map(Channel::fd);
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(7);
            let mut push = |fd: Option<RawFd>, events: libc::c_short| {
                let i = fds.len();
                fds.push(libc::pollfd {
                    fd: fd.unwrap_or(-1),
                    events,
                    revents: 0,
                });
                i
            };
            let i_sig = push(Some(sigfd), libc::POLLIN);
            // A detached process whose held output is full waits on its pipes.
            let output_events = if held.bytes < DETACHED_BACKLOG {
                libc::POLLIN
            } else {
                0
            };
            let i_out = push(self.stdout.as_ref().map(AsRawFd::as_raw_fd), output_events);
            let i_err = push(self.stderr.as_ref().map(AsRawFd::as_raw_fd), output_events);
            let chan_events = if stdin_pending.len() < STDIN_BACKLOG {
                libc::POLLIN
            } else {
                0
            };
            let i_chan = push(chan_fd, chan_events);
            let stdin_fd = self
                .stdin
                .as_ref()
                .map(AsRawFd::as_raw_fd)
                .filter(|_| !stdin_pending.is_empty());
            let i_in = push(stdin_fd, libc::POLLOUT);
            let accepting = listener
                .filter(|_| held.detached && joining.is_none())
                .map(AsRawFd::as_raw_fd);
            let i_listen = push(accepting, libc::POLLIN);
            let i_join = push(joining.as_ref().map(|(c, _)| c.fd()), libc::POLLIN);
            let now = Instant::now();
            let mut wait = next_beat.saturating_duration_since(now);
            for d in [drain_deadline, attach_deadline]
                .into_iter()
                .flatten()
                .chain(watch_listen.then_some(next_scan))
            {
                wait = wait.min(d.saturating_duration_since(now));
            }
            if let Err(e) = sys::poll(&mut fds, wait) {
                fail!("poll: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }

            if fds[i_sig].revents != 0 {
                while let Some(signo) = sys::read_signal(sigfd) {
                    if signo == libc::SIGCHLD as u32 {
                        while let Some((pid, raw)) = crate::exec::reap_next() {
                            if pid == self.pid && status.is_none() {
                                status = decode_wait_status(raw);
                                if status.is_some() {
                                    crate::exec::set_main_running(false);
                                    // The container ends with its main process, as
                                    // with docker: kill everything else (kill(2):
                                    // -1 spares the caller, PID 1).
                                    let _ = sys::kill(-1, libc::SIGKILL);
                                    drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT);
                                }
                            }
                        }
                    } else if status.is_none() {
                        let _ = sys::kill(self.pid, signo as libc::c_int);
                    }
                }
            }
            for (i, is_err) in [(i_out, false), (i_err, true)] {
                if fds[i].revents == 0 {
                    continue;
                }
                let slot = if is_err {
                    &mut self.stderr
                } else {
                    &mut self.stdout
                };
                let Some(fd) = slot.as_ref().map(AsRawFd::as_raw_fd) else {
                    continue;
                };
                match sys::read(fd, &mut buf) {
                    Ok(0) => *slot = None,
                    Ok(n) => held.forward(chan, listener.is_some(), stream, is_err, &buf[..n]),
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted => {}
                    // EIO: the pty's last slave closed.
                    Err(_) => *slot = None,
                }
                if slot.is_none() && !is_err && self.pty.is_some() {
                    self.pty = None;
                    self.stdin = None;
                }
            }
            if fds[i_chan].revents != 0 {
                if let Some(c) = chan.as_mut() {
                    match c.receive() {
                        Incoming::Frames(frames) => {
                            for f in frames {
                                match f {
                                    Ok(f) if matches!(f.message, Message::WatchListen) => {
                                        watch_listen = true;
                                    }
                                    Ok(f) => self.process_message(
                                        c,
                                        stream,
                                        f.stream,
                                        f.message,
                                        &mut stdin_pending,
                                        &mut stdin_eof,
                                    ),
                                    Err(e) => {
                                        let _ = c.send(
                                            CONTROL_STREAM,
                                            &Message::Error {
                                                message: e.to_string(),
                                            },
                                        );
                                    }
                                }
                            }
                        }
                        Incoming::Closed | Incoming::Broken(_) if listener.is_some() => {
                            held.detach(chan);
                        }
                        Incoming::Closed => {
                            fail!("the host closed the control channel; output goes to the console")
                        }
                        Incoming::Broken(e) => {
                            fail!("control channel broken ({e}); output goes to the console")
                        }
                    }
                }
            }
            if fds[i_listen].revents != 0 {
                if let Some(l) = listener {
                    match agent::accept(l, Duration::from_millis(1)) {
                        Ok(Some(sock)) => joining = Some((Channel::new(sock), false)),
                        Ok(None) => {}
                        Err(e) => fail!("accepting a host connection: {e}"),
                    }
                }
            }
            if fds[i_join].revents != 0 {
                if let Some((mut c, mut greeted)) = joining.take() {
                    match join(&mut c, &mut greeted, stream, &mut watch_listen) {
                        Join::Pending => joining = Some((c, greeted)),
                        Join::Gone => {}
                        Join::Attached => {
                            if held.flush_to(&mut c, stream) {
                                *chan = Some(c);
                                attach_deadline = None;
                            }
                        }
                    }
                }
            }
            if fds[i_in].revents != 0 {
                if let Some(fd) = self.stdin.as_ref().map(AsRawFd::as_raw_fd) {
                    match sys::write(fd, &stdin_pending) {
                        Ok(n) => {
                            stdin_pending.drain(..n);
                        }
                        Err(e)
                            if e.kind() == io::ErrorKind::WouldBlock
                                || e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            stdin_pending.clear();
                            if self.pty.is_none() {
                                self.stdin = None;
                            }
                        }
                    }
                }
            }
            if stdin_eof && stdin_pending.is_empty() && self.pty.is_none() {
                self.stdin = None;
            }
            if watch_listen && Instant::now() >= next_scan {
                next_scan = Instant::now() + LISTEN_SCAN_EVERY;
                let ports = listening_ports();
                if !ports.is_empty() {
                    watch_listen = false;
                    if let Some(c) = chan.as_mut().filter(|c| c.alive()) {
                        for port in ports {
                            let _ = c.send(CONTROL_STREAM, &Message::Listening { port });
                        }
                    }
                }
            }
            if Instant::now() >= next_beat {
                next_beat = Instant::now() + HEARTBEAT_EVERY;
                seq += 1;
                if let Some(c) = chan.as_mut().filter(|c| c.alive()) {
                    let _ = c.send(CONTROL_STREAM, &Message::Heartbeat { seq });
                }
            }
        }
        // Reap what the SIGKILL left behind, without blocking; exec'd
        // processes among them are reported to their hosts.
        while crate::exec::reap_next().is_some() {}
        // A status is always set unless the drain deadline hit before SIGCHLD
        // arrived, which cannot happen: the deadline starts at the status.
        status.unwrap_or(ExitStatus::Code(STATUS_CONTAINER_INIT_FAILED as i32))
    }

    fn process_message(
        &mut self,
        chan: &mut Channel,
        main_stream: u32,
        stream: u32,
        message: Message,
        stdin_pending: &mut Vec<u8>,
        stdin_eof: &mut bool,
    ) {
        let for_main = stream == main_stream;
        match message {
            Message::Stdin(d) if for_main => {
                if self.stdin.is_some() && !*stdin_eof {
                    stdin_pending.extend_from_slice(&d);
                }
            }
            Message::StdinEof if for_main => *stdin_eof = true,
            Message::Signal { signo } if for_main => {
                if (1..=64).contains(&signo) {
                    let _ = sys::kill(self.pid, signo);
                } else {
                    let _ = chan.send(
                        stream,
                        &Message::Error {
                            message: format!("invalid signal number {signo}"),
                        },
                    );
                }
            }
            Message::Resize { rows, cols } if for_main => {
                if let Some(fd) = self.pty {
                    let _ = sys::set_winsize(fd, rows, cols);
                    // The kernel sends SIGWINCH to the foreground group.
                }
            }
            other if stream == CONTROL_STREAM => control_message(chan, other),
            other => {
                let _ = chan.send(
                    stream,
                    &Message::Error {
                        message: format!("unexpected {:?} on stream {stream}", other.kind()),
                    },
                );
            }
        }
    }
}

/// A detached process's output, held for the next host that attaches.
#[derive(Default)]
struct Held {
    /// The control channel ended mid-process and a listener awaits the next.
    detached: bool,
    /// Output in the order it came: (stderr?, bytes).
    chunks: std::collections::VecDeque<(bool, Vec<u8>)>,
    bytes: usize,
}

impl Held {
    /// Sends output to the host; holds it while detached (or once sending
    /// fails, when a host can attach again); else to the console.
    fn forward(
        &mut self,
        chan: &mut Option<Channel>,
        can_attach: bool,
        stream: u32,
        stderr: bool,
        data: &[u8],
    ) {
        if !self.detached {
            if let Some(c) = chan.as_mut().filter(|c| c.alive()) {
                if c.send_output(stream, stderr, data).is_ok() {
                    return;
                }
                if can_attach {
                    self.detach(chan);
                }
            }
        }
        if self.detached {
            self.bytes += data.len();
            self.chunks.push_back((stderr, data.to_vec()));
        } else {
            sys::write_all_lossy(if stderr { 2 } else { 1 }, data);
        }
    }

    /// The host's connection is gone; output waits for the next one.
    fn detach(&mut self, chan: &mut Option<Channel>) {
        if !self.detached {
            fail!("the host's connection ended while the process runs (a restore resets it); its output is held for the next host to attach");
        }
        self.detached = true;
        *chan = None;
    }

    /// Sends what is held to the host that attached on `c`; `false` (with the
    /// rest still held) when that fails.
    fn flush_to(&mut self, c: &mut Channel, stream: u32) -> bool {
        while let Some((stderr, data)) = self.chunks.front() {
            if c.send_output(stream, *stderr, data).is_err() {
                return false;
            }
            self.bytes -= data.len();
            self.chunks.pop_front();
        }
        self.detached = false;
        true
    }

    /// No host came: what is held goes where unattached output goes.
    fn spill_to_console(&mut self) {
        for (stderr, data) in self.chunks.drain(..) {
            sys::write_all_lossy(if stderr { 2 } else { 1 }, &data);
        }
        self.bytes = 0;
    }
}

/// A decoded frame, or `None` after telling the host (`Error`) that its
/// payload did not decode (the stream is still at a frame boundary).
fn report_undecodable(
    c: &mut Channel,
    frame: Result<agent_protocol::Frame, agent_protocol::MessageError>,
) -> Option<agent_protocol::Frame> {
    match frame {
        Ok(f) => Some(f),
        Err(e) => {
            let _ = c.send(
                CONTROL_STREAM,
                &Message::Error {
                    message: e.to_string(),
                },
            );
            None
        }
    }
}

/// How a connection that joins a detached process is getting on.
enum Join {
    /// Not attached yet.
    Pending,
    /// It closed (or broke the protocol) before Attach.
    Gone,
    /// It said Hello, then Attach for the process's stream.
    Attached,
}

/// One read of a joining connection: Hello -> Ready, control messages
/// (TimeSync and Entropy, the clone-safety step after a restore), then Attach.
fn join(c: &mut Channel, greeted: &mut bool, stream: u32, watch_listen: &mut bool) -> Join {
    let frames = match c.receive() {
        Incoming::Frames(f) => f,
        Incoming::Closed | Incoming::Broken(_) => return Join::Gone,
    };
    let mut attached = false;
    for frame in frames {
        let Some(frame) = report_undecodable(c, frame) else {
            continue;
        };
        match frame.message {
            Message::Hello { .. } => {
                *greeted = true;
                let _ = c.send(
                    CONTROL_STREAM,
                    &Message::Ready {
                        protocol_version: u16::from(VERSION),
                        agent_version: AGENT_VERSION.into(),
                    },
                );
            }
            Message::Attach if *greeted && frame.stream == stream => attached = true,
            Message::WatchListen => *watch_listen = true,
            m @ (Message::TimeSync { .. }
            | Message::Entropy(_)
            | Message::Heartbeat { .. }
            | Message::Error { .. }) => control_message(c, m),
            other => {
                let _ = c.send(
                    frame.stream,
                    &Message::Error {
                        message: format!(
                            "a process runs in this VM: a new connection says Hello, then Attach on stream {stream} (got {:?} on stream {})",
                            other.kind(),
                            frame.stream
                        ),
                    },
                );
            }
        }
    }
    if attached {
        Join::Attached
    } else {
        Join::Pending
    }
}

/// How often the guest looks for a listening socket once asked to.
const LISTEN_SCAN_EVERY: Duration = Duration::from_millis(10);

/// Output held for a detached process before it waits on its pipes.
const DETACHED_BACKLOG: usize = 1 << 20;

/// TCP ports something listens on in the guest (`/proc/net/tcp` and `tcp6`).
fn listening_ports() -> Vec<u16> {
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for p in parse_listening_ports(&read_optional(table)) {
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
    }
    ports
}

/// The local ports of the LISTEN (`0A`) rows of a `/proc/net/tcp{,6}` table.
fn parse_listening_ports(table: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_are_the_listen_rows_of_proc_net_tcp() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   \
            1: 0100007F:1F90 0100007F:A2C4 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n   \
            2: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0\n";
        assert_eq!(parse_listening_ports(tcp), vec![80, 8081]);
        let tcp6 = "  sl  local_address                         remote_address                        st\n   \
            0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(parse_listening_ports(tcp6), vec![8080]);
        // Garbage rows are skipped, never a panic.
        assert!(parse_listening_ports("header\n0: zz:zz 0 0A\n1:\n\n  2: 1:GGGG 0 0A").is_empty());
    }
}
