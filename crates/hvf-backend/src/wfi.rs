//! Where a vCPU that executed WFI waits: until its virtual timer's deadline or
//! until something that may give it an interrupt happens (a kick, a device
//! interrupt, a PSCI CPU_ON), whichever is first, on a condition variable:
//! never a polling loop.
//!
//! Wake-ups are counted (an epoch), and a waiter passes the epoch it read before
//! it looked at its own state, so an event between that look and the wait is not
//! lost: the wait returns at once.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// Host time for the waiter: ticks of the host counter and their length.
pub trait Clock {
    /// The host counter now (`mach_absolute_time` on a Mac).
    fn now(&self) -> u64;
    /// How long `ticks` of it last.
    fn duration(&self, ticks: u64) -> Duration;
}

/// Why [`Wakeup::wait`] returned, and how often it slept to get there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Woken {
    /// Something happened (the epoch moved), as opposed to the deadline passing.
    pub event: bool,
    /// Times the thread blocked on the condition variable (one, unless it was
    /// woken spuriously or early).
    pub sleeps: u32,
}

/// The wake-up point all vCPUs of a VM share.
#[derive(Debug, Default)]
pub struct Wakeup {
    epoch: Mutex<u64>,
    cv: Condvar,
}

impl Wakeup {
    /// The current epoch: read it before looking at what would end a wait.
    pub fn epoch(&self) -> u64 {
        *self.epoch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Something happened: every waiter returns.
    pub fn notify(&self) {
        let mut e = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        *e = e.wrapping_add(1);
        self.cv.notify_all();
    }

    /// Blocks until the epoch is no longer `seen` (an event), or `clock` reaches
    /// `deadline` (host ticks; `None`: no deadline).
    pub fn wait(&self, seen: u64, deadline: Option<u64>, clock: &impl Clock) -> Woken {
        let mut sleeps = 0;
        let mut e = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if *e != seen {
                return Woken {
                    event: true,
                    sleeps,
                };
            }
            sleeps += 1;
            e = match deadline {
                None => self.cv.wait(e).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let now = clock.now();
                    if now >= d {
                        return Woken {
                            event: false,
                            sleeps: sleeps - 1,
                        };
                    }
                    self.cv
                        .wait_timeout(e, clock.duration(d - now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    /// A clock whose ticks are microseconds of real time from its creation, and
    /// which counts how often it is read (a busy poll would read it constantly).
    struct FakeClock {
        start: Instant,
        reads: AtomicU64,
    }

    impl FakeClock {
        fn new() -> Self {
            Self {
                start: Instant::now(),
                reads: AtomicU64::new(0),
            }
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> u64 {
            self.reads.fetch_add(1, Ordering::Relaxed);
            u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
        }
        fn duration(&self, ticks: u64) -> Duration {
            Duration::from_micros(ticks)
        }
    }

    #[test]
    fn it_wakes_at_the_deadline_after_one_sleep() {
        let w = Wakeup::default();
        let clock = FakeClock::new();
        let seen = w.epoch();
        let deadline = clock.now() + 30_000;
        let woken = w.wait(seen, Some(deadline), &clock);
        assert!(!woken.event);
        assert!(clock.now() >= deadline, "returned before the deadline");
        // One sleep to the deadline (a spurious wake-up may add one), and the
        // clock read once per sleep and once at the end: no polling.
        assert!(woken.sleeps <= 2, "{woken:?}");
        assert!(clock.reads.load(Ordering::Relaxed) <= 6);
    }

    #[test]
    fn a_deadline_already_past_returns_without_sleeping() {
        let w = Wakeup::default();
        let clock = FakeClock::new();
        let woken = w.wait(w.epoch(), Some(0), &clock);
        assert_eq!(
            woken,
            Woken {
                event: false,
                sleeps: 0
            }
        );
    }

    #[test]
    fn a_kick_wakes_it_at_once_long_before_the_deadline() {
        let w = Arc::new(Wakeup::default());
        let clock = FakeClock::new();
        let seen = w.epoch();
        let kicker = {
            let w = w.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                w.notify();
            })
        };
        // A deadline an hour away, and one with none at all.
        let t = Instant::now();
        let woken = w.wait(seen, Some(clock.now() + 3_600_000_000), &clock);
        assert!(woken.event && woken.sleeps <= 2, "{woken:?}");
        assert!(t.elapsed() < Duration::from_secs(60));
        kicker.join().unwrap();
        let seen = w.epoch();
        let kicker = {
            let w = w.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                w.notify();
            })
        };
        let woken = w.wait(seen, None, &clock);
        assert!(woken.event && woken.sleeps <= 2, "{woken:?}");
        kicker.join().unwrap();
    }

    #[test]
    fn an_event_before_the_wait_is_not_lost() {
        let w = Wakeup::default();
        let clock = FakeClock::new();
        let seen = w.epoch();
        // A device interrupt between the vCPU's look at its state and its wait.
        w.notify();
        let woken = w.wait(seen, None, &clock);
        assert_eq!(
            woken,
            Woken {
                event: true,
                sleeps: 0
            }
        );
    }
}
