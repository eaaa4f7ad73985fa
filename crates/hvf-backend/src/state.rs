//! vCPU and VM state conversion between Hypervisor.framework's register model and the
//! neutral `hypervisor::aarch64` types, the virtual-timer arithmetic, and the tagged
//! GIC blob. Register access goes through the small [`RegisterAccess`] trait, which the
//! real vCPU implements with `hv_vcpu_*` calls and the tests implement with a map, so
//! the capture/apply logic runs on any host.

use std::collections::BTreeMap;
use std::time::Duration;

use hypervisor::aarch64::{BackendBlob, PowerState, SysReg, VcpuState};
use thiserror::Error;

use crate::sysreg::{self, named, HvfRegKind};

/// The backend tag of blobs this backend writes.
pub const BACKEND_TAG: &str = "hvf";
/// Format version of the GIC blob: the bytes are `hv_gic_state_get_data` output
/// verbatim (Apple versions the contents itself and `hv_gic_set_state` refuses an
/// incompatible buffer).
pub const GIC_BLOB_VERSION: u32 = 1;
/// Largest GIC blob accepted from a snapshot. The framework's state for the largest
/// GIC it offers is a few hundred KiB; anything near this is a corrupt or hostile file.
pub const GIC_BLOB_MAX: usize = 16 << 20;

/// Number of general-purpose registers x0..x30.
pub const GP_REGS: usize = 31;
/// Number of SIMD&FP registers q0..q31.
pub const SIMD_REGS: usize = 32;

/// Errors converting state.
#[derive(Debug, Error)]
pub enum StateError<E: std::error::Error + 'static> {
    /// Reading or writing a register failed in the framework.
    #[error("cannot {op} {reg}")]
    Access {
        /// "read" or "write".
        op: &'static str,
        /// Register name.
        reg: String,
        /// The framework error.
        #[source]
        source: E,
    },
    /// The state has the wrong number of registers.
    #[error("vCPU state has {found} {what} registers, expected {expected}")]
    RegisterCount {
        /// Which bank.
        what: &'static str,
        /// How many were found.
        found: usize,
        /// How many an AArch64 vCPU has.
        expected: usize,
    },
    /// The state names a register this backend cannot set.
    #[error("vCPU state contains system register {0}, which Hypervisor.framework does not expose")]
    UnknownSysReg(String),
    /// The state holds GIC CPU-interface registers but this VM has no GIC.
    #[error("vCPU state contains GIC register {0} but the VM has no in-framework GIC")]
    NoGic(String),
    /// The guest uses a CPU feature whose state this backend does not save.
    #[error(
        "the guest uses {0}, whose state this backend does not save: it cannot be snapshotted"
    )]
    UnsavedFeature(String),
}

/// The core registers of `hv_reg_t` (order from `hv_vcpu_types.h`: X0..X30 = 0..30,
/// then PC, FPCR, FPSR, CPSR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreReg {
    /// X0..X30.
    X(u8),
    /// Program counter.
    Pc,
    /// FPCR.
    Fpcr,
    /// FPSR.
    Fpsr,
    /// CPSR (PSTATE).
    Cpsr,
}

impl CoreReg {
    /// The `hv_reg_t` value.
    pub fn hv_reg(self) -> u32 {
        match self {
            CoreReg::X(n) => u32::from(n.min(30)),
            CoreReg::Pc => 31,
            CoreReg::Fpcr => 32,
            CoreReg::Fpsr => 33,
            CoreReg::Cpsr => 34,
        }
    }

    fn name(self) -> String {
        match self {
            CoreReg::X(n) => format!("X{n}"),
            CoreReg::Pc => "PC".into(),
            CoreReg::Fpcr => "FPCR".into(),
            CoreReg::Fpsr => "FPSR".into(),
            CoreReg::Cpsr => "CPSR".into(),
        }
    }
}

/// Register access of one vCPU.
pub trait RegisterAccess {
    /// The framework's error type.
    type Error: std::error::Error + 'static;
    /// Reads a core register.
    fn core(&self, reg: CoreReg) -> Result<u64, Self::Error>;
    /// Writes a core register.
    fn set_core(&mut self, reg: CoreReg, value: u64) -> Result<(), Self::Error>;
    /// Reads SIMD&FP register q`index`.
    fn simd(&self, index: u8) -> Result<u128, Self::Error>;
    /// Writes SIMD&FP register q`index`.
    fn set_simd(&mut self, index: u8, value: u128) -> Result<(), Self::Error>;
    /// Reads a framework system register (vCPU or GIC ICC, per `reg.kind`).
    fn sys(&self, reg: &sysreg::HvfSysReg) -> Result<u64, Self::Error>;
    /// Writes a framework system register.
    fn set_sys(&mut self, reg: &sysreg::HvfSysReg, value: u64) -> Result<(), Self::Error>;
}

fn read<R: RegisterAccess + ?Sized>(r: &R, reg: CoreReg) -> Result<u64, StateError<R::Error>> {
    r.core(reg).map_err(|source| StateError::Access {
        op: "read",
        reg: reg.name(),
        source,
    })
}

fn read_sys<R: RegisterAccess + ?Sized>(r: &R, reg: SysReg) -> Result<u64, StateError<R::Error>> {
    let hv = sysreg::to_hvf(reg).ok_or_else(|| StateError::UnknownSysReg(sysreg::name(reg)))?;
    r.sys(hv).map_err(|source| StateError::Access {
        op: "read",
        reg: hv.name.into(),
        source,
    })
}

fn write_sys<R: RegisterAccess + ?Sized>(
    r: &mut R,
    reg: SysReg,
    value: u64,
) -> Result<(), StateError<R::Error>> {
    let hv = sysreg::to_hvf(reg).ok_or_else(|| StateError::UnknownSysReg(sysreg::name(reg)))?;
    r.set_sys(hv, value).map_err(|source| StateError::Access {
        op: "write",
        reg: hv.name.into(),
        source,
    })
}

/// What the caller knows that the registers do not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureContext {
    /// The in-framework GIC exists (its CPU-interface registers are saved).
    pub with_gic: bool,
    /// Bytes to add to the PC: an exit whose instruction was completed but whose PC
    /// advance is still pending (applied at the next run) must not be replayed after a
    /// restore.
    pub pc_advance: u64,
    /// The guest's virtual counter (CNTVCT_EL0) now.
    pub virtual_counter: u64,
    /// PSCI power state.
    pub power: PowerState,
}

const ID_AA64DFR0_EL1: SysReg = SysReg::new(3, 0, 0, 5, 0);
const ID_AA64PFR1_EL1: SysReg = SysReg::new(3, 0, 0, 4, 1);
const CPACR_EL1: SysReg = SysReg::new(3, 0, 1, 0, 2);

/// CPU features whose state is not saved, refused when the guest turned them on:
/// SME (Apple M4; the framework exposes it from macOS 15.2), whose streaming SVE
/// registers, ZA array and SVCR have no place in [`VcpuState`]. The guest has SME
/// when ID_AA64PFR1_EL1.SME (bits 27:24) is non-zero and uses it once CPACR_EL1.SMEN
/// (bits 25:24) lets EL1 or EL0 execute its instructions (Arm ARM, CPACR_EL1). SVE is
/// not offered by Apple silicon.
fn refuse_unsaved_features<R: RegisterAccess + ?Sized>(
    regs: &R,
) -> Result<(), StateError<R::Error>> {
    let sme = (read_sys(regs, ID_AA64PFR1_EL1)? >> 24) & 0xf;
    let smen = (read_sys(regs, CPACR_EL1)? >> 24) & 0b11;
    if sme != 0 && smen != 0 {
        return Err(StateError::UnsavedFeature(format!(
            "SME (ID_AA64PFR1_EL1.SME = {sme}, CPACR_EL1.SMEN = {smen:#04b})"
        )));
    }
    Ok(())
}

/// Captures the full vCPU state.
pub fn capture<R: RegisterAccess + ?Sized>(
    regs: &R,
    ctx: CaptureContext,
) -> Result<VcpuState, StateError<R::Error>> {
    let mut x = Vec::with_capacity(GP_REGS);
    for n in 0..GP_REGS as u8 {
        x.push(read(regs, CoreReg::X(n))?);
    }
    let mut v = Vec::with_capacity(SIMD_REGS);
    for n in 0..SIMD_REGS as u8 {
        v.push(regs.simd(n).map_err(|source| StateError::Access {
            op: "read",
            reg: format!("Q{n}"),
            source,
        })?);
    }
    refuse_unsaved_features(regs)?;
    let dfr0 = read_sys(regs, ID_AA64DFR0_EL1)?;
    let mut sys_regs = BTreeMap::new();
    for hv in sysreg::saved_regs(ctx.with_gic).chain(sysreg::debug_regs(dfr0)) {
        let value = regs.sys(hv).map_err(|source| StateError::Access {
            op: "read",
            reg: hv.name.into(),
            source,
        })?;
        sys_regs.insert(sysreg::from_hvf(hv.id), value);
    }
    sys_regs.insert(named::CNTVCT_EL0, ctx.virtual_counter);
    Ok(VcpuState {
        x,
        sp_el0: read_sys(regs, named::SP_EL0)?,
        sp_el1: read_sys(regs, named::SP_EL1)?,
        pc: read(regs, CoreReg::Pc)?.wrapping_add(ctx.pc_advance),
        pstate: read(regs, CoreReg::Cpsr)?,
        elr_el1: read_sys(regs, named::ELR_EL1)?,
        spsr_el1: read_sys(regs, named::SPSR_EL1)?,
        v,
        fpcr: read(regs, CoreReg::Fpcr)?,
        fpsr: read(regs, CoreReg::Fpsr)?,
        sys_regs,
        mpidr: read_sys(regs, named::MPIDR_EL1)?,
        power: ctx.power,
    })
}

/// Writes a captured state back. Returns the saved virtual counter, if any, so the
/// caller can choose the timer offset that continues it. The whole state is validated
/// before the first register is written, so a malformed state leaves the vCPU as it was.
pub fn apply<R: RegisterAccess + ?Sized>(
    regs: &mut R,
    state: &VcpuState,
    with_gic: bool,
) -> Result<Option<u64>, StateError<R::Error>> {
    if state.x.len() != GP_REGS {
        return Err(StateError::RegisterCount {
            what: "general-purpose",
            found: state.x.len(),
            expected: GP_REGS,
        });
    }
    if state.v.len() != SIMD_REGS {
        return Err(StateError::RegisterCount {
            what: "SIMD&FP",
            found: state.v.len(),
            expected: SIMD_REGS,
        });
    }
    let mut sys = Vec::with_capacity(state.sys_regs.len());
    let mut counter = None;
    for (&reg, &value) in &state.sys_regs {
        if reg == named::CNTVCT_EL0 {
            counter = Some(value);
            continue;
        }
        let hv = sysreg::to_hvf(reg).ok_or_else(|| StateError::UnknownSysReg(sysreg::name(reg)))?;
        if !hv.saved {
            // Read-only or carried in a named field: not something a state may set.
            return Err(StateError::UnknownSysReg(hv.name.into()));
        }
        if hv.kind == HvfRegKind::GicIcc && !with_gic {
            return Err(StateError::NoGic(hv.name.into()));
        }
        sys.push((hv, value));
    }

    let set = |regs: &mut R, reg: CoreReg, value: u64| {
        regs.set_core(reg, value)
            .map_err(|source| StateError::Access {
                op: "write",
                reg: reg.name(),
                source,
            })
    };
    for (n, &value) in state.x.iter().enumerate() {
        set(regs, CoreReg::X(n as u8), value)?;
    }
    for (n, &value) in state.v.iter().enumerate() {
        regs.set_simd(n as u8, value)
            .map_err(|source| StateError::Access {
                op: "write",
                reg: format!("Q{n}"),
                source,
            })?;
    }
    set(regs, CoreReg::Pc, state.pc)?;
    set(regs, CoreReg::Cpsr, state.pstate)?;
    set(regs, CoreReg::Fpcr, state.fpcr)?;
    set(regs, CoreReg::Fpsr, state.fpsr)?;
    write_sys(regs, named::SP_EL0, state.sp_el0)?;
    write_sys(regs, named::SP_EL1, state.sp_el1)?;
    write_sys(regs, named::ELR_EL1, state.elr_el1)?;
    write_sys(regs, named::SPSR_EL1, state.spsr_el1)?;
    write_sys(regs, named::MPIDR_EL1, state.mpidr)?;
    for (hv, value) in sys {
        regs.set_sys(hv, value)
            .map_err(|source| StateError::Access {
                op: "write",
                reg: hv.name.into(),
                source,
            })?;
    }
    Ok(counter)
}

/// How long a vCPU that executed WFI may sleep before its virtual timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WfiWait {
    /// The timer condition is already met: resume at once.
    Now,
    /// The timer fires when the host counter (`mach_absolute_time`) reaches this value.
    Until(u64),
    /// The timer is disabled or masked: only another interrupt wakes the vCPU.
    NoTimer,
}

use crate::vtimer::{CNTV_CTL_ENABLE, CNTV_CTL_IMASK};

/// The WFI deadline from the virtual timer. The framework defines
/// `CNTVCT_EL0 = mach_absolute_time() - vtimer_offset` (`hv_vcpu.h`), so the timer
/// fires at host time `CNTV_CVAL_EL0 + vtimer_offset`; the condition is
/// `CNTVCT - CVAL >= 0` as an unsigned comparison (Arm ARM D11.2.4).
pub fn wfi_wait(cntv_ctl: u64, cntv_cval: u64, vtimer_offset: u64, host_now: u64) -> WfiWait {
    if cntv_ctl & CNTV_CTL_ENABLE == 0 || cntv_ctl & CNTV_CTL_IMASK != 0 {
        return WfiWait::NoTimer;
    }
    let virtual_now = host_now.wrapping_sub(vtimer_offset);
    if virtual_now >= cntv_cval {
        WfiWait::Now
    } else {
        WfiWait::Until(cntv_cval.wrapping_add(vtimer_offset))
    }
}

/// Converts host counter ticks to a duration with `mach_timebase_info`'s ratio
/// (nanoseconds = ticks * numer / denom), saturating instead of overflowing.
pub fn ticks_to_duration(ticks: u64, numer: u32, denom: u32) -> Duration {
    if denom == 0 {
        return Duration::ZERO;
    }
    let nanos = u128::from(ticks) * u128::from(numer) / u128::from(denom);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The timer offset that makes the guest's virtual counter read `counter` at host time
/// `host_now`, so a restored guest sees its clock continue instead of jumping.
pub const fn offset_for_counter(host_now: u64, counter: u64) -> u64 {
    host_now.wrapping_sub(counter)
}

/// Errors about a GIC blob from a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BlobError {
    /// The blob was written by another backend.
    #[error("GIC state was saved by the {found:?} backend; this is the hvf backend")]
    WrongBackend {
        /// The blob's tag.
        found: String,
    },
    /// The blob's format version is not one this build reads.
    #[error(
        "GIC state format version {found} is not supported (this build reads {GIC_BLOB_VERSION})"
    )]
    WrongVersion {
        /// The blob's version.
        found: u32,
    },
    /// The blob is empty or implausibly large.
    #[error("GIC state of {0} bytes is empty or larger than {GIC_BLOB_MAX} bytes")]
    BadSize(usize),
}

/// Wraps the framework's GIC state bytes in a tagged blob.
pub fn gic_blob(bytes: Vec<u8>) -> BackendBlob {
    BackendBlob {
        backend: BACKEND_TAG.into(),
        version: GIC_BLOB_VERSION,
        bytes,
    }
}

/// The framework's GIC state bytes from a blob, refusing other backends' blobs.
pub fn gic_bytes(blob: &BackendBlob) -> Result<&[u8], BlobError> {
    if blob.backend != BACKEND_TAG {
        return Err(BlobError::WrongBackend {
            found: blob.backend.clone(),
        });
    }
    if blob.version != GIC_BLOB_VERSION {
        return Err(BlobError::WrongVersion {
            found: blob.version,
        });
    }
    if blob.bytes.is_empty() || blob.bytes.len() > GIC_BLOB_MAX {
        return Err(BlobError::BadSize(blob.bytes.len()));
    }
    Ok(&blob.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    #[derive(Debug)]
    struct FakeError(&'static str);
    impl fmt::Display for FakeError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for FakeError {}

    /// A vCPU made of maps; register values start as a function of their id so a
    /// mix-up between registers shows.
    #[derive(Default)]
    struct FakeVcpu {
        core: BTreeMap<u32, u64>,
        simd: BTreeMap<u8, u128>,
        sys: BTreeMap<u16, u64>,
        fail_sys: Option<u16>,
    }

    impl FakeVcpu {
        fn seeded() -> Self {
            let mut f = Self::default();
            for r in 0..35u32 {
                f.core.insert(r, 0x1000 + u64::from(r));
            }
            for q in 0..32u8 {
                f.simd.insert(q, (u128::from(q) << 64) | 0xabcd);
            }
            for hv in sysreg::HVF_SYS_REGS.iter().chain(sysreg::DEBUG_REGS.iter()) {
                f.sys.insert(hv.id, u64::from(hv.id) << 8);
            }
            f
        }
    }

    impl FakeVcpu {
        /// A new vCPU: only the read-only registers have values (as the
        /// framework's ID registers do).
        fn ids_only() -> Self {
            let mut f = Self::default();
            for hv in sysreg::HVF_SYS_REGS.iter().filter(|r| !r.saved) {
                f.sys.insert(hv.id, u64::from(hv.id) << 8);
            }
            f
        }
    }

    impl RegisterAccess for FakeVcpu {
        type Error = FakeError;
        fn core(&self, reg: CoreReg) -> Result<u64, FakeError> {
            self.core
                .get(&reg.hv_reg())
                .copied()
                .ok_or(FakeError("no core"))
        }
        fn set_core(&mut self, reg: CoreReg, value: u64) -> Result<(), FakeError> {
            self.core.insert(reg.hv_reg(), value);
            Ok(())
        }
        fn simd(&self, index: u8) -> Result<u128, FakeError> {
            self.simd.get(&index).copied().ok_or(FakeError("no simd"))
        }
        fn set_simd(&mut self, index: u8, value: u128) -> Result<(), FakeError> {
            self.simd.insert(index, value);
            Ok(())
        }
        fn sys(&self, reg: &sysreg::HvfSysReg) -> Result<u64, FakeError> {
            if self.fail_sys == Some(reg.id) {
                return Err(FakeError("HV_BAD_ARGUMENT"));
            }
            self.sys.get(&reg.id).copied().ok_or(FakeError("no sys"))
        }
        fn set_sys(&mut self, reg: &sysreg::HvfSysReg, value: u64) -> Result<(), FakeError> {
            self.sys.insert(reg.id, value);
            Ok(())
        }
    }

    fn ctx() -> CaptureContext {
        CaptureContext {
            with_gic: true,
            pc_advance: 0,
            virtual_counter: 777,
            power: PowerState::On,
        }
    }

    #[test]
    fn capture_then_apply_round_trips_into_fresh_vcpu() {
        let src = FakeVcpu::seeded();
        let state = capture(&src, ctx()).unwrap();
        assert_eq!(state.x[7], 0x1007);
        assert_eq!(state.pc, 0x1000 + 31);
        assert_eq!(state.pstate, 0x1000 + 34);
        assert_eq!(state.sp_el1, 0xe208 << 8);
        assert_eq!(state.mpidr, 0xc005 << 8);
        assert_eq!(state.sys_regs[&named::CNTVCT_EL0], 777);
        assert!(state.sys_regs.contains_key(&SysReg(0xc664))); // ICC_CTLR_EL1

        let mut dst = FakeVcpu::ids_only();
        let counter = apply(&mut dst, &state, true).unwrap();
        assert_eq!(counter, Some(777));
        assert_eq!(capture(&dst, ctx()).unwrap(), state);
    }

    #[test]
    fn the_implemented_debug_registers_are_saved_and_restored() {
        let mut src = FakeVcpu::seeded();
        // Two breakpoints (BRPs = 1) and one watchpoint (WRPs = 0).
        src.sys.insert(0xc028, 1 << 12);
        src.sys.insert(0x800c, 0xdead_0000); // DBGBVR1_EL1
        src.sys.insert(0x8007, 0x1e7); // DBGWCR0_EL1
        let state = capture(&src, ctx()).unwrap();
        assert_eq!(state.sys_regs[&SysReg(0x800c)], 0xdead_0000);
        assert_eq!(state.sys_regs[&SysReg(0x8007)], 0x1e7);
        // DBGBVR2_EL1 and DBGWVR1_EL1 are not implemented: not read, not saved.
        assert!(!state.sys_regs.contains_key(&SysReg(0x8014)));
        assert!(!state.sys_regs.contains_key(&SysReg(0x800e)));
        let mut dst = FakeVcpu::default();
        apply(&mut dst, &state, true).unwrap();
        assert_eq!(dst.sys[&0x800c], 0xdead_0000);
        assert_eq!(dst.sys[&0x8007], 0x1e7);
    }

    #[test]
    fn a_guest_that_turned_sme_on_is_not_captured() {
        let mut src = FakeVcpu::seeded();
        src.sys.insert(0xc021, 1 << 24); // ID_AA64PFR1_EL1.SME = 1
        src.sys.insert(0xc082, 0); // CPACR_EL1.SMEN = 0: not used yet
        capture(&src, ctx()).unwrap();
        src.sys.insert(0xc082, 0b11 << 24); // SMEN: EL0 and EL1 may use it
        let err = capture(&src, ctx()).unwrap_err();
        assert!(matches!(err, StateError::UnsavedFeature(_)));
        assert!(err.to_string().contains("SME"), "{err}");
        // No SME on the CPU: SMEN bits mean nothing.
        src.sys.insert(0xc021, 0);
        capture(&src, ctx()).unwrap();
    }

    #[test]
    fn capture_with_pending_pc_advance_reports_next_instruction() {
        let src = FakeVcpu::seeded();
        let state = capture(
            &src,
            CaptureContext {
                pc_advance: 4,
                ..ctx()
            },
        )
        .unwrap();
        assert_eq!(state.pc, 0x1000 + 31 + 4);
    }

    #[test]
    fn capture_failing_register_names_it() {
        let mut src = FakeVcpu::seeded();
        src.fail_sys = Some(0xc080);
        let err = capture(&src, ctx()).unwrap_err();
        assert!(err.to_string().contains("SCTLR_EL1"), "{err}");
    }

    #[test]
    fn apply_wrong_register_count_is_refused_before_any_write() {
        let mut state = capture(&FakeVcpu::seeded(), ctx()).unwrap();
        state.x.pop();
        let mut dst = FakeVcpu::default();
        assert!(matches!(
            apply(&mut dst, &state, true),
            Err(StateError::RegisterCount { found: 30, .. })
        ));
        assert!(dst.core.is_empty());
    }

    #[test]
    fn apply_unknown_sys_reg_is_refused_before_any_write() {
        let mut state = capture(&FakeVcpu::seeded(), ctx()).unwrap();
        state.sys_regs.insert(SysReg::new(3, 0, 1, 2, 0), 1); // ZCR_EL1
        let mut dst = FakeVcpu::default();
        let err = apply(&mut dst, &state, true).unwrap_err();
        assert!(err.to_string().contains("S3_0_C1_C2_0"), "{err}");
        assert!(dst.core.is_empty());
    }

    #[test]
    fn apply_read_only_id_register_is_refused() {
        let mut state = capture(&FakeVcpu::seeded(), ctx()).unwrap();
        state.sys_regs.insert(SysReg(0xc000), 1); // MIDR_EL1
        assert!(matches!(
            apply(&mut FakeVcpu::default(), &state, true),
            Err(StateError::UnknownSysReg(name)) if name == "MIDR_EL1"
        ));
    }

    #[test]
    fn apply_gic_registers_without_gic_is_refused() {
        let state = capture(&FakeVcpu::seeded(), ctx()).unwrap();
        assert!(matches!(
            apply(&mut FakeVcpu::default(), &state, false),
            Err(StateError::NoGic(_))
        ));
    }

    #[test]
    fn wfi_wait_disabled_or_masked_timer_gives_no_timer() {
        assert_eq!(wfi_wait(0, 100, 0, 0), WfiWait::NoTimer);
        assert_eq!(wfi_wait(0b11, 100, 0, 0), WfiWait::NoTimer);
    }

    #[test]
    fn wfi_wait_future_deadline_is_in_host_ticks() {
        // Guest counter = 1000 - 400 = 600; fires at CVAL 900 = host 1300.
        assert_eq!(wfi_wait(1, 900, 400, 1000), WfiWait::Until(1300));
    }

    #[test]
    fn wfi_wait_expired_deadline_gives_now() {
        assert_eq!(wfi_wait(1, 600, 400, 1000), WfiWait::Now);
        assert_eq!(wfi_wait(1 | 0b100, 0, 400, 1000), WfiWait::Now);
    }

    #[test]
    fn ticks_to_duration_uses_timebase_and_saturates() {
        // Apple silicon: 24 MHz counter, timebase 125/3.
        assert_eq!(ticks_to_duration(24, 125, 3), Duration::from_nanos(1000));
        assert_eq!(ticks_to_duration(5, 1, 0), Duration::ZERO);
        assert_eq!(
            ticks_to_duration(u64::MAX, u32::MAX, 1),
            Duration::from_nanos(u64::MAX)
        );
    }

    #[test]
    fn offset_for_counter_continues_saved_counter() {
        let offset = offset_for_counter(50_000, 1_234);
        assert_eq!(50_000u64.wrapping_sub(offset), 1_234);
        // A host that booted recently (now < saved counter) wraps and still works.
        let offset = offset_for_counter(10, 1_000);
        assert_eq!(10u64.wrapping_sub(offset), 1_000);
    }

    #[test]
    fn gic_blob_round_trips_and_refuses_other_backends() {
        let blob = gic_blob(vec![1, 2, 3]);
        assert_eq!(gic_bytes(&blob).unwrap(), &[1, 2, 3]);
        let kvm = BackendBlob {
            backend: "kvm".into(),
            ..blob.clone()
        };
        assert!(matches!(
            gic_bytes(&kvm),
            Err(BlobError::WrongBackend { .. })
        ));
        let newer = BackendBlob {
            version: 2,
            ..blob.clone()
        };
        assert_eq!(gic_bytes(&newer), Err(BlobError::WrongVersion { found: 2 }));
        assert_eq!(gic_bytes(&gic_blob(Vec::new())), Err(BlobError::BadSize(0)));
    }
}
