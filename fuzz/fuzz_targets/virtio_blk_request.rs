//! Random descriptor chains in guest memory, served by a live virtio-blk device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supermachine_fuzz::{run_blk_request, BlkInput};

fuzz_target!(|input: BlkInput| {
    run_blk_request(&input);
});
