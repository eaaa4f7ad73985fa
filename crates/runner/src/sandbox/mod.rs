//! The VMM's sandbox: once a VM is built and before the guest runs a single
//! instruction, every thread of the VMM gives up what it does not need, as
//! Firecracker's and Cloud Hypervisor's do (docs/security.md has the threat
//! model and the filters).
//!
//! - **seccomp-BPF, per thread class** ([`ThreadClass`]), built with rust-vmm's
//!   `seccompiler` (`filters.rs`): the vCPU threads, the device event loop, the
//!   controlling thread (the one that calls [`crate::vmm::Vmm::enter_sandbox`],
//!   and every thread it starts afterwards, which inherit its filter) and helper
//!   threads that only wait for signals ([`confine_helper_thread`]). A system
//!   call outside a thread's filter raises `SIGSYS` (`SECCOMP_RET_TRAP`), whose
//!   handler names the call and the thread class on stderr and ends the process
//!   with [`EXIT_SANDBOX_VIOLATION`]; nothing hangs.
//! - **`no_new_privs`** on every thread (seccomp needs it without
//!   `CAP_SYS_ADMIN`; no exec can gain privileges).
//! - **landlock** (where the host kernel has it; silently best-effort where it
//!   does not): the filesystem shrinks to the paths of [`SandboxConfig`] (the
//!   VM's kernel, initramfs and disks read-only or read-write, `/dev/kvm`, the
//!   vsock socket's directory); no TCP or UDP bind or connect, no abstract UNIX
//!   socket outside the sandbox. Landlock restricts the thread that asks and the
//!   threads it starts later, so each confined thread asks for itself.
//! - **rlimits**: `RLIMIT_NOFILE` and `RLIMIT_FSIZE` (with `SIGXFSZ` ignored, so
//!   a write past the limit fails with `EFBIG` instead of killing the VMM).
//!
//! Only on Linux x86-64 (the KVM backend); elsewhere [`Sandbox::prepare`] says
//! the platform has none.

use std::path::PathBuf;

use crate::resources::VmResources;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod filters;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod linux;

#[cfg(test)]
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod tests;

/// Whether this platform has the sandbox (Linux x86-64).
pub const SUPPORTED: bool = cfg!(all(target_os = "linux", target_arch = "x86_64"));

/// The exit code of a VMM that its sandbox stopped (128 + `SIGSYS`, as a shell
/// reports a process killed by that signal).
pub const EXIT_SANDBOX_VIOLATION: i32 = 128 + 31;

/// What a sandboxed thread does with a system call outside its filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SandboxMode {
    /// Stops the VMM: the `SIGSYS` handler names the call and exits with
    /// [`EXIT_SANDBOX_VIOLATION`]. The default.
    Enforce,
    /// Lets the call through and has the kernel log it (`SECCOMP_RET_LOG`: an
    /// audit record `type=1326 ... comm="THREAD" syscall=N` in the kernel log).
    /// For growing the filters when a feature needs a new call; never for use.
    Log,
}

/// Which filter a thread gets. Each class's allow-list is in `filters.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadClass {
    /// A vCPU thread: `KVM_RUN`, its own state, and the device work its port
    /// and MMIO exits do (a virtio register write runs the device's code there).
    Vcpu,
    /// The device event loop: the devices' host side (disks, sockets, the
    /// network backend), polled.
    Devices,
    /// The thread that owns the [`crate::vmm::Vmm`] (and the threads it starts
    /// later): VM-wide state, the agent conversation, tearing the VM down.
    Controller,
    /// A thread that waits for signals and stops the VM (the CLI's).
    Helper,
}

impl ThreadClass {
    /// The name the `SIGSYS` message uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vCPU",
            Self::Devices => "device event loop",
            Self::Controller => "controlling",
            Self::Helper => "helper",
        }
    }
}

/// What a sandboxed VMM may still reach, and its limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Stop on a call outside the filters, or only log it.
    pub mode: SandboxMode,
    /// Files and directories (and what is beneath them) the VMM may read.
    pub read: Vec<PathBuf>,
    /// Files the VMM may read and write (writable disks, `/dev/kvm`).
    pub write: Vec<PathBuf>,
    /// Directories in which the VMM may create, connect to and remove files
    /// (the vsock socket's directory).
    pub dirs: Vec<PathBuf>,
    /// `RLIMIT_NOFILE`: the most descriptors the VMM may hold.
    pub max_open_files: u64,
    /// `RLIMIT_FSIZE`: the largest file the VMM may write.
    pub max_file_size: u64,
}

/// At most 1,024 vsock connections and 64 pending UNIX clients, with room for
/// the VM, its disks and the host side.
pub const DEFAULT_MAX_OPEN_FILES: u64 = 4096;

/// The smallest `RLIMIT_FSIZE`: larger than any disk the VM writes is the real
/// bound, but the container's stdout may be a file the user redirected to.
pub const MIN_MAX_FILE_SIZE: u64 = 64 << 30;

impl SandboxConfig {
    /// The paths `res` names: the kernel, the initramfs and read-only disks to
    /// read, writable disks and `/dev/kvm` to write, the vsock socket's
    /// directory. Files are limited to the larger of [`MIN_MAX_FILE_SIZE`] and
    /// the largest writable disk.
    pub fn for_resources(res: &VmResources, mode: SandboxMode) -> Self {
        let mut read = vec![res.kernel.clone()];
        read.extend(res.initrd.clone());
        let mut write = vec![PathBuf::from("/dev/kvm")];
        let mut largest = 0u64;
        for d in &res.disks {
            if d.read_only {
                read.push(d.path.clone());
            } else {
                write.push(d.path.clone());
                largest = largest.max(std::fs::metadata(&d.path).map_or(0, |m| m.len()));
            }
        }
        let dirs = res
            .vsock
            .as_ref()
            .and_then(|v| v.uds_path.as_ref())
            .and_then(|p| p.parent())
            .map(|d| {
                if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d.to_path_buf()
                }
            })
            .into_iter()
            .collect();
        Self {
            mode,
            read,
            write,
            dirs,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            max_file_size: largest.max(MIN_MAX_FILE_SIZE),
        }
    }
}

/// How far landlock got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandlockStatus {
    /// Every restriction asked for holds.
    Enforced,
    /// Some hold; the kernel lacks the newer ones.
    Partial,
    /// The kernel has no landlock (or it is disabled): seccomp and rlimits only.
    Unsupported,
}

/// What the sandbox did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxReport {
    /// Whether the filters stop (or only log) a call outside them.
    pub mode: SandboxMode,
    /// Landlock's state.
    pub landlock: LandlockStatus,
    /// Threads of this process the sandbox found without a seccomp filter
    /// (`name (tid)`): threads started before it by someone else, which a
    /// library caller must confine itself. Empty for the CLI.
    pub unconfined_threads: Vec<String>,
}

/// Why the sandbox could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The platform has no sandbox.
    #[error("this platform has no VMM sandbox (only Linux x86-64 has one); run with --no-sandbox")]
    Unsupported,
    /// A filter did not compile (a bug in its allow-list).
    #[error("the {class} thread's seccomp filter does not compile: {reason}")]
    Filter {
        /// The filter's class.
        class: &'static str,
        /// seccompiler's reason.
        reason: String,
    },
    /// The kernel refused a filter.
    #[error("the kernel refused the {class} thread's seccomp filter: {reason}")]
    Install {
        /// The filter's class.
        class: &'static str,
        /// Why.
        reason: String,
    },
    /// Landlock failed in a way best-effort does not cover.
    #[error("landlock: {0}")]
    Landlock(String),
    /// A system call the sandbox needs failed.
    #[error("cannot {what}: {source}")]
    Os {
        /// What it was doing.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be asked to confine itself.
    #[error("the {class} thread could not enter the sandbox: {reason}")]
    Thread {
        /// The thread's class.
        class: &'static str,
        /// Why.
        reason: String,
    },
}

/// A sandbox ready to enter: filters compiled, landlock rules opened. Built by
/// the controlling thread before anything is restricted; each thread then
/// enters it for its class.
pub struct Sandbox {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    inner: linux::Prepared,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Compiles every class's filter and opens the landlock rules of `cfg`.
    /// Nothing is restricted yet.
    pub fn prepare(cfg: &SandboxConfig) -> Result<Self, SandboxError> {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        return Ok(Self {
            inner: linux::Prepared::new(cfg)?,
        });
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        {
            let _ = cfg;
            Err(SandboxError::Unsupported)
        }
    }

    /// Process-wide steps, from the controlling thread, before any thread
    /// confines itself: the rlimits, `SIGXFSZ` ignored, the `SIGSYS` handler.
    pub(crate) fn enter_process(&self) -> Result<(), SandboxError> {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        return self.inner.enter_process();
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        Err(SandboxError::Unsupported)
    }

    /// Confines the calling thread as `class`: `no_new_privs`, landlock, then
    /// its seccomp filter (last: the steps before it need calls it forbids).
    pub fn enter_thread(&self, class: ThreadClass) -> Result<(), SandboxError> {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        return self.inner.enter_thread(class);
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        {
            let _ = class;
            Err(SandboxError::Unsupported)
        }
    }

    /// Landlock's state once entered.
    pub(crate) fn landlock(&self) -> LandlockStatus {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        return self.inner.landlock();
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        LandlockStatus::Unsupported
    }
}

/// Threads of this process without a seccomp filter, but the calling one
/// (`/proc/self/task/*/status`), as `name (tid)`.
pub(crate) fn unconfined_threads() -> Vec<String> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    return linux::unconfined_threads();
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    Vec::new()
}

/// The sandbox this process will enter, once [`plan`] says so.
static PLANNED: std::sync::OnceLock<SandboxMode> = std::sync::OnceLock::new();

/// Says this process will enter the sandbox in `mode` (the CLI does, before it
/// starts any thread): helper threads started from now on, whose job is only
/// to wait (the CLI's signal thread, the runner's passt log relay), confine
/// themselves at their start ([`confine_helper_thread`]), so that no thread
/// of the VMM is left out. The first plan holds.
pub fn plan(mode: SandboxMode) {
    let _ = PLANNED.set(mode);
}

/// Confines the calling thread as a [`ThreadClass::Helper`] if the process
/// plans to be sandboxed ([`plan`]); does nothing otherwise. For threads that
/// only wait (for signals, or on a pipe they log) and may stop the VM; call it
/// at the thread's start. Such a thread needs no path, so it has no landlock,
/// and its filter has no call that names one.
pub fn confine_helper_thread() -> Result<(), SandboxError> {
    let Some(&mode) = PLANNED.get() else {
        return Ok(());
    };
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    return linux::confine_helper(mode);
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        let _ = mode;
        Err(SandboxError::Unsupported)
    }
}
