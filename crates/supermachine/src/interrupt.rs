//! Stopping a running `run` or `boot` from another thread: the CLI's signal
//! thread triggers an [`Interrupt`] on SIGINT/SIGTERM, and the VM it was attached
//! to is stopped (or never started, if it is not built yet).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use runner::vmm::StopHandle;

/// A shared "stop now" for one run; clones refer to the same one.
#[derive(Clone, Default)]
pub struct Interrupt(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// The signal that triggered it; 0 while not triggered.
    signal: AtomicI32,
    /// The VM to stop, once there is one.
    vm: Mutex<Option<StopHandle>>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("signal", &self.signal())
            .finish_non_exhaustive()
    }
}

impl Interrupt {
    /// A fresh, untriggered interrupt.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the run because of `signal` (its number, e.g. 15 for SIGTERM): the
    /// attached VM stops now; one attached later stops at once. The first signal
    /// is the one reported.
    pub fn trigger(&self, signal: i32) {
        let _ =
            self.0
                .signal
                .compare_exchange(0, signal.max(1), Ordering::SeqCst, Ordering::SeqCst);
        if let Some(vm) = self.vm().as_ref() {
            vm.stop();
        }
    }

    /// The signal that triggered it, if it was.
    pub fn signal(&self) -> Option<i32> {
        match self.0.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Hands over the VM a trigger stops (stopped at once if already triggered).
    pub(crate) fn attach(&self, vm: StopHandle) {
        let mut slot = self.vm();
        if self.signal().is_some() {
            vm.stop();
        }
        *slot = Some(vm);
    }

    fn vm(&self) -> std::sync::MutexGuard<'_, Option<StopHandle>> {
        self.0.vm.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
