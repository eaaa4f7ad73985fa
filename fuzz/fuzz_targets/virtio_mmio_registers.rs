//! A random sequence of register reads and writes (and guest memory pokes) on a
//! virtio-mmio transport with a block device over small guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supermachine_fuzz::{run_register_ops, RegOp};

fuzz_target!(|ops: Vec<RegOp>| {
    run_register_ops(&ops);
});
