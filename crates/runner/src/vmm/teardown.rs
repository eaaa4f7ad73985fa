//! Taking the VM's destruction off the path the user waits on (Linux).
//!
//! Closing the last file descriptor of a KVM VM destroys it in the kernel, and on
//! this project's hosts that takes ~13 ms (`strace -T` of `supermachine boot`:
//! `close` of the VM fd), more than the whole tiny-guest boot. A process that
//! exits pays it too: `exit` closes its descriptors before the parent is told.
//!
//! So before the VMM lets go of a finished VM, [`Reaper::spawn`] forks a helper
//! that holds a copy of every descriptor, closes its stdio, and waits on a pipe. The VMM then closes its
//! own copies, which is cheap because they are no longer the last ones, and drops
//! the [`Reaper`], which closes the pipe: the helper exits, and the kernel
//! destroys the VM in the helper, where nobody waits. Guest RAM is mapped
//! `MADV_DONTFORK`, so the helper never maps it and the fork copies only the
//! VMM's own small address space.
//!
//! The helper only calls async-signal-safe functions (`close`, `read`, `_exit`),
//! as a child of a multi-threaded process must. Helpers that have exited are
//! reaped at the next spawn (`waitpid` with `WNOHANG`, never blocking); one still
//! running when the process exits is reparented to init. Where `fork` fails the
//! VM is torn down in-process, as before.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Write ends of the pipes of every live [`Reaper`] of this process: a helper
/// closes all of them, so helpers never keep each other alive. Held across the
/// fork, so no reaper pipe appears between the snapshot and the fork.
static LIVE: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Helpers forked and not reaped yet.
static HELPERS: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// Reaps the helpers that have exited, without waiting for the others.
fn reap_exited() {
    let mut helpers = HELPERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    helpers.retain(|&pid| {
        let mut status = 0;
        // SAFETY: `pid` is a child this process forked and has not reaped;
        // `status` is a valid out-pointer; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        // 0: still running. -1 (ECHILD): someone else reaped it.
        r == 0
    });
}

/// Most other reapers' pipes a helper closes; beyond it a helper may live until
/// an unrelated reaper ends too (still bounded).
const MAX_LIVE: usize = 64;

/// The parent's end of a helper's pipe; dropping it lets the helper exit.
#[derive(Debug)]
pub(crate) struct Reaper {
    pipe: OwnedFd,
}

impl Reaper {
    /// Forks the helper. `None` if the process cannot fork (or pipe) now: the
    /// caller then destroys the VM itself.
    pub(crate) fn spawn() -> Option<Self> {
        reap_exited();
        let mut live = LIVE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid two-int array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return None;
        }
        let (read_end, write_end) = (fds[0], fds[1]);
        let mut others = [-1 as RawFd; MAX_LIVE];
        for (slot, fd) in others.iter_mut().zip(live.iter()) {
            *slot = *fd;
        }
        // SAFETY: fork has no memory-safety preconditions; the child below only
        // makes async-signal-safe calls on values prepared before the fork (no
        // allocation, no lock), then leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see the module docs; every call is async-signal-safe and
            // uses only integers copied before the fork.
            unsafe { helper(read_end, write_end, &others) }
        }
        // SAFETY: `read_end` is ours and open; the helper has its own copy.
        unsafe { libc::close(read_end) };
        // SAFETY: `write_end` came from pipe2 above and nothing else owns it.
        let pipe = unsafe { OwnedFd::from_raw_fd(write_end) };
        if pid < 0 {
            return None;
        }
        HELPERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(pid);
        live.push(pipe.as_raw_fd());
        Some(Self { pipe })
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let mut live = LIVE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fd = self.pipe.as_raw_fd();
        live.retain(|&f| f != fd);
        // The OwnedFd closes the pipe after this; the helper sees end of file.
    }
}

/// The forked helper: drops stdio and every other reaper's pipe, waits until the
/// parent closes its end of ours, and exits, closing the VM's last descriptors.
///
/// # Safety
/// Must be called only in a freshly forked child, with descriptors and the array
/// prepared before the fork.
unsafe fn helper(read_end: RawFd, write_end: RawFd, others: &[RawFd]) -> ! {
    // SAFETY: async-signal-safe calls on plain integers, then _exit.
    unsafe {
        libc::close(write_end);
        for &fd in others.iter().filter(|&&fd| fd >= 0) {
            libc::close(fd);
        }
        // A reader of the VMM's output must not wait for this helper.
        for fd in 0..3 {
            libc::close(fd);
        }
        let mut byte = 0u8;
        loop {
            let n = libc::read(read_end, (&mut byte as *mut u8).cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        libc::_exit(0)
    }
}

/// Keeps guest RAM out of every fork (the helper's, and passt's or any other
/// child's before its exec).
pub(crate) fn exclude_from_fork(mem: &vm_memory::GuestMemoryMmap) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        // SAFETY: the range is exactly region `r`'s live mapping, owned by `mem`;
        // MADV_DONTFORK changes only what a fork copies, never the contents.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_DONTFORK) };
        if rc != 0 {
            tracing::debug!(
                "guest RAM stays in forks: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
