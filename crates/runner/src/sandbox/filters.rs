//! The seccomp allow-lists, per thread class (x86-64 Linux).
//!
//! They come from tracing real runs (`strace -f` of `supermachine boot` with
//! tiny guests on /dev/kvm, and `SUPERMACHINE_SANDBOX=log` runs of the whole
//! Linux-guest suite in the nested rig, whose kernel logs every call a filter
//! would have refused) and from reading the code paths those runs do not take
//! (save/restore, errors, teardown). docs/security.md lists them in prose.
//! Grow a list only with the call a feature needs, and say why beside it.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use syscalls::Sysno;

use super::ThreadClass;

/// Syscall number -> the rules (any of which lets it through; none = any
/// arguments).
pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn nr(s: Sysno) -> i64 {
    i64::from(s.id())
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Only fails for an argument index above 5, which none of ours is.
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .unwrap_or_else(|e| unreachable!("argument {arg}: {e}"))
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    // Only fails for an empty condition list, which none of ours is.
    SeccompRule::new(conds).unwrap_or_else(|e| unreachable!("{e}"))
}

/// Adds `calls` with any arguments.
fn any(r: &mut Rules, calls: &[Sysno]) {
    for &c in calls {
        r.insert(nr(c), Vec::new());
    }
}

/// Adds `call` when argument `arg` is one of `values`.
fn arg_in(r: &mut Rules, call: Sysno, arg: u8, values: &[u64]) {
    let entry = r.entry(nr(call)).or_default();
    for &v in values {
        entry.push(rule(vec![cond(arg, SeccompCmpOp::Eq, v)]));
    }
}

/// Adds `call` when argument `arg` has none of the bits of `mask`.
fn arg_without(r: &mut Rules, call: Sysno, arg: u8, mask: u64) {
    r.entry(nr(call))
        .or_default()
        .push(rule(vec![cond(arg, SeccompCmpOp::MaskedEq(mask), 0)]));
}

/// `FIONBIO`: std's `set_nonblocking` on sockets.
const FIONBIO: u64 = libc::FIONBIO;
/// `TCGETS` (`isatty`) and `TIOCGWINSZ` on the terminal the VMM was started
/// on, and `TCSETS`: `run -it` puts that terminal back in its own mode at the
/// end (the terminal is the user's, which the VMM writes to anyway).
const TERMINAL_IOCTLS: [u64; 3] = [libc::TCGETS, libc::TIOCGWINSZ, libc::TCSETS];

/// Namespace flags no clone of the VMM may ask for: a compromised VMM must not
/// get a user namespace (and the kernel surface behind it).
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64
    | 0x80; // CLONE_NEWTIME

/// What every thread does whatever its job: memory (never executable: no
/// `PROT_EXEC` in `mmap` or `mprotect`), locks, time, signals (the vCPU kick,
/// the SIGSYS report), writing to stderr, closing what it owns, ending.
fn common(r: &mut Rules) {
    any(
        r,
        &[
            Sysno::brk,
            Sysno::munmap,
            Sysno::mremap,
            Sysno::madvise,
            Sysno::futex,
            Sysno::sched_yield,
            // glibc's malloc counts CPUs with it when it sizes its arenas
            // (after its sysfs and /proc reads failed: see `open_eacces`).
            Sysno::sched_getaffinity,
            Sysno::getrandom,
            Sysno::rt_sigreturn,
            Sysno::rt_sigprocmask,
            Sysno::sigaltstack,
            Sysno::restart_syscall,
            Sysno::clock_gettime,
            Sysno::clock_nanosleep,
            Sysno::nanosleep,
            Sysno::gettid,
            Sysno::getpid,
            // Kicking a vCPU thread (the vCPU kick signal) from any thread
            // that ends or pauses the VM.
            Sysno::tgkill,
            Sysno::write,
            Sysno::close,
            Sysno::fcntl,
            Sysno::exit,
            Sysno::exit_group,
        ],
    );
    arg_without(r, Sysno::mmap, 2, libc::PROT_EXEC as u64);
    arg_without(r, Sysno::mprotect, 2, libc::PROT_EXEC as u64);
}

/// The devices' host side, which runs on the device event loop and, for the
/// register writes a vCPU's MMIO exit carries (a queue notification without an
/// ioeventfd, a status write that activates or resets a device), on the vCPU
/// thread: disk reads, writes and flushes; vsock's UNIX sockets (accepting host
/// clients, connecting to host listeners, the in-process connections); the
/// network backend's socket or TAP; virtio-rng's entropy (`getrandom`,
/// common); passt's status when it dies.
fn device_io(r: &mut Rules) {
    any(
        r,
        &[
            Sysno::read,
            Sysno::readv,
            Sysno::pread64,
            Sysno::preadv,
            Sysno::writev,
            Sysno::pwrite64,
            Sysno::pwritev,
            Sysno::fsync,
            Sysno::fdatasync,
            Sysno::lseek,
            Sysno::recvfrom,
            Sysno::recvmsg,
            Sysno::sendto,
            Sysno::sendmsg,
            Sysno::accept4,
            Sysno::connect,
            Sysno::shutdown,
            Sysno::getsockopt,
            Sysno::setsockopt,
            Sysno::epoll_ctl,
            Sysno::wait4,
        ],
    );
    arg_in(r, Sysno::socket, 0, &[libc::AF_UNIX as u64]);
    arg_in(r, Sysno::socketpair, 0, &[libc::AF_UNIX as u64]);
}

/// The allow-list of `class`, for the calls the hypervisor backend makes given
/// as `ioctls` (by class: vCPU, devices, controller).
pub(super) fn rules(class: ThreadClass, ioctls: &BackendIoctls) -> Rules {
    let mut r = Rules::new();
    common(&mut r);
    match class {
        ThreadClass::Vcpu => {
            device_io(&mut r);
            any(&mut r, &OPENS);
            let mut req = ioctls.vcpu.clone();
            req.push(FIONBIO);
            arg_in(&mut r, Sysno::ioctl, 1, &req);
        }
        ThreadClass::Devices => {
            device_io(&mut r);
            any(&mut r, &OPENS);
            any(&mut r, &[Sysno::epoll_wait, Sysno::epoll_pwait]);
            let mut req = ioctls.devices.clone();
            req.push(FIONBIO);
            arg_in(&mut r, Sysno::ioctl, 1, &req);
        }
        ThreadClass::Controller => {
            // It reads guest-visible state and talks to the guest agent over
            // in-process vsock connections, like a device does.
            device_io(&mut r);
            any(
                &mut r,
                &[
                    Sysno::poll,
                    Sysno::ppoll,
                    // Threads it starts (the agent conversation) set up their
                    // stack guard, robust list and name.
                    Sysno::rseq,
                    Sysno::set_robust_list,
                    // The teardown helper's pipe; passt stopped at the end.
                    Sysno::pipe2,
                    Sysno::kill,
                    // Removing the vsock socket it bound; writing a snapshot
                    // (a temporary file sized, written where the guest used
                    // RAM, as `mincore` tells, fsynced and renamed into
                    // place). Landlock confines every path.
                    Sysno::openat,
                    Sysno::unlink,
                    Sysno::unlinkat,
                    Sysno::rename,
                    Sysno::newfstatat,
                    Sysno::statx,
                    Sysno::fstat,
                    Sysno::ftruncate,
                    Sysno::mincore,
                    // Listing its own threads once confined (the sandbox's
                    // check for threads nobody confined).
                    Sysno::getdents64,
                    // glibc tries clone3 first; the second filter of this
                    // class answers ENOSYS (it cannot be checked for
                    // namespace flags), and glibc falls back to clone.
                    Sysno::clone3,
                ],
            );
            arg_without(&mut r, Sysno::clone, 0, CLONE_NAMESPACES);
            arg_in(&mut r, Sysno::prctl, 0, &[libc::PR_SET_NAME as u64]);
            let mut req = ioctls.controller.clone();
            req.push(FIONBIO);
            req.extend(TERMINAL_IOCTLS);
            arg_in(&mut r, Sysno::ioctl, 1, &req);
        }
        ThreadClass::Helper => {
            // signal-hook's self-pipe (a socket pair) and the stop it
            // triggers (locks and vCPU kicks: common); `run -t`'s SIGWINCH
            // thread reads the terminal's size and sends it (write: common).
            any(&mut r, &OPENS);
            any(
                &mut r,
                &[
                    Sysno::read,
                    Sysno::recvfrom,
                    Sysno::sendto,
                    Sysno::poll,
                    Sysno::ppoll,
                ],
            );
            arg_in(&mut r, Sysno::ioctl, 1, &[libc::TIOCGWINSZ]);
        }
    }
    r
}

/// The `ioctl` requests the hypervisor backend makes on a built VM, by the
/// thread that makes them.
#[derive(Clone, Debug, Default)]
pub(super) struct BackendIoctls {
    pub vcpu: Vec<u64>,
    pub devices: Vec<u64>,
    pub controller: Vec<u64>,
}

impl BackendIoctls {
    /// KVM's (the one backend on Linux x86-64).
    pub fn kvm() -> Self {
        Self {
            vcpu: kvm_backend::seccomp::vcpu_ioctls(),
            devices: kvm_backend::seccomp::device_ioctls(),
            controller: kvm_backend::seccomp::vm_ioctls(),
        }
    }
}

/// The second filter of classes that may start threads: `clone3` answers
/// `ENOSYS` (everything else passes to the class's own filter).
pub(super) fn clone3_enosys() -> Rules {
    let mut r = Rules::new();
    any(&mut r, &[Sysno::clone3]);
    r
}

/// The calls the classes that open nothing let through to their second filter,
/// which answers them `EACCES` ([`open_eacces`]).
const OPENS: [Sysno; 2] = [Sysno::open, Sysno::openat];

/// The second filter of the classes that open no file (vCPU, devices, helper):
/// opening answers `EACCES` instead of stopping the process. glibc's malloc
/// opens files by itself, once per process, on whichever thread gets there
/// first: `/proc/sys/vm/overcommit_memory` when `free` shrinks a thread
/// arena's heap (seen in the nested rig on the device event loop, streaming
/// 64 MiB of guest stdout), `/sys/devices/system/cpu/online` when it sizes its
/// arenas; it takes a failed open as "no" and carries on. Nothing is opened:
/// the thread only learns it may not.
pub(super) fn open_eacces() -> Rules {
    let mut r = Rules::new();
    any(&mut r, &OPENS);
    r
}
