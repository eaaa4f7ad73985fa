//! The egress filter's cost per frame (`devices::virtio::net::egress`): frames/s
//! through `Filter::check` with no rule (the device's path when no policy is
//! set), 1 rule and 1,000 rules (the allowing one last, so every new flow is
//! judged against all of them), for new flows (each frame a UDP datagram of a
//! flow not seen yet: a rule walk and a table insert) and for an established
//! flow (a table hit).
//!
//! Prints medians (min/max) of `SM_BENCH_RUNS` runs (default 5) of
//! `SM_BENCH_FRAMES` frames each (default 200000).
//!
//! Run: `cargo bench -p devices --bench egress`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use devices::virtio::net::egress::{Filter, Policy, Rule, Verdict, MAX_FLOWS};

// The shared helpers' MiB/s report is for the throughput benches.
#[allow(dead_code)]
#[path = "common/stats.rs"]
mod stats;
use stats::{env_usize, stats};

/// A 60-byte Ethernet frame: UDP from 10.0.2.15:`sport` to 192.0.2.`last`:53.
fn udp_frame(sport: u16, last: u8) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0, 0, 46, 0, 1, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&[10, 0, 2, 15, 192, 0, 2, last]);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&53u16.to_be_bytes());
    f.extend_from_slice(&26u16.to_be_bytes());
    f.extend_from_slice(&[0; 20]);
    f
}

/// `n` rules, the last one allowing 192.0.2.0/24:53; the others match
/// nothing the frames carry.
fn policy(n: usize) -> Policy {
    let mut allow: Vec<Rule> = (1..n)
        .map(|i| {
            format!("198.18.{}.{}:{}", i / 250, i % 250, 1000 + i)
                .parse()
                .unwrap()
        })
        .collect();
    allow.push("192.0.2.0/24:53".parse().unwrap());
    Policy {
        allow,
        deny: Vec::new(),
    }
}

/// Frames/s of `frames` through a filter enforcing `policy` (a new filter
/// per `MAX_FLOWS` frames, so new flows stay new).
fn pass(policy: &Policy, frames: &[Vec<u8>]) -> f64 {
    let mut f = Filter::new(policy.clone());
    let t = Instant::now();
    for (i, fr) in frames.iter().enumerate() {
        if i % MAX_FLOWS == MAX_FLOWS - 1 {
            f = Filter::new(policy.clone());
        }
        let v = f.check(black_box(fr));
        assert_eq!(v, Verdict::Pass);
    }
    frames.len() as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; this bench has no unit tests
    }
    let runs = env_usize("SM_BENCH_RUNS", 5);
    let n = env_usize("SM_BENCH_FRAMES", 200_000);
    let new_flows: Vec<Vec<u8>> = (0..n)
        .map(|i| udp_frame((i % 60_000) as u16 + 1, (i / 60_000 % 250) as u8 + 1))
        .collect();
    let established: Vec<Vec<u8>> = (0..n).map(|_| udp_frame(4242, 7)).collect();
    println!(
        "egress filter: {runs} runs (SM_BENCH_RUNS) of {n} frames (SM_BENCH_FRAMES), 60-byte UDP"
    );
    let cases = [
        ("no rule", Policy::default()),
        ("1 rule", policy(1)),
        ("1000 rules", policy(1000)),
    ];
    for (what, frames) in [
        ("new flows", &new_flows),
        ("established flow", &established),
    ] {
        for (name, p) in &cases {
            pass(p, &frames[..frames.len().min(10_000)]);
            let v: Vec<f64> = (0..runs).map(|_| pass(p, frames) / 1e6).collect();
            let (m, lo, hi) = stats(v);
            println!("{what:<17} {name:<11} {m:>7.2} M frames/s (min {lo:.2}, max {hi:.2})");
        }
    }
}
