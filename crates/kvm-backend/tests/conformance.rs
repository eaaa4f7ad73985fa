//! Backend conformance: tiny hand-assembled real-mode guests run directly on
//! `/dev/kvm`, each proving one behaviour of the seam. Without a usable
//! `/dev/kvm` (it cannot be opened) each test prints why and returns.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use hypervisor::x86_64::{BootState as X86BootState, DescriptorTable, Regs, Segment, Sregs};
use hypervisor::{
    BootState, Hypervisor, HypervisorError, IoEventAddress, IrqLine, MemoryRegion, Vcpu, VcpuError,
    VcpuExit, VcpuKicker, VcpuState, Vm, VmConfig, VmStart, VmState,
};
use kvm_backend::{KvmHypervisor, KvmVcpu, KvmVm};

/// Guest RAM: 0 .. 64 KiB. Code is loaded at CODE_ADDR; MMIO_ADDR is outside RAM.
const MEM_SIZE: usize = 0x1_0000;
const CODE_ADDR: u64 = 0x1000;
const MMIO_ADDR: u64 = 0x2_0000;

/// Anonymous host memory backing guest RAM.
struct GuestMem {
    ptr: *mut u8,
    len: usize,
}

impl GuestMem {
    fn new(len: usize) -> Self {
        // SAFETY: anonymous private mapping, no file; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        let addr = addr as usize;
        assert!(addr + bytes.len() <= self.len);
        // SAFETY: in bounds (checked) of our own mapping.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(addr), bytes.len()) };
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM with guest RAM and vCPUs. Field order matters: vCPUs and the VM are
/// dropped before the memory they use.
struct TestVm {
    vcpus: Vec<KvmVcpu>,
    vm: KvmVm,
    /// Kept alive until the VM is gone.
    _mem: GuestMem,
}

/// Opens /dev/kvm, or prints why the test is skipped. Only an open failure
/// skips; any other error fails the test.
fn hypervisor() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(h) => Some(h),
        Err(e @ HypervisorError::Open { .. }) => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("KVM is present but unusable: {e}"),
    }
}

fn real_mode_segment(type_: u8, s: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff,
        selector: 0,
        type_,
        present: true,
        s,
        ..Default::default()
    }
}

/// Real mode, CS:IP = 0:CODE_ADDR, all segments based at 0.
fn real_mode_boot() -> BootState {
    let data = real_mode_segment(3, true);
    BootState::X86_64(X86BootState {
        regs: Regs {
            rip: CODE_ADDR,
            rflags: 0x2,
            ..Default::default()
        },
        sregs: Sregs {
            cs: real_mode_segment(0xb, true),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: real_mode_segment(0xb, false),
            ldt: real_mode_segment(0x2, false),
            gdt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idt: DescriptorTable {
                base: 0,
                limit: 0x3ff,
            },
            cr0: 0x6000_0010,
            ..Default::default()
        },
    })
}

fn setup(code: &[u8], vcpus: u32, irqchip: bool) -> Option<TestVm> {
    setup_for(code, vcpus, irqchip, VmStart::Boot)
}

/// A VM whose vCPUs boot (each gets the real-mode boot state) or wait for a
/// restored state.
fn setup_for(code: &[u8], vcpus: u32, irqchip: bool, start: VmStart) -> Option<TestVm> {
    let hv = hypervisor()?;
    let vm = hv.create_vm(&VmConfig { vcpus, start }).unwrap();
    let mem = GuestMem::new(MEM_SIZE);
    mem.write(CODE_ADDR, code);
    let region = MemoryRegion {
        slot: 0,
        guest_addr: 0,
        size: MEM_SIZE as u64,
        host_addr: mem.ptr as usize,
        read_only: false,
    };
    // SAFETY: `mem` lives in the returned TestVm and is dropped after the VM.
    unsafe { vm.map_memory(&region) }.unwrap();
    if irqchip {
        vm.create_irqchip().unwrap();
    }
    let mut cpus = Vec::new();
    for id in 0..vcpus {
        let mut vcpu = vm.create_vcpu(id).unwrap();
        if start == VmStart::Boot {
            vcpu.set_boot_state(&real_mode_boot()).unwrap();
        }
        cpus.push(vcpu);
    }
    Some(TestVm {
        vcpus: cpus,
        vm,
        _mem: mem,
    })
}

/// Runs until an exit other than `Interrupted`.
fn run(vcpu: &mut KvmVcpu) -> VcpuExit {
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::Interrupted => continue,
            exit => return exit,
        }
    }
}

#[test]
fn pio_out_reaches_host_with_port_and_byte() {
    // mov dx, 0x3f8 ; mov al, 0x42 ; out dx, al ; hlt
    let code = [0xba, 0xf8, 0x03, 0xb0, 0x42, 0xee, 0xf4];
    let Some(mut t) = setup(&code, 1, false) else {
        return;
    };
    match run(&mut t.vcpus[0]) {
        VcpuExit::IoOut { port, data } => {
            assert_eq!(port, 0x3f8);
            assert_eq!(data.as_slice(), &[0x42]);
        }
        other => panic!("expected IoOut, got {other:?}"),
    }
    assert_eq!(run(&mut t.vcpus[0]), VcpuExit::Halted);
}

#[test]
fn pio_in_gets_host_byte_and_guest_echoes_it() {
    // mov dx, 0x10 ; in al, dx ; mov dx, 0x11 ; out dx, al ; hlt
    let code = [0xba, 0x10, 0x00, 0xec, 0xba, 0x11, 0x00, 0xee, 0xf4];
    let Some(mut t) = setup(&code, 1, false) else {
        return;
    };
    let vcpu = &mut t.vcpus[0];
    assert_eq!(
        run(vcpu),
        VcpuExit::IoIn {
            port: 0x10,
            size: 1
        }
    );
    // Wrong size is refused and leaves the read pending.
    assert!(matches!(
        vcpu.set_io_result(&[1, 2]),
        Err(VcpuError::NoPendingIo { len: 2, .. })
    ));
    vcpu.set_io_result(&[0xa5]).unwrap();
    match run(vcpu) {
        VcpuExit::IoOut { port, data } => {
            assert_eq!(port, 0x11);
            assert_eq!(data.as_slice(), &[0xa5]);
        }
        other => panic!("expected IoOut, got {other:?}"),
    }
    // Nothing pending after a write exit.
    assert!(matches!(
        vcpu.set_io_result(&[0]),
        Err(VcpuError::NoPendingIo { .. })
    ));
}

#[test]
fn string_pio_with_count_is_unhandled() {
    // mov dx, 0x10 ; mov cx, 2 ; mov si, 0x1800 ; rep outsb ; hlt
    let code = [
        0xba, 0x10, 0x00, 0xb9, 0x02, 0x00, 0xbe, 0x00, 0x18, 0xf3, 0x6e, 0xf4,
    ];
    let Some(mut t) = setup(&code, 1, false) else {
        return;
    };
    match run(&mut t.vcpus[0]) {
        VcpuExit::Unhandled { reason } => assert!(reason.contains("string"), "{reason}"),
        // PVM's instruction emulator runs `rep outsb` one element per exit
        // (count 1), which is a correct single-byte OUT.
        VcpuExit::IoOut { port, data } => {
            assert_eq!(port, 0x10);
            assert_eq!(data.as_slice().len(), 1);
        }
        other => panic!("expected Unhandled, got {other:?}"),
    }
}

#[test]
fn mmio_write_reports_address_size_and_data() {
    // mov ax, 0x2000 ; mov ds, ax ; mov word [0x0010], 0x1234 ; hlt
    let code = [
        0xb8, 0x00, 0x20, 0x8e, 0xd8, 0xc7, 0x06, 0x10, 0x00, 0x34, 0x12, 0xf4,
    ];
    let Some(mut t) = setup(&code, 1, false) else {
        return;
    };
    match run(&mut t.vcpus[0]) {
        VcpuExit::MmioWrite { addr, data } => {
            assert_eq!(addr, MMIO_ADDR + 0x10);
            assert_eq!(data.as_slice(), &[0x34, 0x12]);
        }
        other => panic!("expected MmioWrite, got {other:?}"),
    }
    assert_eq!(run(&mut t.vcpus[0]), VcpuExit::Halted);
}

#[test]
fn mmio_read_answered_by_host_is_echoed_by_guest() {
    // mov ax, 0x2000 ; mov ds, ax ; mov ax, [0x0020] ; mov dx, 0x12 ; out dx, ax ; hlt
    let code = [
        0xb8, 0x00, 0x20, 0x8e, 0xd8, 0xa1, 0x20, 0x00, 0xba, 0x12, 0x00, 0xef, 0xf4,
    ];
    let Some(mut t) = setup(&code, 1, false) else {
        return;
    };
    let vcpu = &mut t.vcpus[0];
    assert_eq!(
        run(vcpu),
        VcpuExit::MmioRead {
            addr: MMIO_ADDR + 0x20,
            size: 2
        }
    );
    vcpu.set_io_result(&[0xef, 0xbe]).unwrap();
    match run(vcpu) {
        VcpuExit::IoOut { port, data } => {
            assert_eq!(port, 0x12);
            assert_eq!(data.as_u64(), 0xbeef);
        }
        other => panic!("expected IoOut, got {other:?}"),
    }
}

#[test]
fn ioevent_matching_write_signals_without_exit_and_drop_unregisters() {
    // mov ax, 0x2000 ; mov ds, ax
    // mov dword [0x50], 1 ; mov dword [0x50], 2 ; mov dword [0x50], 1 ; hlt
    let mut code = vec![0xb8, 0x00, 0x20, 0x8e, 0xd8];
    for value in [1u32, 2, 1] {
        code.extend_from_slice(&[0x66, 0xc7, 0x06, 0x50, 0x00]);
        code.extend_from_slice(&value.to_le_bytes());
    }
    code.push(0xf4);
    let Some(mut t) = setup(&code, 1, false) else {
        return;
    };
    let notify = MMIO_ADDR + 0x50;
    let event =
        t.vm.register_ioevent(IoEventAddress::Mmio(notify), Some(1))
            .unwrap()
            .expect("KVM has ioeventfd");
    assert_eq!(event.drain().unwrap(), 0, "signalled before the guest ran");
    // The first write (1) matches: KVM signals the event and the guest goes on,
    // so the first exit is the second write (2), which does not match.
    match run(&mut t.vcpus[0]) {
        VcpuExit::MmioWrite { addr, data } => {
            assert_eq!(addr, notify);
            assert_eq!(data.as_slice(), &2u32.to_le_bytes());
        }
        other => panic!("expected the non-matching MmioWrite, got {other:?}"),
    }
    assert_eq!(event.drain().unwrap(), 1);
    // Unregistered: the third write (1 again) exits like any MMIO write.
    drop(event);
    match run(&mut t.vcpus[0]) {
        VcpuExit::MmioWrite { addr, data } => {
            assert_eq!(addr, notify);
            assert_eq!(data.as_slice(), &1u32.to_le_bytes());
        }
        other => panic!("expected MmioWrite after unregistering, got {other:?}"),
    }
    assert_eq!(run(&mut t.vcpus[0]), VcpuExit::Halted);
}

#[test]
fn ioevent_datamatch_needs_four_byte_write() {
    // mov ax, 0x2000 ; mov ds, ax ; mov word [0x50], 1 ; hlt
    let code = [
        0xb8, 0x00, 0x20, 0x8e, 0xd8, 0xc7, 0x06, 0x50, 0x00, 0x01, 0x00, 0xf4,
    ];
    let Some(mut t) = setup(&code, 1, false) else {
        return;
    };
    let event =
        t.vm.register_ioevent(IoEventAddress::Mmio(MMIO_ADDR + 0x50), Some(1))
            .unwrap()
            .expect("KVM has ioeventfd");
    match run(&mut t.vcpus[0]) {
        VcpuExit::MmioWrite { addr, data } => {
            assert_eq!(addr, MMIO_ADDR + 0x50);
            assert_eq!(data.as_slice(), &[1, 0]);
        }
        other => panic!("expected MmioWrite for a 2-byte write, got {other:?}"),
    }
    assert_eq!(event.drain().unwrap(), 0);
}

#[test]
fn hlt_without_irqchip_is_halted() {
    let Some(mut t) = setup(&[0xf4], 1, false) else {
        return;
    };
    assert_eq!(run(&mut t.vcpus[0]), VcpuExit::Halted);
}

#[test]
fn triple_fault_is_reset() {
    // 32-bit protected mode, flat segments, IDT limit 0 (set through the boot
    // state): `ud2` raises #UD, whose delivery faults (#GP), then #DF, then the
    // CPU shuts down. Real mode is not used here: on PVM hosts exception
    // delivery in (emulated) real mode takes about a minute and then fails as
    // an emulation error instead of shutting down.
    // ud2 ; hlt
    let Some(mut t) = setup(&[0x0f, 0x0b, 0xf4], 1, false) else {
        return;
    };
    let BootState::X86_64(mut boot) = real_mode_boot() else {
        unreachable!()
    };
    let flat = |selector, type_| Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        s: true,
        db: true,
        g: true,
        ..Default::default()
    };
    boot.sregs.cs = flat(0x8, 0xb);
    for seg in [
        &mut boot.sregs.ds,
        &mut boot.sregs.es,
        &mut boot.sregs.fs,
        &mut boot.sregs.gs,
        &mut boot.sregs.ss,
    ] {
        *seg = flat(0x10, 0x3);
    }
    boot.sregs.cr0 = 0x11; // PE | ET
    boot.sregs.idt.limit = 0;
    t.vcpus[0].set_boot_state(&BootState::X86_64(boot)).unwrap();
    assert_eq!(run(&mut t.vcpus[0]), VcpuExit::Reset);
}

#[test]
fn kicker_from_another_thread_interrupts_spinning_guest() {
    // jmp $
    let Some(mut t) = setup(&[0xeb, 0xfe], 1, false) else {
        return;
    };
    let kicker = t.vcpus[0].kicker();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        // Kick repeatedly until the vCPU reports it: the first kick may land
        // before the vCPU entered the guest (then it makes that entry return).
        thread::sleep(Duration::from_millis(50));
        kicker.kick();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    });
    let start = Instant::now();
    let exit = t.vcpus[0].run().unwrap();
    tx.send(()).unwrap();
    handle.join().unwrap();
    assert_eq!(exit, VcpuExit::Interrupted);
    assert!(start.elapsed() < Duration::from_secs(5));
    // The kick was consumed: the guest runs again (kick once more to stop it).
    let kicker = t.vcpus[0].kicker();
    let handle = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        kicker.kick();
    });
    assert_eq!(t.vcpus[0].run().unwrap(), VcpuExit::Interrupted);
    handle.join().unwrap();
}

#[test]
fn kick_outside_run_makes_next_run_return_at_once() {
    let Some(mut t) = setup(&[0xeb, 0xfe], 1, false) else {
        return;
    };
    t.vcpus[0].kicker().kick();
    assert_eq!(t.vcpus[0].run().unwrap(), VcpuExit::Interrupted);
}

#[test]
fn vcpu_state_round_trip_on_live_vcpu() {
    // mov ax, 0x1234 ; mov dx, 0x10 ; out dx, al ; mov bx, 0x5678 ; out dx, al ; hlt
    let code = [
        0xb8, 0x34, 0x12, 0xba, 0x10, 0x00, 0xee, 0xbb, 0x78, 0x56, 0xee, 0xf4,
    ];
    let Some(mut t) = setup(&code, 1, true) else {
        return;
    };
    let vcpu = &mut t.vcpus[0];
    assert!(matches!(run(vcpu), VcpuExit::IoOut { port: 0x10, .. }));
    let saved = vcpu.save_state().unwrap();
    let VcpuState::X86_64(s) = &saved else {
        panic!("wrong arch")
    };
    assert_eq!(s.regs.rax & 0xffff, 0x1234);
    assert_eq!(s.lapic.len(), 1024);
    assert!(s.xsave.len() >= 4096);
    assert!(!s.msrs.is_empty());

    // Run on: the second OUT changes RBX and RIP.
    assert!(matches!(run(vcpu), VcpuExit::IoOut { port: 0x10, .. }));
    let later = vcpu.save_state().unwrap();
    assert_ne!(later, saved);

    // Restore and check both the state read back and that execution resumes
    // from the saved point (the second OUT happens again).
    vcpu.restore_state(&saved).unwrap();
    let back = vcpu.save_state().unwrap();
    let VcpuState::X86_64(b) = &back else {
        panic!("wrong arch")
    };
    assert_eq!(b.regs, s.regs);
    assert_eq!(b.sregs, s.sregs);
    assert_eq!(b.xsave, s.xsave);
    assert_eq!(b.xcrs, s.xcrs);
    assert_eq!(b.lapic, s.lapic);
    assert_eq!(b.mp_state, s.mp_state);
    assert_eq!(b.events, s.events);
    assert_eq!(b.debug_regs, s.debug_regs);
    for (index, value) in &s.msrs {
        // The TSC keeps counting between save and restore.
        if *index != 0x10 {
            assert_eq!(b.msrs.get(index), Some(value), "MSR {index:#x}");
        }
    }
    assert!(matches!(run(vcpu), VcpuExit::IoOut { port: 0x10, .. }));
    let VcpuState::X86_64(after) = vcpu.save_state().unwrap() else {
        panic!()
    };
    assert_eq!(after.regs.rbx & 0xffff, 0x5678);
}

#[test]
fn vm_state_round_trip_with_irqchip() {
    let Some(t) = setup(&[0xf4], 1, true) else {
        return;
    };
    let VmState::X86_64(mut s) = t.vm.save_state().unwrap() else {
        panic!("wrong arch")
    };
    let chips = s
        .irqchip
        .as_mut()
        .expect("an in-kernel irqchip was created");
    assert_eq!(chips.ioapic.base_address, 0xfec0_0000);
    // A change made in the saved state reaches KVM on restore and reads back.
    chips.ioapic.redirection[5] = 0x0000_0000_0001_0035;
    chips.pic_master.imr = 0xfb;
    t.vm.restore_state(&VmState::X86_64(s.clone())).unwrap();
    let VmState::X86_64(b) = t.vm.save_state().unwrap() else {
        panic!()
    };
    let back = b.irqchip.as_ref().unwrap();
    let sent = s.irqchip.as_ref().unwrap();
    assert_eq!(back.ioapic.redirection[5], 0x0000_0000_0001_0035);
    assert_eq!(back.pic_master, sent.pic_master);
    assert_eq!(back.pic_slave, sent.pic_slave);
    assert_eq!(back.ioapic, sent.ioapic);
    assert!(b.clock_ns >= s.clock_ns);
}

#[test]
fn irq_line_needs_irqchip_and_triggers_with_it() {
    let Some(t) = setup(&[0xf4], 1, false) else {
        return;
    };
    assert!(t.vm.irq_line(4).is_err());
    let Some(t) = setup(&[0xf4], 1, true) else {
        return;
    };
    let line = t.vm.irq_line(4).unwrap();
    line.trigger().unwrap();
    line.set_level(true).unwrap();
    line.set_level(false).unwrap();
    assert!(t.vm.irq_line(24).is_err());
}

#[test]
fn aarch64_boot_state_is_refused() {
    let Some(mut t) = setup(&[0xf4], 1, false) else {
        return;
    };
    let state = BootState::Aarch64(Default::default());
    assert!(matches!(
        t.vcpus[0].set_boot_state(&state),
        Err(VcpuError::StateMismatch(_))
    ));
}

#[test]
fn cpuid_topology_is_per_vcpu() {
    // mov eax, 1 ; cpuid ; shr ebx, 24 ; mov al, bl ; out 0x10, al
    // mov eax, 0xb ; xor ecx, ecx ; cpuid ; mov al, dl ; out 0x11, al
    // mov eax, 1 ; cpuid ; shr ebx, 16 ; mov al, bl ; out 0x12, al ; jmp $
    let code = [
        0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2, 0x66, 0xc1, 0xeb, 0x18, 0x88, 0xd8, 0xe6,
        0x10, 0x66, 0xb8, 0x0b, 0x00, 0x00, 0x00, 0x66, 0x31, 0xc9, 0x0f, 0xa2, 0x88, 0xd0, 0xe6,
        0x11, 0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2, 0x66, 0xc1, 0xeb, 0x10, 0x88, 0xd8,
        0xe6, 0x12, 0xeb, 0xfe,
    ];
    let Some(mut t) = setup(&code, 2, true) else {
        return;
    };
    for (id, vcpu) in t.vcpus.iter_mut().enumerate() {
        let mut seen = Vec::new();
        for _ in 0..3 {
            match run(vcpu) {
                VcpuExit::IoOut { port, data } => seen.push((port, data.as_slice()[0])),
                other => panic!("vCPU {id}: expected IoOut, got {other:?}"),
            }
        }
        assert_eq!(
            seen,
            [(0x10, id as u8), (0x11, id as u8), (0x12, 2)],
            "vCPU {id}: (port, value) = leaf 1 APIC id, leaf 0xb x2APIC id, leaf 1 count"
        );
    }
}

#[test]
fn vcpu_and_vm_state_restore_into_fresh_vm_resumes_guest() {
    // mov ax, 0x1234 ; mov dx, 0x10 ; out dx, al ; mov bx, 0x5678 ; out dx, al ; jmp $
    let code = [
        0xb8, 0x34, 0x12, 0xba, 0x10, 0x00, 0xee, 0xbb, 0x78, 0x56, 0xee, 0xeb, 0xfe,
    ];
    let Some(mut a) = setup(&code, 1, true) else {
        return;
    };
    assert!(matches!(
        run(&mut a.vcpus[0]),
        VcpuExit::IoOut { port: 0x10, .. }
    ));
    let vcpu_state = a.vcpus[0].save_state().unwrap();
    let vm_state = a.vm.save_state().unwrap();
    drop(a);

    // A new VM, created for a restore (no host CPUID of its own), with the same
    // RAM contents (only code here) continues where the first one stopped: the
    // next exit is the second OUT, with RBX set after it.
    let Some(mut b) = setup_for(&code, 1, true, VmStart::Restore) else {
        return;
    };
    b.vm.restore_state(&vm_state).unwrap();
    b.vcpus[0].restore_state(&vcpu_state).unwrap();
    match run(&mut b.vcpus[0]) {
        VcpuExit::IoOut { port, data } => {
            assert_eq!(port, 0x10);
            assert_eq!(data.as_slice(), &[0x34]);
        }
        other => panic!("expected IoOut, got {other:?}"),
    }
    let VcpuState::X86_64(s) = b.vcpus[0].save_state().unwrap() else {
        panic!()
    };
    assert_eq!(s.regs.rbx & 0xffff, 0x5678);
    let VcpuState::X86_64(first) = &vcpu_state else {
        panic!()
    };
    assert!(!first.cpuid.is_empty());
    assert_eq!(
        s.cpuid, first.cpuid,
        "the restored vCPU keeps the saved CPU model"
    );
}

#[test]
fn a_vcpu_created_for_a_restore_refuses_to_boot_and_a_state_without_cpuid() {
    let Some(mut t) = setup_for(&[0xf4], 1, true, VmStart::Restore) else {
        return;
    };
    let err = t.vcpus[0].set_boot_state(&real_mode_boot()).unwrap_err();
    assert!(err.to_string().contains("created for a restore"), "{err}");
    let Some(booted) = setup(&[0xf4], 1, true) else {
        return;
    };
    let VcpuState::X86_64(mut s) = booted.vcpus[0].save_state().unwrap() else {
        panic!()
    };
    s.cpuid.clear();
    let err = t.vcpus[0].restore_state(&VcpuState::X86_64(s)).unwrap_err();
    assert!(err.to_string().contains("no CPUID"), "{err}");
}

#[test]
fn restore_of_aarch64_state_is_refused() {
    let Some(mut t) = setup(&[0xf4], 1, false) else {
        return;
    };
    let state = VcpuState::Aarch64(Box::default());
    assert!(matches!(
        t.vcpus[0].restore_state(&state),
        Err(VcpuError::StateMismatch(_))
    ));
    let vm_state = VmState::Aarch64(Box::default());
    assert!(t.vm.restore_state(&vm_state).is_err());
}
