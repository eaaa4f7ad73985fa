//! The sandbox on Linux x86-64: seccomp through seccompiler, landlock through
//! the `landlock` crate, rlimits and the `SIGSYS` report through libc.

use std::cell::Cell;
use std::sync::Mutex;

use landlock::{
    Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::filters::{self, BackendIoctls, Rules};
use super::{LandlockStatus, SandboxConfig, SandboxError, SandboxMode, ThreadClass};

/// The newest landlock ABI whose rights we ask for; older kernels get what
/// they have (best effort).
const LANDLOCK_ABI: ABI = ABI::V6;

thread_local! {
    /// The class of the calling thread's filter, for the SIGSYS report.
    /// Constant-initialized and without a destructor, so the handler may read
    /// it.
    static CLASS: Cell<Option<ThreadClass>> = const { Cell::new(None) };
}

fn compile(
    class: &'static str,
    rules: Rules,
    mode: SandboxMode,
) -> Result<BpfProgram, SandboxError> {
    let mismatch = match mode {
        SandboxMode::Enforce => SeccompAction::Trap,
        SandboxMode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SandboxError::Filter {
            class,
            reason: e.to_string(),
        })?;
    BpfProgram::try_from(filter).map_err(|e| SandboxError::Filter {
        class,
        reason: e.to_string(),
    })
}

/// A filter stacked under a class's own, whose allow-list lets `rules`'
/// calls through to this one: they get `answer` (an errno), everything else
/// is allowed. (Of stacked filters the kernel takes the strictest answer, so a
/// call the class's filter traps stays trapped.)
fn errno_filter(
    name: &'static str,
    rules: Rules,
    answer: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, answer, TargetArch::x86_64)
        .map_err(|e| SandboxError::Filter {
            class: name,
            reason: e.to_string(),
        })?;
    BpfProgram::try_from(filter).map_err(|e| SandboxError::Filter {
        class: name,
        reason: e.to_string(),
    })
}

fn errno(e: libc::c_int) -> SeccompAction {
    SeccompAction::Errno(e.unsigned_abs())
}

/// Opening answers `EACCES` on the threads that open nothing
/// ([`filters::open_eacces`]); in log mode it is logged and let through, like
/// every other call a filter would refuse.
fn open_filter(mode: SandboxMode) -> Result<BpfProgram, SandboxError> {
    let answer = match mode {
        SandboxMode::Enforce => errno(libc::EACCES),
        SandboxMode::Log => SeccompAction::Log,
    };
    errno_filter("open", filters::open_eacces(), answer)
}

fn install(class: ThreadClass, bpf: &BpfProgram) -> Result<(), SandboxError> {
    set_no_new_privs()?;
    CLASS.with(|c| c.set(Some(class)));
    seccompiler::apply_filter(bpf).map_err(|e| SandboxError::Install {
        class: class.name(),
        reason: e.to_string(),
    })
}

fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integers and only
    // sets a flag of the calling thread.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::Os {
            what: "set no_new_privs",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Everything compiled and opened, before anything is restricted.
pub(super) struct Prepared {
    mode: SandboxMode,
    vcpu: BpfProgram,
    devices: BpfProgram,
    controller: BpfProgram,
    clone3: BpfProgram,
    open_eacces: BpfProgram,
    /// The ruleset, cloned by each thread that restricts itself.
    ruleset: RulesetCreated,
    /// The worst status a thread's restriction reported.
    landlock: Mutex<LandlockStatus>,
    max_open_files: u64,
    max_file_size: u64,
}

impl Prepared {
    pub(super) fn new(cfg: &SandboxConfig) -> Result<Self, SandboxError> {
        let io = BackendIoctls::kvm();
        let class = |c: ThreadClass| compile(c.name(), filters::rules(c, &io), cfg.mode);
        let vcpu = class(ThreadClass::Vcpu)?;
        let devices = class(ThreadClass::Devices)?;
        let controller = class(ThreadClass::Controller)?;
        let clone3 = errno_filter("clone3", filters::clone3_enosys(), errno(libc::ENOSYS))?;
        let open_eacces = open_filter(cfg.mode)?;
        let ruleset = ruleset(cfg)?;
        Ok(Self {
            mode: cfg.mode,
            vcpu,
            devices,
            controller,
            clone3,
            open_eacces,
            ruleset,
            landlock: Mutex::new(LandlockStatus::Enforced),
            max_open_files: cfg.max_open_files,
            max_file_size: cfg.max_file_size,
        })
    }

    pub(super) fn enter_process(&self) -> Result<(), SandboxError> {
        set_rlimit(libc::RLIMIT_NOFILE, self.max_open_files, "limit open files")?;
        set_rlimit(libc::RLIMIT_FSIZE, self.max_file_size, "limit file sizes")?;
        // SAFETY: SIG_IGN for SIGXFSZ: a write past RLIMIT_FSIZE then fails
        // with EFBIG instead of killing the process; no handler runs.
        if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(SandboxError::Os {
                what: "ignore SIGXFSZ",
                source: std::io::Error::last_os_error(),
            });
        }
        install_sigsys_handler()
    }

    pub(super) fn enter_thread(&self, class: ThreadClass) -> Result<(), SandboxError> {
        self.restrict_paths()?;
        match class {
            ThreadClass::Vcpu => {
                install(class, &self.open_eacces)?;
                install(class, &self.vcpu)
            }
            ThreadClass::Devices => {
                install(class, &self.open_eacces)?;
                install(class, &self.devices)
            }
            ThreadClass::Controller => {
                install(class, &self.clone3)?;
                install(class, &self.controller)
            }
            ThreadClass::Helper => confine_helper(self.mode),
        }
    }

    /// Landlock on the calling thread (and the threads it starts later).
    fn restrict_paths(&self) -> Result<(), SandboxError> {
        let status = self
            .ruleset
            .try_clone()
            .map_err(|source| SandboxError::Os {
                what: "duplicate the landlock ruleset",
                source,
            })?
            .restrict_self()
            .map_err(|e| SandboxError::Landlock(e.to_string()))?;
        let got = match status.ruleset {
            RulesetStatus::FullyEnforced => LandlockStatus::Enforced,
            RulesetStatus::PartiallyEnforced => LandlockStatus::Partial,
            RulesetStatus::NotEnforced => LandlockStatus::Unsupported,
        };
        let mut worst = self.lock_status();
        *worst = match (*worst, got) {
            (LandlockStatus::Unsupported, _) | (_, LandlockStatus::Unsupported) => {
                LandlockStatus::Unsupported
            }
            (LandlockStatus::Partial, _) | (_, LandlockStatus::Partial) => LandlockStatus::Partial,
            _ => LandlockStatus::Enforced,
        };
        Ok(())
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, LandlockStatus> {
        self.landlock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn landlock(&self) -> LandlockStatus {
        *self.lock_status()
    }
}

/// The landlock ruleset of `cfg`: every filesystem right handled (so denied
/// unless a rule grants it), TCP and UDP bind and connect handled with no rule
/// (denied), abstract UNIX sockets scoped. Best effort: on a kernel without
/// landlock the ruleset has no descriptor and `restrict_self` reports it not
/// enforced; an older one enforces the rights it knows.
fn ruleset(cfg: &SandboxConfig) -> Result<RulesetCreated, SandboxError> {
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let abi = LANDLOCK_ABI;
    let read = AccessFs::from_read(abi);
    let write = read | AccessFs::WriteFile | AccessFs::Truncate;
    let created = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::AbstractUnixSocket)
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(landlock::path_beneath_rules(&cfg.read, read))
        .map_err(err)?
        .add_rules(landlock::path_beneath_rules(&cfg.write, write))
        .map_err(err)?
        .add_rules(landlock::path_beneath_rules(
            &cfg.dirs,
            AccessFs::from_all(abi),
        ))
        .map_err(err)?
        // The process's own thread list (`/proc/<pid>/task`, opened now so it
        // is this process's), read once confined to find unconfined threads.
        .add_rules(landlock::path_beneath_rules(
            ["/proc/self/task"],
            AccessFs::from_read(abi),
        ))
        .map_err(err)?;
    Ok(created)
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    limit: u64,
    what: &'static str,
) -> Result<(), SandboxError> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `cur` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(resource, &mut cur) } != 0 {
        return Err(SandboxError::Os {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    // Never raise a limit: only the hard limit's owner may.
    let v = limit.min(cur.rlim_max);
    let new = libc::rlimit {
        rlim_cur: v,
        rlim_max: v,
    };
    // SAFETY: `new` is a valid rlimit for setrlimit to read.
    if unsafe { libc::setrlimit(resource, &new) } != 0 {
        return Err(SandboxError::Os {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A thread that waits for signals confines itself (no landlock: its filter
/// names no path).
pub(super) fn confine_helper(mode: SandboxMode) -> Result<(), SandboxError> {
    install_sigsys_handler()?;
    let bpf = compile(
        ThreadClass::Helper.name(),
        filters::rules(ThreadClass::Helper, &BackendIoctls::default()),
        mode,
    )?;
    install(ThreadClass::Helper, &open_filter(mode)?)?;
    install(ThreadClass::Helper, &bpf)
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value that
    // the fields below complete.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa.sa_mask` is a valid sigset_t to clear.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: `sa` is fully initialized; the handler only makes
    // async-signal-safe calls (write, _exit) on stack data.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(SandboxError::Os {
            what: "install the SIGSYS handler",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `siginfo_t` as the kernel fills it for `SIGSYS` (`_sigsys` of the union, on
/// 64-bit Linux): the refused call's number.
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// `si_code` of a SIGSYS from seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// A small fixed buffer to format the report in without allocating.
struct Msg {
    buf: [u8; 512],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let tail = digits;
        self.push(&tail[i..]);
    }
}

/// The register (an index into `gregs`) that holds the path argument of the
/// path-taking call `nr`: the report says which file a thread tried to open.
fn path_argument(nr: libc::c_int) -> Option<usize> {
    let reg = match i64::from(nr) {
        libc::SYS_open
        | libc::SYS_stat
        | libc::SYS_lstat
        | libc::SYS_access
        | libc::SYS_unlink
        | libc::SYS_readlink
        | libc::SYS_mkdir
        | libc::SYS_rmdir
        | libc::SYS_rename => libc::REG_RDI,
        libc::SYS_openat
        | libc::SYS_newfstatat
        | libc::SYS_faccessat
        | libc::SYS_faccessat2
        | libc::SYS_readlinkat
        | libc::SYS_unlinkat
        | libc::SYS_mkdirat
        | libc::SYS_statx
        | libc::SYS_openat2 => libc::REG_RSI,
        _ => return None,
    };
    usize::try_from(reg).ok()
}

/// Appends the NUL-terminated string at `ptr` (at most `max` bytes of it,
/// printable ASCII as is, anything else as `?`); nothing for a null pointer.
///
/// # Safety
/// `ptr` is null or points at readable bytes up to a NUL or `max` bytes.
unsafe fn push_c_string(m: &mut Msg, ptr: *const u8, max: usize) {
    if ptr.is_null() {
        return;
    }
    for i in 0..max {
        // SAFETY: within the string (the caller's promise), before its NUL.
        let b = unsafe { ptr.add(i).read() };
        if b == 0 {
            return;
        }
        let shown = if b.is_ascii_graphic() || b == b' ' {
            b
        } else {
            b'?'
        };
        m.push(&[shown]);
    }
    m.push(b"...");
}

/// The `SIGSYS` handler: says which call which thread made, and ends the
/// process with `EXIT_SANDBOX_VIOLATION`. Async-signal-safe: no allocation, no
/// lock, only `write` and `_exit` (which every filter allows).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler;
    // SigsysInfo is the SIGSYS layout of its first bytes (siginfo_t is 128).
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    let mut m = Msg {
        buf: [0; 512],
        len: 0,
    };
    m.push(b"supermachine: the VMM's sandbox stopped it: its ");
    let class = CLASS
        .with(Cell::get)
        .map_or("unconfined", ThreadClass::name);
    m.push(class.as_bytes());
    m.push(b" thread made the system call ");
    if info.code == SYS_SECCOMP {
        let name = usize::try_from(info.syscall)
            .ok()
            .and_then(syscalls::Sysno::new)
            .map_or("(unknown)", |s| s.name());
        m.push(name.as_bytes());
        m.push(b" (");
        m.push_num(u64::try_from(info.syscall).unwrap_or(0));
        m.push(b")");
        if let Some(arg) = path_argument(info.syscall) {
            // SAFETY: the kernel passes the interrupted context as a valid
            // ucontext_t to a SA_SIGINFO handler.
            let regs = unsafe { &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
            let ptr = regs[arg] as *const u8;
            m.push(b" on \"");
            // SAFETY: the refused call's path argument: the thread was about
            // to hand it to the kernel as a NUL-terminated string, so it
            // points at readable bytes up to its NUL (read at most 200).
            unsafe { push_c_string(&mut m, ptr, 200) };
            m.push(b"\"");
        }
    } else {
        m.push(b"(not reported: a SIGSYS that seccomp did not raise)");
    }
    m.push(
        b", which its seccomp filter does not allow. This is a bug in supermachine: \
please report it; --no-sandbox (for debugging only) runs without the sandbox.\n",
    );
    // SAFETY: write and _exit are async-signal-safe; the buffer is on our stack.
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::_exit(super::EXIT_SANDBOX_VIOLATION);
    }
}

/// Threads of this process without a seccomp filter, but the calling one.
pub(super) fn unconfined_threads() -> Vec<String> {
    // SAFETY: gettid takes no arguments.
    let me = unsafe { libc::gettid() };
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        if tid == me.to_string() {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        if field("Seccomp:").as_deref() == Some("0") {
            let name = field("Name:").unwrap_or_default();
            out.push(format!("{name} ({tid})"));
        }
    }
    out
}
