//! Conversions between the seam's neutral x86-64 state types and KVM's
//! structures. Plain functions, no ioctls, so each is unit-tested.
//!
//! What KVM has and the neutral types lack is dropped on save and taken from the
//! live vCPU on restore: `kvm_sregs.interrupt_bitmap` (only used with a
//! userspace interrupt controller; ours is in the kernel), and the newer
//! `kvm_vcpu_events` fields (exception payload, `smi.smm_inside_nmi`,
//! `smi.latched_init`, triple-fault pending).

use std::collections::BTreeMap;

use hypervisor::x86_64::{CpuidEntry, DescriptorTable, Events, MpState, Regs, Segment, Sregs};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_lapic_state, kvm_mp_state, kvm_regs,
    kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_MAX_XCRS, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SHADOW, KVM_VCPUEVENT_VALID_SIPI_VECTOR, KVM_VCPUEVENT_VALID_SMM,
};

/// Size of the local APIC register page KVM exchanges (KVM_GET_LAPIC).
pub const LAPIC_SIZE: usize = 1024;

/// Neutral general-purpose registers from KVM's.
pub fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// KVM's general-purpose registers from the neutral ones.
pub fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// Neutral segment from KVM's (any nonzero flag byte is `true`).
pub fn segment_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

/// KVM's segment from the neutral one.
pub fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

/// Neutral GDTR/IDTR from KVM's.
pub fn dtable_from_kvm(t: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: t.base,
        limit: t.limit,
    }
}

/// KVM's GDTR/IDTR from the neutral one.
pub fn dtable_to_kvm(t: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: t.base,
        limit: t.limit,
        padding: [0; 3],
    }
}

/// Neutral system registers from KVM's (`interrupt_bitmap` is dropped, see the
/// module doc).
pub fn sregs_from_kvm(s: &kvm_sregs) -> Sregs {
    Sregs {
        cs: segment_from_kvm(&s.cs),
        ds: segment_from_kvm(&s.ds),
        es: segment_from_kvm(&s.es),
        fs: segment_from_kvm(&s.fs),
        gs: segment_from_kvm(&s.gs),
        ss: segment_from_kvm(&s.ss),
        tr: segment_from_kvm(&s.tr),
        ldt: segment_from_kvm(&s.ldt),
        gdt: dtable_from_kvm(&s.gdt),
        idt: dtable_from_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// KVM's system registers from the neutral ones, with an empty
/// `interrupt_bitmap`: with the in-kernel interrupt controller pending
/// interrupts live in the LAPIC and the vCPU events, not here.
pub fn sregs_to_kvm(s: &Sregs) -> kvm_sregs {
    kvm_sregs {
        cs: segment_to_kvm(&s.cs),
        ds: segment_to_kvm(&s.ds),
        es: segment_to_kvm(&s.es),
        fs: segment_to_kvm(&s.fs),
        gs: segment_to_kvm(&s.gs),
        ss: segment_to_kvm(&s.ss),
        tr: segment_to_kvm(&s.tr),
        ldt: segment_to_kvm(&s.ldt),
        gdt: dtable_to_kvm(&s.gdt),
        idt: dtable_to_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: [0; 4],
    }
}

/// Neutral run state from KVM's; `None` for states that do not exist on x86
/// (s390's STOPPED etc.) or are newer than this code.
pub fn mp_state_from_kvm(m: kvm_mp_state) -> Option<MpState> {
    Some(match m.mp_state {
        KVM_MP_STATE_RUNNABLE => MpState::Runnable,
        KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
        KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
        KVM_MP_STATE_HALTED => MpState::Halted,
        KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
        _ => return None,
    })
}

/// KVM's run state from the neutral one.
pub fn mp_state_to_kvm(m: MpState) -> kvm_mp_state {
    let mp_state = match m {
        MpState::Runnable => KVM_MP_STATE_RUNNABLE,
        MpState::Uninitialized => KVM_MP_STATE_UNINITIALIZED,
        MpState::InitReceived => KVM_MP_STATE_INIT_RECEIVED,
        MpState::Halted => KVM_MP_STATE_HALTED,
        MpState::SipiReceived => KVM_MP_STATE_SIPI_RECEIVED,
    };
    kvm_mp_state { mp_state }
}

/// Neutral in-flight events from KVM's.
pub fn events_from_kvm(e: &kvm_vcpu_events) -> Events {
    Events {
        exception_injected: e.exception.injected != 0,
        exception_nr: e.exception.nr,
        exception_has_error_code: e.exception.has_error_code != 0,
        exception_error_code: e.exception.error_code,
        interrupt_injected: e.interrupt.injected != 0,
        interrupt_nr: e.interrupt.nr,
        interrupt_soft: e.interrupt.soft != 0,
        interrupt_shadow: e.interrupt.shadow,
        nmi_injected: e.nmi.injected != 0,
        nmi_pending: e.nmi.pending != 0,
        nmi_masked: e.nmi.masked != 0,
        sipi_vector: e.sipi_vector,
        smi_pending: e.smi.pending != 0,
        smm: e.smi.smm != 0,
    }
}

/// KVM's in-flight events from the neutral ones, with the `flags` that make
/// KVM_SET_VCPU_EVENTS apply the NMI-pending, SIPI, shadow and SMM fields
/// (KVM API doc §4.32).
pub fn events_to_kvm(e: &Events) -> kvm_vcpu_events {
    let mut k = kvm_vcpu_events::default();
    k.exception.injected = u8::from(e.exception_injected);
    k.exception.nr = e.exception_nr;
    k.exception.has_error_code = u8::from(e.exception_has_error_code);
    k.exception.error_code = e.exception_error_code;
    k.interrupt.injected = u8::from(e.interrupt_injected);
    k.interrupt.nr = e.interrupt_nr;
    k.interrupt.soft = u8::from(e.interrupt_soft);
    k.interrupt.shadow = e.interrupt_shadow;
    k.nmi.injected = u8::from(e.nmi_injected);
    k.nmi.pending = u8::from(e.nmi_pending);
    k.nmi.masked = u8::from(e.nmi_masked);
    k.sipi_vector = e.sipi_vector;
    k.smi.pending = u8::from(e.smi_pending);
    k.smi.smm = u8::from(e.smm);
    k.flags = KVM_VCPUEVENT_VALID_NMI_PENDING
        | KVM_VCPUEVENT_VALID_SIPI_VECTOR
        | KVM_VCPUEVENT_VALID_SHADOW
        | KVM_VCPUEVENT_VALID_SMM;
    k
}

/// A neutral CPUID leaf from KVM's (its obsolete stateful-function flags are
/// dropped: KVM_SET_CPUID2 ignores them).
pub fn cpuid_from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        index_significant: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

/// KVM's CPUID leaf from a neutral one.
pub fn cpuid_to_kvm(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: if e.index_significant {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// Extended control registers by index.
pub fn xcrs_from_kvm(x: &kvm_xcrs) -> BTreeMap<u32, u64> {
    let n = (x.nr_xcrs as usize).min(x.xcrs.len());
    x.xcrs[..n].iter().map(|r| (r.xcr, r.value)).collect()
}

/// KVM's XCR list; `None` when there are more than KVM can take.
pub fn xcrs_to_kvm(x: &BTreeMap<u32, u64>) -> Option<kvm_xcrs> {
    if x.len() > KVM_MAX_XCRS as usize {
        return None;
    }
    let mut k = kvm_xcrs {
        nr_xcrs: x.len() as u32,
        ..Default::default()
    };
    for (slot, (&xcr, &value)) in k.xcrs.iter_mut().zip(x) {
        slot.xcr = xcr;
        slot.value = value;
    }
    Some(k)
}

/// DR0-DR3, DR6, DR7.
pub fn debug_regs_from_kvm(d: &kvm_debugregs) -> [u64; 6] {
    [d.db[0], d.db[1], d.db[2], d.db[3], d.dr6, d.dr7]
}

/// KVM's debug registers from DR0-DR3, DR6, DR7.
pub fn debug_regs_to_kvm(d: &[u64; 6]) -> kvm_debugregs {
    kvm_debugregs {
        db: [d[0], d[1], d[2], d[3]],
        dr6: d[4],
        dr7: d[5],
        ..Default::default()
    }
}

/// The LAPIC register page as bytes.
pub fn lapic_from_kvm(l: &kvm_lapic_state) -> Vec<u8> {
    l.regs.iter().map(|&b| b as u8).collect()
}

/// KVM's LAPIC page; `None` unless `bytes` is exactly [`LAPIC_SIZE`] long.
pub fn lapic_to_kvm(bytes: &[u8]) -> Option<kvm_lapic_state> {
    if bytes.len() != LAPIC_SIZE {
        return None;
    }
    let mut l = kvm_lapic_state::default();
    for (dst, &src) in l.regs.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Some(l)
}

/// Reads the 32-bit LAPIC register at byte `offset` (xAPIC layout, SDM vol. 3
/// §11.4.1: registers sit on 16-byte boundaries).
pub fn lapic_reg(l: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| l.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// Writes the 32-bit LAPIC register at byte `offset`.
pub fn set_lapic_reg(l: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        l.regs[offset + i] = byte as libc::c_char;
    }
}

/// 32-bit words of an XSAVE area (as KVM stores them) to bytes, little endian.
pub fn xsave_words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Fills `words` from `bytes` (little endian); a short last chunk is zero-padded
/// and words past the end of `bytes` are left alone (callers pass a zeroed
/// buffer, which XSAVE's header reads as "components in their initial state").
pub fn xsave_bytes_to_words(bytes: &[u8], words: &mut [u32]) {
    for (w, chunk) in words.iter_mut().zip(bytes.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u32::from_le_bytes(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_round_trips_and_keeps_the_subleaf_flag() {
        let k = kvm_cpuid_entry2 {
            function: 0xb,
            index: 1,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: 4,
            ebx: 2,
            ecx: 0x201,
            edx: 1,
            ..Default::default()
        };
        let n = cpuid_from_kvm(&k);
        assert!(n.index_significant);
        assert_eq!(
            (n.function, n.index, n.eax, n.ebx, n.ecx, n.edx),
            (0xb, 1, 4, 2, 0x201, 1)
        );
        let back = cpuid_to_kvm(&n);
        assert_eq!(back.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        assert_eq!(
            (back.function, back.index, back.ecx, back.edx),
            (0xb, 1, 0x201, 1)
        );
        let plain = cpuid_to_kvm(&CpuidEntry {
            function: 1,
            ..Default::default()
        });
        assert_eq!(plain.flags, 0);
    }

    fn code_segment() -> Segment {
        Segment {
            base: 0x1000,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        }
    }

    #[test]
    fn segment_round_trip_preserves_every_field() {
        let s = code_segment();
        let k = segment_to_kvm(&s);
        assert_eq!(k.l, 1);
        assert_eq!(k.db, 0);
        assert_eq!(k.type_, 0xb);
        assert_eq!(segment_from_kvm(&k), s);
    }

    #[test]
    fn segment_from_kvm_nonzero_flag_is_true() {
        let k = kvm_segment {
            present: 0xff,
            unusable: 2,
            ..Default::default()
        };
        let s = segment_from_kvm(&k);
        assert!(s.present);
        assert!(s.unusable);
        assert!(!s.g);
    }

    #[test]
    fn sregs_round_trip_with_empty_interrupt_bitmap() {
        let s = Sregs {
            cs: code_segment(),
            gdt: DescriptorTable {
                base: 0x500,
                limit: 0x1f,
            },
            cr0: 0x8000_0011,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let k = sregs_to_kvm(&s);
        assert_eq!(k.interrupt_bitmap, [0; 4]);
        assert_eq!(k.gdt.limit, 0x1f);
        assert_eq!(sregs_from_kvm(&k), s);
    }

    #[test]
    fn regs_round_trip_preserves_every_field() {
        let r = Regs {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 7,
            rbp: 8,
            r8: 9,
            r9: 10,
            r10: 11,
            r11: 12,
            r12: 13,
            r13: 14,
            r14: 15,
            r15: 16,
            rip: 17,
            rflags: 18,
        };
        assert_eq!(regs_from_kvm(&regs_to_kvm(&r)), r);
    }

    #[test]
    fn mp_state_round_trip_covers_every_state() {
        for m in [
            MpState::Runnable,
            MpState::Uninitialized,
            MpState::InitReceived,
            MpState::Halted,
            MpState::SipiReceived,
        ] {
            assert_eq!(mp_state_from_kvm(mp_state_to_kvm(m)), Some(m));
        }
    }

    #[test]
    fn mp_state_from_kvm_unknown_state_is_none() {
        assert_eq!(mp_state_from_kvm(kvm_mp_state { mp_state: 5 }), None);
    }

    #[test]
    fn events_round_trip_sets_valid_flags() {
        let e = Events {
            exception_injected: true,
            exception_nr: 14,
            exception_has_error_code: true,
            exception_error_code: 2,
            interrupt_injected: true,
            interrupt_nr: 0x20,
            interrupt_soft: false,
            interrupt_shadow: 1,
            nmi_injected: false,
            nmi_pending: true,
            nmi_masked: true,
            sipi_vector: 0x9f,
            smi_pending: false,
            smm: false,
        };
        let k = events_to_kvm(&e);
        assert_ne!(k.flags & KVM_VCPUEVENT_VALID_NMI_PENDING, 0);
        assert_ne!(k.flags & KVM_VCPUEVENT_VALID_SHADOW, 0);
        assert_eq!(events_from_kvm(&k), e);
    }

    #[test]
    fn xcrs_round_trip_by_index() {
        let x = BTreeMap::from([(0u32, 0x7u64), (1, 0x1)]);
        let k = xcrs_to_kvm(&x).unwrap();
        assert_eq!(k.nr_xcrs, 2);
        assert_eq!(xcrs_from_kvm(&k), x);
    }

    #[test]
    fn xcrs_to_kvm_too_many_is_none() {
        let x: BTreeMap<u32, u64> = (0..=KVM_MAX_XCRS).map(|i| (i, 0)).collect();
        assert!(xcrs_to_kvm(&x).is_none());
    }

    #[test]
    fn xcrs_from_kvm_bogus_count_is_clamped() {
        let k = kvm_xcrs {
            nr_xcrs: 1000,
            ..Default::default()
        };
        assert_eq!(
            xcrs_from_kvm(&k).len(),
            1,
            "all-zero entries collapse to index 0"
        );
    }

    #[test]
    fn debug_regs_round_trip_in_order() {
        let d = [1, 2, 3, 4, 0xffff_0ff0, 0x400];
        let k = debug_regs_to_kvm(&d);
        assert_eq!(k.dr6, 0xffff_0ff0);
        assert_eq!(k.dr7, 0x400);
        assert_eq!(debug_regs_from_kvm(&k), d);
    }

    #[test]
    fn lapic_round_trip_and_wrong_size_refused() {
        let bytes: Vec<u8> = (0..LAPIC_SIZE).map(|i| i as u8).collect();
        let k = lapic_to_kvm(&bytes).unwrap();
        assert_eq!(lapic_from_kvm(&k), bytes);
        assert!(lapic_to_kvm(&bytes[..100]).is_none());
    }

    #[test]
    fn lapic_reg_reads_and_writes_little_endian() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, 0x350, 0x0000_0700);
        assert_eq!(l.regs[0x351] as u8, 0x07);
        assert_eq!(lapic_reg(&l, 0x350), 0x700);
    }

    #[test]
    fn xsave_words_bytes_round_trip_and_short_input_zero_fills() {
        let words = [0x0403_0201u32, 0x0807_0605];
        let bytes = xsave_words_to_bytes(&words);
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut back = [0xffff_ffffu32; 3];
        xsave_bytes_to_words(&bytes[..6], &mut back);
        assert_eq!(back, [0x0403_0201, 0x0000_0605, 0xffff_ffff]);
    }
}
