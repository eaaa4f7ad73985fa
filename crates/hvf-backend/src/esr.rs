//! Decoding of the exception syndrome (ESR_EL2) that Hypervisor.framework reports
//! when a vCPU exits with `HV_EXIT_REASON_EXCEPTION`.
//!
//! Field layouts follow the Arm Architecture Reference Manual for A-profile (DDI 0487),
//! section D24.2 "ESR_EL2": EC is bits \[31:26\], IL is bit \[25\], ISS is bits \[24:0\], and
//! the ISS layout depends on the exception class. Everything here is plain integer
//! work so it is unit-tested on any host; a syndrome the guest can provoke but we do
//! not handle becomes an [`EsrError`], never a panic.

use hypervisor::aarch64::SysReg;
use thiserror::Error;

/// Exception classes (ESR_EL2.EC) that a VMM sees from an AArch64 guest.
pub mod ec {
    /// Unknown reason (e.g. an undefined instruction routed to EL2).
    pub const UNKNOWN: u8 = 0x00;
    /// Trapped WFI/WFE/WFIT/WFET.
    pub const WFX: u8 = 0x01;
    /// HVC executed in AArch64 state.
    pub const HVC64: u8 = 0x16;
    /// SMC executed in AArch64 state.
    pub const SMC64: u8 = 0x17;
    /// Trapped MSR, MRS or system instruction in AArch64 state.
    pub const SYS64: u8 = 0x18;
    /// Instruction abort from a lower exception level.
    pub const IABT_LOWER: u8 = 0x20;
    /// Data abort from a lower exception level (stage-2 faults: MMIO).
    pub const DABT_LOWER: u8 = 0x24;
    /// BRK instruction in AArch64 state.
    pub const BRK64: u8 = 0x3c;
}

/// Why a syndrome could not be turned into something the VMM can act on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EsrError {
    /// A data abort without a valid instruction syndrome (ISV = 0): the access used an
    /// instruction whose operands the hardware does not describe (load/store pair,
    /// post-index writeback, SIMD...), so it cannot be emulated without decoding guest
    /// instructions. Guests must use plain LDR/STR for device memory.
    #[error(
        "guest MMIO access at {addr:#x} has no instruction syndrome (ISV=0, ESR {esr:#x}); \
         the guest used a load/store form that cannot be emulated (e.g. LDP/STP or writeback)"
    )]
    NoInstructionSyndrome {
        /// Faulting guest-physical address.
        addr: u64,
        /// The raw syndrome.
        esr: u64,
    },
    /// A data abort during a stage-1 page-table walk: the guest's page tables point at
    /// an address with no memory behind it.
    #[error("guest page-table walk hit unmapped address {addr:#x} (ESR {esr:#x})")]
    PageTableWalk {
        /// Faulting guest-physical address.
        addr: u64,
        /// The raw syndrome.
        esr: u64,
    },
    /// A cache-maintenance instruction targeted an address with no memory behind it.
    #[error("guest cache maintenance on unmapped address {addr:#x} (ESR {esr:#x})")]
    CacheMaintenance {
        /// Faulting guest-physical address.
        addr: u64,
        /// The raw syndrome.
        esr: u64,
    },
    /// The guest fetched instructions from an address with no memory behind it.
    #[error("guest instruction fetch from unmapped address {addr:#x} (ESR {esr:#x})")]
    InstructionAbort {
        /// Faulting guest-physical address.
        addr: u64,
        /// The raw syndrome.
        esr: u64,
    },
    /// An exception class the backend does not handle.
    #[error("unhandled guest exception class {ec:#04x} (ESR {esr:#x})")]
    UnhandledClass {
        /// ESR_EL2.EC.
        ec: u8,
        /// The raw syndrome.
        esr: u64,
    },
}

/// Which wait-for instruction trapped (ESR_EL2.ISS.TI, bits \[1:0\]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// WFI: wait for interrupt.
    Wfi,
    /// WFE: wait for event.
    Wfe,
    /// WFIT: WFI with a timeout (FEAT_WFxT).
    Wfit,
    /// WFET: WFE with a timeout (FEAT_WFxT).
    Wfet,
}

/// A guest load or store that hit an address with no memory behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioAccess {
    /// Guest-physical address (from the faulting IPA reported with the exit).
    pub addr: u64,
    /// Access size in bytes: 1, 2, 4 or 8 (ISS.SAS).
    pub size: u8,
    /// The access is a store (ISS.WnR).
    pub write: bool,
    /// The transfer register Xt/Wt (ISS.SRT); 31 is the zero register here, not SP.
    pub reg: u8,
    /// A load sign-extends the value (ISS.SSE).
    pub sign_extend: bool,
    /// The register is 64 bits wide (ISS.SF); otherwise a W register.
    pub sixty_four: bool,
}

/// Register number meaning XZR/WZR in a load/store's Rt field.
pub const ZERO_REGISTER: u8 = 31;

impl MmioAccess {
    /// The bytes a store writes, taken from the transfer register's value.
    pub fn store_bytes(&self, reg_value: u64) -> ([u8; 8], usize) {
        let value = if self.reg == ZERO_REGISTER {
            0
        } else {
            reg_value
        };
        (value.to_le_bytes(), usize::from(self.size))
    }

    /// The value a load leaves in the transfer register, given the bytes the device
    /// returned (little-endian, `size` bytes; missing bytes read as zero, extra bytes
    /// are ignored). Applies SSE/SF as the Arm ARM describes for LDRS*: sign-extend to
    /// the register width, and a W register's upper 32 bits are zero.
    pub fn load_value(&self, data: &[u8]) -> u64 {
        let size = usize::from(self.size).min(8);
        let mut bytes = [0u8; 8];
        let n = data.len().min(size);
        bytes[..n].copy_from_slice(&data[..n]);
        let raw = u64::from_le_bytes(bytes);
        let bits = (size * 8) as u32;
        let mut value = raw;
        if self.sign_extend && bits < 64 && bits > 0 {
            let shift = 64 - bits;
            value = (((raw << shift) as i64) >> shift) as u64;
        }
        if !self.sixty_four {
            value &= 0xffff_ffff;
        }
        value
    }
}

/// A trapped MSR/MRS (ISS layout for EC 0x18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysRegAccess {
    /// The register's `op0:op1:CRn:CRm:op2` encoding.
    pub reg: SysReg,
    /// The general-purpose register Xt (31 is XZR).
    pub rt: u8,
    /// MRS (read into Xt) when true, MSR (write from Xt) when false (ISS.Direction).
    pub read: bool,
}

/// A decoded exit syndrome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syndrome {
    /// WFI/WFE trapped.
    Wait(WaitKind),
    /// HVC #imm (PSCI and other SMCCC calls use `HVC #0`).
    Hvc {
        /// The 16-bit immediate.
        imm: u16,
    },
    /// SMC #imm.
    Smc {
        /// The 16-bit immediate.
        imm: u16,
    },
    /// A trapped system-register access.
    SysReg(SysRegAccess),
    /// An access to an unmapped guest-physical address: MMIO.
    Mmio(MmioAccess),
    /// BRK #imm: a guest debugger breakpoint reached the VMM.
    Brk {
        /// The 16-bit immediate.
        imm: u16,
    },
}

impl Syndrome {
    /// How many bytes the PC must move before the guest resumes.
    ///
    /// HVC's preferred return address is the next instruction (Arm ARM D1.10.1, the
    /// exception is taken *after* the instruction), so the PC already points past it;
    /// trapped SMC, WFx, MSR/MRS and data aborts report the faulting instruction, which
    /// the VMM completes and skips. All of these are 32-bit A64 instructions.
    pub fn pc_advance(&self) -> u64 {
        match self {
            Syndrome::Hvc { .. } | Syndrome::Brk { .. } => 0,
            Syndrome::Smc { .. } | Syndrome::Wait(_) | Syndrome::SysReg(_) | Syndrome::Mmio(_) => 4,
        }
    }
}

/// ESR_EL2.EC.
pub const fn exception_class(esr: u64) -> u8 {
    ((esr >> 26) & 0x3f) as u8
}

/// ESR_EL2.ISS.
pub const fn iss(esr: u64) -> u32 {
    (esr & 0x01ff_ffff) as u32
}

/// The register holding a WFIT/WFET timeout (ISS.RV, bit 2, says it is valid;
/// ISS.RN, bits (bits 9:5), names it: Arm ARM, "ISS encoding for an exception from a
/// WF* instruction").
pub const fn wfxt_register(esr: u64) -> Option<u8> {
    let iss = iss(esr);
    if iss & (1 << 2) != 0 {
        Some(((iss >> 5) & 0x1f) as u8)
    } else {
        None
    }
}

/// Decodes a syndrome. `ipa` is the faulting guest-physical address the framework
/// reports with the exit (`exception.physical_address`); only data and instruction
/// aborts use it.
pub fn decode(esr: u64, ipa: u64) -> Result<Syndrome, EsrError> {
    let iss = iss(esr);
    match exception_class(esr) {
        ec::WFX => Ok(Syndrome::Wait(match iss & 0b11 {
            0 => WaitKind::Wfi,
            1 => WaitKind::Wfe,
            2 => WaitKind::Wfit,
            _ => WaitKind::Wfet,
        })),
        ec::HVC64 => Ok(Syndrome::Hvc {
            imm: (iss & 0xffff) as u16,
        }),
        ec::SMC64 => Ok(Syndrome::Smc {
            imm: (iss & 0xffff) as u16,
        }),
        ec::BRK64 => Ok(Syndrome::Brk {
            imm: (iss & 0xffff) as u16,
        }),
        ec::SYS64 => Ok(Syndrome::SysReg(decode_sysreg(iss))),
        ec::DABT_LOWER => decode_data_abort(esr, iss, ipa).map(Syndrome::Mmio),
        ec::IABT_LOWER => Err(EsrError::InstructionAbort { addr: ipa, esr }),
        ec => Err(EsrError::UnhandledClass { ec, esr }),
    }
}

/// ISS for EC 0x18 (Arm ARM D24.2.x, "ISS encoding for an exception from MSR, MRS, or
/// System instruction execution in AArch64 state"): Op0 (bits 21:20), Op2 (bits 19:17),
/// Op1 (bits 16:14), CRn (bits 13:10), Rt (bits 9:5), CRm (bits 4:1), Direction (bit 0) (1 = read).
fn decode_sysreg(iss: u32) -> SysRegAccess {
    let field = |shift: u32, width: u32| ((iss >> shift) & ((1 << width) - 1)) as u8;
    SysRegAccess {
        reg: SysReg::new(
            field(20, 2),
            field(14, 3),
            field(10, 4),
            field(1, 4),
            field(17, 3),
        ),
        rt: field(5, 5),
        read: iss & 1 == 1,
    }
}

/// ISS for a data abort (Arm ARM D24.2.x, "ISS encoding for an exception from a Data
/// Abort"): ISV (bit 24), SAS (bits 23:22), SSE (bit 21), SRT (bits 20:16), SF (bit 15), CM (bit 8), S1PTW (bit 7),
/// WnR (bit 6).
fn decode_data_abort(esr: u64, iss: u32, addr: u64) -> Result<MmioAccess, EsrError> {
    if iss & (1 << 7) != 0 {
        return Err(EsrError::PageTableWalk { addr, esr });
    }
    if iss & (1 << 8) != 0 {
        return Err(EsrError::CacheMaintenance { addr, esr });
    }
    if iss & (1 << 24) == 0 {
        return Err(EsrError::NoInstructionSyndrome { addr, esr });
    }
    Ok(MmioAccess {
        addr,
        size: 1 << ((iss >> 22) & 0b11),
        write: iss & (1 << 6) != 0,
        reg: ((iss >> 16) & 0x1f) as u8,
        sign_extend: iss & (1 << 21) != 0,
        sixty_four: iss & (1 << 15) != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a syndrome with IL = 1 (32-bit instruction).
    fn esr(ec: u8, iss: u32) -> u64 {
        (u64::from(ec) << 26) | (1 << 25) | u64::from(iss & 0x01ff_ffff)
    }

    /// ISS of a data abort with ISV = 1.
    fn dabt_iss(sas: u32, sse: bool, srt: u32, sf: bool, wnr: bool) -> u32 {
        (1 << 24)
            | (sas << 22)
            | (u32::from(sse) << 21)
            | (srt << 16)
            | (u32::from(sf) << 15)
            | (u32::from(wnr) << 6)
            | 0x07 // DFSC: translation fault, level 3
    }

    #[test]
    fn decode_data_abort_word_store_gives_mmio_write() {
        let s = decode(
            esr(ec::DABT_LOWER, dabt_iss(2, false, 3, false, true)),
            0x0a00_0070,
        )
        .unwrap();
        assert_eq!(
            s,
            Syndrome::Mmio(MmioAccess {
                addr: 0x0a00_0070,
                size: 4,
                write: true,
                reg: 3,
                sign_extend: false,
                sixty_four: false,
            })
        );
        assert_eq!(s.pc_advance(), 4);
    }

    #[test]
    fn decode_data_abort_every_sas_gives_matching_size() {
        for (sas, size) in [(0, 1), (1, 2), (2, 4), (3, 8)] {
            let s = decode(
                esr(ec::DABT_LOWER, dabt_iss(sas, false, 0, true, false)),
                0x1000,
            )
            .unwrap();
            match s {
                Syndrome::Mmio(a) => {
                    assert_eq!(a.size, size);
                    assert!(!a.write);
                    assert!(a.sixty_four);
                }
                other => panic!("expected MMIO, got {other:?}"),
            }
        }
    }

    #[test]
    fn decode_data_abort_without_isv_is_error_not_panic() {
        let iss = dabt_iss(2, false, 1, false, true) & !(1 << 24);
        let err = decode(esr(ec::DABT_LOWER, iss), 0x9000_0000).unwrap_err();
        assert!(matches!(
            err,
            EsrError::NoInstructionSyndrome {
                addr: 0x9000_0000,
                ..
            }
        ));
        assert!(err.to_string().contains("LDP/STP"));
    }

    #[test]
    fn decode_data_abort_in_page_table_walk_is_error() {
        let iss = dabt_iss(3, false, 0, true, false) | (1 << 7);
        assert!(matches!(
            decode(esr(ec::DABT_LOWER, iss), 0x4000),
            Err(EsrError::PageTableWalk { addr: 0x4000, .. })
        ));
    }

    #[test]
    fn decode_data_abort_cache_maintenance_is_error() {
        let iss = dabt_iss(3, false, 0, true, true) | (1 << 8);
        assert!(matches!(
            decode(esr(ec::DABT_LOWER, iss), 0x4000),
            Err(EsrError::CacheMaintenance { .. })
        ));
    }

    #[test]
    fn load_value_sign_extends_byte_into_x_register() {
        let a = MmioAccess {
            addr: 0,
            size: 1,
            write: false,
            reg: 0,
            sign_extend: true,
            sixty_four: true,
        };
        assert_eq!(a.load_value(&[0x80]), 0xffff_ffff_ffff_ff80);
        assert_eq!(a.load_value(&[0x7f]), 0x7f);
    }

    #[test]
    fn load_value_sign_extends_halfword_into_w_register_with_upper_zero() {
        let a = MmioAccess {
            addr: 0,
            size: 2,
            write: false,
            reg: 0,
            sign_extend: true,
            sixty_four: false,
        };
        assert_eq!(a.load_value(&[0x00, 0x80]), 0xffff_8000);
    }

    #[test]
    fn load_value_zero_extends_and_ignores_extra_bytes() {
        let a = MmioAccess {
            addr: 0,
            size: 2,
            write: false,
            reg: 0,
            sign_extend: false,
            sixty_four: true,
        };
        assert_eq!(a.load_value(&[0xff, 0xff, 0xff, 0xff]), 0xffff);
        // Short data from a device reads as zero in the missing bytes.
        assert_eq!(a.load_value(&[0xab]), 0xab);
    }

    #[test]
    fn store_bytes_from_zero_register_are_zero() {
        let a = MmioAccess {
            addr: 0,
            size: 4,
            write: true,
            reg: ZERO_REGISTER,
            sign_extend: false,
            sixty_four: false,
        };
        let (bytes, len) = a.store_bytes(0xdead_beef);
        assert_eq!(len, 4);
        assert_eq!(&bytes[..len], &[0, 0, 0, 0]);
        let b = MmioAccess { reg: 2, ..a };
        let (bytes, len) = b.store_bytes(0x1122_3344_5566_7788);
        assert_eq!(&bytes[..len], &[0x88, 0x77, 0x66, 0x55]);
    }

    #[test]
    fn decode_hvc_gives_immediate_and_no_pc_advance() {
        let s = decode(esr(ec::HVC64, 0x1234), 0).unwrap();
        assert_eq!(s, Syndrome::Hvc { imm: 0x1234 });
        assert_eq!(s.pc_advance(), 0);
    }

    #[test]
    fn decode_smc_gives_immediate_and_pc_advance() {
        let s = decode(esr(ec::SMC64, 0xffff), 0).unwrap();
        assert_eq!(s, Syndrome::Smc { imm: 0xffff });
        assert_eq!(s.pc_advance(), 4);
    }

    #[test]
    fn a_wfit_names_its_timeout_register() {
        // WFIT x3: TI = 0b10, RV (bit 2), RN = 3 (bits 9:5).
        assert_eq!(
            wfxt_register(esr(ec::WFX, (3 << 5) | (1 << 2) | 2)),
            Some(3)
        );
        assert_eq!(wfxt_register(esr(ec::WFX, 0)), None);
    }

    #[test]
    fn decode_wfx_gives_each_kind() {
        for (ti, kind) in [
            (0, WaitKind::Wfi),
            (1, WaitKind::Wfe),
            (2, WaitKind::Wfit),
            (3, WaitKind::Wfet),
        ] {
            assert_eq!(decode(esr(ec::WFX, ti), 0).unwrap(), Syndrome::Wait(kind));
        }
    }

    #[test]
    fn decode_msr_oslar_gives_write_with_fields() {
        // MSR OSLAR_EL1, x5: op0=2 op1=0 CRn=1 CRm=0 op2=4, direction 0 (write).
        let iss = (2 << 20) | (4 << 17) | (1 << 10) | (5 << 5);
        let s = decode(esr(ec::SYS64, iss), 0).unwrap();
        assert_eq!(
            s,
            Syndrome::SysReg(SysRegAccess {
                reg: SysReg::new(2, 0, 1, 0, 4),
                rt: 5,
                read: false,
            })
        );
    }

    #[test]
    fn decode_mrs_cntvct_gives_read_with_fields() {
        // MRS x30, CNTVCT_EL0: op0=3 op1=3 CRn=14 CRm=0 op2=2, direction 1 (read).
        let iss = (3 << 20) | (2 << 17) | (3 << 14) | (14 << 10) | (30 << 5) | 1;
        match decode(esr(ec::SYS64, iss), 0).unwrap() {
            Syndrome::SysReg(a) => {
                assert_eq!(a.reg.fields(), (3, 3, 14, 0, 2));
                assert_eq!(a.rt, 30);
                assert!(a.read);
            }
            other => panic!("expected sysreg, got {other:?}"),
        }
    }

    #[test]
    fn decode_sysreg_with_crm_fifteen_keeps_all_bits() {
        let iss = (3 << 20) | (7 << 17) | (7 << 14) | (15 << 10) | (15 << 1);
        match decode(esr(ec::SYS64, iss), 0).unwrap() {
            Syndrome::SysReg(a) => assert_eq!(a.reg.fields(), (3, 7, 15, 15, 7)),
            other => panic!("expected sysreg, got {other:?}"),
        }
    }

    #[test]
    fn decode_instruction_abort_is_error() {
        assert!(matches!(
            decode(esr(ec::IABT_LOWER, 0x07), 0xdead_0000),
            Err(EsrError::InstructionAbort {
                addr: 0xdead_0000,
                ..
            })
        ));
    }

    #[test]
    fn decode_unknown_classes_are_typed_errors() {
        for class in [ec::UNKNOWN, 0x07, 0x15, 0x2f, 0x3f] {
            let raw = esr(class, 0x1ff_ffff);
            assert_eq!(
                decode(raw, 0),
                Err(EsrError::UnhandledClass {
                    ec: class,
                    esr: raw
                })
            );
        }
    }

    #[test]
    fn decode_garbage_upper_bits_are_ignored() {
        // ESR_EL2 is 64 bits; bits [63:32] (ISS2 and RES0) must not change the class.
        let raw = esr(ec::HVC64, 0) | 0xffff_ffff_0000_0000;
        assert_eq!(decode(raw, 0).unwrap(), Syndrome::Hvc { imm: 0 });
    }

    #[test]
    fn decode_any_syndrome_never_panics() {
        // A cheap sweep over every class with a few ISS patterns.
        for class in 0u8..64 {
            for iss in [0, 1, 0x00ff_ffff, 0x01ff_ffff, 0x0100_0000, 0x0080] {
                let _ = decode(esr(class, iss), u64::MAX);
            }
        }
    }
}
