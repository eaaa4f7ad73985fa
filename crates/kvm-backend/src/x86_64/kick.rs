//! Making a running vCPU leave `KVM_RUN` from another thread.
//!
//! KVM's race-free recipe (KVM API doc, `immediate_exit` in `struct kvm_run`):
//! the kicker sends the vCPU thread a signal whose handler, on that thread, sets
//! `immediate_exit`. A vCPU inside the guest is forced out by the signal
//! (`KVM_RUN` fails with `EINTR`); a vCPU about to enter finds `immediate_exit`
//! set and returns `EINTR` at once. A `pending` flag covers kicks that land
//! while the vCPU is outside `run` altogether (or before it has a thread), so
//! the next `run` returns `Interrupted` without entering the guest.
//!
//! Only the vCPU's own thread ever writes into `kvm_run` (the handler runs
//! there), so no other thread touches memory the vCPU's `&mut kvm_run` covers.
//! The handler finds `immediate_exit` through a [`Slot`] that lives for the
//! whole process (slots are recycled, never freed): a kick still in flight
//! when its vCPU is gone finds the slot empty, or a newer vCPU's pointer, which
//! costs that vCPU one spurious `Interrupted`, never a write into freed memory.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};

use hypervisor::VcpuKicker;

/// The real-time signal used to kick vCPU threads (SIGRTMIN, as Firecracker and
/// Cloud Hypervisor use). Its handler only sets the `immediate_exit` of the
/// vCPU its thread runs; other code of the process must leave this signal alone.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Where one vCPU's `kvm_run.immediate_exit` is, for the kick handler.
#[derive(Debug, Default)]
struct Slot {
    /// The byte, or null once the vCPU is gone.
    target: AtomicPtr<u8>,
    /// Handlers between reading `target` and writing through it.
    busy: AtomicUsize,
}

/// Slots of vCPUs that are gone, for the next ones.
static FREE_SLOTS: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());

fn alloc_slot(target: *mut u8) -> &'static Slot {
    let recycled = FREE_SLOTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop();
    // One small allocation per vCPU alive at once, kept for the process's life
    // so that a late handler never reads freed memory.
    let slot = recycled.unwrap_or_else(|| Box::leak(Box::default()));
    slot.target.store(target, Ordering::SeqCst);
    slot
}

thread_local! {
    /// The slot of the vCPU this thread runs (null = none yet). Constant-
    /// initialized and without a destructor, so the signal handler may read it.
    static CURRENT_SLOT: Cell<*const Slot> = const { Cell::new(std::ptr::null()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let slot = CURRENT_SLOT.with(Cell::get);
    if slot.is_null() {
        return;
    }
    // SAFETY: slots are leaked, so a non-null pointer to one is valid forever.
    let slot = unsafe { &*slot };
    slot.busy.fetch_add(1, Ordering::SeqCst);
    let target = slot.target.load(Ordering::SeqCst);
    if !target.is_null() {
        // SAFETY: `target` is the live vCPU's `immediate_exit`: `detach` nulls
        // it and then waits for `busy` to drop to zero before the mapping can go,
        // and we raised `busy` before reading it. The byte is written only
        // atomically by us (here and in `take_pending`), on this thread.
        unsafe { AtomicU8::from_ptr(target) }.store(1, Ordering::SeqCst);
    }
    slot.busy.fetch_sub(1, Ordering::SeqCst);
}

/// Installs the kick handler once per process. `SA_RESTART` keeps a kick that
/// reaches a thread outside `KVM_RUN` from failing its other system calls;
/// `KVM_RUN` itself returns `EINTR` regardless (it is never restarted).
pub(crate) fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    static FAILED: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value to start from (empty
        // mask, no flags); we then fill in the handler and flags.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = kick_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `action` is initialized; the handler is async-signal-safe (a
        // thread-local read and atomics); we pass no old-action pointer.
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

/// State shared by a vCPU and its kickers.
#[derive(Debug)]
pub(crate) struct KickState {
    /// A kick has not been reported by `run` yet.
    pending: AtomicBool,
    /// Kernel thread id of the thread last running the vCPU (0 = none yet).
    tid: AtomicI32,
    /// Where the handler finds `immediate_exit`.
    slot: &'static Slot,
}

impl KickState {
    /// `immediate_exit` must point into the vCPU's `kvm_run` mapping and stay
    /// valid until [`KickState::detach`].
    pub(crate) fn new(immediate_exit: *mut u8) -> Arc<Self> {
        Arc::new(Self {
            pending: AtomicBool::new(false),
            tid: AtomicI32::new(0),
            slot: alloc_slot(immediate_exit),
        })
    }

    /// Records the calling thread as the vCPU's thread (cheap when unchanged),
    /// points its kick handler at this vCPU, and unblocks the kick signal on it
    /// when it is new.
    #[inline]
    pub(crate) fn attach_current_thread(&self) {
        CURRENT_SLOT.with(|c| c.set(self.slot));
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
        // SAFETY: the caller passes its live vCPU's `immediate_exit`; every
        // write of the byte is atomic and on this thread (here or in the handler).
        unsafe { AtomicU8::from_ptr(immediate_exit) }.store(0, Ordering::SeqCst);
        self.pending.swap(false, Ordering::SeqCst)
    }

    /// True when a kick is waiting (without consuming it).
    #[cfg(test)]
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    fn kick(&self) {
        // Before the thread id is read: a vCPU that attaches after this sees
        // the flag; one attached before gets the signal.
        self.pending.store(true, Ordering::SeqCst);
        let tid = self.tid.load(Ordering::SeqCst);
        if tid != 0 {
            // SAFETY: tgkill only sends a signal; it is limited to our own
            // process (tgid = getpid), whose threads all have the kick handler.
            // A stale tid fails with ESRCH, which needs no handling: the pending
            // flag still stops the next entry.
            unsafe {
                libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal());
            }
        }
    }

    /// Called by the vCPU before its `kvm_run` mapping is unmapped: from here
    /// on no kick handler writes into it.
    pub(crate) fn detach(&self) {
        // This thread's handler (if it ran the vCPU) forgets the slot first.
        let ours: *const Slot = self.slot;
        CURRENT_SLOT.with(|c| {
            if c.get() == ours {
                c.set(std::ptr::null());
            }
        });
        self.tid.store(0, Ordering::SeqCst);
        self.slot
            .target
            .store(std::ptr::null_mut(), Ordering::SeqCst);
        // A handler that read the pointer before it was cleared finishes its
        // one store first (on another thread; ours cannot be mid-handler here).
        while self.slot.busy.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        FREE_SLOTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.slot);
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
    fn kick_before_the_vcpu_has_a_thread_is_pending_only() {
        let byte = Box::leak(Box::new(0u8));
        let state = KickState::new(byte);
        KvmKicker {
            state: Arc::clone(&state),
        }
        .kick();
        assert!(state.is_pending());
        // SAFETY: the leaked byte lives forever; nothing else writes it now.
        let now = unsafe { std::ptr::read_volatile(byte) };
        assert_eq!(now, 0, "no thread to signal");
        assert!(state.take_pending(byte));
        assert!(!state.take_pending(byte), "a kick is reported once");
        state.detach();
    }

    #[test]
    fn kick_from_another_thread_sets_immediate_exit_on_the_vcpu_thread() {
        install_handler().unwrap();
        let byte = Box::leak(Box::new(0u8));
        let state = KickState::new(byte);
        state.attach_current_thread();
        let kicker = KvmKicker {
            state: Arc::clone(&state),
        };
        std::thread::spawn(move || kicker.kick()).join().unwrap();
        // The signal is handled on this thread; wait for it to land.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // SAFETY: the leaked byte lives forever; the handler writes it atomically.
        while unsafe { AtomicU8::from_ptr(byte) }.load(Ordering::SeqCst) != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the handler never ran"
            );
            std::thread::yield_now();
        }
        assert!(state.take_pending(byte));
        assert_eq!(*byte, 0, "take_pending clears immediate_exit");
        state.detach();
    }

    #[test]
    fn kick_after_detach_does_not_touch_memory() {
        install_handler().unwrap();
        let byte = Box::leak(Box::new(0u8));
        let state = KickState::new(byte);
        state.attach_current_thread();
        state.detach();
        KvmKicker {
            state: Arc::clone(&state),
        }
        .kick();
        // Even a signal raised by hand finds the slot empty.
        // SAFETY: raise only sends a signal to this thread, whose handler is ours.
        unsafe { libc::raise(kick_signal()) };
        // SAFETY: as above.
        assert_eq!(unsafe { std::ptr::read_volatile(byte) }, 0);
    }

    #[test]
    fn install_handler_twice_succeeds() {
        install_handler().unwrap();
        install_handler().unwrap();
    }
}
