//! Pure decisions of guest-init, tested on any host: the container environment
//! (docker's defaults) and exit statuses. The kernel command-line options are
//! `agent_protocol::cmdline`'s, which the host writes with the same code.

#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

use agent_protocol::ExitStatus;

/// docker's default `PATH` when the image sets none (moby `oci/defaults.go`).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Status of a failure of guest-init itself in container mode (docker run's
/// "error of the daemon" code), so it is distinguishable from the container's.
pub const STATUS_CONTAINER_INIT_FAILED: u32 = 125;
/// The command exists but could not be executed (docker: 126).
pub const STATUS_CANNOT_EXECUTE: u32 = 126;
/// The command was not found (docker: 127).
pub const STATUS_NOT_FOUND: u32 = 127;

/// The container's environment, as docker builds it: `HOSTNAME` first, then
/// the spec's `KEY=VALUE` entries (a later entry replaces an earlier one with
/// the same key; entries without `=` are dropped), then `PATH`, `HOME` and, on
/// a TTY, `TERM=xterm` where the spec did not set them.
pub fn container_env(spec_env: &[String], hostname: &str, home: &str, tty: bool) -> Vec<String> {
    let mut env: Vec<String> = vec![format!("HOSTNAME={hostname}")];
    for entry in spec_env {
        let Some((key, _)) = entry.split_once('=') else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        if let Some(slot) = env
            .iter_mut()
            .find(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
        {
            slot.clone_from(entry);
        } else {
            env.push(entry.clone());
        }
    }
    let has = |env: &[String], key: &str| {
        env.iter()
            .any(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
    };
    if !has(&env, "PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={home}"));
    }
    if tty && !has(&env, "TERM") {
        env.push("TERM=xterm".to_owned());
    }
    env
}

/// Decodes a `waitpid(2)` status word (Linux layout, `<bits/waitstatus.h>`:
/// low 7 bits the terminating signal, 0 for a normal exit with the code in
/// bits 8-15). `None` for stopped/continued reports.
pub fn decode_wait_status(raw: i32) -> Option<ExitStatus> {
    let sig = raw & 0x7f;
    if sig == 0 {
        Some(ExitStatus::Code((raw >> 8) & 0xff))
    } else if sig != 0x7f && (raw & 0xffff) != 0xffff {
        Some(ExitStatus::Signaled(sig))
    } else {
        None
    }
}

/// The status docker reports when the command could not be started:
/// 127 when it does not exist, 126 otherwise (permission, bad format).
pub fn spawn_failure_status(kind: std::io::ErrorKind) -> u32 {
    if kind == std::io::ErrorKind::NotFound {
        STATUS_NOT_FOUND
    } else {
        STATUS_CANNOT_EXECUTE
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn container_env_empty_gets_docker_defaults() {
        assert_eq!(
            container_env(&[], "box", "/root", false),
            vec![
                "HOSTNAME=box".to_owned(),
                format!("PATH={DEFAULT_PATH}"),
                "HOME=/root".to_owned()
            ]
        );
    }

    #[test]
    fn container_env_spec_values_win_and_later_entries_replace() {
        let spec: Vec<String> = ["PATH=/opt/bin", "A=1", "HOME=/h", "A=2", "NOEQ", "=x", "B="]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            container_env(&spec, "box", "/root", true),
            vec![
                "HOSTNAME=box",
                "PATH=/opt/bin",
                "A=2",
                "HOME=/h",
                "B=",
                "TERM=xterm"
            ]
        );
    }

    #[test]
    fn container_env_hostname_overridable() {
        let env = container_env(&["HOSTNAME=mine".into()], "box", "/", false);
        assert_eq!(env[0], "HOSTNAME=mine");
        assert_eq!(env.iter().filter(|e| e.starts_with("HOSTNAME=")).count(), 1);
    }

    #[test]
    fn decode_wait_status_exit_and_signal() {
        assert_eq!(decode_wait_status(0), Some(ExitStatus::Code(0)));
        assert_eq!(decode_wait_status(42 << 8), Some(ExitStatus::Code(42)));
        assert_eq!(decode_wait_status(9), Some(ExitStatus::Signaled(9)));
        // SIGSEGV with the core-dump bit (0x80).
        assert_eq!(
            decode_wait_status(0x80 | 11),
            Some(ExitStatus::Signaled(11))
        );
        // Stopped by SIGSTOP (0x137f) and continued (0xffff).
        assert_eq!(decode_wait_status(0x137f), None);
        assert_eq!(decode_wait_status(0xffff), None);
        assert_eq!(
            decode_wait_status(15).map(ExitStatus::docker_code),
            Some(143)
        );
    }

    #[test]
    fn spawn_failure_status_follows_docker() {
        assert_eq!(spawn_failure_status(std::io::ErrorKind::NotFound), 127);
        assert_eq!(
            spawn_failure_status(std::io::ErrorKind::PermissionDenied),
            126
        );
    }
}
