//! The VMM core: a [`Vmm`] is a built VM (guest memory, interrupt controller,
//! buses, virtio transports, one parked thread per vCPU, the device event loop)
//! that other code holds and acts on: start it, pause and resume it, read its
//! whole state, stop it, wait for its end. [`Vmm::snapshot`] writes a paused
//! one to a snapshot file, and [`Vmm::restore`] builds one from such a file
//! (its RAM mapped copy-on-write) instead of from a kernel. [`run`] is build +
//! start + wait.

mod snapshot;
mod state;
#[cfg(target_os = "linux")]
mod teardown;
mod vcpu;

pub use snapshot::{Snapshot, SnapshotState};
pub use state::{DeviceStates, VirtioDeviceState, VirtioState, VmmState};

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use devices::{Bus, Interrupt, InterruptError};
use hypervisor::{BootState, Hypervisor, IrqLine, MemoryRegion, VcpuKicker, Vm, VmConfig, VmStart};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch;
use crate::console::ConsoleOut;
use crate::resources::{ResourceError, VmResources};
use crate::timings::Timings;
use vcpu::{VcpuEvent, VcpuResponse};

/// Errors building or running a VM.
#[derive(Debug, Error)]
pub enum RunError {
    /// The VM description is invalid.
    #[error(transparent)]
    Resources(#[from] ResourceError),
    /// The hypervisor refused to create the VM.
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    /// A VM-level operation failed.
    #[error(transparent)]
    Vm(#[from] hypervisor::VmError),
    /// A vCPU operation failed.
    #[error(transparent)]
    Vcpu(#[from] hypervisor::VcpuError),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {size} bytes of guest memory")]
    Memory {
        /// Bytes requested.
        size: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Setting up the architecture's platform (kernel and initramfs loading,
    /// firmware tables or device tree) failed.
    #[error(transparent)]
    Platform(#[from] arch::PlatformError),
    /// Wiring a device failed.
    #[error("cannot attach {what}")]
    Device {
        /// Which device.
        what: &'static str,
        /// The bus error.
        #[source]
        source: devices::BusError,
    },
    /// A virtio device could not be attached.
    #[error(transparent)]
    Virtio(#[from] crate::virtio::VirtioAttachError),
    /// The device event loop could not be started, or failed while the VM ran.
    #[error("the device event loop failed")]
    DeviceEvents(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A saved state does not fit the VM built from these resources.
    #[error("the saved state does not fit this VM: {what}")]
    StateMismatch {
        /// What differs.
        what: String,
    },
    /// Restoring a device from its saved state failed.
    #[error("cannot restore {what}")]
    RestoreDevice {
        /// Which device.
        what: String,
        /// The device's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The snapshot file could not be read, written or mapped.
    #[error(transparent)]
    Snapshot(#[from] ::snapshot::SnapshotError),
    /// Restored guest memory could not be assembled.
    #[error("cannot set up restored guest memory")]
    RestoredMemory(#[source] vm_memory::GuestRegionCollectionError),
    /// Starting or restoring the built VM failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread {id}")]
    Thread {
        /// vCPU index.
        id: u32,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The guest did something the VMM cannot handle.
    #[error("vCPU {id} stopped: {reason}")]
    Unhandled {
        /// vCPU index.
        id: u32,
        /// What happened.
        reason: String,
    },
}

/// How the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off (ACPI S5 / PSCI SYSTEM_OFF).
    PowerOff,
    /// The guest reset (reboot, triple fault, or a kernel panic with `panic=-1`).
    Reset,
    /// Every vCPU halted with nothing left to wake it.
    Halted,
    /// The VMM ended the run through a [`StopHandle`] (a deadline or a stop
    /// request), whatever the guest was doing.
    Stopped,
}

/// The result of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// How the guest ended.
    pub exit: GuestExit,
    /// The exit status the guest wrote to the power device (0 if it wrote none).
    pub status: u32,
}

impl RunOutcome {
    /// The process exit code for this outcome: the guest's status (truncated to
    /// 0..=255 as a process exit code is) for a power-off; for a reset or a halt,
    /// which end a run only when something went wrong (the default command line
    /// turns a kernel panic into a reset), the status or 1 if it is 0.
    pub fn exit_code(&self) -> i32 {
        let code = (self.status & 0xff) as i32;
        match self.exit {
            GuestExit::PowerOff => code,
            GuestExit::Reset | GuestExit::Halted | GuestExit::Stopped if code == 0 => 1,
            GuestExit::Reset | GuestExit::Halted | GuestExit::Stopped => code,
        }
    }
}

/// What an architecture's platform setup hands to the generic VMM: the device
/// buses, the devices whose state a snapshot keeps, and the boot CPU's entry
/// state.
pub struct Platform {
    /// x86 port-I/O bus (empty on aarch64).
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// The console UART.
    pub serial: Arc<Mutex<devices::serial::Serial<ConsoleOut>>>,
    /// The i8042 (x86 only).
    pub i8042: Option<Arc<Mutex<devices::i8042::I8042>>>,
    /// The power block; its exit-status register is read when the run ends.
    pub power: Arc<Mutex<devices::power::PowerDevice>>,
    /// The boot CPU's entry state; `None` when the platform was built from a
    /// saved state (the vCPUs get theirs back instead).
    pub boot: Option<BootState>,
    /// The virtio devices on the MMIO bus.
    pub virtio: Vec<crate::virtio::Attached>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("boot", &self.boot)
            .finish_non_exhaustive()
    }
}

/// Adapts a backend interrupt line to the devices' [`Interrupt`] trait.
pub(crate) struct LineInterrupt<L: IrqLine> {
    gsi: u32,
    line: L,
}

impl<L: IrqLine> LineInterrupt<L> {
    /// Wraps `line`, which is wired to interrupt controller input `gsi`.
    pub(crate) fn new(gsi: u32, line: L) -> Self {
        Self { gsi, line }
    }
}

impl<L: IrqLine> Interrupt for LineInterrupt<L> {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.line
            .trigger()
            .map_err(|e| InterruptError::new(self.gsi, e))
    }
    fn set_level(&self, asserted: bool) -> Result<(), InterruptError> {
        self.line
            .set_level(asserted)
            .map_err(|e| InterruptError::new(self.gsi, e))
    }
}

/// Errors of the operations on a built [`Vmm`].
#[derive(Debug, Error)]
pub enum ControlError {
    /// The VM has ended (the guest powered off, a vCPU failed, or it was stopped);
    /// [`Vmm::wait`] says how.
    #[error("the VM has ended")]
    Ended,
    /// The operation needs a paused VM.
    #[error("the VM must be paused to {what}")]
    NotPaused {
        /// The operation.
        what: &'static str,
    },
    /// A vCPU refused the request.
    #[error("vCPU {id} could not {what}")]
    Vcpu {
        /// vCPU index.
        id: u32,
        /// The operation.
        what: &'static str,
        /// The backend's error.
        #[source]
        source: hypervisor::VcpuError,
    },
    /// Reading or loading VM-wide state failed.
    #[error("cannot {what} the VM-wide state")]
    Vm {
        /// The operation.
        what: &'static str,
        /// The backend's error.
        #[source]
        source: hypervisor::VmError,
    },
    /// The sandbox could not be entered.
    #[error("cannot sandbox the VMM")]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// A vCPU answered out of turn (a VMM bug).
    #[error("vCPU {id} answered {answer} to a request to {what}")]
    Protocol {
        /// vCPU index.
        id: u32,
        /// The operation.
        what: &'static str,
        /// What it answered.
        answer: String,
    },
}

/// How a run ends, shared by the vCPU threads, the device event loop, the
/// [`Vmm`] and every [`StopHandle`]. The first outcome recorded wins; recording
/// one parks nothing: it tells every vCPU thread to end and kicks it out of the
/// guest.
struct End {
    ending: AtomicBool,
    outcome: Mutex<Option<Result<RunOutcome, RunError>>>,
    ended: Condvar,
    /// Set once every vCPU exists.
    kickers: OnceLock<Vec<Box<dyn VcpuKicker>>>,
    /// Each vCPU thread's request channel.
    events: OnceLock<Vec<Sender<VcpuEvent>>>,
}

impl End {
    fn new() -> Self {
        Self {
            ending: AtomicBool::new(false),
            outcome: Mutex::new(None),
            ended: Condvar::new(),
            kickers: OnceLock::new(),
            events: OnceLock::new(),
        }
    }

    fn is_ending(&self) -> bool {
        self.ending.load(Ordering::Relaxed)
    }

    /// Records `r` if nothing was recorded yet and ends every vCPU thread.
    fn finish(&self, r: Result<RunOutcome, RunError>) {
        {
            let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
            if o.is_none() {
                *o = Some(r);
            }
            self.ending.store(true, Ordering::SeqCst);
        }
        self.ended.notify_all();
        if let Some(events) = self.events.get() {
            for tx in events {
                // A thread that already ended has dropped its receiver.
                let _ = tx.send(VcpuEvent::Stop);
            }
        }
        self.kick_all();
    }

    fn kick_all(&self) {
        for k in self.kickers.get().into_iter().flatten() {
            k.kick();
        }
    }

    /// Blocks until an outcome is recorded.
    fn wait(&self) {
        let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        while o.is_none() {
            o = self.ended.wait(o).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Ends a run from another thread: every vCPU leaves the guest and the run
/// ends with [`GuestExit::Stopped`] (unless it had already ended otherwise).
#[derive(Clone)]
pub struct StopHandle(Arc<End>);

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("ending", &self.0.is_ending())
            .finish()
    }
}

impl StopHandle {
    /// A handle no VM of this crate owns: [`StopHandle::stop`] only marks it
    /// ending. For endpoints served over a vsock device the caller drives
    /// itself (a device model under test, a simulated guest), which stop when
    /// their handle says the run is ending.
    pub fn detached() -> Self {
        Self(Arc::new(End::new()))
    }

    /// Asks the run to end now.
    pub fn stop(&self) {
        self.0.finish(Ok(RunOutcome {
            exit: GuestExit::Stopped,
            status: 0,
        }));
    }

    /// Whether the run has ended or is ending.
    pub fn is_ending(&self) -> bool {
        self.0.is_ending()
    }
}

/// What the vCPU threads share: the VM and the buses their exits go to.
pub(crate) struct Core<V: Vm> {
    vm: V,
    pio: Bus,
    mmio: Bus,
    power: Arc<Mutex<devices::power::PowerDevice>>,
    /// The VMGenID notification (x86), made once: every restore raises it.
    generation: Option<V::IrqLine>,
    end: Arc<End>,
    timings: Arc<Timings>,
}

/// Where the vCPUs are in their life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Built, never run.
    Created,
    /// In the guest.
    Running,
    /// Parked by [`Vmm::pause`].
    Paused,
}

/// The controller's side of the vCPU threads, under one lock so that requests
/// and their answers never interleave.
struct Control {
    phase: Phase,
    responses: Vec<Receiver<VcpuResponse>>,
}

/// A built VM. Dropping it stops the VM and joins its threads.
pub struct Vmm<V: Vm + 'static> {
    // Field order is drop order. Every thread has ended before the fields drop
    // (`shutdown`). Then the VM and the devices (`core`) go, then the stopped
    // device event loop's I/O event registrations (after the VM, so its
    // destruction releases them instead of one grace period each), and guest
    // memory is unmapped last, once the hypervisor has let go of it.
    threads: Vec<JoinHandle<()>>,
    core: Arc<Core<V>>,
    device_events: Option<crate::virtio::DeviceEvents>,
    serial: Arc<Mutex<devices::serial::Serial<ConsoleOut>>>,
    i8042: Option<Arc<Mutex<devices::i8042::I8042>>>,
    virtio: Vec<crate::virtio::Attached>,
    control: Mutex<Control>,
    boot: Mutex<Option<BootState>>,
    end: Arc<End>,
    vcpus: u32,
    /// What it was built from (a snapshot records them).
    resources: VmResources,
    mem: Arc<GuestMemoryMmap>,
    /// Set while the Vmm is dropped, and dropped last: the helper that destroys
    /// the VM off the caller's path (`teardown`).
    reaper: Option<Reaper>,
}

#[cfg(target_os = "linux")]
type Reaper = teardown::Reaper;
#[cfg(not(target_os = "linux"))]
type Reaper = ();

/// Guest RAM from this address up is backed by transparent huge pages where the
/// host allows (`madvise` mode or `always`). Below it stay 4 KiB pages: a tiny
/// guest touches only its first pages there (boot tables, a small kernel at
/// 1 MiB) and must not pay 2 MiB of RSS for them.
#[cfg(target_os = "linux")]
const HUGE_PAGES_FROM: u64 = 2 << 20;

/// Asks the host for transparent huge pages over guest RAM (from
/// `HUGE_PAGES_FROM`): loading Debian's 14 MB bzImage into fresh anonymous
/// memory otherwise takes 3,500 page faults of about 3 us each here (9-12 ms
/// median; 4 ms with huge pages), and the guest pays the same again for
/// everything it touches. Advice only: a host without THP ignores it, and
/// nothing fails if it is refused.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    #[cfg(target_os = "linux")]
    for r in mem.iter() {
        let start = r.start_addr().0;
        let skip = HUGE_PAGES_FROM.saturating_sub(start).min(r.len());
        let len = r.len() - skip;
        if len == 0 {
            continue;
        }
        let addr = (r.as_ptr() as usize + skip as usize) as *mut libc::c_void;
        // SAFETY: `addr .. addr + len` lies inside the live anonymous mapping of
        // region `r` (skip <= r.len()), which `mem` owns; MADV_HUGEPAGE only
        // changes how the kernel backs the range, never its contents.
        let rc = unsafe { libc::madvise(addr, len as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(
                "transparent huge pages not available for guest RAM: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mem;
}

/// The helper that takes the VM's destruction off the caller's path, where the
/// host has one (Linux, `teardown`).
fn spawn_reaper() -> Option<Reaper> {
    #[cfg(target_os = "linux")]
    return teardown::Reaper::spawn();
    #[cfg(not(target_os = "linux"))]
    None
}

impl<V: Vm + 'static> std::fmt::Debug for Vmm<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus)
            .field("virtio", &self.virtio)
            .field("ending", &self.end.is_ending())
            .finish_non_exhaustive()
    }
}

/// Builds the VM described by `res` on `hv`, runs it until the guest powers off or
/// resets (or a vCPU fails), and returns how it ended. Guest console output goes to
/// `console`.
pub fn run<H: Hypervisor>(
    hv: &H,
    res: &VmResources,
    console: Box<dyn Write + Send>,
    timings: Arc<Timings>,
) -> Result<RunOutcome, RunError>
where
    H::Vm: 'static,
{
    let vmm = Vmm::build(hv, res, console, timings)?;
    vmm.start()?;
    vmm.wait()
}

impl<V: Vm + 'static> Vmm<V> {
    /// Builds the VM described by `res`: guest memory, devices, firmware tables and
    /// kernel, and one thread per vCPU with its vCPU created and parked. Nothing
    /// runs in the guest until [`Vmm::start`].
    pub fn build<H: Hypervisor<Vm = V>>(
        hv: &H,
        res: &VmResources,
        console: Box<dyn Write + Send>,
        timings: Arc<Timings>,
    ) -> Result<Self, RunError> {
        res.validate()?;
        let mem = Self::fresh_memory(res)?;
        Self::assemble(hv, res, console, timings, mem, None)
    }

    /// Builds a VM from a snapshot file: the resources it was built from (its
    /// disks, sockets and network are opened again), guest RAM mapped
    /// copy-on-write from the file (the file never changes), every device and
    /// vCPU from the saved state, each vCPU's on its own thread. The VM is left
    /// paused: [`Vmm::resume`] (or [`Vmm::start`]) continues the guest where it
    /// was captured.
    pub fn restore<H: Hypervisor<Vm = V>>(
        hv: &H,
        snap: &Snapshot,
        console: Box<dyn Write + Send>,
        timings: Arc<Timings>,
    ) -> Result<Self, RunError> {
        let res = snap.resources();
        res.validate()?;
        let state = &snap.state().vmm;
        if state.vcpus.len() != res.vcpus as usize {
            return Err(RunError::StateMismatch {
                what: format!(
                    "{} vCPUs saved, {} in the resources",
                    state.vcpus.len(),
                    res.vcpus
                ),
            });
        }
        let mem = snap.map_ram(res)?;
        timings.phase("ram_mapped");
        let vmm = Self::assemble(hv, res, console, timings, mem, Some(state))?;
        vmm.restore_vm_state(&state.vm)?;
        {
            let mut ctl = vmm.lock_control();
            vmm.restore_vcpus(&mut ctl, &state.vcpus)?;
            ctl.phase = Phase::Paused;
        }
        vmm.timings().phase("vcpus_restored");
        // Clone safety for kernels with a vmgenid driver: every restore is a
        // new generation.
        arch::new_generation(&vmm.mem, vmm.core.generation.as_ref())?;
        vmm.timings().phase("restored");
        Ok(vmm)
    }

    /// Restores this paused VM, in place, to `snap`, a snapshot of a VM built
    /// from the same resources: guest RAM is mapped copy-on-write from the file
    /// over the old RAM (the old pages, the guest's writes among them, are
    /// dropped, not reused), and the VM, every device and every vCPU take their
    /// saved state. No VM, vCPU, thread, device, interrupt line or console is
    /// made anew, so a restore costs what the state costs: what a pool worker
    /// does for each request. The VM stays paused ([`Vmm::resume`] continues
    /// it where the snapshot was taken), with a new VMGenID generation. The
    /// vsock and network devices (host connections, backends) are not restored
    /// in place yet: a VM with one is refused, as is a snapshot of another VM.
    pub fn restore_in_place(&self, snap: &Snapshot) -> Result<(), RunError> {
        if !cfg!(target_os = "linux") {
            // Whether Hypervisor.framework sees RAM remapped under hv_vm_map is
            // not known (KVM follows through its MMU notifier).
            return Err(RunError::StateMismatch {
                what: "restore in place is built for KVM only so far".into(),
            });
        }
        let state = &snap.state().vmm;
        self.check_in_place(snap)?;
        let mut ctl = self.lock_control();
        if ctl.phase != Phase::Paused {
            return Err(ControlError::NotPaused {
                what: "restore it in place",
            }
            .into());
        }
        self.timings().phase("in_place_start");
        // From the first change on, a failure leaves a VM that is neither the old
        // one nor the snapshot's: it is ended, never resumed.
        let r = (|| {
            snap.remap_ram(&self.mem)?;
            #[cfg(target_os = "linux")]
            teardown::exclude_from_fork(&self.mem);
            self.timings().phase("ram_remapped");
            self.restore_vm_state(&state.vm)?;
            self.restore_devices(&state.devices)?;
            self.timings().phase("devices_restored");
            self.restore_vcpus(&mut ctl, &state.vcpus)?;
            self.timings().phase("vcpus_restored");
            // Before the control lock goes: no resume runs the guest first.
            arch::new_generation(&self.mem, self.core.generation.as_ref())
        })();
        drop(ctl);
        if let Err(e) = &r {
            self.end.finish(Err(RunError::StateMismatch {
                what: format!("an in-place restore failed half-way: {e}"),
            }));
        }
        self.timings().phase("restored");
        r
    }

    /// Everything `restore_in_place` can refuse, before it changes anything.
    fn check_in_place(&self, snap: &Snapshot) -> Result<(), RunError> {
        let mismatch = |what: String| Err(RunError::StateMismatch { what });
        if snap.resources() != &self.resources {
            return mismatch("the snapshot is of a VM built from other resources".into());
        }
        if self.resources.vsock.is_some() || self.resources.network.is_some() {
            return mismatch(
                "a VM with a vsock or network device cannot be restored in place yet".into(),
            );
        }
        let state = &snap.state().vmm;
        if state.vcpus.len() != self.vcpus as usize
            || state.devices.virtio.len() != self.virtio.len()
        {
            return mismatch(format!(
                "{} vCPUs and {} virtio devices saved, {} and {} here",
                state.vcpus.len(),
                state.devices.virtio.len(),
                self.vcpus,
                self.virtio.len()
            ));
        }
        if self.i8042.is_some() != state.devices.i8042.is_some() {
            return mismatch("the i8042 is in only one of the snapshot and this VM".into());
        }
        if state.devices.serial.in_buffer.len() > devices::serial::FIFO_LEN {
            return mismatch(format!(
                "{} bytes of pending console input saved (a UART holds {})",
                state.devices.serial.in_buffer.len(),
                devices::serial::FIFO_LEN
            ));
        }
        for (a, s) in self.virtio.iter().zip(&state.devices.virtio) {
            // A disk's request state is not restored in place yet either.
            if !matches!(s.device, state::VirtioDeviceState::Rng) {
                return mismatch(format!(
                    "the {} device cannot be restored in place yet",
                    s.device.kind()
                ));
            }
            a.transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .check_state(&s.transport)
                .map_err(|e| RunError::RestoreDevice {
                    what: a.what.clone(),
                    source: Box::new(e),
                })?;
        }
        Ok(())
    }

    /// The VM-wide state (interrupt controllers, timers, clock).
    fn restore_vm_state(&self, state: &hypervisor::VmState) -> Result<(), ControlError> {
        self.core
            .vm
            .restore_state(state)
            .map_err(|source| ControlError::Vm {
                what: "restore",
                source,
            })
    }

    /// Each vCPU's saved state, set on its own thread.
    fn restore_vcpus(
        &self,
        ctl: &mut Control,
        states: &[hypervisor::VcpuState],
    ) -> Result<(), ControlError> {
        for (id, s) in states.iter().enumerate() {
            self.request(
                ctl,
                id,
                VcpuEvent::RestoreState(Box::new(s.clone())),
                "restore its state",
                |r| matches!(r, VcpuResponse::Restored),
            )?;
        }
        Ok(())
    }

    /// Puts every device in its saved state, in place.
    fn restore_devices(&self, saved: &DeviceStates) -> Result<(), RunError> {
        fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            m.lock().unwrap_or_else(PoisonError::into_inner)
        }
        let failed = |what: &str| {
            let what = what.to_string();
            move |e: Box<dyn std::error::Error + Send + Sync>| RunError::RestoreDevice {
                what,
                source: e,
            }
        };
        lock(&self.serial)
            .restore(&saved.serial)
            .map_err(|e| failed("the serial console")(Box::new(e)))?;
        if let (Some(d), Some(s)) = (&self.i8042, &saved.i8042) {
            lock(d).restore(s);
        }
        lock(&self.core.power).restore(&saved.power);
        for (a, s) in self.virtio.iter().zip(&saved.virtio) {
            lock(&a.transport)
                .restore(&s.transport)
                .map_err(|e| failed(&a.what)(Box::new(e)))?;
        }
        Ok(())
    }

    /// Writes the paused VM to a snapshot file at `path` (atomically): its
    /// resources, its whole state and guest RAM, where pages the guest never
    /// touched (or that are all zeros) are holes. The VM stays paused.
    pub fn snapshot(&self, path: &std::path::Path) -> Result<(), RunError> {
        self.timings().phase("snapshot_start");
        let state = SnapshotState {
            resources: self.resources.clone(),
            vmm: self.save_state()?,
        };
        self.timings().phase("snapshot_state_saved");
        snapshot::write(path, &state, &self.mem)?;
        self.timings().phase("snapshot_written");
        Ok(())
    }

    /// Fresh guest RAM for `res`: anonymous private mappings.
    fn fresh_memory(res: &VmResources) -> Result<GuestMemoryMmap, RunError> {
        let ranges: Vec<(GuestAddress, usize)> = arch::ram_ranges(res.memory)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|source| RunError::Memory {
                size: res.memory,
                source,
            })?;
        advise_huge_pages(&mem);
        Ok(mem)
    }

    fn assemble<H: Hypervisor<Vm = V>>(
        hv: &H,
        res: &VmResources,
        console: Box<dyn Write + Send>,
        timings: Arc<Timings>,
        mem: GuestMemoryMmap,
        saved: Option<&VmmState>,
    ) -> Result<Self, RunError> {
        // Shared with the virtio devices, which read and write guest memory
        // directly; handed to the hypervisor below.
        let mem = Arc::new(mem);
        #[cfg(target_os = "linux")]
        teardown::exclude_from_fork(&mem);
        let vm = hv.create_vm(&VmConfig {
            vcpus: res.vcpus,
            start: if saved.is_some() {
                VmStart::Restore
            } else {
                VmStart::Boot
            },
        })?;
        timings.phase("vm_created");
        for (slot, region) in mem.iter().enumerate() {
            let r = MemoryRegion {
                slot: slot as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr: region.as_ptr() as usize,
                read_only: false,
            };
            // SAFETY: the region is a live mapping owned by `mem`. The VM is dropped
            // before `mem` on every path: on an error below `vm` is a local declared
            // after `mem`; once built, `Vmm`'s field order drops `core` (the VM) and
            // joins every thread holding it before `mem`; a transport that outlives
            // the `Vmm` (a kept vsock handle) drops its interrupt line, which holds
            // the VM, before its clone of `mem` (its field order, tested). The
            // teardown helper's copy of the VM descriptor outlives the mapping, but
            // every vCPU has ended by then and no `KVM_RUN` is ever made again, so
            // the kernel never touches the range. Nothing else uses that range.
            unsafe { vm.map_memory(&r)? };
        }
        timings.phase("memory_ready");
        vm.create_irqchip()?;

        let Platform {
            pio,
            mmio,
            serial,
            i8042,
            power,
            boot,
            virtio,
        } = arch::setup_platform(&vm, &mem, res, console, &timings, saved.map(|s| &s.devices))?;

        let generation = arch::generation_line(&vm)?;
        let end = Arc::new(End::new());
        let core = Arc::new(Core {
            vm,
            pio,
            mmio,
            power,
            generation,
            end: end.clone(),
            timings: timings.clone(),
        });

        // Every vCPU is created (on its own thread) before any runs: the boot CPU's
        // INIT/SIPI to the others must find them.
        let mut threads = Vec::with_capacity(res.vcpus as usize);
        let mut senders = Vec::with_capacity(res.vcpus as usize);
        let mut responses = Vec::with_capacity(res.vcpus as usize);
        let mut kickers: Vec<Box<dyn VcpuKicker>> = Vec::with_capacity(res.vcpus as usize);
        let mut failure = None;
        for id in 0..res.vcpus {
            let (ev_tx, ev_rx) = mpsc::channel();
            let (resp_tx, resp_rx) = mpsc::channel();
            let c = core.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::vcpu_main(id, c, ev_rx, resp_tx));
            match spawned {
                Ok(t) => threads.push(t),
                Err(source) => {
                    failure = Some(RunError::Thread { id, source });
                    break;
                }
            }
            match resp_rx.recv() {
                Ok(VcpuResponse::Created(k)) => kickers.push(k),
                Ok(VcpuResponse::CreateFailed(e)) => {
                    failure = Some(e.into());
                    break;
                }
                other => {
                    failure = Some(RunError::Unhandled {
                        id,
                        reason: format!("the vCPU thread answered {other:?} at creation"),
                    });
                    break;
                }
            }
            senders.push(ev_tx);
            responses.push(resp_rx);
        }
        // Cannot fail: set once, here.
        let _ = end.kickers.set(kickers);
        let _ = end.events.set(senders);
        let mut vmm = Self {
            threads,
            core,
            device_events: None,
            serial,
            i8042,
            virtio,
            control: Mutex::new(Control {
                phase: Phase::Created,
                responses,
            }),
            boot: Mutex::new(boot),
            end: end.clone(),
            vcpus: res.vcpus,
            resources: res.clone(),
            mem,
            reaper: None,
        };
        if let Some(e) = failure {
            // Dropping `vmm` ends the threads already started.
            return Err(e);
        }
        // Serves the devices' host side (vsock sockets) and their queue
        // notifications (ioeventfd, where the backend has it); a failure there
        // ends the run.
        let on_error = {
            let end = end.clone();
            move |e: Box<dyn std::error::Error + Send + Sync>| {
                end.finish(Err(RunError::DeviceEvents(e)));
            }
        };
        vmm.device_events = Some(
            crate::virtio::DeviceEvents::start(&vmm.core.vm, &vmm.virtio, on_error)
                .map_err(|e| RunError::DeviceEvents(Box::new(e)))?,
        );
        vmm.timings().phase("vmm_built");
        Ok(vmm)
    }

    fn timings(&self) -> &Timings {
        &self.core.timings
    }

    fn lock_control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `event` to vCPU `id` (kicking it out of the guest) and waits for its
    /// answer, which `ok` must accept.
    fn request(
        &self,
        ctl: &mut Control,
        id: usize,
        event: VcpuEvent,
        what: &'static str,
        ok: impl Fn(&VcpuResponse) -> bool,
    ) -> Result<VcpuResponse, ControlError> {
        self.send(id, event)?;
        self.answer(ctl, id, what, ok)
    }

    fn send(&self, id: usize, event: VcpuEvent) -> Result<(), ControlError> {
        if self.end.is_ending() {
            return Err(ControlError::Ended);
        }
        let tx = self
            .end
            .events
            .get()
            .and_then(|e| e.get(id))
            .ok_or(ControlError::Ended)?;
        tx.send(event).map_err(|_| ControlError::Ended)?;
        if let Some(k) = self.end.kickers.get().and_then(|k| k.get(id)) {
            k.kick();
        }
        Ok(())
    }

    fn answer(
        &self,
        ctl: &mut Control,
        id: usize,
        what: &'static str,
        ok: impl Fn(&VcpuResponse) -> bool,
    ) -> Result<VcpuResponse, ControlError> {
        let rx = ctl.responses.get(id).ok_or(ControlError::Ended)?;
        // A thread that ended dropped its sender: the VM is over.
        let r = rx.recv().map_err(|_| ControlError::Ended)?;
        match r {
            r if ok(&r) => Ok(r),
            VcpuResponse::Failed(source) => Err(ControlError::Vcpu {
                id: id as u32,
                what,
                source,
            }),
            VcpuResponse::NotPaused => Err(ControlError::NotPaused { what }),
            other => Err(ControlError::Protocol {
                id: id as u32,
                what,
                answer: format!("{other:?}"),
            }),
        }
    }

    /// Starts the guest: a built VM boots (the boot CPU gets its entry state), a
    /// restored one continues. Starting a running VM does nothing, and neither
    /// does starting one that has already ended (stopped before it started):
    /// [`Vmm::wait`] reports how it ended.
    pub fn start(&self) -> Result<(), ControlError> {
        match self.boot_and_resume() {
            Err(ControlError::Ended) => Ok(()),
            r => r,
        }
    }

    fn boot_and_resume(&self) -> Result<(), ControlError> {
        let boot = self
            .boot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(boot) = boot {
            let mut ctl = self.lock_control();
            self.request(
                &mut ctl,
                0,
                VcpuEvent::Boot(Box::new(boot)),
                "set its boot state",
                |r| matches!(r, VcpuResponse::Booted),
            )?;
        }
        self.resume()
    }

    /// Confines the VMM before its guest runs (or while it is paused): the
    /// process-wide limits, then every vCPU thread and the device event loop
    /// on their own threads, then the calling thread, each with its class's
    /// seccomp filter and landlock (`sandbox`). The calling thread is confined
    /// too, and every thread it starts from now on inherits that. Threads of
    /// this process that nobody confined are listed in the report: a library
    /// caller's own threads must confine themselves
    /// ([`crate::sandbox::plan`]).
    pub fn enter_sandbox(
        &self,
        cfg: &crate::sandbox::SandboxConfig,
    ) -> Result<crate::sandbox::SandboxReport, ControlError> {
        use crate::sandbox::{Sandbox, ThreadClass};
        let mut ctl = self.lock_control();
        if ctl.phase == Phase::Running {
            return Err(ControlError::NotPaused {
                what: "enter the sandbox",
            });
        }
        let sandbox = Arc::new(Sandbox::prepare(cfg)?);
        self.timings().phase("sandbox_prepared");
        sandbox.enter_process()?;
        // Every thread confines itself at once (the kernel's work per filter,
        // its action cache, is a good part of the cost): the vCPUs and the
        // loop are asked, this thread confines itself meanwhile, then the
        // answers are read.
        for id in 0..self.vcpus as usize {
            self.send(id, VcpuEvent::Sandbox(sandbox.clone()))?;
        }
        let devices = match &self.device_events {
            Some(d) => {
                let s = sandbox.clone();
                Some(
                    d.send_to_loop(move || s.enter_thread(ThreadClass::Devices))
                        .ok_or(ControlError::Ended)?,
                )
            }
            None => None,
        };
        sandbox.enter_thread(ThreadClass::Controller)?;
        for id in 0..self.vcpus as usize {
            let r = self.answer(&mut ctl, id, "enter the sandbox", |r| {
                matches!(r, VcpuResponse::Sandboxed | VcpuResponse::SandboxFailed(_))
            })?;
            if let VcpuResponse::SandboxFailed(e) = r {
                return Err(e.into());
            }
        }
        if let Some(rx) = devices {
            rx.recv().map_err(|_| ControlError::Ended)??;
        }
        self.timings().phase("sandbox_threads");
        // Landlock lets this thread read its own process's thread list.
        let unconfined_threads = crate::sandbox::unconfined_threads();
        self.timings().phase("sandboxed");
        Ok(crate::sandbox::SandboxReport {
            mode: cfg.mode,
            landlock: sandbox.landlock(),
            unconfined_threads,
        })
    }

    /// Parks every vCPU outside the guest and holds the device event loop, and
    /// returns once all of them are parked: from then on the guest runs no
    /// instruction and no device touches guest memory until [`Vmm::resume`].
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut ctl = self.lock_control();
        if ctl.phase == Phase::Paused {
            return Ok(());
        }
        if ctl.phase == Phase::Created {
            return Err(ControlError::NotPaused {
                what: "pause before it started",
            });
        }
        // All the requests go out before any answer is awaited: the vCPUs and the
        // device event loop stop together.
        for id in 0..self.vcpus as usize {
            self.send(id, VcpuEvent::Pause)?;
        }
        if let Some(d) = &self.device_events {
            d.request_pause();
        }
        let parked = (0..self.vcpus as usize).try_for_each(|id| {
            self.answer(&mut ctl, id, "pause", |r| matches!(r, VcpuResponse::Paused))
                .map(drop)
        });
        if let Some(d) = &self.device_events {
            match parked {
                Ok(()) => d.wait_paused(),
                // The VM is ending: let the loop serve its last events.
                Err(_) => d.resume(),
            }
        }
        parked?;
        ctl.phase = Phase::Paused;
        Ok(())
    }

    /// Lets a paused (or restored) VM run again.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut ctl = self.lock_control();
        if ctl.phase == Phase::Running {
            return Ok(());
        }
        if let Some(d) = &self.device_events {
            d.resume();
        }
        for id in 0..self.vcpus as usize {
            self.send(id, VcpuEvent::Resume)?;
        }
        for id in 0..self.vcpus as usize {
            self.answer(&mut ctl, id, "resume", |r| {
                matches!(r, VcpuResponse::Resumed)
            })?;
        }
        ctl.phase = Phase::Running;
        Ok(())
    }

    /// The whole state of a paused VM: every vCPU (read on its own thread), the
    /// VM-wide interrupt controller and clock, every device. Guest RAM stays where
    /// it is ([`Vmm::guest_memory`]; [`Vmm::snapshot`] writes both).
    pub fn save_state(&self) -> Result<VmmState, ControlError> {
        let mut ctl = self.lock_control();
        if ctl.phase != Phase::Paused {
            return Err(ControlError::NotPaused { what: "save it" });
        }
        let mut vcpus = Vec::with_capacity(self.vcpus as usize);
        for id in 0..self.vcpus as usize {
            let r = self.request(&mut ctl, id, VcpuEvent::SaveState, "save its state", |r| {
                matches!(r, VcpuResponse::Saved(_))
            })?;
            if let VcpuResponse::Saved(s) = r {
                vcpus.push(*s);
            }
        }
        let vm = self
            .core
            .vm
            .save_state()
            .map_err(|source| ControlError::Vm {
                what: "save",
                source,
            })?;
        Ok(VmmState {
            vcpus,
            vm,
            devices: self.device_states(),
        })
    }

    fn device_states(&self) -> DeviceStates {
        fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            m.lock().unwrap_or_else(PoisonError::into_inner)
        }
        DeviceStates {
            serial: lock(&self.serial).state(),
            i8042: self.i8042.as_ref().map(|d| lock(d).state()),
            power: lock(&self.core.power).state(),
            virtio: self
                .virtio
                .iter()
                .map(|a| state::save_virtio(&lock(&a.transport)))
                .collect(),
        }
    }

    /// Guest RAM (for a RAM image of a paused VM, or reading guest memory).
    pub fn guest_memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// The virtio devices, in guest discovery order (their transports are what
    /// the host side of a vsock connection or a disk is reached through).
    pub fn virtio_devices(&self) -> &[crate::virtio::Attached] {
        &self.virtio
    }

    /// Host-initiated connections to the guest's vsock ports through the VM's own
    /// vsock device, if it has one.
    pub fn vsock(&self) -> Option<crate::virtio::VsockHandle> {
        crate::virtio::VsockHandle::find(&self.virtio)
    }

    /// A handle that ends the run from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.end.clone())
    }

    /// Ends the run now ([`GuestExit::Stopped`], unless it had already ended).
    pub fn stop(&self) {
        self.stop_handle().stop();
    }

    /// Waits for the VM to end and returns how it ended; every thread is joined.
    pub fn wait(mut self) -> Result<RunOutcome, RunError> {
        self.end.wait();
        self.timings().phase("exit");
        self.shutdown();
        let status = self
            .core
            .power
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .exit_status();
        let outcome = self
            .end
            .outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or(Ok(RunOutcome {
                exit: GuestExit::Halted,
                status,
            }));
        outcome.map(|o| match o.exit {
            // Whatever the guest wrote to the power device before it was stopped.
            GuestExit::Stopped => RunOutcome { status, ..o },
            _ => o,
        })
    }

    /// Ends every thread: the vCPUs, then the device event loop.
    fn shutdown(&mut self) {
        self.end.finish(Ok(RunOutcome {
            exit: GuestExit::Stopped,
            status: 0,
        }));
        if self.threads.is_empty() && self.device_events.as_ref().is_none_or(|d| d.stopped()) {
            return;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(d) = &mut self.device_events {
            d.stop();
        }
        self.timings().phase("threads_joined");
    }
}

impl<V: Vm + 'static> Drop for Vmm<V> {
    fn drop(&mut self) {
        self.shutdown();
        // Every vCPU (and its descriptor) is gone: the VM's last kernel reference
        // after the fields below drop is the helper's.
        self.reaper = spawn_reaper();
        self.timings().phase("reaper_spawned");
    }
}
