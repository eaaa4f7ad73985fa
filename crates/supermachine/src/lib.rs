//! supermachine: run OCI/Docker images as hardware-isolated microVMs.
//!
//! This crate is the public facade: a small library API and the `supermachine` CLI.
//! [`run_image`] runs an OCI image to completion in a VM; [`boot`] boots a kernel
//! with supermachine's own guest init.
//!
//! ```no_run
//! // Boot Debian's cloud kernel (provisioned on first use) to supermachine's guest
//! // init and get the guest's exit status.
//! let outcome = supermachine::boot(&supermachine::BootConfig::default())?;
//! println!("guest exited with {}", outcome.exit_code());
//! # Ok::<(), supermachine::Error>(())
//! ```
//!
//! VMs in the background, as `run -d` and the VM verbs manage them
//! ([`manage`]; the supervisor is the `supermachine` program, found on
//! `PATH` or named by `$SUPERMACHINE_BIN`):
//!
//! ```no_run
//! use std::time::Duration;
//! let web = supermachine::manage::start(&supermachine::RunOptions {
//!     image: "localhost:5000/web:1".into(),
//!     name: Some("web".into()),
//!     publish: vec![supermachine::Publish::parse("8080:80").map_err(supermachine::Error::Usage)?],
//!     ..Default::default()
//! })?;
//! let hello = supermachine::exec::ExecOptions {
//!     argv: vec!["echo".into(), "hello".into()],
//!     ..Default::default()
//! };
//! let code = web.exec(&hello, &mut std::io::stdout(), &mut std::io::stderr())?;
//! assert_eq!(code, 0);
//! for vm in supermachine::vms::list()? {
//!     println!("{} {:?}", vm.display_name(), vm.effective_state().status);
//! }
//! web.stop(Duration::from_secs(10))?;
//! println!("exited with {}", web.wait()?);
//! web.remove()?;
//! # Ok::<(), supermachine::Error>(())
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

pub mod agent;
pub mod egress;
pub mod exec;
pub mod interrupt;
pub mod manage;
pub mod publish;
pub mod run;
pub mod snapshots;
pub mod terminal;
pub mod tls;
pub mod vms;

pub use interrupt::Interrupt;
pub use publish::{HostEnd, Publish};
pub use run::{PreparedImage, RunOptions};

pub use runner::resources::{
    parse_size, DiskSpec, NetBackendSpec, NetSpec, VmResources, VsockSpec, DEFAULT_MEMORY,
};

/// The guest's vsock context id when none is given (the first one virtio-vsock
/// does not reserve: 0-2 are the hypervisor, local and host, virtio 1.2 §5.10.4).
pub const DEFAULT_GUEST_CID: u64 = 3;
pub use runner::sandbox;
pub use runner::sandbox::{SandboxMode, SandboxReport};
pub use runner::timings::Timings;
pub use runner::vmm::{GuestExit, RunOutcome};

/// Errors of the library API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A signal (SIGINT, SIGTERM) stopped the run; the VM is gone.
    #[error("stopped by signal {signal}")]
    Interrupted {
        /// The signal's number.
        signal: i32,
    },
    /// There is no cache directory.
    #[error(transparent)]
    Cache(#[from] guest_assets::cache::NoCacheDir),
    /// The guest kernel could not be found or provisioned.
    #[error(transparent)]
    Kernel(#[from] guest_assets::kernel::KernelError),
    /// The initramfs could not be built.
    #[error(transparent)]
    Initramfs(#[from] guest_assets::initramfs::InitramfsError),
    /// The kernel would only run in KVM's instruction emulator on this PVM host.
    #[error(transparent)]
    EmulatedKernel(#[from] guest_assets::pvm::EmulatedKernelRefused),
    /// A thread could not be started.
    #[error("cannot start {what}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image store could not be opened or read.
    #[error(transparent)]
    Store(#[from] image::store::StoreError),
    /// The hypervisor could not be opened.
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    /// Building or running the VM failed.
    #[error(transparent)]
    Run(#[from] runner::vmm::RunError),
    /// The guest's network could not be resolved (host route, resolver).
    #[error("cannot set up the guest's network")]
    Network(#[from] runner::net::NetError),
    /// The image reference does not parse.
    #[error(transparent)]
    Reference(#[from] image::reference::ReferenceError),
    /// Pulling an image failed.
    #[error("cannot pull {reference}")]
    Pull {
        /// The reference as given.
        reference: String,
        /// What failed.
        #[source]
        source: image::source::SourceError,
    },
    /// Converting an image's layers into its root filesystem failed.
    #[error("cannot build the root filesystem of {reference}")]
    Rootfs {
        /// The image.
        reference: String,
        /// What failed.
        #[source]
        source: image::erofs::RootfsError,
    },
    /// The image's file tree needs more memory to convert than allowed.
    #[error(
        "cannot build the root filesystem of {reference}: its file tree is larger than \
         {limit_mib} MiB of metadata allow (set {} to a higher number of MiB to convert it)",
        run::TREE_LIMIT_ENV
    )]
    RootfsTooBig {
        /// The image.
        reference: String,
        /// The limit in force.
        limit_mib: u64,
        /// What failed.
        #[source]
        source: image::erofs::RootfsError,
    },
    /// A directory of the cache could not be created.
    #[error("cannot create {path}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM ended before its process did, and the agent gave no status.
    #[error("the VM ended ({exit:?}) before the process: {agent}{console}")]
    EndedEarly {
        /// How the VM ended.
        exit: GuestExit,
        /// What the agent conversation said (its error chain).
        agent: String,
        /// The guest console's last line, as a clause ("" when there was none).
        console: String,
    },
    /// A capture was asked of a VM with a writable disk: the snapshot and
    /// every restore of it would write to the same file.
    #[error(
        "cannot capture a VM with the writable disk {disk}: every restore would write to \
         the same file; attach it read-only (--disk {disk},ro) or capture without it"
    )]
    CaptureWithWritableDisk {
        /// The disk.
        disk: PathBuf,
    },
    /// The VM could not be captured.
    #[error("cannot capture the VM to {path}")]
    Capture {
        path: PathBuf,
        #[source]
        source: runner::vmm::RunError,
    },
    /// The snapshot could not be restored.
    #[error("cannot restore {path}")]
    Restore {
        path: PathBuf,
        #[source]
        source: runner::vmm::RunError,
    },
    /// A VM restored for `run --restore` never let the host attach to its
    /// process.
    #[error("the VM restored from {path} did not let the host attach to its process: {why}")]
    NotAttached {
        /// The snapshot.
        path: PathBuf,
        /// What the agent conversation said.
        why: String,
    },
    /// A published port's host end could not be bound.
    #[error("cannot publish {what}")]
    Publish {
        /// The published port.
        what: String,
        /// The OS error (an address in use, say).
        #[source]
        source: std::io::Error,
    },
    /// The VMM could not be sandboxed.
    #[error("cannot sandbox the VMM (--no-sandbox runs without it, for debugging only)")]
    Sandbox(#[source] runner::vmm::ControlError),
    /// A published port's TLS certificate or key is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The runtime directory (named VMs' sockets) is unusable.
    #[error("cannot use the runtime directory {path}: {why}")]
    RuntimeDir {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// `run --name` with a name another VM holds (running, or detached and
    /// not removed).
    #[error("a VM named {name} already exists (choose another --name, or rm it)")]
    NameInUse {
        /// The name.
        name: String,
    },
    /// A name or id prefix that names no VM.
    #[error("no VM named {name}")]
    NoSuchVm {
        /// The name or id prefix.
        name: String,
    },
    /// An id prefix that several VMs share.
    #[error("{query} names {count} VMs: give more of the id, or the name")]
    AmbiguousVm {
        /// The prefix.
        query: String,
        /// How many VMs it matches.
        count: usize,
    },
    /// `rm` of a running VM without `-f`.
    #[error("VM {name} is running: stop it first, or rm -f")]
    VmRunning {
        /// Its name or short id.
        name: String,
    },
    /// `run -d`: the VM's supervisor failed before its process started.
    #[error("{0}")]
    Detach(String),
    /// `exec`, `stop` or `kill` of a VM that has ended.
    #[error("VM {name} is not running")]
    VmNotRunning {
        /// Its name or short id.
        name: String,
    },
    /// An exec could not run its process, or lost it.
    #[error("exec: {0}")]
    Exec(String),
    #[error("{0}")]
    Usage(String),
}

/// Runs an image to completion the way `docker run` does: the process's stdout and
/// stderr go to this process's, and the result is docker's exit code (the status,
/// or 128 + signal).
///
/// ```no_run
/// let code = supermachine::run_image("localhost:5000/busybox:1", &["echo", "hi"])?;
/// # Ok::<(), supermachine::Error>(())
/// ```
pub fn run_image(image: &str, cmd: &[&str]) -> Result<i32, Error> {
    let opts = RunOptions {
        image: image.to_string(),
        args: cmd.iter().map(|s| s.to_string()).collect(),
        tls_verify: true,
        // As `supermachine run` and `docker run`: outbound network by default.
        network: Some(NetSpec {
            backend: NetBackendSpec::Passt {
                host_loopback: false,
            },
            guest: None,
        }),
        ..Default::default()
    };
    run::run(
        &opts,
        Box::new(std::io::stdout()),
        Box::new(std::io::stderr()),
        Arc::new(Timings::start()),
    )
}

/// The default kernel command line: serial console, quiet boot, reboot through the
/// ACPI reset register, reset (which ends the run) on panic, no PCI probing (every
/// device is on virtio-mmio).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 quiet panic=-1 reboot=acpi pci=off 8250.nr_uarts=1 i8042.noaux i8042.nomux";

/// What to boot. `Default` boots the provisioned Debian cloud kernel with
/// supermachine's initramfs, 512 MiB and one vCPU.
#[derive(Clone, Debug, Default)]
pub struct BootConfig {
    /// Kernel path; `None` = `$SUPERMACHINE_KERNEL` or the provisioned kernel.
    pub kernel: Option<PathBuf>,
    /// Initramfs path; `None` = supermachine's own for a Linux kernel, none otherwise.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` = [`DEFAULT_CMDLINE`].
    pub cmdline: Option<String>,
    /// Guest RAM in bytes; `None` = [`DEFAULT_MEMORY`].
    pub memory: Option<u64>,
    /// vCPUs; `None` = 1.
    pub cpus: Option<u32>,
    /// virtio-blk disks, in order (the first is `/dev/vda`).
    pub disks: Vec<DiskSpec>,
    /// A virtio-net device; `None` = no network device.
    pub network: Option<NetSpec>,
    /// A virtio-vsock device; `None` = none.
    pub vsock: Option<VsockSpec>,
    /// Confine the VMM once the VM is built (`sandbox`): `None` (the library's
    /// default) runs without. The sandbox confines the calling thread too;
    /// the CLI turns it on unless told `--no-sandbox`.
    pub sandbox: Option<SandboxMode>,
    /// Capture the VM to a snapshot file once, while it runs.
    pub capture: Option<Capture>,
}

/// When and where a running VM is captured to a snapshot file.
///
/// Triggers are set per run, beside the VM's resources rather than in
/// [`VmResources`]: the resources key the snapshots `run` keeps
/// (`snapshots::key`), and when a VM is captured does not change what VM it
/// is (docs/architecture.md, "capture triggers").
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capture {
    /// What starts the capture.
    pub trigger: Trigger,
    /// How long to wait after the trigger before the capture (so that what
    /// the trigger announced settles: a server's first accept, a flush).
    pub quiesce: std::time::Duration,
    /// The snapshot file (written atomically).
    pub path: PathBuf,
    /// Let the VM run on after the capture; otherwise it ends there (as
    /// `docker checkpoint create` stops a container unless `--leave-running`),
    /// and the run's outcome is [`GuestExit::Stopped`].
    pub leave_running: bool,
}

/// What starts a [`Capture`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Trigger {
    /// This long after the guest starts (`boot`) or after its process was
    /// started (`run`).
    After(std::time::Duration),
    /// At the guest agent's heartbeat with this sequence number (one a second
    /// while the process runs, the first is 1): `run` only.
    Heartbeat(u64),
    /// When the container's process first listens on a TCP port (the guest
    /// agent reports it): `run` only.
    Listen,
}

impl Trigger {
    /// Whether the trigger needs the guest agent (so only `run` has it).
    pub fn needs_agent(self) -> bool {
        !matches!(self, Trigger::After(_))
    }
}

/// Resolves a [`BootConfig`] into concrete resources (provisioning the kernel and
/// building the initramfs when needed).
pub fn resolve(cfg: &BootConfig) -> Result<VmResources, Error> {
    use guest_assets::{initramfs, kernel};
    let env_kernel = std::env::var_os(kernel::KERNEL_ENV).map(PathBuf::from);
    let explicit = cfg.kernel.clone().or(env_kernel);
    let (kernel, initrd) = match explicit {
        Some(k) => {
            let initrd = match &cfg.initrd {
                Some(i) => Some(i.clone()),
                None if guest_assets::pvm::is_linux_kernel(&k) => {
                    let assets = kernel::KernelAssets::from_path(&k)?;
                    Some(initramfs::ensure(&cache()?, &assets)?)
                }
                None => None,
            };
            (k, initrd)
        }
        None => {
            let cache = cache()?;
            let assets = kernel::provision(&cache)?;
            let initrd = match &cfg.initrd {
                Some(i) => Some(i.clone()),
                None => Some(initramfs::ensure(&cache, &assets)?),
            };
            (assets.kernel.clone(), initrd)
        }
    };
    // The guest's network addresses are resolved here, once, into the resources
    // (`sm.net=` on the command line); the VMM only reads them.
    let res = VmResources {
        kernel,
        initrd,
        cmdline: cfg
            .cmdline
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        memory: cfg.memory.unwrap_or(DEFAULT_MEMORY),
        vcpus: cfg.cpus.unwrap_or(1),
        disks: cfg.disks.clone(),
        rng: true,
        vsock: cfg.vsock.clone(),
        network: cfg.network.clone(),
    };
    Ok(runner::net::prepare(&res)?)
}

/// `e` and its causes on one line, `: `-separated (no message repeats its
/// source, so each cause appears once).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The user's cache directory (kernels, initramfs, image store, root filesystems).
pub fn cache() -> Result<guest_assets::cache::CacheLayout, Error> {
    Ok(guest_assets::cache::CacheLayout::user()?)
}

/// Opens the host's hypervisor for booting `kernel`: on a PVM host a Linux kernel
/// without PVM-guest support is refused here, before anything is built.
pub fn open_hypervisor(
    kernel: &std::path::Path,
) -> Result<runner::backend::DefaultHypervisor, Error> {
    use hypervisor::Hypervisor;
    let hv = runner::backend::open()?;
    guest_assets::pvm::refuse_emulated_kernel(hv.capabilities().pvm_host, kernel)?;
    Ok(hv)
}

/// Boots `cfg` to completion with the guest console on this process's stdout.
pub fn boot(cfg: &BootConfig) -> Result<RunOutcome, Error> {
    boot_with_console(
        cfg,
        Box::new(std::io::stdout()),
        Arc::new(Timings::start()),
        None,
    )
}

/// Boots `cfg` to completion, sending the guest console to `console`. A
/// triggered `interrupt` stops the VM ([`Error::Interrupted`]).
pub fn boot_with_console(
    cfg: &BootConfig,
    console: Box<dyn Write + Send>,
    timings: Arc<Timings>,
    interrupt: Option<&Interrupt>,
) -> Result<RunOutcome, Error> {
    let res = resolve(cfg)?;
    res.validate().map_err(runner::vmm::RunError::from)?;
    if let Some(c) = &cfg.capture {
        if c.trigger.needs_agent() {
            return Err(Error::Usage(format!(
                "{:?} capture needs the guest agent: `supermachine run` has it, `boot` does not",
                c.trigger
            )));
        }
        check_capturable(&res)?;
    }
    timings.phase("resolved");
    let hv = open_hypervisor(&res.kernel)?;
    timings.phase("hypervisor_open");
    let vmm = runner::vmm::Vmm::build(&hv, &res, console, timings)?;
    if let Some(i) = interrupt {
        i.attach(vmm.stop_handle());
    }
    if let Some(mode) = cfg.sandbox {
        let dirs = cfg.capture.iter().map(|c| c.path.as_path());
        enter_sandbox(&vmm, &res, mode, dirs)?;
    }
    vmm.start().map_err(runner::vmm::RunError::from)?;
    if cfg.sandbox.is_some() {
        sandbox_selftest();
    }
    if let Some(c) = &cfg.capture {
        capture_after(&vmm, c)?;
    }
    finish(vmm, interrupt)
}

/// A VM that is captured must not have a writable disk: every restore of it
/// would write to the same file.
pub(crate) fn check_capturable(res: &VmResources) -> Result<(), Error> {
    match res.disks.iter().find(|d| !d.read_only) {
        Some(d) => Err(Error::CaptureWithWritableDisk {
            disk: d.path.clone(),
        }),
        None => Ok(()),
    }
}

/// Waits for the VM's end; a run an interrupt stopped is [`Error::Interrupted`].
fn finish<V: hypervisor::Vm + 'static>(
    vmm: runner::vmm::Vmm<V>,
    interrupt: Option<&Interrupt>,
) -> Result<RunOutcome, Error> {
    let outcome = vmm.wait()?;
    match interrupt.and_then(Interrupt::signal) {
        Some(signal) => Err(Error::Interrupted { signal }),
        None => Ok(outcome),
    }
}

/// Captures the running VM to `c.path` once its `After` trigger and quiesce
/// have passed (unless it ends first), then ends it or lets it run on.
fn capture_after<V: hypervisor::Vm + 'static>(
    vmm: &runner::vmm::Vmm<V>,
    c: &Capture,
) -> Result<(), Error> {
    let after = match c.trigger {
        Trigger::After(d) => d,
        // Refused in `boot_with_console`.
        Trigger::Heartbeat(_) | Trigger::Listen => return Ok(()),
    };
    if sleep_unless_ended(vmm, after + c.quiesce) {
        capture_now(vmm, c)?;
    }
    Ok(())
}

/// Sleeps `d`, or less when the VM ends first: whether it still runs.
pub(crate) fn sleep_unless_ended<V: hypervisor::Vm + 'static>(
    vmm: &runner::vmm::Vmm<V>,
    d: std::time::Duration,
) -> bool {
    let stop = vmm.stop_handle();
    let at = std::time::Instant::now() + d;
    while std::time::Instant::now() < at {
        if stop.is_ending() {
            return false;
        }
        std::thread::sleep(
            at.saturating_duration_since(std::time::Instant::now())
                .min(std::time::Duration::from_millis(5)),
        );
    }
    !stop.is_ending()
}

/// Captures the running VM to `c.path` now, then ends it or lets it run on
/// as `c` says; a VM that ended first is not an error (nothing to capture:
/// `Ok(false)`).
pub(crate) fn capture_now<V: hypervisor::Vm + 'static>(
    vmm: &runner::vmm::Vmm<V>,
    c: &Capture,
) -> Result<bool, Error> {
    match pause_and_capture(vmm, &c.path) {
        Ok(true) => {}
        // The VM ended meanwhile: nothing to capture.
        Ok(false) => return Ok(false),
        Err(e) => {
            vmm.stop();
            return Err(Error::Capture {
                path: c.path.clone(),
                source: e,
            });
        }
    }
    if !c.leave_running {
        vmm.stop();
        return Ok(true);
    }
    match vmm.resume() {
        Ok(()) | Err(runner::vmm::ControlError::Ended) => Ok(true),
        Err(e) => Err(runner::vmm::RunError::from(e).into()),
    }
}

/// Pauses the VM and writes it to `path`; `Ok(false)` when it had ended
/// first (nothing to capture). The VM is left paused.
pub(crate) fn pause_and_capture<V: hypervisor::Vm + 'static>(
    vmm: &runner::vmm::Vmm<V>,
    path: &std::path::Path,
) -> Result<bool, runner::vmm::RunError> {
    match vmm
        .pause()
        .map_err(runner::vmm::RunError::from)
        .and_then(|()| vmm.snapshot(path))
    {
        Ok(()) => Ok(true),
        Err(runner::vmm::RunError::Control(runner::vmm::ControlError::Ended)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens and checks the snapshot file `path` for an explicit restore.
pub(crate) fn open_snapshot(
    path: &std::path::Path,
    timings: &Timings,
) -> Result<runner::vmm::Snapshot, Error> {
    let snap = runner::vmm::Snapshot::open(path).map_err(|source| Error::Restore {
        path: path.to_path_buf(),
        source,
    })?;
    timings.phase("snapshot_opened");
    Ok(snap)
}

/// Restores the VM in the snapshot file `path` (its resources come from the
/// file) and runs it to its end, as [`boot_with_console`] runs a booted one.
pub fn restore_with_console(
    path: &std::path::Path,
    sandbox: Option<SandboxMode>,
    console: Box<dyn Write + Send>,
    timings: Arc<Timings>,
    interrupt: Option<&Interrupt>,
) -> Result<RunOutcome, Error> {
    let snap = open_snapshot(path, &timings)?;
    let res = snap.resources().clone();
    let hv = open_hypervisor(&res.kernel)?;
    timings.phase("hypervisor_open");
    let vmm = runner::vmm::Vmm::restore(&hv, &snap, console, timings).map_err(|source| {
        Error::Restore {
            path: path.to_path_buf(),
            source,
        }
    })?;
    if let Some(i) = interrupt {
        i.attach(vmm.stop_handle());
    }
    if let Some(mode) = sandbox {
        enter_sandbox(&vmm, &res, mode, std::iter::empty())?;
    }
    vmm.start().map_err(runner::vmm::RunError::from)?;
    finish(vmm, interrupt)
}

/// Confines a built VM's VMM (`runner::sandbox`) before its guest runs, with
/// the paths its resources name.
pub(crate) fn enter_sandbox<'a, V: hypervisor::Vm + 'static>(
    vmm: &runner::vmm::Vmm<V>,
    res: &VmResources,
    mode: SandboxMode,
    snapshot_files: impl Iterator<Item = &'a std::path::Path>,
) -> Result<SandboxReport, Error> {
    let mut cfg = runner::sandbox::SandboxConfig::for_resources(res, mode);
    // A snapshot is written beside its final name, then renamed.
    for f in snapshot_files {
        cfg.dirs.push(match f.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        });
    }
    let report = vmm.enter_sandbox(&cfg).map_err(Error::Sandbox)?;
    if !report.unconfined_threads.is_empty() {
        tracing::warn!(
            "threads the VMM's sandbox does not cover: {}",
            report.unconfined_threads.join(", ")
        );
    }
    tracing::debug!("VMM sandboxed: {report:?}");
    Ok(report)
}

/// Test hook, for the sandbox's own tests only (docs/security.md): with
/// `SUPERMACHINE_SANDBOX_SELFTEST=syscall` the sandboxed VMM's controlling
/// thread makes a call its filter refuses (`getppid`), which must end the
/// process with the sandbox's report; with `open:PATH` it tries to open PATH
/// and says on stderr how that went. It only ever hurts the process that asks.
pub(crate) fn sandbox_selftest() {
    let Some(v) = std::env::var_os("SUPERMACHINE_SANDBOX_SELFTEST") else {
        return;
    };
    let v = v.to_string_lossy();
    if v == "syscall" {
        let _ = std::os::unix::process::parent_id();
    } else if let Some(path) = v.strip_prefix("open:") {
        match std::fs::File::open(path) {
            Ok(_) => eprintln!("sandbox selftest: opened {path}"),
            Err(e) => eprintln!("sandbox selftest: cannot open {path}: {e}"),
        }
    }
}
