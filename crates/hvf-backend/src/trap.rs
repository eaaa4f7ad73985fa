//! What the VMM does with a system-register access the framework trapped, and the
//! undefined-instruction exception it injects for one it does not emulate.
//!
//! Apple silicon traps some ID registers to the VMM (Linux 5.17+ reads
//! ID_AA64ISAR2_EL1 at boot, and later kernels more of the ID space), and the
//! debug registers while the framework traps debug accesses. The ID space reads
//! as zero, as an architecture without the feature reports it (Arm ARM, "The
//! AArch64 System register encoding space": op0 = 3, op1 = 0, CRn = 0, CRm = 1..7
//! is the ID register space, and the encodings not yet given a name there are
//! RAZ); QEMU's HVF backend does the same since 7f6c295c. Anything else the VMM
//! does not emulate is what the architecture makes of an access to a register
//! that does not exist: an Undefined Instruction exception to EL1. A guest
//! kernel then reports the instruction (Linux: "undefined instruction" oops or
//! SIGILL to the task) and the VM lives on, instead of ending with an empty
//! console.

use hypervisor::aarch64::SysReg;

/// What the VMM does with a trapped MSR/MRS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysRegTrap {
    /// Read as zero / writes ignored, then skip the instruction.
    RazWi,
    /// An ID register the framework has a value for (`hv_vcpu_get_sys_reg`):
    /// reads get that value ([`pfr0_for_guest`] for ID_AA64PFR0_EL1), writes are
    /// ignored (ID registers are read-only).
    FrameworkValue,
    /// Not emulated: inject an Undefined Instruction exception ([`undefined`]).
    Undefined,
}

/// Policy for registers the framework traps to the VMM: the debug space (op0 = 2:
/// OSLAR_EL1, OSDLR_EL1, OSLSR_EL1, DBG*, which is what a CPU without an external
/// debugger looks like to Linux) and the ID space (op0 = 3, op1 = 0, CRn = 0,
/// CRm = 1..7) read as zero and ignore writes, except the ID registers the
/// framework reports a value for, which read as that; everything else is
/// undefined.
pub fn sysreg_trap_policy(reg: SysReg) -> SysRegTrap {
    let (op0, op1, crn, crm, _op2) = reg.fields();
    let id_space = op0 == 3 && op1 == 0 && crn == 0 && (1..=7).contains(&crm);
    if id_space && crate::sysreg::to_hvf(reg).is_some() {
        SysRegTrap::FrameworkValue
    } else if op0 == 2 || id_space {
        SysRegTrap::RazWi
    } else {
        SysRegTrap::Undefined
    }
}

/// ID_AA64PFR0_EL1's encoding.
pub const ID_AA64PFR0_EL1: SysReg = SysReg::new(3, 0, 0, 4, 0);

/// ID_AA64PFR0_EL1.GIC, bits (bits 27:24) (Arm ARM, ID_AA64PFR0_EL1): 0b0001 means
/// the GICv3/v4 CPU interface system registers are implemented.
const PFR0_GIC_SHIFT: u32 = 24;
const PFR0_GIC_MASK: u64 = 0xf << PFR0_GIC_SHIFT;
const PFR0_GIC_V3: u64 = 0b0001 << PFR0_GIC_SHIFT;

/// ID_AA64PFR0_EL1 as the guest must see it: with a GICv3 present the GIC field
/// says its CPU interface is there (Linux's GICv3 driver checks it before it
/// touches an ICC register); without one the field is 0.
pub fn pfr0_for_guest(pfr0: u64, gicv3: bool) -> u64 {
    let rest = pfr0 & !PFR0_GIC_MASK;
    if gicv3 {
        rest | PFR0_GIC_V3
    } else {
        rest
    }
}

/// ID_AA64PFR1_EL1.SME, bits (bits 27:24) (Arm ARM, ID_AA64PFR1_EL1).
const PFR1_SME_MASK: u64 = 0xf << 24;

/// ID_AA64PFR1_EL1 as the guest must see it: without SME, whose state (streaming
/// SVE registers, ZA, SVCR) this backend does not save. Linux turns SME on at boot
/// whenever the field says it is there, so hiding it is what keeps such a guest
/// snapshottable.
pub fn pfr1_for_guest(pfr1: u64) -> u64 {
    pfr1 & !PFR1_SME_MASK
}

/// ID_AA64PFR1_EL1's encoding.
pub const ID_AA64PFR1_EL1: SysReg = SysReg::new(3, 0, 0, 4, 1);

/// The registers an exception entry writes, and the new PC and PSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    /// ESR_EL1: the syndrome.
    pub esr_el1: u64,
    /// ELR_EL1: the address of the instruction that caused it.
    pub elr_el1: u64,
    /// SPSR_EL1: PSTATE when it was taken.
    pub spsr_el1: u64,
    /// The exception vector the guest continues at.
    pub pc: u64,
    /// PSTATE on entry to EL1.
    pub pstate: u64,
}

/// ESR_ELx.EC for "Unknown reason" (0b000000), which is how an undefined
/// instruction is reported, and IL (bit 25): the trapped MSR/MRS is a 32-bit
/// instruction.
const ESR_EC_UNKNOWN: u64 = 0;
const ESR_EC_SHIFT: u32 = 26;
const ESR_IL: u64 = 1 << 25;

/// PSTATE (SPSR) fields used below (Arm ARM, "SPSR_EL1" and "PSTATE").
const PSTATE_M_MASK: u64 = 0b1_1111;
/// M(bit 4): the exception came from AArch32.
const PSTATE_M_AARCH32: u64 = 1 << 4;
/// M(bits 3:0) = 0b0101: EL1 using SP_EL1 (EL1h).
const PSTATE_EL1H: u64 = 0b0101;
/// D, A, I, F (bits 9..6).
const PSTATE_DAIF: u64 = 0b1111 << 6;
const PSTATE_SSBS: u64 = 1 << 12;
const PSTATE_PAN: u64 = 1 << 22;
const PSTATE_DIT: u64 = 1 << 24;

/// SCTLR_EL1.SPAN (bit 23): 0 means PAN is set on exception entry to EL1.
const SCTLR_SPAN: u64 = 1 << 23;
/// SCTLR_EL1.DSSBS (bit 44): the value PSTATE.SSBS takes on exception entry.
const SCTLR_DSSBS: u64 = 1 << 44;

/// Vector offsets from VBAR_EL1 for a synchronous exception (Arm ARM, "Exception
/// vectors": current EL with SP_EL0 +0x000, current EL with SP_ELx +0x200,
/// lower EL using AArch64 +0x400, lower EL using AArch32 +0x600).
const VECTOR_CURRENT_SP0: u64 = 0x000;
const VECTOR_CURRENT_SPX: u64 = 0x200;
const VECTOR_LOWER_A64: u64 = 0x400;
const VECTOR_LOWER_A32: u64 = 0x600;

/// The Undefined Instruction exception for the instruction at `pc`, taken to EL1
/// from a guest whose PSTATE was `pstate`, with its VBAR_EL1 and SCTLR_EL1: what
/// the architecture's exception entry does (Arm ARM, "Exception entry"): ELR_EL1 =
/// the faulting instruction, SPSR_EL1 = the old PSTATE, ESR_EL1 = EC 0 with IL,
/// PSTATE = EL1h with D, A, I and F masked, PAN set unless SCTLR_EL1.SPAN says
/// otherwise (or kept if it was set), SSBS from SCTLR_EL1.DSSBS, DIT kept, every
/// other bit (SS, IL, BTYPE, UAO, the flags) cleared; PC = the vector.
pub fn undefined(pc: u64, pstate: u64, vbar_el1: u64, sctlr_el1: u64) -> Injection {
    let m = pstate & PSTATE_M_MASK;
    let offset = if m & PSTATE_M_AARCH32 != 0 {
        VECTOR_LOWER_A32
    } else {
        match (m >> 2) & 0b11 {
            0 => VECTOR_LOWER_A64,
            // EL1 (the guest runs no higher): M[0] selects SP_EL1 over SP_EL0.
            _ if m & 1 == 1 => VECTOR_CURRENT_SPX,
            _ => VECTOR_CURRENT_SP0,
        }
    };
    let mut new = PSTATE_EL1H | PSTATE_DAIF | (pstate & PSTATE_DIT);
    if pstate & PSTATE_PAN != 0 || sctlr_el1 & SCTLR_SPAN == 0 {
        new |= PSTATE_PAN;
    }
    if sctlr_el1 & SCTLR_DSSBS != 0 {
        new |= PSTATE_SSBS;
    }
    Injection {
        esr_el1: (ESR_EC_UNKNOWN << ESR_EC_SHIFT) | ESR_IL,
        elr_el1: pc,
        spsr_el1: pstate,
        pc: vbar_el1.wrapping_add(offset),
        pstate: new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_space_encoding_reads_zero_and_ignores_writes() {
        // op0 = 3, op1 = 0, CRn = 0, CRm = 1..7, any op2: 56 encodings, all RAZ/WI
        // but the 9 the framework has values for (ID_AA64PFR0_EL1 ... MMFR2),
        // among them ID_AA64ISAR2_EL1 (S3_0_C0_C6_2), the read Linux 6.1 makes.
        let (mut raz, mut framework) = (0, 0);
        for crm in 1..=7 {
            for op2 in 0..=7 {
                let reg = SysReg::new(3, 0, 0, crm, op2);
                match sysreg_trap_policy(reg) {
                    SysRegTrap::RazWi => raz += 1,
                    SysRegTrap::FrameworkValue => {
                        assert!(crate::sysreg::name(reg).starts_with("ID_AA64"), "{reg:?}");
                        framework += 1;
                    }
                    SysRegTrap::Undefined => panic!("{reg:?} is in the ID space"),
                }
            }
        }
        assert_eq!((raz, framework), (47, 9));
        assert_eq!(
            sysreg_trap_policy(ID_AA64PFR0_EL1),
            SysRegTrap::FrameworkValue
        );
        assert_eq!(
            sysreg_trap_policy(SysReg::new(3, 0, 0, 6, 2)),
            SysRegTrap::RazWi
        );
    }

    #[test]
    fn the_debug_space_is_raz_wi_as_before() {
        // OSLAR_EL1 (2,0,1,0,4), OSDLR_EL1 (2,0,1,3,4), DBGBVR3_EL1 (2,0,0,3,4).
        for reg in [
            SysReg::new(2, 0, 1, 0, 4),
            SysReg::new(2, 0, 1, 3, 4),
            SysReg::new(2, 0, 0, 3, 4),
        ] {
            assert_eq!(sysreg_trap_policy(reg), SysRegTrap::RazWi);
        }
    }

    #[test]
    fn registers_outside_both_spaces_are_undefined() {
        for reg in [
            // CRm = 0 of the ID block: MIDR_EL1, MPIDR_EL1 (not trapped; not ID space).
            SysReg::new(3, 0, 0, 0, 0),
            SysReg::new(3, 0, 0, 0, 5),
            // CRm = 8..15: not part of the ID space.
            SysReg::new(3, 0, 0, 8, 0),
            // op1 = 1 (CCSIDR_EL1 is 3,1,0,0,0) and CRn = 1 (SCTLR_EL1, ZCR_EL1).
            SysReg::new(3, 1, 0, 0, 0),
            SysReg::new(3, 0, 1, 2, 0),
            // An implementation-defined register (CRn = 15).
            SysReg::new(3, 0, 15, 2, 0),
        ] {
            assert_eq!(sysreg_trap_policy(reg), SysRegTrap::Undefined, "{reg:?}");
        }
    }

    #[test]
    fn the_gic_field_of_pfr0_says_gicv3_when_there_is_one() {
        // An M1's ID_AA64PFR0_EL1 as the framework reports it (EL0..EL3 AArch64,
        // FP/AdvSIMD, CSV2/CSV3), GIC field 0.
        let m1 = 0x1100_0000_0000_1111u64;
        assert_eq!(pfr0_for_guest(m1, true), m1 | 0x0100_0000);
        assert_eq!(pfr0_for_guest(m1 | 0x0f00_0000, false), m1);
        assert_eq!(pfr0_for_guest(m1 | 0x0300_0000, true), m1 | 0x0100_0000);
    }

    #[test]
    fn sme_is_hidden_from_the_guest() {
        // An M4's ID_AA64PFR1_EL1 with SME = 2 (SME2), other fields kept.
        let m4 = 0x0000_0000_0200_0021u64;
        assert_eq!(pfr1_for_guest(m4), 0x21);
        assert_eq!(pfr1_for_guest(0x21), 0x21);
    }

    #[test]
    fn an_undefined_msr_at_el1h_enters_the_current_el_spx_vector() {
        // The kernel (EL1h, PSTATE 0x3c5 plus N and C set) at 0xffff_8000_1234_5678,
        // VBAR_EL1 0xffff_8000_1001_0000, SCTLR_EL1 with SPAN set and DSSBS clear.
        // Worked from the Arm ARM: ESR_EL1 = EC 0 << 26 | IL (1 << 25) = 0x0200_0000;
        // ELR_EL1 = the MSR itself; SPSR_EL1 = the old PSTATE; vector = VBAR +
        // 0x200 (current EL, SP_ELx); PSTATE = 0b0101 | DAIF (0x3c0) = 0x3c5, no PAN
        // (SPAN = 1 and PAN was clear), no SSBS (DSSBS = 0).
        let pstate = 0x3c5 | (1 << 31) | (1 << 29);
        let sctlr = 0x30d0_0800 | SCTLR_SPAN;
        let inj = undefined(0xffff_8000_1234_5678, pstate, 0xffff_8000_1001_0000, sctlr);
        assert_eq!(
            inj,
            Injection {
                esr_el1: 0x0200_0000,
                elr_el1: 0xffff_8000_1234_5678,
                spsr_el1: pstate,
                pc: 0xffff_8000_1001_0200,
                pstate: 0x3c5,
            }
        );
    }

    #[test]
    fn the_vector_follows_where_the_exception_came_from() {
        let vbar = 0x4000_0000;
        // EL1t (M = 0b0100): current EL with SP_EL0, +0x000.
        assert_eq!(undefined(0, 0b0100, vbar, 0).pc, vbar);
        // EL0 AArch64 (M = 0b0000): lower EL, AArch64, +0x400.
        assert_eq!(undefined(0, 0, vbar, 0).pc, vbar + 0x400);
        // EL0 AArch32 (M = 0b10000 user): lower EL, AArch32, +0x600.
        assert_eq!(undefined(0, 0b1_0000, vbar, 0).pc, vbar + 0x600);
    }

    #[test]
    fn pan_ssbs_and_dit_on_entry_follow_sctlr_and_the_old_pstate() {
        // SPAN = 0: PAN is set on entry. DSSBS = 1: SSBS set. DIT kept; SS (bit
        // 21), IL (bit 20) and BTYPE (bits 11:10) cleared.
        let old = PSTATE_DIT | (1 << 21) | (1 << 20) | (0b11 << 10);
        let inj = undefined(0x1000, old, 0, SCTLR_DSSBS);
        assert_eq!(
            inj.pstate,
            PSTATE_EL1H | PSTATE_DAIF | PSTATE_PAN | PSTATE_SSBS | PSTATE_DIT
        );
        // PAN already set stays set even with SPAN = 1.
        let inj = undefined(0x1000, PSTATE_PAN | 0b0101, 0, SCTLR_SPAN);
        assert_eq!(inj.pstate & PSTATE_PAN, PSTATE_PAN);
        assert_eq!(inj.spsr_el1, PSTATE_PAN | 0b0101);
    }
}
