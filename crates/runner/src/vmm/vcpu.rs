//! vCPU threads: each one creates its vCPU (HVF binds a vCPU to its creating
//! thread), then runs a small state machine driven by [`VcpuEvent`]s, the shape
//! Firecracker's `VcpuEvent` has:
//!
//! ```text
//!            Boot / SaveState / RestoreState / Pause (answered in place)
//!              ┌──────┐
//!   created ─► parked ──Resume──► running ──Pause (after a kick)──► parked
//!                 │                   │
//!                 └──Stop / VM end────┴──────────────────────────► thread ends
//! ```
//!
//! A request reaches a running vCPU through its channel plus a kick: the kick
//! makes `run` return [`VcpuExit::Interrupted`] at once (or at the next entry if
//! it lands while the exit is being handled), and only then is the channel read,
//! so a running vCPU pays nothing per exit for being controllable. Every I/O
//! exit is completed (`set_io_result` + the next entry) before a vCPU parks, so
//! the state read while parked is consistent (KVM API, `immediate_exit`).

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, PoisonError};

use devices::{BusEvent, WriteOutcome};
use hypervisor::{BootState, Vcpu, VcpuError, VcpuExit, VcpuKicker, VcpuState, Vm, VmError};

use super::{Core, GuestExit, RunError, RunOutcome};

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
pub(super) enum VcpuEvent {
    /// Set the boot entry state (parked only).
    Boot(Box<BootState>),
    /// Enter (or keep running) the guest.
    Resume,
    /// Leave the guest and park.
    Pause,
    /// Read the full vCPU state (parked only).
    SaveState,
    /// Load a saved vCPU state (parked only).
    RestoreState(Box<VcpuState>),
    /// Confine this thread (parked only).
    Sandbox(Arc<crate::sandbox::Sandbox>),
    /// End the thread.
    Stop,
}

/// What a vCPU thread answers.
pub(super) enum VcpuResponse {
    /// The vCPU exists; this kicks it out of the guest.
    Created(Box<dyn VcpuKicker>),
    /// The vCPU could not be created.
    CreateFailed(VmError),
    /// Parked.
    Paused,
    /// Entering the guest.
    Resumed,
    /// The boot state is set.
    Booted,
    /// The state, read on the vCPU's own thread.
    Saved(Box<VcpuState>),
    /// The state is loaded.
    Restored,
    /// The thread is confined.
    Sandboxed,
    /// The thread could not be confined.
    SandboxFailed(crate::sandbox::SandboxError),
    /// A parked-only request reached a running vCPU.
    NotPaused,
    /// The backend refused the request.
    Failed(VcpuError),
}

impl std::fmt::Debug for VcpuResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Created(_) => "Created",
            Self::CreateFailed(_) => "CreateFailed",
            Self::Paused => "Paused",
            Self::Resumed => "Resumed",
            Self::Booted => "Booted",
            Self::Saved(_) => "Saved",
            Self::Restored => "Restored",
            Self::Sandboxed => "Sandboxed",
            Self::SandboxFailed(_) => "SandboxFailed",
            Self::NotPaused => "NotPaused",
            Self::Failed(_) => "Failed",
        })
    }
}

/// How a spell of running ended.
enum Ran {
    /// Asked to pause: parked again.
    Parked,
    /// The VM ended (this vCPU's exit, another's, or a stop).
    Ended,
}

/// The body of vCPU thread `id`.
pub(super) fn vcpu_main<V: Vm>(
    id: u32,
    core: Arc<Core<V>>,
    events: Receiver<VcpuEvent>,
    resp: Sender<VcpuResponse>,
) {
    let mut vcpu = match core.vm.create_vcpu(id) {
        Ok(v) => v,
        Err(e) => {
            let _ = resp.send(VcpuResponse::CreateFailed(e));
            return;
        }
    };
    if resp
        .send(VcpuResponse::Created(Box::new(vcpu.kicker())))
        .is_err()
    {
        return;
    }
    // Parked: answer requests until told to run or to end. A closed channel
    // means the VMM is gone.
    while let Ok(event) = events.recv() {
        let answer = match event {
            VcpuEvent::Stop => return,
            VcpuEvent::Pause => VcpuResponse::Paused,
            VcpuEvent::Boot(state) => match vcpu.set_boot_state(&state) {
                Ok(()) => VcpuResponse::Booted,
                Err(e) => VcpuResponse::Failed(e),
            },
            VcpuEvent::SaveState => match vcpu.save_state() {
                Ok(s) => VcpuResponse::Saved(Box::new(s)),
                Err(e) => VcpuResponse::Failed(e),
            },
            VcpuEvent::RestoreState(state) => match vcpu.restore_state(&state) {
                Ok(()) => VcpuResponse::Restored,
                Err(e) => VcpuResponse::Failed(e),
            },
            VcpuEvent::Sandbox(s) => match s.enter_thread(crate::sandbox::ThreadClass::Vcpu) {
                Ok(()) => VcpuResponse::Sandboxed,
                Err(e) => VcpuResponse::SandboxFailed(e),
            },
            VcpuEvent::Resume => {
                if id == 0 {
                    core.timings.phase("first_vcpu_entry");
                }
                if resp.send(VcpuResponse::Resumed).is_err() {
                    return;
                }
                match run(&core, &mut vcpu, &events, &resp) {
                    Ran::Parked => continue,
                    Ran::Ended => return,
                }
            }
        };
        if resp.send(answer).is_err() {
            return;
        }
    }
}

/// Runs the guest until a pause request or the end of the VM.
fn run<V: Vm>(
    core: &Core<V>,
    vcpu: &mut V::Vcpu,
    events: &Receiver<VcpuEvent>,
    resp: &Sender<VcpuResponse>,
) -> Ran {
    loop {
        if core.end.is_ending() {
            return Ran::Ended;
        }
        match dispatch(core, vcpu) {
            Ok(Step::Kicked) => loop {
                match events.try_recv() {
                    Ok(VcpuEvent::Pause) => {
                        let _ = resp.send(VcpuResponse::Paused);
                        return Ran::Parked;
                    }
                    Ok(VcpuEvent::Stop) | Err(TryRecvError::Disconnected) => return Ran::Ended,
                    Ok(VcpuEvent::Resume) => {
                        let _ = resp.send(VcpuResponse::Resumed);
                    }
                    Ok(
                        VcpuEvent::Boot(_)
                        | VcpuEvent::SaveState
                        | VcpuEvent::RestoreState(_)
                        | VcpuEvent::Sandbox(_),
                    ) => {
                        let _ = resp.send(VcpuResponse::NotPaused);
                    }
                    Err(TryRecvError::Empty) => break,
                }
            },
            Ok(Step::Continue) => {}
            Ok(Step::End(outcome)) => {
                core.end.finish(Ok(outcome));
                return Ran::Ended;
            }
            Err(e) => {
                core.end.finish(Err(e));
                return Ran::Ended;
            }
        }
    }
}

/// What one exit means for the run loop.
enum Step {
    /// Handled; enter the guest again.
    Continue,
    /// Another thread kicked the vCPU: look at the channel.
    Kicked,
    /// The guest ended the VM.
    End(RunOutcome),
}

/// Enters the guest once and handles the exit.
fn dispatch<V: Vm>(core: &Core<V>, vcpu: &mut V::Vcpu) -> Result<Step, RunError> {
    let id = vcpu.id();
    let exit = vcpu.run()?;
    Ok(match exit {
        VcpuExit::IoOut { port, data } => match core.pio.write(u64::from(port), data.as_slice()) {
            WriteOutcome::Event(ev) => Step::End(event_outcome(core, ev)),
            _ => Step::Continue,
        },
        VcpuExit::IoIn { port, size } => {
            let mut buf = [0xffu8; 8];
            let b = &mut buf[..usize::from(size).min(8)];
            // Unclaimed ports read as all ones, as on a PC with nothing there.
            let _claimed = core.pio.read(u64::from(port), b);
            if let Err(e) = vcpu.set_io_result(b) {
                return Err(e.into());
            }
            Step::Continue
        }
        VcpuExit::MmioWrite { addr, data } => match core.mmio.write(addr, data.as_slice()) {
            WriteOutcome::Event(ev) => Step::End(event_outcome(core, ev)),
            _ => Step::Continue,
        },
        VcpuExit::MmioRead { addr, size } => {
            let mut buf = [0xffu8; 8];
            let b = &mut buf[..usize::from(size).min(8)];
            let _claimed = core.mmio.read(addr, b);
            if let Err(e) = vcpu.set_io_result(b) {
                return Err(e.into());
            }
            Step::Continue
        }
        VcpuExit::Halted => Step::End(outcome(core, GuestExit::Halted)),
        VcpuExit::Shutdown => Step::End(outcome(core, GuestExit::PowerOff)),
        VcpuExit::Reset => Step::End(outcome(core, GuestExit::Reset)),
        VcpuExit::Interrupted => Step::Kicked,
        VcpuExit::Unhandled { reason } => return Err(RunError::Unhandled { id, reason }),
    })
}

fn outcome<V: Vm>(core: &Core<V>, exit: GuestExit) -> RunOutcome {
    RunOutcome {
        exit,
        status: core
            .power
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .exit_status(),
    }
}

fn event_outcome<V: Vm>(core: &Core<V>, ev: BusEvent) -> RunOutcome {
    match ev {
        BusEvent::PowerOff { .. } => outcome(core, GuestExit::PowerOff),
        BusEvent::Reset { .. } => outcome(core, GuestExit::Reset),
    }
}
