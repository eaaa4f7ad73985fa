//! KVM on x86-64: the implementation behind the crate root's re-exports.

pub mod convert;
mod cpuid;
mod kick;
pub mod seccomp;
mod system;
mod vcpu;
mod vm;
mod vm_state;

pub use kick::{kick_signal, KvmKicker};
pub use system::KvmHypervisor;
pub use vcpu::KvmVcpu;
pub use vm::{KvmIrqLine, KvmVm, IDENTITY_MAP_ADDRESS, TSS_ADDRESS};

/// Converts a `kvm-ioctls` error into the `std::io::Error` the seam's error
/// types carry, keeping the OS error code.
pub(crate) fn os_error(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}
