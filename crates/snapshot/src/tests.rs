//! Round trips, sparseness, copy-on-write, and every way a hostile or damaged
//! file is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;

use super::*;
use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

/// A mapped region's bytes.
fn region_bytes(r: &GuestRegionMmap) -> Vec<u8> {
    let mut v = vec![0u8; r.len() as usize];
    r.read_slice(&mut v, MemoryRegionAddress(0)).unwrap();
    v
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TestState {
    name: String,
    regs: Vec<u64>,
}

fn state() -> TestState {
    TestState {
        name: "vm".into(),
        regs: (0..40).collect(),
    }
}

/// Fresh anonymous memory, as guest RAM is.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: our live mapping; untouched pages read as zeros.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, with `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: what mmap returned.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

const MIB: usize = 1 << 20;

/// A 16 MiB and a 1 MiB region with a few pages written.
fn ram() -> (Anon, Anon) {
    let page = page_size() as usize;
    let mut a = Anon::new(16 * MIB);
    let mut b = Anon::new(MIB);
    a.bytes_mut()[0] = 1;
    a.bytes_mut()[5 * page + 7] = 0x5a;
    a.bytes_mut()[16 * MIB - 1] = 0xff;
    b.bytes_mut()[page..2 * page].fill(0x33);
    // Touched but zero: still a hole.
    a.bytes_mut()[9 * page] = 0;
    (a, b)
}

fn write_test(path: &Path, a: &Anon, b: &Anon) {
    write(
        path,
        Arch::X86_64,
        Backend::Kvm,
        &state(),
        &[
            RamSource {
                guest_addr: 0,
                bytes: a.bytes(),
            },
            RamSource {
                guest_addr: 0x1_0000_0000,
                bytes: b.bytes(),
            },
        ],
    )
    .unwrap();
}

#[test]
fn snapshot_round_trips_state_and_ram_copy_on_write_and_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let (a, b) = ram();
    write_test(&path, &a, &b);
    let meta: Meta<TestState> = load_meta(&path, Arch::X86_64, Backend::Kvm).unwrap();
    assert_eq!(meta.state, state());
    assert_eq!(
        meta.regions
            .iter()
            .map(|r| (r.guest_addr, r.len))
            .collect::<Vec<_>>(),
        [(0, 16 * MIB as u64), (0x1_0000_0000, MIB as u64)]
    );
    let file = File::open(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let mapped = map_ram(&file, &path, &meta).unwrap();
    assert_eq!(region_bytes(&mapped[0]), a.bytes());
    assert_eq!(region_bytes(&mapped[1]), b.bytes());
    // Copy-on-write: the guest writes, the file stays as captured.
    mapped[0]
        .write_slice(&[0xee], MemoryRegionAddress(100))
        .unwrap();
    assert_eq!(region_bytes(&mapped[0])[100], 0xee);
    drop(mapped);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Sparse: 17 MiB of RAM, a few pages of data on disk.
    let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        on_disk < 256 << 10,
        "{on_disk} bytes allocated for 17 MiB of mostly untouched RAM"
    );
}

#[test]
fn snapshot_written_twice_and_loaded_ten_times_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let (a, b) = ram();
    write_test(&path, &a, &b);
    let first = std::fs::read(&path).unwrap();
    for _ in 0..10 {
        let meta: Meta<TestState> = load_meta(&path, Arch::X86_64, Backend::Kvm).unwrap();
        let file = File::open(&path).unwrap();
        let m = map_ram(&file, &path, &meta).unwrap();
        m[1].write_slice(&vec![7; MIB], MemoryRegionAddress(0))
            .unwrap();
    }
    assert_eq!(std::fs::read(&path).unwrap(), first);
    write_test(&path, &a, &b);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        first,
        "the encoding is deterministic"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
}

/// A valid snapshot's bytes, to damage.
fn valid() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let (a, b) = ram();
    write_test(&path, &a, &b);
    let bytes = std::fs::read(&path).unwrap();
    (dir, path, bytes)
}

fn load(path: &Path, bytes: &[u8]) -> Result<Meta<TestState>, SnapshotError> {
    std::fs::write(path, bytes).unwrap();
    load_meta(path, Arch::X86_64, Backend::Kvm)
}

/// Rewrites header field bytes `at..at+value.len()` and fixes the header's
/// checksum, as a deliberate forger would.
fn forge(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
    let sum = CRC.checksum(&bytes[..HEADER_SUMMED]);
    bytes[64..72].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn snapshot_damage_is_refused_with_a_clear_error() {
    let (_dir, path, good) = valid();
    let check = |bytes: Vec<u8>, want: &str| {
        let e = load(&path, &bytes).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(want), "{want:?} not in {text:?}");
    };
    // A flipped byte in the state.
    let mut b = good.clone();
    b[HEADER_LEN as usize + 3] ^= 0x40;
    check(b, "state is corrupt");
    // A flipped byte in the header.
    let mut b = good.clone();
    b[30] ^= 1;
    check(b, "header is corrupt");
    // Truncated RAM, header, state.
    check(good[..good.len() - 4096].to_vec(), "truncated: guest RAM");
    check(good[..100].to_vec(), "truncated: the header");
    check(good[..HEADER_LEN as usize + 2].to_vec(), "truncated");
    // Not a snapshot.
    let mut b = good.clone();
    b[0] = b'X';
    check(b, "not a supermachine snapshot");
    // Another format version.
    let mut b = good.clone();
    forge(&mut b, 8, &(FORMAT_VERSION + 1).to_le_bytes());
    check(b, &format!("snapshot format {}", FORMAT_VERSION + 1));
    // An oversized state section.
    let mut b = good.clone();
    forge(&mut b, 32, &(1u64 << 40).to_le_bytes());
    check(b, "over the");
    // Another page size, unknown flags, RAM inside the state.
    let mut b = good.clone();
    forge(&mut b, 16, &65536u32.to_le_bytes());
    check(b, "page size");
    let mut b = good.clone();
    forge(&mut b, 20, &1u32.to_le_bytes());
    check(b, "flags");
    let mut b = good.clone();
    forge(&mut b, 48, &0u64.to_le_bytes());
    check(b, "RAM at");
    // RAM length the regions do not add up to.
    let mut b = good.clone();
    forge(&mut b, 56, &4096u64.to_le_bytes());
    check(b, "RAM layout is invalid");
}

#[test]
fn snapshot_of_another_target_is_refused() {
    let (_dir, path, good) = valid();
    std::fs::write(&path, &good).unwrap();
    for (arch, backend) in [(Arch::Aarch64, Backend::Kvm), (Arch::X86_64, Backend::Hvf)] {
        let e = load_meta::<TestState>(&path, arch, backend).unwrap_err();
        assert!(matches!(e, SnapshotError::WrongTarget { .. }), "{e}");
    }
}

#[test]
fn snapshot_state_of_another_type_is_a_decode_error() {
    let (_dir, path, good) = valid();
    std::fs::write(&path, &good).unwrap();
    #[derive(Debug, Deserialize)]
    struct Other {
        _a: [u64; 32],
        _b: [u64; 32],
    }
    let e = load_meta::<Other>(&path, Arch::X86_64, Backend::Kvm).unwrap_err();
    assert!(matches!(e, SnapshotError::Decode { .. }), "{e}");
}

#[test]
fn unaligned_ram_is_refused_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let a = Anon::new(2 * page_size() as usize);
    let e = write(
        &dir.path().join("x"),
        Arch::X86_64,
        Backend::Kvm,
        &state(),
        &[RamSource {
            guest_addr: 0,
            bytes: &a.bytes()[1..],
        }],
    )
    .unwrap_err();
    assert!(matches!(e, SnapshotError::Unaligned { .. }), "{e}");
}
