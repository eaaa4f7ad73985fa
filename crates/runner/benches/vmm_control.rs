//! Pause and resume latency of a running `Vmm`, directly on /dev/kvm with the
//! heartbeat guest (`test-guests`: every vCPU counts and prints on COM1, so each
//! vCPU is busy in the guest or in an I/O exit when the request comes).
//!
//! Prints, for 1 and 2 vCPUs, the median, p99, min and max over N requests
//! (default 1000, `SM_BENCH_RUNS`) of:
//! - pause: `Vmm::pause()` called -> every vCPU parked and the device event loop
//!   held (the call returns);
//! - resume: `Vmm::resume()` called -> every vCPU on its way back into the guest.
//!
//! Then, for the same guest captured to a snapshot file (on the temporary
//! directory), over N/5 restores each (default 200):
//! - restore in place (the pool worker's): `Vmm::restore_in_place` of a paused
//!   VM that ran on after the capture -> the VM paused in the captured state;
//! - beside it, the restore into a new `Vmm` in the same process
//!   (`Vmm::restore`: a new VM, vCPUs and threads, RAM mapped from the file), and
//!   the ratio of the medians.
//!
//! Run: `cargo bench -p runner --bench vmm_control`

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn main() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let runs: usize = std::env::var("SM_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1000);
    let hv = match kvm_backend::KvmHypervisor::new() {
        Ok(h) => h,
        Err(e) => {
            println!("vmm_control: skipped, /dev/kvm cannot be used here: {e}");
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("sm-bench-vmm-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("heartbeat.elf");
    std::fs::write(
        &kernel,
        test_guests::pvh_elf(&test_guests::heartbeat_code(500)),
    )
    .unwrap();

    fn summary(mut us: Vec<f64>) -> String {
        us.sort_by(f64::total_cmp);
        let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
        format!(
            "median {:>7.1} us   p99 {:>7.1} us   (min {:.1}, max {:.1})",
            at(0.5),
            at(0.99),
            us[0],
            us[us.len() - 1]
        )
    }

    println!("Vmm pause/resume latency, heartbeat guest, {runs} requests each");
    for vcpus in [1u32, 2] {
        let mut res = runner::resources::VmResources::new(kernel.clone());
        res.memory = 16 << 20;
        res.vcpus = vcpus;
        let vmm = runner::vmm::Vmm::build(
            &hv,
            &res,
            Box::new(std::io::sink()),
            Arc::new(runner::timings::Timings::start()),
        )
        .unwrap();
        vmm.start().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut pause = Vec::with_capacity(runs);
        let mut resume = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t0 = Instant::now();
            vmm.pause().unwrap();
            pause.push(t0.elapsed().as_secs_f64() * 1e6);
            let t0 = Instant::now();
            vmm.resume().unwrap();
            resume.push(t0.elapsed().as_secs_f64() * 1e6);
            // Let the guest run a little between requests.
            std::thread::sleep(Duration::from_micros(200));
        }
        vmm.stop();
        vmm.wait().unwrap();
        println!("{vcpus} vCPU  pause:  {}", summary(pause));
        println!("{vcpus} vCPU  resume: {}", summary(resume));
    }

    let restores = (runs / 5).max(1);
    println!("restore of a captured heartbeat guest, {restores} restores each");
    for vcpus in [1u32, 2] {
        let mut res = runner::resources::VmResources::new(kernel.clone());
        res.memory = 16 << 20;
        res.vcpus = vcpus;
        let timings = || Arc::new(runner::timings::Timings::start());
        let vmm = runner::vmm::Vmm::build(&hv, &res, Box::new(std::io::sink()), timings()).unwrap();
        vmm.start().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        vmm.pause().unwrap();
        let file = dir.join(format!("heartbeat-{vcpus}.snap"));
        vmm.snapshot(&file).unwrap();
        let snap = runner::vmm::Snapshot::open(&file).unwrap();
        let mut in_place = Vec::with_capacity(restores);
        for _ in 0..restores {
            vmm.resume().unwrap();
            std::thread::sleep(Duration::from_micros(500));
            vmm.pause().unwrap();
            let t0 = Instant::now();
            vmm.restore_in_place(&snap).unwrap();
            in_place.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        vmm.stop();
        vmm.wait().unwrap();
        let mut fresh = Vec::with_capacity(restores);
        for _ in 0..restores {
            let t0 = Instant::now();
            let v = runner::vmm::Vmm::restore(&hv, &snap, Box::new(std::io::sink()), timings())
                .unwrap();
            fresh.push(t0.elapsed().as_secs_f64() * 1e6);
            v.stop();
            v.wait().unwrap();
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ratio = median(&in_place) / median(&fresh);
        println!("{vcpus} vCPU  in place:  {}", summary(in_place));
        println!("{vcpus} vCPU  new Vmm:   {}", summary(fresh));
        println!("{vcpus} vCPU  ratio in place/new Vmm (medians): {ratio:.3}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn main() {
    println!("vmm_control: the heartbeat guest is x86_64 and needs KVM; nothing to measure here");
}
