//! Per-vCPU CPUID: KVM's supported set, adjusted so every vCPU reports its own
//! APIC id and a topology of `vcpus` single-threaded cores in one package.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX bit 31: running under a hypervisor (SDM vol. 2A CPUID, "not used
/// by the processor"; every hypervisor sets it).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: the logical-processor count in EBX[23:16] is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// KVM's paravirtual signature leaf and its feature leaf (Linux
/// Documentation/virt/kvm/x86/cpuid.rst).
const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// Extended topology leaves (SDM vol. 2A CPUID leaf 0BH and 1FH).
const TOPOLOGY_LEAVES: [u32; 2] = [0xb, 0x1f];
/// Level types in ECX[15:8] of the topology leaves.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` things (ceil(log2 n)), as the x2APIC id shift.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `entries` (from KVM_GET_SUPPORTED_CPUID) for vCPU `vcpu_id` of a VM
/// with `vcpus` vCPUs: one package of `vcpus` cores, one thread per core, APIC
/// id = vCPU id.
pub(crate) fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, vcpu_id: u32, vcpus: u32) {
    let vcpus = vcpus.max(1);
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let core_shift = bits_for(vcpus);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] addressable logical
                // processors in the package.
                let logical = vcpus.min(0xff);
                e.ebx = (e.ebx & 0x0000_ffff) | ((vcpu_id & 0xff) << 24) | (logical << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if vcpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Deterministic cache parameters: EAX[31:26] cores per package - 1,
            // EAX[25:14] logical processors sharing this cache - 1 (L1/L2 per
            // core, L3 shared by the package). A zero cache type ends the list.
            4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { vcpus - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x3fff) | (sharing.min(0xfff) << 14) | ((vcpus - 1).min(0x3f) << 26);
            }
            KVM_SIGNATURE_LEAF => {
                e.eax = e.eax.max(KVM_FEATURES_LEAF);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            0x8000_001e => {
                // AMD extended APIC id.
                e.eax = vcpu_id;
            }
            _ => {}
        }
    }

    // Rebuild the topology leaves KVM reports (or that the max basic leaf
    // promises) with this vCPU's x2APIC id in EDX: subleaf 0 is the thread
    // level (one thread per core), subleaf 1 the core level, later subleaves
    // are invalid (level type 0).
    for leaf in TOPOLOGY_LEAVES {
        let present = entries.iter().any(|e| e.function == leaf);
        if !present && (leaf != 0xb || max_basic < 0xb) {
            continue;
        }
        entries.retain(|e| e.function != leaf);
        let subleaf = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
            function: leaf,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx: (level_type << 8) | index,
            edx: vcpu_id,
            ..Default::default()
        };
        entries.push(subleaf(0, 0, 1, LEVEL_TYPE_SMT));
        entries.push(subleaf(1, core_shift, vcpus, LEVEL_TYPE_CORE));
        entries.push(subleaf(2, 0, 0, 0));
    }

    if !entries.iter().any(|e| e.function == KVM_SIGNATURE_LEAF) {
        entries.push(kvm_cpuid_entry2 {
            function: KVM_SIGNATURE_LEAF,
            eax: KVM_FEATURES_LEAF,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
    if !entries.iter().any(|e| e.function == KVM_FEATURES_LEAF) {
        // No paravirt features reported: advertise none.
        entries.push(kvm_cpuid_entry2 {
            function: KVM_FEATURES_LEAF,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn host_like() -> Vec<kvm_cpuid_entry2> {
        let mut leaf0 = entry(0, 0);
        leaf0.eax = 0xd;
        let mut leaf1 = entry(1, 0);
        leaf1.ebx = 0xff08_0800; // host APIC id 0xff, 8 logical, clflush 8
        let mut l1d = entry(4, 0);
        l1d.eax = 0x1c00_4121; // data cache, level 1, host sharing bits
        let mut l3 = entry(4, 3);
        l3.eax = 0x1c03_c163; // unified cache, level 3
        let end = entry(4, 4);
        vec![leaf0, leaf1, l1d, l3, end, entry(0xb, 0), entry(0xb, 1)]
    }

    #[test]
    fn normalize_leaf1_reports_apic_id_count_and_hypervisor_bit() {
        let mut e = host_like();
        normalize(&mut e, 3, 4);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH line size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn normalize_single_vcpu_clears_htt() {
        let mut e = host_like();
        e[1].edx = LEAF1_EDX_HTT;
        normalize(&mut e, 0, 1);
        assert_eq!(find(&e, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn normalize_leaf4_sets_cores_and_sharing() {
        let mut e = host_like();
        normalize(&mut e, 0, 4);
        let l1d = find(&e, 4, 0);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!(l1d.eax & 0x3fff, 0x0121, "cache type and level kept");
        let l3 = find(&e, 4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 shared by all vCPUs");
        assert_eq!(find(&e, 4, 4).eax, 0, "terminator untouched");
    }

    #[test]
    fn normalize_leaf_b_carries_x2apic_id_and_topology() {
        let mut e = host_like();
        normalize(&mut e, 2, 3);
        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&e, 0xb, 2);
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
        assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
        assert!(!e.iter().any(|x| x.function == 0x1f), "0x1f not invented");
    }

    #[test]
    fn normalize_adds_kvm_signature_when_missing() {
        let mut e = host_like();
        normalize(&mut e, 0, 1);
        let sig = find(&e, KVM_SIGNATURE_LEAF, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert!(sig.eax >= KVM_FEATURES_LEAF);
        assert_eq!(find(&e, KVM_FEATURES_LEAF, 0).eax, 0);
    }

    #[test]
    fn normalize_keeps_reported_kvm_features() {
        let mut e = host_like();
        let mut feat = entry(KVM_FEATURES_LEAF, 0);
        feat.eax = 0x0100_07fb;
        e.push(feat);
        normalize(&mut e, 0, 1);
        assert_eq!(find(&e, KVM_FEATURES_LEAF, 0).eax, 0x0100_07fb);
    }

    #[test]
    fn bits_for_counts_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
