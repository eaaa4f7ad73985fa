//! Hypervisor.framework conformance tests: tiny hand-assembled aarch64 guests run on
//! the real framework, checking what the runner relies on: MMIO write and read exits
//! (two-step), PSCI over HVC, WFI with the virtual timer, and the kicker.
//!
//! They run only on Apple silicon macOS (the binary must be signed with the
//! `com.apple.security.hypervisor` entitlement; see docs/hvf.md and
//! .github/workflows/macos.yml). Elsewhere this file compiles to nothing; on Linux
//! it is type-checked with `cargo clippy --target aarch64-apple-darwin --all-targets`.
//! **None of these tests has run yet**: no Mac was available when they were written.
//!
//! Each instruction word is written next to its assembly; the words were produced
//! with `llvm-mc -triple=aarch64 -show-encoding`. The guests run without the
//! in-framework GIC (it needs macOS 15), so the virtual-timer interrupt reaches the
//! vCPU through the backend's `hv_vcpu_set_pending_interrupt` path.
#![cfg(all(target_os = "macos", target_arch = "aarch64"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hvf_backend::{HvfHypervisor, HvfVcpu, HvfVm};
use hypervisor::aarch64::BootState as A64Boot;
use hypervisor::{BootState, Hypervisor, MemoryRegion, Vcpu, VcpuExit, VcpuKicker, Vm, VmConfig};

/// Guest RAM base (as the runner's aarch64 layout).
const RAM: u64 = 0x4000_0000;
/// Guest RAM size: 1 MiB, a multiple of the 16 KiB host page.
const RAM_SIZE: usize = 1 << 20;
/// An unmapped guest address: accesses there are MMIO exits.
const MMIO: u64 = 0x0900_0000;
/// Offset of the exception vector table in RAM (VBAR_EL1 needs 2 KiB alignment).
const VECTORS: usize = 0x800;
/// Offset of the "IRQ, current EL with SP_ELx" vector (Arm ARM D1.10.2).
const IRQ_VECTOR: usize = VECTORS + 0x280;
/// Offset of the "Synchronous, current EL with SP_ELx" vector.
const SYNC_VECTOR: usize = VECTORS + 0x200;
/// EL1h with D, A, I, F masked.
const PSTATE_EL1H_MASKED: u64 = 0x3c5;

/// `movz x1, #0x0900, lsl #16` : x1 = MMIO.
const MOV_X1_MMIO: u32 = 0xd2a1_2001;
/// `movz w0, #8` then `movk w0, #0x8400, lsl #16`: w0 = PSCI SYSTEM_OFF (0x8400_0008).
const MOV_W0_SYSTEM_OFF: [u32; 2] = [0x5280_0100, 0x72b0_8000];
/// `hvc #0`.
const HVC_0: u32 = 0xd400_0002;
/// `b .`.
const B_SELF: u32 = 0x1400_0000;

/// Hypervisor.framework allows one VM per process; tests take turns.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Anonymous host memory handed to the guest.
struct GuestRam {
    ptr: *mut u8,
}

impl GuestRam {
    fn new() -> Self {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest RAM");
        Self { ptr: ptr.cast() }
    }

    fn write_words(&self, offset: usize, words: &[u32]) {
        assert!(offset + 4 * words.len() <= RAM_SIZE);
        for (i, w) in words.iter().enumerate() {
            // SAFETY: in bounds (asserted above) of a live mapping we own; the guest
            // is not running while the test writes its code.
            unsafe {
                self.ptr
                    .add(offset + 4 * i)
                    .cast::<u32>()
                    .write_unaligned(w.to_le())
            };
        }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the VM that used it is dropped first.
        unsafe { libc::munmap(self.ptr.cast(), RAM_SIZE) };
    }
}

/// A one-vCPU VM. Field order is drop order: vCPU, VM, then RAM, then the lock.
struct Machine {
    vcpu: HvfVcpu,
    _vm: HvfVm,
    _ram: GuestRam,
    _turn: MutexGuard<'static, ()>,
}

/// Boots a VM whose RAM holds `pieces` (offset, instruction words), with the boot
/// vCPU at the start of RAM.
fn machine(pieces: &[(usize, &[u32])]) -> Machine {
    let turn = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let ram = GuestRam::new();
    for (offset, words) in pieces {
        ram.write_words(*offset, words);
    }
    let hv = HvfHypervisor::new().expect("Hypervisor.framework (is the test binary signed?)");
    let vm = hv
        .create_vm(&VmConfig {
            vcpus: 1,
            start: hypervisor::VmStart::Boot,
        })
        .unwrap();
    let region = MemoryRegion {
        slot: 0,
        guest_addr: RAM,
        size: RAM_SIZE as u64,
        host_addr: ram.ptr as usize,
        read_only: false,
    };
    // SAFETY: `ram` stays mapped until after the VM is dropped (Machine's field order).
    unsafe { vm.map_memory(&region) }.unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_boot_state(&BootState::Aarch64(A64Boot {
        pc: RAM,
        x0: 0,
        pstate: PSTATE_EL1H_MASKED,
    }))
    .unwrap();
    Machine {
        vcpu,
        _vm: vm,
        _ram: ram,
        _turn: turn,
    }
}

/// Runs until an exit other than `Interrupted`.
fn next_exit(vcpu: &mut HvfVcpu) -> VcpuExit {
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::Interrupted => continue,
            e => return e,
        }
    }
}

fn expect_write(vcpu: &mut HvfVcpu, addr: u64) -> u64 {
    match next_exit(vcpu) {
        VcpuExit::MmioWrite { addr: a, data } if a == addr => data.as_u64(),
        other => panic!("expected an MMIO write at {addr:#x}, got {other:?}"),
    }
}

#[test]
fn mmio_write_str_w_exits_with_address_size_and_data() {
    let code = [
        MOV_X1_MMIO,
        0x5297_dde2, // movz w2, #0xbeef
        0x72bb_d5a2, // movk w2, #0xdead, lsl #16
        0xb900_1022, // str  w2, [x1, #0x10]
        B_SELF,
    ];
    let mut m = machine(&[(0, &code)]);
    match next_exit(&mut m.vcpu) {
        VcpuExit::MmioWrite { addr, data } => {
            assert_eq!(addr, MMIO + 0x10);
            assert_eq!(
                data.as_slice(),
                &[0xef, 0xbe, 0xad, 0xde],
                "4 bytes, little-endian"
            );
        }
        other => panic!("expected an MMIO write, got {other:?}"),
    }
}

#[test]
fn mmio_read_answered_by_host_is_seen_by_guest() {
    let code = [
        MOV_X1_MMIO,
        0xb940_0023, // ldr w3, [x1]
        0xb900_0823, // str w3, [x1, #8]
        0xf940_1023, // ldr x3, [x1, #0x20]
        0xf900_1423, // str x3, [x1, #0x28]
        B_SELF,
    ];
    let mut m = machine(&[(0, &code)]);
    assert_eq!(
        next_exit(&mut m.vcpu),
        VcpuExit::MmioRead {
            addr: MMIO,
            size: 4
        }
    );
    m.vcpu.set_io_result(&0x1234_5678u32.to_le_bytes()).unwrap();
    assert_eq!(expect_write(&mut m.vcpu, MMIO + 8), 0x1234_5678);
    assert_eq!(
        next_exit(&mut m.vcpu),
        VcpuExit::MmioRead {
            addr: MMIO + 0x20,
            size: 8
        }
    );
    m.vcpu
        .set_io_result(&0x0123_4567_89ab_cdefu64.to_le_bytes())
        .unwrap();
    assert_eq!(
        expect_write(&mut m.vcpu, MMIO + 0x28),
        0x0123_4567_89ab_cdef
    );
}

#[test]
fn mmio_read_not_answered_makes_run_fail() {
    let code = [MOV_X1_MMIO, 0xb940_0023 /* ldr w3, [x1] */, B_SELF];
    let mut m = machine(&[(0, &code)]);
    assert!(matches!(next_exit(&mut m.vcpu), VcpuExit::MmioRead { .. }));
    assert!(
        m.vcpu.run().is_err(),
        "a run with a read pending is an error"
    );
}

#[test]
fn hvc_psci_system_off_is_shutdown() {
    let code = [MOV_W0_SYSTEM_OFF[0], MOV_W0_SYSTEM_OFF[1], HVC_0, B_SELF];
    let mut m = machine(&[(0, &code)]);
    assert_eq!(next_exit(&mut m.vcpu), VcpuExit::Shutdown);
}

#[test]
fn hvc_psci_version_answers_1_0_in_x0() {
    let code = [
        MOV_X1_MMIO,
        0x52b0_8000, // movz w0, #0x8400, lsl #16 (PSCI_VERSION = 0x8400_0000)
        HVC_0,
        0xb900_0020, // str w0, [x1]
        B_SELF,
    ];
    let mut m = machine(&[(0, &code)]);
    assert_eq!(expect_write(&mut m.vcpu, MMIO), 0x0001_0000, "PSCI 1.0");
}

/// The guest arms the virtual timer 2 ms ahead (48000 ticks at Apple silicon's
/// 24 MHz; the guest also reports CNTFRQ_EL0), unmasks IRQs and loops on WFI, counting
/// wakeups in x7. Its IRQ handler reports the deadline, the counter, the wakeup count
/// and CNTV_CTL_EL0, then powers off. Asserted: the IRQ arrived (the handler ran), not
/// before the deadline, with the timer condition met (ISTATUS), and WFI slept instead
/// of spinning (few wakeups: without the GIC the backend waits for the timer's
/// deadline, so one or two).
#[test]
fn wfi_with_vtimer_armed_wakes_on_timer_interrupt() {
    let main = [
        MOV_X1_MMIO,
        0xd2a8_0002, // movz x2, #0x4000, lsl #16
        0x9120_0042, // add  x2, x2, #0x800
        0xd518_c002, // msr  vbar_el1, x2
        0xd280_0007, // movz x7, #0
        0xd53b_e044, // mrs  x4, cntvct_el0
        0xd297_7005, // movz x5, #48000
        0x8b05_0084, // add  x4, x4, x5
        0xd51b_e344, // msr  cntv_cval_el0, x4
        0xd280_0025, // movz x5, #1              (ENABLE, IMASK clear)
        0xd51b_e325, // msr  cntv_ctl_el0, x5
        0xd503_3fdf, // isb
        0xd503_42ff, // msr  daifclr, #2         (unmask IRQ)
        0xd503_207f, // 1: wfi
        0x9100_04e7, // add  x7, x7, #1
        0x17ff_fffe, // b    1b
    ];
    let irq = [
        0xd53b_e046, // mrs x6, cntvct_el0
        0xf900_0024, // str x4, [x1]             deadline
        0xf900_0426, // str x6, [x1, #8]         counter in the handler
        0xf900_0827, // str x7, [x1, #16]        WFI wakeups
        0xd53b_e328, // mrs x8, cntv_ctl_el0
        0xf900_0c28, // str x8, [x1, #24]
        0xd53b_e009, // mrs x9, cntfrq_el0
        0xf900_1029, // str x9, [x1, #32]
        MOV_W0_SYSTEM_OFF[0],
        MOV_W0_SYSTEM_OFF[1],
        HVC_0,
        B_SELF,
    ];
    let mut m = machine(&[(0, &main), (IRQ_VECTOR, &irq)]);
    let start = Instant::now();
    let deadline = expect_write(&mut m.vcpu, MMIO);
    let counter = expect_write(&mut m.vcpu, MMIO + 8);
    let wakeups = expect_write(&mut m.vcpu, MMIO + 16);
    let ctl = expect_write(&mut m.vcpu, MMIO + 24);
    let freq = expect_write(&mut m.vcpu, MMIO + 32);
    assert_eq!(next_exit(&mut m.vcpu), VcpuExit::Shutdown);
    let elapsed = start.elapsed();

    assert!(
        counter >= deadline,
        "IRQ before the deadline: {counter} < {deadline}"
    );
    assert_eq!(
        ctl & 0b101,
        0b101,
        "CNTV_CTL_EL0 ENABLE and ISTATUS set: {ctl:#x}"
    );
    assert!(freq > 0, "CNTFRQ_EL0 is programmed");
    let armed = Duration::from_nanos(48_000 * 1_000_000_000 / freq);
    assert!(
        wakeups <= 100,
        "WFI spun instead of sleeping: {wakeups} wakeups in {armed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "timer IRQ took {elapsed:?}"
    );
}

#[test]
fn kicker_from_another_thread_interrupts_spinning_guest() {
    let mut m = machine(&[(0, &[B_SELF])]);
    let kicker = m.vcpu.kicker();
    let start = Instant::now();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        kicker.kick();
    });
    assert_eq!(m.vcpu.run().unwrap(), VcpuExit::Interrupted);
    assert!(start.elapsed() >= Duration::from_millis(50));
    t.join().unwrap();
}

#[test]
fn kick_before_run_makes_next_run_return_at_once() {
    let mut m = machine(&[(0, &[B_SELF])]);
    m.vcpu.kicker().kick();
    assert_eq!(m.vcpu.run().unwrap(), VcpuExit::Interrupted);
}

/// A trapped ID register read (ID_AA64ISAR2_EL1, which Linux 6.1 reads at boot)
/// completes, and a system register the backend does not emulate
/// (S3_0_C15_C2_0, implementation defined) raises an Undefined Instruction
/// exception in the guest instead of ending the VM: the guest's synchronous
/// vector reports ESR_EL1 (EC 0, IL: 0x0200_0000), ELR_EL1 (the MRS) and
/// SPSR_EL1 (its PSTATE), then powers off. If the framework does not trap that
/// encoding, the CPU raises the same exception itself.
#[test]
fn an_unknown_system_register_is_an_undefined_instruction_in_the_guest() {
    let main = [
        MOV_X1_MMIO, // 0x00
        0xd2a8_0002, // 0x04 movz x2, #0x4000, lsl #16
        0x9120_0042, // 0x08 add  x2, x2, #0x800
        0xd518_c002, // 0x0c msr  vbar_el1, x2
        0xd503_3fdf, // 0x10 isb
        0xd538_0643, // 0x14 mrs  x3, id_aa64isar2_el1
        0xf900_0023, // 0x18 str  x3, [x1]
        0xd538_f200, // 0x1c mrs  x0, s3_0_c15_c2_0
        B_SELF,      // 0x20 (never reached)
    ];
    let sync = [
        0xd538_5205, // mrs x5, esr_el1
        0xd538_4026, // mrs x6, elr_el1
        0xd538_4007, // mrs x7, spsr_el1
        0xf900_0425, // str x5, [x1, #8]
        0xf900_0826, // str x6, [x1, #16]
        0xf900_0c27, // str x7, [x1, #24]
        MOV_W0_SYSTEM_OFF[0],
        MOV_W0_SYSTEM_OFF[1],
        HVC_0,
        B_SELF,
    ];
    let mut m = machine(&[(0, &main), (SYNC_VECTOR, &sync)]);
    // Whatever the framework reports for ISAR2 (zero when it traps): the guest
    // goes on.
    let _isar2 = expect_write(&mut m.vcpu, MMIO);
    let esr = expect_write(&mut m.vcpu, MMIO + 8);
    let elr = expect_write(&mut m.vcpu, MMIO + 16);
    let spsr = expect_write(&mut m.vcpu, MMIO + 24);
    assert_eq!(next_exit(&mut m.vcpu), VcpuExit::Shutdown);
    assert_eq!(esr, 0x0200_0000, "ESR_EL1: EC 0 (unknown), IL");
    assert_eq!(elr, RAM + 0x1c, "ELR_EL1: the MRS");
    assert_eq!(spsr & 0x3cf, PSTATE_EL1H_MASKED, "SPSR_EL1: EL1h, DAIF");
}
