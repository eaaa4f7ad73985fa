//! Conversions between KVM's in-kernel PIC, IOAPIC and PIT state and the
//! backend-neutral [`hypervisor::x86_64::IrqchipState`] that snapshots carry:
//! field by field, so a snapshot never depends on kvm-bindings' struct layout.

use hypervisor::x86_64::{IoapicState, PicState, PitChannelState, PitState};
use kvm_bindings::{kvm_ioapic_state, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2};

/// One PIC, from KVM.
pub(crate) fn pic_from_kvm(p: &kvm_pic_state) -> PicState {
    PicState {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

/// One PIC, for KVM.
pub(crate) fn pic_to_kvm(p: &PicState) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

/// The IOAPIC, from KVM.
pub(crate) fn ioapic_from_kvm(s: &kvm_ioapic_state) -> IoapicState {
    let mut out = IoapicState {
        base_address: s.base_address,
        ioregsel: s.ioregsel,
        id: s.id,
        irr: s.irr,
        ..Default::default()
    };
    for (dst, entry) in out.redirection.iter_mut().zip(&s.redirtbl) {
        // SAFETY: both union members are plain integer views of the same 8
        // bytes; every bit pattern is a valid u64.
        *dst = unsafe { entry.bits };
    }
    out
}

/// The IOAPIC, for KVM.
pub(crate) fn ioapic_to_kvm(s: &IoapicState) -> kvm_ioapic_state {
    let mut out = kvm_ioapic_state {
        base_address: s.base_address,
        ioregsel: s.ioregsel,
        id: s.id,
        irr: s.irr,
        ..Default::default()
    };
    for (entry, bits) in out.redirtbl.iter_mut().zip(&s.redirection) {
        entry.bits = *bits;
    }
    out
}

/// The PIT, from KVM.
pub(crate) fn pit_from_kvm(s: &kvm_pit_state2) -> PitState {
    let mut out = PitState {
        flags: s.flags,
        ..Default::default()
    };
    for (dst, c) in out.channels.iter_mut().zip(&s.channels) {
        *dst = PitChannelState {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        };
    }
    out
}

/// The PIT, for KVM.
pub(crate) fn pit_to_kvm(s: &PitState) -> kvm_pit_state2 {
    let mut out = kvm_pit_state2 {
        flags: s.flags,
        ..Default::default()
    };
    for (dst, c) in out.channels.iter_mut().zip(&s.channels) {
        *dst = kvm_pit_channel_state {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pic_round_trip_keeps_every_register() {
        let p = PicState {
            last_irr: 1,
            irr: 2,
            imr: 3,
            isr: 4,
            priority_add: 5,
            irq_base: 6,
            read_reg_select: 7,
            poll: 8,
            special_mask: 9,
            init_state: 10,
            auto_eoi: 11,
            rotate_on_auto_eoi: 12,
            special_fully_nested_mode: 13,
            init4: 14,
            elcr: 15,
            elcr_mask: 16,
        };
        assert_eq!(pic_from_kvm(&pic_to_kvm(&p)), p);
    }

    #[test]
    fn ioapic_round_trip_keeps_redirection_entries() {
        let mut s = IoapicState {
            base_address: 0xfec0_0000,
            ioregsel: 0x10,
            id: 2,
            irr: 0x10,
            ..Default::default()
        };
        s.redirection[23] = 0x0001_0000_0000_0030;
        s.redirection[0] = 1 << 16;
        let k = ioapic_to_kvm(&s);
        // SAFETY: reading the integer view of a plain union.
        assert_eq!(unsafe { k.redirtbl[23].bits }, 0x0001_0000_0000_0030);
        assert_eq!(ioapic_from_kvm(&k), s);
    }

    #[test]
    fn pit_round_trip_keeps_channels_and_flags() {
        let mut s = PitState {
            flags: 1,
            ..Default::default()
        };
        s.channels[2].count = 0x1_0000;
        s.channels[2].mode = 3;
        s.channels[1].gate = 1;
        s.channels[0].count_load_time = -5;
        assert_eq!(pit_from_kvm(&pit_to_kvm(&s)), s);
    }
}
