//! VMM-side boot cost, measured directly on /dev/kvm with a tiny PVH guest that writes
//! one byte to COM1 and powers off (no Linux: on a PVM host only tiny guests run at
//! full speed, and a kernel's boot time would drown the VMM's own cost anyway).
//!
//! Prints, over N runs (default 20, `SM_BENCH_RUNS`): process start -> first guest byte
//! on stdout, process start -> process exit (medians, min, max), and the VMM's peak
//! RSS. When Debian's qemu-system-x86_64 is installed, `-M microvm` boots the same ELF
//! in the same run and the ratio is printed.
//!
//! Run: `cargo bench -p supermachine --bench boot`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Sample {
    first_byte: Duration,
    exit: Option<Duration>,
    max_rss_kib: Option<i64>,
}

/// Waits for `child` and returns its peak RSS in KiB (wait4's ru_maxrss).
fn wait_rss(child: &mut Child) -> (std::process::ExitStatus, i64) {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for the out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unreaped child; `status` and `ru` are valid pointers for
    // the duration of the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    (std::process::ExitStatus::from_raw(status), ru.ru_maxrss)
}

fn time_first_byte(mut cmd: Command, wait_exit: bool) -> Sample {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    let n = out.read(&mut b).expect("read guest output");
    let first_byte = t0.elapsed();
    assert_eq!(n, 1, "the guest printed nothing");
    if wait_exit {
        let mut rest = Vec::new();
        out.read_to_end(&mut rest).unwrap();
        let (st, rss) = wait_rss(&mut child);
        let exit = t0.elapsed();
        assert!(st.success(), "supermachine failed: {st:?}");
        Sample {
            first_byte,
            exit: Some(exit),
            max_rss_kib: Some(rss),
        }
    } else {
        let _ = child.kill();
        let _ = child.wait();
        Sample {
            first_byte,
            exit: None,
            max_rss_kib: None,
        }
    }
}

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 0 {
        (ms(v[mid - 1]) + ms(v[mid])) / 2.0
    } else {
        ms(v[mid])
    };
    (median, ms(v[0]), ms(v[v.len() - 1]))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; this bench has no unit tests
    }
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("boot bench: skipped: /dev/kvm cannot be opened here");
        return;
    }
    let runs: usize = std::env::var("SM_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("sm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = dir.join("hello.elf");
    std::fs::write(
        &elf,
        test_guests::pvh_elf(&test_guests::hello_and_poweroff_code(b'!', 0)),
    )
    .unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_supermachine"));

    let sm = |extra: &[&str]| {
        let mut c = Command::new(bin);
        c.args(["boot", "--kernel"])
            .arg(&elf)
            .args(["--memory", "256M"])
            .args(extra);
        time_first_byte(c, true)
    };
    // One warm-up run of each so the binary and ELF are in the page cache; then
    // sandboxed (the default) and --no-sandbox runs alternate, so both see the
    // same machine.
    sm(&[]);
    sm(&["--no-sandbox"]);
    let mut on = Vec::with_capacity(runs);
    let mut off = Vec::with_capacity(runs);
    for _ in 0..runs {
        on.push(sm(&[]));
        off.push(sm(&["--no-sandbox"]));
    }
    let report = |what: &str, samples: &[Sample]| -> (f64, f64, f64) {
        let (fb_med, fb_min, fb_max) = stats(samples.iter().map(|s| s.first_byte).collect());
        let (ex_med, ex_min, ex_max) = stats(samples.iter().filter_map(|s| s.exit).collect());
        let mut rss: Vec<i64> = samples.iter().filter_map(|s| s.max_rss_kib).collect();
        rss.sort();
        let rss_med = rss[rss.len() / 2] as f64 / 1024.0;
        println!("supermachine boot{what}, tiny PVH guest, 256 MiB, {runs} runs:");
        println!(
            "  start -> first guest byte: median {fb_med:.2} ms (min {fb_min:.2}, max {fb_max:.2})"
        );
        println!(
            "  start -> process exit:     median {ex_med:.2} ms (min {ex_min:.2}, max {ex_max:.2})"
        );
        println!(
            "  peak RSS: median {rss_med:.2} MiB (max {:.2} MiB)",
            rss[rss.len() - 1] as f64 / 1024.0
        );
        (fb_med, ex_med, rss_med)
    };
    let (fb_med, ex_on, rss_on) = report(" (sandboxed, the default)", &on);
    let (fb_off, ex_off, rss_off) = report(" --no-sandbox", &off);
    println!(
        "  sandbox cost (medians): first byte {:+.2} ms, exit {:+.2} ms, peak RSS {:+.2} MiB",
        fb_med - fb_off,
        ex_on - ex_off,
        rss_on - rss_off
    );

    let qemu_ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if qemu_ok {
        let q = |_: usize| {
            let mut c = Command::new("qemu-system-x86_64");
            c.args([
                "-M",
                "microvm,acpi=off,pic=off,rtc=off,pit=off",
                "-accel",
                "kvm",
                "-m",
                "256M",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
                "-kernel",
            ])
            .arg(&elf);
            time_first_byte(c, false)
        };
        q(0);
        let qs: Vec<Sample> = (0..runs).map(q).collect();
        let (q_med, q_min, q_max) = stats(qs.iter().map(|s| s.first_byte).collect());
        println!("qemu-system-x86_64 -M microvm, same guest, {runs} runs:");
        println!(
            "  start -> first guest byte: median {q_med:.2} ms (min {q_min:.2}, max {q_max:.2})"
        );
        println!(
            "  ratio supermachine/qemu (first byte, medians): {:.3}",
            fb_med / q_med
        );
    } else {
        println!("qemu-system-x86_64 not installed: no peer measured");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
