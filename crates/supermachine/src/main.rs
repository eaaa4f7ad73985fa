//! The `supermachine` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};

/// Exit code for supermachine's own failures (docker run uses 125 likewise), so they
/// are told apart from the guest's exit status.
const EXIT_INTERNAL: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "supermachine",
    version,
    about = "Run OCI images as hardware-isolated microVMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One value, parsed once per process: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel with supermachine's guest init; prints the guest console and
    /// exits with the guest's exit status.
    Boot {
        /// Kernel image (bzImage, or ELF with a PVH entry). Default: Debian's cloud
        /// kernel, provisioned on first use ($SUPERMACHINE_KERNEL overrides).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initramfs. Default: supermachine's own for a Linux kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// Guest memory, e.g. 512M or 1G.
        #[arg(long, value_parser = parse_memory)]
        memory: Option<u64>,
        /// Number of vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Attach a disk image as virtio-blk: PATH or PATH,ro (repeatable; the first
        /// is the guest's /dev/vda).
        #[arg(long = "disk", value_parser = parse_disk, value_name = "PATH[,ro]")]
        disks: Vec<supermachine::DiskSpec>,
        /// Network: none, passt (user-mode, rootless), passt:host-loopback (the
        /// gateway address reaches the host's 127.0.0.1), or tap:NAME[,ip=ADDR/PREFIX][,gw=ADDR][,dns=ADDR].
        #[arg(long, default_value = "none", value_name = "MODE")]
        network: String,
        /// Add a virtio-vsock device with this guest context id (3 or more).
        #[arg(long, value_name = "CID")]
        vsock_cid: Option<u64>,
        /// Host UNIX socket of the vsock device (adds one with CID 3 unless
        /// --vsock-cid says otherwise): connect and send `CONNECT <port>\n` to reach
        /// a guest port; guest connections to host port P go to PATH_P.
        #[arg(long, value_name = "PATH")]
        vsock_uds: Option<PathBuf>,
        /// Capture the VM to a snapshot file (--snapshot-out) this many
        /// milliseconds after the guest starts; the VM then ends (exit 0)
        /// unless --leave-running.
        #[arg(long, value_name = "MS", requires = "snapshot_out")]
        snapshot_after_ms: Option<u64>,
        /// Where --snapshot-after-ms writes the snapshot (atomically).
        #[arg(long, value_name = "PATH", requires = "snapshot_after_ms")]
        snapshot_out: Option<PathBuf>,
        /// Keep the VM running after --snapshot-after-ms captured it.
        #[arg(long, requires = "snapshot_out")]
        leave_running: bool,
        /// Restore the VM in this snapshot file instead of booting a kernel: its
        /// memory, devices and disks are the captured VM's.
        #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "cpus", "disks", "vsock_cid", "vsock_uds", "snapshot_after_ms"])]
        restore: Option<PathBuf>,
        /// Run the VMM without its sandbox (seccomp filters, landlock, rlimits):
        /// for debugging only. SUPERMACHINE_SANDBOX=off does the same; =log lets
        /// refused calls through and has the kernel log them.
        #[arg(long)]
        no_sandbox: bool,
    },
    /// Print the path of the guest kernel (provisioning it and building its
    /// initramfs on first use).
    Kernel,
    /// Run an image's process in a new microVM, as `docker run` does; exits with
    /// its status (125 for supermachine's own errors).
    Run {
        /// Accepted for docker compatibility: a foreground VM is removed when
        /// it ends.
        #[arg(long)]
        rm: bool,
        /// Run in the background: print the VM's id once its process has
        /// started; `ps`, `logs`, `stop`, `rm` manage it.
        #[arg(short = 'd', long, conflicts_with_all = ["interactive", "tty", "restore"])]
        detach: bool,
        /// With -d: run the VM again when its process ends: no, on-failure[:N]
        /// (after a non-zero exit, at most N times) or always (but after a
        /// `stop`).
        #[arg(long, value_parser = parse_restart, default_value = "no", requires = "detach")]
        restart: supermachine::manage::RestartPolicy,
        /// Let the guest reach only what such rules allow (repeatable):
        /// CIDR[:PORT[-PORT]], [IPV6-CIDR]:PORT, or dns (the resolver the VM
        /// is given). Enforced by the VMM on every frame: a denied TCP
        /// connection is reset, a UDP datagram or ping answered unreachable.
        #[arg(long = "egress-allow", value_name = "RULE")]
        egress_allow: Vec<String>,
        /// Never let the guest reach what such a rule matches (repeatable;
        /// wins over --egress-allow).
        #[arg(long = "egress-deny", value_name = "RULE")]
        egress_deny: Vec<String>,
        #[command(flatten)]
        process: ProcessArgs,
        /// Replace the image's entrypoint.
        #[arg(long)]
        entrypoint: Option<String>,
        /// Number of vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Guest memory, e.g. 512M or 1G.
        #[arg(long, value_parser = parse_memory)]
        memory: Option<u64>,
        /// Verify TLS certificates of registries not on loopback.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        tls_verify: bool,
        /// Show the guest kernel's console on stderr, with every kernel message.
        #[arg(long)]
        console: bool,
        /// Guest kernel (default: the provisioned one).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Attach a disk image as virtio-blk: PATH or PATH,ro (repeatable). The image's
        /// own root filesystem is /dev/vda, so the first of these is /dev/vdb.
        #[arg(long = "disk", value_parser = parse_disk, value_name = "PATH[,ro]")]
        disks: Vec<supermachine::DiskSpec>,
        /// Network: passt (user-mode, rootless; the host's own loopback services
        /// stay out of reach unless passt:host-loopback), none (loopback only), or
        /// tap:NAME[,ip=ADDR/PREFIX][,gw=ADDR][,dns=ADDR].
        #[arg(long, default_value = "passt", value_name = "MODE")]
        network: String,
        /// Host UNIX socket of the VM's vsock device at this path (default: none):
        /// connect and send `CONNECT <port>\n` to reach a guest port; guest
        /// connections to host port P go to PATH_P.
        #[arg(long, value_name = "PATH")]
        vsock_uds: Option<PathBuf>,
        /// Publish a guest TCP port on the host (repeatable):
        /// [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/tls] listens on HOST_IP (default
        /// 127.0.0.1, only this host; 0.0.0.0 for every interface; host port 0
        /// takes a free one, printed), unix:PATH:GUEST_PORT on a UNIX socket.
        /// Carried over vsock: no TAP, no root, any --network.
        #[arg(short = 'p', long = "publish", value_parser = parse_publish, value_name = "SPEC")]
        publish: Vec<supermachine::Publish>,
        /// Publish every TCP port the image exposes (ExposedPorts) on a free
        /// port of 127.0.0.1, each printed on stderr.
        #[arg(short = 'P', long = "publish-all", conflicts_with = "restore")]
        publish_all: bool,
        /// How long the guest may take to boot and answer on its agent channel
        /// before the VM is stopped and the run fails (default 600).
        #[arg(long, value_name = "SECONDS")]
        agent_timeout: Option<u64>,
        /// Run the VMM without its sandbox (seccomp filters, landlock, rlimits):
        /// for debugging only. SUPERMACHINE_SANDBOX=off does the same; =log lets
        /// refused calls through and has the kernel log them.
        #[arg(long)]
        no_sandbox: bool,
        /// Boot, and capture nothing: without it, a run restores the snapshot
        /// the first run of the same VM configuration captured once its guest
        /// was ready (`supermachine snapshots` lists them).
        #[arg(long)]
        no_snapshot: bool,
        /// Capture the VM mid-process to this snapshot file (atomically) when
        /// its trigger fires (--snapshot-after-ms, --snapshot-at-heartbeat or
        /// --snapshot-on-listen); the run then ends (exit 0) unless
        /// --leave-running. `run --restore PATH` carries the process on.
        #[arg(long, value_name = "PATH", conflicts_with = "no_snapshot")]
        snapshot_out: Option<PathBuf>,
        /// Trigger: this many milliseconds after the process started.
        #[arg(long, value_name = "MS", requires = "snapshot_out", group = "trigger")]
        snapshot_after_ms: Option<u64>,
        /// Trigger: the guest agent's Nth heartbeat (one a second while the
        /// process runs).
        #[arg(long, value_name = "N", requires = "snapshot_out", group = "trigger")]
        snapshot_at_heartbeat: Option<u64>,
        /// Trigger: when the process first listens on a TCP port.
        #[arg(long, requires = "snapshot_out", group = "trigger")]
        snapshot_on_listen: bool,
        /// Wait this long after the trigger before the capture (default 0).
        #[arg(long, value_name = "MS", requires = "snapshot_out")]
        snapshot_quiesce_ms: Option<u64>,
        /// Keep the VM and its process running after the capture.
        #[arg(long, requires = "snapshot_out")]
        leave_running: bool,
        /// Restore a VM captured mid-process (--snapshot-out) and carry its
        /// process on: its output from the capture on and its exit status are
        /// this run's. No image is named; the VM is the snapshot's.
        #[arg(long, value_name = "PATH", conflicts_with_all = ["snapshot_out", "image", "cpus", "memory", "kernel", "disks", "env", "workdir", "user", "entrypoint"])]
        restore: Option<PathBuf>,
        /// Terminate TLS on the published ports with this PEM certificate
        /// chain (server certificate first): the ports published with /tls,
        /// or every TCP one when none is; the guest port gets plaintext.
        #[arg(long, value_name = "CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's PEM private key (PKCS#8, PKCS#1 or SEC1).
        #[arg(long, value_name = "KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Keep stdin open and send it to the process.
        #[arg(short = 'i', long, conflicts_with = "restore")]
        interactive: bool,
        /// Run the process on a terminal (a pty in the guest; with -i the
        /// host terminal is in raw mode until it ends).
        #[arg(short = 't', long, conflicts_with = "restore")]
        tty: bool,
        /// Name the VM, so that `exec NAME CMD`, `stop NAME`... reach it
        /// (letters, digits, '_', '.', '-'; one VM per name until it is
        /// removed).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// The image.
        #[arg(required_unless_present = "restore")]
        image: Option<String>,
        /// Command and arguments (replace the image's Cmd).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command in a running VM's container, as `docker exec` does: the
    /// main process's root, env, working directory and user unless given;
    /// exits with the command's status.
    Exec {
        /// Keep stdin open and send it to the command.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Give the command a terminal (a pty in the guest; with -i the host
        /// terminal is in raw mode until it ends).
        #[arg(short = 't', long)]
        tty: bool,
        #[command(flatten)]
        process: ProcessArgs,
        /// The VM: its name or a unique prefix of its id.
        name: String,
        /// Command and arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// List VMs: the running ones, or every one with -a.
    Ps {
        /// Also the VMs that ended (detached ones stay until `rm`).
        #[arg(short = 'a', long)]
        all: bool,
        /// Only the ids.
        #[arg(short = 'q', long)]
        quiet: bool,
        /// `json`: one JSON object per VM and line.
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
    },
    /// Print a detached VM's output: its stdout on stdout, its stderr on stderr.
    Logs {
        /// Keep printing new output until the VM ends.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<usize>,
        /// Prefix each line with the time it was written (RFC 3339, UTC).
        #[arg(short = 't', long)]
        timestamps: bool,
        /// The VM: its name or a unique prefix of its id.
        vm: String,
    },
    /// Stop VMs: the image's stop signal (SIGTERM unless it names another) to
    /// the process, SIGKILL after the timeout, then the VM powers off.
    Stop {
        /// Seconds to wait before SIGKILL.
        #[arg(short = 't', long, default_value_t = 10)]
        time: u64,
        /// The VMs.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Send a signal to VMs' processes.
    Kill {
        /// The signal: a name (SIGTERM, TERM) or a number.
        #[arg(short = 's', long, default_value = "SIGKILL")]
        signal: String,
        /// The VMs.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Remove VMs that ended (with -f, stop running ones first).
    Rm {
        /// Stop a running VM (SIGKILL) and remove it.
        #[arg(short = 'f', long)]
        force: bool,
        /// The VMs.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Print what is known about VMs as JSON: config, state, ports, pid, log.
    Inspect {
        /// The VMs.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Change a running VM's egress policy (new connections follow it; the
    /// ones it allowed before carry on). No rule: everything allowed again.
    Update {
        /// As run's --egress-allow (the whole new list).
        #[arg(long = "egress-allow", value_name = "RULE")]
        egress_allow: Vec<String>,
        /// As run's --egress-deny (the whole new list).
        #[arg(long = "egress-deny", value_name = "RULE")]
        egress_deny: Vec<String>,
        /// The VMs.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Wait until VMs end; prints each one's exit code.
    Wait {
        /// The VMs.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// A detached VM's supervisor, or one of its VMMs: started by `run -d`,
    /// which sends the run's options on stdin. Not for typing.
    #[command(hide = true)]
    Supervise,
    /// Pull an image into the store and build its root filesystem.
    Pull {
        /// Verify TLS certificates of registries not on loopback.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        tls_verify: bool,
        /// The image.
        image: String,
    },
    /// List the images in the store.
    Images,
    /// Remove images from the store (blobs no other image uses are deleted, and
    /// the image's root filesystem and snapshots once no image names it).
    Rmi {
        /// The images.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// List the snapshots `run` restores (one per image and VM configuration),
    /// with their sizes; `prune` removes them all.
    Snapshots {
        #[command(subcommand)]
        action: Option<SnapshotsAction>,
    },
}

/// What `run` and `exec` say about their process, as docker's flags do.
#[derive(clap::Args, Debug)]
struct ProcessArgs {
    /// Set an environment variable (KEY=VALUE), repeatable.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User: name, uid, name:group or uid:gid.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
}

#[derive(Subcommand, Debug)]
enum SnapshotsAction {
    /// List them (the default).
    Ls,
    /// Remove every snapshot (the next run of each configuration boots and
    /// captures again).
    Prune,
}

/// `supermachine snapshots [ls|prune]`.
fn snapshots(action: Option<SnapshotsAction>) -> ExitCode {
    use supermachine::snapshots;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    match action.unwrap_or(SnapshotsAction::Ls) {
        SnapshotsAction::Ls => {
            let list = match snapshots::list() {
                Ok(l) => l,
                Err(e) => return fail(&e),
            };
            // Each image's references, by digest.
            let names: Vec<(String, String)> = supermachine::run::store()
                .and_then(|s| Ok(s.list()?))
                .map(|l| {
                    l.into_iter()
                        .map(|r| (r.manifest_digest.to_string(), r.reference))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "{:<40} {:<14} {:<34} {:>10} {:>10}",
                "IMAGE", "DIGEST", "KEY", "ON DISK", "RAM"
            );
            for e in list {
                let image = names
                    .iter()
                    .filter(|(d, _)| *d == e.digest)
                    .map(|(_, r)| r.as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                let short = e
                    .digest
                    .trim_start_matches("sha256:")
                    .get(..12)
                    .unwrap_or("");
                println!(
                    "{:<40} {:<14} {:<34} {:>9.1}M {:>9.1}M",
                    if image.is_empty() { "<none>" } else { &image },
                    short,
                    e.key,
                    mib(e.allocated),
                    mib(e.len)
                );
            }
            ExitCode::SUCCESS
        }
        SnapshotsAction::Prune => match snapshots::prune() {
            Ok(removed) => {
                let bytes: u64 = removed.iter().map(|e| e.allocated).sum();
                println!(
                    "Removed {} snapshot(s), {:.1} MiB",
                    removed.len(),
                    mib(bytes)
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}

/// An [`supermachine::Interrupt`] triggered by SIGINT, SIGTERM or SIGHUP: the
/// run's VM stops and the command exits 128 + the signal, as a shell reports a
/// process the signal ended. Without a handler the signal would kill the
/// process before the VM (and passt) are cleaned up.
fn interrupt_on_signals() -> Option<supermachine::Interrupt> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let interrupt = supermachine::Interrupt::new();
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("supermachine: warning: signals will not stop the VM cleanly: {e}");
            return None;
        }
    };
    let for_thread = interrupt.clone();
    let spawned = std::thread::Builder::new()
        .name("sm-signals".into())
        .spawn(move || {
            // This thread exists before the VMM's sandbox does; it confines
            // itself (the sandbox is planned), so no thread is left out.
            if let Err(e) = supermachine::sandbox::confine_helper_thread() {
                tracing::warn!("the signal thread is not sandboxed: {e}");
            }
            for signal in signals.forever() {
                for_thread.trigger(signal);
            }
        });
    if let Err(e) = spawned {
        eprintln!("supermachine: warning: signals will not stop the VM cleanly: {e}");
        return None;
    }
    Some(interrupt)
}

/// The exit code of `boot`: the guest's status, or the failure's.
fn boot_exit(r: Result<supermachine::RunOutcome, supermachine::Error>) -> ExitCode {
    match r {
        Ok(outcome) => {
            if outcome.exit != supermachine::GuestExit::PowerOff {
                eprintln!("supermachine: guest ended with {:?}", outcome.exit);
            }
            ExitCode::from(outcome.exit_code() as u8)
        }
        Err(e) => exit_for(&e),
    }
}

/// The sandbox the VMM enters: on unless `--no-sandbox` or
/// `SUPERMACHINE_SANDBOX=off`; `SUPERMACHINE_SANDBOX=log` only logs refused
/// calls. None where the platform has no sandbox.
fn sandbox_mode(no_sandbox: bool) -> Option<supermachine::SandboxMode> {
    use supermachine::SandboxMode;
    if !supermachine::sandbox::SUPPORTED {
        tracing::debug!("this platform has no VMM sandbox");
        return None;
    }
    if no_sandbox {
        return None;
    }
    let mode = match std::env::var("SUPERMACHINE_SANDBOX").as_deref() {
        Ok("off") => return None,
        Ok("log") => SandboxMode::Log,
        Ok("" | "on" | "enforce") | Err(_) => SandboxMode::Enforce,
        Ok(other) => {
            eprintln!(
                "supermachine: warning: SUPERMACHINE_SANDBOX={other} is not off, log or on; the sandbox is on"
            );
            SandboxMode::Enforce
        }
    };
    // Before any thread starts: helper threads confine themselves.
    supermachine::sandbox::plan(mode);
    Some(mode)
}

/// The exit code of a failed command: 128 + the signal that stopped it, else
/// supermachine's own 125 (with the error printed).
fn exit_for(e: &supermachine::Error) -> ExitCode {
    if let supermachine::Error::Interrupted { signal } = e {
        return ExitCode::from(u8::try_from(128 + signal).unwrap_or(EXIT_INTERNAL));
    }
    fail(e)
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("supermachine: error: {}", supermachine::error_chain(e));
    ExitCode::from(EXIT_INTERNAL)
}

/// Exit code of the VM verbs' own failures (docker's CLI uses 1 for a
/// container it cannot find or act on).
const EXIT_VERB: u8 = 1;

fn fail_verb(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("supermachine: error: {}", supermachine::error_chain(e));
    ExitCode::from(EXIT_VERB)
}

/// Runs `f` on each VM named in `queries`, printing what it returns (a line
/// per VM, as docker's verbs print names); errors are printed as they come
/// and the exit code is 1 if any failed.
fn each_vm(
    queries: &[String],
    f: impl Fn(&supermachine::vms::Entry) -> Result<String, supermachine::Error>,
) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for q in queries {
        match supermachine::vms::find(q).and_then(|e| f(&e)) {
            Ok(line) => println!("{line}"),
            Err(e) => code = fail_verb(&e),
        }
    }
    code
}

/// How long ago `ms` (since the epoch) was, as docker says it.
fn ago(ms: u64) -> String {
    let s = supermachine::vms::now_ms().saturating_sub(ms) / 1000;
    match s {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        2..=59 => format!("{s} seconds"),
        60..=119 => "About a minute".into(),
        120..=3599 => format!("{} minutes", s / 60),
        3600..=7199 => "About an hour".into(),
        7200..=172_799 => format!("{} hours", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

/// `ps`'s STATUS column.
fn status_text(e: &supermachine::vms::Entry) -> String {
    use supermachine::vms::Status;
    let s = e.effective_state();
    match s.status {
        Status::Created => "Created".into(),
        Status::Running => format!("Up {}", ago(s.started_ms.unwrap_or(e.config.created_ms))),
        Status::Exited => {
            let when = ago(s.finished_ms.unwrap_or(e.config.created_ms));
            match s.exit_code {
                Some(c) => format!("Exited ({c}) {when} ago"),
                None => format!(
                    "Exited ({}) {when} ago",
                    s.reason.as_deref().unwrap_or("no exit code")
                ),
            }
        }
    }
}

/// `inspect`'s JSON for one VM.
fn inspect_json(e: &supermachine::vms::Entry) -> serde_json::Value {
    let s = e.effective_state();
    let time = |ms: Option<u64>| {
        ms.map(|ms| {
            supermachine::manage::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
        })
    };
    serde_json::json!({
        "Id": e.config.id,
        "Name": e.config.name,
        "Image": e.config.image,
        "Command": e.config.command,
        "Created": time(Some(e.config.created_ms)),
        "Detached": e.config.detached,
        "Ports": e.ports(),
        "State": {
            "Status": s.status,
            "Running": e.is_running(),
            "Pid": s.pid,
            "ExitCode": s.exit_code,
            "Error": s.reason,
            "StartedAt": time(s.started_ms),
            "FinishedAt": time(s.finished_ms),
            "StopSignal": s.stop_signal,
        },
        "Egress": {
            "Allow": s.egress_allow,
            "Deny": s.egress_deny,
            "Denied": s.egress_denied,
            "Passed": s.egress_passed,
        },
        "LogPath": e.log(),
        "Dir": e.dir,
    })
}

/// `supermachine ps`.
fn ps(all: bool, quiet: bool, format: Option<&str>) -> ExitCode {
    let list = match supermachine::vms::list() {
        Ok(l) => l,
        Err(e) => return fail_verb(&e),
    };
    let shown = list.iter().filter(|e| all || e.is_running());
    match format {
        Some("json") => {
            for e in shown {
                println!("{}", inspect_json(e));
            }
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            return fail_verb(&supermachine::Error::Usage(format!(
                "unknown --format {other:?} (json)"
            )))
        }
        None => {}
    }
    if quiet {
        for e in shown {
            println!("{}", e.short_id());
        }
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<14} {:<24} {:<22} {:<16} {:<28} {:<24} NAMES",
        "VM ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS"
    );
    for e in shown {
        let mut cmd = e.config.command.join(" ");
        if cmd.len() > 20 {
            cmd.truncate(17);
            cmd.push_str("...");
        }
        println!(
            "{:<14} {:<24} {:<22} {:<16} {:<28} {:<24} {}",
            e.short_id(),
            e.config.image,
            format!("\"{cmd}\""),
            format!("{} ago", ago(e.config.created_ms)),
            status_text(e),
            e.ports().join(", "),
            e.config.name.as_deref().unwrap_or("")
        );
    }
    ExitCode::SUCCESS
}

/// A command line clap refused: one line and 125, as every other supermachine
/// failure (docker run also exits 125 on a bad flag). Help and version requests
/// print as clap renders them.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    eprintln!("supermachine: error: {}", clap_message(&e.to_string()));
    ExitCode::from(EXIT_INTERNAL)
}

/// clap's message without its `error:` tag, usage and hints: the lines before
/// the first blank one, joined.
fn clap_message(rendered: &str) -> String {
    let head: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = head.join(" ");
    msg.strip_prefix("error: ").unwrap_or(&msg).to_string()
}

fn parse_disk(s: &str) -> Result<supermachine::DiskSpec, String> {
    supermachine::DiskSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_restart(s: &str) -> Result<supermachine::manage::RestartPolicy, String> {
    supermachine::manage::RestartPolicy::parse(s)
}

fn parse_publish(s: &str) -> Result<supermachine::Publish, String> {
    supermachine::Publish::parse(s)
}

fn parse_memory(s: &str) -> Result<u64, String> {
    supermachine::parse_size(s).map_err(|e| e.to_string())
}

/// Sends the library's log events to stderr: warnings and errors by default;
/// `SUPERMACHINE_LOG` (or `RUST_LOG`) takes `LEVEL` or `TARGET=LEVEL,...`
/// (e.g. `warn,passt=debug`). A value that does not parse is reported once and the
/// default kept.
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let spec = std::env::var("SUPERMACHINE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok();
    let mut bad = None;
    let filter = match spec.as_deref().map(str::parse::<Targets>) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            bad = Some(e);
            Targets::new().with_default(LevelFilter::WARN)
        }
        None => Targets::new().with_default(LevelFilter::WARN),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(true);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .init();
    if let Some(e) = bad {
        eprintln!("supermachine: warning: ignoring SUPERMACHINE_LOG/RUST_LOG: {e}");
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    match cli.command {
        Command::Boot {
            kernel,
            initrd,
            cmdline,
            memory,
            cpus,
            disks,
            network,
            vsock_cid,
            vsock_uds,
            snapshot_after_ms,
            snapshot_out,
            leave_running,
            restore,
            no_sandbox,
        } => {
            let sandbox = sandbox_mode(no_sandbox);
            if let Some(path) = restore {
                let timings = Arc::new(supermachine::Timings::start_at(start));
                let interrupt = interrupt_on_signals();
                return boot_exit(supermachine::restore_with_console(
                    &path,
                    sandbox,
                    Box::new(std::io::stdout()),
                    timings,
                    interrupt.as_ref(),
                ));
            }
            let network = match supermachine::NetSpec::parse(&network) {
                Ok(n) => n,
                Err(e) => return fail(&e),
            };
            let vsock =
                (vsock_cid.is_some() || vsock_uds.is_some()).then(|| supermachine::VsockSpec {
                    cid: vsock_cid.unwrap_or(supermachine::DEFAULT_GUEST_CID),
                    uds_path: vsock_uds,
                });
            let cfg = supermachine::BootConfig {
                kernel,
                initrd,
                cmdline,
                memory,
                cpus,
                disks,
                network,
                vsock,
                sandbox,
                capture: snapshot_out.map(|path| supermachine::Capture {
                    trigger: supermachine::Trigger::After(std::time::Duration::from_millis(
                        snapshot_after_ms.unwrap_or(0),
                    )),
                    quiesce: std::time::Duration::ZERO,
                    path,
                    leave_running,
                }),
            };
            let timings = Arc::new(supermachine::Timings::start_at(start));
            let interrupt = interrupt_on_signals();
            let captured_and_ended = cfg.capture.as_ref().filter(|c| !c.leave_running).cloned();
            let r = supermachine::boot_with_console(
                &cfg,
                Box::new(std::io::stdout()),
                timings,
                interrupt.as_ref(),
            );
            match (r, captured_and_ended) {
                // Ended by its capture (in `boot` nothing else stops a VM
                // without an error): that is success.
                (Ok(o), Some(c)) if o.exit == supermachine::GuestExit::Stopped => {
                    eprintln!("supermachine: VM captured to {}", c.path.display());
                    ExitCode::SUCCESS
                }
                (r, _) => boot_exit(r),
            }
        }
        Command::Run {
            rm: _,
            detach,
            restart,
            egress_allow,
            egress_deny,
            process: ProcessArgs { env, workdir, user },
            entrypoint,
            cpus,
            memory,
            tls_verify,
            console,
            kernel,
            disks,
            network,
            vsock_uds,
            publish,
            publish_all,
            agent_timeout,
            no_sandbox,
            no_snapshot,
            snapshot_out,
            snapshot_after_ms,
            snapshot_at_heartbeat,
            snapshot_on_listen,
            snapshot_quiesce_ms,
            leave_running,
            restore,
            tls_cert,
            tls_key,
            interactive,
            tty,
            name,
            image,
            args,
        } => {
            use supermachine::Trigger;
            let sandbox = sandbox_mode(no_sandbox);
            let ms = std::time::Duration::from_millis;
            let trigger = match (snapshot_after_ms, snapshot_at_heartbeat, snapshot_on_listen) {
                (_, Some(n), _) => Trigger::Heartbeat(n),
                (_, None, true) => Trigger::Listen,
                (after, None, false) => Trigger::After(ms(after.unwrap_or(0))),
            };
            let capture = snapshot_out.map(|path| supermachine::Capture {
                trigger,
                quiesce: ms(snapshot_quiesce_ms.unwrap_or(0)),
                path,
                leave_running,
            });
            let network = match supermachine::NetSpec::parse(&network) {
                Ok(n) => n,
                Err(e) => return fail(&e),
            };
            let opts = supermachine::RunOptions {
                image: image.unwrap_or_default(),
                args,
                entrypoint,
                env,
                workdir,
                user,
                cpus,
                memory,
                tls_verify,
                console,
                kernel,
                disks,
                network,
                vsock_uds,
                agent_timeout: agent_timeout.map(std::time::Duration::from_secs),
                // `run -d` returns at once; its VM stops on `stop`, not on
                // this terminal's Ctrl-C.
                interrupt: if detach { None } else { interrupt_on_signals() },
                sandbox,
                no_snapshot,
                capture,
                restore,
                publish,
                publish_all,
                name,
                tls: tls_cert.zip(tls_key),
                interactive,
                tty,
                detached: detach,
                restart,
                egress_allow,
                egress_deny,
            };
            if detach {
                return match supermachine::manage::start(&opts) {
                    Ok(e) => {
                        println!("{}", e.config.id);
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                };
            }
            let timings = Arc::new(supermachine::Timings::start_at(start));
            let r = supermachine::run::run(
                &opts,
                Box::new(std::io::stdout()),
                Box::new(std::io::stderr()),
                timings,
            );
            match r {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => exit_for(&e),
            }
        }
        Command::Ps { all, quiet, format } => ps(all, quiet, format.as_deref()),
        Command::Logs {
            follow,
            tail,
            timestamps,
            vm,
        } => {
            let opts = supermachine::manage::LogsOptions {
                follow,
                tail,
                timestamps,
            };
            let r = supermachine::vms::find(&vm).and_then(|e| {
                supermachine::manage::logs(
                    &e,
                    &opts,
                    &mut std::io::stdout(),
                    &mut std::io::stderr(),
                )
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail_verb(&e),
            }
        }
        Command::Stop { time, vms } => each_vm(&vms, |e| {
            supermachine::manage::stop(e, std::time::Duration::from_secs(time))
                .map(|()| e.display_name().to_string())
        }),
        Command::Kill { signal, vms } => match supermachine::manage::parse_signal(&signal) {
            Ok(n) => each_vm(&vms, |e| {
                supermachine::manage::kill(e, n).map(|()| e.display_name().to_string())
            }),
            Err(e) => fail_verb(&e),
        },
        Command::Rm { force, vms } => each_vm(&vms, |e| {
            // -f: a running VM (or one its restart policy would run again) is
            // stopped first; without, `remove` refuses it.
            if force && e.supervised_now() {
                match supermachine::manage::stop(e, std::time::Duration::ZERO) {
                    Ok(()) | Err(supermachine::Error::VmNotRunning { .. }) => {}
                    Err(err) => return Err(err),
                }
            }
            supermachine::manage::remove(e).map(|()| e.display_name().to_string())
        }),
        Command::Inspect { vms } => {
            let mut out = Vec::new();
            let mut code = ExitCode::SUCCESS;
            for q in &vms {
                match supermachine::vms::find(q) {
                    Ok(e) => out.push(inspect_json(&e)),
                    Err(e) => code = fail_verb(&e),
                }
            }
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            code
        }
        Command::Update {
            egress_allow,
            egress_deny,
            vms,
        } => {
            if let Err(e) = supermachine::egress::check(&egress_allow, &egress_deny) {
                return fail_verb(&e);
            }
            each_vm(&vms, |e| {
                supermachine::exec::egress(e, &egress_allow, &egress_deny)
                    .map(|()| e.display_name().to_string())
            })
        }
        Command::Wait { vms } => each_vm(&vms, |e| {
            supermachine::manage::wait(e).map(|c| c.to_string())
        }),
        Command::Supervise => {
            let timings = Arc::new(supermachine::Timings::start_at(start));
            let r =
                supermachine::manage::read_options(std::io::stdin().lock()).and_then(|mut opts| {
                    match supermachine::manage::vmm_of() {
                        // One run of a detached VM, in the VMM its supervisor started.
                        Some(reg) => reg.and_then(|reg| {
                            opts.interrupt = interrupt_on_signals();
                            let log = supermachine::manage::LogSink::default();
                            if let Err(e) = log.open(reg.dir()) {
                                eprintln!("supermachine: warning: cannot open the VM's log: {e}");
                            }
                            supermachine::run::run_for_supervisor(
                                &opts,
                                reg,
                                (Box::new(log.stdout()), Box::new(log.stderr())),
                                timings,
                            )
                        }),
                        None => supermachine::manage::supervise(&opts),
                    }
                });
            match r {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => exit_for(&e),
            }
        }
        Command::Exec {
            interactive,
            tty,
            process: ProcessArgs { env, workdir, user },
            name,
            command,
        } => {
            let opts = supermachine::exec::ExecOptions {
                argv: command,
                env,
                workdir,
                user,
                interactive,
                tty,
            };
            let r = supermachine::vms::find(&name).and_then(|vm| {
                supermachine::exec::exec(&vm, &opts, &mut std::io::stdout(), &mut std::io::stderr())
            });
            match r {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => fail(&e),
            }
        }
        Command::Pull { tls_verify, image } => match supermachine::run::pull(&image, tls_verify) {
            Ok(p) => {
                println!("{} {}", p.reference, p.digest);
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Images => match supermachine::run::store().and_then(|s| Ok(s.list()?)) {
            Ok(list) => {
                println!("{:<60} {:<20} {:>10}", "REFERENCE", "DIGEST", "SIZE");
                for r in list {
                    let size: u64 = r.layers.iter().map(|l| l.size).sum();
                    let d = r.manifest_digest.to_string();
                    let short = d.trim_start_matches("sha256:").get(..12).unwrap_or("");
                    println!("{:<60} {:<20} {:>9}K", r.reference, short, size / 1024);
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Rmi { images } => {
            let store = match supermachine::run::store() {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            for i in images {
                let key = match image::reference::ImageReference::parse(&i) {
                    Ok(r) => image::source::record_key(&r),
                    Err(e) => return fail(&e),
                };
                let digest = store
                    .image(&key)
                    .ok()
                    .map(|r| r.manifest_digest.to_string());
                match store.remove(&key) {
                    Ok(_) => println!("Untagged: {key}"),
                    Err(e) => return fail(&e),
                }
                // The converted root filesystem goes too once no image names it.
                if let Some(d) = digest {
                    let still_used = store
                        .list()
                        .map(|l| l.iter().any(|r| r.manifest_digest.to_string() == d))
                        .unwrap_or(true);
                    if !still_used {
                        if let Ok(p) = supermachine::run::rootfs_path(&d) {
                            let _ = std::fs::remove_file(p);
                        }
                        if let Err(e) = supermachine::snapshots::remove_image(&d) {
                            return fail(&e);
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Command::Snapshots { action } => snapshots(action),
        Command::Kernel => match supermachine::cache()
            .and_then(|c| Ok((guest_assets::kernel::provision(&c)?, c)))
        {
            Ok((k, cache)) => {
                // Build the initramfs for it too, so a later boot (or a copy of the
                // cache carried elsewhere, without the module tree) has it ready.
                if let Err(e) = guest_assets::initramfs::ensure(&cache, &k) {
                    return fail(&e);
                }
                println!("{}", k.kernel.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("supermachine: error: {}", supermachine::error_chain(&e));
                ExitCode::from(EXIT_INTERNAL)
            }
        },
    }
}
