//! Managing registered VMs like containers: `run -d`'s supervisor and its
//! log, `stop`, `kill`, `wait`, `logs` and the signal names they take.
//!
//! A detached VM is an ordinary `run` in a process of its own (the
//! supervisor: a new session, stdin from /dev/null) whose process output goes
//! to its log ([`LogSink`]) and its own messages to `supervisor.log` beside
//! it. [`start`] starts it and returns once the VM's process has started
//! (the registry's state says so) or failed.
//!
//! The supervisor is the `supermachine` program (`supermachine supervise`,
//! a command for this use only) and each of its VMMs is too; both get the
//! [`RunOptions`](crate::RunOptions) as JSON on their stdin
//! ([`read_options`]), so the CLI's `run -d` and a library's [`start`] are
//! one path.

use std::io::{BufRead, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vms::{self, Entry, Status};
use crate::Error;

/// Names the `supermachine` program a library's [`start`] runs as the
/// supervisor (default: this program when it is supermachine, else
/// `supermachine` on `PATH`).
pub const PROGRAM_ENV: &str = "SUPERMACHINE_BIN";
/// The command the supervisor and its VMMs run (`supermachine supervise`).
pub const SUPERVISE_COMMAND: &str = "supervise";
/// The largest options document a supervisor reads.
const OPTIONS_MAX: u64 = 1 << 20;
/// A log is rotated (to `log.1`, replacing the one before) past this size.
pub const LOG_CAP: u64 = 8 << 20;
/// A partial line is written out once this long.
const LINE_MAX: usize = 16 << 10;
/// How often the waiting commands look at the registry.
const POLL: Duration = Duration::from_millis(20);
/// `stop`: how long SIGKILL may take, then the supervisor's own SIGTERM.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// `rm`: how long an exited VM's guest may take to power off and its
/// supervisor to end (the VMM's own power-off grace, and some).
const POWER_OFF_WAIT: Duration = Duration::from_secs(30);

/// A signal by docker's spelling: `SIGTERM`, `TERM` or `15`.
pub fn parse_signal(s: &str) -> Result<i32, Error> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "ALRM" => libc::SIGALRM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "WINCH" => libc::SIGWINCH,
        #[cfg(target_os = "linux")]
        "PWR" => libc::SIGPWR,
        _ => {
            return Err(Error::Usage(format!(
                "unknown signal {s:?} (a name like SIGTERM or a number)"
            )))
        }
    };
    Ok(n)
}

/// `--restart`: what the supervisor does when the VM's process ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RestartPolicy {
    /// Never (the default).
    #[default]
    No,
    /// After a non-zero exit (or a failed start), at most this many times
    /// (`on-failure[:N]`; without N, without limit).
    OnFailure(Option<u32>),
    /// After every end but a `stop`.
    Always,
}

impl RestartPolicy {
    /// `no`, `on-failure`, `on-failure:N` or `always`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "no" => Ok(Self::No),
            None if s == "always" => Ok(Self::Always),
            None if s == "on-failure" => Ok(Self::OnFailure(None)),
            Some(("on-failure", n)) => n.parse().map(|n| Self::OnFailure(Some(n))).map_err(|_| {
                format!("--restart on-failure:{n}: the count is a number of restarts")
            }),
            _ => Err(format!("--restart {s:?}: use no, on-failure[:N] or always")),
        }
    }

    /// Whether a VM that ended with `code` (none: it failed to start) and
    /// was restarted `restarts` times already starts again.
    pub fn restarts_after(self, code: Option<i32>, restarts: u32) -> bool {
        match self {
            Self::No => false,
            Self::Always => true,
            Self::OnFailure(max) => code != Some(0) && max.is_none_or(|m| restarts < m),
        }
    }
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::No => f.write_str("no"),
            Self::Always => f.write_str("always"),
            Self::OnFailure(None) => f.write_str("on-failure"),
            Self::OnFailure(Some(n)) => write!(f, "on-failure:{n}"),
        }
    }
}

// ---- the log ----

/// The file a detached VM's process writes to: one line per record,
/// `TIMESTAMP o|e TEXT` (stdout or stderr), rotated past [`LOG_CAP`].
#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
        })
    }

    fn record(&mut self, tag: u8, line: &[u8]) {
        let head = format!("{} {} ", rfc3339(std::time::SystemTime::now()), tag as char);
        let len = (head.len() + line.len() + 1) as u64;
        if self.size > 0 && self.size + len > LOG_CAP {
            let old = self.path.with_extension("1");
            if std::fs::rename(&self.path, &old).is_ok() {
                if let Ok(f) = Self::open(&self.path) {
                    *self = f;
                }
            }
        }
        let mut rec = head.into_bytes();
        rec.extend_from_slice(line);
        rec.push(b'\n');
        if self.file.write_all(&rec).is_ok() {
            self.size += len;
        }
    }
}

/// Where a detached VM's output goes once its directory exists: a `Write`
/// per stream ([`LogSink::stdout`], [`LogSink::stderr`]).
#[derive(Clone, Debug, Default)]
pub struct LogSink(Arc<Mutex<Option<LogFile>>>);

impl LogSink {
    /// Opens the log in the VM's directory `dir`.
    pub fn open(&self, dir: &Path) -> std::io::Result<()> {
        let f = LogFile::open(&dir.join(vms::LOG))?;
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(f);
        }
        Ok(())
    }

    pub fn stdout(&self) -> LogStream {
        LogStream {
            sink: self.clone(),
            tag: b'o',
            partial: Vec::new(),
        }
    }

    pub fn stderr(&self) -> LogStream {
        LogStream {
            sink: self.clone(),
            tag: b'e',
            partial: Vec::new(),
        }
    }
}

/// One stream into a [`LogSink`]: whole lines become records.
#[derive(Debug)]
pub struct LogStream {
    sink: LogSink,
    tag: u8,
    partial: Vec<u8>,
}

impl LogStream {
    fn emit(&mut self, line: &[u8]) {
        if let Ok(mut f) = self.sink.0.lock() {
            if let Some(f) = f.as_mut() {
                f.record(self.tag, line);
            }
        }
    }
}

impl Write for LogStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..i]);
            let line = std::mem::take(&mut self.partial);
            self.emit(&line);
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
        while self.partial.len() >= LINE_MAX {
            let line: Vec<u8> = self.partial.drain(..LINE_MAX).collect();
            self.emit(&line);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.emit(&line);
        }
    }
}

/// `t` as RFC 3339 in UTC with nanoseconds, as docker's `--timestamps`.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

// ---- logs ----

/// What `logs` prints.
#[derive(Clone, Debug, Default)]
pub struct LogsOptions {
    /// Keep printing new lines until the VM ends.
    pub follow: bool,
    /// Only the last N lines.
    pub tail: Option<usize>,
    /// Prefix each line with its time.
    pub timestamps: bool,
}

/// Prints `e`'s log: stdout lines to `out`, stderr lines to `err`.
pub fn logs(
    e: &Entry,
    opts: &LogsOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    let path = e.log();
    let io = |p: &Path| {
        let p = p.to_owned();
        move |x: std::io::Error| Error::RuntimeDir {
            path: p.clone(),
            why: x.to_string(),
        }
    };
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for p in [path.with_extension("1"), path.clone()] {
        match std::fs::read(&p) {
            Ok(b) => lines.extend(
                b.split(|&c| c == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec),
            ),
            Err(x) if x.kind() == std::io::ErrorKind::NotFound => {}
            Err(x) => return Err(io(&p)(x)),
        }
    }
    let skip = opts.tail.map_or(0, |n| lines.len().saturating_sub(n));
    for l in &lines[skip..] {
        print_record(l, opts.timestamps, out, err);
    }
    if !opts.follow {
        return Ok(());
    }
    // From the end of what was read: new records as they come, across a
    // rotation (the file is then new and shorter), until the VM ends.
    let mut file = std::fs::File::open(&path).ok();
    let mut pos = file
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    let mut partial = Vec::new();
    loop {
        let alive = e.supervised_now();
        if file.is_none() {
            file = std::fs::File::open(&path).ok();
            pos = 0;
        }
        if let Some(f) = file.as_mut() {
            let len = std::fs::metadata(&path).map_or(0, |m| m.len());
            if len < pos {
                // Rotated: the rest of the old file is log.1's tail, lost to a
                // follower that far behind; go on with the new one.
                file = std::fs::File::open(&path).ok();
                pos = 0;
                continue;
            }
            if f.seek(std::io::SeekFrom::Start(pos)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    pos += n as u64;
                    partial.extend_from_slice(&buf);
                    while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=i).collect();
                        print_record(&line[..line.len() - 1], opts.timestamps, out, err);
                    }
                }
            }
        }
        if !alive {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_record(rec: &[u8], timestamps: bool, out: &mut dyn Write, err: &mut dyn Write) {
    let mut parts = rec.splitn(3, |&b| b == b' ');
    let (Some(ts), Some(tag), text) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let text = text.unwrap_or_default();
    let w: &mut dyn Write = if tag == b"e" { err } else { out };
    if timestamps {
        let _ = w.write_all(ts);
        let _ = w.write_all(b" ");
    }
    let _ = w.write_all(text);
    let _ = w.write_all(b"\n");
    let _ = w.flush();
}

// ---- stop, kill, wait ----

/// Waits until `e`'s supervisor is gone (or `limit` passed, if given):
/// `true` if it is.
fn gone_within(e: &Entry, limit: Option<Duration>) -> bool {
    wait_for(limit, || !e.supervised_now())
}

/// Polls `done` until it holds (true) or `limit` passed (false).
fn wait_for(limit: Option<Duration>, mut done: impl FnMut() -> bool) -> bool {
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        if done() {
            return true;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// `kill`: `signo` to `e`'s main process.
pub fn kill(e: &Entry, signo: i32) -> Result<(), Error> {
    crate::exec::signal(e, signo)
}

/// `stop`: the image's stop signal (SIGTERM unless it names another) to the
/// main process; SIGKILL once `timeout` passed; and if the VM still has not
/// ended, its supervisor is told to stop it (SIGTERM, then SIGKILL). Returns
/// once the process ended, as docker's does: the guest powers off and the
/// supervisor ends after that ([`remove`] waits for them). A VM between two
/// runs of its restart policy (or still powering off) is ended through its
/// supervisor.
pub fn stop(e: &Entry, timeout: Duration) -> Result<(), Error> {
    // Before the look at the VM: an end recorded from here on counts.
    let since = vms::now_ms();
    // As it is now, not as it was when `e` was read.
    let e = &vms::find(&e.config.id)?;
    if !e.supervised_now() {
        return Err(Error::VmNotRunning {
            name: e.display_name().into(),
        });
    }
    // The supervisor restarts nothing a user stopped.
    let _ = std::fs::write(e.dir.join(vms::STOPPING), b"");
    if e.is_running() {
        let ended = |limit| wait_for(Some(limit), || e.ended_since(since));
        let sig = e.state.stop_signal.unwrap_or(libc::SIGTERM);
        // A process that has not started yet cannot be signalled: the VM is
        // stopped by its supervisor below.
        if crate::exec::signal(e, sig).is_ok() && ended(timeout) {
            return Ok(());
        }
        if crate::exec::signal(e, libc::SIGKILL).is_ok() && ended(KILL_GRACE) {
            return Ok(());
        }
    }
    end_supervisor(e, &[libc::SIGTERM, libc::SIGKILL])
}

/// Sends each of `signals` to `e`'s supervisor (and, with SIGKILL, to its
/// VMM: macOS has no parent-death signal) until it is gone.
fn end_supervisor(e: &Entry, signals: &[i32]) -> Result<(), Error> {
    let pid = i32::try_from(e.state.pid).unwrap_or(0);
    for &sig in signals {
        if pid > 0 {
            // SAFETY: kill takes plain integers; the pid is the supervisor's,
            // whose lock says it still runs.
            unsafe { libc::kill(pid, sig) };
        }
        if let (libc::SIGKILL, Some(vmm)) = (sig, e.state.vmm_pid) {
            if let Ok(vmm) = i32::try_from(vmm) {
                // SAFETY: as above; the VMM is the supervisor's child.
                unsafe { libc::kill(vmm, libc::SIGKILL) };
            }
        }
        if gone_within(e, Some(KILL_GRACE)) {
            return Ok(());
        }
    }
    Err(Error::Exec(format!(
        "VM {} did not stop (its supervisor is pid {pid})",
        e.display_name()
    )))
}

/// `rm`: removes an exited VM once its supervisor let go of it (a stopped
/// guest may still be powering off: this waits 30 s for that,
/// after which the supervisor is killed). A VM that runs, or that its restart
/// policy will run again, is refused.
pub fn remove(e: &Entry) -> Result<(), Error> {
    let e = &vms::find(&e.config.id)?;
    let restarts = !matches!(e.config.restart.as_str(), "" | "no");
    let stopped = e.dir.join(vms::STOPPING).exists();
    if e.is_running() || (e.supervised_now() && restarts && !stopped) {
        return Err(Error::VmRunning {
            name: e.display_name().into(),
        });
    }
    if !gone_within(e, Some(POWER_OFF_WAIT)) {
        end_supervisor(e, &[libc::SIGKILL])?;
    }
    vms::remove(e)
}

/// `wait`: blocks until `e` ended; its exit code (docker's: 255 when the
/// supervisor ended without recording one).
pub fn wait(e: &Entry) -> Result<i32, Error> {
    gone_within(e, None);
    let now = vms::find(&e.config.id)?;
    Ok(now.effective_state().exit_code.unwrap_or(255))
}

/// The VM verbs on a registry entry: the library's handle on a VM.
impl Entry {
    /// `stop` (see [`stop`]).
    pub fn stop(&self, timeout: Duration) -> Result<(), Error> {
        stop(self, timeout)
    }

    /// `kill -s SIGNO`.
    pub fn kill(&self, signo: i32) -> Result<(), Error> {
        kill(self, signo)
    }

    /// `wait`: its exit code once it ended.
    pub fn wait(&self) -> Result<i32, Error> {
        wait(self)
    }

    /// `logs` into `out` and `err`.
    pub fn logs(
        &self,
        opts: &LogsOptions,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Result<(), Error> {
        logs(self, opts, out, err)
    }

    /// `exec`: `opts.argv` in this running VM, its output into `out` and
    /// `err`; its exit code.
    pub fn exec(
        &self,
        opts: &crate::exec::ExecOptions,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Result<i32, Error> {
        crate::exec::exec(self, opts, out, err)
    }

    /// `rm` (an exited VM; see [`remove`]).
    pub fn remove(&self) -> Result<(), Error> {
        remove(self)
    }
}

// ---- run -d ----

/// The `supermachine` program that supervises detached VMs: `$SUPERMACHINE_BIN`,
/// this program if it is supermachine, a `supermachine` beside it, or the one
/// on `PATH`.
fn program() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(PROGRAM_ENV) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().ok();
    if let Some(me) = &me {
        if me.file_stem().is_some_and(|n| n == "supermachine") {
            return Ok(me.clone());
        }
        if let Some(beside) = me.parent().map(|d| d.join("supermachine")) {
            if beside.is_file() {
                return Ok(beside);
            }
        }
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("supermachine"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Usage(format!(
                "cannot find the supermachine program that runs detached VMs: \
                 put it on PATH or name it in ${PROGRAM_ENV}"
            ))
        })
}

/// Writes `opts` as the JSON document a supervisor or VMM reads on stdin.
fn send_options(child: &mut std::process::Child, opts: &crate::RunOptions) -> Result<(), Error> {
    let doc = serde_json::to_vec(opts)
        .map_err(|e| Error::Usage(format!("cannot encode the run's options: {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::Usage("the supervisor has no stdin to read its options".into()))?;
    stdin
        .write_all(&doc)
        .map_err(|e| Error::Usage(format!("cannot pass the run's options on: {e}")))
}

/// Reads the options [`start`] (or a supervisor) sent on `input` (stdin).
pub fn read_options(input: impl Read) -> Result<crate::RunOptions, Error> {
    let mut doc = Vec::new();
    input
        .take(OPTIONS_MAX + 1)
        .read_to_end(&mut doc)
        .map_err(|e| Error::Usage(format!("cannot read the run's options: {e}")))?;
    if doc.len() as u64 > OPTIONS_MAX {
        return Err(Error::Usage(format!(
            "the run's options are over {OPTIONS_MAX} bytes"
        )));
    }
    serde_json::from_slice(&doc).map_err(|e| {
        Error::Usage(format!(
            "`supermachine {SUPERVISE_COMMAND}` is run by `run -d`, with the run's options \
             on stdin; these are not them: {e}"
        ))
    })
}

/// `run -d`, and the library's way to start a detached VM: a supervisor
/// process of its own (a new session: a terminal's hangup or Ctrl-C never
/// reaches it) runs the VM as [`supervise`] says, and this returns the VM
/// once its process has started; the error that stopped it before.
/// `opts.detached` is implied; `opts.interrupt` does not reach the VM (use
/// [`Entry::stop`]).
pub fn start(opts: &crate::RunOptions) -> Result<Entry, Error> {
    use std::os::unix::process::CommandExt;
    let opts = crate::RunOptions {
        detached: true,
        ..opts.clone()
    };
    let mut cmd = std::process::Command::new(program()?);
    cmd.arg(SUPERVISE_COMMAND)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of the
    // parent: the supervisor leaves this terminal's session, so the
    // terminal's hangup and Ctrl-C never reach it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Usage(format!("cannot start the VM's supervisor: {e}")))?;
    let sent = send_options(&mut child, &opts);
    let mut errs = child.stderr.take();
    let err_text = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = errs.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let mut id = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut id);
    }
    let id = id.trim().to_string();
    if id.is_empty() {
        // It failed before the VM was registered: its error is the answer (a
        // write to a program that is not supermachine fails too: its words
        // say more than "broken pipe").
        let _ = child.wait();
        let text = err_text.join().unwrap_or_default();
        let said = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim_start_matches("supermachine: error: ").to_string());
        return Err(match (said, sent) {
            (Some(msg), _) => Error::Detach(msg),
            (None, Err(e)) => e,
            (None, Ok(())) => Error::Detach("the supervisor ended without a word".into()),
        });
    }
    // It runs on, in its own session; a thread reaps it when it ends (a
    // library's process may outlive it), whatever this returns.
    std::thread::spawn(move || child.wait());
    loop {
        let e = vms::find(&id)?;
        let s = e.effective_state();
        if s.started_ms.is_some() {
            return Ok(e);
        }
        if s.status == Status::Exited {
            // Its restart policy would try again and again: a VM that could
            // not start its process is not started.
            if e.supervised_now() {
                let _ = std::fs::write(e.dir.join(vms::STOPPING), b"");
                let _ = end_supervisor(&e, &[libc::SIGTERM, libc::SIGKILL]);
            }
            return Err(Error::Detach(s.reason.unwrap_or_else(|| {
                "the VM ended before its process started".into()
            })));
        }
        std::thread::sleep(POLL);
    }
}

/// The environment a supervisor gives the VMM process it starts for a run:
/// the VM's id, and the descriptor number of the control socket's listener.
pub const VMM_OF_ENV: &str = "SUPERMACHINE_VMM_OF";
pub const CTL_FD_ENV: &str = "SUPERMACHINE_CTL_FD";

/// `run -d`'s supervisor: registers the VM, tells the parent its id (the
/// first line on stdout), moves its own stdout and stderr to
/// `supervisor.log`, and runs the VM in a VMM process of its own (this
/// program again, [`VMM_OF_ENV`] set, the control socket's listener
/// inherited, killed if the supervisor dies) as often as `opts.restart`
/// says. The supervisor holds the VM's lock and is never sandboxed; each VMM
/// is. SIGTERM, SIGINT and SIGHUP go on to the VMM and end the restarts.
/// Returns the last run's exit code.
pub fn supervise(opts: &crate::RunOptions) -> Result<i32, Error> {
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    crate::run::check(opts)?;
    let reg = crate::run::register(opts)?;
    let own = std::fs::File::options()
        .create(true)
        .append(true)
        .open(reg.dir().join("supervisor.log"));
    println!("{}", reg.id());
    let _ = std::io::stdout().flush();
    if let Ok(f) = &own {
        for fd in [1, 2] {
            // SAFETY: dup2 onto this process's own stdout/stderr descriptors
            // of a file it just opened; no memory involved.
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
    let ended = Arc::new(AtomicBool::new(false));
    let child_pid = Arc::new(AtomicI32::new(0));
    {
        let (ended, child_pid) = (ended.clone(), child_pid.clone());
        let mut signals =
            signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
                .map_err(|e| Error::Usage(format!("cannot watch signals: {e}")))?;
        std::thread::spawn(move || {
            for sig in signals.forever() {
                ended.store(true, Ordering::SeqCst);
                let pid = child_pid.load(Ordering::SeqCst);
                if pid > 0 {
                    // SAFETY: kill takes plain integers; the pid is this
                    // process's own child.
                    unsafe { libc::kill(pid, sig) };
                }
            }
        });
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::Usage(format!("cannot find supermachine itself: {e}")))?;
    let fd = reg.listener_fd().as_raw_fd();
    let mut restarts = 0;
    let mut backoff = RESTART_BACKOFF;
    loop {
        let before = reg.reload().finished_ms;
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg(SUPERVISE_COMMAND)
            .env(VMM_OF_ENV, reg.id())
            .env(CTL_FD_ENV, fd.to_string())
            .stdin(std::process::Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls: the
        // listener (this process's descriptor) is kept open across exec, and
        // (on Linux) the VMM dies with its supervisor. macOS has no
        // parent-death signal: there a VMM whose supervisor was killed with
        // SIGKILL runs on until its VM ends.
        unsafe {
            cmd.pre_exec(move || {
                libc::fcntl(fd, libc::F_SETFD, 0);
                #[cfg(target_os = "linux")]
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let status = match cmd.spawn() {
            Ok(mut child) => {
                if let Err(e) = send_options(&mut child, opts) {
                    eprintln!("supermachine: {e}");
                }
                drop(child.stdin.take());
                child_pid.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
                if ended.load(Ordering::SeqCst) {
                    // SAFETY: as in the signal thread.
                    unsafe { libc::kill(i32::try_from(child.id()).unwrap_or(0), libc::SIGTERM) };
                }
                let st = child.wait();
                child_pid.store(0, Ordering::SeqCst);
                st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
            }
            Err(e) => format!("could not start: {e}"),
        };
        let now = reg.reload();
        let recorded = now.status == Status::Exited && now.finished_ms != before;
        if !recorded {
            reg.exited(None, Some(format!("its VMM process ended ({status})")));
        }
        let code = reg.reload().exit_code;
        if ended.load(Ordering::SeqCst)
            || reg.stop_requested()
            || !opts.restart.restarts_after(code, restarts)
        {
            // No exit code: supermachine's own failure (docker's 125).
            return Ok(code.unwrap_or(125));
        }
        restarts += 1;
        reg.update(|s| s.restarts = restarts);
        // docker's back-off: doubling from 100 ms, so a program that fails
        // at once does not spin.
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

/// The first wait before a restart, and the longest.
const RESTART_BACKOFF: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// In a VMM process a supervisor started: the VM's id and the control
/// socket's listener it passed, if this is one.
pub fn vmm_of() -> Option<Result<vms::Registration, Error>> {
    use std::os::fd::FromRawFd;
    let id = std::env::var(VMM_OF_ENV).ok()?;
    let fd: i32 = match std::env::var(CTL_FD_ENV).ok().and_then(|v| v.parse().ok()) {
        Some(fd) if fd > 2 => fd,
        _ => {
            return Some(Err(Error::Usage(format!(
                "{CTL_FD_ENV} is not a descriptor"
            ))))
        }
    };
    // SAFETY: fstat into a zeroed stat buffer this function owns.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; a bad descriptor is an error, not undefined behaviour.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Some(Err(Error::Usage(format!(
            "{CTL_FD_ENV}={fd} is not the control socket"
        ))));
    }
    // SAFETY: the supervisor passed this listening socket (checked to be a
    // socket above) for this process to own; nothing else here uses it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // Not for the VMM's own children (passt).
    // SAFETY: fcntl on the descriptor this process now owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(vms::Registration::attach(&id, listener))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies_parse_and_decide_as_dockers() {
        use RestartPolicy::*;
        assert_eq!(RestartPolicy::parse("no").unwrap(), No);
        assert_eq!(RestartPolicy::parse("always").unwrap(), Always);
        assert_eq!(RestartPolicy::parse("on-failure").unwrap(), OnFailure(None));
        let three = RestartPolicy::parse("on-failure:3").unwrap();
        assert_eq!(three, OnFailure(Some(3)));
        assert_eq!(three.to_string(), "on-failure:3");
        assert!(RestartPolicy::parse("on-failure:x").is_err());
        assert!(RestartPolicy::parse("sometimes").is_err());
        // A program that exits 1: four runs in all.
        let runs = 1
            + (0..10)
                .take_while(|&r| three.restarts_after(Some(1), r))
                .count();
        assert_eq!(runs, 4);
        assert!(!three.restarts_after(Some(0), 0));
        assert!(three.restarts_after(None, 0));
        assert!(Always.restarts_after(Some(0), 100));
        assert!(!No.restarts_after(Some(1), 0));
    }

    #[test]
    fn run_options_reach_the_supervisor_whole_and_nothing_else_is_taken() {
        let opts = crate::RunOptions {
            image: "localhost:5000/web:1".into(),
            args: vec!["sh".into(), "-c".into(), "echo 'a b'".into()],
            env: vec!["SECRET=x y".into()],
            memory: Some(256 << 20),
            publish: vec![crate::Publish::parse("127.0.0.1:0:80").unwrap()],
            restart: RestartPolicy::OnFailure(Some(3)),
            egress_allow: vec!["dns".into()],
            capture: Some(crate::Capture {
                trigger: crate::Trigger::Heartbeat(2),
                quiesce: Duration::from_millis(5),
                path: "/tmp/s.snap".into(),
                leave_running: true,
            }),
            sandbox: Some(crate::SandboxMode::Enforce),
            interrupt: Some(crate::Interrupt::new()),
            ..Default::default()
        };
        let doc = serde_json::to_vec(&opts).unwrap();
        let back = read_options(doc.as_slice()).unwrap();
        // Everything but the caller's interrupt.
        let want = crate::RunOptions {
            interrupt: None,
            ..opts
        };
        assert_eq!(format!("{back:?}"), format!("{want:?}"));
        let err = read_options(&b"not json"[..]).unwrap_err().to_string();
        assert!(err.contains("is run by `run -d`"), "{err}");
        let huge = vec![b' '; (OPTIONS_MAX + 2) as usize];
        let err = read_options(huge.as_slice()).unwrap_err().to_string();
        assert!(err.contains("over"), "{err}");
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), 15);
        assert_eq!(parse_signal("kill").unwrap(), 9);
        assert_eq!(parse_signal("10").unwrap(), 10);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = std::time::UNIX_EPOCH + Duration::new(1_780_000_000, 5);
        assert_eq!(rfc3339(t), "2026-05-28T20:26:40.000000005Z");
        assert_eq!(
            rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
    }

    #[test]
    fn the_log_keeps_lines_per_stream_and_rotates() {
        let dir = std::env::temp_dir().join(format!("sm-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sink = LogSink::default();
        sink.open(&dir).unwrap();
        let (mut o, mut e) = (sink.stdout(), sink.stderr());
        o.write_all(b"one\ntw").unwrap();
        e.write_all(b"err\n").unwrap();
        o.write_all(b"o\n").unwrap();
        drop((o, e));
        let entry = Entry {
            config: vms::VmConfig::default(),
            state: vms::VmState::default(),
            alive: false,
            dir: dir.clone(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        logs(&entry, &LogsOptions::default(), &mut out, &mut err).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo\n");
        assert_eq!(String::from_utf8(err).unwrap(), "err\n");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let tail = LogsOptions {
            tail: Some(1),
            timestamps: true,
            ..LogsOptions::default()
        };
        logs(&entry, &tail, &mut out, &mut err).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.ends_with("Z two\n") && out.len() > 30, "{out}");
        assert!(err.is_empty());
        // Past the cap, the log starts over and the old one is log.1.
        let mut o = sink.stdout();
        let line = vec![b'x'; 1000];
        for _ in 0..(LOG_CAP / 1000 + 10) {
            o.write_all(&line).unwrap();
            o.write_all(b"\n").unwrap();
        }
        let cur = std::fs::metadata(dir.join("log")).unwrap().len();
        let old = std::fs::metadata(dir.join("log.1")).unwrap().len();
        assert!(
            cur < LOG_CAP && old <= LOG_CAP && old > LOG_CAP / 2,
            "{cur} {old}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
