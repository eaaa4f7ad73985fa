//! A KVM VM: memory slots, the in-kernel irqchip and PIT, interrupt lines,
//! ioeventfds, vCPU creation and VM-wide state.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use hypervisor::{Arch, IoEvent, IoEventAddress, IrqLine, MemoryRegion, Vm, VmError, VmState};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::os_error;
use super::system::HostInfo;
use super::vcpu::KvmVcpu;
use super::vm_state;

/// Three pages KVM needs for the real-mode TSS on Intel (KVM_SET_TSS_ADDR), in
/// the hole below the 4 GiB boundary that firmware and ACPI keep free of RAM
/// and devices (the IOAPIC is at 0xfec0_0000, the LAPIC at 0xfee0_0000).
pub const TSS_ADDRESS: u64 = 0xfffb_c000;
/// One page for the real-mode identity page table (KVM_SET_IDENTITY_MAP_ADDR),
/// right after the TSS.
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_f000;
/// Inputs of the IOAPIC, the interrupt lines KVM routes by default.
const IOAPIC_PINS: u32 = 24;

/// What a VM and its vCPUs share.
#[derive(Debug)]
pub(crate) struct VmShared {
    pub(crate) fd: VmFd,
    pub(crate) host: Arc<HostInfo>,
    /// Topology size (VmConfig.vcpus).
    pub(crate) vcpus: u32,
    /// The host's supported CPUID a booting vCPU's is derived from; `None` in a
    /// VM created for a restore, whose vCPUs get theirs from the saved state.
    pub(crate) boot_cpuid: Option<Vec<kvm_cpuid_entry2>>,
    pub(crate) irqchip: AtomicBool,
    /// Size in bytes of KVM_GET_XSAVE2's area; 0 when only KVM_GET_XSAVE exists.
    pub(crate) xsave2_size: usize,
    /// The MSR index list filtered to what reads back, found on first save.
    pub(crate) readable_msrs: OnceLock<Vec<u32>>,
    /// The [`KvmVm`] still exists. Interrupt lines and I/O events that outlive it
    /// leave their registrations to the VM's destruction, which releases them all
    /// at once: unregistering an I/O event waits for an SRCU grace period (~5 ms
    /// measured here), which a VM on its way out need not pay.
    pub(crate) owner_alive: AtomicBool,
}

/// A KVM VM. `Send + Sync`: the runner shares it between vCPU threads.
#[derive(Debug)]
pub struct KvmVm {
    shared: Arc<VmShared>,
}

impl KvmVm {
    pub(crate) fn new(
        fd: VmFd,
        host: Arc<HostInfo>,
        vcpus: u32,
        boot_cpuid: Option<Vec<kvm_cpuid_entry2>>,
    ) -> Self {
        let xsave2_size = usize::try_from(fd.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Self {
            shared: Arc::new(VmShared {
                fd,
                host,
                vcpus,
                boot_cpuid,
                irqchip: AtomicBool::new(false),
                xsave2_size,
                readable_msrs: OnceLock::new(),
                owner_alive: AtomicBool::new(true),
            }),
        }
    }

    /// Number of vCPUs the VM was configured with.
    pub fn vcpu_count(&self) -> u32 {
        self.shared.vcpus
    }

    fn has_irqchip(&self) -> bool {
        self.shared.irqchip.load(Ordering::SeqCst)
    }

    fn get_irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, VmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.shared
            .fd
            .get_irqchip(&mut chip)
            .map_err(|e| state_error("save irqchip", e))?;
        Ok(chip)
    }
}

fn ioevent_address(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(a) => kvm_ioctls::IoEventAddress::Pio(a),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

fn ioevent_error(addr: IoEventAddress, source: io::Error) -> VmError {
    VmError::State {
        op: match addr {
            IoEventAddress::Pio(_) => "register port ioeventfd",
            IoEventAddress::Mmio(_) => "register MMIO ioeventfd",
        },
        source,
    }
}

/// KVM_IOEVENTFD with or without a 4-byte datamatch (kvm-ioctls takes the
/// datamatch's size from its type: `u32` is a 4-byte match, `NoDatamatch` any
/// write).
fn ioeventfd_ioctl(
    fd: &VmFd,
    eventfd: &EventFd,
    addr: IoEventAddress,
    datamatch: Option<u32>,
    register: bool,
) -> Result<(), kvm_ioctls::Error> {
    let kvm_addr = ioevent_address(addr);
    match (datamatch, register) {
        (None, true) => fd.register_ioevent(eventfd, &kvm_addr, NoDatamatch),
        (None, false) => fd.unregister_ioevent(eventfd, &kvm_addr, NoDatamatch),
        (Some(value), true) => fd.register_ioevent(eventfd, &kvm_addr, value),
        (Some(value), false) => fd.unregister_ioevent(eventfd, &kvm_addr, value),
    }
}

/// A live KVM_IOEVENTFD registration; dropping it unregisters it. It keeps the
/// VM fd open until then (KVM also drops every ioeventfd with the VM).
#[derive(Debug)]
struct IoeventRegistration {
    vm: Arc<VmShared>,
    eventfd: EventFd,
    addr: IoEventAddress,
    datamatch: Option<u32>,
}

impl Drop for IoeventRegistration {
    fn drop(&mut self) {
        if !self.vm.owner_alive.load(Ordering::SeqCst) {
            return;
        }
        // Nothing useful can be done if this fails: the VM is likely going away,
        // and KVM releases the eventfd with the VM anyway.
        let _ = ioeventfd_ioctl(&self.vm.fd, &self.eventfd, self.addr, self.datamatch, false);
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        self.shared.owner_alive.store(false, Ordering::SeqCst);
    }
}

fn state_error(op: &'static str, e: kvm_ioctls::Error) -> VmError {
    VmError::State {
        op,
        source: os_error(e),
    }
}

fn irqchip_error(e: kvm_ioctls::Error) -> VmError {
    VmError::CreateIrqchip(os_error(e))
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;
    type IrqLine = KvmIrqLine;

    fn arch(&self) -> Arch {
        Arch::X86_64
    }

    unsafe fn map_memory(&self, region: &MemoryRegion) -> Result<(), VmError> {
        let mut flags = 0;
        if region.read_only {
            if !self.shared.fd.check_extension(Cap::ReadonlyMem) {
                return Err(VmError::Unsupported(
                    "read-only memory slots (KVM_CAP_READONLY_MEM)".into(),
                ));
            }
            flags |= KVM_MEM_READONLY;
        }
        let kvm_region = kvm_userspace_memory_region {
            slot: region.slot,
            flags,
            guest_phys_addr: region.guest_addr,
            memory_size: region.size,
            userspace_addr: region.host_addr as u64,
        };
        // SAFETY: the caller guarantees (this fn's contract) that the host range
        // is mapped and stays so until unmapped or the VM is dropped.
        unsafe { self.shared.fd.set_user_memory_region(kvm_region) }.map_err(|e| {
            VmError::MapMemory {
                guest_addr: region.guest_addr,
                size: region.size,
                source: os_error(e),
            }
        })
    }

    fn unmap_memory(&self, region: &MemoryRegion) -> Result<(), VmError> {
        // A zero size deletes the slot (KVM API doc §4.35).
        let kvm_region = kvm_userspace_memory_region {
            slot: region.slot,
            flags: 0,
            guest_phys_addr: region.guest_addr,
            memory_size: 0,
            userspace_addr: region.host_addr as u64,
        };
        // SAFETY: deleting a slot makes KVM stop using the host range; it never
        // gives KVM access to new memory.
        unsafe { self.shared.fd.set_user_memory_region(kvm_region) }.map_err(|e| {
            VmError::MapMemory {
                guest_addr: region.guest_addr,
                size: region.size,
                source: os_error(e),
            }
        })
    }

    fn create_irqchip(&self) -> Result<(), VmError> {
        // Both addresses must be set before the first vCPU exists (KVM API doc
        // §4.40/§4.57); KVM needs them for real mode on Intel without unrestricted
        // guest, and they are harmless elsewhere.
        self.shared
            .fd
            .set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(irqchip_error)?;
        self.shared
            .fd
            .set_tss_address(TSS_ADDRESS as usize)
            .map_err(irqchip_error)?;
        self.shared.fd.create_irq_chip().map_err(irqchip_error)?;
        // A dummy speaker port (0x61) keeps guests that probe it happy.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.shared.fd.create_pit2(pit).map_err(irqchip_error)?;
        self.shared.irqchip.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn irq_line(&self, gsi: u32) -> Result<KvmIrqLine, VmError> {
        let invalid = |msg: &str| VmError::Irq {
            gsi,
            source: io::Error::new(io::ErrorKind::InvalidInput, msg.to_string()),
        };
        if !self.has_irqchip() {
            return Err(invalid(
                "create the irqchip before asking for interrupt lines",
            ));
        }
        if gsi >= IOAPIC_PINS {
            return Err(invalid("the IOAPIC has inputs 0 to 23 only"));
        }
        let eventfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| VmError::Irq { gsi, source: e })?;
        self.shared
            .fd
            .register_irqfd(&eventfd, gsi)
            .map_err(|e| VmError::Irq {
                gsi,
                source: os_error(e),
            })?;
        Ok(KvmIrqLine {
            vm: Arc::clone(&self.shared),
            gsi,
            eventfd,
        })
    }

    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<Option<IoEvent>, VmError> {
        let eventfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| ioevent_error(addr, e))?;
        // KVM finds the registration by the eventfd's file, not the fd number, so
        // the reader can be a duplicate of the fd the registration keeps.
        let reader = eventfd.try_clone().map_err(|e| ioevent_error(addr, e))?;
        ioeventfd_ioctl(&self.shared.fd, &eventfd, addr, datamatch, true)
            .map_err(|e| ioevent_error(addr, os_error(e)))?;
        let registration = IoeventRegistration {
            vm: Arc::clone(&self.shared),
            eventfd,
            addr,
            datamatch,
        };
        // SAFETY: `into_raw_fd` gives up ownership of a valid, open eventfd, so
        // the File becomes its only owner and closes it exactly once.
        let file = unsafe { File::from_raw_fd(reader.into_raw_fd()) };
        Ok(Some(IoEvent::new(file, Box::new(registration))))
    }

    fn create_vcpu(&self, id: u32) -> Result<KvmVcpu, VmError> {
        if id >= self.shared.vcpus {
            return Err(VmError::CreateVcpu {
                id,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the VM was configured with {} vCPUs", self.shared.vcpus),
                ),
            });
        }
        KvmVcpu::new(Arc::clone(&self.shared), id)
    }

    fn save_state(&self) -> Result<VmState, VmError> {
        let clock = self
            .shared
            .fd
            .get_clock()
            .map_err(|e| state_error("save clock", e))?;
        let mut state = hypervisor::x86_64::VmState {
            clock_ns: clock.clock,
            ..Default::default()
        };
        // Without an irqchip there is no PIC/IOAPIC/PIT.
        if self.has_irqchip() {
            let master = self.get_irqchip(KVM_IRQCHIP_PIC_MASTER)?;
            let slave = self.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)?;
            let ioapic = self.get_irqchip(KVM_IRQCHIP_IOAPIC)?;
            let pit = self
                .shared
                .fd
                .get_pit2()
                .map_err(|e| state_error("save PIT", e))?;
            // SAFETY: chip_id selected which union member KVM filled in: PIC
            // for the two PIC chips, IOAPIC for the IOAPIC; all members are plain
            // integer structs valid for any bit pattern.
            let irqchip = unsafe {
                hypervisor::x86_64::IrqchipState {
                    pic_master: vm_state::pic_from_kvm(&master.chip.pic),
                    pic_slave: vm_state::pic_from_kvm(&slave.chip.pic),
                    ioapic: vm_state::ioapic_from_kvm(&ioapic.chip.ioapic),
                    pit: vm_state::pit_from_kvm(&pit),
                }
            };
            state.irqchip = Some(irqchip);
        }
        Ok(VmState::X86_64(Box::new(state)))
    }

    fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let VmState::X86_64(s) = state else {
            return Err(VmError::StateMismatch(
                "an aarch64 VM state cannot be restored into an x86-64 KVM VM".into(),
            ));
        };
        if let Some(chips) = &s.irqchip {
            if !self.has_irqchip() {
                return Err(VmError::StateMismatch(
                    "the state has interrupt controllers but this VM has no irqchip".into(),
                ));
            }
            let mut master = kvm_irqchip {
                chip_id: KVM_IRQCHIP_PIC_MASTER,
                ..Default::default()
            };
            master.chip.pic = vm_state::pic_to_kvm(&chips.pic_master);
            let mut slave = kvm_irqchip {
                chip_id: KVM_IRQCHIP_PIC_SLAVE,
                ..Default::default()
            };
            slave.chip.pic = vm_state::pic_to_kvm(&chips.pic_slave);
            let mut ioapic = kvm_irqchip {
                chip_id: KVM_IRQCHIP_IOAPIC,
                ..Default::default()
            };
            ioapic.chip.ioapic = vm_state::ioapic_to_kvm(&chips.ioapic);
            for chip in [&master, &slave, &ioapic] {
                self.shared
                    .fd
                    .set_irqchip(chip)
                    .map_err(|e| state_error("restore irqchip", e))?;
            }
            self.shared
                .fd
                .set_pit2(&vm_state::pit_to_kvm(&chips.pit))
                .map_err(|e| state_error("restore PIT", e))?;
        }
        let clock = kvm_clock_data {
            clock: s.clock_ns,
            ..Default::default()
        };
        self.shared
            .fd
            .set_clock(&clock)
            .map_err(|e| state_error("restore clock", e))
    }
}

/// An input of the in-kernel IOAPIC/PIC. `trigger` signals an eventfd KVM
/// listens on (irqfd: no system call into KVM on the device thread's hot path
/// beyond one `write`); `set_level` uses KVM_IRQ_LINE. Dropping it unregisters
/// the irqfd.
#[derive(Debug)]
pub struct KvmIrqLine {
    vm: Arc<VmShared>,
    gsi: u32,
    eventfd: EventFd,
}

impl KvmIrqLine {
    /// The interrupt number.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl IrqLine for KvmIrqLine {
    fn trigger(&self) -> Result<(), VmError> {
        self.eventfd.write(1).map_err(|e| VmError::Irq {
            gsi: self.gsi,
            source: e,
        })
    }

    fn set_level(&self, asserted: bool) -> Result<(), VmError> {
        self.vm
            .fd
            .set_irq_line(self.gsi, asserted)
            .map_err(|e| VmError::Irq {
                gsi: self.gsi,
                source: os_error(e),
            })
    }
}

impl Drop for KvmIrqLine {
    fn drop(&mut self) {
        if !self.vm.owner_alive.load(Ordering::SeqCst) {
            return;
        }
        // Nothing useful can be done if this fails: the VM is likely going away.
        let _ = self.vm.fd.unregister_irqfd(&self.eventfd, self.gsi);
    }
}
