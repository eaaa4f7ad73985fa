//! Resolving docker's `User` string (`name`, `uid`, `name:group`, `uid:gid`, ...)
//! through the image's own `/etc/passwd` and `/etc/group`, with runc's rules
//! (libcontainer/user `GetExecUser`): a numeric uid or gid absent from the files
//! is used as is, a name absent from them is an error, supplementary groups are
//! the `/etc/group` entries listing the user (or just the explicit group).
//!
//! Pure functions over file contents, so they are tested on any host. The files
//! come from the image and are hostile: malformed lines are skipped.

#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

/// The resolved identity of the container process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (for `setgroups(2)`).
    pub groups: Vec<u32>,
    /// Home directory for `HOME` (`/` when the user has no passwd entry).
    pub home: String,
}

/// Why a `User` string could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserError {
    /// A user name with no `/etc/passwd` entry.
    NoSuchUser(String),
    /// A group name with no `/etc/group` entry.
    NoSuchGroup(String),
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSuchUser(n) => write!(
                f,
                "unable to find user {n}: no matching entries in the image's /etc/passwd"
            ),
            Self::NoSuchGroup(n) => write!(
                f,
                "unable to find group {n}: no matching entries in the image's /etc/group"
            ),
        }
    }
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let uid = f.next()?.trim().parse().ok()?;
        let gid = f.next()?.trim().parse().ok()?;
        let _gecos = f.next();
        let home = f.next().unwrap_or("");
        (!name.is_empty()).then_some(PasswdEntry {
            name,
            uid,
            gid,
            home,
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let gid = f.next()?.trim().parse().ok()?;
        let members = f.next().unwrap_or("");
        (!name.is_empty()).then_some(GroupEntry { name, gid, members })
    })
}

/// Resolves `spec` (docker's `User`; `""` is root) against the image's
/// `/etc/passwd` and `/etc/group` contents (empty when the file is missing).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<ExecUser, UserError> {
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_arg = if user_arg.is_empty() { "0" } else { user_arg };

    // A numeric argument is a uid even if a user happens to be named "1000".
    let entry = match user_arg.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user_arg)
                .ok_or_else(|| UserError::NoSuchUser(user_arg.to_owned()))?,
        ),
    };
    let (uid, mut gid, name, home) = match (&entry, user_arg.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name), e.home),
        (None, Ok(uid)) => (uid, 0, None, "/"),
        (None, Err(_)) => return Err(UserError::NoSuchUser(user_arg.to_owned())),
    };

    let groups = match group_arg.filter(|g| !g.is_empty()) {
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => {
                    group_entries(group)
                        .find(|e| e.name == g)
                        .ok_or_else(|| UserError::NoSuchGroup(g.to_owned()))?
                        .gid
                }
            };
            vec![gid]
        }
        None => match name {
            Some(name) => {
                let mut v: Vec<u32> = group_entries(group)
                    .filter(|e| e.members.split(',').any(|m| m.trim() == name))
                    .map(|e| e.gid)
                    .collect();
                v.dedup();
                v
            }
            None => Vec::new(),
        },
    };
    let home = if home.is_empty() { "/" } else { home };
    Ok(ExecUser {
        uid,
        gid,
        groups,
        home: home.to_owned(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line without fields\n\
        bad:x:notanumber:0::/:/bin/sh\n\
        app:x:1000:1000:App,,,:/home/app:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        nohome:x:1234:1234\n";
    const GROUP: &str = "root:x:0:\n\
        wheel:x:10:root,app\n\
        audio:x:29:app\n\
        app:x:1000:\n\
        staff:x:50:\n\
        nogroup:x:65534:\n";

    fn ids(u: &ExecUser) -> (u32, u32, Vec<u32>, &str) {
        (u.uid, u.gid, u.groups.clone(), u.home.as_str())
    }

    #[test]
    fn resolve_empty_is_root_with_member_groups() {
        let u = resolve("", PASSWD, GROUP).unwrap();
        assert_eq!(ids(&u), (0, 0, vec![10], "/root"));
    }

    #[test]
    fn resolve_name_uses_passwd_and_member_groups() {
        let u = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!(ids(&u), (1000, 1000, vec![10, 29], "/home/app"));
    }

    #[test]
    fn resolve_numeric_uid_in_passwd_gets_its_entry() {
        let u = resolve("65534", PASSWD, GROUP).unwrap();
        assert_eq!(ids(&u), (65534, 65534, vec![], "/nonexistent"));
    }

    #[test]
    fn resolve_numeric_uid_absent_gets_gid_zero_home_root() {
        let u = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!(ids(&u), (4242, 0, vec![], "/"));
    }

    #[test]
    fn resolve_uid_gid_numeric_used_as_given() {
        let u = resolve("4242:77", "", "").unwrap();
        assert_eq!(ids(&u), (4242, 77, vec![77], "/"));
    }

    #[test]
    fn resolve_name_group_uses_group_file() {
        let u = resolve("app:staff", PASSWD, GROUP).unwrap();
        assert_eq!(ids(&u), (1000, 50, vec![50], "/home/app"));
        let u = resolve("1000:audio", PASSWD, GROUP).unwrap();
        assert_eq!(ids(&u), (1000, 29, vec![29], "/home/app"));
    }

    #[test]
    fn resolve_unknown_names_rejected() {
        assert_eq!(
            resolve("ghost", PASSWD, GROUP),
            Err(UserError::NoSuchUser("ghost".into()))
        );
        assert_eq!(
            resolve("app:ghosts", PASSWD, GROUP),
            Err(UserError::NoSuchGroup("ghosts".into()))
        );
        // Without an /etc/passwd only numeric users work.
        assert_eq!(
            resolve("root", "", ""),
            Err(UserError::NoSuchUser("root".into()))
        );
        assert_eq!(ids(&resolve("", "", "").unwrap()), (0, 0, vec![], "/"));
    }

    #[test]
    fn resolve_malformed_lines_skipped_and_short_entry_home_defaults() {
        assert_eq!(
            resolve("bad", PASSWD, GROUP),
            Err(UserError::NoSuchUser("bad".into()))
        );
        let u = resolve("nohome", PASSWD, GROUP).unwrap();
        assert_eq!(ids(&u), (1234, 1234, vec![], "/"));
    }

    #[test]
    fn resolve_empty_group_part_means_default_group() {
        let u = resolve("app:", PASSWD, GROUP).unwrap();
        assert_eq!(ids(&u), (1000, 1000, vec![10, 29], "/home/app"));
    }
}
