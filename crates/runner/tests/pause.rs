//! The `Vmm` handle on `/dev/kvm` with the heartbeat guest (each vCPU prints an
//! increasing counter on COM1): pause and resume many times in a row without a
//! lost, repeated or reordered beat; nothing runs while paused, on every vCPU;
//! a saved state restored into a fresh `Vmm` continues the count; a vCPU that
//! hits an exit the VMM cannot handle ends the run with that error at once.
//! Without a usable `/dev/kvm` the tests print why and return.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::hypervisor;
use kvm_backend::KvmHypervisor;
use runner::resources::VmResources;
use runner::timings::Timings;
use runner::vmm::{GuestExit, RunError, Snapshot, Vmm};
use test_guests::{parse_heartbeats, Beat, HEARTBEAT_COUNTERS};
use vm_memory::{Bytes, GuestAddress};

/// Spins between beats. On a PVM host KVM emulates every instruction of this
/// guest, at about a microsecond each: a few hundred lines a second there.
const DELAY_LOOPS: u32 = 500;

/// The guest console, readable while the VM runs.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

fn resources(tag: &str, code: &[u8], vcpus: u32) -> VmResources {
    let dir = std::env::temp_dir().join(format!("sm-pause-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join("guest.elf");
    std::fs::write(&path, test_guests::pvh_elf(code)).unwrap();
    let mut res = VmResources::new(path);
    res.memory = 16 << 20;
    res.vcpus = vcpus;
    res
}

fn heartbeat(tag: &str, vcpus: u32) -> VmResources {
    resources(tag, &test_guests::heartbeat_code(DELAY_LOOPS), vcpus)
}

fn build(hv: &KvmHypervisor, res: &VmResources, console: &Console) -> Vmm<kvm_backend::KvmVm> {
    Vmm::build(
        hv,
        res,
        Box::new(console.clone()),
        Arc::new(Timings::start()),
    )
    .unwrap()
}

/// The counter vCPU `id` last stored in guest memory.
fn counter(vmm: &Vmm<kvm_backend::KvmVm>, id: u32) -> u32 {
    vmm.guest_memory()
        .read_obj::<u32>(GuestAddress(HEARTBEAT_COUNTERS + 4 * u64::from(id)))
        .unwrap()
}

/// Waits (up to 10 s) until every vCPU of `vcpus` has printed a beat past `after`.
fn wait_for_beats(console: &Console, vcpus: u32, after: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = last_counts(&parse_heartbeats(&console.bytes()).unwrap(), vcpus);
        if (0..vcpus as usize).all(|i| last[i] > after.get(i).copied().unwrap_or(0)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no new beats from every vCPU: last {last:?}, waited for more than {after:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn last_counts(beats: &[Beat], vcpus: u32) -> Vec<u32> {
    let mut last = vec![0; vcpus as usize];
    for b in beats {
        last[b.vcpu as usize] = b.count;
    }
    last
}

/// Every vCPU's counts are exactly 1, 2, 3, ...: nothing lost, repeated or
/// reordered. Returns the last count of each.
fn assert_consecutive(output: &[u8], vcpus: u32) -> Vec<u32> {
    let beats = parse_heartbeats(output).expect("malformed heartbeat output");
    let mut last = vec![0u32; vcpus as usize];
    for (i, b) in beats.iter().enumerate() {
        let l = last
            .get_mut(b.vcpu as usize)
            .unwrap_or_else(|| panic!("line {i}: a beat from vCPU {}", b.vcpu));
        assert_eq!(
            b.count,
            *l + 1,
            "line {i}: vCPU {} went from {} to {}",
            b.vcpu,
            l,
            b.count
        );
        *l = b.count;
    }
    last
}

/// While paused: no console byte and no counter change for 200 ms, on any vCPU;
/// each memory counter is the last printed count or the one being printed.
fn assert_quiet_while_paused(vmm: &Vmm<kvm_backend::KvmVm>, console: &Console, vcpus: u32) {
    let len = console.len();
    let counters: Vec<u32> = (0..vcpus).map(|i| counter(vmm, i)).collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(console.len(), len, "console output while paused");
    let after: Vec<u32> = (0..vcpus).map(|i| counter(vmm, i)).collect();
    assert_eq!(after, counters, "a vCPU counted while paused");
    let printed = last_counts(&parse_heartbeats(&console.bytes()).unwrap(), vcpus);
    for i in 0..vcpus as usize {
        assert!(
            counters[i] == printed[i] || counters[i] == printed[i] + 1,
            "vCPU {i}: counter {} in memory, {} printed",
            counters[i],
            printed[i]
        );
    }
}

fn pause_resume_cycles(tag: &str, vcpus: u32, cycles: u32) {
    let Some(hv) = hypervisor() else { return };
    let res = heartbeat(tag, vcpus);
    let console = Console::default();
    let vmm = build(&hv, &res, &console);
    vmm.start().unwrap();
    wait_for_beats(&console, vcpus, &[]);
    for i in 0..cycles {
        vmm.pause().unwrap();
        if i == 0 || i == cycles / 2 || i == cycles - 1 {
            assert_quiet_while_paused(&vmm, &console, vcpus);
        }
        vmm.resume().unwrap();
    }
    // Still alive after the cycles, on every vCPU.
    let before = assert_consecutive(&console.bytes(), vcpus);
    wait_for_beats(&console, vcpus, &before);
    vmm.stop();
    let outcome = vmm.wait().unwrap();
    assert_eq!(outcome.exit, GuestExit::Stopped);
    let last = assert_consecutive(&console.bytes(), vcpus);
    eprintln!("{tag}: {cycles} pause/resume cycles, last counts {last:?}");
}

#[test]
fn pause_resume_1000_times_keeps_every_beat_in_order() {
    pause_resume_cycles("one", 1, 1000);
}

#[test]
fn pause_resume_with_two_vcpus_stops_both_and_keeps_their_beats_in_order() {
    pause_resume_cycles("two", 2, 1000);
}

#[test]
fn saved_state_restored_into_a_fresh_vmm_continues_the_count() {
    let Some(hv) = hypervisor() else { return };
    let vcpus = 2;
    let res = heartbeat("restore", vcpus);
    let first = Console::default();
    let vmm = build(&hv, &res, &first);
    vmm.start().unwrap();
    wait_for_beats(&first, vcpus, &[3, 3]);
    vmm.pause().unwrap();
    let file = snapshot_path("restore");
    vmm.snapshot(&file).unwrap();
    let saved_counters: Vec<u32> = (0..vcpus).map(|i| counter(&vmm, i)).collect();
    vmm.stop();
    vmm.wait().unwrap();
    let before = assert_consecutive(&first.bytes(), vcpus);
    let captured = std::fs::read(&file).unwrap();

    let second = Console::default();
    let restored = Vmm::restore(
        &hv,
        &Snapshot::open(&file).unwrap(),
        Box::new(second.clone()),
        Arc::new(Timings::start()),
    )
    .unwrap();
    // Restored paused: the counters are where they were saved.
    let counters: Vec<u32> = (0..vcpus).map(|i| counter(&restored, i)).collect();
    assert_eq!(counters, saved_counters);
    restored.resume().unwrap();
    let mut joined = first.bytes();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        joined.truncate(first.len());
        joined.extend_from_slice(&second.bytes());
        let last = last_counts(&parse_heartbeats(&joined).unwrap(), vcpus);
        if (0..vcpus as usize).all(|i| last[i] > before[i] + 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restored VM did not count on"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    restored.stop();
    assert_eq!(restored.wait().unwrap().exit, GuestExit::Stopped);
    // The first VM's output and the restored one's read as one run: each vCPU
    // picks up mid-line, at the next count.
    joined.truncate(first.len());
    joined.extend_from_slice(&second.bytes());
    let last = assert_consecutive(&joined, vcpus);
    eprintln!("restore: saved at {before:?}, restored VM reached {last:?}");
    // The guest wrote to its RAM after the restore: copy-on-write, the file
    // is as captured.
    assert!(
        std::fs::read(&file).unwrap() == captured,
        "the snapshot file changed"
    );
}

/// A fresh path for a snapshot file of test `tag`.
fn snapshot_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sm-pause-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("vm.snap")
}

#[test]
fn a_snapshot_whose_state_does_not_fit_its_resources_is_refused() {
    let Some(hv) = hypervisor() else { return };
    let res = heartbeat("mismatch", 1);
    let console = Console::default();
    let vmm = build(&hv, &res, &console);
    vmm.start().unwrap();
    wait_for_beats(&console, 1, &[]);
    vmm.pause().unwrap();
    let file = snapshot_path("mismatch");
    vmm.snapshot(&file).unwrap();
    drop(vmm);
    // A file whose resources say two vCPUs but whose state has one (the
    // checksums are right: it was written so).
    let mut state = Snapshot::open(&file).unwrap().state().clone();
    state.resources.vcpus = 2;
    let lying = snapshot_path("mismatch-lying");
    // Page-aligned zeroed RAM of the same size, as the writer needs.
    let len = state.resources.memory as usize;
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap();
    let host = vm_memory::GuestMemoryBackend::get_host_address(&mem, GuestAddress(0)).unwrap();
    // SAFETY: `host .. host + len` is the one region `mem` maps and owns for
    // this whole scope; nothing else writes it.
    let bytes = unsafe { std::slice::from_raw_parts(host, len) };
    snapshot::write(
        &lying,
        snapshot::Arch::X86_64,
        snapshot::Backend::Kvm,
        &state,
        &[snapshot::RamSource {
            guest_addr: 0,
            bytes,
        }],
    )
    .unwrap();
    let err = Vmm::restore(
        &hv,
        &Snapshot::open(&lying).unwrap(),
        Box::new(std::io::sink()),
        Arc::new(Timings::start()),
    )
    .unwrap_err();
    assert!(matches!(err, RunError::StateMismatch { .. }), "{err}");
}

#[test]
fn save_state_of_a_running_vm_is_refused() {
    let Some(hv) = hypervisor() else { return };
    let res = heartbeat("running", 1);
    let console = Console::default();
    let vmm = build(&hv, &res, &console);
    vmm.start().unwrap();
    let err = vmm.save_state().unwrap_err();
    assert!(
        matches!(err, runner::vmm::ControlError::NotPaused { .. }),
        "{err}"
    );
}

#[test]
fn unhandled_exit_ends_the_run_with_its_error_within_a_second() {
    let Some(hv) = hypervisor() else { return };
    // mov eax, 0xd0000000 ; jmp eax: run code from the MMIO gap, where nothing is
    // mapped, which KVM cannot emulate (an internal error).
    let code = [0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0];
    // Two vCPUs: the second never leaves wait-for-SIPI, and must end too.
    let res = resources("unhandled", &code, 2);
    let t0 = Instant::now();
    let err = runner::vmm::run(
        &hv,
        &res,
        Box::new(std::io::sink()),
        Arc::new(Timings::start()),
    )
    .unwrap_err();
    let took = t0.elapsed();
    assert!(
        matches!(err, RunError::Unhandled { id: 0, .. }),
        "unexpected error: {err}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

/// This process's children that are still running (not zombies).
fn running_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1) == Some(&me.as_str()) && fields.first() != Some(&"Z") {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_finished_vmm_is_destroyed_off_the_callers_path_and_nothing_lingers() {
    let Some(hv) = hypervisor() else { return };
    let res = resources(
        "teardown",
        &test_guests::print_and_poweroff_code(b"bye", 3),
        1,
    );
    let console = Console::default();
    let vmm = build(&hv, &res, &console);
    vmm.start().unwrap();
    let outcome = vmm.wait().unwrap();
    assert_eq!((outcome.exit, outcome.status), (GuestExit::PowerOff, 3));
    assert_eq!(console.bytes(), b"bye\n");
    // The VM's destruction runs in a helper process that ends by itself soon
    // after the Vmm is gone (other tests of this binary may run VMs meanwhile, so
    // wait for every helper to be gone).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = running_children();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "helper processes still running 5 s after the VMs ended: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The VMGenID generation ID (16 bytes at `VMGENID_ADDR`, named by the DSDT):
/// random in a booted VM, and new in every VM restored from a snapshot, each
/// clone its own.
#[test]
fn every_restore_is_a_new_vmgenid_generation() {
    use runner::x86_64::acpi::{VMGENID_ADDR, VMGENID_LEN};
    let Some(hv) = hypervisor() else { return };
    let read_id = |vmm: &Vmm<kvm_backend::KvmVm>| {
        let mut id = [0u8; VMGENID_LEN];
        vmm.guest_memory()
            .read_slice(&mut id, GuestAddress(VMGENID_ADDR))
            .unwrap();
        id
    };
    let res = heartbeat("vmgenid", 1);
    let console = Console::default();
    let vmm = build(&hv, &res, &console);
    let booted = read_id(&vmm);
    assert_ne!(booted, [0; VMGENID_LEN], "a booted VM has a generation ID");
    vmm.start().unwrap();
    wait_for_beats(&console, 1, &[]);
    vmm.pause().unwrap();
    let file = snapshot_path("vmgenid");
    vmm.snapshot(&file).unwrap();
    vmm.stop();
    vmm.wait().unwrap();

    let mut seen = vec![booted];
    for _ in 0..2 {
        let restored = Vmm::restore(
            &hv,
            &Snapshot::open(&file).unwrap(),
            Box::new(Console::default()),
            Arc::new(Timings::start()),
        )
        .unwrap();
        let id = read_id(&restored);
        assert!(
            !seen.contains(&id),
            "a restore reused generation ID {id:02x?}"
        );
        seen.push(id);
        // And the clone runs on from there.
        let at = counter(&restored, 0);
        restored.resume().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter(&restored, 0) <= at {
            assert!(
                Instant::now() < deadline,
                "the restored VM did not count on"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        restored.stop();
        restored.wait().unwrap();
    }
}

/// A vCPU's general-purpose registers.
fn regs(s: &hypervisor::VcpuState) -> hypervisor::x86_64::Regs {
    match s {
        hypervisor::VcpuState::X86_64(s) => s.regs,
        other => panic!("not an x86_64 vCPU: {other:?}"),
    }
}

/// This process's resident set (VmRSS) in KiB, and its open descriptors.
fn rss_kib_and_fds() -> (u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    (rss, fds)
}

/// The pool worker's restore (issue 15): one `Vmm` restored in place from one
/// snapshot 1,000 times in a row. After every restore the guest's counter is
/// the captured one, and once resumed it counts on from there (the file is
/// never written); the process's RSS and descriptors after restore 1,000 are
/// those after restore 10 (within 10% and 4).
#[test]
fn a_vm_restored_in_place_1000_times_counts_on_from_the_snapshot_each_time() {
    let Some(hv) = hypervisor() else { return };
    let res = heartbeat("inplace", 1);
    let console = Console::default();
    let vmm = build(&hv, &res, &console);
    vmm.start().unwrap();
    wait_for_beats(&console, 1, &[3]);
    vmm.pause().unwrap();
    let file = snapshot_path("inplace");
    vmm.snapshot(&file).unwrap();
    let captured_file = std::fs::read(&file).unwrap();
    let saved = counter(&vmm, 0);
    let snap = Snapshot::open(&file).unwrap();
    let captured_regs = regs(&snap.state().vmm.vcpus[0]);
    let mut at_10 = (0, 0);
    let mut took = Vec::with_capacity(1000);
    for i in 1..=1000 {
        // The tenant before: the guest counts past the snapshot.
        vmm.resume().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter(&vmm, 0) < saved + 2 {
            assert!(
                Instant::now() < deadline,
                "restore {i}: the guest does not count"
            );
            std::thread::yield_now();
        }
        vmm.pause().unwrap();
        let t = Instant::now();
        vmm.restore_in_place(&snap).unwrap();
        took.push(t.elapsed());
        // Its RAM is the captured one, and so are its registers (the heartbeat
        // keeps the count in ESI): the captured vCPU state, read back.
        assert_eq!(counter(&vmm, 0), saved, "restore {i}: the captured count");
        assert_eq!(
            regs(&vmm.save_state().unwrap().vcpus[0]),
            captured_regs,
            "restore {i}: the captured registers"
        );
        if i == 10 {
            at_10 = rss_kib_and_fds();
        }
    }
    let at_1000 = rss_kib_and_fds();
    vmm.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&vmm, 0) <= saved {
        assert!(
            Instant::now() < deadline,
            "the last restore does not count on"
        );
        std::thread::yield_now();
    }
    vmm.stop();
    vmm.wait().unwrap();
    took.sort();
    eprintln!(
        "in place: 1000 restores, median {:?}, p99 {:?}; RSS {} -> {} KiB, fds {} -> {}",
        took[500], took[990], at_10.0, at_1000.0, at_10.1, at_1000.1
    );
    assert!(
        at_1000.0 * 10 <= at_10.0 * 11,
        "RSS grew from {} KiB at restore 10 to {} KiB at 1000",
        at_10.0,
        at_1000.0
    );
    assert!(
        at_1000.1 <= at_10.1 + 4,
        "descriptors grew from {} to {}",
        at_10.1,
        at_1000.1
    );
    assert!(
        std::fs::read(&file).unwrap() == captured_file,
        "the snapshot file changed"
    );
}

#[test]
fn a_snapshot_of_another_vm_is_not_restored_in_place() {
    let Some(hv) = hypervisor() else { return };
    let one = heartbeat("inplace-other-a", 1);
    let console = Console::default();
    let a = build(&hv, &one, &console);
    a.start().unwrap();
    a.pause().unwrap();
    let file = snapshot_path("inplace-other-a");
    a.snapshot(&file).unwrap();
    a.stop();
    a.wait().unwrap();
    let mut two = heartbeat("inplace-other-b", 1);
    two.memory = 32 << 20;
    let b = build(&hv, &two, &console);
    b.start().unwrap();
    b.pause().unwrap();
    let err = b
        .restore_in_place(&Snapshot::open(&file).unwrap())
        .unwrap_err();
    assert!(matches!(err, RunError::StateMismatch { .. }), "{err}");
    // Still the VM it was: it runs on.
    b.resume().unwrap();
    b.stop();
    b.wait().unwrap();
}
