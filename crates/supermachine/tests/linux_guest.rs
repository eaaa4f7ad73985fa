//! Linux-guest tests: boot Debian's cloud kernel with supermachine's initramfs and
//! check what a user sees (console output, exit status, CPU count).
//!
//! Where `/dev/kvm` runs Linux guests (hardware virtualization) the scenarios run
//! directly. On a PVM host (this project's machines) the whole suite re-runs itself
//! inside the nested rig (`tests/nested/rig`): the kernel and initramfs are prepared
//! on the host, carried in as files, and the scenarios run in L1 against real KVM.
//! Without any `/dev/kvm` and without QEMU the suite says why and runs nothing.
//!
//! `harness = false`: one rig boot serves every scenario.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IN_RIG: &str = "SM_TEST_IN_RIG";

struct Scenario {
    name: &'static str,
    run: fn(&Env) -> Result<(), String>,
}

struct Env {
    bin: PathBuf,
}

/// Output and status of one `supermachine` invocation.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Env {
    fn supermachine(&self, args: &[&str], timeout: Duration) -> Result<Outcome, String> {
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        let start = Instant::now();
        loop {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(_) => break,
                None if start.elapsed() > timeout => {
                    let _ = child.kill();
                    let out = child.wait_with_output().map_err(|e| e.to_string())?;
                    return Err(format!(
                        "timed out after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        Ok(Outcome {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn expect(cond: bool, what: &str, o: &Outcome) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(format!(
            "{what}\nexit code: {:?}\nstdout:\n{}\nstderr:\n{}",
            o.code, o.stdout, o.stderr
        ))
    }
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn boot_default_reaches_guest_init(env: &Env) -> Result<(), String> {
    let o = env.supermachine(&["boot"], BOOT_TIMEOUT)?;
    expect(
        o.stdout.contains("supermachine: guest-init ready (cpus=1)"),
        "the ready marker with cpus=1 is on the console",
        &o,
    )?;
    expect(o.code == Some(0), "exit status 0", &o)
}

fn boot_exit_status_is_the_guests(env: &Env) -> Result<(), String> {
    let cmdline = format!("{} sm.exit=42", supermachine::DEFAULT_CMDLINE);
    let o = env.supermachine(&["boot", "--cmdline", &cmdline], BOOT_TIMEOUT)?;
    expect(
        o.stdout.contains("supermachine: guest-init ready"),
        "guest-init reached",
        &o,
    )?;
    expect(o.code == Some(42), "exit status 42 from the guest", &o)
}

fn boot_two_cpus_are_online(env: &Env) -> Result<(), String> {
    let o = env.supermachine(&["boot", "--cpus", "2", "--memory", "768M"], BOOT_TIMEOUT)?;
    expect(
        o.stdout.contains("supermachine: guest-init ready (cpus=2)"),
        "the guest sees 2 online CPUs",
        &o,
    )?;
    expect(o.code == Some(0), "exit status 0", &o)
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "boot_default_reaches_guest_init",
        run: boot_default_reaches_guest_init,
    },
    Scenario {
        name: "boot_exit_status_is_the_guests",
        run: boot_exit_status_is_the_guests,
    },
    Scenario {
        name: "boot_two_cpus_are_online",
        run: boot_two_cpus_are_online,
    },
];

fn run_scenarios(env: &Env, filter: Option<&str>) -> bool {
    let (mut passed, mut failed) = (0, 0);
    for s in SCENARIOS {
        if filter.is_some_and(|f| !s.name.contains(f)) {
            continue;
        }
        let t = Instant::now();
        match (s.run)(env) {
            Ok(()) => {
                passed += 1;
                println!("test {} ... ok ({:.1}s)", s.name, t.elapsed().as_secs_f64());
            }
            Err(e) => {
                failed += 1;
                println!(
                    "test {} ... FAILED ({:.1}s)\n{e}",
                    s.name,
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    println!("linux_guest: {passed} passed, {failed} failed");
    failed == 0
}

fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Prepares the kernel and initramfs on the host (L1 has no network and building the
/// initramfs needs the module tree) and runs this binary in the rig with a copy of
/// just those files as its cache.
fn run_in_rig(filter: Option<&str>) -> bool {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_supermachine"));
    let assets = match runner::kernel::provision() {
        Ok(a) => a,
        Err(e) => {
            println!("linux_guest: cannot provision the kernel on the host: {e}");
            println!("linux_guest: 0 passed, 1 failed");
            return false;
        }
    };
    let initramfs = match runner::initramfs::ensure(&assets) {
        Ok(p) => p,
        Err(e) => {
            println!("linux_guest: cannot build the initramfs on the host: {e}");
            println!("linux_guest: 0 passed, 1 failed");
            return false;
        }
    };
    let payload = std::env::temp_dir().join(format!("sm-rig-payload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&payload);
    let store = payload.join("cache/supermachine");
    let kdir = store.join("kernels").join(&assets.version);
    std::fs::create_dir_all(&kdir).expect("create payload dir");
    std::fs::copy(
        &assets.kernel,
        kdir.join(assets.kernel.file_name().expect("kernel name")),
    )
    .expect("copy kernel");
    if let Some(c) = &assets.config {
        std::fs::copy(c, kdir.join(c.file_name().expect("config name"))).expect("copy config");
    }
    std::fs::write(store.join("kernels/default"), &assets.version).expect("write default");
    std::fs::copy(
        &initramfs,
        store.join(initramfs.file_name().expect("initramfs name")),
    )
    .expect("copy initramfs");
    std::fs::copy(&bin, payload.join("supermachine")).expect("copy supermachine");
    let me = std::env::current_exe().expect("current_exe");
    std::fs::copy(&me, payload.join("linux_guest")).expect("copy test binary");

    let Some(modules) = assets.modules_dir.clone() else {
        println!(
            "linux_guest: the provisioned kernel has no modules dir (kvm-amd is needed for L1)"
        );
        println!("linux_guest: 0 passed, 1 failed");
        return false;
    };
    let mut cmd = Command::new(workspace_root().join("tests/nested/rig"));
    cmd.env("RIG_KERNEL", &assets.kernel)
        .env("RIG_MODULES", modules);
    cmd.env(
        "RIG_ENV",
        format!(
            "{IN_RIG}=1 XDG_CACHE_HOME=/payload/cache SM_TEST_BIN=/payload/supermachine SM_TEST_FILTER={}",
            filter.unwrap_or("")
        ),
    );
    cmd.arg(&payload).arg("--").arg("./linux_guest");
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    let _ = std::fs::remove_dir_all(&payload);
    ok
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .or_else(|| {
            std::env::var("SM_TEST_FILTER")
                .ok()
                .filter(|s| !s.is_empty())
        });
    let filter = filter.as_deref();
    let ok = if std::env::var_os(IN_RIG).is_some() {
        let bin = std::env::var_os("SM_TEST_BIN")
            .map(PathBuf::from)
            .expect("SM_TEST_BIN");
        run_scenarios(&Env { bin }, filter)
    } else if Path::new("/dev/kvm").exists() && !kvm_is_pvm() {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_supermachine"));
        run_scenarios(&Env { bin }, filter)
    } else if which("qemu-system-x86_64") {
        run_in_rig(filter)
    } else {
        println!(
            "linux_guest: skipped: /dev/kvm cannot run Linux guests here and qemu-system-x86_64 \
             (for the nested rig) is not installed"
        );
        true
    };
    std::process::exit(if ok { 0 } else { 1 });
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}
