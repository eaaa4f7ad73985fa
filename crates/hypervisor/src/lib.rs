//! The hypervisor seam: backend-neutral traits (`Hypervisor`, `Vm`, `Vcpu`) and the
//! plain, serializable per-architecture state types that snapshots store.
//!
//! This crate must never depend on a backend (no `kvm_*`, no `hv_*` types) and must
//! never grow a `cfg(target_os)`: backends implement these traits in their own crates
//! and the runner picks one in a single place. Every architecture's state module is
//! compiled on every host so a snapshot can be read anywhere.
//!
//! I/O exits follow a two-step shape (as crosvm's do) so Hypervisor.framework and
//! WHP fit as well as KVM: [`Vcpu::run`] reports *that* an access happened and what it
//! was; for reads the caller answers with [`Vcpu::set_io_result`] before the next
//! `run`.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod aarch64;
mod error;
pub mod x86_64;

pub use error::{HypervisorError, VcpuError, VmError};

use serde::{Deserialize, Serialize};

/// Which backend implements the traits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HypervisorKind {
    /// Linux KVM.
    Kvm,
    /// macOS Hypervisor.framework.
    Hvf,
}

/// Guest CPU architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// x86-64.
    X86_64,
    /// AArch64.
    Aarch64,
}

/// What a backend can do on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Interrupt lines can be raised by writing a file descriptor (KVM irqfd).
    pub irqfd: bool,
    /// Guest writes to an address can signal a file descriptor without a vCPU exit
    /// (KVM ioeventfd).
    pub ioeventfd: bool,
    /// Largest number of vCPUs a VM may have.
    pub max_vcpus: u32,
    /// The host's hypervisor runs guests in a paravirtual mode (Linux PVM) in which a
    /// guest kernel without PVM-guest support is executed by KVM's instruction
    /// emulator: tiny guests work, general-purpose kernels crawl.
    pub pvm_host: bool,
}

/// Parameters fixed when a VM is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs the VM will have (CPUID topology and ACPI are sized from it).
    pub vcpus: u32,
    /// Whether the vCPUs boot or are restored from a saved state.
    pub start: VmStart,
}

/// How a VM's vCPUs get their first state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VmStart {
    /// The vCPUs boot: each is created with the host's CPU model (on x86-64 the
    /// CPUID the backend derives from what the host supports) and the boot CPU
    /// gets [`Vcpu::set_boot_state`].
    #[default]
    Boot,
    /// Every vCPU is given a saved state ([`Vcpu::restore_state`]) before it
    /// first runs, and that state carries its CPU model: the backend skips
    /// asking the host for one (on KVM, a query that costs about half a
    /// millisecond), and a vCPU created this way refuses a boot state.
    Restore,
}

/// Creates VMs.
pub trait Hypervisor {
    /// The VM type of this backend.
    type Vm: Vm;

    /// Which backend this is.
    fn kind(&self) -> HypervisorKind;

    /// What this backend can do on this host.
    fn capabilities(&self) -> &Capabilities;

    /// Creates an empty VM: no memory, no vCPUs, no interrupt controller.
    fn create_vm(&self, config: &VmConfig) -> Result<Self::Vm, HypervisorError>;
}

/// A region of host memory shown to the guest at `guest_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Backend slot number; unique per VM.
    pub slot: u32,
    /// Guest-physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes; a multiple of the host page size.
    pub size: u64,
    /// Host virtual address of the first byte.
    pub host_addr: usize,
    /// The guest may not write the region (writes become MMIO exits).
    pub read_only: bool,
}

/// Where an I/O event is registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    /// x86 port I/O.
    Pio(u64),
    /// Memory-mapped I/O.
    Mmio(u64),
}

/// A registered I/O event: guest writes that the backend turns into a host
/// notification without a vCPU exit (KVM ioeventfd). Made by
/// [`Vm::register_ioevent`]; dropping it unregisters it, after which those writes
/// exit to the VMM again.
///
/// [`IoEvent::file`] is what a host event loop waits on: it becomes readable when
/// at least one matching write happened. It has eventfd semantics (eventfd(2)):
/// non-blocking, a read returns the number of writes since the last read as an
/// 8-byte native-endian counter and resets it. A backend that hands one out must
/// provide those semantics.
pub struct IoEvent {
    file: std::fs::File,
    /// Backend state whose drop unregisters the event (it may hold the VM open).
    _registration: Box<dyn std::fmt::Debug + Send + Sync>,
}

impl IoEvent {
    /// Wraps `file` (see the type's documentation for what it must be) and the
    /// backend's `registration`, dropped, and so unregistered, with the event.
    pub fn new(file: std::fs::File, registration: Box<dyn std::fmt::Debug + Send + Sync>) -> Self {
        Self {
            file,
            _registration: registration,
        }
    }

    /// The file to wait on for readability.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Consumes the pending notifications and returns how many writes coalesced
    /// into them; 0 when none is pending.
    pub fn drain(&self) -> std::io::Result<u64> {
        use std::io::Read;
        let mut counter = [0u8; 8];
        loop {
            match (&self.file).read(&mut counter) {
                Ok(8) => return Ok(u64::from_ne_bytes(counter)),
                Ok(n) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("an I/O event read returned {n} bytes, not an 8-byte counter"),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl std::fmt::Debug for IoEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEvent")
            .field("file", &self.file)
            .field("registration", &self._registration)
            .finish()
    }
}

/// A level- or edge-triggered interrupt input of the VM's interrupt controller.
pub trait IrqLine: Send + Sync {
    /// Signals an edge-triggered interrupt.
    fn trigger(&self) -> Result<(), VmError>;
    /// Drives a level-triggered line.
    fn set_level(&self, asserted: bool) -> Result<(), VmError>;
}

/// Something another thread can use to make a running vCPU return from
/// [`Vcpu::run`] with [`VcpuExit::Interrupted`].
pub trait VcpuKicker: Send + Sync {
    /// Asks the vCPU to leave guest mode as soon as possible. A kick that arrives
    /// while the vCPU is outside `run` makes the next `run` return at once.
    fn kick(&self);
}

/// A virtual machine: guest memory, an interrupt controller, vCPUs.
pub trait Vm: Send + Sync {
    /// The vCPU type of this backend.
    type Vcpu: Vcpu;
    /// The interrupt line type of this backend.
    type IrqLine: IrqLine + 'static;

    /// Which architecture the VM emulates.
    fn arch(&self) -> Arch;

    /// Maps host memory into the guest.
    ///
    /// # Safety
    /// `region.host_addr .. region.host_addr + region.size` must be a valid, mapped
    /// host range that stays mapped (and is not reused for anything else) until the
    /// region is unmapped or the VM is dropped: the guest reads and writes it at any
    /// time.
    unsafe fn map_memory(&self, region: &MemoryRegion) -> Result<(), VmError>;

    /// Removes a mapping made by [`Vm::map_memory`].
    fn unmap_memory(&self, region: &MemoryRegion) -> Result<(), VmError>;

    /// Creates the interrupt controller (and on x86 the PIT) the guest expects.
    fn create_irqchip(&self) -> Result<(), VmError>;

    /// Returns an interrupt line wired to input `gsi` of the interrupt controller.
    fn irq_line(&self, gsi: u32) -> Result<Self::IrqLine, VmError>;

    /// Makes guest writes at `addr` signal an [`IoEvent`] instead of ending
    /// [`Vcpu::run`] with a write exit. With `datamatch`, only 4-byte writes of
    /// that value do (virtio-mmio's `QueueNotify` is a 32-bit register written
    /// with the queue index, virtio 1.2 §4.2.2); other writes there still exit.
    /// Without it, a write of any size and value does.
    ///
    /// Returns `Ok(None)` when the backend has no such mechanism
    /// ([`Capabilities::ioeventfd`] is false, as on Hypervisor.framework): the
    /// writes keep arriving as exits and the caller handles them there. This
    /// default does exactly that.
    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<Option<IoEvent>, VmError> {
        let _ = (addr, datamatch);
        Ok(None)
    }

    /// Creates vCPU `id`. On backends that bind a vCPU to its creating thread (HVF),
    /// call this on the thread that will run it.
    fn create_vcpu(&self, id: u32) -> Result<Self::Vcpu, VmError>;

    /// Captures VM-wide state (interrupt controllers, timers, clock).
    fn save_state(&self) -> Result<VmState, VmError>;

    /// Restores VM-wide state captured by [`Vm::save_state`].
    fn restore_state(&self, state: &VmState) -> Result<(), VmError>;
}

/// Data of a port or MMIO write, or the size of a read, up to 8 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IoData {
    len: u8,
    bytes: [u8; 8],
}

impl IoData {
    /// Copies `data` (at most 8 bytes; longer input is truncated to 8).
    pub fn new(data: &[u8]) -> Self {
        let len = data.len().min(8);
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(&data[..len]);
        Self {
            len: len as u8,
            bytes,
        }
    }

    /// The bytes, in guest order.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The bytes as a little-endian integer.
    pub fn as_u64(&self) -> u64 {
        u64::from_le_bytes(self.bytes)
    }
}

impl std::fmt::Debug for IoData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoData({:02x?})", self.as_slice())
    }
}

/// Why [`Vcpu::run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// The guest read `size` bytes at MMIO address `addr`; answer with
    /// [`Vcpu::set_io_result`] before the next `run`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Access size in bytes (1, 2, 4 or 8).
        size: u8,
    },
    /// The guest wrote `data` at MMIO address `addr`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// The bytes written.
        data: IoData,
    },
    /// The guest read `size` bytes from x86 I/O port `port`; answer with
    /// [`Vcpu::set_io_result`] before the next `run`.
    IoIn {
        /// Port number.
        port: u16,
        /// Access size in bytes (1, 2 or 4).
        size: u8,
    },
    /// The guest wrote `data` to x86 I/O port `port`.
    IoOut {
        /// Port number.
        port: u16,
        /// The bytes written.
        data: IoData,
    },
    /// The vCPU halted and, with the interrupt controller in the backend, nothing
    /// will wake it (e.g. `cli; hlt`), or the backend reports halts to userspace.
    Halted,
    /// The guest asked to power off (PSCI SYSTEM_OFF) or a fatal condition that ends
    /// the VM occurred that the guest cannot continue from (x86 triple fault is
    /// reported as [`VcpuExit::Reset`], which is what firmware does with it).
    Shutdown,
    /// The guest asked for a reset (PSCI SYSTEM_RESET, x86 triple fault).
    Reset,
    /// Another thread kicked the vCPU ([`VcpuKicker::kick`]) or a signal arrived.
    Interrupted,
    /// The backend saw something it cannot handle; `reason` says what.
    Unhandled {
        /// A description for the error message.
        reason: String,
    },
}

/// The architecture-specific state a vCPU starts from at boot.
// Built once per vCPU at boot; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum BootState {
    /// x86-64 entry state.
    X86_64(x86_64::BootState),
    /// AArch64 entry state.
    Aarch64(aarch64::BootState),
}

/// A full vCPU state for snapshots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum VcpuState {
    /// x86-64 vCPU state.
    X86_64(Box<x86_64::VcpuState>),
    /// AArch64 vCPU state.
    Aarch64(Box<aarch64::VcpuState>),
}

/// VM-wide state for snapshots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum VmState {
    /// x86-64 VM state.
    X86_64(Box<x86_64::VmState>),
    /// AArch64 VM state.
    Aarch64(Box<aarch64::VmState>),
}

/// One virtual CPU. Not required to be `Send`: HVF binds a vCPU to the thread that
/// created it, so the runner creates and runs each vCPU on its own thread.
pub trait Vcpu {
    /// The kicker type of this backend.
    type Kicker: VcpuKicker + 'static;

    /// The vCPU's index.
    fn id(&self) -> u32;

    /// A handle another thread can use to interrupt [`Vcpu::run`].
    fn kicker(&self) -> Self::Kicker;

    /// Runs the guest until it needs the VMM.
    fn run(&mut self) -> Result<VcpuExit, VcpuError>;

    /// Completes the read exit ([`VcpuExit::MmioRead`] / [`VcpuExit::IoIn`]) that the
    /// last `run` returned with `data` (as many bytes as the access size).
    fn set_io_result(&mut self, data: &[u8]) -> Result<(), VcpuError>;

    /// Sets the state the vCPU boots from (registers, segment and system state, the
    /// model-specific registers a fresh CPU has).
    fn set_boot_state(&mut self, state: &BootState) -> Result<(), VcpuError>;

    /// Captures the full vCPU state.
    fn save_state(&self) -> Result<VcpuState, VcpuError>;

    /// Restores a state captured by [`Vcpu::save_state`].
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuError>;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Registration;

    /// A regular file standing in for the event's counter (the crate stays
    /// free of OS-specific code, eventfd included).
    fn event_over(name: &str, contents: &[u8]) -> IoEvent {
        let path = std::env::temp_dir().join(format!(
            "sm-hypervisor-ioevent-{}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, contents).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        IoEvent::new(file, Box::new(Registration))
    }

    #[test]
    fn ioevent_drain_counter_returns_count() {
        let ev = event_over("count", &3u64.to_ne_bytes());
        assert_eq!(ev.drain().unwrap(), 3);
    }

    #[test]
    fn ioevent_drain_short_read_is_invalid_data() {
        let ev = event_over("short", &[1, 2]);
        let err = ev.drain().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
