//! The virtual timer's interrupt when the framework's GIC is not in use.
//!
//! Hypervisor.framework reports a firing virtual timer as a
//! `HV_EXIT_REASON_VTIMER_ACTIVATED` exit and masks the timer, so it cannot fire
//! again until the VMM unmasks it. Without the in-framework GIC the VMM is the
//! interrupt controller: it holds the vCPU's IRQ line asserted while the timer's
//! condition holds (CNTV_CTL_EL0: ENABLE and ISTATUS set, IMASK clear) and
//! unmasks the timer only once the guest has dealt with it (a new compare value,
//! IMASK, or the timer disabled). Unmasking at once instead would exit again on
//! the next entry, an exit storm, and never lowering the line would leave the
//! guest an interrupt it already took. The framework clears a pending interrupt
//! after every `hv_vcpu_run`, so the level is set before each entry. QEMU's
//! `hvf_sync_vtimer` and libkrun's vCPU loop do the same.

/// CNTV_CTL_EL0 (Arm ARM, CNTV_CTL_EL0): ENABLE (bit 0), IMASK (bit 1), ISTATUS (bit 2).
pub const CNTV_CTL_ENABLE: u64 = 1 << 0;
pub const CNTV_CTL_IMASK: u64 = 1 << 1;
pub const CNTV_CTL_ISTATUS: u64 = 1 << 2;

/// Whether the timer asks for its interrupt now.
pub fn asserted(cntv_ctl: u64) -> bool {
    cntv_ctl & (CNTV_CTL_ENABLE | CNTV_CTL_IMASK | CNTV_CTL_ISTATUS)
        == CNTV_CTL_ENABLE | CNTV_CTL_ISTATUS
}

/// What to do before the next `hv_vcpu_run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeforeRun {
    /// The level of the vCPU's IRQ line for this entry.
    pub irq: bool,
    /// Unmask the timer (`hv_vcpu_set_vtimer_mask(false)`).
    pub unmask: bool,
}

/// One vCPU's timer-interrupt state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Vtimer {
    /// The framework masked the timer at its last activation and it is not
    /// unmasked yet.
    masked: bool,
}

impl Vtimer {
    /// A `HV_EXIT_REASON_VTIMER_ACTIVATED` exit: the framework masked the timer.
    pub fn activated(&mut self) {
        self.masked = true;
    }

    /// Before an entry, with CNTV_CTL_EL0 as the guest left it: the IRQ level, and
    /// whether the timer may be unmasked. An unmasked timer exits by itself when it
    /// fires, so its line stays low until then.
    pub fn before_run(&mut self, cntv_ctl: impl FnOnce() -> u64) -> BeforeRun {
        if !self.masked {
            return BeforeRun {
                irq: false,
                unmask: false,
            };
        }
        let irq = asserted(cntv_ctl());
        if !irq {
            self.masked = false;
        }
        BeforeRun { irq, unmask: !irq }
    }

    /// Whether the timer is held masked (after a restore the framework's mask is
    /// off: the state starts unmasked).
    pub fn is_masked(&self) -> bool {
        self.masked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The framework and a guest with a periodic timer, entry by entry: the
    /// framework exits with VTIMER_ACTIVATED when the unmasked timer's condition
    /// holds (and masks it); the guest takes the interrupt when its line is high
    /// at entry and then programs the next expiry (its handler, which clears
    /// ISTATUS), or with `ignore` leaves the condition standing for a while.
    struct Sim {
        now: u64,
        cval: u64,
        ctl: u64,
        framework_masked: bool,
        vt: Vtimer,
        expiries: u32,
        taken: u32,
        exits: u32,
    }

    impl Sim {
        fn new() -> Self {
            Self {
                now: 0,
                cval: 10,
                ctl: CNTV_CTL_ENABLE,
                framework_masked: false,
                vt: Vtimer::default(),
                expiries: 0,
                taken: 0,
                exits: 0,
            }
        }

        fn istatus(&mut self) {
            if self.now >= self.cval {
                self.ctl |= CNTV_CTL_ISTATUS;
            } else {
                self.ctl &= !CNTV_CTL_ISTATUS;
            }
        }

        /// One entry: returns whether the guest took an interrupt.
        fn step(&mut self, handler_delay: &mut u32) -> bool {
            self.istatus();
            let ctl = self.ctl;
            let act = self.vt.before_run(|| ctl);
            if act.unmask {
                self.framework_masked = false;
            }
            let mut took = false;
            if act.irq {
                // The guest's handler: maybe not yet (interrupts masked a while).
                if *handler_delay > 0 {
                    *handler_delay -= 1;
                } else {
                    took = true;
                    self.taken += 1;
                    self.cval = self.now + 10;
                    self.istatus();
                }
            }
            // The guest runs a tick of time; a firing unmasked timer exits.
            self.now += 1;
            self.istatus();
            if !self.framework_masked && asserted(self.ctl) {
                self.framework_masked = true;
                self.expiries += 1;
                self.exits += 1;
                self.vt.activated();
            }
            took
        }
    }

    #[test]
    fn the_timer_fires_once_per_expiry_and_is_taken_once() {
        let mut sim = Sim::new();
        let mut delay = 0;
        for _ in 0..1_000 {
            sim.step(&mut delay);
        }
        // An expiry in the last entry is taken at the next one.
        while sim.vt.is_masked() {
            sim.step(&mut delay);
        }
        // A period of 10 ticks plus the tick the handler's entry takes: ~90
        // expiries in 1,000 ticks, every one of them taken exactly once.
        assert!(sim.expiries >= 80, "{}", sim.expiries);
        assert_eq!(sim.taken, sim.expiries);
        assert_eq!(sim.exits, sim.expiries, "no exit without an expiry");
    }

    #[test]
    fn the_line_stays_high_and_the_timer_masked_while_the_guest_has_not_handled_it() {
        let mut sim = Sim::new();
        let mut delay = 0;
        while sim.expiries == 0 {
            sim.step(&mut delay);
        }
        // The guest keeps interrupts masked for 50 entries: the line is high at
        // each of them, the timer stays masked, and no further exit happens.
        delay = 50;
        let exits = sim.exits;
        for _ in 0..50 {
            let ctl = sim.ctl;
            assert!(asserted(ctl));
            assert!(!sim.step(&mut delay));
            assert!(sim.vt.is_masked());
        }
        assert_eq!(sim.exits, exits, "an exit storm while the condition held");
        // Then it takes the interrupt once, and the timer is unmasked at the next
        // entry.
        assert!(sim.step(&mut delay));
        sim.step(&mut delay);
        assert!(!sim.vt.is_masked());
        assert_eq!(sim.taken, 1);
    }

    #[test]
    fn masking_or_disabling_the_timer_lowers_the_line_and_unmasks() {
        for clear in [CNTV_CTL_IMASK, 0] {
            let mut vt = Vtimer::default();
            vt.activated();
            let firing = CNTV_CTL_ENABLE | CNTV_CTL_ISTATUS;
            assert_eq!(
                vt.before_run(|| firing),
                BeforeRun {
                    irq: true,
                    unmask: false
                }
            );
            // The guest sets IMASK, or turns the timer off (ENABLE clear).
            let ctl = if clear == 0 {
                CNTV_CTL_ISTATUS
            } else {
                firing | clear
            };
            assert_eq!(
                vt.before_run(|| ctl),
                BeforeRun {
                    irq: false,
                    unmask: true
                }
            );
            // Unmasked: the line is low and CNTV_CTL is not even read.
            assert_eq!(
                vt.before_run(|| unreachable!()),
                BeforeRun {
                    irq: false,
                    unmask: false
                }
            );
        }
    }
}
