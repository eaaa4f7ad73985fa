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

pub use bus::{Bus, BusDevice, BusError, BusEvent, WriteOutcome};
pub use interrupt::{Interrupt, InterruptError};
