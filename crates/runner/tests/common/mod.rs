//! Shared by the runner's `/dev/kvm` integration tests.

use hypervisor::HypervisorError;
use kvm_backend::KvmHypervisor;

/// `/dev/kvm`, or `None` (with the reason printed) where it cannot be opened.
pub fn hypervisor() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(h) => Some(h),
        Err(e @ HypervisorError::Open { .. }) => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("KVM is present but unusable: {e}"),
    }
}
