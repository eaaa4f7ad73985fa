use std::io;

use thiserror::Error;

/// Errors creating or querying a hypervisor.
#[derive(Debug, Error)]
pub enum HypervisorError {
    /// The hypervisor device or framework could not be opened.
    #[error("cannot open the hypervisor ({what})")]
    Open {
        /// What was opened (e.g. `/dev/kvm`).
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The hypervisor is too old or lacks a capability supermachine needs.
    #[error("the hypervisor lacks a required capability: {0}")]
    MissingCapability(String),
    /// Creating a VM failed.
    #[error("cannot create a VM")]
    CreateVm(#[source] io::Error),
    /// The backend does not support this request.
    #[error("not supported by this hypervisor: {0}")]
    Unsupported(String),
}

/// Errors of VM-wide operations.
#[derive(Debug, Error)]
pub enum VmError {
    /// Mapping or unmapping guest memory failed.
    #[error("cannot map guest memory at {guest_addr:#x} ({size} bytes)")]
    MapMemory {
        /// Guest-physical address of the region.
        guest_addr: u64,
        /// Region size.
        size: u64,
        /// The OS/hypervisor error.
        #[source]
        source: io::Error,
    },
    /// Creating the interrupt controller failed.
    #[error("cannot create the interrupt controller")]
    CreateIrqchip(#[source] io::Error),
    /// Setting up or driving an interrupt line failed.
    #[error("interrupt line {gsi}")]
    Irq {
        /// The interrupt number.
        gsi: u32,
        /// The OS/hypervisor error.
        #[source]
        source: io::Error,
    },
    /// Creating a vCPU failed.
    #[error("cannot create vCPU {id}")]
    CreateVcpu {
        /// vCPU index.
        id: u32,
        /// The OS/hypervisor error.
        #[source]
        source: io::Error,
    },
    /// Saving or restoring VM state failed.
    #[error("VM state {op}")]
    State {
        /// What was being done.
        op: &'static str,
        /// The OS/hypervisor error.
        #[source]
        source: io::Error,
    },
    /// The state belongs to another architecture or backend.
    #[error("VM state does not fit this VM: {0}")]
    StateMismatch(String),
    /// The backend does not support this request.
    #[error("not supported by this hypervisor: {0}")]
    Unsupported(String),
}

/// Errors of vCPU operations.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// Entering the guest failed.
    #[error("vCPU {id} run failed")]
    Run {
        /// vCPU index.
        id: u32,
        /// The OS/hypervisor error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing a register set failed.
    #[error("vCPU {id}: cannot {op}")]
    Registers {
        /// vCPU index.
        id: u32,
        /// Which operation (e.g. "set sregs").
        op: &'static str,
        /// The OS/hypervisor error.
        #[source]
        source: io::Error,
    },
    /// `set_io_result` was called when no read exit was pending, or with the wrong size.
    #[error("vCPU {id}: no pending I/O read of {len} bytes to complete")]
    NoPendingIo {
        /// vCPU index.
        id: u32,
        /// Bytes offered.
        len: usize,
    },
    /// The state belongs to another architecture or backend.
    #[error("vCPU state does not fit this vCPU: {0}")]
    StateMismatch(String),
    /// The backend does not support this request.
    #[error("not supported by this hypervisor: {0}")]
    Unsupported(String),
}
