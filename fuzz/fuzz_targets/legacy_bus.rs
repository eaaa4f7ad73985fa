//! The legacy devices a guest reaches by port I/O (the 16550A console, the
//! ACPI power block, the i8042), on one bus as the x86_64 platform places them,
//! driven by a random sequence of reads and writes of every size at any
//! address near them, with snapshots taken and restored in between.
//!
//! Checked: no panic; an access a device does not hold whole is refused by the
//! bus (reads untouched); a device restored from its state reports the same
//! state; the console output never exceeds what the guest wrote to the data
//! register.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use devices::power::{PowerDevice, POWER_PORT_BASE, POWER_PORT_LEN};
use devices::serial::{Serial, COM1_PORT_BASE, COM1_PORT_LEN};
use devices::{Bus, BusDevice};
use libfuzzer_sys::fuzz_target;
use supermachine_fuzz::NullIrq;

#[derive(Arbitrary, Debug)]
enum Op {
    Read { base: u8, offset: u8, size: u8 },
    Write { base: u8, offset: u8, size: u8, value: u64 },
    /// Save every device's state and rebuild the bus from it.
    Snapshot,
}

/// The bases accesses are aimed near: each device's, and an empty spot.
const BASES: [u64; 4] = [
    COM1_PORT_BASE,
    POWER_PORT_BASE,
    I8042_PORT_BASE,
    0x500,
];

struct Devices {
    bus: Bus,
    serial: Arc<Mutex<Serial<Vec<u8>>>>,
    power: Arc<Mutex<PowerDevice>>,
    i8042: Arc<Mutex<I8042>>,
}

fn build(serial: Serial<Vec<u8>>, power: PowerDevice, i8042: I8042) -> Devices {
    let serial = Arc::new(Mutex::new(serial));
    let power = Arc::new(Mutex::new(power));
    let i8042 = Arc::new(Mutex::new(i8042));
    let mut bus = Bus::new();
    bus.insert(COM1_PORT_BASE, COM1_PORT_LEN, serial.clone() as Arc<Mutex<dyn BusDevice>>)
        .expect("serial fits");
    bus.insert(POWER_PORT_BASE, POWER_PORT_LEN, power.clone() as Arc<Mutex<dyn BusDevice>>)
        .expect("power fits");
    bus.insert(I8042_PORT_BASE, I8042_PORT_LEN, i8042.clone() as Arc<Mutex<dyn BusDevice>>)
        .expect("i8042 fits");
    Devices {
        bus,
        serial,
        power,
        i8042,
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut d = build(
        Serial::new(Arc::new(NullIrq), Vec::new()),
        PowerDevice::new(),
        I8042::new(),
    );
    let mut data_writes = 0usize;
    for op in ops.iter().take(4096) {
        match *op {
            Op::Read { base, offset, size } => {
                let addr = BASES[usize::from(base) % BASES.len()] + u64::from(offset % 16);
                let size = [1, 2, 4, 8][usize::from(size) % 4];
                let mut buf = [0xa5u8; 8];
                let claimed = d.bus.read(addr, &mut buf[..size]);
                if !claimed {
                    assert!(buf.iter().all(|&b| b == 0xa5), "an unclaimed read wrote data");
                }
            }
            Op::Write {
                base,
                offset,
                size,
                value,
            } => {
                let addr = BASES[usize::from(base) % BASES.len()] + u64::from(offset % 16);
                let size = [1, 2, 4, 8][usize::from(size) % 4];
                if addr == COM1_PORT_BASE {
                    data_writes += size;
                }
                let _ = d.bus.write(addr, &value.to_le_bytes()[..size]);
            }
            Op::Snapshot => {
                let (s, p, k) = (
                    d.serial.lock().expect("serial lock").state(),
                    d.power.lock().expect("power lock").state(),
                    d.i8042.lock().expect("i8042 lock").state(),
                );
                let out = d.serial.lock().expect("serial lock").writer().clone();
                let serial = Serial::from_state(&s, Arc::new(NullIrq), out)
                    .expect("a state the device reported restores");
                d = build(serial, PowerDevice::from_state(&p), I8042::from_state(&k));
                assert_eq!(d.serial.lock().expect("serial lock").state(), s);
                assert_eq!(d.power.lock().expect("power lock").state(), p);
                assert_eq!(d.i8042.lock().expect("i8042 lock").state(), k);
            }
        }
    }
    let written = d.serial.lock().expect("serial lock").writer().len();
    assert!(written <= data_writes, "console wrote {written} bytes of {data_writes} sent");
});
