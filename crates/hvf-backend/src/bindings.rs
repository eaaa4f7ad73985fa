//! Declarations of the Hypervisor.framework (Apple silicon) functions this backend
//! calls, from the macOS SDK headers `hv_vm.h`, `hv_vcpu.h` and `hv_vcpu_types.h`.
//! Types keep Apple's names so they can be checked against the headers line by line.
//! The macOS 15 GIC functions are not here: they are looked up at run time (`gic.rs`)
//! so the binary still starts on older systems and reports a clear error instead.
#![allow(non_camel_case_types, dead_code)]

use std::ffi::c_void;

/// `hv_return_t` (a `mach_error_t`).
pub type hv_return_t = i32;
/// vCPU handle.
pub type hv_vcpu_t = u64;
/// Guest-physical address.
pub type hv_ipa_t = u64;
/// `HV_MEMORY_*` flags.
pub type hv_memory_flags_t = u64;
/// `hv_reg_t`: X0..X30 = 0..30, PC = 31, FPCR = 32, FPSR = 33, CPSR = 34.
pub type hv_reg_t = u32;
/// `hv_simd_fp_reg_t`: Q0..Q31.
pub type hv_simd_fp_reg_t = u32;
/// `hv_sys_reg_t`: the `op0:op1:CRn:CRm:op2` encoding.
pub type hv_sys_reg_t = u16;
/// `hv_exit_reason_t`.
pub type hv_exit_reason_t = u32;
/// `hv_interrupt_type_t`.
pub type hv_interrupt_type_t = u32;
/// Opaque VM configuration (NULL = default).
pub type hv_vm_config_t = *mut c_void;
/// Opaque vCPU configuration (NULL = default).
pub type hv_vcpu_config_t = *mut c_void;
/// `hv_simd_fp_uchar16_t` in memory: 16 bytes, 16-byte aligned (`ext_vector_type(16)`).
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy, Default)]
pub struct hv_simd_fp_uchar16_t(pub [u8; 16]);

/// Readable guest memory.
pub const HV_MEMORY_READ: hv_memory_flags_t = 1 << 0;
/// Writable guest memory.
pub const HV_MEMORY_WRITE: hv_memory_flags_t = 1 << 1;
/// Executable guest memory.
pub const HV_MEMORY_EXEC: hv_memory_flags_t = 1 << 2;

/// Exit requested by `hv_vcpus_exit`.
pub const HV_EXIT_REASON_CANCELED: hv_exit_reason_t = 0;
/// Synchronous exception to EL2 (syndrome in `exception`).
pub const HV_EXIT_REASON_EXCEPTION: hv_exit_reason_t = 1;
/// The virtual timer fired; it is masked until `hv_vcpu_set_vtimer_mask(false)`.
pub const HV_EXIT_REASON_VTIMER_ACTIVATED: hv_exit_reason_t = 2;
/// Unknown.
pub const HV_EXIT_REASON_UNKNOWN: hv_exit_reason_t = 3;

/// IRQ line of `hv_vcpu_set_pending_interrupt`.
pub const HV_INTERRUPT_TYPE_IRQ: hv_interrupt_type_t = 0;

/// `hv_vcpu_exit_exception_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct hv_vcpu_exit_exception_t {
    /// ESR_EL2.
    pub syndrome: u64,
    /// FAR_EL2 (guest virtual address).
    pub virtual_address: u64,
    /// Faulting IPA (HPFAR_EL2-derived guest-physical address).
    pub physical_address: hv_ipa_t,
}

/// `hv_vcpu_exit_t`, written by the framework on every `hv_vcpu_run` return.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct hv_vcpu_exit_t {
    /// Why the vCPU exited.
    pub reason: hv_exit_reason_t,
    /// Exception details (valid for `HV_EXIT_REASON_EXCEPTION`).
    pub exception: hv_vcpu_exit_exception_t,
}

/// `mach_timebase_info_data_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct mach_timebase_info_data_t {
    /// Numerator of ticks -> nanoseconds.
    pub numer: u32,
    /// Denominator of ticks -> nanoseconds.
    pub denom: u32,
}

#[link(name = "Hypervisor", kind = "framework")]
extern "C" {
    pub fn hv_vm_get_max_vcpu_count(max_vcpu_count: *mut u32) -> hv_return_t;
    pub fn hv_vm_create(config: hv_vm_config_t) -> hv_return_t;
    pub fn hv_vm_destroy() -> hv_return_t;
    pub fn hv_vm_map(
        addr: *mut c_void,
        ipa: hv_ipa_t,
        size: usize,
        flags: hv_memory_flags_t,
    ) -> hv_return_t;
    pub fn hv_vm_unmap(ipa: hv_ipa_t, size: usize) -> hv_return_t;

    pub fn hv_vcpu_create(
        vcpu: *mut hv_vcpu_t,
        exit: *mut *const hv_vcpu_exit_t,
        config: hv_vcpu_config_t,
    ) -> hv_return_t;
    pub fn hv_vcpu_destroy(vcpu: hv_vcpu_t) -> hv_return_t;
    pub fn hv_vcpu_run(vcpu: hv_vcpu_t) -> hv_return_t;
    pub fn hv_vcpus_exit(vcpus: *mut hv_vcpu_t, vcpu_count: u32) -> hv_return_t;

    pub fn hv_vcpu_get_reg(vcpu: hv_vcpu_t, reg: hv_reg_t, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_reg(vcpu: hv_vcpu_t, reg: hv_reg_t, value: u64) -> hv_return_t;
    pub fn hv_vcpu_get_simd_fp_reg(
        vcpu: hv_vcpu_t,
        reg: hv_simd_fp_reg_t,
        value: *mut hv_simd_fp_uchar16_t,
    ) -> hv_return_t;
    /// Real prototype: `hv_return_t (hv_vcpu_t, hv_simd_fp_reg_t, hv_simd_fp_uchar16_t)`
    /// with the vector passed by value in V0, which stable Rust cannot express in an
    /// `extern "C"` signature (SIMD types in FFI need the unstable `simd_ffi`). It is
    /// declared without parameters only to take its address; `set_simd_fp_reg` below
    /// calls it with the AAPCS64 register assignment written out.
    fn hv_vcpu_set_simd_fp_reg();
    pub fn hv_vcpu_get_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t, value: u64) -> hv_return_t;

    pub fn hv_vcpu_set_vtimer_mask(vcpu: hv_vcpu_t, vtimer_is_masked: bool) -> hv_return_t;
    pub fn hv_vcpu_get_vtimer_offset(vcpu: hv_vcpu_t, vtimer_offset: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_vtimer_offset(vcpu: hv_vcpu_t, vtimer_offset: u64) -> hv_return_t;
    pub fn hv_vcpu_set_pending_interrupt(
        vcpu: hv_vcpu_t,
        interrupt_type: hv_interrupt_type_t,
        pending: bool,
    ) -> hv_return_t;
}

// libSystem, always linked.
extern "C" {
    pub fn mach_absolute_time() -> u64;
    pub fn mach_timebase_info(info: *mut mach_timebase_info_data_t) -> i32;
}

/// Calls `hv_vcpu_set_simd_fp_reg(vcpu, reg, value)`.
///
/// # Safety
/// Must be called on the thread that owns `vcpu`.
pub unsafe fn set_simd_fp_reg(
    vcpu: hv_vcpu_t,
    reg: hv_simd_fp_reg_t,
    value: &hv_simd_fp_uchar16_t,
) -> hv_return_t {
    let ret: u64;
    let func = hv_vcpu_set_simd_fp_reg as unsafe extern "C" fn() as usize;
    // SAFETY: AAPCS64 passes the first two integer arguments in x0/x1 and a 16-byte
    // short vector argument in v0 (q0), returning the int in w0. `value` points at 16
    // readable, 16-byte-aligned bytes. `clobber_abi("C")` tells the compiler every
    // caller-saved register (including v0, x0..x18, x30 and flags) may change across
    // the call, and the stack pointer is untouched and 16-byte aligned at the `blr`.
    // The caller upholds the thread-ownership requirement of the framework function.
    unsafe {
        std::arch::asm!(
            "ldr q0, [{src}]",
            "blr {func}",
            src = in(reg) value as *const hv_simd_fp_uchar16_t,
            func = in(reg) func,
            inout("x0") vcpu => ret,
            in("x1") u64::from(reg),
            clobber_abi("C"),
        );
    }
    ret as u32 as hv_return_t
}
