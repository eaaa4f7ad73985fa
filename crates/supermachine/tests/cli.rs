//! The `supermachine boot` command as a user meets it, directly on this host's
//! `/dev/kvm` with tiny PVH guests: guest output and exit status, and one-line errors
//! with exit code 125 (never a panic) for bad input.
// The tiny guests are x86 PVH ELFs and the errors checked are KVM's.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../image/tests/support/mod.rs"]
mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_supermachine"))
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sm-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    // Readable by the unprivileged user of the no-access test.
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    d
}

fn tiny_guest(dir: &Path, text: &[u8], status: u32) -> PathBuf {
    let p = dir.join("guest.elf");
    std::fs::write(
        &p,
        test_guests::pvh_elf(&test_guests::print_and_poweroff_code(text, status)),
    )
    .unwrap();
    p
}

/// After half a second for the teardown helper to finish, how many processes
/// have `path` on their command line: the VMM, and the helper it forks (same
/// command line), name the guest ELF of the test that started them.
fn processes_naming(path: &Path) -> usize {
    std::thread::sleep(std::time::Duration::from_millis(500));
    let ours = path.to_str().unwrap().as_bytes().to_vec();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| cmdline.windows(ours.len()).any(|w| w == ours.as_slice()))
        .count()
}

/// A child process that is killed and reaped when dropped: a test that fails
/// while a heartbeat guest (which counts forever) runs must not leave it
/// spinning on the machine's cores for whatever runs next.
struct Reaped(std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `Command::output` with a bound: a supermachine that should have ended but
/// runs on (a guest that boots when it should have been refused, say) is
/// killed after two minutes and fails its test instead of hanging the run.
trait Bounded {
    fn bounded(&mut self) -> Output;
}

impl Bounded for Command {
    fn bounded(&mut self) -> Output {
        use std::io::Read;
        let limit = std::time::Duration::from_secs(120);
        let mut child = self
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{self:?} still ran after {limit:?} and was killed");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }
}

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

fn boot(args: &[&str]) -> Output {
    Command::new(bin()).arg("boot").args(args).bounded()
}

/// A supermachine failure: exit 125, exactly one line on stderr naming the problem.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert_one_line_error_code(o, 125, needle);
}

/// The VM verbs (`stop`, `rm`, `inspect`...) fail with docker's 1.
fn assert_verb_error(o: &Output, needle: &str) {
    assert_one_line_error_code(o, 1, needle);
}

fn assert_one_line_error_code(o: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected, got: {err}");
    assert!(err.starts_with("supermachine: error: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn boot_tiny_guest_prints_and_exits_with_its_status() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("ok");
    let k = tiny_guest(&d, b"hello from the guest", 7);
    let o = boot(&["--kernel", k.to_str().unwrap(), "--memory", "64M"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello from the guest\n");
    assert_eq!(
        o.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn boot_tiny_guest_status_zero_exits_zero_with_two_cpus() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("ok2");
    let k = tiny_guest(&d, b"ok", 0);
    let o = boot(&["--kernel", k.to_str().unwrap(), "--cpus", "2"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn boot_missing_kernel_is_one_line_error() {
    let o = boot(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_one_line_error(&o, "/nonexistent/vmlinuz");
}

#[test]
fn boot_non_kernel_file_is_one_line_error() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("nk");
    let k = d.join("notes.txt");
    std::fs::write(&k, b"this is not a kernel").unwrap();
    let o = boot(&["--kernel", k.to_str().unwrap()]);
    assert_one_line_error(&o, "not a bootable x86_64 kernel");
}

#[test]
fn boot_small_or_unaligned_memory_is_one_line_error() {
    let d = tmpdir("mem");
    let k = tiny_guest(&d, b"x", 0);
    let o = boot(&["--kernel", k.to_str().unwrap(), "--memory", "4M"]);
    assert_one_line_error(&o, "too small");
    let o = boot(&["--kernel", k.to_str().unwrap(), "--memory", "65537K"]);
    assert_one_line_error(&o, "not a multiple");
}

#[test]
fn boot_zero_cpus_is_one_line_error() {
    let d = tmpdir("cpu");
    let k = tiny_guest(&d, b"x", 0);
    let o = boot(&["--kernel", k.to_str().unwrap(), "--cpus", "0"]);
    assert_one_line_error(&o, "0 vCPUs");
}

#[test]
fn boot_unreadable_initrd_is_one_line_error() {
    let d = tmpdir("initrd");
    let k = tiny_guest(&d, b"x", 0);
    let o = boot(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd.img",
    ]);
    assert_one_line_error(&o, "/nonexistent/initrd.img");
}

#[test]
fn boot_without_kvm_access_is_one_line_error() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to drop to an unprivileged user");
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let d = tmpdir("noacc");
    let k = tiny_guest(&d, b"x", 0);
    std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = Command::new(bin())
        .args(["boot", "--kernel", k.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .env("HOME", &d)
        .bounded();
    assert_one_line_error(&o, "/dev/kvm");
}

#[test]
fn boot_and_run_bogus_network_is_one_line_error() {
    let o = boot(&["--network", "bogus"]);
    assert_one_line_error(&o, "cannot parse network \"bogus\"");
    let o = Command::new(bin())
        .args(["run", "--network", "bogus", "img"])
        .bounded();
    assert_one_line_error(&o, "cannot parse network \"bogus\"");
}

#[test]
fn boot_reserved_vsock_cid_is_one_line_error() {
    let d = tmpdir("cid");
    let k = tiny_guest(&d, b"x", 0);
    let o = boot(&["--kernel", k.to_str().unwrap(), "--vsock-cid", "2"]);
    assert_one_line_error(&o, "vsock CID 2 is reserved");
}

#[test]
fn run_missing_extra_disk_is_one_line_error_before_any_pull() {
    let d = tmpdir("rundisk");
    let missing = d.join("no-such-disk.img");
    // No registry listens on this port: the disk must be refused before any pull.
    let o = Command::new(bin())
        .args(["run", "--disk"])
        .arg(&missing)
        .args(["127.0.0.1:9/none:1", "true"])
        .env("XDG_CACHE_HOME", d.join("cache"))
        .bounded();
    assert_one_line_error(&o, "no-such-disk.img");
}

#[test]
fn run_bad_flag_value_is_one_line_error_not_clap_usage() {
    let o = Command::new(bin())
        .args(["run", "--memory", "lots", "img"])
        .bounded();
    assert_one_line_error(&o, "cannot parse size \"lots\"");
}

#[test]
fn run_malformed_or_taken_published_port_is_one_line_error_before_any_pull() {
    let o = Command::new(bin())
        .args(["run", "-p", "8080:http", "img"])
        .bounded();
    assert_one_line_error(&o, "bad published port \"8080:http\"");
    // A host port in use fails before the (nonexistent) image is looked at.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let o = Command::new(bin())
        .args(["run", "-p", &format!("{port}:80"), "oci:/nonexistent:x"])
        .bounded();
    assert_one_line_error(
        &o,
        &format!("cannot publish 127.0.0.1:{port} -> guest port 80"),
    );
    // So does a UNIX socket path that exists.
    let d = tmpdir("publish");
    let path = d.join("taken.sock");
    std::fs::write(&path, b"").unwrap();
    let o = Command::new(bin())
        .args([
            "run",
            "-p",
            &format!("unix:{}:80", path.display()),
            "oci:/nonexistent:x",
        ])
        .bounded();
    assert_one_line_error(&o, "cannot publish");
    assert!(path.exists(), "an existing path is never removed");
}

#[test]
fn run_with_a_tls_key_that_is_not_its_certificates_is_one_line_error_before_any_pull() {
    let d = tmpdir("tls");
    let a = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key, other_key) = (d.join("a.crt"), d.join("a.key"), d.join("b.key"));
    std::fs::write(&cert, a.cert.pem()).unwrap();
    std::fs::write(&key, a.key_pair.serialize_pem()).unwrap();
    std::fs::write(&other_key, b.key_pair.serialize_pem()).unwrap();
    let run = |args: &[&str]| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = format!("{port}:80/tls");
        Command::new(bin())
            .args(["run", "-p", &p])
            .args(args)
            .arg("oci:/nonexistent:x")
            .bounded()
    };
    let (c, k, ok) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        other_key.to_str().unwrap(),
    );
    let o = run(&["--tls-cert", c, "--tls-key", ok]);
    assert_one_line_error(&o, "does not fit the certificate");
    let o = run(&["--tls-cert", k, "--tls-key", k]);
    assert_one_line_error(&o, "holds no PEM certificate");
    let o = run(&["--tls-cert", c, "--tls-key", "/nonexistent.key"]);
    assert_one_line_error(&o, "cannot read the private key /nonexistent.key");
    let o = run(&[]);
    assert_one_line_error(&o, "/tls needs --tls-cert and --tls-key");
    // The matching pair gets past TLS to the (missing) image.
    let o = run(&["--tls-cert", c, "--tls-key", k]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(!err.contains("TLS"), "{err}");
}

#[test]
fn boot_vsock_uds_adds_a_device_whose_socket_errors_are_reported() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("vsock");
    let k = tiny_guest(&d, b"vsock", 3);
    // A socket path in a missing directory: the device cannot bind it.
    let bad = d.join("missing-dir/v.sock");
    let o = boot(&[
        "--kernel",
        k.to_str().unwrap(),
        "--vsock-uds",
        bad.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "vsock");
    // A usable one: the guest runs with the device attached.
    let good = d.join("v.sock");
    let o = boot(&[
        "--kernel",
        k.to_str().unwrap(),
        "--vsock-cid",
        "7",
        "--vsock-uds",
        good.to_str().unwrap(),
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "vsock\n");
    assert_eq!(o.status.code(), Some(3));
}

#[test]
fn boot_guest_with_an_exit_the_vmm_cannot_handle_is_one_line_error() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("unhandled");
    let k = d.join("guest.elf");
    // mov eax, 0xd0000000 ; jmp eax: runs code from the MMIO gap (KVM internal
    // error); the second vCPU never leaves wait-for-SIPI and must end too.
    std::fs::write(
        &k,
        test_guests::pvh_elf(&[0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0]),
    )
    .unwrap();
    let o = boot(&["--kernel", k.to_str().unwrap(), "--cpus", "2"]);
    assert_one_line_error(&o, "vCPU 0 stopped: KVM internal error");
}

#[test]
fn boot_stopped_by_sigterm_or_sigint_exits_128_plus_the_signal_and_leaves_nothing() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("signal");
    let k = d.join("heartbeat.elf");
    // Counts on COM1 forever: only the signal can end it.
    std::fs::write(
        &k,
        test_guests::pvh_elf(&test_guests::heartbeat_code(20_000)),
    )
    .unwrap();
    for (signal, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let mut child = Reaped(
            Command::new(bin())
                .args(["boot", "--kernel", k.to_str().unwrap()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // The guest is running once its first heartbeat line is out.
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut out, &mut first).unwrap();
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let sent = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if sent.elapsed() > std::time::Duration::from_secs(10) {
                let _ = child.kill();
                panic!("boot did not end within 10 s of signal {signal}");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(code), "signal {signal}; stderr: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(
            processes_naming(&k),
            0,
            "processes of the stopped VMM are left"
        );
    }
}

#[test]
fn run_whose_agent_never_answers_fails_within_its_agent_timeout_and_leaves_nothing() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("agent-timeout");
    // A "kernel" that runs forever and never speaks vsock: the agent never answers.
    let k = d.join("silent.elf");
    std::fs::write(
        &k,
        test_guests::pvh_elf(&test_guests::heartbeat_code(20_000)),
    )
    .unwrap();
    let cache = d.join("cache");
    let image = pull_busybox(&cache);
    let started = std::time::Instant::now();
    let o = Command::new(bin())
        .args([
            "run",
            "--network",
            "none",
            "--agent-timeout",
            "2",
            "--kernel",
        ])
        .arg(&k)
        .args([&image, "true"])
        .env("XDG_CACHE_HOME", &cache)
        .bounded();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "stderr: {err}");
    assert!(err.contains("agent timeout"), "{err}");
    assert!(
        took < std::time::Duration::from_secs(10),
        "run took {took:?} with a 2 s agent timeout"
    );
    assert_eq!(processes_naming(&k), 0, "processes of the run are left");
}

/// `boot` of a guest that counts forever, once its first output is out.
fn start_heartbeat(k: &Path, extra: &[&str], env: &[(&str, &str)]) -> Reaped {
    let mut child = Reaped(
        Command::new(bin())
            .args(["boot", "--kernel", k.to_str().unwrap()])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = [0u8; 1];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    child
}

/// `Key:\tvalue` of a /proc status file.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn boot_runs_sandboxed_every_thread_filtered_with_no_new_privs() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("sandboxed");
    let k = d.join("heartbeat.elf");
    std::fs::write(
        &k,
        test_guests::pvh_elf(&test_guests::heartbeat_code(20_000)),
    )
    .unwrap();
    let uds = d.join("v.sock");
    let mut child = start_heartbeat(
        &k,
        &["--cpus", "2", "--vsock-uds", uds.to_str().unwrap()],
        &[],
    );
    let proc_dir = PathBuf::from(format!("/proc/{}", child.id()));
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    let mut threads = Vec::new();
    for t in std::fs::read_dir(proc_dir.join("task")).unwrap().flatten() {
        let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        threads.push((
            status_field(&s, "Name:"),
            status_field(&s, "Seccomp:"),
            status_field(&s, "NoNewPrivs:"),
        ));
    }
    let limits = std::fs::read_to_string(proc_dir.join("limits")).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status_field(&status, "Seccomp:"), "2", "{status}");
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    for name in ["supermachine", "sm-signals", "vcpu0", "vcpu1", "sm-devices"] {
        assert!(
            threads.iter().any(|(n, _, _)| n == name),
            "no {name} thread: {threads:?}"
        );
    }
    for (name, seccomp, nnp) in &threads {
        assert!(
            seccomp == "2" && nnp == "1",
            "thread {name} is not confined: {threads:?}"
        );
    }
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default();
    assert!(nofile.contains(" 4096 "), "{nofile}");

    // --no-sandbox: nothing of it.
    let mut child = start_heartbeat(&k, &["--no-sandbox"], &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status_field(&status, "Seccomp:"), "0", "{status}");
    assert_eq!(status_field(&status, "NoNewPrivs:"), "0", "{status}");
}

#[test]
fn a_call_outside_the_sandbox_ends_the_vmm_with_a_message_naming_it() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("violation");
    let k = tiny_guest(&d, b"hi\n", 0);
    let o = Command::new(bin())
        .args(["boot", "--kernel", k.to_str().unwrap()])
        .env("SUPERMACHINE_SANDBOX_SELFTEST", "syscall")
        .bounded();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(159), "stderr: {err}");
    assert!(
        err.contains("its controlling thread made the system call getppid (110), which its seccomp filter does not allow"),
        "stderr: {err}"
    );
    assert_eq!(processes_naming(&k), 0, "processes of the VMM are left");
}

/// Whether this kernel has landlock (its ABI version, or an error).
fn landlock_abi() -> Option<i64> {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    // only returns the ABI version; no memory is passed.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    (v > 0).then_some(v)
}

#[test]
fn the_sandboxed_vmm_opens_only_the_files_its_vm_uses() {
    if !kvm_usable() {
        return;
    }
    if landlock_abi().is_none() {
        eprintln!("skipped: this kernel has no landlock");
        return;
    }
    let d = tmpdir("landlock");
    let k = tiny_guest(&d, b"hi\n", 0);
    let other = d.join("secret");
    std::fs::write(&other, b"not the VM's").unwrap();
    let selftest = |path: &Path| {
        let o = Command::new(bin())
            .args(["boot", "--kernel", k.to_str().unwrap()])
            .env(
                "SUPERMACHINE_SANDBOX_SELFTEST",
                format!("open:{}", path.display()),
            )
            .bounded();
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = selftest(&other);
    assert!(
        err.contains(&format!(
            "sandbox selftest: cannot open {}: Permission denied",
            other.display()
        )),
        "stderr: {err}"
    );
    // The VM's own kernel is in its set.
    let err = selftest(&k);
    assert!(
        err.contains(&format!("sandbox selftest: opened {}", k.display())),
        "stderr: {err}"
    );
}

/// Every vCPU's beats in `out` are 1, 2, 3, ... with none lost or repeated;
/// returns the last count of each.
fn consecutive_beats(out: &[u8], vcpus: u32) -> Vec<u32> {
    let beats = test_guests::parse_heartbeats(out).expect("heartbeat lines");
    let mut last = vec![0u32; vcpus as usize];
    for (i, b) in beats.iter().enumerate() {
        let l = &mut last[b.vcpu as usize];
        assert_eq!(
            b.count,
            *l + 1,
            "line {i}: vCPU {} went from {l} to {}",
            b.vcpu,
            b.count
        );
        *l = b.count;
    }
    last
}

#[test]
fn a_vm_captured_by_boot_is_restored_in_a_new_process_and_counts_on() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("snapshot");
    let k = d.join("heartbeat.elf");
    std::fs::write(
        &k,
        test_guests::pvh_elf(&test_guests::heartbeat_code(2_000)),
    )
    .unwrap();
    for vcpus in [1u32, 2] {
        let snap = d.join(format!("vm{vcpus}.snap"));
        let captured = Command::new(bin())
            .args(["boot", "--kernel", k.to_str().unwrap(), "--memory", "64M"])
            .args(["--cpus", &vcpus.to_string()])
            .args(["--snapshot-after-ms", "200", "--snapshot-out"])
            .arg(&snap)
            .bounded();
        let err = String::from_utf8_lossy(&captured.stderr);
        assert_eq!(captured.status.code(), Some(0), "stderr: {err}");
        assert!(err.contains("VM captured to"), "stderr: {err}");
        let before = consecutive_beats(&captured.stdout, vcpus);
        assert!(
            before.iter().all(|&c| c > 0),
            "every vCPU beat before the capture: {before:?}"
        );
        let file_before = std::fs::read(&snap).unwrap();

        // A new process restores it; its beats go on from the captured ones.
        let mut restored = Reaped(
            Command::new(bin())
                .args(["boot", "--restore"])
                .arg(&snap)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut out = captured.stdout.clone();
        let mut stdout = restored.stdout.take().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        loop {
            let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
            assert!(n > 0, "the restored VM ended");
            out.extend_from_slice(&buf[..n]);
            let beats = test_guests::parse_heartbeats(&out).unwrap_or_default();
            let mut last = vec![0u32; vcpus as usize];
            for b in &beats {
                last[b.vcpu as usize] = b.count;
            }
            if (0..vcpus as usize).all(|i| last[i] > before[i] + 20) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the restored VM did not count on: {last:?}"
            );
        }
        let _ = restored.kill();
        let _ = restored.wait();
        // The capture's output and the restore's read as one run.
        let after = consecutive_beats(&out, vcpus);
        eprintln!("{vcpus} vCPU(s): captured at {before:?}, restored VM reached {after:?}");
        assert_eq!(
            std::fs::read(&snap).unwrap(),
            file_before,
            "the snapshot file changed"
        );
    }
}

#[test]
fn a_damaged_snapshot_is_refused_with_a_clear_error() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("snapshot-bad");
    let k = d.join("heartbeat.elf");
    std::fs::write(
        &k,
        test_guests::pvh_elf(&test_guests::heartbeat_code(2_000)),
    )
    .unwrap();
    let snap = d.join("vm.snap");
    let o = Command::new(bin())
        .args(["boot", "--kernel", k.to_str().unwrap(), "--memory", "64M"])
        .args(["--snapshot-after-ms", "50", "--snapshot-out"])
        .arg(&snap)
        .bounded();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let good = std::fs::read(&snap).unwrap();
    // A flipped byte in the state, and a file cut inside its RAM section.
    let mut flipped = good.clone();
    flipped[4096 + 10] ^= 0x40;
    let cut = &good[..good.len() / 2];
    // The next format version, with a header checksum that matches it.
    let ours = u32::from_le_bytes(good[8..12].try_into().unwrap());
    let next = format!("format {}", ours + 1);
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(ours + 1).to_le_bytes());
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182).checksum(&newer[..64]);
    newer[64..72].copy_from_slice(&crc.to_le_bytes());
    for (what, bytes, needle) in [
        ("flipped", flipped.as_slice(), "checksum"),
        ("truncated", cut, "truncated"),
        ("newer", newer.as_slice(), next.as_str()),
    ] {
        let bad = d.join(format!("{what}.snap"));
        std::fs::write(&bad, bytes).unwrap();
        let o = Command::new(bin())
            .args(["boot", "--restore"])
            .arg(&bad)
            .bounded();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{what}: {err}");
        assert!(
            err.contains("cannot restore") && err.to_lowercase().contains(needle),
            "{what}: {err}"
        );
        assert_eq!(processes_naming(&bad), 0, "{what}: processes are left");
    }
}

/// Restores `snap` in a new process, reads its console until every vCPU has
/// beaten `beats` more times, kills it, and returns what it printed.
fn restore_and_beat(snap: &Path, vcpus: u32, beats: u32) -> Vec<u8> {
    let mut restored = Reaped(
        Command::new(bin())
            .args(["boot", "--restore"])
            .arg(snap)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = restored.stdout.take().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(n > 0, "the restored VM ended");
        out.extend_from_slice(&buf[..n]);
        // The capture may have cut a line: the restore then prints its rest
        // first, so count from the first whole line.
        let whole = match out.iter().position(|&b| b == b'\n') {
            Some(nl) if test_guests::parse_heartbeats(&out[..=nl]).is_none() => &out[nl + 1..],
            _ => &out[..],
        };
        let got = test_guests::parse_heartbeats(whole).unwrap_or_default();
        if (0..vcpus).all(|v| got.iter().filter(|b| b.vcpu == v).count() as u32 >= beats) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let _ = restored.kill();
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut restored.stderr.take().unwrap(), &mut err);
            panic!(
                "the restored VM did not beat {beats} times in 10 s; stdout: {:?}; stderr: {err}",
                String::from_utf8_lossy(&out)
            );
        }
    }
    let _ = restored.kill();
    let _ = restored.wait();
    out
}

#[test]
fn ten_restores_of_one_snapshot_each_start_where_it_was_taken_and_leave_it_unchanged() {
    use sha2::{Digest, Sha256};
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("snapshot-ten");
    let k = d.join("heartbeat.elf");
    std::fs::write(
        &k,
        test_guests::pvh_elf(&test_guests::heartbeat_code(2_000)),
    )
    .unwrap();
    let snap = d.join("vm.snap");
    let captured = Command::new(bin())
        .args(["boot", "--kernel", k.to_str().unwrap(), "--memory", "64M"])
        .args([
            "--cpus",
            "2",
            "--snapshot-after-ms",
            "200",
            "--snapshot-out",
        ])
        .arg(&snap)
        .bounded();
    assert_eq!(
        captured.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&captured.stderr)
    );
    let at_capture = consecutive_beats(&captured.stdout, 2);
    let sha = || hex(&Sha256::digest(std::fs::read(&snap).unwrap()));
    let taken = sha();
    for i in 0..10 {
        // Each restore writes its RAM (the counters), and each starts from the
        // captured counts: no restore sees what an earlier one wrote.
        let out = restore_and_beat(&snap, 2, 5);
        let mut whole = captured.stdout.clone();
        whole.extend_from_slice(&out);
        let reached = consecutive_beats(&whole, 2);
        assert!(
            (0..2).all(|v| reached[v] >= at_capture[v] + 5),
            "restore {i}: from {at_capture:?} to {reached:?}"
        );
        assert_eq!(sha(), taken, "restore {i} changed the snapshot file");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_vm_with_a_writable_disk_is_not_captured_and_the_error_says_which() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("snapshot-disk");
    let k = d.join("heartbeat.elf");
    std::fs::write(
        &k,
        test_guests::pvh_elf(&test_guests::heartbeat_code(2_000)),
    )
    .unwrap();
    let disk = d.join("data.img");
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    let snap = d.join("vm.snap");
    let capture = |disk_arg: &str| {
        Command::new(bin())
            .args(["boot", "--kernel", k.to_str().unwrap(), "--memory", "64M"])
            .args(["--disk", disk_arg, "--snapshot-after-ms", "50"])
            .arg("--snapshot-out")
            .arg(&snap)
            .bounded()
    };
    let o = capture(disk.to_str().unwrap());
    assert_one_line_error(&o, "cannot capture a VM with the writable disk");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(disk.to_str().unwrap()),
        "names the disk: {err}"
    );
    assert!(!snap.exists(), "no snapshot was written");
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0x5au8; 1 << 20]);
    // Read-only, the same disk is captured with the VM.
    let o = capture(&format!("{},ro", disk.display()));
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(snap.exists(), "the snapshot was written");
}

#[test]
fn run_of_a_vm_that_resets_early_names_the_guest_consoles_last_line() {
    if !kvm_usable() {
        return;
    }
    let d = tmpdir("early-reset");
    // A "kernel" that prints a panic line and resets through the i8042, as a
    // Linux guest does with panic=-1 when its init dies.
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in b"[    0.5] Kernel panic - not syncing: boom\r\n" {
        code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b ; out dx, al
    }
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe ; out 0x64, al
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // 1: hlt ; jmp 1b
    let k = d.join("panics.elf");
    std::fs::write(&k, test_guests::pvh_elf(&code)).unwrap();
    let cache = d.join("cache");
    let image = pull_busybox(&cache);
    let o = Command::new(bin())
        .args(["run", "--network", "none", "--kernel"])
        .arg(&k)
        .args([&image, "true"])
        .env("XDG_CACHE_HOME", &cache)
        .bounded();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "stderr: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("supermachine: error: the VM ended (Reset) before the process")
            && last.contains(r#"last line: "[    0.5] Kernel panic - not syncing: boom""#),
        "{err}"
    );
    assert!(o.stdout.is_empty(), "the console is not on stdout");
}

/// Pulls the test busybox image into the cache at `cache`; returns its reference.
fn pull_busybox(cache: &Path) -> String {
    let layout = support::busybox_layout();
    let image = format!("oci:{}:{}", layout.display(), support::BUSYBOX_TAG);
    let pulled = Command::new(bin())
        .args(["pull", &image])
        .env("XDG_CACHE_HOME", cache)
        .bounded();
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    image
}

#[test]
fn snapshots_lists_and_prunes_and_rmi_removes_an_images_snapshots() {
    let d = tmpdir("snapshots-verb");
    let cache = d.join("cache");
    let image = pull_busybox(&cache);
    let pulled = Command::new(bin())
        .args(["pull", &image])
        .env("XDG_CACHE_HOME", &cache)
        .bounded();
    let line = String::from_utf8_lossy(&pulled.stdout).to_string();
    let digest = line.split_whitespace().nth(1).unwrap().to_string();
    let hex = digest.trim_start_matches("sha256:").to_string();
    let snapshots = |args: &[&str]| {
        let o = Command::new(bin())
            .arg("snapshots")
            .args(args)
            .env("XDG_CACHE_HOME", &cache)
            .bounded();
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    // As `run` leaves them: a sparse file per VM configuration (its 3 MiB of
    // RAM touched out of 64).
    let dir = cache.join("supermachine/snapshots").join(&hex);
    std::fs::create_dir_all(&dir).unwrap();
    let place = |key: &str| {
        let f = std::fs::File::create(dir.join(format!("{key}.snap"))).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![7u8; 3 << 20], 0).unwrap();
    };
    place("0123456789abcdef0123456789abcdef");
    let listed = snapshots(&[]);
    let row = listed
        .lines()
        .find(|l| l.contains("0123456789abcdef0123456789abcdef"))
        .unwrap_or_else(|| panic!("no row for the snapshot: {listed}"));
    assert!(row.contains(&hex[..12]), "{row}");
    assert!(row.contains("busybox"), "the image's reference: {row}");
    assert!(
        row.contains("3.0M") && row.contains("64.0M"),
        "on disk and RAM sizes: {row}"
    );
    assert_eq!(snapshots(&["ls"]), listed);

    let pruned = snapshots(&["prune"]);
    assert!(
        pruned.contains("Removed 1 snapshot(s), 3.0 MiB"),
        "{pruned}"
    );
    assert!(!dir.exists(), "the emptied image directory is gone");
    assert_eq!(snapshots(&[]).lines().count(), 1, "only the header is left");

    // rmi of the image's last reference takes its snapshots with it.
    std::fs::create_dir_all(&dir).unwrap();
    place("fedcba9876543210fedcba9876543210");
    let o = Command::new(bin())
        .args(["rmi", &image])
        .env("XDG_CACHE_HOME", &cache)
        .bounded();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(!dir.exists(), "rmi left {}", dir.display());
}

/// A registry entry as a supervisor leaves it: `vms/ID/{config,state}.json`,
/// its lock file and, if named, `names/NAME`.
fn fake_vm(runtime: &Path, id: &str, name: Option<&str>, state: &str) -> std::fs::File {
    use std::os::unix::fs::PermissionsExt;
    for d in ["", "vms", "names"] {
        std::fs::create_dir_all(runtime.join(d)).unwrap();
        std::fs::set_permissions(runtime.join(d), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let dir = runtime.join("vms").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let name_json = name.map_or("null".to_string(), |n| format!("{n:?}"));
    std::fs::write(
        dir.join("config.json"),
        format!(
            r#"{{"id":"{id}","name":{name_json},"image":"busybox","command":["sleep","100"],"ports":[],"detached":true,"created_ms":1}}"#
        ),
    )
    .unwrap();
    std::fs::write(dir.join("state.json"), state).unwrap();
    if let Some(n) = name {
        std::os::unix::fs::symlink(id, runtime.join("names").join(n)).unwrap();
    }
    std::fs::File::create(dir.join("lock")).unwrap()
}

#[test]
fn vm_verbs_on_unknown_dead_ambiguous_and_running_vms_are_one_line_errors() {
    use std::os::fd::AsRawFd;
    let d = tmpdir("names");
    let runtime = d.join("runtime");
    let sm = |args: &[&str]| {
        Command::new(bin())
            .env("SUPERMACHINE_RUNTIME_DIR", &runtime)
            .args(args)
            .bounded()
    };
    assert_one_line_error(&sm(&["exec", "web", "true"]), "no VM named web");
    assert_verb_error(&sm(&["stop", "web"]), "no VM named web");
    // A detached VM whose supervisor was killed while it ran: exited, with
    // the reason; exec and stop say it is not running; rm removes it.
    let running = r#"{"status":"running","pid":1,"started_ms":1,"finished_ms":null,"exit_code":null,"reason":null,"stop_signal":null}"#;
    let abc1 = "abc1".repeat(16);
    drop(fake_vm(&runtime, &abc1, Some("web"), running));
    assert_one_line_error(&sm(&["exec", "web", "true"]), "VM web is not running");
    assert_verb_error(&sm(&["stop", "web"]), "VM web is not running");
    let ps = sm(&["ps", "-a"]);
    let text = String::from_utf8_lossy(&ps.stdout);
    assert!(
        text.contains("abc1abc1abc1")
            && text.contains("Exited (its supervisor ended")
            && text.contains("web"),
        "{text}"
    );
    assert!(
        !String::from_utf8_lossy(&sm(&["ps"]).stdout).contains("abc1"),
        "ps without -a lists only running VMs"
    );
    // Two ids that share a prefix: the prefix names neither.
    let abc2 = "abc2".repeat(16);
    let lock = fake_vm(&runtime, &abc2, Some("db"), running);
    assert_verb_error(&sm(&["inspect", "abc"]), "abc names 2 VMs");
    let one = sm(&["inspect", "abc2"]);
    let text = String::from_utf8_lossy(&one.stdout);
    assert!(
        text.contains(&abc2) && text.contains(r#""Name": "db""#),
        "{text}"
    );
    // A VM whose supervisor holds its lock runs: rm refuses it without -f.
    // SAFETY: flock on a file this test opened.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    assert_verb_error(
        &sm(&["rm", "db"]),
        "VM db is running: stop it first, or rm -f",
    );
    assert!(String::from_utf8_lossy(&sm(&["ps", "-q"]).stdout).contains("abc2abc2abc2"));
    // A name another VM holds is refused before anything is pulled.
    assert_one_line_error(
        &sm(&["run", "--name", "db", "--no-sandbox", "img", "true"]),
        "a VM named db already exists",
    );
    drop(lock);
    let rm = sm(&["rm", "web", "db"]);
    assert_eq!(rm.status.code(), Some(0), "{rm:?}");
    assert_eq!(String::from_utf8_lossy(&rm.stdout), "web\ndb\n");
    assert!(std::fs::read_dir(runtime.join("vms"))
        .unwrap()
        .next()
        .is_none());
    assert!(std::fs::read_dir(runtime.join("names"))
        .unwrap()
        .next()
        .is_none());
    for bad in ["a", ".x", "a/b"] {
        assert_one_line_error(
            &sm(&["run", "--name", bad, "img", "true"]),
            "invalid VM name",
        );
    }
    // A malformed egress rule, before anything is pulled; update checks too.
    assert_one_line_error(
        &sm(&["run", "--egress-allow", "10.0.0.0/33", "img", "true"]),
        "egress rule \"10.0.0.0/33\": the prefix length is out of range",
    );
    assert_verb_error(
        &sm(&["update", "--egress-allow", "10.0.0.1:99999", "nosuch"]),
        "not a port number",
    );
    assert_one_line_error(
        &sm(&[
            "run",
            "--network",
            "none",
            "--egress-deny",
            "10.0.0.0/8",
            "img",
            "true",
        ]),
        "need a network",
    );
    assert_one_line_error(
        &sm(&["run", "--restart", "always", "img", "true"]),
        "--detach",
    );
    // A runtime directory others may enter is refused.
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    assert_one_line_error(&sm(&["exec", "web", "true"]), "others may reach it");
}

#[test]
fn run_detached_whose_image_cannot_be_pulled_fails_with_the_pull_error() {
    // Short: the control socket's path must fit in sun_path.
    let d = tmpdir("dp");
    let sm = |args: &[&str]| {
        Command::new(bin())
            .env("SUPERMACHINE_RUNTIME_DIR", d.join("r"))
            .env("XDG_CACHE_HOME", d.join("cache"))
            .args(args)
            .bounded()
    };
    // No registry listens on port 9: the supervisor's VMM fails to pull, and
    // `run -d` says why (the supervisor and its VMM got the options on stdin).
    let o = sm(&[
        "run",
        "-d",
        "--name",
        "nopull",
        "127.0.0.1:9/none:1",
        "true",
    ]);
    assert_one_line_error(&o, "127.0.0.1:9");
    let ps = sm(&["ps", "-a"]);
    let text = String::from_utf8_lossy(&ps.stdout);
    assert!(text.contains("nopull") && text.contains("Exited"), "{text}");
    let rm = sm(&["rm", "nopull"]);
    assert_eq!(rm.status.code(), Some(0), "{rm:?}");
    assert!(!String::from_utf8_lossy(&sm(&["ps", "-a"]).stdout).contains("nopull"));
    // `supervise` is for `run -d`: anything else on its stdin is refused.
    let mut typed = Command::new(bin())
        .env("SUPERMACHINE_RUNTIME_DIR", d.join("r"))
        .arg("supervise")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = typed.stdin.take().unwrap();
        stdin.write_all(b"{\"image\": 3}").unwrap();
    }
    let o = typed.wait_with_output().unwrap();
    assert_one_line_error(&o, "is run by `run -d`");
}
