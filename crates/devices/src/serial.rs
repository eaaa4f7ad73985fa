//! The 16550A UART on COM1 (I/O ports 0x3f8..0x400, ISA IRQ 4), built on
//! vm-superio's register model.
//!
//! Output goes to any [`Write`] (the VMM gives stdout); input is injected with
//! [`Serial::enqueue_input`]. The interrupt is edge-triggered, as the ISA IRQ 4 line
//! is on the IOAPIC (ACPI DSDT `PNP0501` with an edge, active-high IRQ).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialEvents;

use crate::bus::{BusDevice, BusEvent};
use crate::interrupt::{Interrupt, InterruptError};

/// COM1 base port.
pub const COM1_PORT_BASE: u64 = 0x3f8;
/// Ports a 16550A decodes.
pub const COM1_PORT_LEN: u64 = 8;
/// COM1's ISA interrupt (identity-mapped to IOAPIC GSI 4).
pub const COM1_GSI: u32 = 4;

/// Serial operations that can fail.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Raising the serial interrupt failed.
    #[error("raising the serial interrupt failed")]
    Interrupt(#[source] InterruptError),
    /// The receive FIFO is full: the guest has not read the input yet.
    #[error("the serial receive FIFO is full; retry after the guest reads it")]
    FifoFull,
    /// A saved state holds more input than the FIFO can.
    #[error("saved serial state holds {len} input bytes, more than the FIFO holds")]
    StateFifoTooLarge {
        /// Bytes in the saved state.
        len: usize,
    },
    /// Writing guest output failed.
    #[error("writing serial output failed")]
    Output(#[source] std::io::Error),
}

impl From<vm_superio::serial::Error<InterruptError>> for SerialError {
    fn from(e: vm_superio::serial::Error<InterruptError>) -> Self {
        match e {
            vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
            vm_superio::serial::Error::IOError(e) => SerialError::Output(e),
            vm_superio::serial::Error::FullFifo => SerialError::FifoFull,
        }
    }
}

/// vm-superio's `Trigger` over our [`Interrupt`].
struct IrqTrigger(Arc<dyn Interrupt>);

impl vm_superio::Trigger for IrqTrigger {
    type E = InterruptError;

    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.trigger()
    }
}

/// Counts output bytes the writer refused, so a closed stdout is logged once,
/// not once per guest byte.
#[derive(Debug, Default)]
struct LostBytes(AtomicU64);

impl SerialEvents for LostBytes {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

/// The saved registers and pending input of a [`Serial`]. `Default` is the
/// power-on state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl Default for SerialState {
    fn default() -> Self {
        vm_superio::serial::SerialState::default().into()
    }
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// A 16550A UART.
pub struct Serial<W: Write + Send> {
    uart: vm_superio::Serial<IrqTrigger, Arc<LostBytes>, W>,
    lost: Arc<LostBytes>,
    // Only the first interrupt failure is logged: a broken line stays broken.
    interrupt_failure_logged: bool,
}

impl<W: Write + Send> std::fmt::Debug for Serial<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.state())
            .field("lost_output_bytes", &self.lost_output_bytes())
            .finish()
    }
}

/// Bytes the UART's receive FIFO holds (vm-superio's); a saved state with more
/// pending input is refused.
pub const FIFO_LEN: usize = 64;

/// A saved state vm-superio refused.
fn state_error(e: vm_superio::serial::Error<InterruptError>, state: &SerialState) -> SerialError {
    match e {
        vm_superio::serial::Error::FullFifo => SerialError::StateFifoTooLarge {
            len: state.in_buffer.len(),
        },
        other => other.into(),
    }
}

impl<W: Write + Send> Serial<W> {
    /// A UART in its power-on state writing guest output to `out`.
    pub fn new(interrupt: Arc<dyn Interrupt>, out: W) -> Self {
        let lost = Arc::new(LostBytes::default());
        Self {
            uart: vm_superio::Serial::with_events(IrqTrigger(interrupt), lost.clone(), out),
            lost,
            interrupt_failure_logged: false,
        }
    }

    /// Rebuilds a UART from a saved state. Re-raises the interrupt if one was
    /// pending and enabled when the state was saved.
    pub fn from_state(
        state: &SerialState,
        interrupt: Arc<dyn Interrupt>,
        out: W,
    ) -> Result<Self, SerialError> {
        let raw = vm_superio::serial::SerialState::from(state);
        let lost = Arc::new(LostBytes::default());
        let uart = vm_superio::Serial::from_state(&raw, IrqTrigger(interrupt), lost.clone(), out)
            .map_err(|e| state_error(e, state))?;
        Ok(Self {
            uart,
            lost,
            interrupt_failure_logged: false,
        })
    }

    /// Puts the UART in the saved `state`, keeping its interrupt line and its
    /// writer (a VM restored in place): what [`Serial::from_state`] builds, around
    /// this one's line and output. The new UART is built around `W::default()`,
    /// which takes the old one's place once it is; a refused state leaves this
    /// UART as it was. Re-raises the interrupt as `from_state` does.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), SerialError>
    where
        W: Default,
    {
        let raw = vm_superio::serial::SerialState::from(state);
        let trigger = IrqTrigger(self.uart.interrupt_evt().0.clone());
        let mut uart =
            vm_superio::Serial::from_state(&raw, trigger, self.lost.clone(), W::default())
                .map_err(|e| state_error(e, state))?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
    }

    /// The registers and pending input, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Gives the guest `input` to read. Returns how many bytes fit in the receive
    /// FIFO; [`SerialError::FifoFull`] when none did.
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize, SerialError> {
        Ok(self.uart.enqueue_raw_bytes(input)?)
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Output bytes the writer refused since the device was created.
    pub fn lost_output_bytes(&self) -> u64 {
        self.lost.0.load(Ordering::Relaxed)
    }

    /// The output writer.
    pub fn writer(&self) -> &W {
        self.uart.writer()
    }

    fn note_error(&mut self, error: SerialError) {
        match error {
            SerialError::Output(e) => {
                // Count, and log on the first loss only.
                if self.lost_output_bytes() == 1 {
                    tracing::warn!(error = %e, "serial output is being dropped");
                }
            }
            other => {
                if !self.interrupt_failure_logged {
                    self.interrupt_failure_logged = true;
                    tracing::warn!(error = %other, "serial interrupt failed");
                }
            }
        }
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A wider access reads consecutive byte registers, as on an 8-bit ISA bus.
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match u8::try_from(offset + i as u64) {
                Ok(reg) if u64::from(reg) < COM1_PORT_LEN => self.uart.read(reg),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusEvent> {
        for (i, &byte) in data.iter().enumerate() {
            let Ok(reg) = u8::try_from(offset + i as u64) else {
                break;
            };
            if u64::from(reg) >= COM1_PORT_LEN {
                break;
            }
            if let Err(e) = self.uart.write(reg, byte) {
                self.note_error(e.into());
            }
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::interrupt::test_util::{CountingInterrupt, FailingInterrupt};

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const LSR_THR_EMPTY: u8 = 0x20;
    const LSR_TEMT: u8 = 0x40;
    const LSR_DATA_READY: u8 = 0x01;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const IIR_NO_INTERRUPT: u8 = 0x01;
    const IIR_THRE: u8 = 0x02;
    const IIR_RDA: u8 = 0x04;

    fn serial() -> (Serial<Vec<u8>>, Arc<CountingInterrupt>) {
        let irq = Arc::new(CountingInterrupt::default());
        (Serial::new(irq.clone(), Vec::new()), irq)
    }

    fn read(s: &mut Serial<Vec<u8>>, reg: u64) -> u8 {
        let mut b = [0];
        s.read(reg, &mut b);
        b[0]
    }

    #[test]
    fn serial_thr_writes_reach_writer() {
        let (mut s, _) = serial();
        for &b in b"hi\n" {
            assert_eq!(s.write(THR, &[b]), None);
        }
        assert_eq!(s.writer().as_slice(), b"hi\n");
    }

    #[test]
    fn serial_lsr_reports_thr_empty() {
        let (mut s, _) = serial();
        s.write(THR, b"x");
        let lsr = read(&mut s, LSR);
        assert_eq!(lsr & (LSR_THR_EMPTY | LSR_TEMT), LSR_THR_EMPTY | LSR_TEMT);
        assert_eq!(lsr & LSR_DATA_READY, 0);
    }

    #[test]
    fn serial_thre_interrupt_enabled_raises_line_and_iir() {
        let (mut s, irq) = serial();
        s.write(THR, b"a");
        assert_eq!(irq.edges(), 0, "interrupts are disabled at reset");
        s.write(IER, &[IER_THRE]);
        assert_eq!(
            irq.edges(),
            1,
            "enabling THRE with THR empty raises at once"
        );
        assert_eq!(read(&mut s, IIR) & 0x0f, IIR_THRE);
        // Reading IIR acknowledged it; the next byte raises again.
        assert_eq!(read(&mut s, IIR) & 0x0f, IIR_NO_INTERRUPT);
        s.write(THR, b"b");
        assert_eq!(irq.edges(), 2);
    }

    #[test]
    fn serial_input_with_rda_enabled_raises_and_reads_back() {
        let (mut s, irq) = serial();
        s.write(IER, &[IER_RDA]);
        let before = irq.edges();
        assert_eq!(s.enqueue_input(b"ok").unwrap(), 2);
        assert_eq!(irq.edges(), before + 1);
        assert_eq!(read(&mut s, IIR) & 0x0f, IIR_RDA);
        assert_eq!(read(&mut s, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(read(&mut s, THR), b'o');
        assert_eq!(read(&mut s, THR), b'k');
        assert_eq!(read(&mut s, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn serial_input_beyond_fifo_reports_full() {
        let (mut s, _) = serial();
        let cap = s.input_capacity();
        assert_eq!(s.enqueue_input(&vec![b'z'; cap + 10]).unwrap(), cap);
        assert!(matches!(
            s.enqueue_input(b"more"),
            Err(SerialError::FifoFull)
        ));
    }

    #[test]
    fn serial_failing_interrupt_does_not_lose_output() {
        let mut s = Serial::new(Arc::new(FailingInterrupt), Vec::new());
        s.write(IER, &[IER_THRE]);
        s.write(THR, b"q");
        assert_eq!(s.writer().as_slice(), b"q");
    }

    #[test]
    fn serial_refusing_writer_counts_lost_bytes() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut s = Serial::new(Arc::new(CountingInterrupt::default()), Closed);
        s.write(THR, b"a");
        s.write(THR, b"b");
        assert_eq!(s.lost_output_bytes(), 2);
    }

    #[test]
    fn serial_state_round_trips() {
        let (mut s, _) = serial();
        s.write(3, &[0x83]); // LCR: DLAB on, 8 bits
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]); // DLAB off
        s.write(7, &[0x5a]); // scratch
        s.write(IER, &[IER_RDA]);
        s.enqueue_input(b"pending").unwrap();
        let state = s.state();

        let json = serde_json::to_string(&state).unwrap();
        let decoded: SerialState = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, state);

        let irq = Arc::new(CountingInterrupt::default());
        let mut restored = Serial::from_state(&decoded, irq.clone(), Vec::new()).unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(irq.edges(), 1, "pending RDA interrupt re-raised on restore");
        assert_eq!(read(&mut restored, 7), 0x5a);
        assert_eq!(read(&mut restored, THR), b'p');
    }

    #[test]
    fn serial_restored_in_place_keeps_its_line_and_its_writer() {
        let (mut s, irq) = serial();
        s.write(7, &[0x5a]); // scratch
        s.write(IER, &[IER_RDA]);
        s.enqueue_input(b"x").unwrap();
        let saved = s.state();
        s.write(7, &[0x11]);
        assert_eq!(read(&mut s, THR), b'x');
        s.write(THR, b"b");
        let edges = irq.edges();
        s.restore(&saved).unwrap();
        assert_eq!(s.state(), saved);
        assert_eq!(
            irq.edges(),
            edges + 1,
            "pending RDA interrupt re-raised on its line"
        );
        assert_eq!(read(&mut s, 7), 0x5a);
        assert_eq!(read(&mut s, THR), b'x');
        s.write(THR, b"!");
        // One writer throughout: what was written before and after.
        assert_eq!(s.uart.writer().as_slice(), b"b!");
    }

    #[test]
    fn serial_from_state_oversized_fifo_refused() {
        let state = SerialState {
            in_buffer: vec![0; 4096],
            ..serial().0.state()
        };
        let err = Serial::from_state(&state, Arc::new(CountingInterrupt::default()), Vec::new())
            .unwrap_err();
        assert!(matches!(err, SerialError::StateFifoTooLarge { len: 4096 }));
    }
}
