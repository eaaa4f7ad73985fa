//! The power block: ACPI hardware-reduced sleep and reset registers plus the exit
//! status supermachine's guest init reports before powering off.
//!
//! It decodes I/O ports [`POWER_PORT_BASE`] .. `+` [`POWER_PORT_LEN`] (0x600..0x608):
//!
//! | port  | offset | width | register |
//! |-------|--------|-------|----------|
//! | 0x600 | 0      | 8     | ACPI sleep control (FADT `SLEEP_CONTROL_REG`) |
//! | 0x601 | 1      | 8     | ACPI sleep status (FADT `SLEEP_STATUS_REG`) |
//! | 0x602 | 2      | 8     | ACPI reset (FADT `RESET_REG`, value [`RESET_VALUE`]) |
//! | 0x603 | 3      | 8     | reserved, reads 0 |
//! | 0x604 | 4..8   | 32 LE | exit status |
//!
//! ACPI 6.5 §4.8.3.7: in hardware-reduced ACPI, OSPM enters a sleep state by
//! writing `SLP_TYP` (bits 2-4) together with `SLP_EN` (bit 5) to the sleep control
//! register; Linux writes the `_S5_` package's value ([`SLP_TYP_S5`]) to power off.
//! ACPI 6.5 §4.8.3.6: writing the FADT reset value to the reset register resets
//! the machine. The exit status register is ours: the guest init writes its
//! entrypoint's exit status there (one 32-bit `out`) before it powers off, and
//! the value travels with the [`BusEvent`].

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, BusEvent};

/// First port of the power block on x86 (the guest ABI's,
/// `agent_protocol::power`).
pub const POWER_PORT_BASE: u64 = agent_protocol::power::X86_64_PORT_BASE as u64;
/// Ports the power block decodes.
pub const POWER_PORT_LEN: u64 = 8;
/// Offset of the ACPI sleep control register.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the ACPI sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the ACPI reset register.
pub const RESET_OFFSET: u64 = 2;
/// Offset of the 32-bit little-endian exit status register (the guest ABI's).
pub const EXIT_STATUS_OFFSET: u64 = agent_protocol::power::EXIT_STATUS_OFFSET as u64;
/// The value that, written to the reset register, resets the machine (FADT
/// `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x01;
/// Sleep control `SLP_EN` bit.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control `SLP_TYP` field position (bits 2-4).
pub const SLP_TYP_SHIFT: u8 = 2;
/// `SLP_TYP` for S5 (soft off); the DSDT's `_S5_` package carries this value.
pub const SLP_TYP_S5: u8 = 5;

/// The saved state of a [`PowerDevice`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerState {
    /// The exit status register.
    pub exit_status: u32,
}

/// The power block.
#[derive(Debug, Default)]
pub struct PowerDevice {
    exit_status: u32,
}

impl PowerDevice {
    /// A power block whose exit status is 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a power block from a saved state.
    pub fn from_state(state: &PowerState) -> Self {
        let mut p = Self::new();
        p.restore(state);
        p
    }

    /// Puts the block in the saved `state` (a VM restored in place).
    pub fn restore(&mut self, state: &PowerState) {
        self.exit_status = state.exit_status;
    }

    /// The state, for a snapshot.
    pub fn state(&self) -> PowerState {
        PowerState {
            exit_status: self.exit_status,
        }
    }

    /// The exit status the guest last wrote (0 if none).
    pub fn exit_status(&self) -> u32 {
        self.exit_status
    }

    fn read_byte(&self, offset: u64) -> u8 {
        match offset {
            // Sleep control is write-only; WAK_STS in sleep status never sets
            // because the machine never wakes from S5 here.
            SLEEP_CONTROL_OFFSET | SLEEP_STATUS_OFFSET | RESET_OFFSET => 0,
            EXIT_STATUS_OFFSET..=7 => {
                self.exit_status.to_le_bytes()[(offset - EXIT_STATUS_OFFSET) as usize]
            }
            _ => 0,
        }
    }

    /// Applies one byte; returns whether it asks for power-off or reset.
    fn write_byte(&mut self, offset: u64, value: u8) -> Option<Request> {
        match offset {
            SLEEP_CONTROL_OFFSET => {
                let slp_typ = (value >> SLP_TYP_SHIFT) & 0b111;
                // Other sleep types (S1-S4) are not offered (the DSDT has only
                // `_S5_`), so a request for them is ignored.
                (value & SLP_EN != 0 && slp_typ == SLP_TYP_S5).then_some(Request::PowerOff)
            }
            RESET_OFFSET => (value == RESET_VALUE).then_some(Request::Reset),
            EXIT_STATUS_OFFSET..=7 => {
                let mut bytes = self.exit_status.to_le_bytes();
                bytes[(offset - EXIT_STATUS_OFFSET) as usize] = value;
                self.exit_status = u32::from_le_bytes(bytes);
                None
            }
            // Sleep status bits are write-1-to-clear and none are ever set.
            _ => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Request {
    PowerOff,
    Reset,
}

impl BusDevice for PowerDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_byte(offset.saturating_add(i as u64));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusEvent> {
        // Every byte lands in its register first, so a wide write that covers both
        // the exit status and a request carries the new status.
        let mut request = None;
        for (i, &byte) in data.iter().enumerate() {
            if let Some(r) = self.write_byte(offset.saturating_add(i as u64), byte) {
                request.get_or_insert(r);
            }
        }
        request.map(|r| match r {
            Request::PowerOff => BusEvent::PowerOff {
                status: self.exit_status,
            },
            Request::Reset => BusEvent::Reset {
                status: Some(self.exit_status),
            },
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const S5_REQUEST: u8 = SLP_EN | (SLP_TYP_S5 << SLP_TYP_SHIFT);

    #[test]
    fn power_sleep_control_s5_without_status_powers_off_with_zero() {
        let mut p = PowerDevice::new();
        assert_eq!(S5_REQUEST, 0x34);
        assert_eq!(
            p.write(SLEEP_CONTROL_OFFSET, &[S5_REQUEST]),
            Some(BusEvent::PowerOff { status: 0 })
        );
    }

    #[test]
    fn power_exit_status_then_s5_reports_status() {
        let mut p = PowerDevice::new();
        assert_eq!(p.write(EXIT_STATUS_OFFSET, &42u32.to_le_bytes()), None);
        assert_eq!(
            p.write(SLEEP_CONTROL_OFFSET, &[S5_REQUEST]),
            Some(BusEvent::PowerOff { status: 42 })
        );
    }

    #[test]
    fn power_sleep_control_without_slp_en_or_other_type_ignored() {
        let mut p = PowerDevice::new();
        // SLP_TYP 5 without SLP_EN.
        assert_eq!(
            p.write(SLEEP_CONTROL_OFFSET, &[SLP_TYP_S5 << SLP_TYP_SHIFT]),
            None
        );
        // SLP_EN with S3's type.
        assert_eq!(
            p.write(SLEEP_CONTROL_OFFSET, &[SLP_EN | (3 << SLP_TYP_SHIFT)]),
            None
        );
        assert_eq!(p.write(SLEEP_STATUS_OFFSET, &[0xff]), None);
    }

    #[test]
    fn power_reset_value_resets_other_values_ignored() {
        let mut p = PowerDevice::new();
        assert_eq!(p.write(RESET_OFFSET, &[0x02]), None);
        assert_eq!(p.write(RESET_OFFSET, &[0x00]), None);
        p.write(EXIT_STATUS_OFFSET, &7u32.to_le_bytes());
        assert_eq!(
            p.write(RESET_OFFSET, &[RESET_VALUE]),
            Some(BusEvent::Reset { status: Some(7) })
        );
    }

    #[test]
    fn power_exit_status_reads_back_and_byte_writes_merge() {
        let mut p = PowerDevice::new();
        p.write(EXIT_STATUS_OFFSET, &0x1122_3344u32.to_le_bytes());
        p.write(EXIT_STATUS_OFFSET + 3, &[0xaa]);
        assert_eq!(p.exit_status(), 0xaa22_3344);
        let mut data = [0; 4];
        p.read(EXIT_STATUS_OFFSET, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xaa22_3344);
    }

    #[test]
    fn power_sleep_and_reset_registers_read_zero() {
        let mut p = PowerDevice::new();
        p.write(EXIT_STATUS_OFFSET, &u32::MAX.to_le_bytes());
        let mut data = [0xff; 4];
        p.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn power_wide_write_applies_status_before_request() {
        let mut p = PowerDevice::new();
        // A 64-bit write over the whole block: S5 request and status 9.
        let mut block = [0u8; 8];
        block[0] = S5_REQUEST;
        block[4..].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(p.write(0, &block), Some(BusEvent::PowerOff { status: 9 }));
    }

    #[test]
    fn power_state_round_trips() {
        let mut p = PowerDevice::new();
        p.write(EXIT_STATUS_OFFSET, &3u32.to_le_bytes());
        let json = serde_json::to_string(&p.state()).unwrap();
        let state: PowerState = serde_json::from_str(&json).unwrap();
        let mut restored = PowerDevice::from_state(&state);
        assert_eq!(restored.state(), p.state());
        assert_eq!(
            restored.write(SLEEP_CONTROL_OFFSET, &[S5_REQUEST]),
            Some(BusEvent::PowerOff { status: 3 })
        );
    }
}
