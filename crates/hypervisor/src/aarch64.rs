//! Backend-neutral AArch64 vCPU and VM state.
//!
//! System registers are keyed by their architectural encoding
//! `op0:op1:CRn:CRm:op2` (Arm ARM D19, packed as [`SysReg`]), which is also how
//! Hypervisor.framework and KVM name them, so no backend's own ids leak out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A system register's encoding: `op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2`
/// (the layout of the `MRS`/`MSR` instruction's operand fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SysReg(pub u16);

impl SysReg {
    /// Packs an encoding; fields wider than the architecture allows are masked.
    pub const fn new(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Self {
        Self(
            ((op0 as u16 & 0x3) << 14)
                | ((op1 as u16 & 0x7) << 11)
                | ((crn as u16 & 0xf) << 7)
                | ((crm as u16 & 0xf) << 3)
                | (op2 as u16 & 0x7),
        )
    }

    /// The fields `(op0, op1, crn, crm, op2)`.
    pub const fn fields(self) -> (u8, u8, u8, u8, u8) {
        let v = self.0;
        (
            ((v >> 14) & 0x3) as u8,
            ((v >> 11) & 0x7) as u8,
            ((v >> 7) & 0xf) as u8,
            ((v >> 3) & 0xf) as u8,
            (v & 0x7) as u8,
        )
    }
}

/// Where a vCPU starts at boot (arm64 Linux boot protocol: x0 = DTB address, MMU off,
/// EL1h with DAIF masked).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootState {
    /// Entry point.
    pub pc: u64,
    /// x0 (the device tree's guest-physical address for the boot CPU).
    pub x0: u64,
    /// PSTATE (e.g. EL1h, DAIF masked).
    pub pstate: u64,
}

/// PSCI power state of a vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PowerState {
    /// Running.
    #[default]
    On,
    /// Off (never started or after CPU_OFF).
    Off,
}

/// The whole state of one AArch64 vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// x0-x30.
    pub x: Vec<u64>,
    /// Stack pointer of EL0 (SP_EL0) and EL1 (SP_EL1).
    pub sp_el0: u64,
    /// SP_EL1.
    pub sp_el1: u64,
    /// Program counter.
    pub pc: u64,
    /// PSTATE / CPSR.
    pub pstate: u64,
    /// ELR_EL1.
    pub elr_el1: u64,
    /// SPSR_EL1.
    pub spsr_el1: u64,
    /// V0-V31 as 128-bit values.
    pub v: Vec<u128>,
    /// FPCR.
    pub fpcr: u64,
    /// FPSR.
    pub fpsr: u64,
    /// System registers by encoding.
    pub sys_regs: BTreeMap<SysReg, u64>,
    /// MPIDR_EL1 (affinity routing identity).
    pub mpidr: u64,
    /// PSCI power state.
    pub power: PowerState,
}

/// A state that has no neutral form, tagged with the backend that wrote it so another
/// backend refuses it instead of misreading it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendBlob {
    /// Backend that produced the bytes (e.g. "hvf").
    pub backend: String,
    /// Format version of the bytes within that backend.
    pub version: u32,
    /// The opaque bytes.
    pub bytes: Vec<u8>,
}

/// The whole VM-wide AArch64 state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Interrupt controller (GIC) state. The virtual counter is per vCPU
    /// (`VcpuState::sys_regs` under CNTVCT_EL0): a restore picks the timer offset
    /// that continues it.
    pub gic: BackendBlob,
}
