//! Guest-side throughput with a real Linux guest: `supermachine run` of a busybox
//! image that reads a whole disk (`dd if=/dev/vdb of=/dev/null bs=1M`) and then
//! streams `yes | head -c N` to its stdout, which reaches the host through the
//! agent over virtio-vsock. Only meaningful with hardware virtualization: on a
//! PVM host (`/sys/module/kvm_pvm`) every guest instruction is emulated, and in
//! the nested rig too, so there it prints why and exits 0. The device models'
//! own ceiling, measurable anywhere, is `cargo bench -p devices --bench
//! throughput`.
//!
//! Prints medians (and min/max) over N runs (default 5, `SM_BENCH_RUNS`), one VM
//! per run so the guest's page cache starts cold, of `SM_BENCH_MIB` MiB (default
//! 256) each way:
//! - blk: the guest reads a read-only extra disk (a host file in the page cache);
//!   timed on the host between marker lines the guest prints around `dd`; peer:
//!   `std::fs` reading the same file on the host;
//! - vsock: stdout bytes from the marker after `dd` until the last byte arrives;
//!   peer: a plain UNIX socketpair copy of the same size.
//!
//! Run: `cargo bench -p supermachine --bench guest_throughput`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../image/tests/support/mod.rs"]
mod support;

#[path = "../../devices/benches/common/stats.rs"]
mod stats;
use stats::{env_usize, mib_per_s, report};

const MIB: usize = 1 << 20;
const BLK_START: &[u8] = b"sm-blk-start\n";
const BLK_END: &[u8] = b"sm-blk-end\n";

/// Why Linux guests cannot be measured here, if they cannot.
fn skip_reason() -> Option<String> {
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm cannot be opened here".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "this host's /dev/kvm is PVM (kvm_pvm): a Linux guest runs in KVM's instruction \
             emulator, so its throughput would measure the emulator; run it on a host with \
             hardware virtualization (the device models alone: cargo bench -p devices --bench \
             throughput)"
                .into(),
        );
    }
    None
}

/// A busybox image (every applet, as relative links), running as root: the
/// guest reads a raw disk.
fn build_image() -> PathBuf {
    support::cached("sm-bench-busybox-v1", |dir| {
        let layout = dir.join("layout");
        let image = format!("{}:t", layout.display());
        support::run(
            Command::new("umoci")
                .args(["init", "--layout"])
                .arg(&layout),
        );
        support::run(Command::new("umoci").args(["new", "--image", &image]));
        support::add_layer(&dir.join("b1"), &image, |root| {
            let bin = root.join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
            let list = support::run(Command::new("/bin/busybox").arg("--list"));
            for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
                let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
            }
        });
        support::run(Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--config.cmd=/bin/sh",
            "--config.env=PATH=/bin",
        ]));
        support::run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout));
    })
    .join("layout")
}

/// A private supermachine cache under `dir` holding the provisioned kernel and
/// its initramfs (so the user's image store is left alone) and the bench image.
fn prepare_cache(bin: &Path, dir: &Path, image_ref: &str) -> PathBuf {
    let user = supermachine::cache().expect("the user's cache directory");
    let assets = guest_assets::kernel::provision(&user).expect("provision the guest kernel");
    let initramfs = guest_assets::initramfs::ensure(&user, &assets).expect("build the initramfs");
    // XDG_CACHE_HOME=<dir>/cache for the product.
    let cache = dir.join("cache");
    guest_assets::kernel::seed(
        &guest_assets::cache::CacheLayout::at(cache.join("supermachine")),
        &assets,
        &initramfs,
    )
    .expect("seed the bench cache");
    let out = Command::new(bin)
        .args(["pull", image_ref])
        .env("XDG_CACHE_HOME", &cache)
        .output()
        .expect("run supermachine pull");
    assert!(
        out.status.success(),
        "supermachine pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cache
}

/// One sample: blk and vsock durations.
struct Sample {
    blk: Duration,
    vsock: Duration,
}

/// Follows the guest's stdout: the two markers around `dd`, then `total` bytes.
#[derive(Default)]
struct Follower {
    /// Text seen before the end marker (markers are short; this stays small).
    head: Vec<u8>,
    blk_start: Option<Instant>,
    blk_end: Option<Instant>,
    stream: usize,
    stream_end: Option<Instant>,
}

impl Follower {
    fn feed(&mut self, chunk: &[u8], now: Instant, total: usize) {
        let mut rest = chunk;
        if self.blk_end.is_none() {
            self.head.extend_from_slice(chunk);
            if self.blk_start.is_none() && find(&self.head, BLK_START).is_some() {
                self.blk_start = Some(now);
            }
            let Some(at) = find(&self.head, BLK_END) else {
                return;
            };
            self.blk_end = Some(now);
            let after = self.head.len() - (at + BLK_END.len());
            rest = &chunk[chunk.len() - after..];
        }
        self.stream += rest.len();
        if self.stream >= total && self.stream_end.is_none() {
            self.stream_end = Some(now);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn one_run(bin: &Path, cache: &Path, image_ref: &str, disk: &Path, total: usize) -> Sample {
    let disk_arg = format!("{},ro", disk.display());
    let script = format!(
        "echo sm-blk-start; dd if=/dev/vdb of=/dev/null bs=1M 2>/dev/null; echo sm-blk-end; \
         yes | head -c {total}"
    );
    let mut child = Command::new(bin)
        .args(["run", "--network", "none", "--disk", &disk_arg, image_ref])
        .args(["sh", "-c", &script])
        .env("XDG_CACHE_HOME", cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn supermachine run");
    let mut err = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut out = child.stdout.take().unwrap();
    let mut f = Follower::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = out.read(&mut buf).expect("read the guest's stdout");
        if n == 0 {
            break;
        }
        f.feed(&buf[..n], Instant::now(), total);
    }
    let status = child.wait().unwrap();
    let stderr = String::from_utf8_lossy(&errors.join().unwrap_or_default()).into_owned();
    assert!(
        status.success(),
        "supermachine run failed: {status}\n{stderr}"
    );
    let (Some(b0), Some(b1), Some(v1)) = (f.blk_start, f.blk_end, f.stream_end) else {
        panic!(
            "the guest's output was incomplete ({} stream bytes of {total})\n{stderr}",
            f.stream
        );
    };
    Sample {
        blk: b1 - b0,
        vsock: v1 - b1,
    }
}

/// The host reading the same file (page cache), in 1 MiB reads as `dd bs=1M`.
fn host_read(path: &Path) -> Duration {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; MIB];
    let t0 = Instant::now();
    while f.read(&mut buf).unwrap() > 0 {}
    t0.elapsed()
}

/// A plain UNIX socketpair copy of `total` bytes.
fn socketpair_copy(total: usize) -> Duration {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || {
        let buf = vec![b'y'; 64 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            a.write_all(&buf[..n]).unwrap();
            left -= n;
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < total {
        got += b.read(&mut buf).unwrap();
    }
    let d = t0.elapsed();
    writer.join().unwrap();
    d
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; this bench has no unit tests
    }
    if let Some(why) = skip_reason() {
        println!("guest_throughput bench: skipped: {why}");
        return;
    }
    let runs = env_usize("SM_BENCH_RUNS", 5);
    let total = env_usize("SM_BENCH_MIB", 256) * MIB;
    let bin = Path::new(env!("CARGO_BIN_EXE_supermachine"));
    let dir = std::env::temp_dir().join(format!("sm-guest-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image_ref = format!("oci:{}:t", build_image().display());
    let cache = prepare_cache(bin, &dir, &image_ref);
    let disk = dir.join("disk.img");
    {
        let mut f = std::fs::File::create(&disk).unwrap();
        let block: Vec<u8> = (0..MIB).map(|i| (i * 31 % 251) as u8).collect();
        for _ in 0..total / MIB {
            f.write_all(&block).unwrap();
        }
    }
    println!(
        "guest throughput: {runs} runs (SM_BENCH_RUNS) of {} MiB (SM_BENCH_MIB), one VM each",
        total / MIB
    );
    // A warm-up run: the image's root filesystem and the disk in the page cache.
    one_run(bin, &cache, &image_ref, &disk, total);
    let (mut blk, mut vsock, mut file, mut pair) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let s = one_run(bin, &cache, &image_ref, &disk, total);
        blk.push(mib_per_s(total, s.blk));
        vsock.push(mib_per_s(total, s.vsock));
        file.push(mib_per_s(total, host_read(&disk)));
        pair.push(mib_per_s(total, socketpair_copy(total)));
    }
    report("blk read (dd bs=1M)", blk, "host std::fs read", file);
    report("vsock stdout (yes | head)", vsock, "socketpair", pair);
    let _ = std::fs::remove_dir_all(&dir);
}
