//! Byte encodings of the in-kernel PIC, IOAPIC and PIT state for
//! [`hypervisor::x86_64::VmState`], which carries them as opaque `Vec<u8>`.
//!
//! The layouts are ours (fixed, little endian, field by field, independent of
//! kvm-bindings' struct layout and padding), so a snapshot stays readable when
//! the bindings change:
//!
//! * PIC (one 8259), 16 bytes, one byte each in this order: `last_irr, irr, imr,
//!   isr, priority_add, irq_base, read_reg_select, poll, special_mask,
//!   init_state, auto_eoi, rotate_on_auto_eoi, special_fully_nested_mode, init4,
//!   elcr, elcr_mask` (KVM's `struct kvm_pic_state`).
//! * IOAPIC, 216 bytes: `base_address: u64, ioregsel: u32, id: u32, irr: u32,
//!   pad: u32`, then the 24 redirection-table entries as `u64` each (82093AA
//!   datasheet §3.2.4 bit layout).
//! * PIT (8254), 76 bytes: three channels of 24 bytes (`count: u32,
//!   latched_count: u16`, then one byte each `count_latched, status_latched,
//!   status, read_state, write_state, write_latch, rw_mode, mode, bcd, gate`, then
//!   `count_load_time: i64`), then `flags: u32` (KVM's `struct kvm_pit_state2`).

use kvm_bindings::{kvm_ioapic_state, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2};

/// Encoded size of one PIC.
pub(crate) const PIC_LEN: usize = 16;
/// Encoded size of the IOAPIC.
pub(crate) const IOAPIC_LEN: usize = 24 + 24 * 8;
/// Encoded size of one PIT channel.
const PIT_CHANNEL_LEN: usize = 24;
/// Encoded size of the PIT.
pub(crate) const PIT_LEN: usize = 3 * PIT_CHANNEL_LEN + 4;

/// Little-endian reader over a buffer whose length was checked up front.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fn check_len(what: &str, bytes: &[u8], expected: usize) -> Result<(), String> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(format!(
            "{what} state is {} bytes, expected {expected}",
            bytes.len()
        ))
    }
}

/// Encodes one PIC.
pub(crate) fn pic_to_bytes(p: &kvm_pic_state) -> Vec<u8> {
    vec![
        p.last_irr,
        p.irr,
        p.imr,
        p.isr,
        p.priority_add,
        p.irq_base,
        p.read_reg_select,
        p.poll,
        p.special_mask,
        p.init_state,
        p.auto_eoi,
        p.rotate_on_auto_eoi,
        p.special_fully_nested_mode,
        p.init4,
        p.elcr,
        p.elcr_mask,
    ]
}

/// Decodes one PIC.
pub(crate) fn pic_from_bytes(b: &[u8]) -> Result<kvm_pic_state, String> {
    check_len("PIC", b, PIC_LEN)?;
    Ok(kvm_pic_state {
        last_irr: b[0],
        irr: b[1],
        imr: b[2],
        isr: b[3],
        priority_add: b[4],
        irq_base: b[5],
        read_reg_select: b[6],
        poll: b[7],
        special_mask: b[8],
        init_state: b[9],
        auto_eoi: b[10],
        rotate_on_auto_eoi: b[11],
        special_fully_nested_mode: b[12],
        init4: b[13],
        elcr: b[14],
        elcr_mask: b[15],
    })
}

/// Encodes the IOAPIC.
pub(crate) fn ioapic_to_bytes(s: &kvm_ioapic_state) -> Vec<u8> {
    let mut out = Vec::with_capacity(IOAPIC_LEN);
    out.extend_from_slice(&s.base_address.to_le_bytes());
    out.extend_from_slice(&s.ioregsel.to_le_bytes());
    out.extend_from_slice(&s.id.to_le_bytes());
    out.extend_from_slice(&s.irr.to_le_bytes());
    out.extend_from_slice(&s.pad.to_le_bytes());
    for entry in &s.redirtbl {
        // SAFETY: both union members are plain integer views of the same 8
        // bytes; every bit pattern is a valid u64.
        let bits = unsafe { entry.bits };
        out.extend_from_slice(&bits.to_le_bytes());
    }
    out
}

/// Decodes the IOAPIC.
pub(crate) fn ioapic_from_bytes(b: &[u8]) -> Result<kvm_ioapic_state, String> {
    check_len("IOAPIC", b, IOAPIC_LEN)?;
    let mut r = Reader(b);
    let mut s = kvm_ioapic_state {
        base_address: r.u64(),
        ioregsel: r.u32(),
        id: r.u32(),
        irr: r.u32(),
        pad: r.u32(),
        ..Default::default()
    };
    for entry in &mut s.redirtbl {
        entry.bits = r.u64();
    }
    Ok(s)
}

/// Encodes the PIT.
pub(crate) fn pit_to_bytes(s: &kvm_pit_state2) -> Vec<u8> {
    let mut out = Vec::with_capacity(PIT_LEN);
    for c in &s.channels {
        out.extend_from_slice(&c.count.to_le_bytes());
        out.extend_from_slice(&c.latched_count.to_le_bytes());
        out.extend_from_slice(&[
            c.count_latched,
            c.status_latched,
            c.status,
            c.read_state,
            c.write_state,
            c.write_latch,
            c.rw_mode,
            c.mode,
            c.bcd,
            c.gate,
        ]);
        out.extend_from_slice(&c.count_load_time.to_le_bytes());
    }
    out.extend_from_slice(&s.flags.to_le_bytes());
    out
}

/// Decodes the PIT.
pub(crate) fn pit_from_bytes(b: &[u8]) -> Result<kvm_pit_state2, String> {
    check_len("PIT", b, PIT_LEN)?;
    let mut r = Reader(b);
    let mut s = kvm_pit_state2::default();
    for c in &mut s.channels {
        *c = kvm_pit_channel_state {
            count: r.u32(),
            latched_count: r.u16(),
            count_latched: r.u8(),
            status_latched: r.u8(),
            status: r.u8(),
            read_state: r.u8(),
            write_state: r.u8(),
            write_latch: r.u8(),
            rw_mode: r.u8(),
            mode: r.u8(),
            bcd: r.u8(),
            gate: r.u8(),
            count_load_time: i64::from_le_bytes(r.take()),
        };
    }
    s.flags = r.u32();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pic_round_trip_keeps_field_order() {
        let bytes: Vec<u8> = (1..=16).collect();
        let p = pic_from_bytes(&bytes).unwrap();
        assert_eq!(p.imr, 3);
        assert_eq!(p.elcr_mask, 16);
        assert_eq!(pic_to_bytes(&p), bytes);
    }

    #[test]
    fn ioapic_round_trip_keeps_redirection_entries() {
        let mut s = kvm_ioapic_state {
            base_address: 0xfec0_0000,
            id: 2,
            irr: 0x10,
            ..Default::default()
        };
        s.redirtbl[23].bits = 0x0001_0000_0000_0030;
        let bytes = ioapic_to_bytes(&s);
        assert_eq!(bytes.len(), IOAPIC_LEN);
        let back = ioapic_from_bytes(&bytes).unwrap();
        assert_eq!(back.base_address, 0xfec0_0000);
        // SAFETY: reading the integer view of a plain union.
        assert_eq!(unsafe { back.redirtbl[23].bits }, 0x0001_0000_0000_0030);
        assert_eq!(ioapic_to_bytes(&back), bytes);
    }

    #[test]
    fn pit_round_trip_keeps_channels_and_flags() {
        let mut s = kvm_pit_state2 {
            flags: 1,
            ..Default::default()
        };
        s.channels[2].count = 0x1_0000;
        s.channels[2].mode = 3;
        s.channels[0].count_load_time = -5;
        let bytes = pit_to_bytes(&s);
        assert_eq!(bytes.len(), PIT_LEN);
        let back = pit_from_bytes(&bytes).unwrap();
        assert_eq!(back.channels[2].count, 0x1_0000);
        assert_eq!(back.channels[2].mode, 3);
        assert_eq!(back.channels[0].count_load_time, -5);
        assert_eq!(back.flags, 1);
    }

    #[test]
    fn decoders_wrong_length_refused() {
        assert!(pic_from_bytes(&[0; 15]).is_err());
        assert!(ioapic_from_bytes(&[0; IOAPIC_LEN + 1]).is_err());
        assert!(pit_from_bytes(&[]).is_err());
    }
}
