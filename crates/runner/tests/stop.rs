//! `vmm::StopHandle` ends a run from another thread on `/dev/kvm`, whatever the
//! guest is doing: spinning in a loop, or halted with interrupts off (nothing
//! left to wake it), or not started yet. Without a usable `/dev/kvm` the tests
//! print why and return.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::hypervisor;
use kvm_backend::KvmHypervisor;
use runner::resources::VmResources;
use runner::timings::Timings;
use runner::vmm::{GuestExit, StopHandle, Vmm};

/// A PVH guest whose code is `code`, in a file of its own.
fn guest(tag: &str, code: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sm-stop-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("guest.elf");
    std::fs::write(&path, test_guests::pvh_elf(code)).unwrap();
    path
}

/// Builds `res`, hands its stop handle to `with_handle`, starts it and waits for
/// its end.
fn run(
    hv: &KvmHypervisor,
    res: &VmResources,
    with_handle: impl FnOnce(StopHandle),
) -> runner::vmm::RunOutcome {
    let vmm = Vmm::build(
        hv,
        res,
        Box::new(std::io::sink()),
        Arc::new(Timings::start()),
    )
    .unwrap();
    with_handle(vmm.stop_handle());
    vmm.start().unwrap();
    vmm.wait().unwrap()
}

fn resources(kernel: PathBuf) -> VmResources {
    let mut res = VmResources::new(kernel);
    res.memory = 16 << 20;
    res
}

/// Runs `code` and calls `stop` after `after`; returns the outcome and how long
/// the run took.
fn stopped_after(tag: &str, code: &[u8], after: Duration) -> Option<(GuestExit, u32, Duration)> {
    let hv = hypervisor()?;
    let res = resources(guest(tag, code));
    let mut stopper = None;
    let t0 = Instant::now();
    let outcome = run(&hv, &res, |h| {
        stopper = Some(std::thread::spawn(move || {
            std::thread::sleep(after);
            h.stop();
        }));
    });
    let took = t0.elapsed();
    stopper.unwrap().join().unwrap();
    Some((outcome.exit, outcome.status, took))
}

#[test]
fn stop_ends_a_guest_spinning_in_a_loop() {
    // 1: jmp 1b
    let Some((exit, status, took)) =
        stopped_after("spin", &[0xeb, 0xfe], Duration::from_millis(300))
    else {
        return;
    };
    assert_eq!(exit, GuestExit::Stopped);
    assert_eq!(status, 0, "the guest wrote no status");
    assert!(
        took >= Duration::from_millis(300),
        "ended before the stop: {took:?}"
    );
}

#[test]
fn stop_ends_a_guest_halted_with_interrupts_off_and_keeps_its_status() {
    // mov dx, 0x604 ; mov eax, 7 ; out dx, eax (the status, no power-off) ;
    // cli ; 1: hlt ; jmp 1b
    let mut code = vec![0x66, 0xba, 0x04, 0x06, 0xb8];
    code.extend_from_slice(&7u32.to_le_bytes());
    code.extend_from_slice(&[0xef, 0xfa, 0xf4, 0xeb, 0xfd]);
    let Some((exit, status, _)) = stopped_after("halt", &code, Duration::from_millis(300)) else {
        return;
    };
    // A halted vCPU with interrupts off ends the run by itself (Halted) on some
    // backends; KVM keeps it in the kernel until the stop kicks it.
    assert!(
        matches!(exit, GuestExit::Stopped | GuestExit::Halted),
        "{exit:?}"
    );
    assert_eq!(
        status, 7,
        "the status the guest wrote before it was stopped"
    );
}

#[test]
fn a_stop_requested_before_the_run_starts_ends_it_at_once() {
    let Some(hv) = hypervisor() else { return };
    let res = resources(guest("early", &[0xeb, 0xfe]));
    let outcome = run(&hv, &res, |h| {
        h.stop();
        assert!(h.is_ending());
    });
    assert_eq!(outcome.exit, GuestExit::Stopped);
}
