//! PSCI (Arm Power State Coordination Interface, DEN0022 D/E) calls made by the guest
//! with `HVC #0`, handled as a pure function of the call and the vCPU topology.
//!
//! KVM implements PSCI in the kernel; Hypervisor.framework hands every HVC to the VMM,
//! so this module is what a guest's `psci` driver talks to on macOS. The function IDs,
//! return codes and the `AFFINITY_INFO` encoding are from DEN0022 §5.

/// Function IDs (DEN0022 §5.1, table 5-1). `_64` variants use SMC64 (bit 30 set).
pub mod function {
    /// PSCI_VERSION.
    pub const VERSION: u32 = 0x8400_0000;
    /// CPU_SUSPEND (SMC32).
    pub const CPU_SUSPEND: u32 = 0x8400_0001;
    /// CPU_SUSPEND (SMC64).
    pub const CPU_SUSPEND_64: u32 = 0xc400_0001;
    /// CPU_OFF.
    pub const CPU_OFF: u32 = 0x8400_0002;
    /// CPU_ON (SMC32).
    pub const CPU_ON: u32 = 0x8400_0003;
    /// CPU_ON (SMC64).
    pub const CPU_ON_64: u32 = 0xc400_0003;
    /// AFFINITY_INFO (SMC32).
    pub const AFFINITY_INFO: u32 = 0x8400_0004;
    /// AFFINITY_INFO (SMC64).
    pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
    /// MIGRATE_INFO_TYPE.
    pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    /// SYSTEM_OFF.
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    /// SYSTEM_RESET.
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    /// PSCI_FEATURES (PSCI 1.0).
    pub const FEATURES: u32 = 0x8400_000a;
}

/// Return codes (DEN0022 §5.2.2), as the signed values the guest reads in x0/w0.
pub mod status {
    /// SUCCESS.
    pub const SUCCESS: i64 = 0;
    /// NOT_SUPPORTED.
    pub const NOT_SUPPORTED: i64 = -1;
    /// INVALID_PARAMETERS.
    pub const INVALID_PARAMETERS: i64 = -2;
    /// DENIED.
    pub const DENIED: i64 = -3;
    /// ALREADY_ON.
    pub const ALREADY_ON: i64 = -4;
    /// ON_PENDING.
    pub const ON_PENDING: i64 = -5;
    /// INTERNAL_FAILURE.
    pub const INTERNAL_FAILURE: i64 = -6;
    /// INVALID_ADDRESS.
    pub const INVALID_ADDRESS: i64 = -9;
}

/// The PSCI version reported by PSCI_VERSION: major in \[31:16\], minor in \[15:0\].
pub const VERSION_1_0: u32 = 1 << 16;

/// MIGRATE_INFO_TYPE result: no Trusted OS that needs migration (DEN0022 §5.9.2).
const MIGRATE_NOT_REQUIRED: i64 = 2;

/// Mask of the affinity fields Aff3 \[39:32\], Aff2..Aff0 \[23:0\] in an MPIDR-style
/// target argument (DEN0022 §5.1.4).
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// Power state of a vCPU as PSCI sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuPower {
    /// Running.
    On,
    /// Off.
    Off,
    /// CPU_ON was accepted but the vCPU has not started yet.
    OnPending,
}

/// What PSCI needs to know about the VM's vCPUs.
pub trait Topology {
    /// The vCPU whose MPIDR affinity equals `mpidr` (already masked with
    /// [`MPIDR_AFFINITY_MASK`]), with its power state.
    fn vcpu_by_mpidr(&self, mpidr: u64) -> Option<(u32, CpuPower)>;
}

/// What the VMM must do after answering the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciAction {
    /// Nothing beyond writing the result into x0.
    None,
    /// Start vCPU `target` at `entry` with x0 = `context_id` (EL1h, MMU off, DAIF
    /// masked: DEN0022 §6.4.3).
    CpuOn {
        /// vCPU index.
        target: u32,
        /// Entry point (guest-physical).
        entry: u64,
        /// Value for the new vCPU's x0.
        context_id: u64,
    },
    /// Power the calling vCPU off; it never returns from the call.
    CpuOff,
    /// Power the system off.
    SystemOff,
    /// Reset the system.
    SystemReset,
}

/// The answer to one PSCI call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsciOutcome {
    /// Value for the caller's x0 (a status code or a result), if the call returns.
    pub x0: Option<u64>,
    /// Side effect for the VMM.
    pub action: PsciAction,
}

impl PsciOutcome {
    fn ret(value: i64) -> Self {
        Self {
            x0: Some(value as u64),
            action: PsciAction::None,
        }
    }

    fn no_return(action: PsciAction) -> Self {
        Self { x0: None, action }
    }
}

/// Answers the PSCI call `function_id` (the caller's w0) with arguments x1..x3.
/// Unknown IDs (including other SMCCC services) return NOT_SUPPORTED, as SMCCC
/// (DEN0028 §7.1) requires for unimplemented functions.
pub fn handle(function_id: u32, args: [u64; 3], topology: &dyn Topology) -> PsciOutcome {
    // SMC32 calls pass 32-bit arguments: the upper halves are undefined (DEN0028 §3.1).
    let args = if function_id & (1 << 30) == 0 {
        args.map(|a| a & 0xffff_ffff)
    } else {
        args
    };
    match function_id {
        function::VERSION => PsciOutcome::ret(i64::from(VERSION_1_0)),
        function::CPU_OFF => PsciOutcome::no_return(PsciAction::CpuOff),
        function::CPU_ON | function::CPU_ON_64 => cpu_on(args, topology),
        function::AFFINITY_INFO | function::AFFINITY_INFO_64 => affinity_info(args, topology),
        function::MIGRATE_INFO_TYPE => PsciOutcome::ret(MIGRATE_NOT_REQUIRED),
        function::SYSTEM_OFF => PsciOutcome::no_return(PsciAction::SystemOff),
        function::SYSTEM_RESET => PsciOutcome::no_return(PsciAction::SystemReset),
        function::FEATURES => PsciOutcome::ret(features(args[0])),
        _ => PsciOutcome::ret(status::NOT_SUPPORTED),
    }
}

/// PSCI_FEATURES (DEN0022 §5.15): 0 for an implemented function, NOT_SUPPORTED
/// otherwise. None of ours takes feature flags, so 0 is the whole answer.
fn features(queried: u64) -> i64 {
    let Ok(id) = u32::try_from(queried) else {
        return status::NOT_SUPPORTED;
    };
    match id {
        function::VERSION
        | function::CPU_OFF
        | function::CPU_ON
        | function::CPU_ON_64
        | function::AFFINITY_INFO
        | function::AFFINITY_INFO_64
        | function::MIGRATE_INFO_TYPE
        | function::SYSTEM_OFF
        | function::SYSTEM_RESET
        | function::FEATURES => status::SUCCESS,
        _ => status::NOT_SUPPORTED,
    }
}

/// CPU_ON(target_cpu, entry_point_address, context_id) (DEN0022 §5.4).
fn cpu_on(args: [u64; 3], topology: &dyn Topology) -> PsciOutcome {
    let [target_mpidr, entry, context_id] = args;
    if target_mpidr & !MPIDR_AFFINITY_MASK != 0 {
        return PsciOutcome::ret(status::INVALID_PARAMETERS);
    }
    let Some((target, power)) = topology.vcpu_by_mpidr(target_mpidr) else {
        return PsciOutcome::ret(status::INVALID_PARAMETERS);
    };
    match power {
        CpuPower::On => return PsciOutcome::ret(status::ALREADY_ON),
        CpuPower::OnPending => return PsciOutcome::ret(status::ON_PENDING),
        CpuPower::Off => {}
    }
    // A64 instructions are 4-byte aligned; anything else can never be executed.
    if entry & 0b11 != 0 {
        return PsciOutcome::ret(status::INVALID_ADDRESS);
    }
    PsciOutcome {
        x0: Some(status::SUCCESS as u64),
        action: PsciAction::CpuOn {
            target,
            entry,
            context_id,
        },
    }
}

/// AFFINITY_INFO(target_affinity, lowest_affinity_level) (DEN0022 §5.7): 0 = ON,
/// 1 = OFF, 2 = ON_PENDING. Only level 0 (a single vCPU) is supported, which is what
/// PSCI 1.0 requires (higher levels are optional).
fn affinity_info(args: [u64; 3], topology: &dyn Topology) -> PsciOutcome {
    let [target_mpidr, level, _] = args;
    if level != 0 || target_mpidr & !MPIDR_AFFINITY_MASK != 0 {
        return PsciOutcome::ret(status::INVALID_PARAMETERS);
    }
    match topology.vcpu_by_mpidr(target_mpidr) {
        None => PsciOutcome::ret(status::INVALID_PARAMETERS),
        Some((_, CpuPower::On)) => PsciOutcome::ret(0),
        Some((_, CpuPower::Off)) => PsciOutcome::ret(1),
        Some((_, CpuPower::OnPending)) => PsciOutcome::ret(2),
    }
}

/// The MPIDR_EL1 affinity a VMM gives vCPU `index`: Aff0 counts 0..15 within a
/// cluster and Aff1 numbers clusters, because GICv3 SGIs address at most 16 CPUs per
/// Aff0 range (GICv3 spec §12.11.x, ICC_SGI1R_EL1.TargetList is 16 bits). Bit 31 is
/// RES1 in MPIDR_EL1.
pub const fn mpidr_for_index(index: u32) -> u64 {
    let aff0 = (index % 16) as u64;
    let aff1 = ((index / 16) & 0xff) as u64;
    (1 << 31) | (aff1 << 8) | aff0
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Cpus(Vec<CpuPower>);

    impl Topology for Cpus {
        fn vcpu_by_mpidr(&self, mpidr: u64) -> Option<(u32, CpuPower)> {
            self.0.iter().enumerate().find_map(|(i, p)| {
                let i = i as u32;
                (mpidr_for_index(i) & MPIDR_AFFINITY_MASK == mpidr).then_some((i, *p))
            })
        }
    }

    fn two_cpus_second_off() -> Cpus {
        Cpus(vec![CpuPower::On, CpuPower::Off])
    }

    #[test]
    fn handle_version_gives_1_0() {
        let out = handle(function::VERSION, [0; 3], &two_cpus_second_off());
        assert_eq!(out.x0, Some(0x1_0000));
        assert_eq!(out.action, PsciAction::None);
    }

    #[test]
    fn handle_cpu_on_off_target_gives_success_and_start_action() {
        let out = handle(
            function::CPU_ON_64,
            [1, 0x4008_0000, 0xfeed_f00d_0000_0001],
            &two_cpus_second_off(),
        );
        assert_eq!(out.x0, Some(0));
        assert_eq!(
            out.action,
            PsciAction::CpuOn {
                target: 1,
                entry: 0x4008_0000,
                context_id: 0xfeed_f00d_0000_0001,
            }
        );
    }

    #[test]
    fn handle_cpu_on_smc32_truncates_arguments() {
        let out = handle(
            function::CPU_ON,
            [
                0xffff_ffff_0000_0001,
                0xffff_ffff_4000_0000,
                0xffff_ffff_0000_0007,
            ],
            &two_cpus_second_off(),
        );
        assert_eq!(
            out.action,
            PsciAction::CpuOn {
                target: 1,
                entry: 0x4000_0000,
                context_id: 7,
            }
        );
    }

    #[test]
    fn handle_cpu_on_running_target_gives_already_on() {
        let out = handle(
            function::CPU_ON_64,
            [0, 0x4000_0000, 0],
            &two_cpus_second_off(),
        );
        assert_eq!(out.x0, Some(status::ALREADY_ON as u64));
        assert_eq!(out.action, PsciAction::None);
    }

    #[test]
    fn handle_cpu_on_pending_target_gives_on_pending() {
        let cpus = Cpus(vec![CpuPower::On, CpuPower::OnPending]);
        let out = handle(function::CPU_ON_64, [1, 0x4000_0000, 0], &cpus);
        assert_eq!(out.x0, Some(status::ON_PENDING as u64));
    }

    #[test]
    fn handle_cpu_on_unknown_mpidr_gives_invalid_parameters() {
        let out = handle(
            function::CPU_ON_64,
            [5, 0x4000_0000, 0],
            &two_cpus_second_off(),
        );
        assert_eq!(out.x0, Some(status::INVALID_PARAMETERS as u64));
        assert_eq!(out.action, PsciAction::None);
        // Bits outside the affinity fields are a malformed target too.
        let out = handle(
            function::CPU_ON_64,
            [1 | (1 << 60), 0x4000_0000, 0],
            &two_cpus_second_off(),
        );
        assert_eq!(out.x0, Some(status::INVALID_PARAMETERS as u64));
    }

    #[test]
    fn handle_cpu_on_misaligned_entry_gives_invalid_address() {
        let out = handle(
            function::CPU_ON_64,
            [1, 0x4000_0002, 0],
            &two_cpus_second_off(),
        );
        assert_eq!(out.x0, Some(status::INVALID_ADDRESS as u64));
        assert_eq!(out.action, PsciAction::None);
    }

    #[test]
    fn handle_cpu_off_does_not_return() {
        let out = handle(function::CPU_OFF, [0; 3], &two_cpus_second_off());
        assert_eq!(out.x0, None);
        assert_eq!(out.action, PsciAction::CpuOff);
    }

    #[test]
    fn handle_system_off_and_reset_give_actions() {
        let cpus = two_cpus_second_off();
        assert_eq!(
            handle(function::SYSTEM_OFF, [0; 3], &cpus).action,
            PsciAction::SystemOff
        );
        assert_eq!(
            handle(function::SYSTEM_RESET, [0; 3], &cpus).action,
            PsciAction::SystemReset
        );
    }

    #[test]
    fn handle_affinity_info_reports_each_state() {
        let cpus = Cpus(vec![CpuPower::On, CpuPower::Off, CpuPower::OnPending]);
        let info = |mpidr| handle(function::AFFINITY_INFO_64, [mpidr, 0, 0], &cpus).x0;
        assert_eq!(info(0), Some(0));
        assert_eq!(info(1), Some(1));
        assert_eq!(info(2), Some(2));
        assert_eq!(info(3), Some(status::INVALID_PARAMETERS as u64));
        let level1 = handle(function::AFFINITY_INFO_64, [0, 1, 0], &cpus).x0;
        assert_eq!(level1, Some(status::INVALID_PARAMETERS as u64));
    }

    #[test]
    fn handle_features_reports_implemented_and_unknown() {
        let cpus = two_cpus_second_off();
        let features = |id: u64| handle(function::FEATURES, [id, 0, 0], &cpus).x0;
        assert_eq!(features(u64::from(function::CPU_ON_64)), Some(0));
        assert_eq!(features(u64::from(function::SYSTEM_RESET)), Some(0));
        assert_eq!(
            features(u64::from(function::CPU_SUSPEND_64)),
            Some(status::NOT_SUPPORTED as u64)
        );
        // SMCCC_VERSION (0x8000_0000) is another service: not ours.
        assert_eq!(features(0x8000_0000), Some(status::NOT_SUPPORTED as u64));
    }

    #[test]
    fn handle_unknown_ids_give_not_supported() {
        let cpus = two_cpus_second_off();
        for id in [0, 0x8400_00ff, 0xc400_0012, function::CPU_SUSPEND, u32::MAX] {
            let out = handle(id, [1, 2, 3], &cpus);
            assert_eq!(out.x0, Some(status::NOT_SUPPORTED as u64), "id {id:#x}");
            assert_eq!(out.action, PsciAction::None);
        }
    }

    #[test]
    fn mpidr_for_index_splits_clusters_of_sixteen() {
        assert_eq!(mpidr_for_index(0), 0x8000_0000);
        assert_eq!(mpidr_for_index(15), 0x8000_000f);
        assert_eq!(mpidr_for_index(16), 0x8000_0100);
        assert_eq!(mpidr_for_index(33) & MPIDR_AFFINITY_MASK, 0x201);
    }
}
