//! Making a running vCPU leave `KVM_RUN` from another thread.
//!
//! KVM's race-free recipe (KVM API doc, `immediate_exit` in `struct kvm_run`):
//! the kicker sets `immediate_exit` and then sends the vCPU thread a signal with
//! a no-op handler. A vCPU inside the guest is forced out by the signal
//! (`KVM_RUN` fails with `EINTR`); a vCPU about to enter finds `immediate_exit`
//! set and returns `EINTR` at once. A `pending` flag covers kicks that land
//! while the vCPU is outside `run` altogether, so the next `run` returns
//! `Interrupted` without entering the guest.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};

use hypervisor::VcpuKicker;

/// The real-time signal used to kick vCPU threads (SIGRTMIN, as Firecracker and
/// Cloud Hypervisor use). Its handler does nothing; other code of the process
/// must leave this signal alone.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler once per process. `SA_RESTART` keeps a kick that
/// reaches a thread outside `KVM_RUN` from failing its other system calls;
/// `KVM_RUN` itself returns `EINTR` regardless (it is never restarted).
pub(crate) fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    static FAILED: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value to start from (empty
        // mask, no flags); we then fill in the handler and flags.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = noop_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `action` is initialized; the handler is async-signal-safe (it
        // does nothing); we pass no old-action pointer.
        let rc = unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) };
        if rc != 0 {
            FAILED.store(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EINVAL),
                Ordering::SeqCst,
            );
        }
    });
    match FAILED.load(Ordering::SeqCst) {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

thread_local! {
    /// This thread's kernel thread id, cached (0 = not read yet).
    static THREAD_ID: Cell<libc::pid_t> = const { Cell::new(0) };
}

fn current_tid() -> libc::pid_t {
    THREAD_ID.with(|c| {
        let mut tid = c.get();
        if tid == 0 {
            // SAFETY: gettid has no preconditions and cannot fail.
            tid = unsafe { libc::gettid() };
            c.set(tid);
        }
        tid
    })
}

/// Pointer to `kvm_run.immediate_exit` of a live vCPU.
#[derive(Debug, Clone, Copy)]
struct ImmediateExit(*mut u8);

// SAFETY: the pointer targets the vCPU's shared `kvm_run` mapping, which the
// kernel and any thread may access; it is only dereferenced under `KickState::run`'s
// lock, which the vCPU clears before the mapping goes away.
unsafe impl Send for ImmediateExit {}

impl ImmediateExit {
    fn store(self, value: u8) {
        // SAFETY: the pointer is valid (see the `Send` impl) and aligned (u8);
        // every Rust-side write of this byte goes through an atomic, so kicker and
        // vCPU thread never race non-atomically.
        unsafe { AtomicU8::from_ptr(self.0) }.store(value, Ordering::SeqCst);
    }
}

/// State shared by a vCPU and its kickers.
#[derive(Debug)]
pub(crate) struct KickState {
    /// A kick has not been reported by `run` yet.
    pending: AtomicBool,
    /// Kernel thread id of the thread last running the vCPU (0 = none yet).
    tid: AtomicI32,
    /// `kvm_run.immediate_exit` while the vCPU exists.
    run: Mutex<Option<ImmediateExit>>,
}

impl KickState {
    /// `immediate_exit` must point into the vCPU's `kvm_run` mapping and stay
    /// valid until [`KickState::detach`].
    pub(crate) fn new(immediate_exit: *mut u8) -> Arc<Self> {
        Arc::new(Self {
            pending: AtomicBool::new(false),
            tid: AtomicI32::new(0),
            run: Mutex::new(Some(ImmediateExit(immediate_exit))),
        })
    }

    /// Records the calling thread as the vCPU's thread (cheap when unchanged)
    /// and unblocks the kick signal on it when it is new.
    #[inline]
    pub(crate) fn attach_current_thread(&self) {
        let tid = current_tid();
        if self.tid.load(Ordering::SeqCst) != tid {
            // SAFETY: the sigset is initialized by sigemptyset before use, and
            // pthread_sigmask only changes this thread's mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, kick_signal());
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
            self.tid.store(tid, Ordering::SeqCst);
        }
    }

    /// Consumes a pending kick: true when one was pending. First clears
    /// `immediate_exit` (on the vCPU's own thread) so the next entry runs: in
    /// this order a kick landing in between is seen as pending here, and a kick
    /// landing after the swap leaves `immediate_exit` set for the entry.
    #[inline]
    pub(crate) fn take_pending(&self, immediate_exit: *mut u8) -> bool {
        ImmediateExit(immediate_exit).store(0);
        self.pending.swap(false, Ordering::SeqCst)
    }

    /// True when a kick is waiting (without consuming it).
    #[cfg(test)]
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    fn kick(&self) {
        self.pending.store(true, Ordering::SeqCst);
        let guard = self.run.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(immediate_exit) = *guard else {
            return; // The vCPU is gone.
        };
        immediate_exit.store(1);
        let tid = self.tid.load(Ordering::SeqCst);
        if tid != 0 {
            // SAFETY: tgkill only sends a signal; it is limited to our own
            // process (tgid = getpid), whose threads all have the no-op handler.
            // A stale tid fails with ESRCH, which needs no handling: the pending
            // flag and immediate_exit still stop the next entry.
            unsafe {
                libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal());
            }
        }
    }

    /// Called by the vCPU before its `kvm_run` mapping is unmapped.
    pub(crate) fn detach(&self) {
        *self.run.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.tid.store(0, Ordering::SeqCst);
    }
}

/// Interrupts a [`crate::KvmVcpu`]'s `run` from any thread; cheap to clone.
/// Outliving the vCPU is harmless: kicks then do nothing.
#[derive(Debug, Clone)]
pub struct KvmKicker {
    pub(crate) state: Arc<KickState>,
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        self.state.kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kick_before_run_is_pending_and_sets_immediate_exit() {
        let mut byte = 0u8;
        let state = KickState::new(&mut byte);
        let kicker = KvmKicker {
            state: Arc::clone(&state),
        };
        kicker.kick();
        assert!(state.is_pending());
        // SAFETY: `byte` lives on this stack frame; reading it after the kick.
        assert_eq!(unsafe { std::ptr::read_volatile(&byte) }, 1);
        assert!(state.take_pending(&mut byte));
        assert_eq!(byte, 0);
        assert!(!state.take_pending(&mut byte), "a kick is reported once");
    }

    #[test]
    fn kick_after_detach_does_not_touch_memory() {
        let mut byte = 0u8;
        let state = KickState::new(&mut byte);
        state.detach();
        KvmKicker {
            state: Arc::clone(&state),
        }
        .kick();
        assert_eq!(byte, 0);
    }

    #[test]
    fn install_handler_twice_succeeds() {
        install_handler().unwrap();
        install_handler().unwrap();
    }
}
