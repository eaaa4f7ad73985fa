//! Each test re-runs itself in a child process (`SM_SANDBOX_CHILD=1`), which
//! confines its one test thread and acts; the parent checks what the child
//! printed and how it ended. A confined thread cannot be unconfined, and the
//! test harness's other threads must not be.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::*;

const CHILD: &str = "SM_SANDBOX_CHILD";

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs test `name` (this module's) again in a child with `env`.
fn child(name: &str, env: &[(&str, &str)]) -> Output {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        &format!("sandbox::tests::{name}"),
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the child test")
}

fn config(read: Vec<PathBuf>, mode: SandboxMode) -> SandboxConfig {
    SandboxConfig {
        mode,
        read,
        write: Vec::new(),
        dirs: Vec::new(),
        max_open_files: DEFAULT_MAX_OPEN_FILES,
        max_file_size: MIN_MAX_FILE_SIZE,
    }
}

fn enter(class: ThreadClass, cfg: &SandboxConfig) -> Sandbox {
    let s = Sandbox::prepare(cfg).expect("prepare");
    s.enter_process().expect("process limits");
    s.enter_thread(class).expect("confine");
    s
}

fn open_errno(path: &Path) -> i32 {
    match std::fs::File::open(path) {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[test]
fn every_class_filter_compiles() {
    let s = Sandbox::prepare(&config(Vec::new(), SandboxMode::Enforce));
    assert!(s.is_ok(), "{:?}", s.err());
}

#[test]
fn a_call_outside_the_filter_stops_the_process_naming_it() {
    if is_child() {
        enter(ThreadClass::Vcpu, &config(Vec::new(), SandboxMode::Enforce));
        // A vCPU thread never looks at files (std's metadata is a statx).
        let _ = std::fs::metadata("/etc/hostname");
        println!("still alive");
        return;
    }
    let out = child("a_call_outside_the_filter_stops_the_process_naming_it", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(EXIT_SANDBOX_VIOLATION),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("its vCPU thread made the system call statx (332) on \"/etc/hostname\""),
        "stderr: {stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("still alive"));
}

/// glibc's malloc opens `/proc/sys/vm/overcommit_memory` from whichever
/// thread frees first into a shrinking arena heap: on a thread that opens
/// nothing, that open fails (`EACCES`) and the process carries on.
#[test]
fn opening_on_a_thread_that_opens_nothing_fails_without_stopping_it() {
    if is_child() {
        for class in [ThreadClass::Vcpu, ThreadClass::Devices] {
            let cfg = config(vec!["/proc".into()], SandboxMode::Enforce);
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let s = enter(class, &cfg);
                // Landlock would allow it: the refusal is the filter's.
                let e = open_errno(Path::new("/proc/sys/vm/overcommit_memory"));
                tx.send((s.landlock(), e)).expect("send");
            });
            let (_, e) = rx.recv().expect("the thread answered");
            println!("{}: open errno {e}", class.name());
        }
        return;
    }
    let out = child(
        "opening_on_a_thread_that_opens_nothing_fails_without_stopping_it",
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for class in ["vCPU", "device event loop"] {
        assert!(
            stdout.contains(&format!("{class}: open errno {}", libc::EACCES)),
            "{stdout}"
        );
    }
}

#[test]
fn log_mode_lets_the_call_through() {
    if is_child() {
        // Landlock still holds: the path must be one it allows.
        enter(
            ThreadClass::Vcpu,
            &config(vec!["/proc".into()], SandboxMode::Log),
        );
        let e = open_errno(Path::new("/proc/self/status"));
        println!("open returned errno {e}");
        return;
    }
    let out = child("log_mode_lets_the_call_through", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("open returned errno 0"), "{stdout}");
}

#[test]
fn the_controller_starts_threads_but_never_namespaces() {
    if is_child() {
        enter(
            ThreadClass::Controller,
            &config(Vec::new(), SandboxMode::Enforce),
        );
        // glibc's clone3 gets ENOSYS and falls back to clone.
        let v = std::thread::spawn(|| 42).join().expect("thread");
        println!("thread answered {v}");
        // SAFETY: unshare takes a flag word; it is refused before it runs.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
        println!("unshare returned {rc}");
        return;
    }
    let out = child("the_controller_starts_threads_but_never_namespaces", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("thread answered 42"), "{stdout} {stderr}");
    assert!(!stdout.contains("unshare returned"), "{stdout}");
    assert!(stderr.contains("system call unshare (272)"), "{stderr}");
    assert_eq!(out.status.code(), Some(EXIT_SANDBOX_VIOLATION));
}

#[test]
fn the_process_shows_seccomp_filtering_and_no_new_privs() {
    if is_child() {
        enter(
            ThreadClass::Controller,
            &config(vec!["/proc".into()], SandboxMode::Enforce),
        );
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        for l in status.lines() {
            if l.starts_with("Seccomp:") || l.starts_with("NoNewPrivs:") {
                println!("{l}");
            }
        }
        return;
    }
    let out = child("the_process_shows_seccomp_filtering_and_no_new_privs", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("Seccomp:\t2"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");
}

#[test]
fn landlock_keeps_the_controller_to_its_paths() {
    let dir = std::env::temp_dir().join(format!("sm-landlock-{}", std::process::id()));
    let allowed = dir.join("allowed");
    let other = dir.join("other");
    if is_child() {
        let dir = PathBuf::from(std::env::var("SM_DIR").expect("SM_DIR"));
        let s = enter(
            ThreadClass::Controller,
            &config(vec![dir.join("allowed")], SandboxMode::Enforce),
        );
        println!("landlock {:?}", s.landlock());
        println!("allowed {}", open_errno(&dir.join("allowed")));
        println!("other {}", open_errno(&dir.join("other")));
        return;
    }
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(&allowed, b"a").expect("write");
    std::fs::write(&other, b"b").expect("write");
    let out = child(
        "landlock_keeps_the_controller_to_its_paths",
        &[("SM_DIR", dir.to_str().expect("utf-8"))],
    );
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    if stdout.contains("landlock Unsupported") {
        eprintln!("skipped: this kernel has no landlock");
        return;
    }
    assert!(stdout.contains("allowed 0"), "{stdout}");
    assert!(
        stdout.contains(&format!("other {}", libc::EACCES)),
        "{stdout}"
    );
}

#[test]
fn a_sandboxed_vmm_runs_pauses_saves_and_resumes_its_guest() {
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm cannot be opened here");
        return;
    }
    if is_child() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Console(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Console {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dir = PathBuf::from(std::env::var("SM_DIR").expect("SM_DIR"));
        let elf = dir.join("heartbeat.elf");
        let mut res = VmResources::new(elf);
        res.memory = 16 << 20;
        res.vcpus = 2;
        let hv = crate::backend::open().expect("open /dev/kvm");
        let console = Console::default();
        let vmm = crate::vmm::Vmm::build(
            &hv,
            &res,
            Box::new(console.clone()),
            Arc::new(crate::timings::Timings::start()),
        )
        .expect("build");
        let report = vmm
            .enter_sandbox(&SandboxConfig::for_resources(&res, SandboxMode::Enforce))
            .expect("sandbox");
        println!("unconfined: {:?}", report.unconfined_threads);
        vmm.start().expect("start");
        let beats = |c: &Console| c.0.lock().unwrap_or_else(|e| e.into_inner()).len();
        while beats(&console) < 64 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        vmm.pause().expect("pause");
        let state = vmm.save_state().expect("save");
        println!("saved {} vCPUs", state.vcpus.len());
        let before = beats(&console);
        vmm.resume().expect("resume");
        while beats(&console) < before + 64 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        vmm.stop();
        let outcome = vmm.wait().expect("wait");
        println!("ended {:?}", outcome.exit);
        return;
    }
    let dir = std::env::temp_dir().join(format!("sm-sandbox-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("heartbeat.elf"),
        test_guests::pvh_elf(&test_guests::heartbeat_code(500)),
    )
    .expect("write");
    let out = child(
        "a_sandboxed_vmm_runs_pauses_saves_and_resumes_its_guest",
        &[("SM_DIR", dir.to_str().expect("utf-8"))],
    );
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("saved 2 vCPUs"), "{stdout}");
    assert!(stdout.contains("ended Stopped"), "{stdout}");
}
