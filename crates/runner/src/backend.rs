//! The one place that picks a hypervisor backend by target: KVM on x86_64 Linux,
//! Hypervisor.framework on Apple silicon macOS. Elsewhere [`open`] says plainly that
//! there is no backend.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    /// The backend for this host.
    pub type DefaultHypervisor = kvm_backend::KvmHypervisor;

    /// Opens the host's hypervisor.
    pub fn open() -> Result<DefaultHypervisor, hypervisor::HypervisorError> {
        kvm_backend::KvmHypervisor::new()
    }
}

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
mod imp {
    use crate::aarch64::layout;

    /// The backend for this host.
    pub type DefaultHypervisor = hvf_backend::HvfHypervisor;

    /// Opens Hypervisor.framework with the GIC where the device tree puts it.
    pub fn open() -> Result<DefaultHypervisor, hypervisor::HypervisorError> {
        Ok(
            hvf_backend::HvfHypervisor::new()?.with_gic_layout(hvf_backend::GicLayout {
                distributor_base: layout::GIC_DIST_BASE,
                redistributor_base: layout::GIC_REDIST_BASE,
                limit: layout::UART_BASE,
            }),
        )
    }

    // The device tree's CPU `reg` values come from `layout::mpidr`; the backend
    // programs MPIDR_EL1 from `psci::mpidr_for_index`. The GIC routes by affinity, so
    // they must agree: checked at compile time for the first two clusters.
    const _: () = {
        let mut i = 0;
        while i < 32 {
            assert!(layout::mpidr(i) == hvf_backend::psci::mpidr_for_index(i));
            i += 1;
        }
    };
}

#[cfg(any(
    all(target_os = "linux", target_arch = "x86_64"),
    all(target_os = "macos", target_arch = "aarch64")
))]
pub use imp::*;

#[cfg(not(any(
    all(target_os = "linux", target_arch = "x86_64"),
    all(target_os = "macos", target_arch = "aarch64")
)))]
mod imp {
    use hypervisor::{
        Arch, BootState, Capabilities, Hypervisor, HypervisorError, HypervisorKind, IrqLine,
        MemoryRegion, Vcpu, VcpuError, VcpuExit, VcpuKicker, VcpuState, Vm, VmConfig, VmError,
        VmState,
    };

    /// Stands in for a backend on hosts that have none (e.g. aarch64 Linux until a
    /// KVM arm64 backend exists), so the runner and the CLI still build and say why
    /// nothing can run. It has no values: every method is unreachable.
    #[derive(Debug)]
    pub enum NoBackend {}

    impl Hypervisor for NoBackend {
        type Vm = NoBackend;
        fn kind(&self) -> HypervisorKind {
            match *self {}
        }
        fn capabilities(&self) -> &Capabilities {
            match *self {}
        }
        fn create_vm(&self, _: &VmConfig) -> Result<NoBackend, HypervisorError> {
            match *self {}
        }
    }

    impl Vm for NoBackend {
        type Vcpu = NoBackend;
        type IrqLine = NoBackend;
        fn arch(&self) -> Arch {
            match *self {}
        }
        unsafe fn map_memory(&self, _: &MemoryRegion) -> Result<(), VmError> {
            match *self {}
        }
        fn unmap_memory(&self, _: &MemoryRegion) -> Result<(), VmError> {
            match *self {}
        }
        fn create_irqchip(&self) -> Result<(), VmError> {
            match *self {}
        }
        fn irq_line(&self, _: u32) -> Result<NoBackend, VmError> {
            match *self {}
        }
        fn create_vcpu(&self, _: u32) -> Result<NoBackend, VmError> {
            match *self {}
        }
        fn save_state(&self) -> Result<VmState, VmError> {
            match *self {}
        }
        fn restore_state(&self, _: &VmState) -> Result<(), VmError> {
            match *self {}
        }
    }

    impl Vcpu for NoBackend {
        type Kicker = NoBackend;
        fn id(&self) -> u32 {
            match *self {}
        }
        fn kicker(&self) -> NoBackend {
            match *self {}
        }
        fn run(&mut self) -> Result<VcpuExit, VcpuError> {
            match *self {}
        }
        fn set_io_result(&mut self, _: &[u8]) -> Result<(), VcpuError> {
            match *self {}
        }
        fn set_boot_state(&mut self, _: &BootState) -> Result<(), VcpuError> {
            match *self {}
        }
        fn save_state(&self) -> Result<VcpuState, VcpuError> {
            match *self {}
        }
        fn restore_state(&mut self, _: &VcpuState) -> Result<(), VcpuError> {
            match *self {}
        }
    }

    impl IrqLine for NoBackend {
        fn trigger(&self) -> Result<(), VmError> {
            match *self {}
        }
        fn set_level(&self, _: bool) -> Result<(), VmError> {
            match *self {}
        }
    }

    impl VcpuKicker for NoBackend {
        fn kick(&self) {
            match *self {}
        }
    }

    /// The backend for this host: none.
    pub type DefaultHypervisor = NoBackend;

    /// Always fails: this host has no supported hypervisor backend.
    pub fn open() -> Result<DefaultHypervisor, HypervisorError> {
        Err(HypervisorError::Unsupported(format!(
            "supermachine has no hypervisor backend for {}-{} yet (KVM on x86_64 Linux and \
             Hypervisor.framework on Apple silicon macOS are supported)",
            std::env::consts::ARCH,
            std::env::consts::OS
        )))
    }
}

#[cfg(not(any(
    all(target_os = "linux", target_arch = "x86_64"),
    all(target_os = "macos", target_arch = "aarch64")
)))]
pub use imp::*;
