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
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn main() {
    println!("vmm_control: the heartbeat guest is x86_64 and needs KVM; nothing to measure here");
}
