//! `supermachine run`: an OCI image to a finished process, as `docker run` does it.
//!
//! 1. The image comes from the store (pulled once, like docker's local images), and
//!    its read-only root filesystem (EROFS, built from the layers) from the cache,
//!    keyed by the manifest digest.
//! 2. A VM boots the guest kernel with supermachine's initramfs in container mode,
//!    the rootfs as the first (read-only) disk and a vsock device; it is captured
//!    once its agent is ready, and later runs of the same VM configuration restore
//!    that snapshot instead of booting (`crate::snapshots`).
//! 3. The host connects to the guest agent on vsock port 1024 through the VMM's
//!    UNIX socket (`CONNECT 1024`), sends the process spec, and copies the
//!    process's stdout and stderr to ours until it exits; that exit status is the
//!    result.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_protocol::{ExitStatus, ProcessSpec, User};
use image::manifest::ImageConfig;
use image::reference::ImageReference;
use image::store::Store;

use crate::{agent, Error, Timings};

/// What to run. Empty/`None` fields take the image's own config.
///
/// A detached VM's supervisor and VMM processes get these as JSON
/// ([`crate::manage::start`]); everything but `interrupt` is carried.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RunOptions {
    /// Image reference (`alpine`, `localhost:5000/busybox:1`, `oci:DIR[:TAG]`,
    /// `docker-archive:FILE`).
    pub image: String,
    /// Replaces the image's Cmd (as `docker run IMAGE CMD...`).
    pub args: Vec<String>,
    /// Replaces the image's Entrypoint (`--entrypoint`; `Some("")` clears it).
    pub entrypoint: Option<String>,
    /// `KEY=VALUE` added to (or replacing in) the image's Env.
    pub env: Vec<String>,
    /// Working directory (`-w`).
    pub workdir: Option<String>,
    /// User (`-u`): `name`, `uid`, `name:group`, `uid:gid`.
    pub user: Option<String>,
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Guest memory in bytes.
    pub memory: Option<u64>,
    /// Verify TLS for registries that are not on loopback.
    pub tls_verify: bool,
    /// Show the guest kernel's console on stderr, at full log level.
    pub console: bool,
    /// Guest kernel (default: the provisioned one).
    pub kernel: Option<PathBuf>,
    /// Extra virtio-blk disks after the image's root filesystem (`/dev/vda`), so
    /// the first is the guest's `/dev/vdb`.
    pub disks: Vec<runner::resources::DiskSpec>,
    /// A virtio-net device; `None` = loopback only (`docker run --network none`).
    pub network: Option<runner::resources::NetSpec>,
    /// A host UNIX socket for the vsock device (`CONNECT <port>` to reach a guest
    /// port; guest connections to host port P go to `<path>_<P>`); `None` = none
    /// (the host reaches the agent through the device itself).
    pub vsock_uds: Option<PathBuf>,
    /// Stops the run when triggered (the CLI triggers it on SIGINT/SIGTERM); the
    /// run then returns [`Error::Interrupted`]. Not carried to another
    /// process: a detached VM's VMM stops on its own signals.
    #[serde(skip)]
    pub interrupt: Option<crate::Interrupt>,
    /// How long the guest may take to answer on its agent channel; `None` = 600 s.
    pub agent_timeout: Option<Duration>,
    /// Confine the VMM once the VM is built (`runner::sandbox`); `None` (the
    /// library's default) runs without. It confines the calling thread too.
    pub sandbox: Option<crate::SandboxMode>,
    /// Neither restore this configuration's ready snapshot nor capture one:
    /// boot, as every run did before snapshots (`--no-snapshot`).
    pub no_snapshot: bool,
    /// Capture the VM mid-process when its trigger fires (`--snapshot-out`):
    /// the run boots (no ready snapshot) and, unless the capture leaves it
    /// running, ends there; `run` then returns 0. `Trigger::After` counts from
    /// the process's start.
    pub capture: Option<crate::Capture>,
    /// Published ports (`-p`): host listeners whose connections reach guest
    /// TCP ports over vsock. Bound before anything is pulled or booted.
    pub publish: Vec<crate::Publish>,
    /// Also publish every TCP port in the image's `ExposedPorts` on a free
    /// port of 127.0.0.1 (`-P`), each printed on stderr.
    pub publish_all: bool,
    /// Restore this snapshot of a VM captured mid-process and carry on its
    /// process (`--restore`): no image is pulled, and the process's output
    /// from the capture on and its exit status are the run's. `image`, `args`
    /// and the VM options are the snapshot's own and not used.
    pub restore: Option<PathBuf>,
    /// A name for the VM (`--name`): `exec NAME`, `stop NAME`... reach it
    /// through its control socket in the runtime directory
    /// (`crate::vms::runtime_dir`). Claimed before anything is pulled.
    pub name: Option<String>,
    /// `run -d`: the VM's entry stays in the registry after its end, until
    /// `rm` (a foreground run's goes with it). The caller is the supervisor
    /// and sends the output where `logs` finds it.
    pub detached: bool,
    /// `--restart` (with `detached`): the supervisor runs the VM again when
    /// its process ends (see [`crate::manage::RestartPolicy`]); a `stop`
    /// ends it for good.
    pub restart: crate::manage::RestartPolicy,
    /// `--egress-allow`: with any, the guest reaches only what these rules
    /// allow (`CIDR[:PORT[-PORT]]`, `[IPV6-CIDR]:PORT`, `dns`).
    pub egress_allow: Vec<String>,
    /// `--egress-deny`: destinations the guest never reaches.
    pub egress_deny: Vec<String>,
    /// Terminate TLS on the published ports with this PEM certificate chain
    /// and key (`--tls-cert`, `--tls-key`): the ports marked `/tls`, or every
    /// TCP one when none is marked.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Forward stdin to the process (`-i`).
    pub interactive: bool,
    /// Run the process on a pseudo-terminal (`-t`); with `interactive`, this
    /// terminal is in raw mode while it runs.
    pub tty: bool,
}

/// An image ready to boot: its store record and its root filesystem image.
#[derive(Clone, Debug)]
pub struct PreparedImage {
    /// The normalised reference.
    pub reference: String,
    /// Manifest digest (`sha256:...`).
    pub digest: String,
    /// The runtime config.
    pub config: ImageConfig,
    /// The EROFS root filesystem.
    pub rootfs: PathBuf,
}

/// The image store in the user's cache.
pub fn store() -> Result<Store, Error> {
    Ok(Store::open(crate::cache()?.store())?)
}

/// Pulls `reference` into the store (always, verifying every blob) and builds its
/// root filesystem if it is not cached yet.
pub fn pull(reference: &str, tls_verify: bool) -> Result<PreparedImage, Error> {
    let r = ImageReference::parse(reference)?;
    let store = store()?;
    let mut opts = image::source::PullOptions::default();
    opts.registry.tls_verify = tls_verify;
    let bar = TerminalProgress::new(reference);
    if let Some(b) = &bar {
        opts.progress = Some(image::source::ProgressHook(b.clone()));
    }
    let pulled = image::source::pull(&r, &store, &opts).map_err(|source| Error::Pull {
        reference: reference.to_string(),
        source,
    });
    if let Some(b) = &bar {
        b.bar.finish_and_clear();
    }
    let pulled = pulled?;
    prepare(
        &store,
        pulled.reference,
        pulled.manifest_digest.to_string(),
        pulled.config,
        &pulled.layers,
    )
}

/// The image from the store if it was pulled before (no network, as `docker run`
/// uses a local image), else pulled now.
pub fn ensure_image(reference: &str, tls_verify: bool) -> Result<PreparedImage, Error> {
    let r = ImageReference::parse(reference)?;
    let key = image::source::record_key(&r);
    let store = store()?;
    match store.image(&key) {
        Ok(rec) => prepare(
            &store,
            rec.reference,
            rec.manifest_digest.to_string(),
            rec.config,
            &rec.layers,
        ),
        Err(_) => pull(reference, tls_verify),
    }
}

/// A progress bar over an image's layers, drawn only when stderr is a terminal.
#[derive(Debug)]
struct TerminalProgress {
    bar: indicatif::ProgressBar,
}

impl TerminalProgress {
    fn new(reference: &str) -> Option<Arc<Self>> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "pulling {msg} [{bar:30}] {bytes}/{total_bytes}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(reference.to_string());
        Some(Arc::new(Self { bar }))
    }
}

impl image::source::PullProgress for TerminalProgress {
    fn layer(&self, _index: usize, _count: usize, size: u64, done: bool) {
        if done {
            self.bar.inc(size);
        } else {
            self.bar.inc_length(size);
        }
    }
}

/// Names the memory, in MiB, an image's file tree may take while it is converted
/// (default 48, about 285,000 files): the one knob for images with more files.
pub const TREE_LIMIT_ENV: &str = "SUPERMACHINE_MAX_TREE_MIB";

/// The limits layers are converted under: the defaults, with the tree budget
/// from [`TREE_LIMIT_ENV`] when it is set to a number.
fn image_limits() -> image::tar_guard::Limits {
    let mut limits = image::tar_guard::Limits::default();
    if let Ok(v) = std::env::var(TREE_LIMIT_ENV) {
        match v.trim().parse::<u64>() {
            Ok(mib) if mib > 0 => limits.max_tree_bytes = mib.saturating_mul(1 << 20),
            _ => eprintln!(
                "supermachine: warning: {TREE_LIMIT_ENV}={v} is not a positive number of MiB; \
                 using {} MiB",
                limits.max_tree_bytes >> 20
            ),
        }
    }
    limits
}

/// Where the root filesystem of the image with manifest `digest` is cached.
pub fn rootfs_path(digest: &str) -> Result<PathBuf, Error> {
    let hex = digest.trim_start_matches("sha256:");
    Ok(crate::cache()?.rootfs().join(format!("{hex}.erofs")))
}

fn prepare(
    store: &Store,
    reference: String,
    digest: String,
    config: ImageConfig,
    layers: &[image::source::Layer],
) -> Result<PreparedImage, Error> {
    let rootfs = rootfs_path(&digest)?;
    if let Some(dir) = rootfs.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::CacheDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    if !rootfs.is_file() {
        let layers: Vec<image::flatten::Layer> = layers
            .iter()
            .map(|l| image::flatten::Layer {
                path: store.blob_path(&l.digest),
                compression: l.compression,
            })
            .collect();
        let limits = image_limits();
        image::erofs::build_rootfs(&layers, &rootfs, limits).map_err(|source| {
            let too_big = matches!(
                &source,
                image::erofs::RootfsError::Layer(l) if matches!(
                    l.source,
                    image::flatten::FlattenError::Limit(
                        image::tar_guard::LimitError::TreeTooLarge { .. }
                    )
                )
            );
            if too_big {
                Error::RootfsTooBig {
                    reference: reference.clone(),
                    limit_mib: limits.max_tree_bytes >> 20,
                    source,
                }
            } else {
                Error::Rootfs {
                    reference: reference.clone(),
                    source,
                }
            }
        })?;
    }
    Ok(PreparedImage {
        reference,
        digest,
        config,
        rootfs,
    })
}

/// The process docker would start for `cfg` with `opts`' overrides.
pub fn process_spec(cfg: &ImageConfig, opts: &RunOptions) -> Result<ProcessSpec, Error> {
    let entrypoint: Vec<String> = match &opts.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => cfg.entrypoint.clone().unwrap_or_default(),
    };
    // docker: CLI args replace Cmd; a new --entrypoint drops the image's Cmd.
    let cmd: Vec<String> = if !opts.args.is_empty() {
        opts.args.clone()
    } else if opts.entrypoint.is_some() {
        Vec::new()
    } else {
        cfg.cmd.clone().unwrap_or_default()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(Error::Usage(
            "the image has no Entrypoint or Cmd: give a command to run".into(),
        ));
    }
    let mut env = cfg.env.clone();
    for kv in &opts.env {
        let key = kv.split('=').next().unwrap_or(kv);
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(kv.clone());
    }
    Ok(ProcessSpec {
        argv,
        env,
        cwd: opts
            .workdir
            .clone()
            .or_else(|| cfg.working_dir.clone())
            .unwrap_or_default(),
        user: User::Name(
            opts.user
                .clone()
                .or_else(|| cfg.user.clone())
                .unwrap_or_default(),
        ),
        tty: opts.tty,
        stdin: opts.interactive,
    })
}

/// How long the host keeps trying to reach the guest agent unless told
/// (`RunOptions::agent_timeout`): a boot under nested emulation takes seconds.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the guest may take to power off after its process exited and the
/// host closed the agent connection, before the VMM stops it. A guest powers off
/// in milliseconds on hardware and in a few seconds under nested emulation; one
/// that does not is stuck (seen: a guest kernel spinning in its shutdown path),
/// and `run` must not wait for it forever: the process's status is known.
const POWER_OFF_GRACE: Duration = Duration::from_secs(20);

/// Opens the control channel: connects to guest vsock `port` through the VM's
/// in-process vsock device and says Hello, again while the guest agent is not
/// listening yet (docs/agent-protocol.md: the host retries every few
/// milliseconds), until `deadline` or the end of the VM.
fn connect_agent(
    vsock: &runner::virtio::VsockHandle,
    port: u32,
    deadline: Instant,
    vm: &runner::vmm::StopHandle,
) -> Result<agent::AgentConn<std::os::unix::net::UnixStream>, String> {
    use agent::HelloError;
    while Instant::now() < deadline && !vm.is_ending() {
        let conn = vsock
            .connect(port)
            .map_err(|e| format!("cannot open a vsock connection to the guest: {e}"))?;
        // A guest that accepts but never answers must not hold us, nor one whose
        // vsock driver never comes up (the connection then waits, unanswered):
        // never past the deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = conn.set_read_timeout(Some(HELLO_TIMEOUT.min(left).max(AGENT_RETRY)));
        match agent::AgentConn::hello(conn) {
            Ok(a) => {
                let _ = a.get_ref().set_read_timeout(None);
                return Ok(a);
            }
            Err(HelloError::NotListening) => std::thread::sleep(AGENT_RETRY),
            // Unanswered for the Hello timeout (a guest whose vsock driver is
            // not up yet leaves the request waiting; under nested emulation
            // that can outlast it): ask again on a new connection, until the
            // deadline. A read timeout may also fire a hair before the deadline.
            Err(HelloError::Agent(agent::AgentError::Io(e)))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(HelloError::Agent(e)) => return Err(crate::error_chain(&e)),
        }
    }
    if vm.is_ending() {
        return Err("the VM ended before its agent answered".into());
    }
    Err("the guest agent did not answer on vsock before the agent timeout".into())
}

/// Between connection attempts while the guest agent is not listening yet.
const AGENT_RETRY: Duration = Duration::from_millis(5);

/// How long an accepted connection may take to answer Hello with Ready.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);

/// Opens each disk as the VM will (read-write unless read-only), so that a typo
/// is reported before anything is pulled or booted.
fn check_disks(disks: &[runner::resources::DiskSpec]) -> Result<(), Error> {
    for d in disks {
        std::fs::File::options()
            .read(true)
            .write(!d.read_only)
            .open(&d.path)
            .map_err(|source| {
                runner::vmm::RunError::from(runner::resources::ResourceError::DiskUnusable {
                    path: d.path.clone(),
                    source,
                })
            })?;
    }
    Ok(())
}

/// Runs `opts.image` to completion. The process's stdout and stderr go to `out`
/// and `err`; returns docker's exit code for it (the status, or 128 + signal).
pub fn run(
    opts: &RunOptions,
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    timings: Arc<Timings>,
) -> Result<i32, Error> {
    // A port in use, or a name another VM holds, fails the run before
    // anything is pulled or booted.
    check(opts)?;
    let bound = bind(opts)?;
    let vm = Arc::new(register(opts)?);
    finish(&vm, run_in(opts, bound, &vm, (out, err), timings))
}

/// One run of a detached VM, in the VMM process its supervisor started
/// ([`crate::manage::supervise`]) with the registration it holds: binds the
/// published ports and runs the VM to its end, recording it.
pub fn run_for_supervisor(
    opts: &RunOptions,
    vm: crate::vms::Registration,
    (out, err): (Box<dyn Write + Send>, Box<dyn Write + Send>),
    timings: Arc<Timings>,
) -> Result<i32, Error> {
    let vm = Arc::new(vm);
    let r = check(opts)
        .and_then(|()| bind(opts))
        .and_then(|bound| run_in(opts, bound, &vm, (out, err), timings));
    finish(&vm, r)
}

/// What can be told wrong about `opts` before anything is pulled.
pub fn check(opts: &RunOptions) -> Result<(), Error> {
    crate::egress::check(&opts.egress_allow, &opts.egress_deny)?;
    let has_rules = !(opts.egress_allow.is_empty() && opts.egress_deny.is_empty());
    if has_rules && opts.network.is_none() && opts.restore.is_none() {
        return Err(Error::Usage(
            "--egress-allow/--egress-deny need a network (the VM has none with --network none)"
                .into(),
        ));
    }
    Ok(())
}

/// The published ports' host ends (and the TLS pair, checked).
fn bind(opts: &RunOptions) -> Result<crate::publish::Bound, Error> {
    let tls = match &opts.tls {
        Some((cert, key)) => Some(crate::tls::TlsConfig::load(cert, key)?),
        None => None,
    };
    crate::publish::Bound::bind(&opts.publish, tls)
}

/// Registers the VM `opts` describes, with its egress rules.
pub fn register(opts: &RunOptions) -> Result<crate::vms::Registration, Error> {
    let vm = crate::vms::Registration::create(crate::vms::VmConfig {
        name: opts.name.clone(),
        image: match &opts.restore {
            Some(p) => p.display().to_string(),
            None => opts.image.clone(),
        },
        command: opts.args.clone(),
        ports: opts.publish.iter().map(crate::Publish::ps_form).collect(),
        detached: opts.detached,
        restart: opts.restart.to_string(),
        ..crate::vms::VmConfig::default()
    })?;
    vm.update(|s| {
        s.egress_allow.clone_from(&opts.egress_allow);
        s.egress_deny.clone_from(&opts.egress_deny);
    });
    Ok(vm)
}

/// Tells the user the free ports the run was given, and records every
/// bound port for `ps` and `inspect`.
fn announce(bound: &crate::publish::Bound, vm: &crate::vms::Registration) {
    bound.announce();
    let ports = bound.ps_forms();
    vm.update(|s| s.ports = ports);
}

/// Records the run's end in the registry.
fn finish(vm: &crate::vms::Registration, r: Result<i32, Error>) -> Result<i32, Error> {
    match &r {
        Ok(code) => vm.exited(Some(*code), None),
        Err(e) => vm.failed(crate::error_chain(e)),
    }
    r
}

fn run_in(
    opts: &RunOptions,
    mut bound: crate::publish::Bound,
    vm: &Arc<crate::vms::Registration>,
    (out, err): (Box<dyn Write + Send>, Box<dyn Write + Send>),
    timings: Arc<Timings>,
) -> Result<i32, Error> {
    if opts.tty && opts.interactive && !std::io::stdin().is_terminal() {
        return Err(Error::Usage(
            "the input device is not a TTY: -t with -i needs a terminal on stdin \
             (drop -t to pipe input)"
                .into(),
        ));
    }
    if let Some(path) = &opts.restore {
        announce(&bound, vm);
        let reach = Reach {
            published: Arc::new(bound),
            vm: vm.clone(),
            main: crate::exec::MainSlot::default(),
            stdio: None,
        };
        return run_restored(opts, path, &reach, (out, err), timings);
    }
    // The user's own disks are checked before an image is pulled for nothing.
    check_disks(&opts.disks)?;
    let img = ensure_image(&opts.image, opts.tls_verify)?;
    if let Some(signal) = opts.interrupt.as_ref().and_then(crate::Interrupt::signal) {
        return Err(Error::Interrupted { signal });
    }
    if opts.publish_all {
        let (extra, skipped) = crate::publish::exposed(&img.config.exposed_ports, &opts.publish);
        if !skipped.is_empty() {
            eprintln!(
                "supermachine: warning: -P publishes TCP ports only; not published: {}",
                skipped.join(", ")
            );
        }
        bound.bind_more(&extra)?;
    }
    announce(&bound, vm);
    // The terminal goes raw, and its size changes are followed, before the
    // sandbox (which allows neither to start) and before the guest runs.
    let main = crate::exec::MainSlot::default();
    let (_raw, stdio) = terminal_for(opts, &main)?;
    let reach = Reach {
        published: Arc::new(bound),
        vm: vm.clone(),
        main,
        stdio,
    };
    timings.phase("image_ready");
    let stop_signal = img
        .config
        .stop_signal
        .as_deref()
        .and_then(|s| crate::manage::parse_signal(s).ok());
    vm.update(|s| s.stop_signal = stop_signal);
    let spec = process_spec(&img.config, opts)?;
    let res = vm_resources(opts, &img)?;
    timings.phase("resources_ready");

    if opts.capture.is_some() {
        crate::check_capturable(&res)?;
    }
    let begin = agent::Begin::Start {
        spec,
        watch_listen: opts
            .capture
            .as_ref()
            .is_some_and(|c| c.trigger == crate::Trigger::Listen),
        size: opts.tty.then(crate::terminal::size).flatten(),
    };

    // A VM of this configuration that ran before left its ready snapshot:
    // restore it instead of booting (docs/architecture.md, "run snapshots").
    // A run captured mid-process boots: its snapshot is of a VM that booted
    // for it, never one restored from another file.
    let snapshot = if opts.no_snapshot || opts.capture.is_some() {
        None
    } else {
        crate::snapshots::for_run(&img, &res)?
    };
    let mut io = (out, err);
    if let Some(path) = &snapshot {
        if let Some(snap) = crate::snapshots::open_matching(path, &res) {
            timings.phase("snapshot_opened");
            match launch(
                opts,
                &res,
                Start::Restore(&snap),
                begin.clone(),
                &reach,
                io,
                timings.clone(),
            )? {
                Launched::Done(code) => return Ok(code),
                Launched::NotReady { why, out, err } => {
                    eprintln!(
                        "supermachine: warning: the VM restored from {} did not get ready ({why}); \
                         booting afresh and capturing a new snapshot",
                        path.display()
                    );
                    let _ = std::fs::remove_file(path);
                    io = (out, err);
                }
            }
        }
    }
    let start = Start::Boot {
        ready_capture: snapshot.as_deref(),
    };
    match launch(opts, &res, start, begin, &reach, io, timings)? {
        Launched::Done(code) => Ok(code),
        // Only a restore is retried; a boot's failures are errors above.
        Launched::NotReady { why, .. } => Err(Error::Usage(why)),
    }
}

/// `run --restore PATH`: restores a VM captured mid-process and carries on its
/// process to its end.
fn run_restored(
    opts: &RunOptions,
    path: &std::path::Path,
    reach: &Reach,
    io: (Box<dyn Write + Send>, Box<dyn Write + Send>),
    timings: Arc<Timings>,
) -> Result<i32, Error> {
    let snap = crate::open_snapshot(path, &timings)?;
    let res = snap.resources().clone();
    match launch(
        opts,
        &res,
        Start::Restore(&snap),
        agent::Begin::Attach,
        reach,
        io,
        timings,
    )? {
        Launched::Done(code) => Ok(code),
        Launched::NotReady { why, .. } => Err(Error::NotAttached {
            path: path.to_path_buf(),
            why,
        }),
    }
}

/// The VM `run` needs for `img`: the guest kernel and initramfs in container
/// mode, the image's root filesystem as the first (read-only) disk, the user's
/// disks after it, the network, and a vsock device for the agent.
pub fn vm_resources(opts: &RunOptions, img: &PreparedImage) -> Result<crate::VmResources, Error> {
    let cfg = crate::BootConfig {
        kernel: opts.kernel.clone(),
        initrd: None,
        cmdline: None,
        memory: opts.memory,
        cpus: opts.cpus,
        disks: Vec::new(),
        network: opts.network.clone(),
        vsock: None,
        sandbox: opts.sandbox,
        capture: None,
    };
    let mut res = crate::resolve(&cfg)?;
    {
        use agent_protocol::cmdline::{append, Agent, Arg, Mode};
        append(
            &mut res.cmdline,
            &[Arg::Mode(Mode::Container), Arg::Agent(Agent::Vsock)],
        );
    }
    if opts.console {
        // Whoever asks for the console wants all of it: `quiet` hides warnings and
        // the call traces that follow them (a later loglevel= wins).
        res.cmdline.push_str(" loglevel=7");
    }
    res.disks = vec![runner::resources::DiskSpec {
        path: img.rootfs.clone(),
        read_only: true,
    }];
    res.disks.extend(opts.disks.iter().cloned());
    res.vsock = Some(runner::resources::VsockSpec {
        cid: crate::DEFAULT_GUEST_CID,
        // The host reaches the agent through the device itself; a socket on
        // the filesystem only when the user asks for one.
        uds_path: opts.vsock_uds.clone(),
    });
    Ok(res)
}

/// How the host reaches a run's VM besides its main process's output:
/// published ports, its registration's control socket, the main process's
/// side of the agent connection (signals, stdin, the terminal's size once it
/// started), and `-i`/`-t`.
struct Reach {
    published: Arc<crate::publish::Bound>,
    vm: Arc<crate::vms::Registration>,
    main: crate::exec::MainSlot,
    stdio: Option<Stdio>,
}

/// `-i` and `-t`: whether stdin is forwarded once the process started.
#[derive(Clone)]
struct Stdio {
    interactive: bool,
}

/// Raw mode and the SIGWINCH thread for `-t` (raw only with `-i`); the
/// guard restores the terminal when dropped.
fn terminal_for(
    opts: &RunOptions,
    main: &crate::exec::MainSlot,
) -> Result<(Option<crate::terminal::Raw>, Option<Stdio>), Error> {
    if !opts.tty && !opts.interactive {
        return Ok((None, None));
    }
    let stdio = Stdio {
        interactive: opts.interactive,
    };
    if opts.tty {
        let slot = main.clone();
        crate::terminal::on_resize(move |rows, cols| {
            let w = slot.lock().ok().and_then(|w| w.clone());
            if let Some(w) = w {
                crate::exec::send(
                    &w,
                    agent_protocol::MAIN_PROCESS_STREAM,
                    &agent_protocol::Message::Resize { rows, cols },
                );
            }
        });
    }
    let raw = if opts.tty && opts.interactive {
        Some(crate::terminal::Raw::enter(false)?)
    } else {
        None
    };
    Ok((raw, Some(stdio)))
}

/// How a run's VM comes to be.
enum Start<'a> {
    /// Restored from its ready snapshot.
    Restore(&'a runner::vmm::Snapshot),
    /// Booted; captured to `ready_capture` (when given) once its agent is
    /// ready, and as `RunOptions::capture` says.
    Boot {
        ready_capture: Option<&'a std::path::Path>,
    },
}

/// How a launch ended.
enum Launched {
    /// The process ran (or the run failed in a way a fresh boot would not
    /// mend): docker's exit code.
    Done(i32),
    /// A restored VM never got ready for the process (nothing was sent to
    /// it, and it is gone): the caller boots afresh with the same output.
    NotReady {
        why: String,
        out: Box<dyn Write + Send>,
        err: Box<dyn Write + Send>,
    },
}

/// What the agent thread hands back.
struct AgentEnd {
    /// The process's status, or why there is none.
    result: Result<ExitStatus, String>,
    /// Whether the guest agent answered at all.
    connected: bool,
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
}

/// How long a restored guest may take to answer its agent channel before the
/// snapshot is given up for a fresh boot: it answers in milliseconds on
/// hardware and in seconds under nested emulation.
const RESTORE_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the agent thread tells the main thread (which captures).
enum AgentNews {
    /// The agent answered Hello; with a ready capture asked for, the agent
    /// thread waits for the capture's end before it goes on.
    Ready,
    /// The process spec and Start (or Attach) are on their way.
    Started,
    /// What the guest reported.
    Guest(agent::Event),
}

/// Builds (or restores) the VM, starts (or attaches to) its process through
/// the agent, and waits for the VM's end.
fn launch(
    opts: &RunOptions,
    res: &crate::VmResources,
    start: Start<'_>,
    begin: agent::Begin,
    reach: &Reach,
    (out, err): (Box<dyn Write + Send>, Box<dyn Write + Send>),
    timings: Arc<Timings>,
) -> Result<Launched, Error> {
    // Unshown, the console is still kept in part: if the VM ends before the
    // process did, its last line (a kernel panic, say) is the best clue there is.
    let tail = ConsoleTail::default();
    let console: Box<dyn Write + Send> = if opts.console {
        Box::new(std::io::stderr())
    } else {
        Box::new(tail.clone())
    };
    let hv = crate::open_hypervisor(&res.kernel)?;
    let clock = timings.clone();
    let (vmm, restored, ready_capture) = match start {
        Start::Restore(snap) => match runner::vmm::Vmm::restore(&hv, snap, console, timings) {
            Ok(vmm) => (vmm, true, None),
            Err(e) => {
                return Ok(Launched::NotReady {
                    why: crate::error_chain(&e),
                    out,
                    err,
                })
            }
        },
        Start::Boot { ready_capture } => (
            runner::vmm::Vmm::build(&hv, res, console, timings)?,
            false,
            ready_capture,
        ),
    };
    // The egress policy in force (the run's, or what `update` set since),
    // on the booted or restored device alike: a snapshot carries none.
    let resolver = res
        .network
        .as_ref()
        .and_then(|n| n.guest)
        .and_then(|g| g.dns)
        .map(std::net::IpAddr::V4);
    let net = crate::egress::NetHandle::find(vmm.virtio_devices(), resolver);
    let (allow, deny) = reach.vm.egress_rules();
    match &net {
        Some(n) => n.set(&allow, &deny)?,
        None if !(allow.is_empty() && deny.is_empty()) => {
            return Err(Error::Usage(
                "--egress-allow/--egress-deny need a network (the VM has none)".into(),
            ))
        }
        None => {}
    }
    // A mid-process capture is of a booted VM (`run` never asks it of one
    // it restored).
    let explicit = opts.capture.as_ref().filter(|_| !restored);
    if let Some(i) = &opts.interrupt {
        i.attach(vmm.stop_handle());
    }
    // Before the agent thread starts (it inherits the confinement) and before
    // the guest runs. The image was pulled and converted above, unconfined,
    // before any guest code existed.
    if let Some(mode) = opts.sandbox {
        // The published UNIX sockets and the name's control socket are
        // removed at the end: their directories, like a snapshot's, stay
        // writable.
        let sockets = reach.published.unix_paths();
        let files = ready_capture
            .into_iter()
            .chain(explicit.map(|c| c.path.as_path()))
            .chain(sockets.iter().map(PathBuf::as_path))
            .chain(std::iter::once(reach.vm.socket()));
        crate::enter_sandbox(&vmm, res, mode, files)?;
    }
    let stop = vmm.stop_handle();
    let vsock = vmm.vsock().ok_or_else(|| {
        Error::Usage("the VM has no vsock device to reach its agent through".into())
    })?;
    let vsock_after = vsock.clone();
    let stdio = reach.stdio.clone();
    let mut publishers = crate::publish::serve(&reach.published, &vsock, &stop)?;
    let main_spec = match &begin {
        agent::Begin::Start { spec, .. } => Some(spec.clone()),
        agent::Begin::Attach => None,
    };
    publishers.push(crate::exec::serve(
        &reach.vm,
        &vsock,
        &stop,
        main_spec,
        reach.main.clone(),
        net.clone(),
    )?);
    let main_slot = reach.main.clone();
    let registration = reach.vm.clone();
    let mut egress_seen = crate::egress::EgressStats::default();
    // Dropped (or sent to) when the VM has ended: the agent thread's grace wait.
    let (vm_ended_tx, vm_ended_rx) = std::sync::mpsc::channel::<()>();
    // The agent's news for the captures, and a ready capture's "done" back:
    // the process spec goes to the guest only after that capture.
    let (news_tx, news_rx) = std::sync::mpsc::channel::<AgentNews>();
    let (captured_tx, captured_rx) = std::sync::mpsc::channel::<()>();
    let wants_ready_capture = ready_capture.is_some();
    let mut agent_timeout = opts.agent_timeout.unwrap_or(AGENT_CONNECT_TIMEOUT);
    if restored {
        agent_timeout = agent_timeout.min(RESTORE_READY_TIMEOUT);
    }
    let agent = {
        std::thread::Builder::new()
            .name("sm-agent".into())
            .spawn(move || -> AgentEnd {
                let (mut out, mut err) = (out, err);
                let deadline = Instant::now() + agent_timeout;
                let mut conn =
                    match connect_agent(&vsock, agent_protocol::CONTROL_PORT, deadline, &stop) {
                        Ok(c) => c,
                        Err(e) => {
                            // Nobody else ends a VM whose agent never answered.
                            stop.stop();
                            return AgentEnd {
                                result: Err(e),
                                connected: false,
                                out,
                                err,
                            };
                        }
                    };
                if news_tx.send(AgentNews::Ready).is_ok() && wants_ready_capture {
                    // Captured (or not): the run goes on either way.
                    let _ = captured_rx.recv();
                }
                let _ = news_tx.send(AgentNews::Started);
                let writer = conn
                    .get_ref()
                    .try_clone()
                    .ok()
                    .map(|w| Arc::new(std::sync::Mutex::new(w)));
                if let (Some(w), Ok(mut slot)) = (&writer, main_slot.lock()) {
                    *slot = Some(w.clone());
                }
                let interactive = stdio.as_ref().is_some_and(|st| st.interactive);
                let mut news = |e| {
                    // The egress counters reach `inspect` once a second.
                    if let (agent::Event::Heartbeat(_), Some(n)) = (e, &net) {
                        let now = n.stats();
                        if now != egress_seen {
                            egress_seen = now;
                            registration.update(|s| {
                                s.egress_denied = now.denied;
                                s.egress_passed = now.passed;
                            });
                        }
                    }
                    if let agent::Event::Started = e {
                        clock.phase("process_started");
                        registration.running();
                        if let (Some(w), true) = (&writer, interactive) {
                            if let Err(e) =
                                crate::exec::forward_stdin(w, agent_protocol::MAIN_PROCESS_STREAM)
                            {
                                eprintln!("supermachine: warning: stdin is not forwarded: {e}");
                            }
                        }
                    }
                    let _ = news_tx.send(AgentNews::Guest(e));
                };
                let r = conn
                    .run_process(begin, &mut *out, &mut *err, &mut news)
                    .map_err(|e| crate::error_chain(&e));
                drop(news_tx);
                // `stop` and `ps` see the end now, not after the power-off.
                if let Ok(status) = &r {
                    registration.reported(agent::exit_code(*status));
                }
                if r.is_err() {
                    // A broken conversation (a garbage frame, a closed stream)
                    // leaves nothing to wait for.
                    stop.stop();
                }
                // Closing tells the guest it may power off now.
                drop(conn);
                if r.is_ok() {
                    if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        vm_ended_rx.recv_timeout(POWER_OFF_GRACE)
                    {
                        eprintln!(
                            "supermachine: warning: the guest did not power off within {} s of its process exiting; stopping the VM",
                            POWER_OFF_GRACE.as_secs()
                        );
                        stop.stop();
                    }
                }
                AgentEnd {
                    result: r,
                    connected: true,
                    out,
                    err,
                }
            })
            .map_err(|source| Error::Thread {
                what: "the agent thread",
                source,
            })?
    };
    // A VM that fails to start is stopped when it is dropped here.
    let vm_result = match vmm.start() {
        Ok(()) => {
            if opts.sandbox.is_some() {
                crate::sandbox_selftest();
            }
            let captured = if ready_capture.is_some() || explicit.is_some() {
                captures(&vmm, &news_rx, &captured_tx, ready_capture, explicit)
            } else {
                Ok(Captured::No)
            };
            vmm.wait().map(|o| (o, captured))
        }
        Err(e) => {
            // Marked ended now: the agent and published-port threads, joined
            // below, end with it.
            vmm.stop();
            Err(runner::vmm::RunError::from(e))
        }
    };
    drop(vm_ended_tx);
    // No capture any more: an agent thread that said ready late does not wait.
    drop(news_rx);
    drop(captured_tx);
    // The VM is gone: its connections end, so an agent conversation still
    // waiting for the guest reads end-of-file instead of waiting forever,
    // and so do the published ports' connections.
    vsock_after.close_connections();
    for t in publishers {
        let _ = t.join();
    }
    let end = agent.join().map_err(|_| Error::Thread {
        what: "the agent thread",
        source: std::io::Error::other("it panicked"),
    })?;
    if let Some(uds) = &opts.vsock_uds {
        // The device bound it; nothing listens there any more.
        let _ = std::fs::remove_file(uds);
    }
    if let Some(signal) = opts.interrupt.as_ref().and_then(crate::Interrupt::signal) {
        return Err(Error::Interrupted { signal });
    }
    let vm_result = match vm_result {
        Ok((_, Ok(Captured::AndEnded(path)))) => {
            eprintln!("supermachine: VM captured to {}", path.display());
            return Ok(Launched::Done(0));
        }
        Ok((_, Err(e))) => return Err(e),
        Ok((o, Ok(Captured::No))) => {
            if let Some(c) = explicit {
                eprintln!(
                    "supermachine: warning: the process ended before its capture trigger ({:?}); nothing was captured to {}",
                    c.trigger,
                    c.path.display()
                );
            }
            Ok(o)
        }
        Ok((o, Ok(Captured::AndRunsOn))) => Ok(o),
        Err(e) => Err(e),
    };
    if restored && !end.connected {
        return Ok(Launched::NotReady {
            why: match vm_result {
                Ok(o) => format!(
                    "{}; the VM ended ({:?})",
                    end.result.err().unwrap_or_default(),
                    o.exit
                ),
                Err(e) => crate::error_chain(&e),
            },
            out: end.out,
            err: end.err,
        });
    }
    let outcome = vm_result?;
    match end.result {
        Ok(status) => Ok(Launched::Done(agent::exit_code(status))),
        // No status over vsock: the guest's own report on the power device is the
        // next best (guest-init writes the same docker code there).
        Err(e) => {
            eprintln!(
                "supermachine: warning: no exit status from the guest agent ({e}); using the VM's"
            );
            if outcome.status == 0 && outcome.exit != runner::vmm::GuestExit::PowerOff {
                return Err(Error::EndedEarly {
                    exit: outcome.exit,
                    agent: e,
                    console: tail.last_line().map_or_else(String::new, |l| {
                        format!("; the guest console's last line: {l:?} (--console shows it all)")
                    }),
                });
            }
            Ok(Launched::Done(outcome.exit_code()))
        }
    }
}

/// What the captures of a launch came to.
enum Captured {
    /// No mid-process capture (a ready capture leaves the run as it was).
    No,
    /// Captured mid-process; the VM ran on.
    AndRunsOn,
    /// Captured mid-process to this file, and the VM ended there.
    AndEnded(PathBuf),
}

/// The main thread's part while the VM runs: the ready capture when the agent
/// answers, and the mid-process capture when its trigger fires, until both
/// are done, the agent thread is gone or the VM ended.
fn captures<V: hypervisor::Vm + 'static>(
    vmm: &runner::vmm::Vmm<V>,
    news: &std::sync::mpsc::Receiver<AgentNews>,
    captured_tx: &std::sync::mpsc::Sender<()>,
    mut ready: Option<&std::path::Path>,
    explicit: Option<&crate::Capture>,
) -> Result<Captured, Error> {
    use crate::Trigger;
    use std::sync::mpsc::RecvTimeoutError;
    let ending = vmm.stop_handle();
    let mut started: Option<Instant> = None;
    while ready.is_some() || explicit.is_some() {
        let due = explicit.and_then(|c| match (c.trigger, started) {
            (Trigger::After(d), Some(t0)) => Some(t0 + d),
            _ => None,
        });
        let wait = due.map_or(Duration::from_millis(5), |d| {
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(5))
        });
        let fire = match news.recv_timeout(wait) {
            Ok(AgentNews::Ready) => {
                if let Some(path) = ready.take() {
                    capture_ready(vmm, path);
                    let _ = captured_tx.send(());
                }
                false
            }
            Ok(AgentNews::Started) => {
                started = Some(Instant::now());
                false
            }
            Ok(AgentNews::Guest(e)) => {
                matches!(
                    (explicit.map(|c| c.trigger), e),
                    (Some(Trigger::Heartbeat(n)), agent::Event::Heartbeat(seq)) if seq >= n
                ) || matches!(
                    (explicit.map(|c| c.trigger), e),
                    (Some(Trigger::Listen), agent::Event::Listening(_))
                )
            }
            // The VM ended, or the agent thread is done: nothing more comes.
            Err(RecvTimeoutError::Timeout) if ending.is_ending() => break,
            Err(RecvTimeoutError::Timeout) => due.is_some_and(|d| Instant::now() >= d),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let Some(c) = explicit.filter(|_| fire) else {
            continue;
        };
        if !crate::sleep_unless_ended(vmm, c.quiesce) || !crate::capture_now(vmm, c)? {
            break;
        }
        return Ok(if c.leave_running {
            Captured::AndRunsOn
        } else {
            Captured::AndEnded(c.path.clone())
        });
    }
    Ok(Captured::No)
}

/// Captures the VM whose agent just answered (guest-init waits for the
/// process spec, the root filesystem is mounted) to `path`, then lets it go
/// on. A capture that fails costs this run nothing but the warning.
fn capture_ready<V: hypervisor::Vm + 'static>(vmm: &runner::vmm::Vmm<V>, path: &std::path::Path) {
    match crate::pause_and_capture(vmm, path) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => eprintln!(
            "supermachine: warning: cannot capture a snapshot to {}: {}; later runs boot too",
            path.display(),
            crate::error_chain(&e)
        ),
    }
    if let Err(e) = vmm.resume() {
        if !matches!(e, runner::vmm::ControlError::Ended) {
            eprintln!(
                "supermachine: warning: the VM did not resume after its capture: {}",
                crate::error_chain(&e)
            );
            vmm.stop();
        }
    }
}

/// The last bytes the guest wrote to its console (a bounded ring), for the
/// error when the VM ends before its process.
#[derive(Debug, Clone, Default)]
struct ConsoleTail(Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>);

impl ConsoleTail {
    /// Bytes kept: a kernel panic's last lines, without holding a chatty
    /// guest's whole log.
    const KEEP: usize = 4096;

    /// The last line with something printable in it, trimmed.
    fn last_line(&self) -> Option<String> {
        let ring = self.0.lock().ok()?;
        let bytes: Vec<u8> = ring.iter().copied().collect();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c.is_control()))
            .rfind(|l| !l.is_empty())
            .map(str::to_string)
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut ring) = self.0.lock() {
            let keep = &buf[buf.len().saturating_sub(Self::KEEP)..];
            let held = ring.len();
            let overflow = (held + keep.len()).saturating_sub(Self::KEEP);
            ring.drain(..overflow.min(held));
            ring.extend(keep);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_console_tail_keeps_the_last_line_within_its_bound() {
        let mut t = ConsoleTail::default();
        assert_eq!(t.last_line(), None);
        for i in 0..10_000 {
            write!(t, "line {i}\r\n").unwrap();
        }
        t.write_all(b"Kernel panic - not syncing: boom\r\n\n  \n")
            .unwrap();
        assert_eq!(
            t.last_line().as_deref(),
            Some("Kernel panic - not syncing: boom")
        );
        assert!(t.0.lock().unwrap().len() <= ConsoleTail::KEEP);
        // One write larger than the ring keeps its end.
        let mut big = vec![b'x'; 3 * ConsoleTail::KEEP];
        big.extend_from_slice(b"\nlast");
        t.write_all(&big).unwrap();
        assert_eq!(t.last_line().as_deref(), Some("last"));
        assert_eq!(t.0.lock().unwrap().len(), ConsoleTail::KEEP);
    }
}
