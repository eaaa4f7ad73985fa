//! `exec`: a new process in a running VM's container, as `docker exec` does it.
//!
//! A `run --name NAME` claims the name in the user's runtime directory
//! ([`runtime_dir`]): `vms/NAME.lock` (held with `flock` for the run's life,
//! so a run killed with SIGKILL frees its name) and the control socket
//! `vms/NAME.sock`, which it serves while the VM runs (`serve`). `exec`
//! ([`exec`]) connects there and speaks agent frames (docs/agent-protocol.md,
//! "Exec"): its `ProcessSpec` names only what the user gave; the run fills in
//! the main process's env, working directory and user, opens a vsock
//! connection to the guest's [`EXEC_PORT`], sends the completed spec and then
//! carries the bytes both ways untouched. The guest runs the process in the
//! container's root, and its output, exit status and (with `-t`) terminal
//! come back over that connection.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{
    encode_frame, FrameDecoder, Message, ProcessSpec, User, CONTROL_STREAM, EXEC_PORT, EXEC_STREAM,
};

use crate::agent::{self, AgentConn};
use crate::publish::Client;
use crate::Error;

/// Names the directory that holds the named VMs' sockets, overriding
/// `$XDG_RUNTIME_DIR/supermachine` (or `/tmp/supermachine-UID`).
pub const RUNTIME_DIR_ENV: &str = "SUPERMACHINE_RUNTIME_DIR";

/// The longest name: a socket path must fit `sun_path` (108 bytes) with room
/// for the directory.
const MAX_NAME: usize = 64;
/// How long an exec client has to send its `ProcessSpec`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Stack of the exec threads (their buffers are on the heap).
const THREAD_STACK: usize = 256 << 10;

/// Checks a VM name as docker checks a container's: a letter or digit, then
/// letters, digits, `_`, `.` and `-`, at least two characters.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if name.len() < 2 || name.len() > MAX_NAME || !first_ok || !rest_ok {
        return Err(Error::Usage(format!(
            "invalid VM name {name:?}: use 2 to {MAX_NAME} letters, digits, '_', '.' or '-', \
             starting with a letter or digit"
        )));
    }
    Ok(())
}

/// The user's runtime directory for supermachine, created (mode 0700) when
/// missing: `$SUPERMACHINE_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/supermachine`,
/// else `/tmp/supermachine-UID`. It must belong to this user and be closed to
/// others: a socket there is a way into the user's VMs.
pub fn runtime_dir() -> Result<PathBuf, Error> {
    let from_env = |k: &str| {
        std::env::var_os(k)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    // SAFETY: geteuid has no arguments and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = from_env(RUNTIME_DIR_ENV)
        .or_else(|| from_env("XDG_RUNTIME_DIR").map(|d| d.join("supermachine")))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/supermachine-{uid}")));
    let bad = |why: String| Error::RuntimeDir {
        path: dir.clone(),
        why,
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
    {
        Ok(()) => {}
        Err(e) => return Err(bad(e.to_string())),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("it is not a directory".into()));
    }
    if meta.uid() != uid {
        return Err(bad(format!(
            "it belongs to uid {}, not to this user ({uid})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "its mode is {:o}: others may reach it (chmod 700 it)",
            meta.mode() & 0o777
        )));
    }
    let vms = dir.join("vms");
    match std::fs::DirBuilder::new().mode(0o700).create(&vms) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::RuntimeDir {
                path: vms,
                why: e.to_string(),
            })
        }
    }
    Ok(vms)
}

/// The control socket of the VM named `name`.
fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// A name a running VM holds: its lock, and its control socket, bound.
/// Dropping it removes both.
#[derive(Debug)]
pub struct Named {
    name: String,
    socket: PathBuf,
    lock_path: PathBuf,
    listener: UnixListener,
    // Held (flock) for as long as this value lives.
    _lock: std::fs::File,
}

impl Named {
    /// Claims `name` for this process's VM: refused while another process
    /// holds it; a socket a killed run left behind is replaced.
    pub fn claim(name: &str) -> Result<Self, Error> {
        validate_name(name)?;
        let dir = runtime_dir()?;
        let lock_path = dir.join(format!("{name}.lock"));
        let io = |path: &Path, e: std::io::Error| Error::RuntimeDir {
            path: path.to_owned(),
            why: e.to_string(),
        };
        let lock = loop {
            let f = std::fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lock_path)
                .map_err(|e| io(&lock_path, e))?;
            // SAFETY: flock on a file this process just opened; no memory.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(Error::NameInUse { name: name.into() });
                }
                return Err(io(&lock_path, e));
            }
            // A run that ended removes its lock file; one opened just before
            // that is locked but no longer the name's: open the new one.
            let held = f.metadata().map_err(|e| io(&lock_path, e))?;
            match std::fs::metadata(&lock_path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => break f,
                _ => continue,
            }
        };
        let socket = socket_path(&dir, name);
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&socket, e)),
        }
        let listener = UnixListener::bind(&socket).map_err(|e| io(&socket, e))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io(&socket, e))?;
        Ok(Self {
            name: name.into(),
            socket,
            lock_path,
            listener,
            _lock: lock,
        })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The control socket (the sandbox lets the run remove it at the end).
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        // The socket first: an exec that finds no socket reports no VM, one
        // that finds the lock alone finds nobody listening either.
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Serves `named`'s control socket for the VM behind `vsock` until `vm`
/// ends, on one accept thread (started inside the caller's sandbox). An
/// exec's process gets `main`'s env (and its own `-e` after it), and
/// `main`'s working directory and user unless it names its own. Join the
/// handle after the VM's end.
pub(crate) fn serve(
    named: &Arc<Named>,
    vsock: &runner::virtio::VsockHandle,
    vm: &runner::vmm::StopHandle,
    main: Option<ProcessSpec>,
) -> Result<std::thread::JoinHandle<()>, Error> {
    let (named, vsock, vm) = (named.clone(), vsock.clone(), vm.clone());
    let main = Arc::new(main);
    std::thread::Builder::new()
        .name("sm-exec".into())
        .stack_size(THREAD_STACK)
        .spawn(move || accept_loop(&named, &vsock, &vm, &main))
        .map_err(|source| Error::Thread {
            what: "the exec socket's accept thread",
            source,
        })
}

fn accept_loop(
    named: &Named,
    vsock: &runner::virtio::VsockHandle,
    vm: &runner::vmm::StopHandle,
    main: &Arc<Option<ProcessSpec>>,
) {
    let fd = named.listener.as_raw_fd();
    while !vm.is_ending() {
        if !crate::publish::readable_soon(fd) {
            continue;
        }
        let client = match named.listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!("exec socket: accept: {e}");
                continue;
            }
        };
        let (vsock, vm, main) = (vsock.clone(), vm.clone(), main.clone());
        let spawned = std::thread::Builder::new()
            .name("sm-exec-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || proxy(client, &vsock, &vm, (*main).as_ref()));
        if let Err(e) = spawned {
            tracing::warn!("exec socket: cannot start a thread for a connection: {e}");
        }
    }
}

/// The exec's spec as the guest gets it: the main process's env with the
/// exec's own after it (a later entry wins in the guest), and the main
/// process's working directory and user where the exec names none.
fn complete(mut spec: ProcessSpec, main: Option<&ProcessSpec>) -> ProcessSpec {
    if let Some(main) = main {
        let mut env = main.env.clone();
        env.append(&mut spec.env);
        spec.env = env;
        if spec.cwd.is_empty() {
            spec.cwd.clone_from(&main.cwd);
        }
        if matches!(&spec.user, User::Name(n) if n.is_empty()) {
            spec.user = main.user.clone();
        }
    }
    spec
}

/// Tells an exec client why its request went nowhere.
fn refuse(client: &mut UnixStream, message: String) {
    let mut frame = Vec::new();
    if encode_frame(CONTROL_STREAM, &Message::Error { message }, &mut frame).is_ok() {
        let _ = client.write_all(&frame);
    }
}

/// Reads the client's first frame, its `ProcessSpec`, and any bytes after it.
fn read_request(client: &mut UnixStream) -> Result<(u32, ProcessSpec, Vec<u8>), String> {
    client
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) => return Err("the exec client closed before its request".into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("no exec request within {REQUEST_TIMEOUT:?}: {e}")),
        };
        let mut input = &buf[..n];
        if let Some(raw) = dec.decode(&mut input).map_err(|e| e.to_string())? {
            let early = input.to_vec();
            let _ = client.set_read_timeout(None);
            return match raw.to_frame() {
                Ok(f) if f.stream != CONTROL_STREAM => match f.message {
                    Message::ProcessSpec(spec) => Ok((f.stream, spec, early)),
                    other => Err(format!(
                        "an exec request starts with ProcessSpec, not {:?}",
                        other.kind()
                    )),
                },
                Ok(_) => Err("an exec request is on a process stream, not stream 0".into()),
                Err(e) => Err(e.to_string()),
            };
        }
    }
}

/// Carries one exec client to the guest's exec port and back.
fn proxy(
    mut client: UnixStream,
    vsock: &runner::virtio::VsockHandle,
    vm: &runner::vmm::StopHandle,
    main: Option<&ProcessSpec>,
) {
    let (stream, spec, early) = match read_request(&mut client) {
        Ok(r) => r,
        Err(e) => return refuse(&mut client, e),
    };
    let mut conn = match vsock.connect(EXEC_PORT) {
        Ok(c) => c,
        Err(e) => {
            return refuse(
                &mut client,
                format!("cannot reach the VM's guest agent: {e}"),
            )
        }
    };
    let mut head = Vec::new();
    if let Err(e) = encode_frame(
        stream,
        &Message::ProcessSpec(complete(spec, main)),
        &mut head,
    ) {
        return refuse(&mut client, e.to_string());
    }
    head.extend_from_slice(&early);
    if let Err(e) = conn.write_all(&head) {
        return refuse(
            &mut client,
            format!("cannot reach the VM's guest agent: {e}"),
        );
    }
    crate::publish::splice(Client::Unix(client), &[], conn, vm);
}

/// What `supermachine exec` runs.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    /// The running VM (`run --name`).
    pub name: String,
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// `KEY=VALUE` added to (or replacing in) the main process's env.
    pub env: Vec<String>,
    /// Working directory (default: the main process's).
    pub workdir: Option<String>,
    /// User (default: the main process's).
    pub user: Option<String>,
    /// Forward stdin (`-i`).
    pub interactive: bool,
    /// A pseudo-terminal in the guest (`-t`).
    pub tty: bool,
}

/// Runs `opts.argv` in the VM named `opts.name`; its stdout and stderr go to
/// this process's, and the result is docker's exit code for it.
pub fn exec(opts: &ExecOptions) -> Result<i32, Error> {
    validate_name(&opts.name)?;
    if opts.argv.is_empty() {
        return Err(Error::Usage("exec needs a command to run".into()));
    }
    let path = socket_path(&runtime_dir()?, &opts.name);
    let sock = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(Error::NoSuchVm {
                name: opts.name.clone(),
            })
        }
        Err(e) => {
            return Err(Error::RuntimeDir {
                path,
                why: e.to_string(),
            })
        }
    };
    let terminal = if opts.tty && opts.interactive {
        Some(crate::terminal::Raw::enter(true)?)
    } else {
        None
    };
    let size = opts.tty.then(crate::terminal::size).flatten();
    let spec = ProcessSpec {
        argv: opts.argv.clone(),
        env: opts.env.clone(),
        cwd: opts.workdir.clone().unwrap_or_default(),
        user: User::Name(opts.user.clone().unwrap_or_default()),
        tty: opts.tty,
        stdin: opts.interactive,
    };
    let writer =
        Arc::new(Mutex::new(sock.try_clone().map_err(|e| {
            Error::Usage(format!("cannot use the exec connection: {e}"))
        })?));
    let mut conn =
        AgentConn::exec(sock, spec, size).map_err(|e| Error::Exec(crate::error_chain(&e)))?;
    if opts.interactive {
        forward_stdin(&writer, EXEC_STREAM)?;
    }
    if terminal.is_some() {
        crate::terminal::on_resize(move |rows, cols| {
            send(&writer, EXEC_STREAM, &Message::Resize { rows, cols });
        });
    }
    let r = conn.follow(
        EXEC_STREAM,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
        &mut |_| {},
    );
    drop(terminal);
    match r {
        Ok(status) => Ok(agent::exit_code(status)),
        Err(agent::AgentError::Guest(m)) => Err(Error::Exec(m)),
        Err(agent::AgentError::Closed) => Err(Error::Exec(format!(
            "the VM named {} ended before the process did",
            opts.name
        ))),
        Err(e) => Err(Error::Exec(crate::error_chain(&e))),
    }
}

/// A connection's write side, shared by the threads that send on it.
pub(crate) type Writer = Arc<Mutex<UnixStream>>;

/// Sends one frame on `stream`; a failure means the VM is gone, which the
/// reading side reports.
pub(crate) fn send(writer: &Mutex<UnixStream>, stream: u32, m: &Message) {
    let mut frame = Vec::new();
    if encode_frame(stream, m, &mut frame).is_ok() {
        if let Ok(mut w) = writer.lock() {
            let _ = w.write_all(&frame);
        }
    }
}

/// Copies this process's stdin to the guest process on `stream`, on a thread
/// of its own, then its end of file.
pub(crate) fn forward_stdin(writer: &Writer, stream: u32) -> Result<(), Error> {
    let writer = writer.clone();
    std::thread::Builder::new()
        .name("sm-exec-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => send(&writer, stream, &Message::Stdin(buf[..n].to_vec())),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            send(&writer, stream, &Message::StdinEof);
        })
        .map(drop)
        .map_err(|source| Error::Thread {
            what: "the stdin thread",
            source,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dockers_rules() {
        for ok in ["web", "a1", "my_vm.2-x", "0db"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "-x", ".x", "a/b", "a b", "ü1", &"x".repeat(65)] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains("invalid VM name"), "{bad}: {e}");
        }
    }

    fn spec(env: &[&str], cwd: &str, user: &str) -> ProcessSpec {
        ProcessSpec {
            argv: vec!["sh".into()],
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: cwd.into(),
            user: User::Name(user.into()),
            tty: false,
            stdin: false,
        }
    }

    #[test]
    fn an_exec_takes_the_main_processs_env_cwd_and_user_unless_it_names_its_own() {
        let main = spec(&["PATH=/bin", "A=1"], "/srv", "nobody");
        let got = complete(spec(&["A=2", "B=3"], "", ""), Some(&main));
        assert_eq!(got.env, vec!["PATH=/bin", "A=1", "A=2", "B=3"]);
        assert_eq!(got.cwd, "/srv");
        assert_eq!(got.user, User::Name("nobody".into()));
        let own = complete(spec(&[], "/tmp", "0:0"), Some(&main));
        assert_eq!(
            (own.cwd.as_str(), own.user),
            ("/tmp", User::Name("0:0".into()))
        );
        // A restored VM's main process is not known: the exec's own spec.
        assert_eq!(complete(spec(&["A=2"], "", ""), None).env, vec!["A=2"]);
    }

    #[test]
    fn a_name_is_held_by_one_run_at_a_time_and_freed_at_its_end() {
        let dir = std::env::temp_dir().join(format!("sm-exec-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        // Only this test of the library's reads the variable.
        std::env::set_var(RUNTIME_DIR_ENV, &dir);
        let first = Named::claim("web").unwrap();
        assert!(first.socket().exists());
        let e = Named::claim("web").unwrap_err().to_string();
        assert!(e.contains("already running"), "{e}");
        // A stale socket of a killed run does not hold the name.
        drop(first);
        assert!(!dir.join("vms/web.sock").exists());
        std::os::unix::net::UnixListener::bind(dir.join("vms/web.sock")).unwrap();
        let again = Named::claim("web").unwrap();
        let e = exec(&ExecOptions {
            name: "nope".into(),
            argv: vec!["true".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert_eq!(e, "no running VM named nope");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
