//! Builds a VM from [`VmResources`] on any [`Hypervisor`] and runs it to the end:
//! guest memory, interrupt controller, devices, firmware tables, kernel, vCPU
//! threads, exit dispatch.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use devices::{Bus, BusEvent, Interrupt, InterruptError, WriteOutcome};
use hypervisor::{
    BootState, Hypervisor, IrqLine, MemoryRegion, Vcpu, VcpuExit, VcpuKicker, Vm, VmConfig,
};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch;
use crate::resources::{ResourceError, VmResources};
use crate::timings::Timings;

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
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
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
    #[error("cannot attach {what}: {source}")]
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
    /// The device event loop could not be started.
    #[error("cannot start the device event loop: {0}")]
    DeviceEvents(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread {id}: {source}")]
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
    /// The host runs PVM and the kernel cannot run at usable speed under it.
    #[error(
        "this host's /dev/kvm is PVM (kvm_pvm): a kernel without PVM-guest support runs in \
         KVM's instruction emulator and never reaches userspace in reasonable time. Boot it on \
         a host with hardware virtualization, in the nested test rig (tests/nested/rig), or use \
         a kernel built with CONFIG_PVM_GUEST=y. Set SUPERMACHINE_ALLOW_EMULATED=1 to try anyway. \
         (kernel: {kernel})"
    )]
    PvmHostUnsupportedKernel {
        /// The kernel path.
        kernel: String,
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

/// What an architecture's platform setup hands to the generic run loop: the device
/// buses, the power block (whose exit status becomes the run's status) and the boot
/// CPU's entry state.
pub struct Platform {
    /// x86 port-I/O bus (empty on aarch64).
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// The power block; its exit-status register is read when the run ends.
    pub power: Arc<Mutex<devices::power::PowerDevice>>,
    /// The boot CPU's entry state.
    pub boot: BootState,
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

/// The end state shared by vCPU threads.
struct Stop {
    flag: AtomicBool,
    outcome: Mutex<Option<Result<RunOutcome, RunError>>>,
    kickers: Mutex<Vec<Box<dyn VcpuKicker>>>,
}

impl Stop {
    /// Records the first outcome and asks every vCPU to leave the guest.
    fn finish(&self, r: Result<RunOutcome, RunError>) {
        {
            let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
            if o.is_none() {
                *o = Some(r);
            }
        }
        self.flag.store(true, Ordering::SeqCst);
        for k in self
            .kickers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            k.kick();
        }
    }
}

/// Ends a run from another thread: every vCPU leaves the guest and the run
/// returns [`GuestExit::Stopped`]. A stop requested before the run starts (or
/// between runs given the same handle) takes effect as soon as it does.
#[derive(Clone, Default)]
pub struct StopHandle(Arc<StopShared>);

#[derive(Default)]
struct StopShared {
    /// `(stop requested, the run it reaches)`, under one lock so a request cannot
    /// fall between a run registering and checking.
    state: Mutex<(bool, Option<Arc<Stop>>)>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("StopHandle")
            .field("requested", &st.0)
            .field("running", &st.1.is_some())
            .finish()
    }
}

impl StopHandle {
    /// A handle with no stop requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to end now.
    pub fn stop(&self) {
        let mut st = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.0 = true;
        if let Some(run) = &st.1 {
            run.finish(Ok(RunOutcome {
                exit: GuestExit::Stopped,
                status: 0,
            }));
        }
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn stop_requested(&self) -> bool {
        self.0
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    fn attach(&self, run: &Arc<Stop>) {
        let mut st = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.0 {
            run.finish(Ok(RunOutcome {
                exit: GuestExit::Stopped,
                status: 0,
            }));
        }
        st.1 = Some(run.clone());
    }

    fn detach(&self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1 = None;
    }
}

/// Holds vCPU threads until all of them created their vCPU (or the run failed).
struct Gate {
    expected: u32,
    state: Mutex<(u32, bool)>,
    cv: Condvar,
}

impl Gate {
    fn new(expected: u32) -> Self {
        Self {
            expected,
            state: Mutex::new((0, false)),
            cv: Condvar::new(),
        }
    }

    fn arrive_and_wait(&self) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.0 += 1;
        if st.0 >= self.expected {
            st.1 = true;
            self.cv.notify_all();
        }
        while !st.1 {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Lets every waiter go (a vCPU thread could not be started).
    fn open(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
        self.cv.notify_all();
    }
}

/// Is this host PVM and the kernel a Linux kernel that lacks PVM-guest support?
fn refuse_on_pvm(pvm_host: bool, kernel: &Path) -> Result<(), RunError> {
    if !pvm_host || std::env::var_os("SUPERMACHINE_ALLOW_EMULATED").is_some_and(|v| v != "0") {
        return Ok(());
    }
    if crate::pvm::is_linux_kernel(kernel) && crate::pvm::supports_pvm_guest(kernel) != Some(true) {
        return Err(RunError::PvmHostUnsupportedKernel {
            kernel: kernel.display().to_string(),
        });
    }
    Ok(())
}

/// Builds the VM described by `res` on `hv`, runs it until the guest powers off or
/// resets, and returns how it ended. Guest console output goes to `console`.
pub fn run<H: Hypervisor>(
    hv: &H,
    res: &VmResources,
    console: Box<dyn Write + Send>,
    timings: Arc<Timings>,
) -> Result<RunOutcome, RunError> {
    run_with_stop(hv, res, console, timings, &StopHandle::new())
}

/// [`run`], which `stop` can also end from another thread.
pub fn run_with_stop<H: Hypervisor>(
    hv: &H,
    res: &VmResources,
    console: Box<dyn Write + Send>,
    timings: Arc<Timings>,
    stop_handle: &StopHandle,
) -> Result<RunOutcome, RunError> {
    res.validate()?;
    refuse_on_pvm(hv.capabilities().pvm_host, &res.kernel)?;
    // The guest's network addresses, and `sm.net=` on its command line.
    let res = &crate::net::prepare(res)
        .map_err(|e| RunError::from(crate::virtio::VirtioAttachError::Net(e)))?;

    // Guest RAM: anonymous private mappings, handed to the hypervisor.
    let ranges: Vec<(GuestAddress, usize)> = arch::ram_ranges(res.memory)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    // Shared with the virtio devices, which read and write guest memory directly.
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|source| RunError::Memory {
            size: res.memory,
            source,
        })?,
    );
    // Declared after `mem`, so dropped before it on every path: the hypervisor lets go
    // of guest memory before the memory is unmapped.
    let vm = hv.create_vm(&VmConfig { vcpus: res.vcpus })?;
    timings.phase("vm_created");
    for (slot, region) in mem.iter().enumerate() {
        let r = MemoryRegion {
            slot: slot as u32,
            guest_addr: region.start_addr().0,
            size: region.len(),
            host_addr: region.as_ptr() as usize,
            read_only: false,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives `vm`
        // (`vm` is declared later, so it is dropped first, and the end of this function
        // drops them explicitly in that order; device clones of the `Arc` only delay
        // the unmap further); nothing else uses that host range.
        unsafe { vm.map_memory(&r)? };
    }
    timings.phase("memory_ready");

    vm.create_irqchip()?;

    let Platform {
        pio,
        mmio,
        power,
        boot,
        virtio,
    } = arch::setup_platform(&vm, &mem, res, console, &timings)?;
    // Serves the devices' host side (vsock sockets) and their queue notifications
    // (ioeventfd, where the backend has it) until the run ends.
    let _device_events = crate::virtio::DeviceEvents::start(&vm, &virtio)
        .map_err(|e| RunError::DeviceEvents(Box::new(e)))?;

    let stop = Arc::new(Stop {
        flag: AtomicBool::new(false),
        outcome: Mutex::new(None),
        kickers: Mutex::new(Vec::new()),
    });
    stop_handle.attach(&stop);
    let ready = Gate::new(res.vcpus);
    let ctx = VcpuCtx {
        vm: &vm,
        pio: &pio,
        mmio: &mmio,
        power: &power,
        stop: &stop,
        ready: &ready,
        timings: &timings,
        boot,
    };
    std::thread::scope(|s| {
        for id in 0..res.vcpus {
            let ctx = &ctx;
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn_scoped(s, move || ctx.vcpu_thread(id));
            if let Err(source) = spawned {
                // Threads already started wait at the barrier forever otherwise; end
                // the run instead (they are kicked once registered).
                stop.finish(Err(RunError::Thread { id, source }));
                ready.open();
                break;
            }
        }
    });
    timings.phase("exit");
    stop_handle.detach();
    let status = power
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .exit_status();
    let outcome = stop
        .outcome
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .unwrap_or(Ok(RunOutcome {
            exit: GuestExit::Halted,
            status,
        }))
        .map(|o| match o.exit {
            // Whatever the guest wrote to the power device before it was stopped.
            GuestExit::Stopped => RunOutcome { status, ..o },
            _ => o,
        });
    // Stop serving devices (which unregisters the queue-notify events; they hold
    // the VM open), then the hypervisor must release guest memory before it is
    // unmapped.
    drop(_device_events);
    drop(vm);
    drop(mem);
    outcome
}

struct VcpuCtx<'a, V: Vm> {
    vm: &'a V,
    pio: &'a Bus,
    mmio: &'a Bus,
    power: &'a Arc<Mutex<devices::power::PowerDevice>>,
    stop: &'a Stop,
    ready: &'a Gate,
    timings: &'a Timings,
    boot: BootState,
}

impl<V: Vm> VcpuCtx<'_, V> {
    fn vcpu_thread(&self, id: u32) {
        // Create the vCPU on its own thread (HVF binds it there) and wait until every
        // vCPU exists: the boot CPU's INIT/SIPI to the others must find them.
        let vcpu = self.vm.create_vcpu(id);
        let mut vcpu = match vcpu {
            Ok(v) => {
                self.stop
                    .kickers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Box::new(v.kicker()));
                v
            }
            Err(e) => {
                self.stop.finish(Err(e.into()));
                self.ready.arrive_and_wait();
                return;
            }
        };
        self.ready.arrive_and_wait();
        if self.stop.flag.load(Ordering::SeqCst) {
            return;
        }
        if id == 0 {
            if let Err(e) = vcpu.set_boot_state(&self.boot) {
                self.stop.finish(Err(e.into()));
                return;
            }
            self.timings.phase("first_vcpu_entry");
        }
        if let Some(r) = self.dispatch(&mut vcpu) {
            self.stop.finish(r);
        }
    }

    /// Runs the vCPU until the VM ends; returns the outcome this vCPU observed.
    fn dispatch(&self, vcpu: &mut V::Vcpu) -> Option<Result<RunOutcome, RunError>> {
        let id = vcpu.id();
        loop {
            if self.stop.flag.load(Ordering::Relaxed) {
                return None;
            }
            let exit = match vcpu.run() {
                Ok(e) => e,
                Err(e) => return Some(Err(e.into())),
            };
            match exit {
                VcpuExit::IoOut { port, data } => {
                    if let WriteOutcome::Event(ev) =
                        self.pio.write(u64::from(port), data.as_slice())
                    {
                        return Some(Ok(self.event_outcome(ev)));
                    }
                }
                VcpuExit::IoIn { port, size } => {
                    let mut buf = [0xffu8; 8];
                    let b = &mut buf[..usize::from(size).min(8)];
                    // Unclaimed ports read as all ones, as on a PC with nothing there.
                    let _claimed = self.pio.read(u64::from(port), b);
                    if let Err(e) = vcpu.set_io_result(b) {
                        return Some(Err(e.into()));
                    }
                }
                VcpuExit::MmioWrite { addr, data } => {
                    if let WriteOutcome::Event(ev) = self.mmio.write(addr, data.as_slice()) {
                        return Some(Ok(self.event_outcome(ev)));
                    }
                }
                VcpuExit::MmioRead { addr, size } => {
                    let mut buf = [0xffu8; 8];
                    let b = &mut buf[..usize::from(size).min(8)];
                    let _claimed = self.mmio.read(addr, b);
                    if let Err(e) = vcpu.set_io_result(b) {
                        return Some(Err(e.into()));
                    }
                }
                VcpuExit::Halted => {
                    return Some(Ok(RunOutcome {
                        exit: GuestExit::Halted,
                        status: self.status(),
                    }))
                }
                VcpuExit::Shutdown => {
                    return Some(Ok(RunOutcome {
                        exit: GuestExit::PowerOff,
                        status: self.status(),
                    }))
                }
                VcpuExit::Reset => {
                    return Some(Ok(RunOutcome {
                        exit: GuestExit::Reset,
                        status: self.status(),
                    }))
                }
                VcpuExit::Interrupted => {}
                VcpuExit::Unhandled { reason } => {
                    return Some(Err(RunError::Unhandled { id, reason }))
                }
            }
        }
    }

    fn status(&self) -> u32 {
        self.power
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .exit_status()
    }

    fn event_outcome(&self, ev: BusEvent) -> RunOutcome {
        match ev {
            BusEvent::PowerOff { .. } => RunOutcome {
                exit: GuestExit::PowerOff,
                status: self.status(),
            },
            BusEvent::Reset { .. } => RunOutcome {
                exit: GuestExit::Reset,
                status: self.status(),
            },
        }
    }
}
