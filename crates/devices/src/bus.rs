//! A bus of devices addressed by range, used once for x86 port I/O and once for MMIO.
//!
//! The VMM inserts each device at a base address with a length; a vCPU exit at
//! address `a` of `n` bytes goes to the device whose range holds all of
//! `a .. a + n`, with the offset `a - base`. An access that no device holds
//! entirely (including one that straddles the end of a device) is unclaimed, so a
//! device never sees an offset outside `0 .. len`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Something the VMM must act on after a device handled a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusEvent {
    /// The guest asked to power off (ACPI S5). `status` is the exit status the guest
    /// wrote to the power device, 0 if it wrote none.
    PowerOff {
        /// Guest exit status.
        status: u32,
    },
    /// The guest asked for a reset. `status` is the exit status the guest wrote to
    /// the power device, or `None` when the reset came from a device that does not
    /// hold one (the i8042); the VMM then asks the power device.
    Reset {
        /// Guest exit status, if the signalling device knows it.
        status: Option<u32>,
    },
}

/// A device on a [`Bus`]. Offsets are relative to the base it was inserted at and
/// `offset + data.len()` never exceeds the length it was inserted with.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);

    /// The guest writes `data` at `offset`. Returns an event the VMM must act on.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusEvent>;
}

/// What happened to a write dispatched on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum WriteOutcome {
    /// No device holds the whole access.
    Unclaimed,
    /// A device took the write and has nothing for the VMM.
    Handled,
    /// A device took the write and asks the VMM to act.
    Event(BusEvent),
}

/// Building a bus failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A device was inserted with length 0.
    #[error("device at {base:#x} has length 0")]
    EmptyRange {
        /// The requested base.
        base: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("device range {base:#x} + {len:#x} overflows the address space")]
    RangeOverflow {
        /// The requested base.
        base: u64,
        /// The requested length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error(
        "device range {base:#x}..{end:#x} overlaps the device at {other_base:#x}..{other_end:#x}",
        end = .base.wrapping_add(*.len),
        other_end = .other_base.wrapping_add(*.other_len)
    )]
    Overlap {
        /// The requested base.
        base: u64,
        /// The requested length.
        len: u64,
        /// Base of the device already there.
        other_base: u64,
        /// Length of the device already there.
        other_len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices addressed by non-overlapping ranges.
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by base address.
    devices: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.devices
                    .iter()
                    .map(|(base, e)| format!("{base:#x}..{:#x}", base + e.len)),
            )
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base .. base + len`. Refuses an empty range, one that
    /// overflows, or one that overlaps a device already on the bus.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::RangeOverflow { base, len })?;
        // Only the nearest device at or below `base` and the nearest above can
        // overlap, since the ranges already present do not overlap each other.
        let below = self.devices.range(..=base).next_back();
        let above = self.devices.range(base..).next();
        for (&other_base, other) in below.into_iter().chain(above) {
            let other_end = other_base + other.len;
            if other_base < end && base < other_end {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device holding all of `addr .. addr + size`, with the offset of `addr`.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let size = u64::try_from(size).ok()?;
        let access_end = offset.checked_add(size)?;
        (access_end <= entry.len).then_some((entry, offset))
    }

    /// Dispatches a read. Returns `false`, leaving `data` untouched, when no device
    /// holds the whole access (callers usually answer all-ones, as an open bus does).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((entry, offset)) = self.resolve(addr, data.len()) else {
            return false;
        };
        // A device that panicked mid-access leaves plain register state behind;
        // keep serving it rather than taking the whole VM down.
        let mut device = entry.device.lock().unwrap_or_else(PoisonError::into_inner);
        device.read(offset, data);
        true
    }

    /// Dispatches a write.
    pub fn write(&self, addr: u64, data: &[u8]) -> WriteOutcome {
        let Some((entry, offset)) = self.resolve(addr, data.len()) else {
            return WriteOutcome::Unclaimed;
        };
        let mut device = entry.device.lock().unwrap_or_else(PoisonError::into_inner);
        match device.write(offset, data) {
            Some(event) => WriteOutcome::Event(event),
            None => WriteOutcome::Handled,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with the offset.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
        event_on_write: Option<BusEvent>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }

        fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusEvent> {
            self.last_write = Some((offset, data.to_vec()));
            self.event_on_write
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn insert_overlapping_ranges_refused() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, recorder()).unwrap();
        // Overlaps the start, the end, contained, containing, identical.
        for (base, len) in [
            (0xf8, 0x10),
            (0x10f, 0x1),
            (0x104, 0x4),
            (0xf0, 0x40),
            (0x100, 0x10),
        ] {
            let err = bus.insert(base, len, recorder()).unwrap_err();
            assert_eq!(
                err,
                BusError::Overlap {
                    base,
                    len,
                    other_base: 0x100,
                    other_len: 0x10
                },
                "{base:#x}+{len:#x}"
            );
        }
    }

    #[test]
    fn insert_adjacent_ranges_accepted() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, recorder()).unwrap();
        bus.insert(0xf0, 0x10, recorder()).unwrap();
        bus.insert(0x110, 0x10, recorder()).unwrap();
    }

    #[test]
    fn insert_empty_or_overflowing_range_refused() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(0x10, 0, recorder()),
            Err(BusError::EmptyRange { base: 0x10 })
        );
        assert_eq!(
            bus.insert(u64::MAX, 2, recorder()),
            Err(BusError::RangeOverflow {
                base: u64::MAX,
                len: 2
            })
        );
    }

    #[test]
    fn read_at_range_edges_reaches_device_with_offset() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, recorder()).unwrap();
        let mut data = [0xaa];
        assert!(bus.read(0x3f8, &mut data));
        assert_eq!(data, [0]);
        assert!(bus.read(0x3ff, &mut data));
        assert_eq!(data, [7]);
        let mut wide = [0xaa; 4];
        assert!(bus.read(0x3fc, &mut wide));
        assert_eq!(wide, [4; 4]);
    }

    #[test]
    fn read_outside_or_straddling_range_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, recorder()).unwrap();
        let mut data = [0xaa];
        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.read(0, &mut data));
        assert_eq!(data, [0xaa]);
        // Starts inside, ends past the device.
        let mut wide = [0xaa; 2];
        assert!(!bus.read(0x3ff, &mut wide));
        assert_eq!(wide, [0xaa; 2]);
        // An access at the very top of the address space must not overflow.
        assert!(!bus.read(u64::MAX, &mut wide));
    }

    #[test]
    fn write_reaches_device_and_returns_its_event() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(0x600, 8, dev.clone()).unwrap();
        assert_eq!(bus.write(0x604, &[1, 2, 3, 4]), WriteOutcome::Handled);
        assert_eq!(dev.lock().unwrap().last_write, Some((4, vec![1, 2, 3, 4])));

        let event = BusEvent::PowerOff { status: 3 };
        dev.lock().unwrap().event_on_write = Some(event);
        assert_eq!(bus.write(0x600, &[0x34]), WriteOutcome::Event(event));
    }

    #[test]
    fn write_unclaimed_address_reports_unclaimed() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(0x600, 8, dev.clone()).unwrap();
        assert_eq!(bus.write(0x608, &[1]), WriteOutcome::Unclaimed);
        assert_eq!(bus.write(0x607, &[1, 2]), WriteOutcome::Unclaimed);
        assert_eq!(dev.lock().unwrap().last_write, None);
    }
}
