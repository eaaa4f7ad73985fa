//! Host-side cost of `supermachine run` before the first vCPU entry, with the image
//! already pulled and converted: store lookup, initramfs lookup, disk and vsock
//! attach, passt start (default network; also measured with `--network none`), VM
//! build, kernel and initramfs load. Measured in-process from `main`'s
//! start to the first vCPU entry (`SUPERMACHINE_TIMINGS`), median of N runs (default
//! 20, `SM_BENCH_RUNS`); the guest is killed right after it starts. Then the same
//! for the restore path: `run --network none` with this configuration's snapshot
//! in the cache, process start -> first vCPU entry of the restored VM.
//!
//! On a PVM host the Linux guest cannot run usefully, so the run is started with
//! `SUPERMACHINE_ALLOW_EMULATED=1` and killed at its first vCPU entry: everything
//! measured happens before the guest runs.
//!
//! Run: `cargo bench -p supermachine --bench run_cost`

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../image/tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("run_cost bench: skipped: /dev/kvm cannot be opened here");
        return;
    }
    let runs: usize = std::env::var("SM_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_supermachine"));
    // A cache with the provisioned kernel, its initramfs, and the image pulled.
    let user = supermachine::cache().expect("the user's cache directory");
    let assets = guest_assets::kernel::provision(&user).expect("provision the kernel");
    let initramfs = guest_assets::initramfs::ensure(&user, &assets).expect("initramfs");
    // XDG_CACHE_HOME=<cache> for the product.
    let cache = std::env::temp_dir().join(format!("sm-bench-cache-{}", std::process::id()));
    guest_assets::kernel::seed(
        &guest_assets::cache::CacheLayout::at(cache.join("supermachine")),
        &assets,
        &initramfs,
    )
    .expect("seed the bench cache");
    let layout = support::busybox_layout();
    let image = format!("oci:{}:{}", layout.display(), support::BUSYBOX_TAG);
    let pulled = Command::new(&bin)
        .args(["pull", &image])
        .env("XDG_CACHE_HOME", &cache)
        .status()
        .unwrap();
    assert!(pulled.success(), "supermachine pull failed");

    let one = |network: &str| -> Option<(u64, Vec<(String, u64)>)> {
        let mut child = Command::new(&bin)
            .args(["run", "--network", network, &image, "true"])
            .env("XDG_CACHE_HOME", &cache)
            .env("SUPERMACHINE_TIMINGS", "1")
            .env("SUPERMACHINE_ALLOW_EMULATED", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let mut phases = Vec::new();
        let mut result = None;
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let Some(rest) = line.strip_prefix("[timing] ") else {
                continue;
            };
            let Some((name, us)) = rest.split_once('=') else {
                continue;
            };
            let us: u64 = us.trim_end_matches("us").parse().unwrap_or(0);
            phases.push((name.to_string(), us));
            if name == "first_vcpu_entry" {
                result = Some(us);
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        // The killed VM is destroyed by the kernel after its process is
        // reaped (~13 ms here, on one of two cores): let that finish, so the
        // next sample measures a start on a settled host, not beside it.
        std::thread::sleep(std::time::Duration::from_millis(100));
        result.map(|r| (r, phases))
    };
    // The default network starts passt (a fork and exec before the VM is built);
    // `--network none` in the same run shows what that costs.
    let have_passt = Command::new("passt").arg("--version").output().is_ok();
    let variants: &[&str] = if have_passt {
        &["passt", "none"]
    } else {
        &["none"]
    };
    if !have_passt {
        println!("  (passt is not installed: only --network none is measured)");
    }
    for &network in variants {
        one(network).expect("a warm-up run reached the first vCPU entry");
        let (samples, phases) = sample(runs, || one(network), |_| {});
        report(
            &format!("supermachine run --network {network}, image cached"),
            15,
            &samples,
            &phases,
        );
    }

    // The restore path: a snapshot of this run's VM where the CLI looks for
    // it (its key, for the CLI executable). It is taken 200 ms into the boot
    // rather than at the guest's ready (a Linux guest does not get there on a
    // PVM host), which changes nothing the host does before the first vCPU
    // entry: open and check the file, map its RAM, rebuild devices and vCPUs.
    std::env::set_var("XDG_CACHE_HOME", &cache);
    let opts = supermachine::RunOptions {
        image: image.clone(),
        args: vec!["true".into()],
        ..Default::default()
    };
    let img = supermachine::run::ensure_image(&image, false).expect("the pulled image");
    let res = supermachine::run::vm_resources(&opts, &img).expect("the run's resources");
    let snap = supermachine::snapshots::image_dir(&img.digest)
        .unwrap()
        .join(format!(
            "{}.snap",
            supermachine::snapshots::key(&img.digest, &res, &bin)
        ));
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    {
        let hv = runner::backend::open().expect("/dev/kvm");
        let vmm = runner::vmm::Vmm::build(
            &hv,
            &res,
            Box::new(std::io::sink()),
            std::sync::Arc::new(supermachine::Timings::start()),
        )
        .expect("build the run's VM");
        vmm.start().expect("start it");
        std::thread::sleep(std::time::Duration::from_millis(200));
        vmm.pause().expect("pause it");
        vmm.snapshot(&snap).expect("capture it");
        vmm.stop();
        let _ = vmm.wait();
    }
    let restored = |phases: &[(String, u64)]| phases.iter().any(|(n, _)| n == "restored");
    let (_, warm) = one("none").expect("a warm-up restore reached the first vCPU entry");
    assert!(restored(&warm), "the run did not restore: {warm:?}");
    let (samples, phases) = sample(
        runs,
        || one("none"),
        |phases| assert!(restored(phases), "a run did not restore: {phases:?}"),
    );
    report(
        "supermachine run --network none, image and snapshot cached (restore path)",
        8,
        &samples,
        &phases,
    );
    let _ = std::fs::remove_dir_all(&cache);
}

/// `runs` samples of `one` (each checked by `check`), sorted, and the phases of
/// the last.
fn sample(
    runs: usize,
    one: impl Fn() -> Option<(u64, Vec<(String, u64)>)>,
    check: impl Fn(&[(String, u64)]),
) -> (Vec<u64>, Vec<(String, u64)>) {
    let mut samples = Vec::new();
    let mut last_phases = Vec::new();
    for _ in 0..runs {
        if let Some((us, phases)) = one() {
            check(&phases);
            samples.push(us);
            last_phases = phases;
        }
    }
    samples.sort();
    (samples, last_phases)
}

/// Prints the median, min and max of `samples` (µs) against `target_ms`, and
/// the phases of one run.
fn report(what: &str, target_ms: u32, samples: &[u64], phases: &[(String, u64)]) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{what}, process start -> first vCPU entry ({} runs): median {:.2} ms (min {:.2}, max {:.2}); target <= {target_ms} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1])
    );
    let phases: Vec<String> = phases
        .iter()
        .map(|(n, us)| format!("{n}={:.2}ms", ms(*us)))
        .collect();
    println!("  phases of the last run: {}", phases.join(" "));
}
