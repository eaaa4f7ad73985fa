//! The virtio-mmio transport end to end on this host's `/dev/kvm`, through real
//! vCPU exits: `supermachine boot` runs test-guests' freestanding virtio driver
//! (`VIRTIO_DRIVER_ELF`), which negotiates features, sets up a virtqueue, submits
//! block and entropy requests and waits for each device interrupt through the
//! IOAPIC and local APIC. These tests check what it printed, its exit status, and
//! what reached the disk files.
// The guest is an x86 PVH ELF and needs KVM.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A guest run should take well under a second; this only stops a hung VMM.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const SECTOR: usize = 512;

fn kvm_usable() -> bool {
    let ok = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("skipped: /dev/kvm cannot be opened on this host");
    }
    ok
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sm-virtio-guest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic, position-dependent disk contents (no two sectors alike).
fn disk_bytes(sectors: usize, seed: u8) -> Vec<u8> {
    (0..sectors * SECTOR)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(13) as u8 ^ seed)
        .collect()
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `supermachine boot` with the driver guest and `args`, killing it after
/// [`RUN_TIMEOUT`].
fn boot_driver(dir: &Path, args: &[&str]) -> Run {
    let kernel = dir.join("virtio-driver.elf");
    std::fs::write(&kernel, test_guests::VIRTIO_DRIVER_ELF).unwrap();
    let out = dir.join("stdout");
    let err = dir.join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M", "--cpus", "1"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > RUN_TIMEOUT {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "guest still running after {RUN_TIMEOUT:?}; output so far:\n{}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code(),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

fn assert_line(run: &Run, line: &str) {
    assert!(
        run.stdout.lines().any(|l| l == line),
        "line {line:?} missing from guest output:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
}

fn assert_line_starts(run: &Run, prefix: &str) {
    assert!(
        run.stdout.lines().any(|l| l.starts_with(prefix)),
        "no line starting {prefix:?} in guest output:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
}

#[test]
fn virtio_driver_guest_reads_writes_and_gets_every_interrupt() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("full");
    let rw = d.join("a.img");
    let ro = d.join("b.img");
    let rw_before = disk_bytes(16, 0x3c);
    let ro_before = disk_bytes(8, 0xc3);
    std::fs::write(&rw, &rw_before).unwrap();
    std::fs::write(&ro, &ro_before).unwrap();
    let ro_arg = format!("{},ro", ro.display());

    let run = boot_driver(&d, &["--disk", rw.to_str().unwrap(), "--disk", &ro_arg]);

    // Discovery: two disks then the entropy device, on consecutive windows and GSIs.
    assert_line_starts(
        &run,
        "slot 0 at 0xd0000000 gsi 5: virtio-mmio version 2 device 2 (block)",
    );
    assert_line_starts(
        &run,
        "slot 1 at 0xd0001000 gsi 6: virtio-mmio version 2 device 2 (block)",
    );
    assert_line_starts(
        &run,
        "slot 2 at 0xd0002000 gsi 7: virtio-mmio version 2 device 4 (entropy)",
    );
    assert_line(&run, "slot 3 at 0xd0003000: no device");
    // Configuration space: capacities in sectors, and the read-only feature.
    assert!(
        run.stdout.contains("ro 0 capacity 16 sectors"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("ro 1 capacity 8 sectors"),
        "{}",
        run.stdout
    );
    // The read returned the file's first 16 bytes, the write succeeded, the
    // read-only disk refused its write with VIRTIO_BLK_S_IOERR.
    let hex: String = rw_before[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_line(
        &run,
        &format!("slot 0: read sector 0 status 0 len 513 data {hex}"),
    );
    assert_line(&run, "slot 0: write sector 1 status 0 len 1");
    assert_line(
        &run,
        "slot 1: write sector 1 on read-only disk status 1 len 1",
    );
    assert_line(&run, "slot 2: entropy 16 bytes");
    // One interrupt per request (4), none on a vector nothing was routed to.
    assert_line_starts(&run, "irqs=4 requests=4 other=0 unexpected=0 ");
    assert_line(&run, "virtio-driver: all checks passed");
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);

    // Sector 1 holds exactly what the guest wrote; nothing else changed.
    let rw_after = std::fs::read(&rw).unwrap();
    let mut expected = rw_before.clone();
    expected[SECTOR..2 * SECTOR].copy_from_slice(&test_guests::virtio_driver_sector1_pattern());
    assert_eq!(rw_after.len(), expected.len());
    assert_eq!(
        &rw_after[SECTOR..2 * SECTOR],
        &expected[SECTOR..2 * SECTOR],
        "sector 1"
    );
    assert!(rw_after == expected, "bytes outside sector 1 changed");
    assert!(
        std::fs::read(&ro).unwrap() == ro_before,
        "read-only disk changed"
    );
}

#[test]
fn virtio_driver_guest_without_writable_disk_fails_with_its_code() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("nodisk");
    let ro = d.join("b.img");
    std::fs::write(&ro, disk_bytes(8, 0x5a)).unwrap();
    let ro_arg = format!("{},ro", ro.display());

    let run = boot_driver(&d, &["--disk", &ro_arg]);

    // The read-only disk and the entropy device still work; the missing writable
    // disk is the guest's distinct failure code 12, not a hang.
    assert_line(
        &run,
        "slot 0: write sector 1 on read-only disk status 1 len 1",
    );
    assert_line(&run, "slot 1: entropy 16 bytes");
    assert_line(&run, "FAIL(12): no writable block device");
    assert_eq!(run.code, Some(12), "{}\n{}", run.stdout, run.stderr);
}
