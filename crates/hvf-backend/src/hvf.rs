//! `HvfHypervisor`, `HvfVm` and `HvfVcpu`: the `hypervisor` traits on
//! Hypervisor.framework. What the framework forces, and how it is met:
//! - one VM per process: a second `create_vm` is refused until the first is dropped;
//! - a vCPU belongs to the thread that created it: `HvfVcpu` is `!Send`, created by
//!   `Vm::create_vcpu` on the thread that will run it, destroyed by its `Drop` there;
//! - every HVC, WFI and trapped register access reaches userspace: PSCI, WFI sleeps
//!   and register traps are handled inside `run` so the runner's exit loop is the same
//!   as with KVM (which does them in the kernel);
//! - no irqfd/ioeventfd: `Capabilities` says so and the runner emulates them (queue
//!   notifications arrive as `MmioWrite` exits, interrupt lines call `hv_gic_set_spi`).

use std::ffi::c_void;
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use hypervisor::aarch64::{self as a64, PowerState};
use hypervisor::{
    Arch, BootState, Capabilities, Hypervisor, HypervisorError, HypervisorKind, IoData, IoEvent,
    IoEventAddress, IrqLine, MemoryRegion, Vcpu, VcpuError, VcpuExit, VcpuKicker, VcpuState, Vm,
    VmConfig, VmError, VmState,
};

use crate::bindings::*;
use crate::esr::{self, MmioAccess, Syndrome, WaitKind, ZERO_REGISTER};
use crate::gic::GicApi;
use crate::hv_error::{check, HvError};
use crate::layout::{GicLayout, GicSizes, DEFAULT_GIC_LAYOUT};
use crate::psci::{self, CpuPower, PsciAction};
use crate::state::{self, CoreReg, RegisterAccess, WfiWait};
use crate::sysreg::{self, named, HvfRegKind, HvfSysReg};
use crate::trap::{self, SysRegTrap};
use crate::vtimer::Vtimer;
use crate::wfi::{self, Wakeup};

/// PSTATE for a vCPU entering the kernel: EL1h with D, A, I and F masked.
const PSTATE_EL1H_DAIF: u64 = 0x3c5;
/// SCTLR_EL1 with the MMU and caches off and the RES1 bits set (what Linux's
/// `INIT_SCTLR_EL1_MMU_OFF` expects), for vCPUs started by PSCI CPU_ON.
const SCTLR_EL1_MMU_OFF: u64 = 0x30d0_0800;
/// With the in-framework GIC and more than one vCPU, the longest WFI wait before
/// the vCPU re-enters the guest: an SGI (IPI) one vCPU sends another is delivered
/// inside the framework's GIC, and whether that wakes a vCPU waiting here, in the
/// VMM, is not documented and not yet seen on a Mac (docs/hvf.md). Without the
/// GIC, or with one vCPU, nothing is missed and the wait has no bound but the
/// timer's deadline.
const SGI_RECHECK: Duration = Duration::from_millis(1);

/// The host counter for the WFI wait.
struct MachClock((u32, u32));

impl wfi::Clock for MachClock {
    fn now(&self) -> u64 {
        mach_now()
    }
    fn duration(&self, ticks: u64) -> Duration {
        state::ticks_to_duration(ticks, self.0 .0, self.0 .1)
    }
}

/// Host counter ticks in `d` (the inverse of `state::ticks_to_duration`).
fn duration_to_ticks(d: Duration, (numer, denom): (u32, u32)) -> u64 {
    if numer == 0 {
        return u64::MAX;
    }
    let ticks = d.as_nanos() * u128::from(denom) / u128::from(numer);
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

static VM_EXISTS: AtomicBool = AtomicBool::new(false);

fn mach_now() -> u64 {
    // SAFETY: mach_absolute_time has no preconditions.
    unsafe { mach_absolute_time() }
}

fn timebase() -> (u32, u32) {
    let mut info = mach_timebase_info_data_t::default();
    // SAFETY: `info` is a valid, writable mach_timebase_info_data_t.
    let rc = unsafe { mach_timebase_info(&mut info) };
    if rc == 0 && info.denom != 0 {
        (info.numer, info.denom)
    } else {
        // Apple silicon's fixed 24 MHz timebase.
        (125, 3)
    }
}

/// Hypervisor.framework on this Mac.
#[derive(Debug)]
pub struct HvfHypervisor {
    caps: Capabilities,
    gic_layout: GicLayout,
}

impl HvfHypervisor {
    /// Probes the framework.
    pub fn new() -> Result<Self, HypervisorError> {
        let mut max = 0u32;
        // SAFETY: `max` is a valid, writable u32.
        let rc = unsafe { hv_vm_get_max_vcpu_count(&mut max) };
        check("hv_vm_get_max_vcpu_count", rc).map_err(|e| HypervisorError::Open {
            what: "Hypervisor.framework".into(),
            source: e.into(),
        })?;
        Ok(Self {
            caps: Capabilities {
                irqfd: false,
                ioeventfd: false,
                max_vcpus: max,
                pvm_host: false,
            },
            gic_layout: DEFAULT_GIC_LAYOUT,
        })
    }

    /// Places the GIC frames elsewhere (the device tree must agree).
    pub fn with_gic_layout(mut self, layout: GicLayout) -> Self {
        self.gic_layout = layout;
        self
    }
}

impl Hypervisor for HvfHypervisor {
    type Vm = HvfVm;

    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Hvf
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn create_vm(&self, config: &VmConfig) -> Result<HvfVm, HypervisorError> {
        if config.vcpus == 0 || config.vcpus > self.caps.max_vcpus {
            return Err(HypervisorError::Unsupported(format!(
                "{} vCPUs requested; Hypervisor.framework allows 1..={} here",
                config.vcpus, self.caps.max_vcpus
            )));
        }
        if VM_EXISTS
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(HypervisorError::Unsupported(
                "Hypervisor.framework allows one VM per process and one already exists".into(),
            ));
        }
        // SAFETY: a NULL config asks for the default VM; no VM exists in this process
        // (checked above).
        let rc = unsafe { hv_vm_create(std::ptr::null_mut()) };
        if let Err(e) = check("hv_vm_create", rc) {
            VM_EXISTS.store(false, Ordering::Release);
            return Err(HypervisorError::CreateVm(e.into()));
        }
        let slots = (0..config.vcpus)
            .map(|i| Slot {
                mpidr: psci::mpidr_for_index(i),
                power: if i == 0 { CpuPower::On } else { CpuPower::Off },
                mailbox: None,
                created: false,
            })
            .collect();
        Ok(HvfVm {
            shared: Arc::new(Shared {
                power: Mutex::new(Power {
                    slots,
                    restored_offset: None,
                }),
                wake: Condvar::new(),
                events: Wakeup::default(),
                vcpus: config.vcpus,
                gic: Mutex::new(None),
                gic_sizes: Mutex::new(None),
                // The guest's virtual counter starts at zero when the VM is created.
                vtimer_offset: mach_now(),
            }),
            layout: self.gic_layout,
        })
    }
}

#[derive(Debug)]
struct Slot {
    mpidr: u64,
    power: CpuPower,
    /// CPU_ON request not yet picked up: (entry, context id).
    mailbox: Option<(u64, u64)>,
    created: bool,
}

#[derive(Debug)]
struct Power {
    slots: Vec<Slot>,
    /// The timer offset chosen by the first vCPU restored after `Vm::restore_state`.
    restored_offset: Option<u64>,
}

impl psci::Topology for Power {
    fn vcpu_by_mpidr(&self, mpidr: u64) -> Option<(u32, CpuPower)> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            (s.mpidr & psci::MPIDR_AFFINITY_MASK == mpidr).then_some((i as u32, s.power))
        })
    }
}

/// State shared by the VM, its vCPUs, kickers and interrupt lines.
#[derive(Debug)]
struct Shared {
    power: Mutex<Power>,
    /// Wakes vCPUs powered off (PSCI).
    wake: Condvar,
    /// Wakes vCPUs waiting after WFI.
    events: Wakeup,
    /// The VM's vCPUs.
    vcpus: u32,
    gic: Mutex<Option<&'static GicApi>>,
    /// The framework's GIC sizes, once the GIC exists.
    gic_sizes: Mutex<Option<GicSizes>>,
    vtimer_offset: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Power> {
        // A panic while holding the lock leaves plain data that is still consistent.
        self.power.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gic(&self) -> Option<&'static GicApi> {
        *self.gic.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_all(&self) {
        {
            let _guard = self.lock();
            self.wake.notify_all();
        }
        self.events.notify();
    }

    fn gic_sizes(&self) -> Option<GicSizes> {
        *self.gic_sizes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the last reference to the VM is gone, and every HvfVcpu holds one,
        // so all vCPUs have been destroyed as hv_vm_destroy requires.
        let rc = unsafe { hv_vm_destroy() };
        if let Err(e) = check("hv_vm_destroy", rc) {
            tracing::warn!("{e}");
        }
        VM_EXISTS.store(false, Ordering::Release);
    }
}

/// The process's Hypervisor.framework VM.
#[derive(Debug)]
pub struct HvfVm {
    shared: Arc<Shared>,
    layout: GicLayout,
}

/// An SPI of the in-framework GIC.
#[derive(Debug)]
pub struct HvfIrqLine {
    gsi: u32,
    intid: u32,
    gic: &'static GicApi,
    shared: Arc<Shared>,
}

impl HvfIrqLine {
    fn set(&self, level: bool) -> Result<(), VmError> {
        // SAFETY: the GIC exists (an HvfIrqLine is only made after hv_gic_create) and
        // `intid` was checked against hv_gic_get_spi_interrupt_range.
        let rc = unsafe { (self.gic.set_spi)(self.intid, level) };
        check("hv_gic_set_spi", rc).map_err(|e| VmError::Irq {
            gsi: self.gsi,
            source: e.into(),
        })?;
        if level {
            // A vCPU parked in WFI must re-enter the guest to take the interrupt.
            self.shared.wake_all();
        }
        Ok(())
    }
}

impl IrqLine for HvfIrqLine {
    fn trigger(&self) -> Result<(), VmError> {
        // hv_gic.h: asserting makes an edge for an edge-configured SPI; deasserting is
        // ignored for edge and ends the pulse for a level-configured one.
        self.set(true)?;
        self.set(false)
    }

    fn set_level(&self, asserted: bool) -> Result<(), VmError> {
        self.set(asserted)
    }
}

impl Vm for HvfVm {
    type Vcpu = HvfVcpu;
    type IrqLine = HvfIrqLine;

    fn arch(&self) -> Arch {
        Arch::Aarch64
    }

    unsafe fn map_memory(&self, region: &MemoryRegion) -> Result<(), VmError> {
        let mut flags = HV_MEMORY_READ | HV_MEMORY_EXEC;
        if !region.read_only {
            flags |= HV_MEMORY_WRITE;
        }
        let size = usize::try_from(region.size).map_err(|_| VmError::MapMemory {
            guest_addr: region.guest_addr,
            size: region.size,
            source: io::Error::other("region larger than the address space"),
        })?;
        // SAFETY: the caller guarantees (Vm::map_memory's contract) that the host range
        // is mapped and stays valid until unmapped or the VM is dropped.
        let rc = unsafe {
            hv_vm_map(
                region.host_addr as *mut c_void,
                region.guest_addr,
                size,
                flags,
            )
        };
        check("hv_vm_map", rc).map_err(|e| VmError::MapMemory {
            guest_addr: region.guest_addr,
            size: region.size,
            source: e.into(),
        })
    }

    fn unmap_memory(&self, region: &MemoryRegion) -> Result<(), VmError> {
        let size = usize::try_from(region.size).unwrap_or(usize::MAX);
        // SAFETY: unmapping only removes guest access; no host memory is touched.
        let rc = unsafe { hv_vm_unmap(region.guest_addr, size) };
        check("hv_vm_unmap", rc).map_err(|e| VmError::MapMemory {
            guest_addr: region.guest_addr,
            size: region.size,
            source: e.into(),
        })
    }

    fn create_irqchip(&self) -> Result<(), VmError> {
        let api = GicApi::get().map_err(|e| VmError::CreateIrqchip(io::Error::other(e)))?;
        if self.shared.lock().slots.iter().any(|s| s.created) {
            return Err(VmError::CreateIrqchip(io::Error::other(
                "the GIC must be created before any vCPU (hv_gic.h)",
            )));
        }
        let mut gic = self.shared.gic.lock().unwrap_or_else(|p| p.into_inner());
        if gic.is_some() {
            return Ok(());
        }
        let size = |name: &'static str, get: unsafe extern "C" fn(*mut usize) -> hv_return_t| {
            let mut v = 0usize;
            // SAFETY: `v` is a valid, writable usize; `get` is a resolved framework
            // function that writes one.
            let rc = unsafe { get(&mut v) };
            check(name, rc)
                .map(|()| v as u64)
                .map_err(|e| VmError::CreateIrqchip(e.into()))
        };
        let sizes = GicSizes {
            distributor: size("hv_gic_get_distributor_size", api.get_distributor_size)?,
            redistributor_region: size(
                "hv_gic_get_redistributor_region_size",
                api.get_redistributor_region_size,
            )?,
            redistributor: size("hv_gic_get_redistributor_size", api.get_redistributor_size)?,
        };
        self.layout
            .check(&sizes, self.shared.vcpus)
            .map_err(|e| VmError::CreateIrqchip(io::Error::other(e)))?;
        // SAFETY: the GIC functions were resolved from the framework; config objects are
        // created, configured, consumed by hv_gic_create and released exactly once.
        let result = unsafe {
            let config = (api.config_create)();
            if config.is_null() {
                return Err(VmError::CreateIrqchip(io::Error::other(
                    "hv_gic_config_create returned no object",
                )));
            }
            let r = check(
                "hv_gic_config_set_distributor_base",
                (api.config_set_distributor_base)(config, self.layout.distributor_base),
            )
            .and_then(|()| {
                check(
                    "hv_gic_config_set_redistributor_base",
                    (api.config_set_redistributor_base)(config, self.layout.redistributor_base),
                )
            })
            .and_then(|()| check("hv_gic_create", (api.create)(config)));
            (api.os_release)(config);
            r
        };
        result.map_err(|e| VmError::CreateIrqchip(e.into()))?;
        *gic = Some(api);
        *self
            .shared
            .gic_sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(sizes);
        Ok(())
    }

    /// Hypervisor.framework has no ioeventfd: queue notifications stay
    /// `MmioWrite` exits, which the runner hands to the device's transport.
    fn register_ioevent(
        &self,
        _addr: IoEventAddress,
        _datamatch: Option<u32>,
    ) -> Result<Option<IoEvent>, VmError> {
        Ok(None)
    }

    fn irq_line(&self, gsi: u32) -> Result<HvfIrqLine, VmError> {
        let gic = self.shared.gic().ok_or_else(|| VmError::Irq {
            gsi,
            source: io::Error::other("create_irqchip must be called first"),
        })?;
        let (mut base, mut count) = (0u32, 0u32);
        // SAFETY: both pointers are valid, writable u32s.
        let rc = unsafe { (gic.get_spi_interrupt_range)(&mut base, &mut count) };
        check("hv_gic_get_spi_interrupt_range", rc).map_err(|e| VmError::Irq {
            gsi,
            source: e.into(),
        })?;
        // GSI n is SPI n, i.e. INTID 32 + n (the device tree's `<0 n flags>`).
        let intid = 32u32.saturating_add(gsi);
        if intid < base || intid >= base.saturating_add(count) {
            return Err(VmError::Irq {
                gsi,
                source: io::Error::other(format!(
                    "INTID {intid} is outside the GIC's SPI range {base}..{}",
                    base.saturating_add(count)
                )),
            });
        }
        Ok(HvfIrqLine {
            gsi,
            intid,
            gic,
            shared: Arc::clone(&self.shared),
        })
    }

    fn create_vcpu(&self, id: u32) -> Result<HvfVcpu, VmError> {
        let create_err = |source: io::Error| VmError::CreateVcpu { id, source };
        let mpidr = {
            let mut power = self.shared.lock();
            let slot = power
                .slots
                .get_mut(id as usize)
                .ok_or_else(|| create_err(io::Error::other("vCPU index beyond VmConfig::vcpus")))?;
            if slot.created {
                return Err(create_err(io::Error::other("vCPU already created")));
            }
            slot.created = true;
            slot.mpidr
        };
        let mut hv: hv_vcpu_t = 0;
        let mut exit: *const hv_vcpu_exit_t = std::ptr::null();
        // SAFETY: both out-pointers are valid; a NULL config asks for the default vCPU.
        // The vCPU is bound to this thread, and HvfVcpu is !Send so it stays here.
        let rc = unsafe { hv_vcpu_create(&mut hv, &mut exit, std::ptr::null_mut()) };
        if let Err(e) = check("hv_vcpu_create", rc) {
            self.shared.lock().slots[id as usize].created = false;
            return Err(create_err(e.into()));
        }
        let vcpu = HvfVcpu {
            id,
            hv,
            exit,
            shared: Arc::clone(&self.shared),
            gic: self.shared.gic(),
            kicked: Arc::new(AtomicBool::new(false)),
            alive: Arc::new(Mutex::new(Some(hv))),
            pending_read: None,
            pc_advance: 0,
            timebase: timebase(),
            vtimer: Vtimer::default(),
            entry_epoch: 0,
            _bound_to_thread: PhantomData,
        };
        // The GIC routes by affinity, so MPIDR_EL1 must be set before the vCPU runs;
        // the device tree uses the same values (psci::mpidr_for_index).
        vcpu.set_sys(named::MPIDR_EL1.0, mpidr)
            .map_err(|e| create_err(e.into()))?;
        // SAFETY: `hv` is this thread's live vCPU.
        let rc = unsafe { hv_vcpu_set_vtimer_offset(hv, self.shared.vtimer_offset) };
        check("hv_vcpu_set_vtimer_offset", rc).map_err(|e| create_err(e.into()))?;
        // ID_AA64PFR0_EL1.GIC tells the guest whether the GICv3 CPU interface is
        // there; the framework's value may not say so.
        // ID_AA64PFR1_EL1.SME is hidden: SME state is not saved (state.rs refuses
        // a snapshot of a guest that has it on, should the framework keep it).
        for (reg, name, adjust) in [
            (
                trap::ID_AA64PFR0_EL1,
                "ID_AA64PFR0_EL1",
                &(|v| trap::pfr0_for_guest(v, vcpu.gic.is_some())) as &dyn Fn(u64) -> u64,
            ),
            (
                trap::ID_AA64PFR1_EL1,
                "ID_AA64PFR1_EL1",
                &trap::pfr1_for_guest,
            ),
        ] {
            let now = vcpu.get_sys(reg.0).map_err(|e| create_err(e.into()))?;
            let want = adjust(now);
            if want != now {
                if let Err(e) = vcpu.set_sys(reg.0, want) {
                    tracing::warn!("vCPU {id}: cannot set {name} to {want:#x}: {e}");
                }
            }
        }
        if let (Some(api), Some(sizes)) = (vcpu.gic, self.shared.gic_sizes()) {
            let mut base = 0u64;
            // SAFETY: `hv` is this thread's live vCPU and `base` is writable.
            let rc = unsafe { (api.get_redistributor_base)(hv, &mut base) };
            check("hv_gic_get_redistributor_base", rc).map_err(|e| create_err(e.into()))?;
            self.layout
                .check_redistributor(&sizes, id, base)
                .map_err(|e| create_err(io::Error::other(e)))?;
        }
        Ok(vcpu)
    }

    fn save_state(&self) -> Result<VmState, VmError> {
        let gic = match self.shared.gic() {
            None => a64::BackendBlob {
                backend: state::BACKEND_TAG.into(),
                version: state::GIC_BLOB_VERSION,
                bytes: Vec::new(),
            },
            Some(api) => state::gic_blob(save_gic(api)?),
        };
        Ok(VmState::Aarch64(Box::new(a64::VmState { gic })))
    }

    fn restore_state(&self, vm_state: &VmState) -> Result<(), VmError> {
        let VmState::Aarch64(s) = vm_state else {
            return Err(VmError::StateMismatch(
                "an x86_64 VM state cannot be restored into an aarch64 VM".into(),
            ));
        };
        match self.shared.gic() {
            None if s.gic.bytes.is_empty() => {}
            None => {
                return Err(VmError::StateMismatch(
                    "the state has GIC contents but create_irqchip was not called".into(),
                ))
            }
            Some(api) => {
                let bytes =
                    state::gic_bytes(&s.gic).map_err(|e| VmError::StateMismatch(e.to_string()))?;
                // SAFETY: `bytes` is a live buffer of the given length; the framework
                // validates the contents and refuses incompatible data.
                let rc = unsafe { (api.set_state)(bytes.as_ptr().cast(), bytes.len()) };
                check("hv_gic_set_state", rc).map_err(|e| VmError::State {
                    op: "restore GIC",
                    source: e.into(),
                })?;
            }
        }
        // The next vCPU restored picks the timer offset for all of them.
        self.shared.lock().restored_offset = None;
        Ok(())
    }
}

fn save_gic(api: &GicApi) -> Result<Vec<u8>, VmError> {
    let err = |e: HvError| VmError::State {
        op: "save GIC",
        source: e.into(),
    };
    // SAFETY: resolved framework functions; the state object is released exactly once
    // and `buf` is sized from hv_gic_state_get_size before get_data writes it.
    unsafe {
        let st = (api.state_create)();
        if st.is_null() {
            return Err(VmError::State {
                op: "save GIC",
                source: io::Error::other(
                    "hv_gic_state_create returned no object (are all vCPUs stopped?)",
                ),
            });
        }
        let mut size = 0usize;
        let r = check("hv_gic_state_get_size", (api.state_get_size)(st, &mut size));
        let result = r.and_then(|()| {
            let mut buf = vec![0u8; size];
            check(
                "hv_gic_state_get_data",
                (api.state_get_data)(st, buf.as_mut_ptr().cast()),
            )
            .map(|()| buf)
        });
        (api.os_release)(st);
        result.map_err(err)
    }
}

/// Interrupts a vCPU from another thread. Outliving the vCPU is harmless: a
/// destroyed vCPU's id is gone from `alive`, so no kick can reach the framework
/// with it (ids are reused by later vCPUs).
#[derive(Debug)]
pub struct HvfKicker {
    alive: Arc<Mutex<Option<hv_vcpu_t>>>,
    kicked: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl VcpuKicker for HvfKicker {
    fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        {
            // Held across the call: the vCPU's Drop takes the id out under this
            // lock before destroying it, so the id is live for the whole call.
            let alive = self
                .alive
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(mut hv) = *alive {
                // SAFETY: hv_vcpus_exit may be called from any thread (hv_vcpu.h);
                // `hv` is a live vCPU of this VM (see the lock above), which `shared`
                // keeps alive. A vCPU not in the guest returns at once from its next
                // hv_vcpu_run.
                let rc = unsafe { hv_vcpus_exit(&mut hv, 1) };
                if let Err(e) = check("hv_vcpus_exit", rc) {
                    tracing::warn!("{e}");
                }
            }
        }
        // Also wake it if it is parked in WFI or powered off.
        self.shared.wake_all();
    }
}

/// One Hypervisor.framework vCPU, bound to the thread that created it.
#[derive(Debug)]
pub struct HvfVcpu {
    id: u32,
    hv: hv_vcpu_t,
    exit: *const hv_vcpu_exit_t,
    shared: Arc<Shared>,
    gic: Option<&'static GicApi>,
    kicked: Arc<AtomicBool>,
    /// `hv` while it exists, shared with kickers (see [`HvfKicker`]).
    alive: Arc<Mutex<Option<hv_vcpu_t>>>,
    /// An MMIO read reported by `run` and not yet completed by `set_io_result`.
    pending_read: Option<MmioAccess>,
    /// Bytes to add to PC before the guest next runs.
    pc_advance: u64,
    timebase: (u32, u32),
    /// The virtual timer's interrupt, without the in-framework GIC.
    vtimer: Vtimer,
    /// The VM's wake-up epoch just before the last entry: an interrupt raised
    /// while the guest ran up to its WFI must end the wait that follows.
    entry_epoch: u64,
    /// Keeps the type !Send and !Sync: the framework binds a vCPU to its thread.
    _bound_to_thread: PhantomData<*const ()>,
}

impl Drop for HvfVcpu {
    fn drop(&mut self) {
        // No kick may name `hv` from here on: kickers check under this lock.
        let mut alive = self
            .alive
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *alive = None;
        // SAFETY: `hv` was created on this thread (HvfVcpu is !Send) and is destroyed once.
        let rc = unsafe { hv_vcpu_destroy(self.hv) };
        drop(alive);
        if let Err(e) = check("hv_vcpu_destroy", rc) {
            tracing::warn!("{e}");
        }
        if let Some(slot) = self.shared.lock().slots.get_mut(self.id as usize) {
            slot.created = false;
        }
    }
}

/// Register access on the owning thread (`&self` is enough: the framework keeps the
/// registers, and this type is !Send).
impl HvfVcpu {
    fn get_core(&self, reg: CoreReg) -> Result<u64, HvError> {
        let mut v = 0;
        // SAFETY: owning thread, valid register id, `v` writable.
        check("hv_vcpu_get_reg", unsafe {
            hv_vcpu_get_reg(self.hv, reg.hv_reg(), &mut v)
        })?;
        Ok(v)
    }

    fn set_core(&self, reg: CoreReg, value: u64) -> Result<(), HvError> {
        // SAFETY: owning thread, valid register id.
        check("hv_vcpu_set_reg", unsafe {
            hv_vcpu_set_reg(self.hv, reg.hv_reg(), value)
        })
    }

    fn get_sys(&self, id: u16) -> Result<u64, HvError> {
        let mut v = 0;
        // SAFETY: owning thread, `v` writable; the framework rejects unknown ids.
        check("hv_vcpu_get_sys_reg", unsafe {
            hv_vcpu_get_sys_reg(self.hv, id, &mut v)
        })?;
        Ok(v)
    }

    fn set_sys(&self, id: u16, value: u64) -> Result<(), HvError> {
        // SAFETY: owning thread; the framework rejects unknown ids.
        check("hv_vcpu_set_sys_reg", unsafe {
            hv_vcpu_set_sys_reg(self.hv, id, value)
        })
    }

    fn set_x(&self, reg: u8, value: u64) -> Result<(), HvError> {
        if reg == ZERO_REGISTER {
            return Ok(());
        }
        self.set_core(CoreReg::X(reg), value)
    }

    fn get_x(&self, reg: u8) -> Result<u64, HvError> {
        if reg == ZERO_REGISTER {
            return Ok(0);
        }
        self.get_core(CoreReg::X(reg))
    }

    fn vtimer_offset(&self) -> Result<u64, HvError> {
        let mut v = 0;
        // SAFETY: owning thread, `v` writable.
        check("hv_vcpu_get_vtimer_offset", unsafe {
            hv_vcpu_get_vtimer_offset(self.hv, &mut v)
        })?;
        Ok(v)
    }

    fn run_err(&self, e: HvError) -> VcpuError {
        VcpuError::Run {
            id: self.id,
            source: e.into(),
        }
    }

    fn reg_err(&self, op: &'static str) -> impl Fn(HvError) -> VcpuError + '_ {
        move |e| VcpuError::Registers {
            id: self.id,
            op,
            source: e.into(),
        }
    }

    fn apply_pc_advance(&mut self) -> Result<(), VcpuError> {
        if self.pc_advance != 0 {
            let pc = self.get_core(CoreReg::Pc).map_err(|e| self.run_err(e))?;
            self.set_core(CoreReg::Pc, pc.wrapping_add(self.pc_advance))
                .map_err(|e| self.run_err(e))?;
            self.pc_advance = 0;
        }
        Ok(())
    }

    /// Parks a powered-off vCPU until PSCI CPU_ON targets it (true) or it is kicked
    /// (false).
    fn wait_for_cpu_on(&mut self) -> Result<bool, VcpuError> {
        let mut power = self.shared.lock();
        loop {
            if self.kicked.swap(false, Ordering::AcqRel) {
                return Ok(false);
            }
            let slot = &mut power.slots[self.id as usize];
            if slot.power != CpuPower::Off && slot.mailbox.is_none() {
                return Ok(true);
            }
            if let Some((entry, context_id)) = slot.mailbox.take() {
                slot.power = CpuPower::On;
                drop(power);
                // DEN0022 §6.4.3: entry at EL1h, MMU off, x0 = context id.
                let set = |r, v| self.set_core(r, v).map_err(|e| self.run_err(e));
                set(CoreReg::Pc, entry)?;
                set(CoreReg::X(0), context_id)?;
                set(CoreReg::Cpsr, PSTATE_EL1H_DAIF)?;
                self.set_sys(SCTLR_EL1.0, SCTLR_EL1_MMU_OFF)
                    .map_err(|e| self.run_err(e))?;
                self.pc_advance = 0;
                return Ok(true);
            }
            power = self
                .shared
                .wake
                .wait(power)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits after WFI until the virtual timer is due, an interrupt line is raised,
    /// a CPU_ON or a kick (true), on the VM's wake-up point: no polling, but for
    /// [`SGI_RECHECK`] with the framework's GIC and more than one vCPU.
    fn wait_for_interrupt(&mut self, timeout: Option<u64>) -> Result<bool, VcpuError> {
        // Read before the last entry: an event since, while the guest ran to its
        // WFI, is not lost.
        let seen = self.entry_epoch;
        if self.kicked.swap(false, Ordering::AcqRel) {
            return Ok(true);
        }
        let get = |id: u16| self.get_sys(id).map_err(|e| self.run_err(e));
        let ctl = get(named::CNTV_CTL_EL0.0)?;
        let cval = get(named::CNTV_CVAL_EL0.0)?;
        let offset = self.vtimer_offset().map_err(|e| self.run_err(e))?;
        let now = mach_now();
        let mut deadline = match state::wfi_wait(ctl, cval, offset, now) {
            WfiWait::Now => return Ok(false),
            WfiWait::Until(t) => Some(t),
            WfiWait::NoTimer => None,
        };
        // WFIT: its own timeout, a virtual counter value.
        if let Some(t) = timeout {
            let t = t.wrapping_add(offset);
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        }
        if self.gic.is_some() && self.shared.vcpus > 1 {
            let recheck = now.saturating_add(duration_to_ticks(SGI_RECHECK, self.timebase));
            deadline = Some(deadline.map_or(recheck, |d| d.min(recheck)));
        }
        self.shared
            .events
            .wait(seen, deadline, &MachClock(self.timebase));
        Ok(self.kicked.swap(false, Ordering::AcqRel))
    }

    /// An Undefined Instruction exception for the instruction at the PC (a trapped
    /// register access the VMM does not emulate), as the architecture takes it to
    /// EL1; the guest continues at its vector.
    fn inject_undefined(&mut self, what: &str) -> Result<(), VcpuError> {
        // The faulting instruction is the exception's return address: no advance.
        self.pc_advance = 0;
        let err = |e| self.run_err(e);
        let pc = self.get_core(CoreReg::Pc).map_err(err)?;
        let pstate = self.get_core(CoreReg::Cpsr).map_err(err)?;
        let vbar = self.get_sys(VBAR_EL1.0).map_err(err)?;
        let sctlr = self.get_sys(SCTLR_EL1.0).map_err(err)?;
        let inj = trap::undefined(pc, pstate, vbar, sctlr);
        tracing::warn!(
            "vCPU {}: {what} at guest PC {pc:#x} is not emulated: undefined instruction injected",
            self.id
        );
        self.set_sys(named::ELR_EL1.0, inj.elr_el1).map_err(err)?;
        self.set_sys(named::SPSR_EL1.0, inj.spsr_el1).map_err(err)?;
        self.set_sys(ESR_EL1.0, inj.esr_el1).map_err(err)?;
        self.set_core(CoreReg::Cpsr, inj.pstate).map_err(err)?;
        self.set_core(CoreReg::Pc, inj.pc).map_err(err)?;
        Ok(())
    }

    /// Answers an HVC: PSCI, or NOT_SUPPORTED for any other SMCCC function.
    fn handle_hvc(&mut self) -> Result<Option<VcpuExit>, VcpuError> {
        let x = |n| self.get_core(CoreReg::X(n)).map_err(|e| self.run_err(e));
        let function_id = (x(0)? & 0xffff_ffff) as u32;
        let args = [x(1)?, x(2)?, x(3)?];
        let outcome = {
            let mut power = self.shared.lock();
            let outcome = psci::handle(function_id, args, &*power);
            match outcome.action {
                PsciAction::CpuOn {
                    target,
                    entry,
                    context_id,
                } => {
                    if let Some(slot) = power.slots.get_mut(target as usize) {
                        slot.power = CpuPower::OnPending;
                        slot.mailbox = Some((entry, context_id));
                    }
                    self.shared.wake.notify_all();
                }
                PsciAction::CpuOff => {
                    power.slots[self.id as usize].power = CpuPower::Off;
                }
                _ => {}
            }
            outcome
        };
        if let Some(ret) = outcome.x0 {
            self.set_core(CoreReg::X(0), ret)
                .map_err(|e| self.run_err(e))?;
        }
        Ok(match outcome.action {
            PsciAction::SystemOff => Some(VcpuExit::Shutdown),
            PsciAction::SystemReset => Some(VcpuExit::Reset),
            PsciAction::None | PsciAction::CpuOn { .. } | PsciAction::CpuOff => None,
        })
    }

    /// Handles an exception exit; `Some` is returned to the runner, `None` re-enters.
    fn handle_exception(&mut self) -> Result<Option<VcpuExit>, VcpuError> {
        // SAFETY: `exit` was returned by hv_vcpu_create for this vCPU and stays valid
        // until hv_vcpu_destroy; the framework writes it only inside hv_vcpu_run on this
        // thread, which is not running now.
        let info = unsafe { *self.exit };
        let syndrome = match esr::decode(info.exception.syndrome, info.exception.physical_address) {
            Ok(s) => s,
            Err(e) => {
                return Ok(Some(VcpuExit::Unhandled {
                    reason: e.to_string(),
                }))
            }
        };
        self.pc_advance = syndrome.pc_advance();
        match syndrome {
            Syndrome::Mmio(access) if access.write => {
                let value = self.get_x(access.reg).map_err(|e| self.run_err(e))?;
                let (bytes, len) = access.store_bytes(value);
                Ok(Some(VcpuExit::MmioWrite {
                    addr: access.addr,
                    data: IoData::new(&bytes[..len]),
                }))
            }
            Syndrome::Mmio(access) => {
                // Two-step: the PC moves only once set_io_result has filled Xt.
                self.pc_advance = 0;
                self.pending_read = Some(access);
                Ok(Some(VcpuExit::MmioRead {
                    addr: access.addr,
                    size: access.size,
                }))
            }
            Syndrome::Hvc { .. } => self.handle_hvc(),
            Syndrome::Smc { .. } => {
                // No secure firmware: SMCCC's answer for an unimplemented function.
                self.set_core(CoreReg::X(0), psci::status::NOT_SUPPORTED as u64)
                    .map_err(|e| self.run_err(e))?;
                Ok(None)
            }
            Syndrome::Wait(kind @ (WaitKind::Wfi | WaitKind::Wfit)) => {
                let timeout = match (kind, esr::wfxt_register(info.exception.syndrome)) {
                    (WaitKind::Wfit, Some(rn)) => {
                        Some(self.get_x(rn).map_err(|e| self.run_err(e))?)
                    }
                    _ => None,
                };
                self.apply_pc_advance()?;
                Ok(self
                    .wait_for_interrupt(timeout)?
                    .then_some(VcpuExit::Interrupted))
            }
            // WFE is a hint; re-entering is a valid implementation of it.
            Syndrome::Wait(WaitKind::Wfe | WaitKind::Wfet) => Ok(None),
            Syndrome::SysReg(access) => match trap::sysreg_trap_policy(access.reg) {
                SysRegTrap::RazWi => {
                    if access.read {
                        self.set_x(access.rt, 0).map_err(|e| self.run_err(e))?;
                    }
                    Ok(None)
                }
                SysRegTrap::FrameworkValue => {
                    if access.read {
                        let err = |e| self.run_err(e);
                        let mut v = self.get_sys(access.reg.0).map_err(err)?;
                        if access.reg == trap::ID_AA64PFR0_EL1 {
                            v = trap::pfr0_for_guest(v, self.gic.is_some());
                        }
                        self.set_x(access.rt, v).map_err(err)?;
                    }
                    Ok(None)
                }
                SysRegTrap::Undefined => {
                    self.inject_undefined(&format!(
                        "{} of system register {}",
                        if access.read { "a read" } else { "a write" },
                        sysreg::name(access.reg)
                    ))?;
                    Ok(None)
                }
            },
            Syndrome::Brk { imm } => Ok(Some(VcpuExit::Unhandled {
                reason: format!("guest executed BRK #{imm:#x} with no debugger attached"),
            })),
        }
    }

    /// Without the in-framework GIC, before each entry: the IRQ line at the
    /// virtual timer's level while it is masked, and the timer unmasked once the
    /// guest cleared the condition (`vtimer.rs`). The framework clears a pending
    /// interrupt after every run, so it is set every time.
    fn sync_vtimer(&mut self) -> Result<(), VcpuError> {
        let ctl = if self.vtimer.is_masked() {
            self.get_sys(named::CNTV_CTL_EL0.0)
                .map_err(|e| self.run_err(e))?
        } else {
            0
        };
        let act = self.vtimer.before_run(|| ctl);
        // SAFETY: owning thread.
        let rc = unsafe { hv_vcpu_set_pending_interrupt(self.hv, HV_INTERRUPT_TYPE_IRQ, act.irq) };
        check("hv_vcpu_set_pending_interrupt", rc).map_err(|e| self.run_err(e))?;
        if act.unmask {
            // SAFETY: owning thread.
            let rc = unsafe { hv_vcpu_set_vtimer_mask(self.hv, false) };
            check("hv_vcpu_set_vtimer_mask", rc).map_err(|e| self.run_err(e))?;
        }
        Ok(())
    }

    fn power_state(&self) -> CpuPower {
        self.shared.lock().slots[self.id as usize].power
    }
}

/// SCTLR_EL1's encoding.
const SCTLR_EL1: a64::SysReg = a64::SysReg::new(3, 0, 1, 0, 0);
/// VBAR_EL1's and ESR_EL1's encodings.
const VBAR_EL1: a64::SysReg = a64::SysReg::new(3, 0, 12, 0, 0);
const ESR_EL1: a64::SysReg = a64::SysReg::new(3, 0, 5, 2, 0);

/// `RegisterAccess` over a live vCPU, for state capture and restore.
struct Regs<'a>(&'a HvfVcpu);

impl RegisterAccess for Regs<'_> {
    type Error = HvError;

    fn core(&self, reg: CoreReg) -> Result<u64, HvError> {
        self.0.get_core(reg)
    }

    fn set_core(&mut self, reg: CoreReg, value: u64) -> Result<(), HvError> {
        self.0.set_core(reg, value)
    }

    fn simd(&self, index: u8) -> Result<u128, HvError> {
        let mut v = hv_simd_fp_uchar16_t::default();
        // SAFETY: owning thread, `v` is a writable, 16-byte-aligned 16-byte vector.
        check("hv_vcpu_get_simd_fp_reg", unsafe {
            hv_vcpu_get_simd_fp_reg(self.0.hv, u32::from(index), &mut v)
        })?;
        // Lane 0 is the lowest byte in memory: the little-endian value's low byte.
        Ok(u128::from_le_bytes(v.0))
    }

    fn set_simd(&mut self, index: u8, value: u128) -> Result<(), HvError> {
        let v = hv_simd_fp_uchar16_t(value.to_le_bytes());
        // SAFETY: owning thread (Regs borrows the !Send vCPU).
        check("hv_vcpu_set_simd_fp_reg", unsafe {
            set_simd_fp_reg(self.0.hv, u32::from(index), &v)
        })
    }

    fn sys(&self, reg: &HvfSysReg) -> Result<u64, HvError> {
        match (reg.kind, self.0.gic) {
            (HvfRegKind::GicIcc, Some(api)) => {
                let mut v = 0;
                // SAFETY: owning thread (hv_gic.h requires it), `v` writable.
                check("hv_gic_get_icc_reg", unsafe {
                    (api.get_icc_reg)(self.0.hv, reg.id, &mut v)
                })?;
                Ok(v)
            }
            (HvfRegKind::GicIcc, None) => Err(HvError {
                call: "hv_gic_get_icc_reg",
                code: crate::hv_error::HV_NO_DEVICE,
            }),
            (HvfRegKind::Vcpu, _) => self.0.get_sys(reg.id),
        }
    }

    fn set_sys(&mut self, reg: &HvfSysReg, value: u64) -> Result<(), HvError> {
        match (reg.kind, self.0.gic) {
            (HvfRegKind::GicIcc, Some(api)) => {
                // SAFETY: owning thread (hv_gic.h requires it).
                check("hv_gic_set_icc_reg", unsafe {
                    (api.set_icc_reg)(self.0.hv, reg.id, value)
                })
            }
            (HvfRegKind::GicIcc, None) => Err(HvError {
                call: "hv_gic_set_icc_reg",
                code: crate::hv_error::HV_NO_DEVICE,
            }),
            (HvfRegKind::Vcpu, _) => self.0.set_sys(reg.id, value),
        }
    }
}

impl Vcpu for HvfVcpu {
    type Kicker = HvfKicker;

    fn id(&self) -> u32 {
        self.id
    }

    fn kicker(&self) -> HvfKicker {
        HvfKicker {
            alive: Arc::clone(&self.alive),
            kicked: Arc::clone(&self.kicked),
            shared: Arc::clone(&self.shared),
        }
    }

    fn run(&mut self) -> Result<VcpuExit, VcpuError> {
        if let Some(access) = self.pending_read {
            return Err(VcpuError::Run {
                id: self.id,
                source: io::Error::other(format!(
                    "MMIO read at {:#x} was not completed with set_io_result before run",
                    access.addr
                )),
            });
        }
        loop {
            if self.power_state() != CpuPower::On && !self.wait_for_cpu_on()? {
                return Ok(VcpuExit::Interrupted);
            }
            self.apply_pc_advance()?;
            if self.gic.is_none() {
                self.sync_vtimer()?;
            }
            self.entry_epoch = self.shared.events.epoch();
            // SAFETY: owning thread; guest memory mapped with hv_vm_map stays valid per
            // Vm::map_memory's contract.
            let rc = unsafe { hv_vcpu_run(self.hv) };
            check("hv_vcpu_run", rc).map_err(|e| self.run_err(e))?;
            // SAFETY: see handle_exception: valid for the vCPU's life, written only by
            // hv_vcpu_run on this thread, which has returned.
            let reason = unsafe { (*self.exit).reason };
            match reason {
                HV_EXIT_REASON_CANCELED => {
                    self.kicked.store(false, Ordering::Release);
                    return Ok(VcpuExit::Interrupted);
                }
                HV_EXIT_REASON_VTIMER_ACTIVATED => {
                    // The framework masked the vtimer. Without the in-framework GIC
                    // the VMM holds the IRQ line while the timer asks for it and
                    // unmasks once the guest dealt with it (`sync_vtimer`, before
                    // each entry). With the GIC the timer PPI is the GIC's
                    // (HV_GIC_INT_EL1_VIRTUAL_TIMER) and the timer is unmasked at
                    // once; unverified on hardware: see docs/hvf.md.
                    if self.gic.is_none() {
                        self.vtimer.activated();
                    } else {
                        // SAFETY: owning thread.
                        let rc = unsafe { hv_vcpu_set_vtimer_mask(self.hv, false) };
                        check("hv_vcpu_set_vtimer_mask", rc).map_err(|e| self.run_err(e))?;
                    }
                }
                HV_EXIT_REASON_EXCEPTION => {
                    if let Some(exit) = self.handle_exception()? {
                        return Ok(exit);
                    }
                }
                other => {
                    return Ok(VcpuExit::Unhandled {
                        reason: format!("Hypervisor.framework exit reason {other}"),
                    })
                }
            }
        }
    }

    fn set_io_result(&mut self, data: &[u8]) -> Result<(), VcpuError> {
        let Some(access) = self.pending_read else {
            return Err(VcpuError::NoPendingIo {
                id: self.id,
                len: data.len(),
            });
        };
        if data.len() != usize::from(access.size) {
            return Err(VcpuError::NoPendingIo {
                id: self.id,
                len: data.len(),
            });
        }
        self.set_x(access.reg, access.load_value(data))
            .map_err(self.reg_err("complete MMIO read"))?;
        self.pending_read = None;
        self.pc_advance = 4;
        Ok(())
    }

    fn set_boot_state(&mut self, boot: &BootState) -> Result<(), VcpuError> {
        let BootState::Aarch64(b) = boot else {
            return Err(VcpuError::StateMismatch(
                "an x86_64 boot state cannot start an aarch64 vCPU".into(),
            ));
        };
        let id = self.id;
        let err = |e: HvError| VcpuError::Registers {
            id,
            op: "set boot registers",
            source: e.into(),
        };
        // arm64 booting.rst: x0 = DTB, x1..x3 = 0.
        self.set_core(CoreReg::X(0), b.x0).map_err(&err)?;
        for n in 1..=3 {
            self.set_core(CoreReg::X(n), 0).map_err(&err)?;
        }
        self.set_core(CoreReg::Pc, b.pc).map_err(&err)?;
        self.set_core(CoreReg::Cpsr, b.pstate).map_err(&err)?;
        self.pending_read = None;
        self.pc_advance = 0;
        Ok(())
    }

    fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let offset = self
            .vtimer_offset()
            .map_err(self.reg_err("read the timer offset"))?;
        let power = match self.power_state() {
            CpuPower::On | CpuPower::OnPending => PowerState::On,
            CpuPower::Off => PowerState::Off,
        };
        let ctx = state::CaptureContext {
            with_gic: self.gic.is_some(),
            pc_advance: self.pc_advance,
            virtual_counter: mach_now().wrapping_sub(offset),
            power,
        };
        let s = state::capture(&Regs(self), ctx).map_err(|e| VcpuError::Registers {
            id: self.id,
            op: "save state",
            source: io::Error::other(e),
        })?;
        Ok(VcpuState::Aarch64(Box::new(s)))
    }

    fn restore_state(&mut self, vcpu_state: &VcpuState) -> Result<(), VcpuError> {
        let VcpuState::Aarch64(s) = vcpu_state else {
            return Err(VcpuError::StateMismatch(
                "an x86_64 vCPU state cannot be restored into an aarch64 vCPU".into(),
            ));
        };
        let counter = state::apply(&mut Regs(self), s, self.gic.is_some()).map_err(|e| {
            VcpuError::Registers {
                id: self.id,
                op: "restore state",
                source: io::Error::other(e),
            }
        })?;
        {
            let mut power = self.shared.lock();
            if let Some(counter) = counter {
                // One offset for every vCPU, so the guest sees a single clock.
                let offset = *power
                    .restored_offset
                    .get_or_insert_with(|| state::offset_for_counter(mach_now(), counter));
                // SAFETY: owning thread.
                let rc = unsafe { hv_vcpu_set_vtimer_offset(self.hv, offset) };
                check("hv_vcpu_set_vtimer_offset", rc)
                    .map_err(self.reg_err("restore the timer offset"))?;
            }
            let slot = &mut power.slots[self.id as usize];
            slot.mailbox = None;
            slot.power = match s.power {
                PowerState::On => CpuPower::On,
                PowerState::Off => CpuPower::Off,
            };
        }
        self.pending_read = None;
        self.pc_advance = 0;
        // A restored vCPU starts with its timer unmasked (a vCPU reused for
        // another restore may have been left masked).
        self.vtimer = Vtimer::default();
        // SAFETY: owning thread.
        let rc = unsafe { hv_vcpu_set_vtimer_mask(self.hv, false) };
        check("hv_vcpu_set_vtimer_mask", rc).map_err(self.reg_err("unmask the timer"))?;
        Ok(())
    }
}
