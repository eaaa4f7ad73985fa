//! VMs as containers: every `run` registers its VM in the user's runtime
//! directory ([`runtime_dir`]), so `ps` lists it, `exec`, `stop` and `kill`
//! reach it through its control socket, and a detached one (`run -d`) is
//! managed until `rm`.
//!
//! ```text
//! RUNTIME/registry.lock   flock: name claims, removals and clean-ups, one at a time
//! RUNTIME/names/NAME      symlink -> the VM's id
//! RUNTIME/vms/ID/lock     flock held by the VM's supervisor (the `run` process) for its life
//!                config.json  what was run (written once)
//!                state.json   created / running / exited, pid, times, exit code (rewritten atomically)
//!                ctl.sock     the control socket (exec, signals)
//!                log, log.1   a detached VM's output (see `logs`)
//! ```
//!
//! State is honest without a daemon: a VM is running only while its lock is
//! held, so a supervisor killed with SIGKILL (or a reboot) shows as exited,
//! whatever its state file last said. A foreground run's entry goes away at
//! the first registry operation after its end (`docker run --rm`); a detached
//! one stays until `rm`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::Error;

/// Names the runtime directory, overriding `$XDG_RUNTIME_DIR/supermachine`
/// (or `/tmp/supermachine-UID`).
pub const RUNTIME_DIR_ENV: &str = "SUPERMACHINE_RUNTIME_DIR";

/// The longest name: a socket path must fit `sun_path` (108 bytes) with room
/// for the directory.
const MAX_NAME: usize = 64;
/// An id's length in hex, and the short form `ps` shows.
const ID_LEN: usize = 64;
pub const SHORT_ID: usize = 12;

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

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::RuntimeDir {
        path: path.to_owned(),
        why: e.to_string(),
    }
}

/// Creates `dir` with mode 0700 if it is missing.
fn private_dir(dir: &Path) -> Result<(), Error> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
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
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| bad(e.to_string()))?;
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
    private_dir(&dir.join("vms"))?;
    private_dir(&dir.join("names"))?;
    Ok(dir)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What was run: written once, when the VM is registered.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmConfig {
    /// 64 hex digits.
    pub id: String,
    /// `--name`, if given.
    pub name: Option<String>,
    /// The image reference (or the snapshot path of `--restore`).
    pub image: String,
    /// The command line the user gave after the image (empty: the image's).
    pub command: Vec<String>,
    /// The published ports, as given.
    pub ports: Vec<String>,
    /// `run -d`: the entry stays until `rm`.
    pub detached: bool,
    /// `--restart` (`no`, `on-failure[:N]`, `always`).
    #[serde(default)]
    pub restart: String,
    /// When it was registered (ms since the epoch).
    pub created_ms: u64,
}

/// Where a VM is in its life, as its supervisor last recorded it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Registered, not yet running its process.
    #[default]
    Created,
    /// Its process runs.
    Running,
    /// It ended (see the exit code and reason).
    Exited,
}

/// The supervisor's record, rewritten at every change.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmState {
    pub status: Status,
    /// The supervisor's pid.
    pub pid: u32,
    /// When the process last started (ms since the epoch).
    pub started_ms: Option<u64>,
    /// When it last ended.
    pub finished_ms: Option<u64>,
    /// Restarts the `--restart` policy made.
    #[serde(default)]
    pub restarts: u32,
    /// Its docker exit code, once it ended.
    pub exit_code: Option<i32>,
    /// Why it ended, when that was not the process's own exit.
    pub reason: Option<String>,
    /// The image's StopSignal (`stop` sends it; SIGTERM when none).
    pub stop_signal: Option<i32>,
    /// A detached VM's current VMM process (its supervisor's child).
    #[serde(default)]
    pub vmm_pid: Option<u32>,
    /// The published ports as bound (`-P`'s and port 0's free ports
    /// included), once the VMM bound them.
    #[serde(default)]
    pub ports: Vec<String>,
    /// The egress rules in force (`run`'s, or what `update` set since).
    #[serde(default)]
    pub egress_allow: Vec<String>,
    #[serde(default)]
    pub egress_deny: Vec<String>,
    /// The egress filter's counters, as of the guest's last heartbeat.
    #[serde(default)]
    pub egress_denied: u64,
    #[serde(default)]
    pub egress_passed: u64,
}

/// A VM as `ps` and `inspect` see it.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub config: VmConfig,
    pub state: VmState,
    /// Its supervisor holds its lock: the VM exists.
    pub alive: bool,
    /// Its directory (state, log, control socket).
    pub dir: PathBuf,
}

impl Entry {
    /// Running as far as anyone can tell: recorded so and supervised.
    pub fn is_running(&self) -> bool {
        self.alive && self.state.status != Status::Exited
    }

    /// Whether its supervisor holds its lock now (a fresh look at this one
    /// VM, not the registry: for the commands that wait on it). A removed VM
    /// has none.
    pub fn supervised_now(&self) -> bool {
        self.dir.join(CONFIG).exists() && held(&self.dir)
    }

    /// Whether its process ended at or after `since_ms` (ms since the
    /// epoch), or its supervisor is gone: a fresh look at this one VM's
    /// state. The VMM records the end as soon as the guest reports it, before
    /// the guest has powered off.
    pub fn ended_since(&self, since_ms: u64) -> bool {
        if !self.supervised_now() {
            return true;
        }
        read_json::<VmState>(&self.dir.join(STATE)).is_some_and(|s| {
            s.status == Status::Exited && s.finished_ms.is_some_and(|f| f >= since_ms)
        })
    }

    /// Its published ports: as bound once they are, else as given.
    pub fn ports(&self) -> &[String] {
        if self.state.ports.is_empty() {
            &self.config.ports
        } else {
            &self.state.ports
        }
    }

    /// The short id.
    pub fn short_id(&self) -> &str {
        self.config.id.get(..SHORT_ID).unwrap_or(&self.config.id)
    }

    /// The name, or the short id for a VM without one.
    pub fn display_name(&self) -> &str {
        self.config.name.as_deref().unwrap_or(self.short_id())
    }

    /// The state as it really is: a supervisor gone without recording the
    /// end shows as exited, with that reason.
    pub fn effective_state(&self) -> VmState {
        let mut s = self.state.clone();
        if !self.alive && s.status != Status::Exited {
            s.status = Status::Exited;
            s.reason = Some("its supervisor ended without recording the VM's end (killed?)".into());
        }
        s
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(CTL_SOCK)
    }

    /// The output log of a detached VM.
    pub fn log(&self) -> PathBuf {
        self.dir.join(LOG)
    }
}

const CONFIG: &str = "config.json";
const STATE: &str = "state.json";
const LOCK: &str = "lock";
const CTL_SOCK: &str = "ctl.sock";
/// A detached VM's output and its rotated predecessor.
pub const LOG: &str = "log";
/// Left by `stop`: the supervisor restarts nothing a user stopped.
pub const STOPPING: &str = "stopping";

/// The registry lock, held while names are claimed and entries removed.
struct RegistryLock {
    _file: std::fs::File,
}

impl RegistryLock {
    fn take(root: &Path) -> Result<Self, Error> {
        let path = root.join("registry.lock");
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a file this process just opened; no memory.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(&path)(std::io::Error::last_os_error()));
        }
        Ok(Self { _file: f })
    }
}

/// Whether someone holds `dir`'s lock (its supervisor). A directory without
/// a lock file is being created: held.
fn held(dir: &Path) -> bool {
    let Ok(f) = std::fs::File::open(dir.join(LOCK)) else {
        return !dir.join(CONFIG).exists();
    };
    // SAFETY: flock on a file this function opened; no memory.
    let free = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    !free
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes `value` to `path` atomically (a temporary beside it, renamed).
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|e| Error::RuntimeDir {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    let mut f = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(&text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_entry(dir: &Path) -> Option<Entry> {
    let config: VmConfig = read_json(&dir.join(CONFIG))?;
    let state: VmState = read_json(&dir.join(STATE)).unwrap_or_default();
    Some(Entry {
        alive: held(dir),
        config,
        state,
        dir: dir.to_owned(),
    })
}

fn random_id() -> Result<String, Error> {
    let mut b = [0u8; ID_LEN / 2];
    getrandom::fill(&mut b).map_err(|e| Error::Usage(format!("no randomness for a VM id: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Removes `e`'s directory and its name (under the registry lock).
fn remove_entry(root: &Path, e: &Entry) {
    if let Some(name) = &e.config.name {
        let link = root.join("names").join(name);
        if std::fs::read_link(&link).is_ok_and(|t| t == Path::new(&e.config.id)) {
            let _ = std::fs::remove_file(&link);
        }
    }
    let _ = std::fs::remove_dir_all(&e.dir);
}

/// Every registered VM, oldest first. Foreground runs that ended are
/// cleaned up on the way (their entries are `--rm`'s).
pub fn list() -> Result<Vec<Entry>, Error> {
    let root = runtime_dir()?;
    let _lock = RegistryLock::take(&root)?;
    Ok(list_locked(&root))
}

fn list_locked(root: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(root.join("vms")) else {
        return out;
    };
    for d in dirs.flatten() {
        let Some(e) = read_entry(&d.path()) else {
            continue;
        };
        if !e.alive && !e.config.detached {
            remove_entry(root, &e);
            continue;
        }
        out.push(e);
    }
    out.sort_by_key(|e| e.config.created_ms);
    out
}

/// The VM `query` names: a name, or a unique prefix of an id.
pub fn find(query: &str) -> Result<Entry, Error> {
    let root = runtime_dir()?;
    let _lock = RegistryLock::take(&root)?;
    find_locked(&root, query)
}

fn find_locked(root: &Path, query: &str) -> Result<Entry, Error> {
    let all = list_locked(root);
    if let Some(e) = all.iter().find(|e| e.config.name.as_deref() == Some(query)) {
        return Ok(e.clone());
    }
    let hex = !query.is_empty() && query.chars().all(|c| c.is_ascii_hexdigit());
    let matches: Vec<&Entry> = all
        .iter()
        .filter(|e| hex && e.config.id.starts_with(&query.to_ascii_lowercase()))
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::NoSuchVm { name: query.into() }),
        many => Err(Error::AmbiguousVm {
            query: query.into(),
            count: many.len(),
        }),
    }
}

/// Removes `e` (an exited VM, or any with `force` once it was stopped).
pub fn remove(e: &Entry) -> Result<(), Error> {
    let root = runtime_dir()?;
    let _lock = RegistryLock::take(&root)?;
    if let Some(now) = read_entry(&e.dir) {
        if now.is_running() {
            return Err(Error::VmRunning {
                name: e.display_name().into(),
            });
        }
        remove_entry(&root, &now);
    }
    Ok(())
}

/// This process's VM in the registry: its directory and lock (held while
/// this lives), its name and its bound control socket. A detached VM's
/// supervisor owns it; the VMM process it starts for each run attaches to it
/// ([`Registration::attach`]).
#[derive(Debug)]
pub struct Registration {
    config: VmConfig,
    dir: PathBuf,
    socket: PathBuf,
    listener: UnixListener,
    state: std::sync::Mutex<VmState>,
    /// The exit code the guest agent reported for this run's process, once it
    /// did (a later failure of the VMM keeps it: [`Registration::failed`]).
    reported: std::sync::Mutex<Option<i32>>,
    /// Held (flock) for as long as this value lives; `None` in a VMM
    /// attached to its supervisor's registration.
    _lock: Option<std::fs::File>,
}

impl Registration {
    /// Registers a VM: refused if `config.name` is taken by another VM
    /// (running, or a detached one not yet removed).
    pub fn create(mut config: VmConfig) -> Result<Self, Error> {
        if let Some(n) = &config.name {
            validate_name(n)?;
        }
        let root = runtime_dir()?;
        let _registry = RegistryLock::take(&root)?;
        config.id = random_id()?;
        config.created_ms = now_ms();
        let dir = root.join("vms").join(&config.id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let made = (|| {
            let lock_path = dir.join(LOCK);
            let lock = std::fs::File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&lock_path)
                .map_err(io_err(&lock_path))?;
            // SAFETY: flock on a file this process just created; no memory.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(io_err(&lock_path)(std::io::Error::last_os_error()));
            }
            let state = VmState {
                pid: std::process::id(),
                ..VmState::default()
            };
            write_json(&dir.join(STATE), &state)?;
            write_json(&dir.join(CONFIG), &config)?;
            if let Some(name) = &config.name {
                claim_name(&root, name, &config.id)?;
            }
            let socket = dir.join(CTL_SOCK);
            let listener = UnixListener::bind(&socket).map_err(io_err(&socket))?;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err(&socket))?;
            Ok(Self {
                config: config.clone(),
                dir: dir.clone(),
                socket,
                listener,
                state: std::sync::Mutex::new(state),
                reported: std::sync::Mutex::new(None),
                _lock: Some(lock),
            })
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }

    /// The registration of VM `id`, whose supervisor (the parent of this
    /// process) holds its lock and passed its control socket's listener as
    /// `listener`: a VMM run for it. The state carries on from what the
    /// supervisor recorded (egress rules, restarts).
    pub fn attach(id: &str, listener: UnixListener) -> Result<Self, Error> {
        let root = runtime_dir()?;
        let dir = root.join("vms").join(id);
        let bad = |why: &str| Error::RuntimeDir {
            path: dir.clone(),
            why: why.into(),
        };
        let config: VmConfig =
            read_json(&dir.join(CONFIG)).ok_or_else(|| bad("no readable config.json"))?;
        let mut state: VmState = read_json(&dir.join(STATE)).unwrap_or_default();
        state.vmm_pid = Some(std::process::id());
        Ok(Self {
            config,
            socket: dir.join(CTL_SOCK),
            dir,
            listener,
            state: std::sync::Mutex::new(state),
            reported: std::sync::Mutex::new(None),
            _lock: None,
        })
    }

    /// The control socket's listener, for a VMM process this one starts.
    pub fn listener_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    /// The state as last recorded (by this process or, for a supervisor,
    /// by the VMM it ran).
    pub fn reload(&self) -> VmState {
        let now: VmState = read_json(&self.dir.join(STATE)).unwrap_or_default();
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *s = now.clone();
        now
    }

    /// Whether `stop` asked for this VM's end (no restart then).
    pub fn stop_requested(&self) -> bool {
        self.dir.join(STOPPING).exists()
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The name, or the short id.
    pub fn display_name(&self) -> &str {
        self.config
            .name
            .as_deref()
            .unwrap_or(&self.config.id[..SHORT_ID])
    }

    /// The VM's directory (the sandbox keeps it writable: state, socket, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub(crate) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Records a change of state (best effort: a failed write leaves the
    /// last one, and the lock still tells whether the VM runs).
    pub fn update(&self, f: impl FnOnce(&mut VmState)) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s);
        if let Err(e) = write_json(&self.dir.join(STATE), &*s) {
            tracing::warn!("cannot record the VM's state: {e}");
        }
    }

    /// The egress rules in force: (allow, deny).
    pub fn egress_rules(&self) -> (Vec<String>, Vec<String>) {
        let s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (s.egress_allow.clone(), s.egress_deny.clone())
    }

    /// The process started.
    pub fn running(&self) {
        self.update(|s| {
            s.status = Status::Running;
            s.started_ms = Some(now_ms());
            s.exit_code = None;
            s.reason = None;
        });
    }

    /// The guest agent reported the process's exit code: recorded now, before
    /// the guest has powered off, so `stop` and `ps` see the end at once.
    pub fn reported(&self, code: i32) {
        *self
            .reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(code);
        self.exited(Some(code), None);
    }

    /// The run failed (`reason`); an exit code the agent reported before stays
    /// (a VMM that fails while the guest powers off ended a process that had
    /// exited on its own).
    pub fn failed(&self, reason: String) {
        let code = *self
            .reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.exited(code, Some(reason));
    }

    /// The VM ended with docker exit code `code` (or none, with `reason`).
    pub fn exited(&self, code: Option<i32>, reason: Option<String>) {
        self.update(|s| {
            s.status = Status::Exited;
            s.finished_ms = Some(now_ms());
            s.exit_code = code;
            s.reason = reason;
        });
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Nobody may connect to a VM that is gone. The rest stays for `ps -a`
        // (a detached VM) or the next registry operation's clean-up. A VMM
        // attached to its supervisor's registration leaves the socket to it
        // (the next run serves it).
        if self._lock.is_some() {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// Points `names/NAME` at `id`, unless another VM holds it. A name whose VM
/// is gone, or ended in the foreground, is free again. Under the registry lock.
fn claim_name(root: &Path, name: &str, id: &str) -> Result<(), Error> {
    let link = root.join("names").join(name);
    for _ in 0..3 {
        match std::os::unix::fs::symlink(id, &link) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&link)(e)),
        }
        let owner = std::fs::read_link(&link)
            .ok()
            .and_then(|t| read_entry(&root.join("vms").join(t)));
        match owner {
            Some(e) if e.alive || e.config.detached => {
                return Err(Error::NameInUse { name: name.into() })
            }
            Some(e) => remove_entry(root, &e),
            None => {
                let _ = std::fs::remove_file(&link);
            }
        }
    }
    Err(Error::NameInUse { name: name.into() })
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

    fn config(name: Option<&str>, detached: bool) -> VmConfig {
        VmConfig {
            name: name.map(str::to_string),
            image: "busybox".into(),
            detached,
            ..VmConfig::default()
        }
    }

    /// One test owns the variable (the others of this crate never set it).
    #[test]
    fn the_registry_names_lists_resolves_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("sm-vms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::env::set_var(RUNTIME_DIR_ENV, &dir);

        let web = Registration::create(config(Some("web"), false)).unwrap();
        assert!(web.socket().exists());
        let e = Registration::create(config(Some("web"), true)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a VM named web already exists (choose another --name, or rm it)"
        );
        web.running();
        let found = find("web").unwrap();
        assert!(found.is_running());
        assert_eq!(found.config.id, web.id());
        assert_eq!(find(&web.id()[..5]).unwrap().config.id, web.id());
        assert_eq!(find("nope").unwrap_err().to_string(), "no VM named nope");

        // A detached VM stays after its end until removed; its name too.
        let bg = Registration::create(config(Some("bg"), true)).unwrap();
        let bg_id = bg.id().to_string();
        bg.exited(Some(3), None);
        let e = find("bg").unwrap();
        assert!(e.supervised_now());
        drop(bg);
        assert!(!e.supervised_now());
        let e = find("bg").unwrap();
        assert!(!e.is_running());
        assert_eq!(e.effective_state().exit_code, Some(3));
        assert!(Registration::create(config(Some("bg"), false)).is_err());
        remove(&e).unwrap();
        assert!(!dir.join("vms").join(&bg_id).exists());
        assert!(!e.supervised_now(), "a removed VM has no supervisor");
        drop(Registration::create(config(Some("bg"), false)).unwrap());

        // A running VM is not removed; once its run ended (the lock is free)
        // a foreground entry is cleaned up by the next listing.
        let id = web.id().to_string();
        let running = find("web").unwrap();
        assert!(remove(&running).is_err(), "a running VM is not removed");
        drop(web);
        assert!(list().unwrap().iter().all(|e| e.config.id != id));
        assert!(!dir.join("vms").join(&id).exists());
        assert!(!dir.join("names/web").exists());

        // A detached VM whose supervisor died with it still "running".
        let dead = Registration::create(config(Some("dead"), true)).unwrap();
        dead.running();
        drop(dead);
        let e = find("dead").unwrap();
        assert!(!e.is_running());
        assert!(e
            .effective_state()
            .reason
            .unwrap()
            .contains("supervisor ended"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_supervisor_gone_without_a_word_shows_as_exited() {
        let e = Entry {
            config: config(None, true),
            state: VmState {
                status: Status::Running,
                ..VmState::default()
            },
            alive: false,
            dir: PathBuf::new(),
        };
        assert!(!e.is_running());
        let s = e.effective_state();
        assert_eq!(s.status, Status::Exited);
        assert!(s.reason.unwrap().contains("supervisor ended"));
    }
}
