//! A KVM vCPU: CPUID and LAPIC setup, the run loop's exit mapping, two-step
//! I/O completion, boot state and full state save/restore.

use std::io;
use std::sync::Arc;

use hypervisor::x86_64::BootState as X86BootState;
use hypervisor::{BootState, IoData, Vcpu, VcpuError, VcpuExit, VcpuState, VmError};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_xsave, CpuId, Msrs, Xsave, KVM_EXIT_IO,
    KVM_EXIT_IO_IN, KVM_MAX_MSR_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, VcpuFd};

use super::convert;
use super::cpuid;
use super::kick::{install_handler, KickState, KvmKicker};
use super::os_error;
use super::vm::VmShared;

/// MSRs a freshly reset CPU has that a boot must set explicitly (KVM keeps
/// whatever a previous user left; Firecracker's boot MSR list is the same set).
mod msr_index {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}
/// IA32_MISC_ENABLE bit 0: fast-string operations (SDM vol. 4 table 2-2).
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: bit 11 enables MTRRs, type 6 = write-back default
/// (SDM vol. 3 §12.11.2.1).
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
/// x87 control word and MXCSR after FNINIT / reset (SDM vol. 1 §8.1.5, §10.2.3).
const FPU_FCW_DEFAULT: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;
/// LAPIC local vector table entries for LINT0 and LINT1 (SDM vol. 3 §11.5.1)
/// and their delivery-mode field.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
/// Size of the legacy `struct kvm_xsave` region.
const KVM_XSAVE_LEGACY_SIZE: usize = std::mem::size_of::<kvm_xsave>();

/// The read exit waiting for `set_io_result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingRead {
    None,
    /// `IN`: the data goes at `offset` into the `kvm_run` mapping.
    Pio {
        offset: usize,
        size: usize,
    },
    /// MMIO read: the data goes into `kvm_run.mmio.data`.
    Mmio {
        size: usize,
    },
}

/// A KVM vCPU. `Send` (KVM allows running it from any thread, one at a time),
/// though the seam does not require it.
#[derive(Debug)]
pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    vm: Arc<VmShared>,
    kick: Arc<KickState>,
    pending: PendingRead,
    /// Size of the `kvm_run` mapping, bounding the I/O data offset.
    run_size: usize,
    /// The CPUID given to KVM (saved with the state); empty in a vCPU created
    /// for a restore until its state is restored.
    cpuid: Vec<kvm_cpuid_entry2>,
}

fn create_error(id: u32, source: io::Error) -> VmError {
    VmError::CreateVcpu { id, source }
}

impl KvmVcpu {
    pub(crate) fn new(vm: Arc<VmShared>, id: u32) -> Result<Self, VmError> {
        install_handler().map_err(|e| create_error(id, e))?;
        let mut fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| create_error(id, os_error(e)))?;

        // A booting vCPU gets the host's CPU model now; a restored one gets the
        // saved model with its state.
        let mut entries = Vec::new();
        if let Some(supported) = &vm.boot_cpuid {
            entries = supported.clone();
            cpuid::normalize(&mut entries, id, vm.vcpus);
            set_cpuid(&fd, &entries).map_err(|e| create_error(id, e))?;
        }

        if vm.irqchip.load(std::sync::atomic::Ordering::SeqCst) {
            // The PIC's output reaches the boot CPU through LINT0 as ExtINT and
            // LINT1 carries NMIs, as the MP spec's virtual-wire mode wires them
            // (MP spec 1.4 §3.6.2.2); Linux expects this from firmware.
            let mut lapic = fd.get_lapic().map_err(|e| create_error(id, os_error(e)))?;
            for (reg, mode) in [
                (APIC_LVT_LINT0, APIC_MODE_EXTINT),
                (APIC_LVT_LINT1, APIC_MODE_NMI),
            ] {
                let value = convert::lapic_reg(&lapic, reg);
                convert::set_lapic_reg(
                    &mut lapic,
                    reg,
                    (value & !APIC_DELIVERY_MODE_MASK) | (mode << 8),
                );
            }
            fd.set_lapic(&lapic)
                .map_err(|e| create_error(id, os_error(e)))?;
        }

        let run_size = vm.fd.run_size();
        let immediate_exit = &mut fd.get_kvm_run().immediate_exit as *mut u8;
        Ok(Self {
            id,
            fd,
            vm,
            kick: KickState::new(immediate_exit),
            pending: PendingRead::None,
            run_size,
            cpuid: entries,
        })
    }

    fn immediate_exit_ptr(&mut self) -> *mut u8 {
        &mut self.fd.get_kvm_run().immediate_exit as *mut u8
    }

    fn reg_error(&self, op: &'static str, e: kvm_ioctls::Error) -> VcpuError {
        VcpuError::Registers {
            id: self.id,
            op,
            source: os_error(e),
        }
    }

    fn has_irqchip(&self) -> bool {
        self.vm.irqchip.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Maps a KVM_EXIT_IO: reads `kvm_run.io` and, for an `OUT`, copies the data.
    fn io_exit(&mut self) -> VcpuExit {
        let run_size = self.run_size;
        let run = self.fd.get_kvm_run();
        // SAFETY: the caller saw exit_reason == KVM_EXIT_IO, so KVM filled `io`.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let Ok(offset) = usize::try_from(io.data_offset) else {
            return unhandled_io(io.port, "data offset out of range");
        };
        if io.count != 1 {
            return VcpuExit::Unhandled {
                reason: format!(
                    "string port I/O ({} x {} bytes at port {:#x}) is not supported",
                    io.count, io.size, io.port
                ),
            };
        }
        if !matches!(size, 1 | 2 | 4) || offset.saturating_add(size) > run_size {
            return unhandled_io(io.port, "bad size or data offset from KVM");
        }
        if u32::from(io.direction) == KVM_EXIT_IO_IN {
            self.pending = PendingRead::Pio { offset, size };
            VcpuExit::IoIn {
                port: io.port,
                size: io.size,
            }
        } else {
            let base = run as *mut kvm_bindings::kvm_run as *const u8;
            // SAFETY: `offset + size` lies inside the `run_size`-byte kvm_run
            // mapping (checked above) and KVM wrote the OUT data there.
            let data = unsafe { std::slice::from_raw_parts(base.add(offset), size) };
            VcpuExit::IoOut {
                port: io.port,
                data: IoData::new(data),
            }
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR from `kvm_run.internal`.
    fn internal_error(&mut self) -> VcpuExit {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so KVM filled
        // `internal`; it is plain integers.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        VcpuExit::Unhandled {
            reason: format!(
                "KVM internal error, suberror {} (1 = emulation failure, 2 = exception \
                 during exception delivery, 3 = event delivery, 4 = unexpected exit), \
                 data {:x?}",
                internal.suberror,
                &internal.data[..n]
            ),
        }
    }

    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut out = Vec::with_capacity(indices.len());
        for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
            let mut msrs = msr_list(chunk).map_err(|e| self.msr_error("get MSRs", e))?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| self.reg_error("get MSRs", e))?;
            if n != chunk.len() {
                return Err(VcpuError::Registers {
                    id: self.id,
                    op: "get MSRs",
                    source: io::Error::other(format!("MSR {:#x} cannot be read", chunk[n])),
                });
            }
            out.extend_from_slice(msrs.as_slice());
        }
        Ok(out)
    }

    fn write_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| self.msr_error("set MSRs", e))?;
            let n = self
                .fd
                .set_msrs(&msrs)
                .map_err(|e| self.reg_error("set MSRs", e))?;
            if n != chunk.len() {
                return Err(VcpuError::Registers {
                    id: self.id,
                    op: "set MSRs",
                    source: io::Error::other(format!(
                        "KVM refused MSR {:#x} = {:#x}",
                        chunk[n].index, chunk[n].data
                    )),
                });
            }
        }
        Ok(())
    }

    fn msr_error(&self, op: &'static str, e: vmm_sys_util::fam::Error) -> VcpuError {
        VcpuError::Registers {
            id: self.id,
            op,
            source: io::Error::other(format!("{e:?}")),
        }
    }

    /// The host's MSR index list filtered to what this vCPU can read, found
    /// once per VM: KVM_GET_MSRS stops at the first MSR it cannot read and
    /// returns how many it read, so the failing index is skipped and the rest
    /// retried.
    fn readable_msrs(&self) -> Result<&[u32], VcpuError> {
        if let Some(list) = self.vm.readable_msrs.get() {
            return Ok(list);
        }
        let all = &self.vm.host.msr_index_list;
        let mut readable = Vec::with_capacity(all.len());
        let mut rest: &[u32] = all;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let mut msrs = msr_list(chunk).map_err(|e| self.msr_error("probe MSRs", e))?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| self.reg_error("probe MSRs", e))?;
            readable.extend_from_slice(&chunk[..n]);
            // Skip the MSR that failed (if any) and go on after it.
            rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
        }
        Ok(self.vm.readable_msrs.get_or_init(|| readable))
    }

    fn save_xsave(&self) -> Result<Vec<u8>, VcpuError> {
        let size = self.vm.xsave2_size;
        if size > KVM_XSAVE_LEGACY_SIZE {
            let mut xsave = xsave2_buffer(size).map_err(|e| self.msr_error("get xsave2", e))?;
            // SAFETY: `xsave` was allocated for `size` bytes, the size
            // KVM_CAP_XSAVE2 says KVM_GET_XSAVE2 writes.
            unsafe { self.fd.get_xsave2(&mut xsave) }
                .map_err(|e| self.reg_error("get xsave2", e))?;
            let fam = xsave.as_fam_struct_ref();
            let mut bytes = convert::xsave_words_to_bytes(&fam.xsave.region);
            bytes.extend(convert::xsave_words_to_bytes(xsave.as_slice()));
            bytes.truncate(size);
            Ok(bytes)
        } else {
            let xsave = self
                .fd
                .get_xsave()
                .map_err(|e| self.reg_error("get xsave", e))?;
            Ok(convert::xsave_words_to_bytes(&xsave.region))
        }
    }

    fn restore_xsave(&self, bytes: &[u8]) -> Result<(), VcpuError> {
        let size = self.vm.xsave2_size.max(KVM_XSAVE_LEGACY_SIZE);
        if bytes.len() > size && bytes[size..].iter().any(|&b| b != 0) {
            return Err(VcpuError::StateMismatch(format!(
                "the XSAVE area has {} bytes but this host's KVM uses {size}",
                bytes.len()
            )));
        }
        if size > KVM_XSAVE_LEGACY_SIZE {
            let mut xsave = xsave2_buffer(size).map_err(|e| self.msr_error("set xsave2", e))?;
            let (legacy, extra) = bytes.split_at(bytes.len().min(KVM_XSAVE_LEGACY_SIZE));
            // SAFETY: writing plain integers into the buffer's own region; the
            // FAM length field is left as allocated.
            convert::xsave_bytes_to_words(legacy, unsafe {
                &mut xsave.as_mut_fam_struct().xsave.region
            });
            convert::xsave_bytes_to_words(extra, xsave.as_mut_slice());
            // SAFETY: the buffer holds `size` bytes, the size KVM reads for
            // KVM_SET_XSAVE when KVM_CAP_XSAVE2 reports it.
            unsafe { self.fd.set_xsave2(&xsave) }.map_err(|e| self.reg_error("set xsave2", e))
        } else {
            let mut xsave = kvm_xsave::default();
            convert::xsave_bytes_to_words(bytes, &mut xsave.region);
            // SAFETY: without a larger KVM_CAP_XSAVE2 size KVM reads exactly
            // sizeof(struct kvm_xsave) for KVM_SET_XSAVE.
            unsafe { self.fd.set_xsave(&xsave) }.map_err(|e| self.reg_error("set xsave", e))
        }
    }
}

fn unhandled_io(port: u16, what: &str) -> VcpuExit {
    VcpuExit::Unhandled {
        reason: format!("port I/O at {port:#x}: {what}"),
    }
}

fn msr_list(indices: &[u32]) -> Result<Msrs, vmm_sys_util::fam::Error> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries)
}

/// A KVM_GET/SET_XSAVE2 buffer of `size` bytes (the FAM counts u32 words after
/// the 4 KiB legacy region).
fn xsave2_buffer(size: usize) -> Result<Xsave, vmm_sys_util::fam::Error> {
    let words = size.saturating_sub(KVM_XSAVE_LEGACY_SIZE).div_ceil(4);
    Xsave::new(words)
}

/// The boot MSR values (see [`msr_index`]).
fn boot_msrs() -> [kvm_msr_entry; 11] {
    use msr_index::*;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    [
        entry(IA32_SYSENTER_CS, 0),
        entry(IA32_SYSENTER_ESP, 0),
        entry(IA32_SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(CSTAR, 0),
        entry(KERNEL_GS_BASE, 0),
        entry(SYSCALL_MASK, 0),
        entry(LSTAR, 0),
        entry(IA32_TSC, 0),
        entry(IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

impl Vcpu for KvmVcpu {
    type Kicker = KvmKicker;

    fn id(&self) -> u32 {
        self.id
    }

    fn kicker(&self) -> KvmKicker {
        KvmKicker {
            state: Arc::clone(&self.kick),
        }
    }

    fn run(&mut self) -> Result<VcpuExit, VcpuError> {
        self.pending = PendingRead::None;
        self.kick.attach_current_thread();
        let immediate_exit = self.immediate_exit_ptr();
        if self.kick.take_pending(immediate_exit) {
            return Ok(VcpuExit::Interrupted);
        }
        // First pass: map what needs no further access to kvm_run while the
        // exit borrows it; IO and internal errors are read afterwards.
        enum Next {
            Done(VcpuExit),
            Io,
            Internal,
        }
        let next = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.kick.take_pending(immediate_exit);
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => {
                return Err(VcpuError::Run {
                    id: self.id,
                    source: os_error(e),
                })
            }
            Ok(exit) => match exit {
                kvm_ioctls::VcpuExit::IoIn(..) | kvm_ioctls::VcpuExit::IoOut(..) => Next::Io,
                kvm_ioctls::VcpuExit::MmioRead(addr, data) => {
                    let size = data.len();
                    if matches!(size, 1 | 2 | 4 | 8) {
                        self.pending = PendingRead::Mmio { size };
                        Next::Done(VcpuExit::MmioRead {
                            addr,
                            size: size as u8,
                        })
                    } else {
                        Next::Done(VcpuExit::Unhandled {
                            reason: format!("MMIO read of {size} bytes at {addr:#x}"),
                        })
                    }
                }
                kvm_ioctls::VcpuExit::MmioWrite(addr, data) => Next::Done(VcpuExit::MmioWrite {
                    addr,
                    data: IoData::new(data),
                }),
                kvm_ioctls::VcpuExit::Hlt => Next::Done(VcpuExit::Halted),
                // A triple fault: what firmware and QEMU turn into a reset.
                kvm_ioctls::VcpuExit::Shutdown => Next::Done(VcpuExit::Reset),
                kvm_ioctls::VcpuExit::SystemEvent(kind, _) => Next::Done(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::Shutdown,
                    KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
                    KVM_SYSTEM_EVENT_CRASH => VcpuExit::Unhandled {
                        reason: "the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".into(),
                    },
                    other => VcpuExit::Unhandled {
                        reason: format!("KVM system event {other}"),
                    },
                }),
                kvm_ioctls::VcpuExit::FailEntry(reason, cpu) => Next::Done(VcpuExit::Unhandled {
                    reason: format!(
                        "KVM could not enter the guest: hardware entry failure reason \
                         {reason:#x} on host CPU {cpu}"
                    ),
                }),
                kvm_ioctls::VcpuExit::InternalError => Next::Internal,
                kvm_ioctls::VcpuExit::Intr => Next::Done(VcpuExit::Interrupted),
                other => Next::Done(VcpuExit::Unhandled {
                    reason: format!("unexpected KVM exit {other:?}"),
                }),
            },
        };
        Ok(match next {
            Next::Done(exit) => exit,
            Next::Io => {
                debug_assert_eq!(self.fd.get_kvm_run().exit_reason, KVM_EXIT_IO);
                self.io_exit()
            }
            Next::Internal => self.internal_error(),
        })
    }

    fn set_io_result(&mut self, data: &[u8]) -> Result<(), VcpuError> {
        let no_pending = VcpuError::NoPendingIo {
            id: self.id,
            len: data.len(),
        };
        match self.pending {
            PendingRead::Pio { offset, size } if size == data.len() => {
                let base = self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run as *mut u8;
                // SAFETY: `offset + size` was checked against the kvm_run mapping
                // size when the exit was taken; `data` is `size` bytes and does not
                // overlap the mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(offset), size);
                }
            }
            PendingRead::Mmio { size } if size == data.len() => {
                let run = self.fd.get_kvm_run();
                // SAFETY: the pending exit was KVM_EXIT_MMIO, whose `mmio` member
                // KVM reads back on the next KVM_RUN; `size` <= 8 = data.len().
                unsafe { run.__bindgen_anon_1.mmio.data[..size].copy_from_slice(data) };
            }
            _ => return Err(no_pending),
        }
        self.pending = PendingRead::None;
        Ok(())
    }

    fn set_boot_state(&mut self, state: &BootState) -> Result<(), VcpuError> {
        let BootState::X86_64(X86BootState { regs, sregs }) = state else {
            return Err(VcpuError::StateMismatch(
                "an aarch64 boot state cannot be loaded into an x86-64 vCPU".into(),
            ));
        };
        if self.cpuid.is_empty() {
            return Err(VcpuError::StateMismatch(
                "this vCPU was created for a restore and has no CPU model to boot with".into(),
            ));
        }
        let base = self
            .fd
            .get_sregs()
            .map_err(|e| self.reg_error("get sregs", e))?;
        let mut kvm_sregs = convert::sregs_to_kvm(sregs);
        if sregs.apic_base == 0 {
            // Not given: keep KVM's reset value (0xfee00000, enabled, BSP flag
            // on vCPU 0).
            kvm_sregs.apic_base = base.apic_base;
        }
        self.fd
            .set_sregs(&kvm_sregs)
            .map_err(|e| self.reg_error("set sregs", e))?;
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(|e| self.reg_error("set regs", e))?;
        let fpu = kvm_fpu {
            fcw: FPU_FCW_DEFAULT,
            mxcsr: MXCSR_DEFAULT,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| self.reg_error("set fpu", e))?;
        self.write_msrs(&boot_msrs())?;
        self.fd
            .set_mp_state(convert::mp_state_to_kvm(
                hypervisor::x86_64::MpState::Runnable,
            ))
            .map_err(|e| self.reg_error("set mp state", e))?;
        self.pending = PendingRead::None;
        Ok(())
    }

    fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let regs = self
            .fd
            .get_regs()
            .map_err(|e| self.reg_error("get regs", e))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| self.reg_error("get sregs", e))?;
        let xsave = self.save_xsave()?;
        let xcrs = if self.vm.fd.check_extension(Cap::Xcrs) {
            convert::xcrs_from_kvm(
                &self
                    .fd
                    .get_xcrs()
                    .map_err(|e| self.reg_error("get xcrs", e))?,
            )
        } else {
            Default::default()
        };
        let indices = self.readable_msrs()?;
        let msrs = self
            .read_msrs(indices)?
            .into_iter()
            .map(|e| (e.index, e.data))
            .collect();
        let debug_regs = convert::debug_regs_from_kvm(
            &self
                .fd
                .get_debug_regs()
                .map_err(|e| self.reg_error("get debug regs", e))?,
        );
        let lapic = if self.has_irqchip() {
            convert::lapic_from_kvm(
                &self
                    .fd
                    .get_lapic()
                    .map_err(|e| self.reg_error("get lapic", e))?,
            )
        } else {
            Vec::new()
        };
        let kvm_mp = self
            .fd
            .get_mp_state()
            .map_err(|e| self.reg_error("get mp state", e))?;
        let mp_state = convert::mp_state_from_kvm(kvm_mp)
            .ok_or_else(|| VcpuError::Unsupported(format!("vCPU run state {}", kvm_mp.mp_state)))?;
        let events = convert::events_from_kvm(
            &self
                .fd
                .get_vcpu_events()
                .map_err(|e| self.reg_error("get vcpu events", e))?,
        );
        let tsc_khz = self.fd.get_tsc_khz().ok();
        Ok(VcpuState::X86_64(Box::new(hypervisor::x86_64::VcpuState {
            cpuid: self.cpuid.iter().map(convert::cpuid_from_kvm).collect(),
            regs: convert::regs_from_kvm(&regs),
            sregs: convert::sregs_from_kvm(&sregs),
            xsave,
            xcrs,
            msrs,
            debug_regs,
            lapic,
            mp_state,
            events,
            tsc_khz,
        })))
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        let VcpuState::X86_64(s) = state else {
            return Err(VcpuError::StateMismatch(
                "an aarch64 vCPU state cannot be restored into an x86-64 vCPU".into(),
            ));
        };
        if !s.lapic.is_empty() && !self.has_irqchip() {
            return Err(VcpuError::StateMismatch(
                "the state has a local APIC but this VM has no irqchip".into(),
            ));
        }
        // The CPU model first: KVM accepts or refuses MSRs (and XSAVE
        // components) by what CPUID says the CPU has.
        if s.cpuid.is_empty() {
            return Err(VcpuError::StateMismatch(
                "the saved vCPU state has no CPUID".into(),
            ));
        }
        // A vCPU that has the model already keeps it: KVM refuses KVM_SET_CPUID2
        // on a vCPU that has run unless the entries match what it holds, and
        // it holds them with its runtime bits (OSXSAVE, APIC) updated.
        let current = self.cpuid.iter().map(convert::cpuid_from_kvm);
        if !current.eq(s.cpuid.iter().copied()) {
            let cpuid: Vec<kvm_cpuid_entry2> = s.cpuid.iter().map(convert::cpuid_to_kvm).collect();
            set_cpuid(&self.fd, &cpuid).map_err(|source| VcpuError::Registers {
                id: self.id,
                op: "set cpuid (a vCPU that has run keeps its CPU model)",
                source,
            })?;
            self.cpuid = cpuid;
        }
        // The TSC frequency next: it scales the TSC MSR restored below.
        if let Some(khz) = s.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz)
                && self.vm.fd.check_extension(Cap::TscControl)
            {
                self.fd
                    .set_tsc_khz(khz)
                    .map_err(|e| self.reg_error("set tsc khz", e))?;
            }
        }
        // Order as Firecracker's restore: run state, registers, FPU/XSAVE, then
        // the LAPIC before MSRs (TSC_DEADLINE needs the LAPIC), events last.
        self.fd
            .set_mp_state(convert::mp_state_to_kvm(s.mp_state))
            .map_err(|e| self.reg_error("set mp state", e))?;
        self.fd
            .set_regs(&convert::regs_to_kvm(&s.regs))
            .map_err(|e| self.reg_error("set regs", e))?;
        self.fd
            .set_sregs(&convert::sregs_to_kvm(&s.sregs))
            .map_err(|e| self.reg_error("set sregs", e))?;
        self.restore_xsave(&s.xsave)?;
        if !s.xcrs.is_empty() {
            let xcrs = convert::xcrs_to_kvm(&s.xcrs).ok_or_else(|| {
                VcpuError::StateMismatch(format!("{} XCRs is more than KVM takes", s.xcrs.len()))
            })?;
            self.fd
                .set_xcrs(&xcrs)
                .map_err(|e| self.reg_error("set xcrs", e))?;
        }
        self.fd
            .set_debug_regs(&convert::debug_regs_to_kvm(&s.debug_regs))
            .map_err(|e| self.reg_error("set debug regs", e))?;
        if !s.lapic.is_empty() {
            let lapic = convert::lapic_to_kvm(&s.lapic).ok_or_else(|| {
                VcpuError::StateMismatch(format!(
                    "the LAPIC page is {} bytes, expected {}",
                    s.lapic.len(),
                    convert::LAPIC_SIZE
                ))
            })?;
            self.fd
                .set_lapic(&lapic)
                .map_err(|e| self.reg_error("set lapic", e))?;
        }
        let msrs: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|(&index, &data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        self.write_msrs(&msrs)?;
        self.fd
            .set_vcpu_events(&convert::events_to_kvm(&s.events))
            .map_err(|e| self.reg_error("set vcpu events", e))?;
        self.pending = PendingRead::None;
        Ok(())
    }
}

/// Gives `fd` the CPU model `entries` (KVM_SET_CPUID2). KVM refuses a change
/// once the vCPU has run, so this happens before its first KVM_RUN.
fn set_cpuid(fd: &VcpuFd, entries: &[kvm_cpuid_entry2]) -> io::Result<()> {
    let cpuid = CpuId::from_entries(entries).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} CPUID entries is more than KVM takes: {e:?}",
                entries.len()
            ),
        )
    })?;
    fd.set_cpuid2(&cpuid).map_err(os_error)
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Kickers that outlive us must stop touching kvm_run before `fd`
        // (dropped after this) unmaps it.
        self.kick.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_have_fast_strings_and_writeback_mtrr() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|e| e.index == i).unwrap().data;
        assert_eq!(get(msr_index::IA32_MISC_ENABLE), 1);
        assert_eq!(get(msr_index::MTRR_DEF_TYPE), 0x806);
        assert_eq!(get(msr_index::LSTAR), 0);
        assert_eq!(get(msr_index::IA32_TSC), 0);
    }

    #[test]
    fn xsave2_buffer_counts_words_after_legacy_region() {
        assert_eq!(xsave2_buffer(4096).unwrap().as_slice().len(), 0);
        assert_eq!(xsave2_buffer(4096 + 5).unwrap().as_slice().len(), 2);
        assert_eq!(
            xsave2_buffer(11008).unwrap().as_slice().len(),
            (11008 - 4096) / 4
        );
    }
}
