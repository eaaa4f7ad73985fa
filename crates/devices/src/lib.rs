//! Device models for supermachine: the port-I/O and MMIO [`Bus`] a VMM dispatches
//! guest accesses to, the legacy x86 devices a Linux guest expects (16550A serial,
//! i8042 reset line, the ACPI power/reset/exit-status block), and later the virtio
//! devices.
//!
//! Devices are pure register state machines. They never see a backend, a `Vm` or an
//! eventfd: they see guest memory, queues and an [`Interrupt`] line that the VMM
//! implements over whatever its backend offers. Everything a guest writes is hostile
//! input, so this crate forbids `unsafe` and never panics on guest data. Each device
//! has a plain serde `<Device>State` for snapshots.
#![forbid(unsafe_code)]

pub mod bus;
pub mod i8042;
pub mod interrupt;
pub mod power;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, BusEvent, WriteOutcome};
pub use interrupt::{Interrupt, InterruptError};

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
    use crate::interrupt::test_util::CountingInterrupt;
    use crate::power::{PowerDevice, POWER_PORT_BASE, POWER_PORT_LEN};
    use crate::serial::{Serial, COM1_PORT_BASE, COM1_PORT_LEN};

    /// The x86 port-I/O bus as a VMM wires it: guest accesses at absolute ports
    /// reach the right device, and the devices' events come back.
    #[test]
    fn pio_bus_with_legacy_devices_routes_by_port() {
        let serial = Arc::new(Mutex::new(Serial::new(
            Arc::new(CountingInterrupt::default()),
            Vec::new(),
        )));
        let mut bus = Bus::new();
        bus.insert(COM1_PORT_BASE, COM1_PORT_LEN, serial.clone())
            .unwrap();
        bus.insert(
            POWER_PORT_BASE,
            POWER_PORT_LEN,
            Arc::new(Mutex::new(PowerDevice::new())),
        )
        .unwrap();
        bus.insert(
            I8042_PORT_BASE,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new())),
        )
        .unwrap();

        assert_eq!(bus.write(0x3f8, b"!"), WriteOutcome::Handled);
        assert_eq!(serial.lock().unwrap().writer().as_slice(), b"!");
        assert_eq!(
            bus.write(0x604, &17u32.to_le_bytes()),
            WriteOutcome::Handled
        );
        assert_eq!(
            bus.write(0x600, &[0x34]),
            WriteOutcome::Event(BusEvent::PowerOff { status: 17 })
        );
        assert_eq!(
            bus.write(0x64, &[0xfe]),
            WriteOutcome::Event(BusEvent::Reset { status: None })
        );
        let mut status = [0xff];
        assert!(bus.read(0x64, &mut status));
        assert_eq!(status, [0x08], "only the last-write-was-command bit");
        assert_eq!(bus.write(0x80, &[0]), WriteOutcome::Unclaimed);
    }
}
