//! The snapshot loader fed a hostile file: whatever the bytes, `load_meta`
//! returns an error or a layout inside the file, and mapping what it accepted
//! reads back without faulting.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use snapshot::{load_meta, map_ram, Arch, Backend, Meta};
use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

/// A state with the shapes a VM's has: strings, vectors, options, integers.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct State {
    name: String,
    regs: Vec<u64>,
    blob: Option<Vec<u8>>,
    flags: u32,
}

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("a temp file");
    f.write_all(data).expect("written");
    let path = f.path().to_path_buf();
    let Ok(meta) = load_meta::<State>(&path, Arch::X86_64, Backend::Kvm) else {
        return;
    };
    let meta: Meta<State> = meta;
    let end = meta.header.ram_offset + meta.header.ram_len;
    assert!(end <= data.len() as u64, "accepted RAM past the end of the file");
    let file = std::fs::File::open(&path).expect("reopened");
    let mapped = map_ram(&file, &path, &meta).expect("an accepted layout maps");
    for m in &mapped {
        let mut bytes = vec![0u8; m.len() as usize];
        m.read_slice(&mut bytes, MemoryRegionAddress(0))
            .expect("an accepted region reads back");
        let sum: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
        std::hint::black_box(sum);
    }
});
