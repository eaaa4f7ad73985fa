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

#[path = "../../image/tests/support/mod.rs"]
mod support;

const IN_RIG: &str = "SM_TEST_IN_RIG";

struct Scenario {
    name: &'static str,
    run: fn(&Env) -> Result<(), String>,
}

struct Env {
    bin: PathBuf,
}

/// Test images, prepared on the host into the payload's store (the rig has no
/// network): references that `run` finds in the store.
struct Images {
    oci: String,
    archive: String,
    registry: String,
    big_sha256: String,
}

impl Images {
    fn from_env() -> Option<Self> {
        Some(Self {
            oci: std::env::var("SM_TEST_IMG_OCI").ok()?,
            archive: std::env::var("SM_TEST_IMG_ARCHIVE").ok()?,
            registry: std::env::var("SM_TEST_IMG_REG").ok()?,
            big_sha256: std::env::var("SM_TEST_BIG_SHA").ok()?,
        })
    }

    fn env_line(&self) -> String {
        format!(
            "SM_TEST_IMG_OCI={} SM_TEST_IMG_ARCHIVE={} SM_TEST_IMG_REG={} SM_TEST_BIG_SHA={}",
            self.oci, self.archive, self.registry, self.big_sha256
        )
    }
}

/// 32 MiB of a fixed pattern: the large file whose hash the guest must reproduce.
fn big_file_bytes() -> Vec<u8> {
    (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A two-layer image built with umoci from Debian's busybox-static: the lower
/// layer has busybox with every applet, a setuid file, a symlink, a hardlink, a
/// char device, a 32 MiB file, and files the upper layer deletes or replaces.
fn build_test_layout() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    support::cached("sm-run-image-v3", |dir| {
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
            std::fs::create_dir_all(&bin).expect("bin");
            std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox");
            // Relative links: `busybox --install -s` would point them at this host path.
            let list = support::run(Command::new("/bin/busybox").arg("--list"));
            for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
                let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
            }
            std::fs::create_dir_all(root.join("data/gone-dir")).expect("dirs");
            std::fs::write(root.join("data/suid"), b"#!/bin/sh\n").expect("suid");
            std::fs::set_permissions(
                root.join("data/suid"),
                std::fs::Permissions::from_mode(0o4755),
            )
            .expect("chmod");
            std::os::unix::fs::symlink("/data/target", root.join("data/link")).expect("symlink");
            std::fs::write(root.join("data/target"), b"target\n").expect("target");
            std::fs::hard_link(root.join("data/target"), root.join("data/hard")).expect("hardlink");
            std::fs::write(root.join("data/deleted"), b"lower\n").expect("deleted");
            std::fs::write(root.join("data/replaced"), b"lower\n").expect("replaced");
            std::fs::write(root.join("data/gone-dir/a"), b"a\n").expect("a");
            std::fs::create_dir_all(root.join("data/opq")).expect("opq");
            std::fs::write(root.join("data/opq/a"), b"a\n").expect("opq/a");
            std::fs::write(root.join("data/opq/b"), b"b\n").expect("opq/b");
            std::fs::write(root.join("data/big"), big_file_bytes()).expect("big");
            std::fs::create_dir_all(root.join("dev")).expect("dev");
            support::run(
                Command::new("mknod")
                    .arg(root.join("dev/null"))
                    .args(["c", "1", "3"]),
            );
        });
        support::add_layer(&dir.join("b2"), &image, |root| {
            std::fs::remove_file(root.join("data/deleted")).expect("rm");
            std::fs::write(root.join("data/replaced"), b"upper\n").expect("replace");
            std::fs::remove_dir_all(root.join("data/gone-dir")).expect("rm dir");
        });
        // A hand-written layer for what umoci's diff never produces: an opaque
        // directory (image-spec layer.md) and ownership by ids no host user has.
        let tar_path = dir.join("layer3.tar");
        {
            let mut b = tar::Builder::new(std::fs::File::create(&tar_path).expect("tar"));
            let mut entry = |path: &str, kind: tar::EntryType, mode: u32, ids: u64, data: &[u8]| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_mode(mode);
                h.set_uid(ids);
                h.set_gid(ids + 4444);
                h.set_size(data.len() as u64);
                h.set_mtime(1_700_000_000);
                h.set_cksum();
                b.append_data(&mut h, path, data).expect("tar entry");
            };
            entry("data/opq/", tar::EntryType::Directory, 0o755, 0, b"");
            entry(
                "data/opq/.wh..wh..opq",
                tar::EntryType::Regular,
                0o644,
                0,
                b"",
            );
            entry("data/opq/c", tar::EntryType::Regular, 0o644, 0, b"c\n");
            entry(
                "data/owned",
                tar::EntryType::Regular,
                0o640,
                1234,
                b"owned\n",
            );
            b.finish().expect("tar finish");
        }
        support::run(
            Command::new("umoci")
                .args(["raw", "add-layer", "--image", &image])
                .arg(&tar_path),
        );
        support::run(Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--config.cmd=/bin/sh",
            "--config.cmd=-c",
            "--config.cmd=echo default-cmd $GREETING",
            "--config.env=PATH=/bin",
            "--config.env=GREETING=hi",
            "--config.workingdir=/data",
        ]));
        support::run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout));
    })
    .join("layout")
}

/// Builds the test image, serves it from a real registry and a docker-archive, and
/// pulls all three into the store under `cache` with `bin` (the product itself).
fn prepare_images(bin: &Path, cache: &Path) -> Images {
    let layout = build_test_layout();
    let archive = support::docker_archive("sm-run-archive-v3", &layout, "t", "smtest:1");
    let registry = support::Registry::start();
    let reg_ref = registry.push(&layout, "t", "smtest:1");
    let refs = Images {
        oci: format!("oci:{}:t", layout.display()),
        archive: format!("docker-archive:{}", archive.display()),
        registry: reg_ref,
        big_sha256: sha256_hex(&big_file_bytes()),
    };
    for r in [&refs.oci, &refs.archive, &refs.registry] {
        let out = Command::new(bin)
            .args(["pull", r])
            .env("XDG_CACHE_HOME", cache)
            .output()
            .expect("run supermachine pull");
        assert!(
            out.status.success(),
            "supermachine pull {r}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    refs
}

/// Output and status of one `supermachine` invocation.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Env {
    /// Runs the product with `args`; its output is drained while it runs (a full
    /// pipe would stall the guest's output through vsock flow control).
    fn supermachine(&self, args: &[&str], timeout: Duration) -> Result<Outcome, String> {
        use std::io::Read;
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut v);
                }
                v
            })
        };
        let out_t = drain(
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        );
        let err_t = drain(
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        );
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(st) => break st,
                None if start.elapsed() > timeout => {
                    timed_out = true;
                    let _ = child.kill();
                    break child.wait().map_err(|e| e.to_string())?;
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
        if timed_out {
            let head: String = stdout.chars().take(2000).collect();
            return Err(format!(
                "timed out after {timeout:?}\nstdout ({} bytes, first 2000):\n{head}\nstderr:\n{stderr}",
                stdout.len()
            ));
        }
        Ok(Outcome {
            code: status.code(),
            stdout,
            stderr,
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

fn images() -> Result<Images, String> {
    Images::from_env().ok_or_else(|| "test images were not prepared".to_string())
}

fn run_out(env: &Env, args: &[&str]) -> Result<Outcome, String> {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    env.supermachine(&full, BOOT_TIMEOUT)
}

fn run_stdout_stderr_and_status_are_the_containers(env: &Env) -> Result<(), String> {
    let img = images()?;
    let o = run_out(
        env,
        &[
            &img.oci,
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 42",
        ],
    )?;
    expect(
        o.stdout == "to-out\n",
        "stdout is exactly the process's stdout",
        &o,
    )?;
    expect(
        o.stderr == "to-err\n",
        "stderr is exactly the process's stderr",
        &o,
    )?;
    expect(o.code == Some(42), "exit status 42", &o)
}

fn run_killed_by_signal_is_128_plus_n(env: &Env) -> Result<(), String> {
    let img = images()?;
    let o = run_out(env, &[&img.oci, "sh", "-c", "kill -9 $$"])?;
    expect(o.code == Some(137), "SIGKILL maps to 137", &o)
}

fn run_default_cmd_env_and_workdir_are_the_images(env: &Env) -> Result<(), String> {
    let img = images()?;
    let o = run_out(env, &[&img.registry])?;
    expect(
        o.stdout == "default-cmd hi\n",
        "the image's Cmd ran with its Env",
        &o,
    )?;
    let o = run_out(env, &[&img.registry, "pwd"])?;
    expect(o.stdout == "/data\n", "the image's WorkingDir", &o)
}

fn run_overrides_behave_as_in_docker(env: &Env) -> Result<(), String> {
    let img = images()?;
    let o = run_out(
        env,
        &[
            "-e",
            "GREETING=yo",
            "-w",
            "/tmp/wd",
            "-u",
            "1000:1000",
            &img.archive,
            "sh",
            "-c",
            "echo $GREETING $(pwd) $(id -u):$(id -g)",
        ],
    )?;
    expect(
        o.stdout == "yo /tmp/wd 1000:1000\n",
        "-e, -w and -u apply",
        &o,
    )?;
    let o = run_out(env, &["--entrypoint", "echo", &img.oci, "a", "b"])?;
    expect(
        o.stdout == "a b\n",
        "--entrypoint replaces the entrypoint, args the Cmd",
        &o,
    )?;
    let o = run_out(env, &[&img.oci, "no-such-command"])?;
    expect(o.code == Some(127), "a missing command is 127", &o)
}

fn run_layers_apply_whiteouts_and_keep_metadata(env: &Env) -> Result<(), String> {
    let img = images()?;
    let script = "cd /data; \
        [ -e deleted ] && echo deleted-present; [ -e gone-dir ] && echo dir-present; \
        cat replaced; stat -c '%a %h %F' suid hard link; readlink link; \
        stat -c '%t:%T %F' /dev/null; sha256sum big; ls opq; stat -c '%u:%g %a' owned";
    let o = run_out(env, &[&img.oci, "sh", "-c", script])?;
    let want = format!(
        "upper\n4755 1 regular file\n644 2 regular file\n777 1 symbolic link\n/data/target\n1:3 character special file\n{}  big\nc\n1234:5678 640\n",
        img.big_sha256
    );
    expect(
        o.stdout == want,
        &format!("layer contents as the tars say; want:\n{want}"),
        &o,
    )?;
    expect(o.code == Some(0), "exit 0", &o)
}

fn run_devices_rng_and_readonly_root(env: &Env) -> Result<(), String> {
    let img = images()?;
    let o = run_out(
        env,
        &[&img.oci, "sh", "-c",
          "head -c 32 /dev/hwrng | wc -c; dd if=/dev/zero of=/dev/vda bs=512 count=1 2>/dev/null && echo wrote-ro-disk; echo ok"],
    )?;
    expect(
        o.stdout == "32\nok\n",
        "virtio-rng gives bytes; the read-only image disk refuses writes",
        &o,
    )
}

fn run_vsock_carries_64_mib_intact(env: &Env) -> Result<(), String> {
    let img = images()?;
    let o = run_out(
        env,
        &[&img.oci, "sh", "-c", "yes supermachine | head -c 67108864"],
    )?;
    let want: Vec<u8> = b"supermachine\n"
        .iter()
        .copied()
        .cycle()
        .take(64 << 20)
        .collect();
    expect(
        o.stdout.len() == want.len() && sha256_hex(o.stdout.as_bytes()) == sha256_hex(&want),
        "64 MiB arrive over vsock with the same SHA-256",
        &Outcome {
            code: o.code,
            stdout: format!("<{} bytes>", o.stdout.len()),
            stderr: o.stderr.clone(),
        },
    )
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
    Scenario {
        name: "run_stdout_stderr_and_status_are_the_containers",
        run: run_stdout_stderr_and_status_are_the_containers,
    },
    Scenario {
        name: "run_killed_by_signal_is_128_plus_n",
        run: run_killed_by_signal_is_128_plus_n,
    },
    Scenario {
        name: "run_default_cmd_env_and_workdir_are_the_images",
        run: run_default_cmd_env_and_workdir_are_the_images,
    },
    Scenario {
        name: "run_overrides_behave_as_in_docker",
        run: run_overrides_behave_as_in_docker,
    },
    Scenario {
        name: "run_layers_apply_whiteouts_and_keep_metadata",
        run: run_layers_apply_whiteouts_and_keep_metadata,
    },
    Scenario {
        name: "run_devices_rng_and_readonly_root",
        run: run_devices_rng_and_readonly_root,
    },
    Scenario {
        name: "run_vsock_carries_64_mib_intact",
        run: run_vsock_carries_64_mib_intact,
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

/// A self-contained supermachine cache for the scenarios: the provisioned kernel
/// and its initramfs (built on the host: L1 has no network and building needs the
/// module tree), and the test images pulled into its store.
struct Payload {
    dir: PathBuf,
    assets: runner::kernel::KernelAssets,
    images: Images,
}

impl Drop for Payload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn prepare_payload() -> Result<Payload, String> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_supermachine"));
    let assets = runner::kernel::provision()
        .map_err(|e| format!("cannot provision the kernel on the host: {e}"))?;
    let initramfs = runner::initramfs::ensure(&assets)
        .map_err(|e| format!("cannot build the initramfs on the host: {e}"))?;
    let dir = std::env::temp_dir().join(format!("sm-guest-payload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = dir.join("cache/supermachine");
    let kdir = store.join("kernels").join(&assets.version);
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
    };
    std::fs::create_dir_all(&kdir).map_err(|e| e.to_string())?;
    let name = |p: &Path| p.file_name().map(PathBuf::from).unwrap_or_default();
    copy(&assets.kernel, &kdir.join(name(&assets.kernel)))?;
    if let Some(c) = &assets.config {
        copy(c, &kdir.join(name(c)))?;
    }
    std::fs::write(store.join("kernels/default"), &assets.version).map_err(|e| e.to_string())?;
    copy(&initramfs, &store.join(name(&initramfs)))?;
    copy(&bin, &dir.join("supermachine"))?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    copy(&me, &dir.join("linux_guest"))?;
    let images = prepare_images(&bin, &dir.join("cache"));
    // `run` finds images by their store records and boots their cached root
    // filesystems: the blobs stay on the host, and so do the debug symbols (the
    // rig's initramfs is unpacked by an emulated CPU: every megabyte counts).
    let _ = std::fs::remove_dir_all(store.join("store/blobs"));
    for b in ["supermachine", "linux_guest"] {
        let _ = Command::new("strip")
            .arg("--strip-debug")
            .arg(dir.join(b))
            .status();
    }
    Ok(Payload {
        dir,
        assets,
        images,
    })
}

/// Runs this binary in the rig with the payload as /payload.
fn run_in_rig(p: &Payload, filter: Option<&str>) -> bool {
    let Some(modules) = p.assets.modules_dir.clone() else {
        println!(
            "linux_guest: the provisioned kernel has no modules dir (kvm-amd is needed for L1)"
        );
        return false;
    };
    let mut cmd = Command::new(workspace_root().join("tests/nested/rig"));
    cmd.env("RIG_KERNEL", &p.assets.kernel)
        .env("RIG_MODULES", modules);
    cmd.env(
        "RIG_ENV",
        format!(
            "{IN_RIG}=1 XDG_CACHE_HOME=/payload/cache SM_TEST_BIN=/payload/supermachine SM_TEST_FILTER={} {}",
            filter.unwrap_or(""),
            p.images.env_line()
        ),
    );
    cmd.arg(&p.dir).arg("--").arg("./linux_guest");
    cmd.status().map(|s| s.success()).unwrap_or(false)
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
    } else if Path::new("/dev/kvm").exists() && !kvm_is_pvm() || which("qemu-system-x86_64") {
        let payload = match prepare_payload() {
            Ok(p) => p,
            Err(e) => {
                println!("linux_guest: {e}");
                println!("linux_guest: 0 passed, 1 failed");
                std::process::exit(1);
            }
        };
        if Path::new("/dev/kvm").exists() && !kvm_is_pvm() {
            // Hardware virtualization: run directly against the same payload cache.
            // Set before any other thread exists; the children inherit it.
            std::env::set_var("XDG_CACHE_HOME", payload.dir.join("cache"));
            for kv in payload.images.env_line().split_whitespace() {
                if let Some((k, v)) = kv.split_once('=') {
                    std::env::set_var(k, v);
                }
            }
            run_scenarios(
                &Env {
                    bin: payload.dir.join("supermachine"),
                },
                filter,
            )
        } else {
            run_in_rig(&payload, filter)
        }
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
