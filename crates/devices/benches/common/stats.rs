//! Helpers shared by the throughput benchmarks (`devices` and `supermachine`
//! include this file with `#[path]`): env knobs, MiB/s, median/min/max, and the
//! one-line report with the peer measured in the same run.

use std::time::Duration;

const MIB: usize = 1 << 20;

/// `name` parsed as a positive number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// Throughput of `bytes` moved in `d`.
pub fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// Median, min and max.
pub fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    (median, v[0], v[v.len() - 1])
}

/// One line: our median (min, max), the peer's, and the ratio of medians.
pub fn report(what: &str, ours: Vec<f64>, peer_name: &str, peer: Vec<f64>) {
    let (m, lo, hi) = stats(ours);
    let (pm, plo, phi) = stats(peer);
    println!(
        "{what:<34} {m:>8.0} MiB/s (min {lo:.0}, max {hi:.0})   {peer_name}: {pm:.0} MiB/s \
         (min {plo:.0}, max {phi:.0})   ratio {:.2}",
        m / pm
    );
}
