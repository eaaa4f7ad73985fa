/*
 * hv_layout.c: checks, at compile time, every Hypervisor.framework constant, type size,
 * struct layout and function prototype that crates/hvf-backend copies by hand into Rust,
 * against the macOS SDK's own headers.
 *
 * The Rust side (bindings.rs, state.rs, sysreg.rs, hv_error.rs, gic.rs, and the timer
 * INTIDs in crates/runner/src/aarch64/fdt.rs) has no bindgen: its numbers were read off
 * Apple's headers. Every expected value below is OUR Rust value, copied from the Rust
 * source, never from Apple's header, and each check names the Rust item it stands for, so
 * a failing _Static_assert says which Rust item disagrees with the SDK. When a Rust value
 * changes, change it here too.
 *
 * Nothing is linked or run, so no hypervisor is needed. On a Mac (Xcode or the Command
 * Line Tools), from the repository root:
 *
 *   clang -fsyntax-only -arch arm64 -mmacosx-version-min=11.0 -std=gnu11 \
 *     -Wall -Wextra -Werror -Wno-error=#warnings \
 *     -isysroot "$(xcrun --show-sdk-path)" crates/hvf-backend/ci/hv_layout.c
 *
 * The in-framework GIC headers (hv_gic.h, hv_gic_types.h, ...) exist only in the macOS 15
 * SDK and later; with an older SDK the GIC part is skipped with a #warning.
 * .github/workflows/macos.yml compiles this file on every macOS runner.
 */

#if !defined(__APPLE__) || !defined(__arm64__)
#error "hv_layout.c checks the Apple silicon Hypervisor.framework headers: compile it for arm64 against the macOS SDK (see the comment at the top)"
#endif

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <mach/mach_time.h>
#include <Hypervisor/Hypervisor.h>

/* The SDK's value `sdk` must equal the Rust value `rust`; `item` names the Rust item. */
#define CHECK_EQ(sdk, rust, item) \
    _Static_assert((sdk) == (rust), item " disagrees with the macOS SDK: " #sdk " != " #rust)

/* Type size and signedness (Rust iN / uN, or a pointer for *mut c_void). */
#define IS_SIGNED(T) ((T)-1 < (T)0)
#define CHECK_INT(T, bytes, signed_, item) \
    CHECK_EQ(sizeof(T), bytes, item); \
    CHECK_EQ(IS_SIGNED(T), signed_, item " (signedness)")
#define CHECK_PTR(T, item) CHECK_EQ(sizeof(T), sizeof(void *), item " (pointer-sized)")

/* Struct layout: size of a member, offset of a member. */
#define MEMBER_SIZE(T, m) sizeof(((T *)0)->m)
#define CHECK_MEMBER(T, m, offset, bytes, item) \
    CHECK_EQ(offsetof(T, m), offset, item " (offset)"); \
    CHECK_EQ(MEMBER_SIZE(T, m), bytes, item " (size)")

/*
 * A function's prototype, as the Rust declaration sees it. Apple's own typedef names are
 * used for the parameters whose width is checked separately above (hv_reg_t, ...), so this
 * catches a wrong number, order or pointer-ness of parameters and a wrong return type.
 * Nullability annotations are type sugar and do not take part.
 */
#define CHECK_FN(fn, type, item) \
    _Static_assert(__builtin_types_compatible_p(__typeof__(&fn), type), \
                   item " disagrees with the macOS SDK's prototype of " #fn)

/* ---- Types: crates/hvf-backend/src/bindings.rs ------------------------------------- */

CHECK_INT(hv_return_t, 4, 1, "bindings.rs: hv_return_t = i32");
CHECK_INT(hv_vcpu_t, 8, 0, "bindings.rs: hv_vcpu_t = u64");
CHECK_INT(hv_ipa_t, 8, 0, "bindings.rs: hv_ipa_t = u64");
CHECK_INT(hv_memory_flags_t, 8, 0, "bindings.rs: hv_memory_flags_t = u64");
CHECK_INT(hv_reg_t, 4, 0, "bindings.rs: hv_reg_t = u32");
CHECK_INT(hv_simd_fp_reg_t, 4, 0, "bindings.rs: hv_simd_fp_reg_t = u32");
CHECK_INT(hv_sys_reg_t, 2, 0, "bindings.rs: hv_sys_reg_t = u16 (and sysreg.rs: HvfSysReg::id: u16)");
CHECK_INT(hv_exit_reason_t, 4, 0, "bindings.rs: hv_exit_reason_t = u32");
CHECK_INT(hv_interrupt_type_t, 4, 0, "bindings.rs: hv_interrupt_type_t = u32");
CHECK_INT(kern_return_t, 4, 1, "bindings.rs: mach_timebase_info() -> i32");
CHECK_PTR(hv_vm_config_t, "bindings.rs: hv_vm_config_t = *mut c_void");
CHECK_PTR(hv_vcpu_config_t, "bindings.rs: hv_vcpu_config_t = *mut c_void");

/* bindings.rs: #[repr(C, align(16))] struct hv_simd_fp_uchar16_t(pub [u8; 16]) */
CHECK_EQ(sizeof(hv_simd_fp_uchar16_t), 16, "bindings.rs: hv_simd_fp_uchar16_t ([u8; 16])");
CHECK_EQ(_Alignof(hv_simd_fp_uchar16_t), 16, "bindings.rs: hv_simd_fp_uchar16_t (align(16))");

/* bindings.rs: #[repr(C)] struct hv_vcpu_exit_exception_t { syndrome: u64,
 * virtual_address: u64, physical_address: hv_ipa_t } */
CHECK_EQ(sizeof(hv_vcpu_exit_exception_t), 24, "bindings.rs: hv_vcpu_exit_exception_t (size)");
CHECK_EQ(_Alignof(hv_vcpu_exit_exception_t), 8, "bindings.rs: hv_vcpu_exit_exception_t (align)");
CHECK_MEMBER(hv_vcpu_exit_exception_t, syndrome, 0, 8,
             "bindings.rs: hv_vcpu_exit_exception_t::syndrome: u64");
CHECK_MEMBER(hv_vcpu_exit_exception_t, virtual_address, 8, 8,
             "bindings.rs: hv_vcpu_exit_exception_t::virtual_address: u64");
CHECK_MEMBER(hv_vcpu_exit_exception_t, physical_address, 16, 8,
             "bindings.rs: hv_vcpu_exit_exception_t::physical_address: hv_ipa_t");

/* bindings.rs: #[repr(C)] struct hv_vcpu_exit_t { reason: hv_exit_reason_t,
 * exception: hv_vcpu_exit_exception_t } (4 bytes of padding after `reason`) */
CHECK_EQ(sizeof(hv_vcpu_exit_t), 32, "bindings.rs: hv_vcpu_exit_t (size)");
CHECK_EQ(_Alignof(hv_vcpu_exit_t), 8, "bindings.rs: hv_vcpu_exit_t (align)");
CHECK_MEMBER(hv_vcpu_exit_t, reason, 0, 4, "bindings.rs: hv_vcpu_exit_t::reason: hv_exit_reason_t");
CHECK_MEMBER(hv_vcpu_exit_t, exception, 8, 24,
             "bindings.rs: hv_vcpu_exit_t::exception: hv_vcpu_exit_exception_t");

/* bindings.rs: #[repr(C)] struct mach_timebase_info_data_t { numer: u32, denom: u32 } */
CHECK_EQ(sizeof(mach_timebase_info_data_t), 8, "bindings.rs: mach_timebase_info_data_t (size)");
CHECK_MEMBER(mach_timebase_info_data_t, numer, 0, 4, "bindings.rs: mach_timebase_info_data_t::numer: u32");
CHECK_MEMBER(mach_timebase_info_data_t, denom, 4, 4, "bindings.rs: mach_timebase_info_data_t::denom: u32");

/* ---- Constants: bindings.rs --------------------------------------------------------- */

CHECK_EQ(HV_MEMORY_READ, 1 << 0, "bindings.rs: HV_MEMORY_READ");
CHECK_EQ(HV_MEMORY_WRITE, 1 << 1, "bindings.rs: HV_MEMORY_WRITE");
CHECK_EQ(HV_MEMORY_EXEC, 1 << 2, "bindings.rs: HV_MEMORY_EXEC");

CHECK_EQ(HV_EXIT_REASON_CANCELED, 0, "bindings.rs: HV_EXIT_REASON_CANCELED");
CHECK_EQ(HV_EXIT_REASON_EXCEPTION, 1, "bindings.rs: HV_EXIT_REASON_EXCEPTION");
CHECK_EQ(HV_EXIT_REASON_VTIMER_ACTIVATED, 2, "bindings.rs: HV_EXIT_REASON_VTIMER_ACTIVATED");
CHECK_EQ(HV_EXIT_REASON_UNKNOWN, 3, "bindings.rs: HV_EXIT_REASON_UNKNOWN");

CHECK_EQ(HV_INTERRUPT_TYPE_IRQ, 0, "bindings.rs: HV_INTERRUPT_TYPE_IRQ");

/* ---- hv_return_t codes: crates/hvf-backend/src/hv_error.rs -------------------------- */
/* Compared as 32-bit patterns: Rust writes them as 0xfae9_40NN_u32 as i32. */

CHECK_EQ(HV_SUCCESS, 0, "hv_error.rs: HV_SUCCESS");
CHECK_EQ((uint32_t)HV_ERROR, 0xfae94001u, "hv_error.rs: name() \"HV_ERROR\"");
CHECK_EQ((uint32_t)HV_BUSY, 0xfae94002u, "hv_error.rs: name() \"HV_BUSY\"");
CHECK_EQ((uint32_t)HV_BAD_ARGUMENT, 0xfae94003u, "hv_error.rs: name() \"HV_BAD_ARGUMENT\"");
CHECK_EQ((uint32_t)HV_ILLEGAL_GUEST_STATE, 0xfae94004u, "hv_error.rs: name() \"HV_ILLEGAL_GUEST_STATE\"");
CHECK_EQ((uint32_t)HV_NO_RESOURCES, 0xfae94005u, "hv_error.rs: name() \"HV_NO_RESOURCES\"");
CHECK_EQ((uint32_t)HV_NO_DEVICE, 0xfae94006u, "hv_error.rs: HV_NO_DEVICE");
CHECK_EQ((uint32_t)HV_DENIED, 0xfae94007u, "hv_error.rs: HV_DENIED");
CHECK_EQ((uint32_t)HV_UNSUPPORTED, 0xfae9400fu, "hv_error.rs: name() \"HV_UNSUPPORTED\"");

/* ---- hv_reg_t: crates/hvf-backend/src/state.rs CoreReg::hv_reg() --------------------- */
/* X0..X30 = 0..30, PC = 31, FPCR = 32, FPSR = 33, CPSR = 34. */

#define CHECK_XREG(n) CHECK_EQ(HV_REG_X##n, n, "state.rs: CoreReg::X(" #n ").hv_reg()")
CHECK_XREG(0);  CHECK_XREG(1);  CHECK_XREG(2);  CHECK_XREG(3);  CHECK_XREG(4);
CHECK_XREG(5);  CHECK_XREG(6);  CHECK_XREG(7);  CHECK_XREG(8);  CHECK_XREG(9);
CHECK_XREG(10); CHECK_XREG(11); CHECK_XREG(12); CHECK_XREG(13); CHECK_XREG(14);
CHECK_XREG(15); CHECK_XREG(16); CHECK_XREG(17); CHECK_XREG(18); CHECK_XREG(19);
CHECK_XREG(20); CHECK_XREG(21); CHECK_XREG(22); CHECK_XREG(23); CHECK_XREG(24);
CHECK_XREG(25); CHECK_XREG(26); CHECK_XREG(27); CHECK_XREG(28); CHECK_XREG(29);
CHECK_XREG(30);
CHECK_EQ(HV_REG_PC, 31, "state.rs: CoreReg::Pc.hv_reg()");
CHECK_EQ(HV_REG_FPCR, 32, "state.rs: CoreReg::Fpcr.hv_reg()");
CHECK_EQ(HV_REG_FPSR, 33, "state.rs: CoreReg::Fpsr.hv_reg()");
CHECK_EQ(HV_REG_CPSR, 34, "state.rs: CoreReg::Cpsr.hv_reg()");

/* ---- hv_simd_fp_reg_t: crates/hvf-backend/src/hvf.rs passes u32::from(index) -------- */

#define CHECK_QREG(n) CHECK_EQ(HV_SIMD_FP_REG_Q##n, n, "hvf.rs: Regs::simd/set_simd index " #n)
CHECK_QREG(0);  CHECK_QREG(1);  CHECK_QREG(2);  CHECK_QREG(3);  CHECK_QREG(4);
CHECK_QREG(5);  CHECK_QREG(6);  CHECK_QREG(7);  CHECK_QREG(8);  CHECK_QREG(9);
CHECK_QREG(10); CHECK_QREG(11); CHECK_QREG(12); CHECK_QREG(13); CHECK_QREG(14);
CHECK_QREG(15); CHECK_QREG(16); CHECK_QREG(17); CHECK_QREG(18); CHECK_QREG(19);
CHECK_QREG(20); CHECK_QREG(21); CHECK_QREG(22); CHECK_QREG(23); CHECK_QREG(24);
CHECK_QREG(25); CHECK_QREG(26); CHECK_QREG(27); CHECK_QREG(28); CHECK_QREG(29);
CHECK_QREG(30); CHECK_QREG(31);

/* ---- hv_sys_reg_t: crates/hvf-backend/src/sysreg.rs HVF_SYS_REGS (kind Vcpu) -------- */

#define CHECK_SYSREG(name, rust) \
    CHECK_EQ(HV_SYS_REG_##name, rust, "sysreg.rs: HVF_SYS_REGS vcpu(" #rust ", \"" #name "\")")
CHECK_SYSREG(MDCCINT_EL1, 0x8010);
CHECK_SYSREG(MDSCR_EL1, 0x8012);
CHECK_SYSREG(MIDR_EL1, 0xc000);
CHECK_SYSREG(MPIDR_EL1, 0xc005);
CHECK_SYSREG(ID_AA64PFR0_EL1, 0xc020);
CHECK_SYSREG(ID_AA64PFR1_EL1, 0xc021);
CHECK_SYSREG(ID_AA64DFR0_EL1, 0xc028);
CHECK_SYSREG(ID_AA64DFR1_EL1, 0xc029);
CHECK_SYSREG(ID_AA64ISAR0_EL1, 0xc030);
CHECK_SYSREG(ID_AA64ISAR1_EL1, 0xc031);
CHECK_SYSREG(ID_AA64MMFR0_EL1, 0xc038);
CHECK_SYSREG(ID_AA64MMFR1_EL1, 0xc039);
CHECK_SYSREG(ID_AA64MMFR2_EL1, 0xc03a);
CHECK_SYSREG(SCTLR_EL1, 0xc080);
CHECK_SYSREG(CPACR_EL1, 0xc082);
CHECK_SYSREG(TTBR0_EL1, 0xc100);
CHECK_SYSREG(TTBR1_EL1, 0xc101);
CHECK_SYSREG(TCR_EL1, 0xc102);
CHECK_SYSREG(APIAKEYLO_EL1, 0xc108);
CHECK_SYSREG(APIAKEYHI_EL1, 0xc109);
CHECK_SYSREG(APIBKEYLO_EL1, 0xc10a);
CHECK_SYSREG(APIBKEYHI_EL1, 0xc10b);
CHECK_SYSREG(APDAKEYLO_EL1, 0xc110);
CHECK_SYSREG(APDAKEYHI_EL1, 0xc111);
CHECK_SYSREG(APDBKEYLO_EL1, 0xc112);
CHECK_SYSREG(APDBKEYHI_EL1, 0xc113);
CHECK_SYSREG(APGAKEYLO_EL1, 0xc118);
CHECK_SYSREG(APGAKEYHI_EL1, 0xc119);
CHECK_SYSREG(SPSR_EL1, 0xc200);
CHECK_SYSREG(ELR_EL1, 0xc201);
CHECK_SYSREG(SP_EL0, 0xc208);
CHECK_SYSREG(AFSR0_EL1, 0xc288);
CHECK_SYSREG(AFSR1_EL1, 0xc289);
CHECK_SYSREG(ESR_EL1, 0xc290);
CHECK_SYSREG(FAR_EL1, 0xc300);
CHECK_SYSREG(PAR_EL1, 0xc3a0);
CHECK_SYSREG(MAIR_EL1, 0xc510);
CHECK_SYSREG(AMAIR_EL1, 0xc518);
CHECK_SYSREG(VBAR_EL1, 0xc600);
CHECK_SYSREG(CONTEXTIDR_EL1, 0xc681);
CHECK_SYSREG(TPIDR_EL1, 0xc684);
CHECK_SYSREG(CNTKCTL_EL1, 0xc708);
CHECK_SYSREG(CSSELR_EL1, 0xd000);
CHECK_SYSREG(TPIDR_EL0, 0xde82);
CHECK_SYSREG(TPIDRRO_EL0, 0xde83);
CHECK_SYSREG(CNTV_CTL_EL0, 0xdf19);
CHECK_SYSREG(CNTV_CVAL_EL0, 0xdf1a);
CHECK_SYSREG(SP_EL1, 0xe208);

/* ---- Prototypes: the extern "C" block of bindings.rs (linked at load time) ---------- */

CHECK_FN(hv_vm_get_max_vcpu_count, hv_return_t (*)(uint32_t *),
         "bindings.rs: hv_vm_get_max_vcpu_count(*mut u32)");
CHECK_FN(hv_vm_create, hv_return_t (*)(hv_vm_config_t), "bindings.rs: hv_vm_create(hv_vm_config_t)");
CHECK_FN(hv_vm_destroy, hv_return_t (*)(void), "bindings.rs: hv_vm_destroy()");
CHECK_FN(hv_vm_map, hv_return_t (*)(void *, hv_ipa_t, size_t, hv_memory_flags_t),
         "bindings.rs: hv_vm_map(*mut c_void, hv_ipa_t, usize, hv_memory_flags_t)");
CHECK_FN(hv_vm_unmap, hv_return_t (*)(hv_ipa_t, size_t), "bindings.rs: hv_vm_unmap(hv_ipa_t, usize)");
/* Rust's `exit: *mut *const hv_vcpu_exit_t` (the backend only reads the exit record) has
 * the same ABI as the header's `hv_vcpu_exit_t **`. */
CHECK_FN(hv_vcpu_create, hv_return_t (*)(hv_vcpu_t *, hv_vcpu_exit_t **, hv_vcpu_config_t),
         "bindings.rs: hv_vcpu_create(*mut hv_vcpu_t, *mut *const hv_vcpu_exit_t, hv_vcpu_config_t)");
CHECK_FN(hv_vcpu_destroy, hv_return_t (*)(hv_vcpu_t), "bindings.rs: hv_vcpu_destroy(hv_vcpu_t)");
CHECK_FN(hv_vcpu_run, hv_return_t (*)(hv_vcpu_t), "bindings.rs: hv_vcpu_run(hv_vcpu_t)");
CHECK_FN(hv_vcpus_exit, hv_return_t (*)(hv_vcpu_t *, uint32_t),
         "bindings.rs: hv_vcpus_exit(*mut hv_vcpu_t, u32)");
CHECK_FN(hv_vcpu_get_reg, hv_return_t (*)(hv_vcpu_t, hv_reg_t, uint64_t *),
         "bindings.rs: hv_vcpu_get_reg(hv_vcpu_t, hv_reg_t, *mut u64)");
CHECK_FN(hv_vcpu_set_reg, hv_return_t (*)(hv_vcpu_t, hv_reg_t, uint64_t),
         "bindings.rs: hv_vcpu_set_reg(hv_vcpu_t, hv_reg_t, u64)");
CHECK_FN(hv_vcpu_get_simd_fp_reg, hv_return_t (*)(hv_vcpu_t, hv_simd_fp_reg_t, hv_simd_fp_uchar16_t *),
         "bindings.rs: hv_vcpu_get_simd_fp_reg(hv_vcpu_t, hv_simd_fp_reg_t, *mut hv_simd_fp_uchar16_t)");
/* set_simd_fp_reg calls it by hand: x0 = vcpu, x1 = reg, the vector by value in q0. */
CHECK_FN(hv_vcpu_set_simd_fp_reg, hv_return_t (*)(hv_vcpu_t, hv_simd_fp_reg_t, hv_simd_fp_uchar16_t),
         "bindings.rs: set_simd_fp_reg (x0 = vcpu, x1 = reg, q0 = value)");
CHECK_FN(hv_vcpu_get_sys_reg, hv_return_t (*)(hv_vcpu_t, hv_sys_reg_t, uint64_t *),
         "bindings.rs: hv_vcpu_get_sys_reg(hv_vcpu_t, hv_sys_reg_t, *mut u64)");
CHECK_FN(hv_vcpu_set_sys_reg, hv_return_t (*)(hv_vcpu_t, hv_sys_reg_t, uint64_t),
         "bindings.rs: hv_vcpu_set_sys_reg(hv_vcpu_t, hv_sys_reg_t, u64)");
CHECK_FN(hv_vcpu_set_vtimer_mask, hv_return_t (*)(hv_vcpu_t, bool),
         "bindings.rs: hv_vcpu_set_vtimer_mask(hv_vcpu_t, bool)");
CHECK_FN(hv_vcpu_get_vtimer_offset, hv_return_t (*)(hv_vcpu_t, uint64_t *),
         "bindings.rs: hv_vcpu_get_vtimer_offset(hv_vcpu_t, *mut u64)");
CHECK_FN(hv_vcpu_set_vtimer_offset, hv_return_t (*)(hv_vcpu_t, uint64_t),
         "bindings.rs: hv_vcpu_set_vtimer_offset(hv_vcpu_t, u64)");
CHECK_FN(hv_vcpu_set_pending_interrupt, hv_return_t (*)(hv_vcpu_t, hv_interrupt_type_t, bool),
         "bindings.rs: hv_vcpu_set_pending_interrupt(hv_vcpu_t, hv_interrupt_type_t, bool)");
CHECK_FN(mach_absolute_time, uint64_t (*)(void), "bindings.rs: mach_absolute_time() -> u64");
CHECK_FN(mach_timebase_info, kern_return_t (*)(mach_timebase_info_t),
         "bindings.rs: mach_timebase_info(*mut mach_timebase_info_data_t) -> i32");

/* ---- The in-framework GIC (macOS 15 SDK and later) ---------------------------------- */

#if __has_include(<Hypervisor/hv_gic_types.h>)

#include <Hypervisor/hv_gic_types.h>
#include <Hypervisor/hv_gic.h>
#include <Hypervisor/hv_gic_config.h>
#include <Hypervisor/hv_gic_parameters.h>
#include <Hypervisor/hv_gic_state.h>

/* hv_gic_icc_reg_t: sysreg.rs HvfSysReg::id and gic.rs GicApi::{get,set}_icc_reg take u16. */
CHECK_INT(hv_gic_icc_reg_t, 2, 0, "gic.rs: GicApi::get_icc_reg/set_icc_reg reg: u16");
/* hv_gic_config_t / hv_gic_state_t: gic.rs GicConfig / GicState = *mut c_void. */
CHECK_PTR(hv_gic_config_t, "gic.rs: GicConfig = *mut c_void");
CHECK_PTR(hv_gic_state_t, "gic.rs: GicState = *mut c_void");

/* sysreg.rs HVF_SYS_REGS, kind GicIcc. */
#define CHECK_ICC(name, rust) \
    CHECK_EQ(HV_GIC_ICC_REG_##name, rust, "sysreg.rs: HVF_SYS_REGS icc(" #rust ", \"ICC_" #name "\")")
CHECK_ICC(PMR_EL1, 0xc230);
CHECK_ICC(BPR0_EL1, 0xc643);
CHECK_ICC(AP0R0_EL1, 0xc644);
CHECK_ICC(AP1R0_EL1, 0xc648);
CHECK_ICC(RPR_EL1, 0xc65b);
CHECK_ICC(BPR1_EL1, 0xc663);
CHECK_ICC(CTLR_EL1, 0xc664);
CHECK_ICC(SRE_EL1, 0xc665);
CHECK_ICC(IGRPEN0_EL1, 0xc666);
CHECK_ICC(IGRPEN1_EL1, 0xc667);

/* The framework-reserved timer INTIDs, which the device tree's /timer node hard-codes:
 * crates/runner/src/aarch64/fdt.rs TIMER_INTIDS = [29, 30, 27, 26] (secure physical,
 * non-secure physical, virtual, hypervisor). */
CHECK_EQ(HV_GIC_INT_EL1_PHYSICAL_TIMER, 30, "runner/src/aarch64/fdt.rs: TIMER_INTIDS[1] (EL1 physical timer)");
CHECK_EQ(HV_GIC_INT_EL1_VIRTUAL_TIMER, 27, "runner/src/aarch64/fdt.rs: TIMER_INTIDS[2] (virtual timer)");
CHECK_EQ(HV_GIC_INT_EL2_PHYSICAL_TIMER, 26, "runner/src/aarch64/fdt.rs: TIMER_INTIDS[3] (hypervisor timer)");

/*
 * The hv_gic_* functions gic.rs resolves with dlsym and transmutes to these Rust types:
 * nothing but this file checks them against the C prototypes. The functions are
 * API_AVAILABLE(macos(15.0)); the backend looks them up at run time, so the availability
 * warning for naming them with an older deployment target does not apply here.
 */
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wunguarded-availability"
#pragma clang diagnostic ignored "-Wunguarded-availability-new"
CHECK_FN(hv_gic_config_create, hv_gic_config_t (*)(void),
         "gic.rs: GicApi::config_create: fn() -> GicConfig");
CHECK_FN(hv_gic_config_set_distributor_base, hv_return_t (*)(hv_gic_config_t, hv_ipa_t),
         "gic.rs: GicApi::config_set_distributor_base: fn(GicConfig, hv_ipa_t) -> hv_return_t");
CHECK_FN(hv_gic_config_set_redistributor_base, hv_return_t (*)(hv_gic_config_t, hv_ipa_t),
         "gic.rs: GicApi::config_set_redistributor_base: fn(GicConfig, hv_ipa_t) -> hv_return_t");
CHECK_FN(hv_gic_create, hv_return_t (*)(hv_gic_config_t),
         "gic.rs: GicApi::create: fn(GicConfig) -> hv_return_t");
CHECK_FN(hv_gic_set_spi, hv_return_t (*)(uint32_t, bool),
         "gic.rs: GicApi::set_spi: fn(u32, bool) -> hv_return_t");
CHECK_FN(hv_gic_get_distributor_size, hv_return_t (*)(size_t *),
         "gic.rs: GicApi::get_distributor_size: fn(*mut usize) -> hv_return_t");
CHECK_FN(hv_gic_get_spi_interrupt_range, hv_return_t (*)(uint32_t *, uint32_t *),
         "gic.rs: GicApi::get_spi_interrupt_range: fn(*mut u32, *mut u32) -> hv_return_t");
CHECK_FN(hv_gic_get_icc_reg, hv_return_t (*)(hv_vcpu_t, hv_gic_icc_reg_t, uint64_t *),
         "gic.rs: GicApi::get_icc_reg: fn(hv_vcpu_t, u16, *mut u64) -> hv_return_t");
CHECK_FN(hv_gic_set_icc_reg, hv_return_t (*)(hv_vcpu_t, hv_gic_icc_reg_t, uint64_t),
         "gic.rs: GicApi::set_icc_reg: fn(hv_vcpu_t, u16, u64) -> hv_return_t");
CHECK_FN(hv_gic_state_create, hv_gic_state_t (*)(void),
         "gic.rs: GicApi::state_create: fn() -> GicState");
CHECK_FN(hv_gic_state_get_size, hv_return_t (*)(hv_gic_state_t, size_t *),
         "gic.rs: GicApi::state_get_size: fn(GicState, *mut usize) -> hv_return_t");
CHECK_FN(hv_gic_state_get_data, hv_return_t (*)(hv_gic_state_t, void *),
         "gic.rs: GicApi::state_get_data: fn(GicState, *mut c_void) -> hv_return_t");
CHECK_FN(hv_gic_set_state, hv_return_t (*)(const void *, size_t),
         "gic.rs: GicApi::set_state: fn(*const c_void, usize) -> hv_return_t");
#pragma clang diagnostic pop
/* os_release (libSystem), which gic.rs also resolves, releases the config and state objects. */
CHECK_FN(os_release, void (*)(void *), "gic.rs: GicApi::os_release: fn(*mut c_void)");

#else

#warning "hv_layout.c: GIC part skipped: this SDK has no <Hypervisor/hv_gic_types.h> (it needs the macOS 15 SDK), so HV_GIC_ICC_REG_*, HV_GIC_INT_* and the hv_gic_* prototypes were NOT checked"

#endif
