//! Opening `/dev/kvm`, checking what it can do, creating VMs.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use hypervisor::{Capabilities, Hypervisor, HypervisorError, HypervisorKind, VmConfig, VmStart};
use kvm_bindings::{kvm_cpuid_entry2, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use super::os_error;
use super::vm::KvmVm;

/// The device node KVM is reached through.
const KVM_PATH: &str = "/dev/kvm";

/// Present when the host's KVM is Linux PVM (pagetable-based virtual machine),
/// which runs guests without hardware virtualization.
const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// Capabilities supermachine cannot work without, with the reason each is needed.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP (in-kernel PIC/IOAPIC/LAPIC)"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY (guest memory slots)"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD (virtio notifications)"),
    (Cap::Irqfd, "KVM_CAP_IRQFD (device interrupts)"),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT (race-free vCPU kicks)",
    ),
];

/// Host facts every VM of this hypervisor shares.
#[derive(Debug)]
pub(crate) struct HostInfo {
    /// KVM_GET_SUPPORTED_CPUID: the base a booting vCPU's CPUID is built from.
    /// Asked for by the first VM that boots: the query takes about half a
    /// millisecond here, and a restore (whose CPUID is in the snapshot) never
    /// needs it.
    supported_cpuid: OnceLock<Vec<kvm_cpuid_entry2>>,
    /// KVM_GET_MSR_INDEX_LIST: MSRs KVM can save and restore.
    pub(crate) msr_index_list: Vec<u32>,
}

/// `/dev/kvm`, opened and checked.
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: Kvm,
    capabilities: Capabilities,
    host: Arc<HostInfo>,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and checks that it speaks the stable KVM API (version 12)
    /// and has every capability supermachine relies on.
    pub fn new() -> Result<Self, HypervisorError> {
        let kvm = Kvm::new().map_err(|e| open_error(os_error(e)))?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(HypervisorError::MissingCapability(format!(
                "{KVM_PATH} reports KVM API version {version}, supermachine needs {KVM_API_VERSION}"
            )));
        }
        for (cap, what) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(HypervisorError::MissingCapability((*what).to_string()));
            }
        }
        let msr_index_list = kvm
            .get_msr_index_list()
            .map_err(|e| {
                HypervisorError::MissingCapability(format!(
                    "KVM_GET_MSR_INDEX_LIST failed: {}",
                    os_error(e)
                ))
            })?
            .as_slice()
            .to_vec();
        // KVM_CAP_MAX_VCPUS is 0 on very old kernels; KVM_CAP_NR_VCPUS is then the
        // limit (KVM API doc §4.3 KVM_CREATE_VCPU).
        let max_vcpus = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        let capabilities = Capabilities {
            irqfd: true,
            ioeventfd: true,
            max_vcpus,
            pvm_host: Path::new(PVM_MODULE_PATH).exists(),
        };
        Ok(Self {
            kvm,
            capabilities,
            host: Arc::new(HostInfo {
                supported_cpuid: OnceLock::new(),
                msr_index_list,
            }),
        })
    }

    /// The host's supported CPUID, asked for once.
    fn supported_cpuid(&self) -> Result<&[kvm_cpuid_entry2], HypervisorError> {
        if let Some(entries) = self.host.supported_cpuid.get() {
            return Ok(entries);
        }
        let entries = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| {
                HypervisorError::MissingCapability(format!(
                    "KVM_GET_SUPPORTED_CPUID failed: {}",
                    os_error(e)
                ))
            })?
            .as_slice()
            .to_vec();
        Ok(self.host.supported_cpuid.get_or_init(|| entries))
    }
}

/// Builds the open error with a hint the user can act on.
fn open_error(source: io::Error) -> HypervisorError {
    let hint = match source.kind() {
        io::ErrorKind::NotFound => {
            "missing: load the kvm module (kvm_intel, kvm_amd or kvm_pvm) and enable virtualization"
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied: add your user to the group owning /dev/kvm (usually `kvm`)"
        }
        _ => "cannot be opened",
    };
    HypervisorError::Open {
        what: format!("{KVM_PATH}, {hint}"),
        source,
    }
}

impl Hypervisor for KvmHypervisor {
    type Vm = KvmVm;

    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Kvm
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn create_vm(&self, config: &VmConfig) -> Result<KvmVm, HypervisorError> {
        if config.vcpus == 0 || config.vcpus > self.capabilities.max_vcpus {
            return Err(HypervisorError::Unsupported(format!(
                "{} vCPUs requested; this host allows 1 to {}",
                config.vcpus, self.capabilities.max_vcpus
            )));
        }
        let boot_cpuid = match config.start {
            VmStart::Boot => Some(self.supported_cpuid()?.to_vec()),
            VmStart::Restore => None,
        };
        let vm_fd = self
            .kvm
            .create_vm()
            .map_err(|e| HypervisorError::CreateVm(os_error(e)))?;
        Ok(KvmVm::new(
            vm_fd,
            Arc::clone(&self.host),
            config.vcpus,
            boot_cpuid,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_error_not_found_names_device_and_module() {
        let e = open_error(io::Error::from_raw_os_error(libc::ENOENT));
        let text = e.to_string();
        assert!(text.contains("/dev/kvm"), "{text}");
        assert!(text.contains("missing"), "{text}");
    }

    #[test]
    fn open_error_permission_denied_names_group_hint() {
        let e = open_error(io::Error::from_raw_os_error(libc::EACCES));
        let text = e.to_string();
        assert!(text.contains("/dev/kvm"), "{text}");
        assert!(text.contains("permission denied"), "{text}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
