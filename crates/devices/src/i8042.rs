//! The minimal i8042 keyboard controller x86 Linux expects at ports 0x60 / 0x64,
//! kept for its CPU reset line.
//!
//! Linux's reboot path (`arch/x86/kernel/reboot.c`, `BOOT_KBD`) polls the status
//! port until the input buffer is empty and writes command 0xFE ("pulse output
//! line 0", wired to the CPU's reset) to port 0x64. supermachine's FADT does not
//! advertise an 8042 (IAPC_BOOT_ARCH bit 1 clear), so Linux's i8042 driver does
//! not probe it and boots without the probe's exits; the ACPI reset register is
//! the first reset method and this device is the fallback.
//!
//! Besides reset it answers the few controller commands a probe uses (read/write
//! the command byte, self-test) so a driver that does probe sees a sane, empty
//! controller with no keyboard or mouse.

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, BusEvent};

/// Base of the port range the device occupies (data port).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports from the base the device occupies (0x60..0x65, like Firecracker's; 0x61
/// is the PC speaker port, handled in the kernel by KVM's PIT and answering 0 here
/// otherwise).
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the data port (0x60).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the command / status port (0x64).
pub const COMMAND_OFFSET: u64 = 4;

/// Controller command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;
/// Controller command: read the command byte.
pub const CMD_READ_CTR: u8 = 0x20;
/// Controller command: write the command byte (next data write).
pub const CMD_WRITE_CTR: u8 = 0x60;
/// Controller command: self-test; answers [`SELF_TEST_OK`].
pub const CMD_SELF_TEST: u8 = 0xaa;
/// Self-test passed.
pub const SELF_TEST_OK: u8 = 0x55;

/// Status: output buffer full (data waiting at port 0x60).
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// Status: system flag, set after a successful self-test.
const STATUS_SYSTEM: u8 = 1 << 2;
/// Status: last write was a command (port 0x64).
const STATUS_COMMAND: u8 = 1 << 3;

/// Command byte at power-on: keyboard interrupt enabled, system flag, translation.
const DEFAULT_CTR: u8 = 0x45;

/// The saved state of an [`I8042`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller command byte.
    pub control: u8,
    /// Byte waiting at the data port, if any.
    pub output: Option<u8>,
    /// A command waiting for its data byte.
    pub pending_command: Option<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            status: 0,
            control: DEFAULT_CTR,
            output: None,
            pending_command: None,
        }
    }
}

/// The i8042 controller.
#[derive(Debug, Default)]
pub struct I8042 {
    state: I8042State,
}

impl I8042 {
    /// A controller in its power-on state: status 0, nothing to read.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a controller from a saved state.
    pub fn from_state(state: &I8042State) -> Self {
        let mut c = Self::new();
        c.restore(state);
        c
    }

    /// Puts the controller in the saved `state` (a VM restored in place).
    pub fn restore(&mut self, state: &I8042State) {
        self.state = state.clone();
    }

    /// The state, for a snapshot.
    pub fn state(&self) -> I8042State {
        self.state.clone()
    }

    fn set_output(&mut self, value: u8) {
        self.state.output = Some(value);
        self.state.status |= STATUS_OUTPUT_FULL;
    }

    fn read_byte(&mut self, offset: u64) -> u8 {
        match offset {
            DATA_OFFSET => {
                self.state.status &= !STATUS_OUTPUT_FULL;
                self.state.output.take().unwrap_or(0)
            }
            COMMAND_OFFSET => self.state.status,
            _ => 0,
        }
    }

    fn write_byte(&mut self, offset: u64, value: u8) -> Option<BusEvent> {
        match offset {
            COMMAND_OFFSET => {
                self.state.status |= STATUS_COMMAND;
                self.state.pending_command = None;
                match value {
                    CMD_RESET_CPU => return Some(BusEvent::Reset { status: None }),
                    CMD_READ_CTR => self.set_output(self.state.control),
                    CMD_WRITE_CTR => self.state.pending_command = Some(value),
                    CMD_SELF_TEST => {
                        self.state.status |= STATUS_SYSTEM;
                        self.set_output(SELF_TEST_OK);
                    }
                    // Enabling/disabling ports and the rest have nothing to do
                    // without a keyboard or mouse.
                    _ => {}
                }
            }
            DATA_OFFSET => {
                self.state.status &= !STATUS_COMMAND;
                if self.state.pending_command.take() == Some(CMD_WRITE_CTR) {
                    self.state.control = value;
                }
                // Bytes for the (absent) keyboard are dropped.
            }
            _ => {}
        }
        None
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The ports are 8 bits wide; a wider access reads the first port and
        // zero above it.
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.read_byte(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusEvent> {
        data.first().and_then(|&b| self.write_byte(offset, b))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0xff];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn i8042_status_at_power_on_reads_zero() {
        let mut dev = I8042::new();
        assert_eq!(read(&mut dev, COMMAND_OFFSET), 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);
    }

    #[test]
    fn i8042_command_fe_requests_reset() {
        let mut dev = I8042::new();
        assert_eq!(
            dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]),
            Some(BusEvent::Reset { status: None })
        );
    }

    #[test]
    fn i8042_fe_on_data_port_is_not_reset() {
        let mut dev = I8042::new();
        assert_eq!(dev.write(DATA_OFFSET, &[CMD_RESET_CPU]), None);
        assert_eq!(dev.write(1, &[CMD_RESET_CPU]), None);
    }

    #[test]
    fn i8042_read_ctr_fills_output_buffer_once() {
        let mut dev = I8042::new();
        assert_eq!(dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]), None);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(read(&mut dev, DATA_OFFSET), DEFAULT_CTR);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn i8042_write_ctr_then_read_back() {
        let mut dev = I8042::new();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x30]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x30);
    }

    #[test]
    fn i8042_self_test_answers_ok() {
        let mut dev = I8042::new();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
    }

    #[test]
    fn i8042_state_round_trips() {
        let mut dev = I8042::new();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x11]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        let json = serde_json::to_string(&dev.state()).unwrap();
        let state: I8042State = serde_json::from_str(&json).unwrap();
        let mut restored = I8042::from_state(&state);
        assert_eq!(restored.state(), dev.state());
        assert_eq!(read(&mut restored, DATA_OFFSET), 0x11);
    }
}
