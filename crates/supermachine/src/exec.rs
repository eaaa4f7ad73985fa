//! `exec`: a new process in a running VM's container, as `docker exec` does it,
//! and the VM's control socket that serves it.
//!
//! Every run registers its VM ([`crate::vms`]) and serves its control socket
//! (`vms/ID/ctl.sock`) while the VM runs (`serve`). `exec` ([`exec`]) finds the
//! VM by name or id prefix, connects there and speaks agent frames
//! (docs/agent-protocol.md, "Exec"): its `ProcessSpec` names only what the
//! user gave; the run fills in the main process's env, working directory and
//! user, opens a vsock connection to the guest's [`EXEC_PORT`], sends the
//! completed spec and then carries the bytes both ways untouched. The guest
//! runs the process in the container's root, and its output, exit status and
//! (with `-t`) terminal come back over that connection. A `Signal` frame on
//! stream 0 instead asks the run to signal its main process (`stop`, `kill`).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{
    encode_frame, FrameDecoder, Message, ProcessSpec, User, CONTROL_STREAM, EXEC_PORT, EXEC_STREAM,
    MAIN_PROCESS_STREAM,
};

use crate::agent::{self, AgentConn};
use crate::publish::Client;
use crate::vms::Registration;
use crate::Error;

/// How long an exec client has to send its `ProcessSpec`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Stack of the exec threads (their buffers are on the heap).
const THREAD_STACK: usize = 256 << 10;

/// The main process's side of the run's agent connection, once it started:
/// where the control socket's signals go.
pub(crate) type MainSlot = Arc<Mutex<Option<Writer>>>;

/// What the control socket's connections share: the VM, its main process's
/// spec (the exec defaults) and its side of the agent connection.
#[derive(Clone)]
struct Served {
    reg: Arc<Registration>,
    vsock: runner::virtio::VsockHandle,
    vm: runner::vmm::StopHandle,
    main: Arc<Option<ProcessSpec>>,
    slot: MainSlot,
    net: Option<crate::egress::NetHandle>,
}

/// Serves `reg`'s control socket for the VM behind `vsock` until `vm` ends,
/// on one accept thread (started inside the caller's sandbox). An exec's
/// process gets `main`'s env (and its own `-e` after it), and `main`'s
/// working directory and user unless it names its own; a signal goes to the
/// main process through `slot`. Join the handle after the VM's end.
pub(crate) fn serve(
    reg: &Arc<Registration>,
    vsock: &runner::virtio::VsockHandle,
    vm: &runner::vmm::StopHandle,
    main: Option<ProcessSpec>,
    slot: MainSlot,
    net: Option<crate::egress::NetHandle>,
) -> Result<std::thread::JoinHandle<()>, Error> {
    let reg = reg.clone();
    let served = Served {
        reg: reg.clone(),
        vsock: vsock.clone(),
        vm: vm.clone(),
        main: Arc::new(main),
        slot,
        net,
    };
    std::thread::Builder::new()
        .name("sm-exec".into())
        .stack_size(THREAD_STACK)
        .spawn(move || accept_loop(&reg, &served))
        .map_err(|source| Error::Thread {
            what: "the control socket's accept thread",
            source,
        })
}

fn accept_loop(reg: &Registration, served: &Served) {
    let listener = reg.listener();
    let fd = listener.as_raw_fd();
    while !served.vm.is_ending() {
        if !crate::publish::readable_soon(fd) {
            continue;
        }
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!("exec socket: accept: {e}");
                continue;
            }
        };
        let served = served.clone();
        let spawned = std::thread::Builder::new()
            .name("sm-exec-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || proxy(client, &served));
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

/// What a control socket client asks for.
enum Request {
    /// An exec: its stream, spec, and the bytes after the spec.
    Exec(u32, ProcessSpec, Vec<u8>),
    /// A signal for the main process.
    Signal(i32),
    /// A new egress policy: (allow, deny).
    Egress(Vec<String>, Vec<String>),
}

/// Reads the client's first frame: an exec's `ProcessSpec` (and any bytes
/// after it), or a `Signal` on stream 0.
fn read_request(client: &mut UnixStream) -> Result<Request, String> {
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
                    Message::ProcessSpec(spec) => Ok(Request::Exec(f.stream, spec, early)),
                    other => Err(format!(
                        "an exec request starts with ProcessSpec, not {:?}",
                        other.kind()
                    )),
                },
                Ok(f) => match f.message {
                    Message::Signal { signo } => Ok(Request::Signal(signo)),
                    Message::Egress { allow, deny } => Ok(Request::Egress(allow, deny)),
                    other => Err(format!(
                        "stream 0 takes a Signal or an Egress policy, not {:?}",
                        other.kind()
                    )),
                },
                Err(e) => Err(e.to_string()),
            };
        }
    }
}

/// Carries one exec client to the guest's exec port and back, or passes a
/// signal on to the main process (answering with the same `Signal` once it
/// went).
fn proxy(mut client: UnixStream, served: &Served) {
    let (stream, spec, early) = match read_request(&mut client) {
        Ok(Request::Exec(stream, spec, early)) => (stream, spec, early),
        Ok(Request::Signal(signo)) => {
            let w = served.slot.lock().ok().and_then(|w| w.clone());
            let Some(w) = w else {
                return refuse(&mut client, "the VM's process has not started".into());
            };
            send(&w, MAIN_PROCESS_STREAM, &Message::Signal { signo });
            // The same frame back says it went.
            let mut frame = Vec::new();
            if encode_frame(CONTROL_STREAM, &Message::Signal { signo }, &mut frame).is_ok() {
                let _ = client.write_all(&frame);
            }
            return;
        }
        Ok(Request::Egress(allow, deny)) => {
            let set = match &served.net {
                Some(n) => n.set(&allow, &deny),
                None => Err(Error::Usage("the VM has no network device".into())),
            };
            if let Err(e) = set {
                return refuse(&mut client, e.to_string());
            }
            served.reg.update(|s| {
                s.egress_allow.clone_from(&allow);
                s.egress_deny.clone_from(&deny);
            });
            let mut frame = Vec::new();
            if encode_frame(CONTROL_STREAM, &Message::Egress { allow, deny }, &mut frame).is_ok() {
                let _ = client.write_all(&frame);
            }
            return;
        }
        Err(e) => return refuse(&mut client, e),
    };
    let (vsock, vm, main) = (&served.vsock, &served.vm, (*served.main).as_ref());
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

/// Runs `opts.argv` in the running VM `vm`; its stdout and stderr go to
/// `out` and `err`, and the result is docker's exit code for it.
pub fn exec(
    vm: &crate::vms::Entry,
    opts: &ExecOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Error> {
    if opts.argv.is_empty() {
        return Err(Error::Usage("exec needs a command to run".into()));
    }
    let sock = connect(vm)?;
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
    let r = conn.follow(EXEC_STREAM, out, err, &mut |_| {});
    drop(terminal);
    match r {
        Ok(status) => Ok(agent::exit_code(status)),
        Err(agent::AgentError::Guest(m)) => Err(Error::Exec(m)),
        Err(agent::AgentError::Closed) => Err(Error::Exec(format!(
            "the VM {} ended before the process did",
            vm.display_name()
        ))),
        Err(e) => Err(Error::Exec(crate::error_chain(&e))),
    }
}

/// A connection to `e`'s control socket; a VM that is not running (or whose
/// socket is gone with it) is [`Error::VmNotRunning`].
pub(crate) fn connect(e: &crate::vms::Entry) -> Result<UnixStream, Error> {
    let not_running = || Error::VmNotRunning {
        name: e.display_name().into(),
    };
    if !e.is_running() {
        return Err(not_running());
    }
    let path = e.socket();
    match UnixStream::connect(&path) {
        Ok(s) => Ok(s),
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(not_running())
        }
        Err(err) => Err(Error::RuntimeDir {
            path,
            why: err.to_string(),
        }),
    }
}

/// Has `e`'s run send `signo` to its main process.
pub fn signal(e: &crate::vms::Entry, signo: i32) -> Result<(), Error> {
    control(e, &Message::Signal { signo })
}

/// Has `e`'s run enforce the egress rules `allow` and `deny` from now on.
pub fn egress(e: &crate::vms::Entry, allow: &[String], deny: &[String]) -> Result<(), Error> {
    crate::egress::check(allow, deny)?;
    control(
        e,
        &Message::Egress {
            allow: allow.to_vec(),
            deny: deny.to_vec(),
        },
    )
}

/// Sends `request` on `e`'s control socket; `Ok` once the same kind of frame
/// comes back.
fn control(e: &crate::vms::Entry, request: &Message) -> Result<(), Error> {
    let mut sock = connect(e)?;
    let mut frame = Vec::new();
    encode_frame(CONTROL_STREAM, request, &mut frame)
        .map_err(|err| Error::Exec(err.to_string()))?;
    sock.write_all(&frame).map_err(|_| Error::VmNotRunning {
        name: e.display_name().into(),
    })?;
    sock.set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|err| Error::Exec(err.to_string()))?;
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return Err(Error::VmNotRunning {
                name: e.display_name().into(),
            });
        }
        let mut input = &buf[..n];
        if let Some(raw) = dec
            .decode(&mut input)
            .map_err(|err| Error::Exec(err.to_string()))?
        {
            return match raw.to_frame().map(|f| f.message) {
                Ok(m) if m.kind() == request.kind() => Ok(()),
                Ok(Message::Error { message }) => Err(Error::Exec(message)),
                Ok(other) => Err(Error::Exec(format!(
                    "the VM answered {:?} to {:?}",
                    other.kind(),
                    request.kind()
                ))),
                Err(err) => Err(Error::Exec(err.to_string())),
            };
        }
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
}
