//! Per-phase timings, printed when `SUPERMACHINE_TIMINGS=1`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Phases measured from the start of a run, in microseconds (0 = not reached).
#[derive(Debug)]
pub struct Timings {
    start: Instant,
    enabled: bool,
    first_output_us: AtomicU64,
    init_ready_us: AtomicU64,
}

impl Timings {
    /// Starts the clock now; printing follows `SUPERMACHINE_TIMINGS`.
    pub fn start() -> Self {
        Self::start_at(Instant::now())
    }

    /// A clock that never prints (for a stand-in that records nothing).
    pub fn off() -> Self {
        Self {
            start: Instant::now(),
            enabled: false,
            first_output_us: AtomicU64::new(0),
            init_ready_us: AtomicU64::new(0),
        }
    }

    /// Starts the clock at `start` (e.g. the process's start).
    pub fn start_at(start: Instant) -> Self {
        let enabled = std::env::var_os("SUPERMACHINE_TIMINGS").is_some_and(|v| v != "0");
        Self {
            start,
            enabled,
            first_output_us: AtomicU64::new(0),
            init_ready_us: AtomicU64::new(0),
        }
    }

    /// Microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Prints `[timing] phase=Nus` when enabled.
    pub fn phase(&self, name: &str) {
        if self.enabled {
            eprintln!("[timing] {name}={}us", self.now_us());
        }
    }

    /// Records the first guest console byte (once).
    pub fn first_output(&self) {
        if self.first_output_us.load(Ordering::Relaxed) == 0 {
            let t = self.now_us().max(1);
            if self
                .first_output_us
                .compare_exchange(0, t, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
                && self.enabled
            {
                eprintln!("[timing] first_guest_output={t}us");
            }
        }
    }

    /// Records that the guest init reported ready (once).
    pub fn init_ready(&self) {
        let t = self.now_us().max(1);
        if self
            .init_ready_us
            .compare_exchange(0, t, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && self.enabled
        {
            eprintln!("[timing] init_ready={t}us");
        }
    }

    /// When the guest init reported ready, if it did.
    pub fn init_ready_us(&self) -> Option<u64> {
        match self.init_ready_us.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }
}
