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

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../../image/tests/support/mod.rs"]
mod support;

const IN_RIG: &str = "SM_TEST_IN_RIG";

struct Scenario {
    name: &'static str,
    run: fn(&Env) -> Result<(), String>,
}

struct Env {
    /// The product.
    bin: PathBuf,
    /// The payload directory (disk images prepared on the host).
    payload: PathBuf,
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
    hex(&sha2::Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Debian programs in the test image's tools layer, at their Debian paths.
const GUEST_TOOLS: &[&str] = &["/usr/sbin/mke2fs", "/usr/bin/socat"];
/// Debian programs the scenarios and the product run on the VM's host (L1 in the
/// rig), carried in the payload's `bin/` (the rig adds their libraries): debugfs
/// for the disk scenarios, passt for `run`'s default network.
const HOST_TOOLS: &[&str] = &["/usr/sbin/debugfs", "/usr/bin/passt"];

/// A two-layer image built with umoci from Debian's busybox-static: the lower
/// layer has busybox with every applet, a setuid file, a symlink, a hardlink, a
/// char device, a 32 MiB file, and files the upper layer deletes or replaces;
/// then an opaque directory and foreign ownership, and the [`GUEST_TOOLS`].
fn build_test_layout() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    support::cached("sm-run-image-v5", |dir| {
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
        // Debian's dynamically linked tools, with their libraries: mke2fs for
        // the disk scenarios, socat (VSOCK-LISTEN/VSOCK-CONNECT) for vsock.
        support::add_layer(&dir.join("b4"), &image, |root| {
            for tool in GUEST_TOOLS {
                support::copy_with_libraries(root, Path::new(tool));
            }
            std::fs::create_dir_all(root.join("etc")).expect("etc");
            let _ = std::fs::copy("/etc/mke2fs.conf", root.join("etc/mke2fs.conf"));
        });
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
            // For `run -P` (the published-ports scenario).
            "--config.exposedports=80/tcp",
        ]));
        support::run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout));
    })
    .join("layout")
}

/// Builds the test image, serves it from a real registry and a docker-archive, and
/// pulls all three into the store under `cache` with `bin` (the product itself).
fn prepare_images(bin: &Path, cache: &Path) -> Images {
    let layout = build_test_layout();
    let archive = support::docker_archive("sm-run-archive-v5", &layout, "t", "smtest:1");
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
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// A `supermachine` process whose stdout and stderr are drained while it runs
/// (a full pipe would stall the guest's output through vsock flow control).
struct Running {
    child: std::process::Child,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
    /// Stderr so far, while it runs.
    err_so_far: Arc<Mutex<Vec<u8>>>,
}

impl Running {
    /// Waits up to `timeout`, then kills it: a stuck VM fails the scenario
    /// instead of hanging the suite.
    fn finish(mut self, timeout: Duration) -> Result<Outcome, String> {
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            match self.child.try_wait().map_err(|e| e.to_string())? {
                Some(st) => break st,
                None if start.elapsed() > timeout => {
                    timed_out = true;
                    // Where it is stuck, for the report: each thread's name and
                    // kernel wait channel, and its children.
                    let pid = self.child.id();
                    let mut where_ = String::new();
                    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                        for t in tasks.flatten() {
                            let read = |f: &str| {
                                std::fs::read_to_string(t.path().join(f))
                                    .unwrap_or_default()
                                    .trim()
                                    .to_string()
                            };
                            where_.push_str(&format!(
                                "  thread {} wchan {}\n",
                                read("comm"),
                                read("wchan")
                            ));
                        }
                    }
                    if let Ok(c) =
                        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    {
                        where_.push_str(&format!("  children: {c}\n"));
                    }
                    println!("supermachine (pid {pid}) still running after {timeout:?}:\n{where_}");
                    let _ = self.child.kill();
                    break self.child.wait().map_err(|e| e.to_string())?;
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let stdout = String::from_utf8_lossy(&self.out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&self.err.join().unwrap_or_default()).into_owned();
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

impl Env {
    /// Starts the product with `args`.
    fn spawn(&self, args: &[&str]) -> Result<Running, String> {
        self.spawn_env(args, &[])
    }

    /// Starts the product with `args` and `envs` added to its environment.
    fn spawn_env(&self, args: &[&str], envs: &[(&str, &str)]) -> Result<Running, String> {
        let mut child = Command::new(&self.bin)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        let drain = |r: Option<Box<dyn Read + Send>>, so_far: Arc<Mutex<Vec<u8>>>, live: bool| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let mut buf = [0u8; 4096];
                if let Some(mut r) = r {
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        v.extend_from_slice(&buf[..n]);
                        if let (true, Ok(mut s)) = (live, so_far.lock()) {
                            s.extend_from_slice(&buf[..n]);
                        }
                    }
                }
                v
            })
        };
        let err_so_far = Arc::new(Mutex::new(Vec::new()));
        let out = drain(
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
            Arc::new(Mutex::new(Vec::new())),
            false,
        );
        let err = drain(
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
            err_so_far.clone(),
            true,
        );
        Ok(Running {
            child,
            out,
            err,
            err_so_far,
        })
    }

    /// Runs the product with `args` to the end (killed after `timeout`).
    fn supermachine(&self, args: &[&str], timeout: Duration) -> Result<Outcome, String> {
        self.spawn(args)?.finish(timeout)
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

/// Processes whose command name starts with `comm` (Debian runs `passt.avx2` where it
/// can), or whose command line holds `arg`.
fn processes_matching(comm: &str, arg: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let c = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (c.trim().starts_with(comm) || (!arg.is_empty() && cmd.contains(arg)))
                .then(|| format!("{} {}", c.trim(), cmd))
        })
        .collect()
}

fn run_sigterm_mid_process_stops_the_vm_and_leaves_nothing(env: &Env) -> Result<(), String> {
    let img = images()?;
    let uds = scratch("term.sock");
    let started_sock = PathBuf::from(format!("{}_7000", uds.display()));
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(&started_sock);
    let listener = UnixListener::bind(&started_sock).map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let uds_arg = uds.to_str().unwrap_or_default().to_string();
    // The default network (passt), so the check covers passt too. The process
    // says it started over vsock, then sleeps far longer than the test waits.
    let mut running = env.spawn(&[
        "run",
        "--vsock-uds",
        &uds_arg,
        &img.oci,
        "sh",
        "-c",
        "echo up | /usr/bin/socat -u - VSOCK-CONNECT:2:7000; sleep 600",
    ])?;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut up = false;
    while Instant::now() < deadline && running.child.try_wait().ok().flatten().is_none() {
        if listener.accept().is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !up {
        let o = running.finish(Duration::from_secs(1))?;
        return expect(
            false,
            "the process started (it connected to host port 7000)",
            &o,
        );
    }
    let pid = running.child.id();
    let had_passt = !processes_matching("passt", "").is_empty();
    let sent = Instant::now();
    let st = Command::new("busybox")
        .args(["kill", "-TERM", &pid.to_string()])
        .status()
        .map_err(|e| format!("busybox kill: {e}"))?;
    if !st.success() {
        return Err(format!("busybox kill -TERM {pid}: {st}"));
    }
    let o = running.finish(Duration::from_secs(60))?;
    let took = sent.elapsed();
    let _ = std::fs::remove_file(&started_sock);
    // The VMM's teardown helper and passt go within moments of its exit.
    std::thread::sleep(Duration::from_secs(2));
    let left = processes_matching("passt", &uds_arg);
    expect(
        o.code == Some(143) && had_passt && left.is_empty() && !uds.exists(),
        &format!(
            "SIGTERM mid-process: exit 143 (in {took:?}), passt was running ({had_passt}) and is gone, \
             no process left ({left:?}), the vsock socket removed ({})",
            !uds.exists()
        ),
        &o,
    )
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

/// A scratch file for one scenario on the VM's host (in the rig, L1's tmpfs).
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sm-guest-{}-{name}", std::process::id()))
}

/// A Debian tool on the VM's host: its own path where installed, else the copy
/// in the payload's `bin/` (on PATH in the rig).
fn host_tool(path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    if p.is_file() {
        return p;
    }
    PathBuf::from(p.file_name().unwrap_or_default())
}

/// `debugfs -R REQUEST image` (read-only: debugfs opens without -w).
fn debugfs(request: &str, image: &Path) -> Result<String, String> {
    let o = Command::new(host_tool("/usr/sbin/debugfs"))
        .args(["-R", request])
        .arg(image)
        .output()
        .map_err(|e| format!("running debugfs: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "debugfs -R {request:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// For scenarios that need no network: they do not depend on passt in L1.
const NO_NET: [&str; 2] = ["--network", "none"];

const EXT4_TEXT: &str = "written by the guest on its own ext4";

fn run_disk_ext4_written_in_guest_reads_back_on_host(env: &Env) -> Result<(), String> {
    let img = images()?;
    let disk = scratch("blank.img");
    let f = std::fs::File::create(&disk).map_err(|e| e.to_string())?;
    f.set_len(64 << 20).map_err(|e| e.to_string())?;
    drop(f);
    let script = format!(
        "mkdir -p /mnt && /usr/sbin/mke2fs -q -t ext4 /dev/vdb && mount -t ext4 /dev/vdb /mnt \
         && echo '{EXT4_TEXT}' > /mnt/hello.txt && umount /mnt && sync"
    );
    let spec = disk.to_str().unwrap_or_default().to_string();
    let o = run_out(
        env,
        &[
            NO_NET[0], NO_NET[1], "--disk", &spec, &img.oci, "sh", "-c", &script,
        ],
    );
    let cat = debugfs("cat /hello.txt", &disk);
    let stats = debugfs("stats", &disk);
    let _ = std::fs::remove_file(&disk);
    let o = o?;
    expect(
        o.code == Some(0),
        "mke2fs, mount, write, umount succeed in the guest",
        &o,
    )?;
    let cat = cat?;
    expect(
        cat == format!("{EXT4_TEXT}\n"),
        &format!("debugfs on the host reads the guest's file back, got {cat:?}"),
        &o,
    )?;
    let stats = stats?;
    let features = stats
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default();
    expect(
        features.split_whitespace().any(|f| f == "extent"),
        &format!("the filesystem is ext4 (extents), features: {features:?}"),
        &o,
    )
}

fn run_readonly_extra_disk_rejects_writes(env: &Env) -> Result<(), String> {
    let img = images()?;
    // A copy of the prepared ext4 image, writable as a file: only the device's
    // read-only flag may protect it.
    let disk = scratch("ro.img");
    std::fs::copy(env.payload.join(RO_DISK), &disk).map_err(|e| e.to_string())?;
    let before = sha256_hex(&std::fs::read(&disk).map_err(|e| e.to_string())?);
    let script = "dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync 2>/tmp/dd.err; \
        echo dd=$?; [ -s /tmp/dd.err ] && echo dd-said-why; mkdir -p /mnt; \
        if mount -t ext4 /dev/vdb /mnt 2>/dev/null; then \
          echo mounted $(awk '$2==\"/mnt\" {split($4,o,\",\"); print o[1]}' /proc/mounts); \
          cat /mnt/ro.txt; touch /mnt/new 2>/dev/null && echo wrote-file; \
        else echo mount-refused; fi; echo end";
    let spec = format!("{},ro", disk.display());
    let o = run_out(
        env,
        &[
            NO_NET[0], NO_NET[1], "--disk", &spec, &img.oci, "sh", "-c", script,
        ],
    );
    let after = std::fs::read(&disk).map(|d| sha256_hex(&d));
    let _ = std::fs::remove_file(&disk);
    let o = o?;
    expect(
        o.stdout.starts_with("dd=") && !o.stdout.starts_with("dd=0\n"),
        "dd to the read-only disk fails",
        &o,
    )?;
    expect(
        o.stdout.contains("\ndd-said-why\n"),
        "dd says why it failed",
        &o,
    )?;
    let rest = o
        .stdout
        .split_once("dd-said-why\n")
        .map(|x| x.1)
        .unwrap_or("");
    expect(
        rest == format!("mounted ro\n{RO_TEXT}\nend\n") || rest == "mount-refused\nend\n",
        "a read-write mount is refused or falls back to read-only, and no file is written",
        &o,
    )?;
    expect(o.code == Some(0), "exit 0", &o)?;
    let after = after.map_err(|e| e.to_string())?;
    expect(
        after == before,
        "the disk file's bytes are unchanged on the host",
        &o,
    )
}

/// Concurrent vsock connections each way in one VM.
const VSOCK_CONNECTIONS: usize = 64;
/// Size of each guest-to-host payload (`guest-N\n` repeated).
const GUEST_PAYLOAD: usize = 8192;
/// How long the guest's clients may take to connect.
const GO_TIMEOUT: Duration = Duration::from_secs(180);
/// How long any one socket operation may block before the scenario fails.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(300);

/// The payload of host-to-guest connection `i`: distinct content and length.
fn host_payload(i: usize) -> Vec<u8> {
    format!("host-{i}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096 + 97 * i)
        .collect()
}

/// Connects to guest port `port` through the VMM's UNIX socket (`CONNECT`,
/// `OK ...`), retrying while the socket or the guest's listener is not there yet
/// (until `deadline`, or at once when the VM has ended).
fn vsock_connect(
    uds: &Path,
    port: u32,
    deadline: Instant,
    vm_ended: &AtomicBool,
) -> Result<UnixStream, String> {
    let mut last = String::from("never tried");
    while Instant::now() < deadline && !vm_ended.load(Ordering::SeqCst) {
        match UnixStream::connect(uds) {
            Ok(mut s) => {
                s.set_read_timeout(Some(SOCKET_TIMEOUT))
                    .map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(SOCKET_TIMEOUT))
                    .map_err(|e| e.to_string())?;
                if let Err(e) = s.write_all(format!("CONNECT {port}\n").as_bytes()) {
                    last = format!("writing CONNECT: {e}");
                } else {
                    // Byte by byte: nothing after the line may be consumed.
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while line.len() < 64 {
                        match s.read(&mut b) {
                            Ok(1) if b[0] == b'\n' => break,
                            Ok(1) => line.push(b[0]),
                            _ => break,
                        }
                    }
                    if line.starts_with(b"OK ") {
                        return Ok(s);
                    }
                    last = format!("handshake answer {:?}", String::from_utf8_lossy(&line));
                }
            }
            Err(e) => last = format!("connect {}: {e}", uds.display()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no connection to guest port {port}: {last}"))
}

/// One host-to-guest echo through `CONNECT 5000`, on a connection that is open
/// while all the others are (`opened` and `echoed` are the rendezvous).
fn host_echo_client(
    uds: &Path,
    i: usize,
    deadline: Instant,
    opened: &std::sync::Barrier,
    echoed: &std::sync::Barrier,
    vm_ended: &AtomicBool,
) -> Result<(), String> {
    let conn = vsock_connect(uds, 5000, deadline, vm_ended);
    // Every thread reaches both barriers, failed or not, so none waits forever.
    opened.wait();
    let result = conn.and_then(|mut s| {
        let want = host_payload(i);
        // The writer runs beside the reader: the echo comes back while we send.
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let sent = want.clone();
        let writer = std::thread::spawn(move || w.write_all(&sent));
        let mut got = vec![0u8; want.len()];
        let read = s.read_exact(&mut got);
        let wrote = writer.join().map_err(|_| "writer panicked".to_string())?;
        wrote.map_err(|e| format!("connection {i}: write: {e}"))?;
        read.map_err(|e| format!("connection {i}: read back: {e}"))?;
        if got != want {
            return Err(format!(
                "connection {i}: the echo differs from what was sent"
            ));
        }
        Ok(s)
    });
    echoed.wait();
    result.map(drop)
}

/// What the host side of the guest-to-host connections saw.
#[derive(Default)]
struct GuestEchoes {
    /// Each connection's `N` (from `guest-N`), or what went wrong with it.
    seen: Mutex<Vec<Result<usize, String>>>,
    /// Connections accepted so far.
    accepted: AtomicUsize,
    /// Connections open now, and the most ever open at once.
    open: AtomicUsize,
    max_open: AtomicUsize,
}

/// The host side of guest-to-host connections on `<uds>_6000`: reads one
/// `guest-N\n` payload, checks it, echoes it, closes; records each N seen.
fn serve_guest_echoes(
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    echoes: Arc<GuestEchoes>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut handlers = Vec::new();
        let _ = listener.set_nonblocking(true);
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let echoes = echoes.clone();
                    echoes.accepted.fetch_add(1, Ordering::SeqCst);
                    let now = echoes.open.fetch_add(1, Ordering::SeqCst) + 1;
                    echoes.max_open.fetch_max(now, Ordering::SeqCst);
                    handlers.push(std::thread::spawn(move || {
                        let r = (|| {
                            s.set_nonblocking(false).map_err(|e| e.to_string())?;
                            s.set_read_timeout(Some(SOCKET_TIMEOUT))
                                .map_err(|e| e.to_string())?;
                            s.set_write_timeout(Some(SOCKET_TIMEOUT))
                                .map_err(|e| e.to_string())?;
                            let mut buf = vec![0u8; GUEST_PAYLOAD];
                            s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
                            let first = buf.split(|&b| b == b'\n').next().unwrap_or_default();
                            let n: usize = std::str::from_utf8(first)
                                .ok()
                                .and_then(|l| l.strip_prefix("guest-"))
                                .and_then(|n| n.parse().ok())
                                .ok_or_else(|| "payload is not guest-N".to_string())?;
                            let want: Vec<u8> = format!("guest-{n}\n")
                                .into_bytes()
                                .into_iter()
                                .cycle()
                                .take(GUEST_PAYLOAD)
                                .collect();
                            if buf != want {
                                return Err(format!("payload of guest-{n} is corrupt"));
                            }
                            s.write_all(&buf).map_err(|e| format!("echo: {e}"))?;
                            Ok(n)
                        })();
                        drop(s);
                        echoes.open.fetch_sub(1, Ordering::SeqCst);
                        echoes
                            .seen
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(r);
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => {
                    echoes
                        .seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Err(format!("accept: {e}")));
                    break;
                }
            }
        }
        for h in handlers {
            let _ = h.join();
        }
    })
}

fn run_vsock_echo_both_directions_many_connections(env: &Env) -> Result<(), String> {
    let img = images()?;
    let uds = scratch("v.sock");
    let guest_port_sock = PathBuf::from(format!("{}_6000", uds.display()));
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(&guest_port_sock);
    let listener = UnixListener::bind(&guest_port_sock).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(GuestEchoes::default());
    let server = serve_guest_echoes(listener, stop.clone(), echoes.clone());

    // The guest: an echo listener on 5000 for the host's clients; when the
    // host connects to 5003 (its clients are done), as many clients of host port 6000
    // that connect at once and send their payload only when the host, having
    // seen all of them open, connects to 5002; each checks its echo; then the guest
    // waits until the host connects to 5001 to say it is done. The guest's
    // connections are made while no data flows because its kernel gives a vsock
    // connect 2 s (SO_VM_SOCKETS_CONNECT_TIMEOUT), which handshakes queued
    // behind a flood of echo data exceeded under nested TCG (6 of 64 once).
    // Each client waits for "go" in the open of its own FIFO, which the script
    // opens for writing (no fork) once the host says go: a `sleep 1` poll per
    // client cost the TCG guest 64 forks a second and starved the connects (the
    // scenario took 300-600 s, and twice L1 went silent in it; now about 60 s).
    let script = format!(
        "S=/usr/bin/socat; \
         $S VSOCK-LISTEN:5000,fork,reuseaddr,backlog=128 EXEC:cat & L=$!; \
         $S -u VSOCK-LISTEN:5003 STDOUT > /dev/null; \
         pids=; i=0; while [ $i -lt {VSOCK_CONNECTIONS} ]; do \
           yes guest-$i | head -c {GUEST_PAYLOAD} > /tmp/p$i; mkfifo /tmp/g$i; \
           ( ( read -r x < /tmp/g$i; cat /tmp/p$i ) \
             | $S -t 60 -T 300 - VSOCK-CONNECT:2:6000 > /tmp/r$i 2>/tmp/e$i \
             && cmp -s /tmp/p$i /tmp/r$i && : > /tmp/ok$i ) & pids=\"$pids $!\"; i=$((i+1)); \
         done; \
         $S -u VSOCK-LISTEN:5002 STDOUT > /dev/null; \
         i=0; while [ $i -lt {VSOCK_CONNECTIONS} ]; do : > /tmp/g$i; i=$((i+1)); done; \
         wait $pids; \
         echo \"guest-to-host: $(ls /tmp | grep -c '^ok') ok\"; \
         for f in /tmp/e*; do [ -s $f ] && head -c 300 $f; done; \
         $S -u VSOCK-LISTEN:5001 STDOUT; kill $L"
    );
    let uds_arg = uds.to_str().unwrap_or_default().to_string();
    let running = env.spawn(&[
        "run",
        NO_NET[0],
        NO_NET[1],
        "--vsock-uds",
        &uds_arg,
        &img.oci,
        "sh",
        "-c",
        &script,
    ])?;
    // The VM is waited for beside the clients, so that they stop retrying as
    // soon as it has ended (a VM that dies early fails fast).
    let vm_ended = Arc::new(AtomicBool::new(false));
    let waiter = {
        let vm_ended = vm_ended.clone();
        std::thread::spawn(move || {
            let o = running.finish(BOOT_TIMEOUT);
            vm_ended.store(true, Ordering::SeqCst);
            o
        })
    };

    let started = Instant::now();
    // Phase times on stderr: where a slow run spends its time.
    let phase = |what: &str| eprintln!("  echo: {what} at {:.1}s", started.elapsed().as_secs_f64());
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let opened = Arc::new(std::sync::Barrier::new(VSOCK_CONNECTIONS));
    let echoed = Arc::new(std::sync::Barrier::new(VSOCK_CONNECTIONS));
    let clients: Vec<_> = (0..VSOCK_CONNECTIONS)
        .map(|i| {
            let (uds, opened, echoed, ended) = (
                uds.clone(),
                opened.clone(),
                echoed.clone(),
                vm_ended.clone(),
            );
            std::thread::spawn(move || {
                host_echo_client(&uds, i, deadline, &opened, &echoed, &ended)
            })
        })
        .collect();
    let host_errors: Vec<String> = clients
        .into_iter()
        .filter_map(|c| match c.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("client thread panicked".into()),
        })
        .collect();
    phase(&format!("host clients done, {} failed", host_errors.len()));
    // The host's clients are done: the guest starts its own (even after a
    // failure, so that the VM goes on to its end).
    let phase2 = vsock_connect(&uds, 5003, deadline, &vm_ended)
        .and_then(|mut s| s.write_all(b"next\n").map_err(|e| e.to_string()));
    // "go" to the guest's clients once all of them are connected (or, so that
    // the guest never waits forever, once the time is up or the VM is gone).
    let go_deadline = Instant::now() + GO_TIMEOUT;
    while echoes.accepted.load(Ordering::SeqCst) < VSOCK_CONNECTIONS
        && Instant::now() < go_deadline
        && !vm_ended.load(Ordering::SeqCst)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    phase(&format!(
        "{} guest connections accepted",
        echoes.accepted.load(Ordering::SeqCst)
    ));
    let go = vsock_connect(&uds, 5002, deadline, &vm_ended)
        .and_then(|mut s| s.write_all(b"go\n").map_err(|e| e.to_string()));
    // Tell the guest to finish (even after a failure, so the VM ends).
    let done = vsock_connect(&uds, 5001, deadline, &vm_ended)
        .and_then(|mut s| s.write_all(b"done\n").map_err(|e| e.to_string()));
    phase("done sent");
    let o = waiter
        .join()
        .unwrap_or_else(|_| Err("the VM waiter panicked".into()));
    phase("the VM ended");
    stop.store(true, Ordering::SeqCst);
    let _ = server.join();
    let _ = std::fs::remove_file(&guest_port_sock);
    let o = o?;
    expect(
        host_errors.is_empty(),
        &format!(
            "{VSOCK_CONNECTIONS} concurrent host-to-guest echoes; {} failed: {:?}",
            host_errors.len(),
            host_errors.iter().take(5).collect::<Vec<_>>()
        ),
        &o,
    )?;
    expect(
        done.is_ok(),
        &format!("the done signal reached the guest: {done:?}"),
        &o,
    )?;
    expect(
        phase2.is_ok() && go.is_ok(),
        &format!("the guest got the host's signals: {phase2:?} {go:?}"),
        &o,
    )?;
    let max_open = echoes.max_open.load(Ordering::SeqCst);
    expect(
        max_open == VSOCK_CONNECTIONS,
        &format!(
            "all {VSOCK_CONNECTIONS} guest connections were open at once (at most {max_open} were)"
        ),
        &o,
    )?;
    let seen = std::mem::take(&mut *echoes.seen.lock().unwrap_or_else(|e| e.into_inner()));
    let mut ns: Vec<usize> = seen
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    ns.sort_unstable();
    let errors: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    expect(
        ns == (0..VSOCK_CONNECTIONS).collect::<Vec<_>>() && errors.is_empty(),
        &format!(
            "the host saw each of the {VSOCK_CONNECTIONS} guest connections once: {} ok, errors {:?}",
            ns.len(),
            errors.iter().take(5).collect::<Vec<_>>()
        ),
        &o,
    )?;
    expect(
        o.stdout == format!("guest-to-host: {VSOCK_CONNECTIONS} ok\ndone\n"),
        "every guest client got its own bytes back, then the done line arrived",
        &o,
    )?;
    expect(o.code == Some(0), "exit 0", &o)
}

/// The `sm.net=` value on the guest's kernel command line, its eth0 address,
/// its default route, resolv.conf, the localhost lines of /etc/hosts and the
/// interfaces, one item per line.
const NET_REPORT: &str = "tr ' ' '\\n' < /proc/cmdline | grep '^sm.net=' || echo no-sm-net; \
    ip addr show dev eth0 2>/dev/null | grep -o 'inet [0-9./]*' || echo no-inet; \
    ip route | grep '^default' || echo no-default-route; \
    grep '^nameserver' /etc/resolv.conf 2>/dev/null || echo no-resolv-conf; \
    grep -c 'localhost' /etc/hosts; echo $(ls /sys/class/net)";

fn run_network_default_is_configured_by_guest_init(env: &Env) -> Result<(), String> {
    let img = images()?;
    let o = run_out(env, &[&img.oci, "sh", "-c", NET_REPORT])?;
    let lines: Vec<&str> = o.stdout.lines().collect();
    let Some(value) = lines.first().and_then(|l| l.strip_prefix("sm.net=")) else {
        return expect(false, "the runner put sm.net= on the command line", &o);
    };
    let mut parts = value.split(',');
    let (cidr, gw, dns) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let mut want = vec![format!("inet {cidr}")];
    want.push(if gw.is_empty() {
        "no-default-route".to_string()
    } else {
        format!("default via {gw} dev eth0")
    });
    want.push(if dns.is_empty() {
        "no-resolv-conf".to_string()
    } else {
        format!("nameserver {dns}")
    });
    want.push("2".into());
    want.push("eth0 lo".into());
    let got: Vec<String> = lines[1..].iter().map(|l| l.trim().to_string()).collect();
    expect(
        got == want,
        &format!("eth0, the route, resolv.conf and hosts follow {value:?}; want {want:?}"),
        &o,
    )?;
    expect(o.code == Some(0), "exit 0", &o)
}

fn run_network_none_has_only_loopback(env: &Env) -> Result<(), String> {
    let img = images()?;
    let o = run_out(
        env,
        &[NO_NET[0], NO_NET[1], &img.oci, "sh", "-c", NET_REPORT],
    )?;
    expect(
        o.stdout == "no-sm-net\nno-inet\nno-default-route\nno-resolv-conf\n2\nlo\n",
        "--network none: no sm.net=, no eth0, only lo (and /etc/hosts)",
        &o,
    )
}

/// The name the test's DNS server answers, with the gateway address: through
/// passt, the gateway is the host (L1), where the test's HTTP server listens.
const WEB_NAME: &str = "web.supermachine.test";

/// A DNS answer for `query`: `WEB_NAME` A -> `addr`; anything else gets no
/// answer records (NOERROR, empty). `None` for something that is not a query.
fn dns_answer(query: &[u8], addr: std::net::Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    // The question: labels up to a zero byte, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    while *query.get(i)? != 0 {
        let n = usize::from(query[i]);
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + n)?).to_lowercase());
        i += 1 + n;
    }
    let qtype = u16::from_be_bytes([*query.get(i + 1)?, *query.get(i + 2)?]);
    let question = query.get(12..i + 5)?;
    let hit = labels.join(".") == WEB_NAME && qtype == 1;
    let mut r = Vec::new();
    r.extend_from_slice(&query[..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(hit), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if hit {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&addr.octets());
    }
    Some(r)
}

/// Serves DNS on `bind` until the process ends; counts queries for `WEB_NAME`.
fn start_dns(
    bind: &str,
    answer: std::net::Ipv4Addr,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicUsize>, String> {
    let sock = std::net::UdpSocket::bind(bind).map_err(|e| format!("bind DNS {bind}: {e}"))?;
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Some(r) = dns_answer(&buf[..n], answer) {
                if r[7] == 1 {
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let _ = sock.send_to(&r, from);
            }
        }
    });
    Ok(hits)
}

/// The head `start_http` sends before a payload of `len` bytes.
fn http_head(len: usize) -> String {
    format!(
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
    )
}

/// Serves HTTP/1.0 on `bind` (port 0: any) until the process ends: `/big` is
/// `big`, any other path `body`. Returns the port and a count of requests for
/// `/hello`.
fn start_http(
    bind: &str,
    body: &'static str,
    big: Vec<u8>,
) -> Result<(u16, std::sync::Arc<std::sync::atomic::AtomicUsize>), String> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind(bind).map_err(|e| format!("bind HTTP {bind}: {e}"))?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let payload: &[u8] = if req.starts_with(b"GET /big ") {
                &big
            } else {
                if req.starts_with(b"GET /hello ") {
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                body.as_bytes()
            };
            let _ = s.write_all(http_head(payload.len()).as_bytes());
            let _ = s.write_all(payload);
        }
    });
    Ok((port, hits))
}

/// The rig's L1 has no NIC: a dummy0 with 192.0.2.1/24, a default route via
/// 192.0.2.254 and resolv.conf naming 192.0.2.53 (tests/nested/rig). passt
/// copies those to the guest; the test's DNS server takes 192.0.2.53 itself, and
/// the guest's query reaches it through passt. The name resolves to the
/// gateway, which passt maps to the host (L1): the guest then fetches a page and
/// 4 MiB (SHA-256 checked) from the test's HTTP server on L1's loopback, and the
/// VM must still power off after the traffic (Debian 6.1's virtio-net could spin
/// in its shutdown path after TCP traffic until guest-init took eth0 down first).
fn run_network_passt_dns_and_http_from_l1(env: &Env) -> Result<(), String> {
    let img = images()?;
    if std::env::var_os(IN_RIG).is_none() {
        // Directly on a host, its real network and resolver are not the test's to
        // take over; the rig's L1 is a machine of its own.
        println!("  skipped: needs the rig's private L1 network (dummy0, 192.0.2.0/24)");
        return Ok(());
    }
    let gw: std::net::Ipv4Addr = [192, 0, 2, 254].into();
    // Adding the address may fail if an earlier scenario added it already.
    let _ = Command::new("busybox")
        .args(["ip", "addr", "add", "192.0.2.53/32", "dev", "dummy0"])
        .status();
    let dns_hits = start_dns("192.0.2.53:53", gw)?;
    let body = "hello from L1 through passt\n";
    let big = big_payload();
    let big_sha = sha256_hex(&big);
    let (port, http_hits) = start_http("127.0.0.1:0", body, big)?;
    // busybox's nslookup has its own resolver and reads /etc/resolv.conf; wget
    // gets the address it found (busybox-static's wget resolves through glibc's
    // NSS from a static binary, and its -T option crashed on this image).
    let script = format!(
        "cat /etc/resolv.conf; \
         addr=$(timeout 60 nslookup {WEB_NAME} | grep -A2 '^Name:' | grep -o '192\\.0\\.2\\.[0-9]*' | head -1); \
         echo \"$addr\"; wget -qO- http://$addr:{port}/hello && \
         wget -qO- http://$addr:{port}/big | sha256sum"
    );
    // By default the gateway address is only the gateway: L1's loopback
    // services are out of reach (as a docker container's host's are).
    let probe = format!(
        "if timeout 20 wget -qO- http://192.0.2.254:{port}/hello; then echo reached; \
         else echo unreachable; fi"
    );
    let o = run_out(env, &[&img.oci, "sh", "-c", &probe])?;
    expect(
        o.stdout == "unreachable\n" && o.code == Some(0),
        "with the default network the guest cannot reach a service on L1's 127.0.0.1",
        &o,
    )?;
    let o = run_out(
        env,
        &[
            "--network",
            "passt:host-loopback",
            &img.oci,
            "sh",
            "-c",
            &script,
        ],
    )?;
    let want = format!("nameserver 192.0.2.53\n192.0.2.254\n{body}{big_sha}  -\n");
    expect(
        o.stdout == want && o.code == Some(0),
        &format!("the guest resolves {WEB_NAME} through passt to L1's DNS server and fetches from L1's HTTP server; want:\n{want}"),
        &o,
    )?;
    let (d, h) = (
        dns_hits.load(std::sync::atomic::Ordering::SeqCst),
        http_hits.load(std::sync::atomic::Ordering::SeqCst),
    );
    expect(
        d >= 1 && h == 1,
        &format!("L1's DNS server answered {d} queries for the name, its HTTP server saw {h} requests for the page (want >= 1 and 1)"),
        &o,
    )
}

/// The bytes the test HTTP servers send for `/big`.
fn big_payload() -> Vec<u8> {
    (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect()
}

/// TAP interfaces are Linux's (the scenario runs in the rig's L1 only).
#[cfg(not(target_os = "linux"))]
fn make_persistent_tap(name: &str) -> Result<(), String> {
    Err(format!("cannot create TAP interface {name}: not Linux"))
}

/// Makes a persistent TAP interface `name` (TUNSETIFF, TUNSETPERSIST) that
/// outlives this process's file descriptor, as `ip tuntap add` does.
#[cfg(target_os = "linux")]
fn make_persistent_tap(name: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads the ifreq we own; the fd is open.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &req) } != 0 {
        return Err(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument; the fd is a TAP now.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } != 0 {
        return Err(format!(
            "TUNSETPERSIST {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// L1's TAP interface for the TAP scenarios, made (persistent, 10.0.0.1/24, up)
/// by the first of them that runs: the guests take 10.0.0.2.
fn l1_tap() -> Result<&'static str, String> {
    let tap = "smtap0";
    if Path::new("/sys/class/net").join(tap).exists() {
        return Ok(tap);
    }
    make_persistent_tap(tap)?;
    for args in [
        &["addr", "add", "10.0.0.1/24", "dev", tap][..],
        &["link", "set", tap, "up"][..],
    ] {
        let st = Command::new("busybox")
            .arg("ip")
            .args(args)
            .status()
            .map_err(|e| format!("busybox ip: {e}"))?;
        if !st.success() {
            return Err(format!("busybox ip {args:?}: {st}"));
        }
    }
    Ok(tap)
}

/// The TAP backend with L1's own TCP stack on the other side: the guest fetches
/// 4 MiB over HTTP with wget, and again with busybox nc and socat, which
/// half-close (shutdown(SHUT_WR)) after sending the request. Every byte of the
/// response must arrive once, and each connection must end. (Through Debian 12's
/// passt the half-closed cases receive the data many times over and never see a
/// FIN; through TAP they are exact, so that is passt's, not the device's.)
fn run_network_tap_to_l1_carries_half_closed_tcp_exactly(env: &Env) -> Result<(), String> {
    let img = images()?;
    if std::env::var_os(IN_RIG).is_none() {
        println!("  skipped: needs the rig's L1 to create a TAP interface of its own");
        return Ok(());
    }
    let tap = l1_tap()?;
    let big = big_payload();
    let big_sha = sha256_hex(&big);
    let mut response = http_head(big.len()).into_bytes();
    response.extend_from_slice(&big);
    let response_sha = sha256_hex(&response);
    let (port, _) = start_http("10.0.0.1:0", "page\n", big)?;
    let get = "printf 'GET /big HTTP/1.0\\r\\n\\r\\n'";
    let script = format!(
        "wget -qO- http://10.0.0.1:{port}/big | sha256sum; \
         {get} | timeout 60 nc 10.0.0.1 {port} | sha256sum; \
         {get} | timeout 60 /usr/bin/socat - TCP:10.0.0.1:{port} | sha256sum"
    );
    let net = format!("tap:{tap},ip=10.0.0.2/24,gw=10.0.0.1,dns=10.0.0.1");
    let o = run_out(env, &["--network", &net, &img.oci, "sh", "-c", &script])?;
    let want = format!("{big_sha}  -\n{response_sha}  -\n{response_sha}  -\n");
    expect(
        o.stdout == want && o.code == Some(0),
        &format!("wget, nc and socat each get the 4 MiB response exactly once through TAP; want:\n{want}"),
        &o,
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
        name: "run_sigterm_mid_process_stops_the_vm_and_leaves_nothing",
        run: run_sigterm_mid_process_stops_the_vm_and_leaves_nothing,
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
    Scenario {
        name: "run_disk_ext4_written_in_guest_reads_back_on_host",
        run: run_disk_ext4_written_in_guest_reads_back_on_host,
    },
    Scenario {
        name: "run_readonly_extra_disk_rejects_writes",
        run: run_readonly_extra_disk_rejects_writes,
    },
    Scenario {
        name: "run_vsock_echo_both_directions_many_connections",
        run: run_vsock_echo_both_directions_many_connections,
    },
    Scenario {
        name: "run_network_default_is_configured_by_guest_init",
        run: run_network_default_is_configured_by_guest_init,
    },
    Scenario {
        name: "run_network_passt_dns_and_http_from_l1",
        run: run_network_passt_dns_and_http_from_l1,
    },
    Scenario {
        name: "run_network_tap_to_l1_carries_half_closed_tcp_exactly",
        run: run_network_tap_to_l1_carries_half_closed_tcp_exactly,
    },
    Scenario {
        name: "run_network_none_has_only_loopback",
        run: run_network_none_has_only_loopback,
    },
    Scenario {
        name: "run_restores_its_ready_snapshot_for_any_command",
        run: run_restores_its_ready_snapshot_for_any_command,
    },
    Scenario {
        name: "run_captured_mid_process_carries_on_after_restore",
        run: run_captured_mid_process_carries_on_after_restore,
    },
    Scenario {
        name: "run_captured_on_listen_serves_after_restore",
        run: run_captured_on_listen_serves_after_restore,
    },
    Scenario {
        name: "run_published_ports_reach_the_guest_server",
        run: run_published_ports_reach_the_guest_server,
    },
    Scenario {
        name: "run_detached_vms_are_managed_like_containers",
        run: run_detached_vms_are_managed_like_containers,
    },
    Scenario {
        name: "run_egress_allow_list_is_enforced_by_the_vmm",
        run: run_egress_allow_list_is_enforced_by_the_vmm,
    },
    Scenario {
        name: "run_ten_detached_vms_at_once",
        run: run_ten_detached_vms_at_once,
    },
];

/// The counter of the mid-process scenario: a file written first, one line a
/// second, then the file read back and a status of its own.
const COUNTER: &str = "echo kept > /kept; i=0; while [ $i -lt 6 ]; do echo $i; i=$((i+1)); sleep 1; done; cat /kept; exit 3";

/// What the whole counter prints.
const COUNTER_OUT: &str = "0\n1\n2\n3\n4\n5\nkept\n";

/// A process captured at its guest's second heartbeat (one and two vCPUs)
/// carries on where it was when `run --restore` restores it: no restart, its
/// file still there, the rest of its output and its own status, from one
/// snapshot twice. Captured without --leave-running the first run ends at
/// the capture (exit 0); with it, it runs to its end as well.
fn run_captured_mid_process_carries_on_after_restore(env: &Env) -> Result<(), String> {
    let img = images()?;
    let missing = env.supermachine(&["run", "--restore", "/nonexistent.snap"], BOOT_TIMEOUT)?;
    expect(
        missing.code == Some(125) && missing.stderr.contains("/nonexistent.snap"),
        "--restore of a missing file: exit 125 naming it",
        &missing,
    )?;
    for (cpus, leave_running) in [("1", false), ("2", true)] {
        let snap = scratch(&format!("counter-{cpus}.snap"));
        let _ = std::fs::remove_file(&snap);
        let snap_arg = snap.to_string_lossy().into_owned();
        let mut args = vec![
            "run",
            NO_NET[0],
            NO_NET[1],
            "--cpus",
            cpus,
            "--snapshot-out",
            &snap_arg,
            "--snapshot-at-heartbeat",
            "2",
            // Between two lines of the counter: none is in flight.
            "--snapshot-quiesce-ms",
            "500",
        ];
        if leave_running {
            args.push("--leave-running");
        }
        args.extend([img.oci.as_str(), "sh", "-c", COUNTER]);
        let first = env.supermachine(&args, BOOT_TIMEOUT)?;
        let what = format!("--cpus {cpus}, leave_running {leave_running}");
        if leave_running {
            expect(
                first.code == Some(3) && first.stdout == COUNTER_OUT && snap.is_file(),
                &format!("{what}: captured, the first run carries on to its end"),
                &first,
            )?;
        } else {
            expect(
                first.code == Some(0)
                    && first.stderr.contains("VM captured to")
                    && first.stdout.starts_with("0\n")
                    && !first.stdout.contains("kept")
                    && snap.is_file(),
                &format!("{what}: the first run ends at its capture"),
                &first,
            )?;
        }
        let rounds = if leave_running { 1 } else { 2 };
        for round in 0..rounds {
            let t = Instant::now();
            let restored = env.supermachine(&["run", "--restore", &snap_arg], BOOT_TIMEOUT)?;
            let whole = format!("{}{}", first.stdout, restored.stdout);
            let carried_on = if leave_running {
                // The tail the counter printed after the capture, as the first run did.
                COUNTER_OUT.ends_with(&restored.stdout) && !restored.stdout.starts_with("0\n")
            } else {
                whole == COUNTER_OUT
            };
            expect(
                restored.code == Some(3)
                    && carried_on
                    && restored.stdout.ends_with("5\nkept\n")
                    && !restored.stdout.starts_with("0\n"),
                &format!(
                    "{what}, restore {round}: the counter carries on from the capture (its file kept, exit 3)"
                ),
                &restored,
            )?;
            eprintln!(
                "  mid-process ({what}): restore {round} ran the rest in {:.1}s",
                t.elapsed().as_secs_f64()
            );
        }
        let _ = std::fs::remove_file(&snap);
    }
    Ok(())
}

/// A server captured when it first listens (`--snapshot-on-listen`) answers
/// L1's HTTP requests through TAP right after `run --restore`, and SIGTERM
/// stops it as it stops any run.
fn run_captured_on_listen_serves_after_restore(env: &Env) -> Result<(), String> {
    let img = images()?;
    if std::env::var_os(IN_RIG).is_none() {
        println!("  skipped: needs the rig's L1 to create a TAP interface of its own");
        return Ok(());
    }
    let net = format!("tap:{},ip=10.0.0.2/24,gw=10.0.0.1,dns=10.0.0.1", l1_tap()?);
    let snap = scratch("listen.snap");
    let _ = std::fs::remove_file(&snap);
    let snap_arg = snap.to_string_lossy().into_owned();
    let script = "mkdir -p /tmp/w; echo served-after-restore > /tmp/w/index.html; \
                  exec httpd -f -p 8080 -h /tmp/w";
    let first = env.supermachine(
        &[
            "run",
            "--network",
            &net,
            "--snapshot-out",
            &snap_arg,
            "--snapshot-on-listen",
            "--snapshot-quiesce-ms",
            "100",
            &img.oci,
            "sh",
            "-c",
            script,
        ],
        BOOT_TIMEOUT,
    )?;
    expect(
        first.code == Some(0) && first.stderr.contains("VM captured to") && snap.is_file(),
        "captured once httpd listened",
        &first,
    )?;
    let spawned = Instant::now();
    let mut running = env.spawn(&["run", "--restore", &snap_arg])?;
    let addr: std::net::SocketAddr = ([10, 0, 0, 2], 8080).into();
    let mut answer = String::new();
    while spawned.elapsed() < Duration::from_secs(60)
        && running.child.try_wait().ok().flatten().is_none()
    {
        let got = (|| -> std::io::Result<String> {
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut r = String::new();
            c.read_to_string(&mut r)?;
            Ok(r)
        })();
        if let Ok(r) = got {
            answer = r;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let answered_in = spawned.elapsed();
    let pid = running.child.id().to_string();
    let _ = Command::new("busybox")
        .args(["kill", "-TERM", &pid])
        .status();
    let o = running.finish(Duration::from_secs(60))?;
    let _ = std::fs::remove_file(&snap);
    eprintln!(
        "  on-listen: the restored httpd answered L1 {:.2}s after `run --restore` started",
        answered_in.as_secs_f64()
    );
    expect(
        answer.starts_with("HTTP/1.") && answer.ends_with("served-after-restore\n"),
        &format!("the restored httpd answers L1 through TAP; got {answer:?}"),
        &o,
    )?;
    expect(
        o.code == Some(143),
        "SIGTERM stops the restored server's run: exit 143",
        &o,
    )
}

/// Prints how many interrupts the guest's ACPI GED driver (the VMGenID
/// event's) took, on every CPU together.
const GED_EVENTS: &str =
    "awk '/ACPI:Ged/ { n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; print n }' /proc/interrupts";

/// One HTTP/1.0 request over `s`: the request, a half-close, then the whole
/// response (the server's FIN ends it).
fn http_over(
    mut s: impl Read + Write,
    request: &[u8],
    half_close: impl FnOnce(&mut dyn Write),
) -> std::io::Result<Vec<u8>> {
    s.write_all(request)?;
    half_close(&mut s);
    let mut r = Vec::new();
    s.read_to_end(&mut r)?;
    Ok(r)
}

/// The body of an HTTP response, if it is a 200 (a CGI script's headers may
/// end in a bare "\n\n").
fn http_body(response: &[u8]) -> Option<&[u8]> {
    let crlf = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let lf = response
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, 2));
    let (head_end, sep) = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let status_line = response.split(|&b| b == b'\n').next()?;
    (response.starts_with(b"HTTP/1.") && status_line.windows(4).any(|w| w == b" 200"))
        .then(|| &response[head_end + sep..])
}

/// A GET through TCP `addr`, half-closed after the request.
fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let shut = s.try_clone()?;
    http_over(
        s,
        format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes(),
        move |_| {
            let _ = shut.shutdown(std::net::Shutdown::Write);
        },
    )
}

/// A GET through TCP `addr`, half-closed after the request, whose 200
/// response body is hashed as it arrives: (its length, its SHA-256).
fn http_get_hashed(addr: std::net::SocketAddr, path: &str) -> Result<(u64, String), String> {
    use sha2::Digest;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut h = sha2::Sha256::new();
    let mut len = 0u64;
    let mut in_body = false;
    loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("after {len} body bytes: {e}"))?;
        if n == 0 {
            break;
        }
        if in_body {
            h.update(&buf[..n]);
            len += n as u64;
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(body) = http_body(&head) {
            h.update(body);
            len += body.len() as u64;
            in_body = true;
        } else if head.len() > 64 << 10 {
            return Err(format!(
                "no 200 response head in {:?}",
                String::from_utf8_lossy(&head[..300])
            ));
        }
    }
    if !in_body {
        return Err(format!(
            "not a 200: {:?}",
            String::from_utf8_lossy(&head[..head.len().min(300)])
        ));
    }
    Ok((len, hex(&h.finalize())))
}

/// A GET through TCP `addr` that keeps its write side open until the response
/// ended.
fn http_get_open(addr: std::net::SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    http_over(s, format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes(), |_| {})
}

/// A free TCP port on L1's loopback.
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Processes of this program (`supermachine ...`) other than the test's own.
fn supermachines_left(bin: &Path) -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let exe = std::fs::read_link(p.path().join("exe")).ok()?;
            (exe == bin).then(|| {
                let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            })
        })
        .collect()
}

/// Ten detached VMs started at once: each reaches running and answers on its
/// own port with its own page, `ps` lists the ten, one `stop` and one `rm`
/// take them all, and no supervisor, VMM or registry entry is left.
fn run_ten_detached_vms_at_once(env: &Env) -> Result<(), String> {
    let img = images()?;
    // Ten distinct free ports: all held at once while they are picked (one
    // free_port() after another may hand out the same port twice).
    let held: Vec<std::net::TcpListener> = (0..10)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    drop(held);
    let t = Instant::now();
    let started: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let (bin, oci, port) = (env.bin.clone(), img.oci.clone(), *port);
            std::thread::spawn(move || {
                Command::new(bin)
                    .args([
                        "run",
                        "-d",
                        "--name",
                        &format!("fleet{i}"),
                        NO_NET[0],
                        NO_NET[1],
                        "-p",
                        &format!("{port}:80"),
                        &oci,
                        "sh",
                        "-c",
                        &format!(
                            "mkdir -p /w; echo vm{i} > /w/index.html; exec httpd -f -p 80 -h /w"
                        ),
                    ])
                    .stdin(Stdio::null())
                    .output()
            })
        })
        .collect();
    for (i, h) in started.into_iter().enumerate() {
        let o = h
            .join()
            .map_err(|_| "a run -d thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!(
                "run -d fleet{i}: {:?}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    eprintln!(
        "  fleet: ten run -d returned within {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let ps = env.supermachine(&["ps"], Duration::from_secs(60))?;
    let up = ps
        .stdout
        .lines()
        .filter(|l| l.contains("fleet") && l.contains("Up "))
        .count();
    expect(up == 10, "ps lists the ten VMs as up", &ps)?;
    for (i, port) in ports.iter().enumerate() {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], *port).into();
        let want = format!("vm{i}\n");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match http_get(addr, "/index.html") {
                Ok(r) if http_body(&r) == Some(want.as_bytes()) => break,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                other => return Err(format!("fleet{i} on port {port}: {other:?}")),
            }
        }
    }
    let names: Vec<String> = (0..10).map(|i| format!("fleet{i}")).collect();
    let mut args = vec!["stop"];
    args.extend(names.iter().map(String::as_str));
    let t = Instant::now();
    let stop = env.supermachine(&args, Duration::from_secs(300))?;
    eprintln!(
        "  fleet: one stop of all ten took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    args[0] = "rm";
    let rm = env.supermachine(&args, Duration::from_secs(60))?;
    let all = env.supermachine(&["ps", "-a", "-q"], Duration::from_secs(60))?;
    let left = supermachines_left(&env.bin);
    let runtime_left = std::fs::read_dir("/tmp/supermachine-0/vms")
        .map(|d| d.count())
        .unwrap_or(0);
    expect(
        stop.code == Some(0)
            && rm.code == Some(0)
            && all.stdout.trim().is_empty()
            && left.is_empty()
            && runtime_left == 0,
        &format!(
            "all ten stopped and removed; nothing left (processes: {left:?}, registry entries: {runtime_left})"
        ),
        &Outcome {
            code: stop.code,
            stdout: format!("stop: {}rm: {}", stop.stdout, rm.stdout),
            stderr: format!("{}{}", stop.stderr, rm.stderr),
        },
    )
}

/// `--egress-allow` through passt in L1: the allowed service answers; a
/// second port on the same address and a service on another address are
/// refused within a second (the guest's wget fails; the servers accept
/// nothing); DNS works only with `--egress-allow dns`; `update` changes the
/// policy of a running VM for its new connections, and `inspect` counts the
/// denials.
fn run_egress_allow_list_is_enforced_by_the_vmm(env: &Env) -> Result<(), String> {
    use std::sync::atomic::Ordering::SeqCst;
    let img = images()?;
    if std::env::var_os(IN_RIG).is_none() {
        println!("  skipped: needs the rig's private L1 network (dummy0, 192.0.2.0/24)");
        return Ok(());
    }
    // passt gives the guest L1's own address (192.0.2.1): the services live
    // on other addresses of L1's.
    for addr in ["192.0.2.53/32", "192.0.2.77/32", "192.0.2.78/32"] {
        // Present already if an earlier scenario added it.
        let _ = Command::new("busybox")
            .args(["ip", "addr", "add", addr, "dev", "dummy0"])
            .status();
    }
    // The passt scenario's DNS server may hold the port already.
    let _ = start_dns("192.0.2.53:53", [192, 0, 2, 1].into());
    let (pa, a_hits) = start_http("192.0.2.77:0", "service A\n", Vec::new())?;
    let (pb, b_hits) = start_http("192.0.2.77:0", "service B\n", Vec::new())?;
    let (pc, c_hits) = start_http("192.0.2.78:0", "service C\n", Vec::new())?;
    let allow_a = format!("192.0.2.77:{pa}");
    // Each fetch: its output (or "refused") and how long it took, in
    // hundredths of a second of guest uptime.
    let fetch = |name: &str, url: &str| {
        format!(
            "t0=$(cut -d' ' -f1 /proc/uptime | tr -d .); \
             if timeout 20 wget -qO- {url}; then :; else echo {name} refused; fi; \
             t1=$(cut -d' ' -f1 /proc/uptime | tr -d .); echo {name} took $((t1 - t0));"
        )
    };
    let script = format!(
        "{} {} {} if timeout 20 nslookup {WEB_NAME} >/dev/null 2>&1; then echo dns ok; else echo dns refused; fi",
        fetch("a", &format!("http://192.0.2.77:{pa}/hello")),
        fetch("b", &format!("http://192.0.2.77:{pb}/hello")),
        fetch("c", &format!("http://192.0.2.78:{pc}/hello")),
    );
    let o = run_out(
        env,
        &["--egress-allow", &allow_a, &img.oci, "sh", "-c", &script],
    )?;
    let took = |name: &str| {
        o.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} took ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    eprintln!(
        "  egress: refusals took {:?} and {:?} hundredths of a second in the guest",
        took("b"),
        took("c")
    );
    expect(
        o.code == Some(0)
            && o.stdout.contains("service A\n")
            && o.stdout.contains("b refused\n")
            && o.stdout.contains("c refused\n")
            && o.stdout.contains("dns refused\n")
            && took("b").is_some_and(|t| t <= 100)
            && took("c").is_some_and(|t| t <= 100)
            && a_hits.load(SeqCst) == 1
            && b_hits.load(SeqCst) == 0
            && c_hits.load(SeqCst) == 0,
        &format!(
            "only the allowed service is reached, the others refused within 1 s and never \
             contacted (accepted: A {}, B {}, C {})",
            a_hits.load(SeqCst),
            b_hits.load(SeqCst),
            c_hits.load(SeqCst)
        ),
        &o,
    )?;
    let o = run_out(
        env,
        &[
            "--egress-allow", &allow_a, "--egress-allow", "dns", &img.oci, "sh", "-c",
            &format!("if timeout 20 nslookup {WEB_NAME} >/dev/null 2>&1; then echo dns ok; else echo dns refused; fi"),
        ],
    )?;
    expect(
        o.stdout == "dns ok\n",
        "--egress-allow dns lets the resolver answer",
        &o,
    )?;

    // A running VM's policy changes for its new connections.
    let started = env.supermachine(
        &[
            "run",
            "-d",
            "--name",
            "egress",
            "--egress-allow",
            &allow_a,
            &img.oci,
            "sleep",
            "1000",
        ],
        BOOT_TIMEOUT,
    )?;
    expect(
        started.code == Some(0),
        "run -d with an egress policy",
        &started,
    )?;
    let get_b = format!(
        "if timeout 20 wget -qO- http://192.0.2.77:{pb}/hello; then :; else echo refused; fi"
    );
    let before = env.supermachine(
        &["exec", "egress", "sh", "-c", &get_b],
        Duration::from_secs(120),
    )?;
    let allow_b = format!("192.0.2.77:{pb}");
    let update = env.supermachine(
        &[
            "update",
            "--egress-allow",
            &allow_a,
            "--egress-allow",
            &allow_b,
            "egress",
        ],
        Duration::from_secs(60),
    )?;
    let after = env.supermachine(
        &["exec", "egress", "sh", "-c", &get_b],
        Duration::from_secs(120),
    )?;
    // The denial reaches inspect with the guest's next heartbeat.
    std::thread::sleep(Duration::from_secs(3));
    let inspect = env.supermachine(&["inspect", "egress"], Duration::from_secs(60))?;
    let _ = env.supermachine(&["rm", "-f", "egress"], Duration::from_secs(120));
    let denied = inspect
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"Denied\": "))
        .and_then(|v| v.trim_end_matches(',').parse::<u64>().ok());
    expect(
        before.stdout == "refused\n"
            && update.code == Some(0)
            && after.stdout == "service B\n"
            && denied.is_some_and(|d| d >= 1)
            && inspect.stdout.contains(&allow_b),
        &format!(
            "update opens port {pb} on the running VM; inspect counts the denial (before: {before:?}, \
             update: {update:?}, after: {after:?}, denied: {denied:?})"
        ),
        &inspect,
    )?;
    egress_over_ipv6(env, &img.oci)
}

/// The same over IPv6: L1 gets a routable IPv6 address for the time of the
/// check (so passt offers IPv6 to the guest, which configures it from the
/// router advertisement), with two services on another address of L1's; the
/// allowed one answers, the other port is refused within a second and never
/// contacted.
fn egress_over_ipv6(env: &Env, oci: &str) -> Result<(), String> {
    use std::sync::atomic::Ordering::SeqCst;
    let ip = |args: &[&str]| {
        Command::new("busybox")
            .arg("ip")
            .args(args)
            .output()
            .map_err(|e| e.to_string())
    };
    let setup = [
        &["-6", "addr", "add", "2001:db8::1/64", "dev", "dummy0"][..],
        &["-6", "addr", "add", "2001:db8::77/128", "dev", "dummy0"],
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8::fe",
            "dev",
            "dummy0",
        ],
    ];
    for args in setup {
        let o = ip(args)?;
        if !o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("exists") {
            return Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    let result = (|| {
        // Until duplicate address detection lets the addresses be bound.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (p6a, a_hits, p6b, b_hits) = loop {
            let a = start_http("[2001:db8::77]:0", "service A6\n", Vec::new());
            let b = start_http("[2001:db8::77]:0", "service B6\n", Vec::new());
            match (a, b) {
                (Ok((pa, ah)), Ok((pb, bh))) => break (pa, ah, pb, bh),
                (a, b) if Instant::now() > deadline => {
                    return Err(format!("IPv6 services in L1: {:?} {:?}", a.err(), b.err()))
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let script = format!(
            "i=0; until ip -6 addr show dev eth0 scope global | grep -q inet6; do \
               i=$((i+1)); if [ $i -gt 60 ]; then echo no ipv6; exit 1; fi; sleep 1; done; \
             wget -qO- 'http://[2001:db8::77]:{p6a}/hello' || echo a6 refused; \
             t0=$(cut -d' ' -f1 /proc/uptime | tr -d .); \
             if timeout 20 wget -qO- 'http://[2001:db8::77]:{p6b}/hello'; then :; else echo b6 refused; fi; \
             t1=$(cut -d' ' -f1 /proc/uptime | tr -d .); echo b6 took $((t1 - t0))"
        );
        let allow = format!("[2001:db8::77]:{p6a}");
        let o = run_out(env, &["--egress-allow", &allow, oci, "sh", "-c", &script])?;
        let took = o
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("b6 took "))
            .and_then(|v| v.trim().parse::<u64>().ok());
        eprintln!("  egress: the IPv6 refusal took {took:?} hundredths of a second in the guest");
        expect(
            o.code == Some(0)
                && o.stdout.starts_with("service A6\nb6 refused\n")
                && took.is_some_and(|t| t <= 100)
                && a_hits.load(SeqCst) == 1
                && b_hits.load(SeqCst) == 0,
            &format!(
                "over IPv6 only the allowed port is reached, the other refused within 1 s and \
                 never contacted (accepted: A {}, B {})",
                a_hits.load(SeqCst),
                b_hits.load(SeqCst)
            ),
            &o,
        )
    })();
    // Later scenarios see the L1 network they always had.
    for args in setup.iter().rev() {
        let mut undo: Vec<&str> = args.to_vec();
        if let Some(verb) = undo.get_mut(2) {
            *verb = "del";
        }
        let _ = ip(&undo);
    }
    result
}

/// The `supervisor.log` of the VM an `inspect` printed (its `Dir`).
fn supervisor_log(inspect: &Outcome) -> String {
    let dir = inspect
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"Dir\": \""))
        .map(|d| d.trim_end_matches([',', '"']).to_string())
        .unwrap_or_default();
    std::fs::read_to_string(Path::new(&dir).join("supervisor.log")).unwrap_or_default()
}

/// `run -d` like docker's: a detached httpd answers on its published port,
/// `ps` lists it with the port, `logs` and `logs -f` show its output, `stop`
/// delivers SIGTERM to the process (whose handler prints a marker and exits
/// 0), `ps -a` shows it exited (0) and `rm` removes it; a process that
/// ignores SIGTERM is killed after `stop -t 2`; a supervisor killed with -9
/// shows as exited, and its name is free again after `rm`.
fn run_detached_vms_are_managed_like_containers(env: &Env) -> Result<(), String> {
    let img = images()?;
    let port = free_port()?;
    let sm = |args: &[&str]| env.supermachine(args, Duration::from_secs(120));
    // `run -d [extra] --name NAME --network none IMAGE CMD...`, with `envs`.
    let detached_env = |extra: &[&str], name: &str, cmd: &[&str], envs: &[(&str, &str)]| {
        let mut args = vec!["run", "-d"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--name", name, NO_NET[0], NO_NET[1], &img.oci]);
        args.extend_from_slice(cmd);
        env.spawn_env(&args, envs)?.finish(BOOT_TIMEOUT)
    };
    let detached = |extra: &[&str], name: &str, cmd: &[&str]| detached_env(extra, name, cmd, &[]);
    let script = "trap 'echo got-term; exit 0' TERM; mkdir -p /w; echo page > /w/index.html; \
                  httpd -p 80 -h /w; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done";
    let t = Instant::now();
    let started = detached_env(
        &["-p", &format!("{port}:80")],
        "web",
        &["sh", "-c", script],
        &[("SUPERMACHINE_TIMINGS", "1")],
    )?;
    let id = started.stdout.trim().to_string();
    expect(
        started.code == Some(0) && id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "run -d prints the VM's id and exits 0",
        &started,
    )?;
    eprintln!(
        "  detached: run -d returned in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // Where that time went, on the VMM process's clock (its supervisor.log).
    let own = supervisor_log(&sm(&["inspect", "web"])?);
    let phases: Vec<&str> = own
        .lines()
        .filter_map(|l| l.strip_prefix("[timing] "))
        .collect();
    eprintln!("  detached: the VMM's phases: {}", phases.join(" "));
    let ps = sm(&["ps"])?;
    expect(
        ps.stdout.contains(&id[..12])
            && ps.stdout.contains("web")
            && ps.stdout.contains("Up ")
            && ps.stdout.contains(&format!("127.0.0.1:{port}->80/tcp")),
        "ps lists the VM as up, with its port",
        &ps,
    )?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        match http_get(addr, "/index.html") {
            Ok(r) if http_body(&r) == Some(b"page\n".as_slice()) => break r,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => return Err(format!("the detached server's page: {other:?}")),
        }
    };
    drop(page);
    let logs = sm(&["logs", "web"])?;
    expect(
        logs.code == Some(0) && logs.stdout.starts_with("tick 0\n"),
        "logs shows the process's output",
        &logs,
    )?;
    let seen = logs.stdout.lines().count();
    // logs -f: the lines so far, new ones as they come, and its end with the VM's.
    let mut follow = Command::new(&env.bin)
        .args(["logs", "-f", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = follow.stdout.take().ok_or("no logs -f stdout")?;
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(reader)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let want = format!("tick {}", seen + 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut followed = Vec::new();
    while !followed.contains(&want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => followed.push(l),
            Err(_) => {
                let _ = follow.kill();
                return Err(format!("logs -f never showed {want:?}: {followed:?}"));
            }
        }
    }
    let t = Instant::now();
    let stop = sm(&["stop", "web"])?;
    expect(
        stop.code == Some(0) && stop.stdout == "web\n",
        "stop prints the VM's name and exits 0",
        &stop,
    )?;
    eprintln!("  detached: stop took {:.1}s", t.elapsed().as_secs_f64());
    let ended = (|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = follow.try_wait() {
                return true;
            }
            if Instant::now() > deadline {
                let _ = follow.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    followed.extend(rx.try_iter());
    if !ended || followed.last().map(String::as_str) != Some("got-term") {
        return Err(format!(
            "logs -f ends with the VM, after the SIGTERM handler's line (ended: {ended}): {:?}",
            &followed[followed.len().saturating_sub(5)..]
        ));
    }
    let all = sm(&["ps", "-a"])?;
    expect(
        all.stdout.contains("web") && all.stdout.contains("Exited (0)"),
        "ps -a shows it exited (0)",
        &all,
    )?;
    let wait = sm(&["wait", "web"])?;
    expect(wait.stdout == "0\n", "wait prints its exit code", &wait)?;
    let rm = sm(&["rm", "web"])?;
    let all = sm(&["ps", "-a"])?;
    expect(
        rm.code == Some(0) && !all.stdout.contains("web"),
        "rm removes it from ps -a",
        &all,
    )?;

    // SIGTERM ignored: SIGKILL after -t 2; the exit code says so.
    let stubborn = detached(
        &[],
        "stubborn",
        &[
            "sh",
            "-c",
            "trap '' TERM; echo armed; while true; do sleep 1; done",
        ],
    )?;
    expect(
        stubborn.code == Some(0),
        "run -d of a TERM-ignoring process",
        &stubborn,
    )?;
    // Only once the trap is set (run -d returns when the process started,
    // which in the rig is well before the shell has read its script).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sm(&["logs", "stubborn"])?.stdout.contains("armed") {
        if Instant::now() > deadline {
            return Err("the TERM-ignoring process never said it was armed".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    let stop = sm(&["stop", "-t", "2", "stubborn"])?;
    let took = t.elapsed().as_secs_f64();
    eprintln!("  detached: stop -t 2 of a process that ignores SIGTERM took {took:.1}s");
    let wait = sm(&["wait", "stubborn"])?;
    if !(stop.code == Some(0) && took >= 2.0 && wait.stdout == "137\n") {
        // What the supervisor saw, for the failure's reader.
        let inspect = sm(&["inspect", "stubborn"])?;
        let own = supervisor_log(&inspect);
        return Err(format!(
            "stop -t 2 kills a process that ignores SIGTERM (137): stop {stop:?}, wait {wait:?}\n\
             inspect: {}\nsupervisor.log: {own}",
            inspect.stdout
        ));
    }
    sm(&["rm", "stubborn"])?;

    // --restart on-failure:3 of a program that exits 1: four runs in all.
    let flaky = detached(
        &["--restart", "on-failure:3"],
        "flaky",
        &["sh", "-c", "echo ran; exit 1"],
    )?;
    expect(
        flaky.code == Some(0),
        "run -d --restart on-failure:3",
        &flaky,
    )?;
    let t = Instant::now();
    let wait = env.supermachine(&["wait", "flaky"], BOOT_TIMEOUT)?;
    let logs = sm(&["logs", "flaky"])?;
    eprintln!(
        "  detached: three restarts done {:.1}s after run -d returned",
        t.elapsed().as_secs_f64()
    );
    expect(
        wait.stdout == "1\n" && logs.stdout == "ran\nran\nran\nran\n",
        "on-failure:3 runs a failing program four times; wait prints 1",
        &Outcome {
            code: wait.code,
            stdout: format!("wait: {:?}, logs: {:?}", wait.stdout, logs.stdout),
            stderr: wait.stderr.clone(),
        },
    )?;
    sm(&["rm", "flaky"])?;

    // A supervisor killed with -9: exited in ps -a, removable, its name free.
    let crash = detached(&[], "crash", &["sleep", "1000"])?;
    expect(crash.code == Some(0), "run -d sleep", &crash)?;
    let inspect = sm(&["inspect", "crash"])?;
    let pid = inspect
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"Pid\": "))
        .and_then(|p| p.trim_end_matches(',').parse::<i32>().ok())
        .ok_or_else(|| format!("no Pid in inspect: {}", inspect.stdout))?;
    // SAFETY: kill takes plain integers; the pid is the supervisor's.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let all = sm(&["ps", "-a"])?;
        if all.stdout.contains("Exited (its supervisor ended") {
            break all;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "a killed supervisor still shows as running: {}",
                all.stdout
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(dead);
    let again = detached(&[], "crash", &["true"])?;
    expect(
        again.code == Some(1) || again.code == Some(125),
        "the name of a VM not yet removed is taken",
        &again,
    )?;
    sm(&["rm", "crash"])?;
    let again = detached(&[], "crash", &["sleep", "1000"])?;
    expect(
        again.code == Some(0),
        "after rm, the name starts a new VM",
        &again,
    )?;
    let rm = sm(&["rm", "-f", "crash"])?;
    let all = sm(&["ps", "-a", "-q"])?;
    expect(
        rm.code == Some(0) && all.stdout.trim().is_empty(),
        "rm -f stops and removes a running VM; nothing is left",
        &all,
    )
}

/// busybox httpd in the guest, published with `-p` on TCP and on a UNIX socket:
/// a page; 200 concurrent clients each get it whole; 100 MiB down and 16 MiB
/// up (through CGI scripts) arrive intact; a client that half-closes after
/// its request gets the whole response and the end of the stream; a published
/// port nobody listens on in the guest resets its client and the VM serves on;
/// a host port in use is a one-line error before anything boots.
fn run_published_ports_reach_the_guest_server(env: &Env) -> Result<(), String> {
    let img = images()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let taken_port = taken.local_addr().map_err(|e| e.to_string())?.port();
    let in_use = env.supermachine(
        &["run", "-p", &format!("{taken_port}:80"), &img.oci, "true"],
        BOOT_TIMEOUT,
    )?;
    expect(
        in_use.code == Some(125)
            && in_use.stderr.contains("cannot publish")
            && in_use.stderr.trim().lines().count() == 1,
        "a host port in use: one line, exit 125",
        &in_use,
    )?;
    drop(taken);

    let (web, dead, tls) = (free_port()?, free_port()?, free_port()?);
    let ca = TestCa::new(&scratch("tls"))?;
    let sock = scratch("web.sock");
    let _ = std::fs::remove_file(&sock);
    let sock_arg = format!("unix:{}:80", sock.display());
    let handoff = scratch("handoff.sock");
    let _ = std::fs::remove_file(&handoff);
    let handoff_arg = format!("handoff:{}:80", handoff.display());
    // No single quotes: the script goes through printf '%s' '...'.
    let cgi =
        "#!/bin/sh\necho Content-Type: text/plain\necho\nhead -c \"$CONTENT_LENGTH\" | sha256sum\n";
    // 100 MiB streamed from the image's 32 MiB file (three times, then its
    // first 4 MiB): nothing that size is held in the guest or on the host.
    let down = "#!/bin/sh\necho Content-Type: application/octet-stream\necho\n\
                cat /data/big /data/big /data/big; head -c 4194304 /data/big\n";
    let script = format!(
        "mkdir -p /w/cgi-bin; echo page > /w/index.html; \
         cp /data/big /w/big; \
         printf '%s' '{cgi}' > /w/cgi-bin/up; chmod +x /w/cgi-bin/up; \
         printf '%s' '{down}' > /w/cgi-bin/down; chmod +x /w/cgi-bin/down; \
         exec httpd -f -p 80 -h /w"
    );
    let running = env.spawn(&[
        "run",
        "--name",
        EXEC_VM,
        NO_NET[0],
        NO_NET[1],
        "-p",
        &format!("{web}:80"),
        "-p",
        &sock_arg,
        "-p",
        &format!("127.0.0.1:{dead}:82"),
        "-p",
        &handoff_arg,
        "-p",
        &format!("{tls}:80/tls"),
        "--tls-cert",
        &ca.cert,
        "--tls-key",
        &ca.key,
        &img.oci,
        "sh",
        "-c",
        &script,
    ])?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], web).into();
    let result = (|| -> Result<(), String> {
        // Until httpd listens, its port resets connections.
        let t0 = Instant::now();
        let page = loop {
            match http_get(addr, "/index.html") {
                Ok(r) if http_body(&r).is_some() => break r,
                _ if t0.elapsed() > BOOT_TIMEOUT => {
                    return Err("httpd never answered on the published port".into())
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        if http_body(&page) != Some(b"page\n") {
            return Err(format!(
                "the page through -p: {:?}",
                String::from_utf8_lossy(&page)
            ));
        }
        eprintln!(
            "  publish: first answer {:.1}s after run started",
            t0.elapsed().as_secs_f64()
        );

        // 200 concurrent clients. They keep their write side open as browsers
        // do: busybox httpd itself now and then resets a client that
        // half-closed right after its request when many arrive at once (seen
        // on plain loopback without any VM: 1 in 100); the half-close is
        // checked on its own below.
        let t = Instant::now();
        let clients: Vec<_> = (0..200)
            .map(|_| std::thread::spawn(move || http_get_open(addr, "/index.html")))
            .collect();
        let mut good = 0;
        let mut errors = Vec::new();
        for c in clients {
            match c.join() {
                Ok(Ok(r)) if http_body(&r) == Some(b"page\n") => good += 1,
                Ok(Ok(r)) => errors.push(format!(
                    "{:?}",
                    String::from_utf8_lossy(&r[..r.len().min(200)])
                )),
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(_) => errors.push("client panicked".into()),
            }
        }
        if good != 200 {
            return Err(format!(
                "{good} of 200 concurrent clients got the page; first errors: {:?}",
                &errors[..errors.len().min(5)]
            ));
        }
        eprintln!(
            "  publish: 200 concurrent clients in {:.1}s",
            t.elapsed().as_secs_f64()
        );

        // 100 MiB down, the request half-closed: the whole response and the
        // end of the stream still arrive.
        let want = big_file_bytes();
        let want_sha = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for _ in 0..3 {
                h.update(&want);
            }
            h.update(&want[..4 << 20]);
            hex(&h.finalize())
        };
        let t = Instant::now();
        let (len, sha) =
            http_get_hashed(addr, "/cgi-bin/down").map_err(|e| format!("GET 100 MiB: {e}"))?;
        if len != 100 << 20 || sha != want_sha {
            return Err(format!(
                "GET 100 MiB: {len} bytes with SHA-256 {sha}, want {} with {want_sha}",
                100 << 20
            ));
        }
        eprintln!(
            "  publish: 100 MiB down in {:.1}s",
            t.elapsed().as_secs_f64()
        );

        // 16 MiB up.
        let up = &want[..16 << 20];
        let s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let mut req = format!(
            "POST /cgi-bin/up HTTP/1.0\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
            up.len()
        )
        .into_bytes();
        req.extend_from_slice(up);
        let t = Instant::now();
        let r = http_over(s, &req, |_| {}).map_err(|e| format!("POST: {e}"))?;
        let got = http_body(&r).map(|b| String::from_utf8_lossy(b).into_owned());
        if got.as_deref() != Some(&format!("{}  -\n", sha256_hex(up))) {
            return Err(format!(
                "16 MiB up: the guest's SHA-256 is {got:?}, want {} (response {:?})",
                sha256_hex(up),
                String::from_utf8_lossy(&r[..r.len().min(300)])
            ));
        }
        eprintln!("  publish: 16 MiB up in {:.1}s", t.elapsed().as_secs_f64());

        // The UNIX socket end.
        let u = UnixStream::connect(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
        u.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let shut = u.try_clone().map_err(|e| e.to_string())?;
        let r = http_over(u, b"GET /index.html HTTP/1.0\r\n\r\n", move |_| {
            let _ = shut.shutdown(std::net::Shutdown::Write);
        })
        .map_err(|e| format!("GET over {}: {e}", sock.display()))?;
        if http_body(&r) != Some(b"page\n") {
            return Err(format!(
                "the page through -p unix: {:?}",
                String::from_utf8_lossy(&r)
            ));
        }

        // A connection this test accepted, handed over with SCM_RIGHTS.
        let page = handed_over_get(&handoff, "/index.html")?;
        if http_body(&page) != Some(b"page\n") {
            return Err(format!(
                "the page through -p handoff: {:?}",
                String::from_utf8_lossy(&page)
            ));
        }

        // TLS terminated on the host end: a client that trusts only the
        // test's CA gets the page the guest serves in plain HTTP.
        let page = ca.https_get(([127, 0, 0, 1], tls).into(), "/index.html")?;
        if http_body(&page) != Some(b"page\n") {
            return Err(format!(
                "the page through -p .../tls: {:?}",
                String::from_utf8_lossy(&page)
            ));
        }
        let big = ca.https_get(([127, 0, 0, 1], tls).into(), "/big")?;
        let body = http_body(&big).ok_or("GET /big over TLS: not a 200")?;
        if sha256_hex(body) != sha256_hex(&big_file_bytes()) {
            return Err(format!(
                "GET /big over TLS: {} bytes, wrong SHA-256",
                body.len()
            ));
        }
        eprintln!("  publish: TLS page and 32 MiB verified against the test's CA");

        // Nobody on guest port 82: the client is reset, and the VM serves on.
        let dead_addr: std::net::SocketAddr = ([127, 0, 0, 1], dead).into();
        let mut d = std::net::TcpStream::connect(dead_addr).map_err(|e| e.to_string())?;
        d.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let _ = d.write_all(b"hello?");
        let mut b = [0u8; 16];
        match d.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => {
                return Err(format!(
                    "a guest port nobody listens on: want a reset, got {other:?}"
                ))
            }
        }
        let again = http_get(addr, "/index.html").map_err(|e| e.to_string())?;
        if http_body(&again) != Some(b"page\n") {
            return Err("the VM stopped serving after a refused guest port".into());
        }
        exec_into_the_named_vm(env)?;
        exec_with_a_terminal(env)
    })();
    let pid = running.child.id().to_string();
    let _ = Command::new("busybox")
        .args(["kill", "-TERM", &pid])
        .status();
    let o = running.finish(Duration::from_secs(60))?;
    expect(result.is_ok(), &result.err().unwrap_or_default(), &o)?;
    expect(
        o.code == Some(143) && !sock.exists() && !handoff.exists(),
        "SIGTERM ends the server's run (143) and its UNIX and handoff sockets are removed",
        &o,
    )?;
    let gone = env.supermachine(&["exec", EXEC_VM, "true"], Duration::from_secs(60))?;
    expect(
        gone.code == Some(125)
            && gone.stderr.trim() == format!("supermachine: error: no VM named {EXEC_VM}"),
        "exec into a VM that has ended: one line, exit 125",
        &gone,
    )?;

    // -P: the image's ExposedPorts (80/tcp) on a free port, which run prints.
    let running = env.spawn(&[
        "run",
        NO_NET[0],
        NO_NET[1],
        "-P",
        &img.oci,
        "sh",
        "-c",
        "mkdir -p /w; echo exposed > /w/index.html; exec httpd -f -p 80 -h /w",
    ])?;
    let t0 = Instant::now();
    let result = (|| -> Result<(), String> {
        let port = loop {
            let said = running
                .err_so_far
                .lock()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default();
            let announced = said.lines().find_map(|l| {
                l.strip_prefix("supermachine: published 127.0.0.1:")?
                    .strip_suffix(" -> guest port 80")?
                    .parse::<u16>()
                    .ok()
            });
            match announced {
                Some(p) => break p,
                None if t0.elapsed() > BOOT_TIMEOUT => {
                    return Err(format!("-P printed no port: {said:?}"))
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let ps = env.supermachine(&["ps"], Duration::from_secs(60))?;
        if !ps.stdout.contains(&format!("127.0.0.1:{port}->80/tcp")) {
            return Err(format!("ps shows the -P port as bound: {}", ps.stdout));
        }
        loop {
            match http_get_open(addr, "/index.html") {
                Ok(r) if http_body(&r) == Some(b"exposed\n") => return Ok(()),
                _ if t0.elapsed() > BOOT_TIMEOUT => {
                    return Err(format!("nothing answered on the -P port {port}"))
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })();
    let pid = running.child.id().to_string();
    let _ = Command::new("busybox")
        .args(["kill", "-TERM", &pid])
        .status();
    let o = running.finish(Duration::from_secs(60))?;
    expect(result.is_ok(), &result.err().unwrap_or_default(), &o)
}

/// `GET path` on a TCP connection this test accepts itself and hands over
/// (`SCM_RIGHTS`) on the handoff socket `at`, as a front end that accepted
/// it would: the client's side reads the response.
fn handed_over_get(at: &Path, path: &str) -> Result<Vec<u8>, String> {
    use std::os::fd::AsRawFd;
    let e = |e: std::io::Error| e.to_string();
    let front = std::net::TcpListener::bind("127.0.0.1:0").map_err(e)?;
    let client = std::net::TcpStream::connect(front.local_addr().map_err(e)?).map_err(e)?;
    let (accepted, _) = front.accept().map_err(e)?;
    let to = UnixStream::connect(at).map_err(|err| format!("{}: {err}", at.display()))?;
    let fd: libc::c_int = accepted.as_raw_fd();
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes; the header and data
    // written are inside `control` (32 bytes, room for one int's cmsg).
    let sent = unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(4) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        libc::CMSG_DATA(c).cast::<libc::c_int>().write_unaligned(fd);
        libc::sendmsg(to.as_raw_fd(), &msg, 0)
    };
    if sent != 1 {
        return Err(format!("sendmsg: {}", std::io::Error::last_os_error()));
    }
    // The VMM has its own copy now; the front end lets go of its own.
    drop(accepted);
    client
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(e)?;
    http_over(
        client,
        format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes(),
        |_| {},
    )
    .map_err(|err| format!("GET over a handed-over connection: {err}"))
}

/// A CA of the test's own and a server certificate for `localhost` it
/// signed (PEM files), and a TLS client that trusts only that CA.
struct TestCa {
    cert: String,
    key: String,
    ca_der: Vec<u8>,
}

#[cfg(not(target_os = "macos"))]
impl TestCa {
    fn new(dir: &Path) -> Result<Self, String> {
        let e = |e: rcgen::Error| e.to_string();
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let ca_key = rcgen::KeyPair::generate().map_err(e)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).map_err(e)?;
        let key = rcgen::KeyPair::generate().map_err(e)?;
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .map_err(e)?
            .signed_by(&key, &ca, &ca_key)
            .map_err(e)?;
        let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&cert_path, leaf.pem()).map_err(|e| e.to_string())?;
        std::fs::write(&key_path, key.serialize_pem()).map_err(|e| e.to_string())?;
        Ok(Self {
            cert: cert_path.display().to_string(),
            key: key_path.display().to_string(),
            ca_der: ca.der().to_vec(),
        })
    }

    /// `GET path` over TLS to `addr` as `localhost`; the whole response once
    /// the server closed (with close_notify).
    fn https_get(&self, addr: std::net::SocketAddr, path: &str) -> Result<Vec<u8>, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))
            .map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name =
            rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let conn =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .map_err(|e| format!("TLS: {e}"))?;
        let mut resp = Vec::new();
        tls.read_to_end(&mut resp)
            .map_err(|e| format!("TLS read after {} bytes: {e}", resp.len()))?;
        Ok(resp)
    }
}

/// macOS builds terminate no TLS (and the rig runs on Linux only).
#[cfg(target_os = "macos")]
impl TestCa {
    fn new(_dir: &Path) -> Result<Self, String> {
        Err("TLS termination is not built for macOS".into())
    }

    fn https_get(&self, _addr: std::net::SocketAddr, _path: &str) -> Result<Vec<u8>, String> {
        Err(format!("{} {} {}", self.cert, self.key, self.ca_der.len()))
    }
}

/// The name the published-ports scenario gives its VM for `exec`.
const EXEC_VM: &str = "web";

/// `exec` into the running VM named [`EXEC_VM`] (whose main process is
/// busybox httpd serving /w): output, status, env, the main process's root
/// filesystem, stdin, 20 at once, a signal, and the bad names.
fn exec_into_the_named_vm(env: &Env) -> Result<(), String> {
    let t = Instant::now();
    let o = env.supermachine(
        &[
            "exec",
            "-e",
            "EXTRA=x",
            "-w",
            "/w",
            EXEC_VM,
            "sh",
            "-c",
            "echo out $EXTRA $PWD; cat index.html; echo err >&2; exit 3",
        ],
        Duration::from_secs(120),
    )?;
    expect(
        o.code == Some(3) && o.stdout == "out x /w\npage\n" && o.stderr == "err\n",
        "exec: stdout, stderr, env, workdir and the main process's files, exit 3",
        &o,
    )?;
    eprintln!("  exec: one exec in {:.2}s", t.elapsed().as_secs_f64());

    // 20 at once, each with its own output and status.
    let t = Instant::now();
    let all: Vec<_> = (0..20)
        .map(|i| {
            env.spawn(&[
                "exec",
                EXEC_VM,
                "sh",
                "-c",
                "echo n$1; exit $1",
                "sh",
                &i.to_string(),
            ])
        })
        .collect::<Result<_, _>>()?;
    for (i, r) in all.into_iter().enumerate() {
        let o = r.finish(Duration::from_secs(300))?;
        expect(
            o.code == Some(i as i32) && o.stdout == format!("n{i}\n"),
            &format!("concurrent exec {i}: its own output and exit code"),
            &o,
        )?;
    }
    eprintln!("  exec: 20 concurrent in {:.2}s", t.elapsed().as_secs_f64());

    let killed = env.supermachine(
        &["exec", EXEC_VM, "sh", "-c", "kill -9 $$"],
        Duration::from_secs(120),
    )?;
    expect(
        killed.code == Some(137),
        "an exec killed by SIGKILL: 128 + 9",
        &killed,
    )?;
    let missing = env.supermachine(&["exec", EXEC_VM, "no-such-cmd"], Duration::from_secs(120))?;
    expect(
        missing.code == Some(127) && missing.stderr.contains("no-such-cmd"),
        "exec of a command the image does not have: 127, named",
        &missing,
    )?;

    // -i: stdin and its end reach the process.
    let mut child = Command::new(&env.bin)
        .args(["exec", "-i", EXEC_VM, "sh", "-c", "wc -c; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let input = vec![b'x'; 300_000];
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    let _ = writer.join();
    let out = String::from_utf8_lossy(&o.stdout);
    if o.status.code() != Some(0)
        || out.split_whitespace().collect::<Vec<_>>() != ["300000", "done"]
    {
        return Err(format!(
            "exec -i: {:?} {out:?} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }

    let unknown = env.supermachine(&["exec", "nosuch", "true"], Duration::from_secs(60))?;
    expect(
        unknown.code == Some(125)
            && unknown.stderr.trim() == "supermachine: error: no VM named nosuch",
        "exec into an unknown VM: one line, exit 125",
        &unknown,
    )?;
    let img = images()?;
    let taken = env.supermachine(
        &[
            "run", "--name", EXEC_VM, NO_NET[0], NO_NET[1], &img.oci, "true",
        ],
        Duration::from_secs(120),
    )?;
    expect(
        taken.code == Some(125)
            && taken.stderr.contains("a VM named")
            && taken.stderr.contains("already exists")
            && taken.stderr.trim().lines().count() == 1,
        "run --name with the name of a running VM: one line, exit 125",
        &taken,
    )
}

/// `exec -it` into the named VM, and `run -it IMAGE sh`, each on a
/// pseudo-terminal this test holds as a user's terminal.
fn exec_with_a_terminal(env: &Env) -> Result<(), String> {
    on_a_terminal(env, &["exec", "-it", EXEC_VM, "sh"])?;
    let img = images()?;
    on_a_terminal(env, &["run", "-it", NO_NET[0], NO_NET[1], &img.oci, "sh"])
}

/// `supermachine ARGS` (a shell) on a pseudo-terminal: a prompt, a
/// command's output, the size the host set and a resize, Ctrl-C
/// interrupting `sleep` with the shell surviving, `exit 3`, and the
/// terminal's mode as it was before.
fn on_a_terminal(env: &Env, args: &[&str]) -> Result<(), String> {
    let what = format!("{} -it", args[0]);
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (mut master, slave) = {
        let (mut m, mut s) = (-1, -1);
        let mut ws = libc::winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds; name and termios may be null.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::addr_of_mut!(ws),
            )
        };
        if rc != 0 {
            return Err(format!("openpty: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: openpty succeeded; both fds are ours alone.
        unsafe {
            (
                std::fs::File::from(OwnedFd::from_raw_fd(m)),
                OwnedFd::from_raw_fd(s),
            )
        }
    };
    let mode = |fd: i32| {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: one valid termios pointer.
        unsafe { libc::tcgetattr(fd, &mut t) };
        (t.c_iflag, t.c_oflag, t.c_lflag, t.c_cflag)
    };
    let before = mode(slave.as_raw_fd());
    let io = |f: &OwnedFd| f.try_clone().map(Stdio::from).map_err(|e| e.to_string());
    let mut cmd = Command::new(&env.bin);
    cmd.args(args)
        .stdin(io(&slave)?)
        .stdout(io(&slave)?)
        .stderr(io(&slave)?);
    // SAFETY: setsid and ioctl are async-signal-safe; the child makes the
    // pty (its stdin) its controlling terminal, as a login shell's is.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    // Everything the terminal shows, read on a thread.
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut reader = master.try_clone().map_err(|e| e.to_string())?;
    let seen_r = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = seen_r.lock() {
                s.extend_from_slice(&buf[..n]);
            }
        }
    });
    let shown = || {
        seen.lock()
            .map(|s| String::from_utf8_lossy(&s).into_owned())
            .unwrap_or_default()
    };
    let wait_for = |what: &str, from: usize| -> Result<usize, String> {
        let t = Instant::now();
        loop {
            let s = shown();
            if let Some(i) = s.get(from..).and_then(|rest| rest.find(what)) {
                return Ok(from + i + what.len());
            }
            if t.elapsed() > Duration::from_secs(120) {
                return Err(format!(
                    "the terminal never showed {what:?}; it shows {s:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let result = (|| -> Result<(), String> {
        let mut at = wait_for("# ", 0)?;
        let mut say = |text: &str| master.write_all(text.as_bytes()).map_err(|e| e.to_string());
        say("echo hel''lo\r")?;
        at = wait_for("hello\r\n", at)?;
        say("stty size\r")?;
        at = wait_for("33 101\r\n", at)?;
        // A resize of the host terminal (the kernel sends SIGWINCH to the
        // exec client, its foreground process).
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one valid winsize.
        unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ as _, &ws) };
        std::thread::sleep(Duration::from_millis(500));
        say("stty size\r")?;
        at = wait_for("40 120\r\n", at)?;
        // The raw host terminal passes Ctrl-C on as a byte; the guest's pty
        // makes it SIGINT for `sleep`, and the shell lives on (without it,
        // `alive` would not come in the 120 s wait_for gives it).
        say("sleep 1000\r")?;
        std::thread::sleep(Duration::from_secs(2));
        say("\x03")?;
        say("echo al''ive\r")?;
        wait_for("alive\r\n", at)?;
        say("exit 3\r")?;
        Ok(())
    })();
    let t = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            _ if t.elapsed() > Duration::from_secs(60) => {
                let _ = child.kill();
                break None;
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    result.map_err(|e| format!("{what}: {e}"))?;
    if status.and_then(|s| s.code()) != Some(3) {
        return Err(format!(
            "{what}: `exit 3` ended it with {status:?}; the terminal showed {:?}",
            shown()
        ));
    }
    if mode(slave.as_raw_fd()) != before {
        return Err(format!(
            "{what} left the terminal in another mode than it found it"
        ));
    }
    eprintln!("  {what}: prompt, stty size, resize, Ctrl-C and exit 3 through a pty");
    Ok(())
}

/// Guest memory of the snapshot scenario: a VM configuration no other scenario
/// has, so its first run is the one that boots and captures.
const SNAPSHOT_MEMORY: &str = "320M";

/// `run` with SUPERMACHINE_TIMINGS=1 in the snapshot scenario's configuration.
fn run_timed(env: &Env, extra: &[&str], cmd: &[&str]) -> Result<Outcome, String> {
    let img = images()?;
    let mut args = vec!["run", NO_NET[0], NO_NET[1], "--memory", SNAPSHOT_MEMORY];
    args.extend_from_slice(extra);
    args.push(&img.oci);
    args.extend_from_slice(cmd);
    let t = Instant::now();
    let o = env
        .spawn_env(&args, &[("SUPERMACHINE_TIMINGS", "1")])?
        .finish(BOOT_TIMEOUT)?;
    let how = if restored(&o) {
        "restored"
    } else if booted(&o) {
        "booted and captured"
    } else {
        "booted"
    };
    eprintln!(
        "  snapshot: `run {}` {how} in {:.1}s",
        cmd.join(" ").chars().take(30).collect::<String>(),
        t.elapsed().as_secs_f64()
    );
    Ok(o)
}

/// The `.snap` files under the cache's snapshots directory.
fn snapshot_files() -> Vec<PathBuf> {
    let root = PathBuf::from(std::env::var("XDG_CACHE_HOME").unwrap_or_default())
        .join("supermachine/snapshots");
    let mut v = Vec::new();
    for image in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(image.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "snap") {
                v.push(f.path());
            }
        }
    }
    v
}

fn booted(o: &Outcome) -> bool {
    o.stderr.contains("[timing] snapshot_written=") && !o.stderr.contains("[timing] restored=")
}

fn restored(o: &Outcome) -> bool {
    o.stderr.contains("[timing] restored=") && !o.stderr.contains("[timing] snapshot_written=")
}

/// The `[timing] NAME=Nus` value, in ms.
fn timing_ms(o: &Outcome, name: &str) -> Option<f64> {
    let at = o.stderr.find(&format!("[timing] {name}="))?;
    let rest = &o.stderr[at + name.len() + 10..];
    let us: f64 = rest.split("us").next()?.parse().ok()?;
    Some(us / 1000.0)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Issue 12's `run` acceptance: the first run of a VM configuration boots and
/// captures it once the guest is ready; later runs with other commands restore
/// it and give their own output and exit codes; two restored clones differ in
/// their randomness and have the host's wall clock; a damaged snapshot is a
/// warning and a fresh boot (and a new snapshot); `--no-snapshot` boots.
fn run_restores_its_ready_snapshot_for_any_command(env: &Env) -> Result<(), String> {
    let before = snapshot_files();
    // The real kernel finds the VMGenID device (it has no vmgenid driver, but
    // its ACPI GED driver takes the event's interrupt): no event yet.
    let first = run_timed(
        env,
        &[],
        &[
            "sh",
            "-c",
            &format!(
                "echo first; ls /sys/bus/acpi/devices | grep -c VMGENCTR; {GED_EVENTS}; exit 3"
            ),
        ],
    )?;
    expect(
        first.stdout == "first\n1\n0\n" && first.code == Some(3),
        "the first run's own output and status; one VMGenID device, no GED event yet",
        &first,
    )?;
    expect(booted(&first), "the first run boots and captures", &first)?;
    let new: Vec<PathBuf> = snapshot_files()
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    expect(
        new.len() == 1,
        &format!("one new snapshot file: {new:?}"),
        &first,
    )?;
    let snap = &new[0];
    let second = run_timed(env, &[], &["sh", "-c", "echo second >&2; exit 4"])?;
    expect(
        restored(&second) && second.code == Some(4) && second.stdout.is_empty(),
        "the second run restores and gives its own status",
        &second,
    )?;
    expect(
        second.stderr.contains("second\n"),
        "the second run's stderr is its process's",
        &second,
    )?;
    // Two clones of the one snapshot: their own randomness, the host's clock.
    // And each restore raised the VMGenID event, which the guest took.
    let probe = format!("cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; {GED_EVENTS}");
    let mut clones = Vec::new();
    for _ in 0..2 {
        let host_before = unix_now();
        let o = run_timed(env, &[], &["sh", "-c", &probe])?;
        let host_after = unix_now();
        expect(restored(&o) && o.code == Some(0), "a clone restores", &o)?;
        let lines: Vec<&str> = o.stdout.lines().collect();
        expect(
            lines.len() == 4,
            "uuid, random bytes, the date and the GED events",
            &o,
        )?;
        expect(
            lines[3] == "1",
            "the restore's VMGenID event reached the guest once (ACPI:Ged in /proc/interrupts)",
            &o,
        )?;
        let guest: f64 = lines[2]
            .parse()
            .map_err(|e| format!("date {:?}: {e}", lines[2]))?;
        // busybox's date has whole seconds: the guest's clock is in [s, s + 1).
        expect(
            guest + 1.0 >= host_before - 1.0 && guest <= host_after + 1.0,
            &format!(
                "the clone's wall clock ({guest:.3}) is within 1 s of the host's \
                 ({host_before:.3}..{host_after:.3})"
            ),
            &o,
        )?;
        clones.push((lines[0].to_string(), lines[1].to_string(), o));
    }
    expect(
        clones[0].0 != clones[1].0 && clones[0].1 != clones[1].1,
        &format!(
            "two clones differ in uuid ({} / {}) and /dev/urandom ({} / {})",
            clones[0].0, clones[1].0, clones[0].1, clones[1].1
        ),
        &clones[1].2,
    )?;
    if let (Some(boot), Some(restore)) = (
        timing_ms(&first, "init_ready"),
        timing_ms(&clones[1].2, "restored"),
    ) {
        eprintln!("  snapshot: first run ready at {boot:.0} ms, a restore done at {restore:.0} ms");
    }
    // `snapshots` lists it with its size.
    let listed = env.supermachine(&["snapshots"], BOOT_TIMEOUT)?;
    let key = snap
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    expect(
        listed.code == Some(0)
            && listed
                .stdout
                .lines()
                .any(|l| l.contains(&key) && l.contains('M')),
        &format!("`snapshots` lists {key} with its size"),
        &listed,
    )?;
    // A flipped byte in its state: a warning, a fresh boot and a new snapshot.
    let mut bytes = std::fs::read(snap).map_err(|e| format!("read {}: {e}", snap.display()))?;
    bytes[4096 + 10] ^= 0x40;
    std::fs::write(snap, &bytes).map_err(|e| format!("write {}: {e}", snap.display()))?;
    let damaged = run_timed(env, &[], &["sh", "-c", "echo after-damage"])?;
    expect(
        damaged.stdout == "after-damage\n"
            && damaged.code == Some(0)
            && damaged.stderr.contains("cannot be used")
            && booted(&damaged),
        "a damaged snapshot: warning, fresh boot, new capture",
        &damaged,
    )?;
    let again = run_timed(env, &[], &["true"])?;
    expect(
        restored(&again) && again.code == Some(0),
        "the new snapshot restores",
        &again,
    )?;
    let opted_out = run_timed(env, &["--no-snapshot"], &["sh", "-c", "exit 7"])?;
    expect(
        opted_out.code == Some(7)
            && !opted_out.stderr.contains("[timing] restored=")
            && !opted_out.stderr.contains("[timing] snapshot_written="),
        "--no-snapshot boots and captures nothing",
        &opted_out,
    )
}

fn run_scenarios(env: &Env, filter: Option<&str>) -> bool {
    let (mut passed, mut failed) = (0, 0);
    for s in SCENARIOS {
        // `a|b` runs the scenarios whose names contain a or b.
        if filter.is_some_and(|f| !f.split('|').any(|part| s.name.contains(part))) {
            continue;
        }
        let t = Instant::now();
        let mut result = (s.run)(env);
        // Seen once in CI: a guest that reset within a second of its boot, before
        // printing anything (the same scenario passed on every run before and
        // after). TCG's nested SVM under L1 is the suspect; one more run in this
        // L1 tells such a flake from a failure, and says so. No other failure
        // is run again.
        if result
            .as_ref()
            .is_err_and(|e| e.contains("the VM ended (Reset) before the process"))
        {
            println!(
                "linux_guest: {}: a VM reset before its agent answered; running the scenario once more",
                s.name
            );
            result = (s.run)(env);
        }
        match result {
            Ok(()) => {
                passed += 1;
                println!(
                    "test {} ... ok ({:.1}s{})",
                    s.name,
                    t.elapsed().as_secs_f64(),
                    mem_available()
                );
            }
            Err(e) => {
                failed += 1;
                println!(
                    "test {} ... FAILED ({:.1}s{})\n{e}",
                    s.name,
                    t.elapsed().as_secs_f64(),
                    mem_available()
                );
            }
        }
    }
    println!("linux_guest: {passed} passed, {failed} failed");
    failed == 0
}

/// `, N MiB free`: the memory this host could still give (MemAvailable), shown
/// after each scenario. L1's RAM holds the payload, the image store, every
/// snapshot the suite writes and each VM's guest RAM; a failure that comes with
/// little of it left (an allocation failing in the VMM) reads differently.
fn mem_available() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| format!(", {} MiB free", kib / 1024))
        .unwrap_or_default()
}

fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The read-only disk scenario's ext4 image, relative to the payload.
const RO_DISK: &str = "disks/ro-ext4.img";
/// The file in it.
const RO_TEXT: &str = "made on the host, read in the guest";

/// An 8 MiB ext4 image holding `ro.txt` (`mke2fs -d`, no root needed).
fn make_ro_disk(path: &Path) -> Result<(), String> {
    let src = path.with_extension("d");
    std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
    std::fs::write(src.join("ro.txt"), format!("{RO_TEXT}\n")).map_err(|e| e.to_string())?;
    let o = Command::new("/usr/sbin/mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(path)
        .arg("8M")
        .output()
        .map_err(|e| format!("running mke2fs: {e}"))?;
    let _ = std::fs::remove_dir_all(&src);
    if !o.status.success() {
        return Err(format!("mke2fs: {}", String::from_utf8_lossy(&o.stderr)));
    }
    Ok(())
}

/// A self-contained supermachine cache for the scenarios: the provisioned kernel
/// and its initramfs (built on the host: L1 has no network and building needs the
/// module tree), and the test images pulled into its store.
struct Payload {
    dir: PathBuf,
    assets: guest_assets::kernel::KernelAssets,
    images: Images,
}

impl Drop for Payload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn prepare_payload() -> Result<Payload, String> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_supermachine"));
    let cache = supermachine::cache().map_err(|e| e.to_string())?;
    let assets = guest_assets::kernel::provision(&cache)
        .map_err(|e| format!("cannot provision the kernel on the host: {e}"))?;
    let initramfs = guest_assets::initramfs::ensure(&cache, &assets)
        .map_err(|e| format!("cannot build the initramfs on the host: {e}"))?;
    let dir = std::env::temp_dir().join(format!("sm-guest-payload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // XDG_CACHE_HOME=/payload/cache in the rig.
    let store = dir.join("cache/supermachine");
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
    };
    let name = |p: &Path| p.file_name().map(PathBuf::from).unwrap_or_default();
    guest_assets::kernel::seed(
        &guest_assets::cache::CacheLayout::at(&store),
        &assets,
        &initramfs,
    )
    .map_err(|e| format!("cannot seed the payload's cache: {e}"))?;
    copy(&bin, &dir.join("supermachine"))?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    copy(&me, &dir.join("linux_guest"))?;
    let images = prepare_images(&bin, &dir.join("cache"));
    let tools = dir.join("bin");
    std::fs::create_dir_all(&tools).map_err(|e| e.to_string())?;
    for t in HOST_TOOLS {
        let t = Path::new(t);
        copy(t, &tools.join(name(t)))?;
    }
    make_ro_disk(&dir.join(RO_DISK))?;
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

/// Runs this binary in the rig with the payload as /payload. If L1 itself dies
/// before the suite's summary line (an L1 kernel stack overflow inside KVM_RUN
/// under QEMU's emulation, seen in 3 of about 12 suite runs, or an L1 that goes
/// silent), the scenarios that had not passed run again in a fresh rig, up to
/// four more times (2026-12-04: one clean-clone run lost two L1s in a row,
/// to a stack overflow and then a silent L1); a scenario that fails, or an
/// L1 that dies five times, fails the suite. A lost L1 costs at most the 300 s
/// the rig waits for a silent one, plus its boot.
fn run_in_rig(p: &Payload, filter: Option<&str>) -> bool {
    const ATTEMPTS: u32 = 5;
    use std::io::{BufRead, BufReader};
    let Some(modules) = p.assets.modules_dir.clone() else {
        println!(
            "linux_guest: the provisioned kernel has no modules dir (kvm-amd is needed for L1)"
        );
        return false;
    };
    let selected: Vec<&str> = SCENARIOS
        .iter()
        .map(|s| s.name)
        .filter(|n| filter.is_none_or(|f| f.split('|').any(|part| n.contains(part))))
        .collect();
    let mut todo = selected.clone();
    for attempt in 1..=ATTEMPTS {
        let mut cmd = Command::new(workspace_root().join("tests/nested/rig"));
        cmd.env("RIG_KERNEL", &p.assets.kernel)
            .env("RIG_MODULES", &modules);
        // The VMM's own knobs pass through (SUPERMACHINE_SANDBOX=log with
        // RIG_APPEND=loglevel=7 lists every call the sandbox would refuse).
        let knobs: String = [
            "SUPERMACHINE_SANDBOX",
            "SUPERMACHINE_SANDBOX_SELFTEST",
            "SUPERMACHINE_LOG",
        ]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!(" {k}={v}")))
        .collect();
        cmd.env(
            "RIG_ENV",
            format!(
                "{IN_RIG}=1 XDG_CACHE_HOME=/payload/cache SM_TEST_BIN=/payload/supermachine SM_TEST_PAYLOAD=/payload SM_TEST_FILTER={} {}{knobs}",
                todo.join("|"),
                p.images.env_line()
            ),
        );
        // The whole suite takes 5-10 min in the rig. An L1 that stops making
        // progress (seen once: no output for 25 min, cause not found) is cut off
        // well before the rig's own 30 min and counts as an L1 that died.
        cmd.args(["--timeout", "1200"]);
        cmd.arg(&p.dir).arg("--").arg("./linux_guest");
        cmd.stdout(Stdio::piped());
        // Its own process group, so that a stuck L1 is ended with its QEMU.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let Ok(mut child) = cmd.spawn() else {
            println!("linux_guest: cannot start tests/nested/rig");
            return false;
        };
        let group = child.id() as libc::pid_t;
        let mut summary = false;
        let mut passed = Vec::new();
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("{line}");
                // L1's kernel says one of its CPUs has not come back from L2
                // for 26 s (seen: a vCPU thread of a restored VM, under TCG's
                // nested SVM, never again): this L1 makes no more progress,
                // and waiting for --timeout costs 20 minutes. End it now; the
                // scenarios not passed yet run again in a fresh one.
                if line.contains("watchdog: BUG: soft lockup") {
                    println!("linux_guest: L1 reports a CPU stuck in a guest; ending this L1");
                    // SAFETY: kill(2) on the rig's own process group.
                    unsafe { libc::kill(-group, libc::SIGKILL) };
                }
                if line.starts_with("linux_guest: ") && line.contains(" passed, ") {
                    summary = true;
                }
                if let Some(rest) = line.strip_prefix("test ") {
                    if let Some((name, _)) = rest.split_once(" ... ok") {
                        passed.push(name.to_string());
                    }
                }
            }
        }
        let ok = child.wait().map(|s| s.success()).unwrap_or(false);
        if summary || attempt == ATTEMPTS {
            return ok && summary;
        }
        todo.retain(|n| !passed.iter().any(|p| p == n));
        if todo.is_empty() {
            // Every scenario reported ok; L1 went down after the last one.
            return true;
        }
        println!(
            "linux_guest: L1 ended before the suite's summary; rerunning {} scenario(s) that had not passed in a fresh rig",
            todo.len()
        );
    }
    false
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
        let payload = std::env::var_os("SM_TEST_PAYLOAD")
            .map(PathBuf::from)
            .expect("SM_TEST_PAYLOAD");
        run_scenarios(&Env { bin, payload }, filter)
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
                    payload: payload.dir.clone(),
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
