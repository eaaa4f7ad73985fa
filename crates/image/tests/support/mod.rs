//! Test support: real OCI images built from Debian packages with real tools
//! (umoci, skopeo), a real local registry (Debian's `docker-registry`), and a
//! tiny scripted HTTP server for hostile-registry tests.
//!
//! Std only, so any crate's tests can include it with
//! `#[path = "../../image/tests/support/mod.rs"] mod support;`.
//! Built images are cached under the cargo target tmp dir (or
//! `SUPERMACHINE_TEST_IMAGES`), built once and published by an atomic rename,
//! so repeated and parallel tests reuse them.
// Test code: a failed setup step should panic with its cause.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static BUILD_LOCK: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where built test images are cached.
pub fn images_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SUPERMACHINE_TEST_IMAGES") {
        return PathBuf::from(d);
    }
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join("oci-images")
}

/// A fresh empty directory under the target tmp dir (not removed: cheap, and
/// useful after a failure).
pub fn scratch_dir(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = images_dir()
        .join("scratch")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes sure umoci, skopeo, docker-registry and busybox-static are
/// installed, with apt-get when missing (tests run as root in CI).
pub fn ensure_tools() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let wanted = [
        ("umoci", "umoci"),
        ("skopeo", "skopeo"),
        ("docker-registry", "docker-registry"),
    ];
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !Path::new("/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]));
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
    }
    *done = true;
}

/// Builds (once) and returns a cached directory made by `build`, which gets
/// a fresh staging path and must fill it.
pub fn cached(name: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = images_dir();
    std::fs::create_dir_all(&root).unwrap();
    let final_dir = root.join(name);
    if final_dir.exists() {
        return final_dir;
    }
    ensure_tools();
    let staging = root.join(format!(".{name}.staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).unwrap();
    build(&staging);
    // Another process may have won the race; its result is as good.
    if std::fs::rename(&staging, &final_dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    final_dir
}

/// The tag of the busybox test image in its OCI layout.
pub const BUSYBOX_TAG: &str = "busybox";

/// An OCI image layout (dir `<cache>/busybox/layout`, tag `busybox`) with two
/// layers: Debian's static busybox with `sh`, `echo`, `cat`, `ls` links, then
/// `/etc/hello.txt`. Config: Cmd `/bin/sh -c "echo hello"`, Env, WorkingDir,
/// User, an exposed port and a label.
pub fn busybox_layout() -> PathBuf {
    cached("busybox", |dir| {
        let layout = dir.join("layout");
        let image = format!("{}:{BUSYBOX_TAG}", layout.display());
        run(Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout));
        run(Command::new("umoci").args(["new", "--image", &image]));
        add_layer(&dir.join("b1"), &image, |rootfs| {
            std::fs::create_dir_all(rootfs.join("bin")).unwrap();
            std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
            for applet in ["sh", "echo", "cat", "ls"] {
                std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
            }
        });
        add_layer(&dir.join("b2"), &image, |rootfs| {
            std::fs::create_dir_all(rootfs.join("etc")).unwrap();
            std::fs::write(rootfs.join("etc/hello.txt"), b"hello from layer 2\n").unwrap();
        });
        run(Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--config.cmd=/bin/sh",
            "--config.cmd=-c",
            "--config.cmd=echo hello",
            "--config.env=PATH=/bin",
            "--config.env=GREETING=hi",
            "--config.workingdir=/etc",
            "--config.user=1000:1000",
            "--config.exposedports=8080/tcp",
            "--config.label=org.example.test=yes",
        ]));
        run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout));
    })
    .join("layout")
}

/// Unpacks `image` (rootless) into `bundle`, lets `change` edit the rootfs,
/// and repacks it as a new top layer.
pub fn add_layer(bundle: &Path, image: &str, change: impl FnOnce(&Path)) {
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", image])
        .arg(bundle));
    change(&bundle.join("rootfs"));
    run(Command::new("umoci")
        .args(["repack", "--image", image])
        .arg(bundle));
    let _ = std::fs::remove_dir_all(bundle);
}

/// `skopeo copy` between two transports (`oci:...`, `docker-archive:...`,
/// `docker://...`), plain http/no TLS checks on the destination.
pub fn skopeo_copy(from: &str, to: &str) {
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--src-tls-verify=false",
        from,
        to,
    ]));
}

/// A docker-archive tar of the OCI layout image `layout:tag`, cached as
/// `<cache>/<name>/image.tar` and tagged `archive_tag` inside.
pub fn docker_archive(name: &str, layout: &Path, tag: &str, archive_tag: &str) -> PathBuf {
    let layout = layout.to_path_buf();
    let tag = tag.to_string();
    let archive_tag = archive_tag.to_string();
    cached(name, move |dir| {
        let tar = dir.join("image.tar");
        skopeo_copy(
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker-archive:{}:{archive_tag}", tar.display()),
        );
    })
    .join("image.tar")
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's `docker-registry` on 127.0.0.1, storage in a scratch dir; stopped
/// when dropped.
pub struct Registry {
    pub port: u16,
    pub storage: PathBuf,
    child: Child,
}

impl Registry {
    pub fn start() -> Registry {
        ensure_tools();
        let dir = scratch_dir("registry");
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        for _ in 0..5 {
            let port = free_port();
            let config = dir.join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    storage.display()
                ),
            )
            .unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting docker-registry");
            let mut reg = Registry {
                port,
                storage: storage.clone(),
                child,
            };
            if reg.wait_ready(Duration::from_secs(15)) {
                return reg;
            }
            // Lost the port race or failed: Drop stops it; try another port.
        }
        panic!("docker-registry did not become ready");
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok((status, _)) = http_get(self.port, "/v2/") {
                if status == 200 {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `host:port` to put in references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `oci:layout:tag` as `<host>/<repo_tag>`; returns the reference.
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) -> String {
        let reference = format!("{}/{repo_tag}", self.host());
        skopeo_copy(
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{reference}"),
        );
        reference
    }

    /// The file holding blob `hex` in the registry's storage (distribution's
    /// filesystem driver layout).
    pub fn blob_data_path(&self, hex: &str) -> PathBuf {
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal blocking GET: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match text.find("\r\n\r\n") {
        Some(i) => buf[i + 4..].to_vec(),
        None => Vec::new(),
    };
    Ok((status, body))
}

/// A request as the stub server saw it.
#[derive(Debug, Clone)]
pub struct StubRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl StubRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the stub does with a request.
pub enum StubReply {
    /// Status, extra headers, body.
    Respond(u16, Vec<(String, String)>, Vec<u8>),
    /// Sends headers announcing `declared` bytes, then only `body`, then closes.
    Truncated(Vec<u8>, u64),
    /// Accepts and never answers (until the server is dropped).
    Hang,
    /// Sends headers announcing `declared` bytes and `body`, then stalls.
    Stall(Vec<u8>, u64),
    /// Sends `body` one byte per interval (until the server is dropped).
    Drip(Vec<u8>, Duration),
}

type Handler = dyn Fn(&StubRequest) -> StubReply + Send + Sync;

/// A tiny scripted HTTP/1.1 server on 127.0.0.1 (one thread per connection).
pub struct StubServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    pub requests: Arc<Mutex<Vec<StubRequest>>>,
}

impl StubServer {
    pub fn start(
        handler: impl Fn(&StubRequest) -> StubReply + Send + Sync + 'static,
    ) -> StubServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        {
            let stop = stop.clone();
            let requests = requests.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let handler = handler.clone();
                    let requests = requests.clone();
                    let stop = stop.clone();
                    std::thread::spawn(move || serve(conn, &*handler, &requests, &stop));
                }
            });
        }
        StubServer {
            port,
            stop,
            requests,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for StubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(conn: TcpStream, handler: &Handler, log: &Mutex<Vec<StubRequest>>, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let req = StubRequest {
            method,
            path,
            headers,
        };
        log.lock().unwrap().push(req.clone());
        match handler(&req) {
            StubReply::Respond(status, extra, body) => {
                let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                for (k, v) in extra {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                if out.write_all(head.as_bytes()).is_err() || out.write_all(&body).is_err() {
                    return;
                }
            }
            StubReply::Truncated(body, declared) => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n");
                let _ = out.write_all(head.as_bytes());
                let _ = out.write_all(&body);
                let _ = out.flush();
                let _ = out.shutdown(std::net::Shutdown::Both);
                return;
            }
            StubReply::Drip(body, interval) => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = out.write_all(head.as_bytes());
                for b in body {
                    if stop.load(Ordering::SeqCst) || out.write_all(&[b]).is_err() {
                        return;
                    }
                    let _ = out.flush();
                    std::thread::sleep(interval);
                }
                return;
            }
            StubReply::Stall(body, declared) => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n");
                let _ = out.write_all(head.as_bytes());
                let _ = out.write_all(&body);
                let _ = out.flush();
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            StubReply::Hang => {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
        }
    }
}

/// Copies the dynamically linked executable `exe` into `root` at the same path,
/// with every shared library `ldd` names for it (the dynamic loader included),
/// each at its own path: enough for the program to run in an image that has no
/// libc of its own.
pub fn copy_with_libraries(root: &Path, exe: &Path) {
    assert!(
        exe.is_file(),
        "{} is not installed on this host (Debian: apt-get install the package that ships it)",
        exe.display()
    );
    let out = run(Command::new("ldd").arg(exe));
    let libs = out
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from);
    for file in std::iter::once(exe.to_path_buf()).chain(libs) {
        let rel = file.strip_prefix("/").unwrap();
        let dest = root.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        // fs::copy follows symlinks (libfoo.so.1 -> libfoo.so.1.2.3) and keeps
        // the mode, so the executable stays executable.
        std::fs::copy(&file, &dest)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", file.display(), dest.display()));
    }
}
