//! The one place that picks a hypervisor backend by target.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    /// The backend for this host.
    pub type DefaultHypervisor = kvm_backend::KvmHypervisor;

    /// Opens the host's hypervisor.
    pub fn open() -> Result<DefaultHypervisor, hypervisor::HypervisorError> {
        kvm_backend::KvmHypervisor::new()
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub use imp::*;
