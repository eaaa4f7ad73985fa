//! System-register ids: `hypervisor::aarch64::SysReg` <-> Hypervisor.framework's
//! `hv_sys_reg_t` / `hv_gic_icc_reg_t`.
//!
//! Apple's `hv_vcpu_types.h` numbers each register by its architectural encoding packed
//! as `op0 << 14 | op1 << 11 | CRn << 7 | CRm << 3 | op2` — e.g. `HV_SYS_REG_SCTLR_EL1
//! = 0xc080` is (3, 0, 1, 0, 0) and `HV_SYS_REG_SP_EL1 = 0xe208` is (3, 4, 4, 1, 0) —
//! which is exactly [`SysReg`]'s packing, and `hv_gic_types.h` does the same for the
//! GIC CPU-interface registers (`HV_GIC_ICC_REG_PMR_EL1 = 0xc230` is (3, 0, 4, 6, 0)).
//! So the mapping is the identity on the value, restricted to the registers the
//! framework exposes; everything else is refused with a clear error instead of being
//! passed through to fail inside the framework. The tables are checked against the
//! header values and against the architectural encodings in the tests.

use hypervisor::aarch64::SysReg;

/// Which framework call reads and writes a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HvfRegKind {
    /// `hv_vcpu_get_sys_reg` / `hv_vcpu_set_sys_reg` (macOS 11+).
    Vcpu,
    /// `hv_gic_get_icc_reg` / `hv_gic_set_icc_reg` (macOS 15+, needs the GIC).
    GicIcc,
}

/// One register the framework exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HvfSysReg {
    /// The framework's id (`hv_sys_reg_t` or `hv_gic_icc_reg_t` value).
    pub id: u16,
    /// Architectural name, for error messages.
    pub name: &'static str,
    /// Which call accesses it.
    pub kind: HvfRegKind,
    /// Saved and restored with the vCPU (false for read-only id registers and for
    /// registers that have their own field in `VcpuState`).
    pub saved: bool,
}

const fn vcpu(id: u16, name: &'static str, saved: bool) -> HvfSysReg {
    HvfSysReg {
        id,
        name,
        kind: HvfRegKind::Vcpu,
        saved,
    }
}

const fn icc(id: u16, name: &'static str, saved: bool) -> HvfSysReg {
    HvfSysReg {
        id,
        name,
        kind: HvfRegKind::GicIcc,
        saved,
    }
}

/// The EL0/EL1 registers of `hv_sys_reg_t` available since macOS 11 (values from
/// `hv_vcpu_types.h`), plus the GIC ICC registers of `hv_gic_icc_reg_t` (macOS 15).
/// The debug breakpoint and watchpoint registers are in [`DEBUG_REGS`].
pub const HVF_SYS_REGS: &[HvfSysReg] = &[
    vcpu(0x8010, "MDCCINT_EL1", true),
    vcpu(0x8012, "MDSCR_EL1", true),
    vcpu(0xc000, "MIDR_EL1", false),
    vcpu(0xc005, "MPIDR_EL1", false),
    vcpu(0xc020, "ID_AA64PFR0_EL1", false),
    vcpu(0xc021, "ID_AA64PFR1_EL1", false),
    vcpu(0xc028, "ID_AA64DFR0_EL1", false),
    vcpu(0xc029, "ID_AA64DFR1_EL1", false),
    vcpu(0xc030, "ID_AA64ISAR0_EL1", false),
    vcpu(0xc031, "ID_AA64ISAR1_EL1", false),
    vcpu(0xc038, "ID_AA64MMFR0_EL1", false),
    vcpu(0xc039, "ID_AA64MMFR1_EL1", false),
    vcpu(0xc03a, "ID_AA64MMFR2_EL1", false),
    vcpu(0xc080, "SCTLR_EL1", true),
    vcpu(0xc082, "CPACR_EL1", true),
    vcpu(0xc100, "TTBR0_EL1", true),
    vcpu(0xc101, "TTBR1_EL1", true),
    vcpu(0xc102, "TCR_EL1", true),
    vcpu(0xc108, "APIAKEYLO_EL1", true),
    vcpu(0xc109, "APIAKEYHI_EL1", true),
    vcpu(0xc10a, "APIBKEYLO_EL1", true),
    vcpu(0xc10b, "APIBKEYHI_EL1", true),
    vcpu(0xc110, "APDAKEYLO_EL1", true),
    vcpu(0xc111, "APDAKEYHI_EL1", true),
    vcpu(0xc112, "APDBKEYLO_EL1", true),
    vcpu(0xc113, "APDBKEYHI_EL1", true),
    vcpu(0xc118, "APGAKEYLO_EL1", true),
    vcpu(0xc119, "APGAKEYHI_EL1", true),
    vcpu(0xc200, "SPSR_EL1", false),
    vcpu(0xc201, "ELR_EL1", false),
    vcpu(0xc208, "SP_EL0", false),
    vcpu(0xc288, "AFSR0_EL1", true),
    vcpu(0xc289, "AFSR1_EL1", true),
    vcpu(0xc290, "ESR_EL1", true),
    vcpu(0xc300, "FAR_EL1", true),
    vcpu(0xc3a0, "PAR_EL1", true),
    vcpu(0xc510, "MAIR_EL1", true),
    vcpu(0xc518, "AMAIR_EL1", true),
    vcpu(0xc600, "VBAR_EL1", true),
    vcpu(0xc681, "CONTEXTIDR_EL1", true),
    vcpu(0xc684, "TPIDR_EL1", true),
    vcpu(0xc708, "CNTKCTL_EL1", true),
    vcpu(0xd000, "CSSELR_EL1", true),
    vcpu(0xde82, "TPIDR_EL0", true),
    vcpu(0xde83, "TPIDRRO_EL0", true),
    vcpu(0xdf19, "CNTV_CTL_EL0", true),
    vcpu(0xdf1a, "CNTV_CVAL_EL0", true),
    vcpu(0xe208, "SP_EL1", false),
    icc(0xc230, "ICC_PMR_EL1", true),
    icc(0xc643, "ICC_BPR0_EL1", true),
    icc(0xc644, "ICC_AP0R0_EL1", true),
    icc(0xc648, "ICC_AP1R0_EL1", true),
    icc(0xc65b, "ICC_RPR_EL1", false),
    icc(0xc663, "ICC_BPR1_EL1", true),
    icc(0xc664, "ICC_CTLR_EL1", true),
    icc(0xc665, "ICC_SRE_EL1", true),
    icc(0xc666, "ICC_IGRPEN0_EL1", true),
    icc(0xc667, "ICC_IGRPEN1_EL1", true),
];

/// `[P0S, P1S, ..., P15S]`: the sixteen names of one debug register kind.
macro_rules! sixteen {
    ($p:literal) => {
        [
            concat!($p, "0_EL1"),
            concat!($p, "1_EL1"),
            concat!($p, "2_EL1"),
            concat!($p, "3_EL1"),
            concat!($p, "4_EL1"),
            concat!($p, "5_EL1"),
            concat!($p, "6_EL1"),
            concat!($p, "7_EL1"),
            concat!($p, "8_EL1"),
            concat!($p, "9_EL1"),
            concat!($p, "10_EL1"),
            concat!($p, "11_EL1"),
            concat!($p, "12_EL1"),
            concat!($p, "13_EL1"),
            concat!($p, "14_EL1"),
            concat!($p, "15_EL1"),
        ]
    };
}

const DEBUG_NAMES: [[&str; 16]; 4] = [
    sixteen!("DBGBVR"),
    sixteen!("DBGBCR"),
    sixteen!("DBGWVR"),
    sixteen!("DBGWCR"),
];

/// The breakpoint and watchpoint registers of `hv_sys_reg_t`, n = 0..15:
/// `DBGBVR<n>_EL1` (2, 0, 0, n, 4), `DBGBCR<n>_EL1` (.., 5), `DBGWVR<n>_EL1` (.., 6),
/// `DBGWCR<n>_EL1` (.., 7), in that order per n (`HV_SYS_REG_DBGBVR0_EL1 = 0x8004`).
/// A CPU has only those [`debug_regs`] says.
pub const DEBUG_REGS: [HvfSysReg; 64] = {
    let mut regs = [vcpu(0, "", true); 64];
    let mut n = 0;
    while n < 16 {
        let mut k = 0;
        while k < 4 {
            regs[n * 4 + k] = vcpu(
                0x8000 | ((n as u16) << 3) | (4 + k as u16),
                DEBUG_NAMES[k][n],
                true,
            );
            k += 1;
        }
        n += 1;
    }
    regs
};

/// The debug registers this CPU implements, from its ID_AA64DFR0_EL1 (Arm ARM,
/// ID_AA64DFR0_EL1: BRPs (bits 15:12) and WRPs (bits 23:20) are the number of breakpoints
/// and watchpoints minus one): the framework refuses the others.
pub fn debug_regs(dfr0: u64) -> impl Iterator<Item = &'static HvfSysReg> {
    let breakpoints = ((dfr0 >> 12) & 0xf) as u16 + 1;
    let watchpoints = ((dfr0 >> 20) & 0xf) as u16 + 1;
    DEBUG_REGS.iter().filter(move |r| {
        let n = (r.id >> 3) & 0xf;
        let watch = r.id & 0x7 >= 6;
        n < if watch { watchpoints } else { breakpoints }
    })
}

/// Registers with their own field in `VcpuState` (and so not in `sys_regs`).
pub mod named {
    use hypervisor::aarch64::SysReg;
    /// SP_EL0.
    pub const SP_EL0: SysReg = SysReg::new(3, 0, 4, 1, 0);
    /// SP_EL1.
    pub const SP_EL1: SysReg = SysReg::new(3, 4, 4, 1, 0);
    /// ELR_EL1.
    pub const ELR_EL1: SysReg = SysReg::new(3, 0, 4, 0, 1);
    /// SPSR_EL1.
    pub const SPSR_EL1: SysReg = SysReg::new(3, 0, 4, 0, 0);
    /// MPIDR_EL1.
    pub const MPIDR_EL1: SysReg = SysReg::new(3, 0, 0, 0, 5);
    /// CNTV_CTL_EL0.
    pub const CNTV_CTL_EL0: SysReg = SysReg::new(3, 3, 14, 3, 1);
    /// CNTV_CVAL_EL0.
    pub const CNTV_CVAL_EL0: SysReg = SysReg::new(3, 3, 14, 3, 2);
    /// CNTVCT_EL0: not a framework register; its value at save time is stored under
    /// this encoding so a restore can continue the guest's virtual counter.
    pub const CNTVCT_EL0: SysReg = SysReg::new(3, 3, 14, 0, 2);
}

/// Looks up the framework register for an architectural encoding.
pub fn to_hvf(reg: SysReg) -> Option<&'static HvfSysReg> {
    HVF_SYS_REGS
        .iter()
        .chain(DEBUG_REGS.iter())
        .find(|r| r.id == reg.0)
}

/// The architectural encoding of a framework register id (the identity on the value).
pub const fn from_hvf(id: u16) -> SysReg {
    SysReg(id)
}

/// The registers saved in `VcpuState::sys_regs`; `with_gic` adds the GIC CPU
/// interface, which exists only once the in-framework GIC has been created.
pub fn saved_regs(with_gic: bool) -> impl Iterator<Item = &'static HvfSysReg> {
    HVF_SYS_REGS
        .iter()
        .filter(move |r| r.saved && (with_gic || r.kind == HvfRegKind::Vcpu))
}

/// A human-readable name for error messages: the architectural name when known,
/// otherwise `S<op0>_<op1>_C<n>_C<m>_<op2>` as assemblers spell unnamed registers.
pub fn name(reg: SysReg) -> String {
    match to_hvf(reg) {
        Some(r) => r.name.to_string(),
        None => {
            let (op0, op1, crn, crm, op2) = reg.fields();
            format!("S{op0}_{op1}_C{crn}_C{crm}_{op2}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_hvf_matches_apple_header_values_for_named_registers() {
        // (architectural encoding, value in hv_vcpu_types.h / hv_gic_types.h)
        let cases = [
            (SysReg::new(3, 0, 1, 0, 0), 0xc080),   // SCTLR_EL1
            (SysReg::new(3, 0, 0, 0, 5), 0xc005),   // MPIDR_EL1
            (SysReg::new(3, 4, 4, 1, 0), 0xe208),   // SP_EL1
            (SysReg::new(3, 0, 4, 1, 0), 0xc208),   // SP_EL0
            (SysReg::new(3, 3, 13, 0, 2), 0xde82),  // TPIDR_EL0
            (SysReg::new(3, 3, 14, 3, 1), 0xdf19),  // CNTV_CTL_EL0
            (SysReg::new(3, 3, 14, 3, 2), 0xdf1a),  // CNTV_CVAL_EL0
            (SysReg::new(2, 0, 0, 2, 2), 0x8012),   // MDSCR_EL1
            (SysReg::new(3, 2, 0, 0, 0), 0xd000),   // CSSELR_EL1
            (SysReg::new(3, 0, 4, 6, 0), 0xc230),   // ICC_PMR_EL1
            (SysReg::new(3, 0, 12, 12, 7), 0xc667), // ICC_IGRPEN1_EL1
        ];
        for (reg, id) in cases {
            let hv = to_hvf(reg).unwrap_or_else(|| panic!("{reg:?} missing"));
            assert_eq!(hv.id, id, "{}", hv.name);
            assert_eq!(from_hvf(id), reg);
        }
    }

    #[test]
    fn to_hvf_register_outside_framework_is_none() {
        // OSLAR_EL1 is trapped, not exposed; ZCR_EL1 is not in the framework at all.
        assert!(to_hvf(SysReg::new(2, 0, 1, 0, 4)).is_none());
        assert!(to_hvf(SysReg::new(3, 0, 1, 2, 0)).is_none());
        assert!(to_hvf(named::CNTVCT_EL0).is_none());
    }

    #[test]
    fn hvf_table_ids_are_unique_and_round_trip_through_fields() {
        for (i, a) in HVF_SYS_REGS.iter().enumerate() {
            for b in &HVF_SYS_REGS[i + 1..] {
                assert_ne!(a.id, b.id, "{} and {}", a.name, b.name);
            }
            let (op0, op1, crn, crm, op2) = from_hvf(a.id).fields();
            assert_eq!(SysReg::new(op0, op1, crn, crm, op2).0, a.id, "{}", a.name);
        }
    }

    #[test]
    fn saved_regs_without_gic_exclude_icc_and_read_only() {
        let names: Vec<_> = saved_regs(false).map(|r| r.name).collect();
        assert!(names.contains(&"SCTLR_EL1"));
        assert!(names.contains(&"CNTV_CVAL_EL0"));
        assert!(!names.iter().any(|n| n.starts_with("ICC_")));
        assert!(!names.contains(&"MIDR_EL1"));
        assert!(!names.contains(&"SP_EL1"));
        let with_gic: Vec<_> = saved_regs(true).map(|r| r.name).collect();
        assert!(with_gic.contains(&"ICC_CTLR_EL1"));
        assert!(!with_gic.contains(&"ICC_RPR_EL1"));
    }

    #[test]
    fn debug_registers_have_apples_ids_and_only_the_implemented_ones_are_saved() {
        // hv_vcpu_types.h: DBGBVR0_EL1 0x8004, DBGBCR0_EL1 0x8005, DBGWVR0_EL1
        // 0x8006, DBGWCR0_EL1 0x8007, DBGBVR1_EL1 0x800c, DBGWCR15_EL1 0x807f.
        for (id, name) in [
            (0x8004, "DBGBVR0_EL1"),
            (0x8005, "DBGBCR0_EL1"),
            (0x8006, "DBGWVR0_EL1"),
            (0x8007, "DBGWCR0_EL1"),
            (0x800c, "DBGBVR1_EL1"),
            (0x807f, "DBGWCR15_EL1"),
        ] {
            let r = to_hvf(SysReg(id)).unwrap();
            assert_eq!(r.name, name);
            assert!(r.saved);
        }
        // DBGBVR3_EL1 is (2, 0, 0, 3, 4).
        assert_eq!(
            to_hvf(SysReg::new(2, 0, 0, 3, 4)).unwrap().name,
            "DBGBVR3_EL1"
        );
        // An M1: 6 breakpoints (BRPs = 5), 4 watchpoints (WRPs = 3).
        let m1 = (5 << 12) | (3 << 20) | 0x6;
        let saved: Vec<_> = debug_regs(m1).map(|r| r.name).collect();
        assert_eq!(saved.len(), 6 * 2 + 4 * 2);
        assert!(saved.contains(&"DBGBCR5_EL1") && !saved.contains(&"DBGBCR6_EL1"));
        assert!(saved.contains(&"DBGWVR3_EL1") && !saved.contains(&"DBGWVR4_EL1"));
        assert_eq!(debug_regs(u64::MAX).count(), 64);
        let all: Vec<_> = HVF_SYS_REGS.iter().chain(DEBUG_REGS.iter()).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.id, b.id, "{} and {}", a.name, b.name);
            }
        }
    }

    #[test]
    fn name_unknown_register_uses_generic_spelling() {
        assert_eq!(name(SysReg::new(2, 0, 1, 0, 4)), "S2_0_C1_C0_4");
        assert_eq!(name(named::SP_EL1), "SP_EL1");
    }
}
