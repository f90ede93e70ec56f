//! Dropping root after the listeners are bound: chown the mail tree's
//! working directories to the service user, chroot into the mail tree,
//! then setgroups/setgid/setuid. The SMTP-facing code never runs as root.
//!
//! Rules (checked by `check-config` too): started as root, a `user` is
//! required unless `allow_root` (tests only); `chroot = false` is the
//! explicit opt-out of the chroot.

use std::path::{Path, PathBuf};

use nix::unistd::{self, Gid, Uid, User};

use crate::config::Privileges;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("refusing to run as root: set `[privileges] user` (or `allow_root = true` for tests only)")]
    RootWithoutUser,
    #[error("unknown user {0:?} in `[privileges] user`; create it (e.g. `useradd --system {0}`)")]
    UnknownUser(String),
    #[error("failed to {what}: {cause}")]
    Sys { what: String, cause: nix::Error },
    #[error("privilege drop did not stick: the process could regain root")]
    NotDropped,
}

/// Where the process ended up.
#[derive(Debug, Clone)]
pub struct Dropped {
    /// The mail tree as the process now sees it (`/` after a chroot).
    pub data_dir: PathBuf,
    pub chrooted: bool,
    pub user: Option<String>,
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> PrivilegeError {
    let what = what.into();
    move |cause| PrivilegeError::Sys { what, cause }
}

/// Checks the rules without changing anything (for `check-config`).
pub fn check(p: &Privileges, as_root: bool) -> Result<(), PrivilegeError> {
    if as_root && !p.allow_root {
        let user = p.user.as_deref().ok_or(PrivilegeError::RootWithoutUser)?;
        User::from_name(user)
            .map_err(sys("look up the service user"))?
            .ok_or_else(|| PrivilegeError::UnknownUser(user.into()))?;
    }
    Ok(())
}

/// Drops privileges. `owned` are paths (inside `data_dir`) the service user
/// must own: the queue and mailbox directories and the SQLite files.
pub fn drop_privileges(p: &Privileges, data_dir: &Path, owned: &[PathBuf]) -> Result<Dropped, PrivilegeError> {
    let unchanged = Dropped { data_dir: data_dir.to_owned(), chrooted: false, user: None };
    if !Uid::effective().is_root() {
        tracing::info!("not started as root: no chroot, no privilege drop");
        return Ok(unchanged);
    }
    if p.allow_root {
        tracing::warn!("allow_root: running as root without chroot (tests only)");
        return Ok(unchanged);
    }
    let name = p.user.as_deref().ok_or(PrivilegeError::RootWithoutUser)?;
    let user = User::from_name(name)
        .map_err(sys("look up the service user"))?
        .ok_or_else(|| PrivilegeError::UnknownUser(name.into()))?;
    for path in owned {
        if path.exists() {
            unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(sys(format!("chown {}", path.display())))?;
        }
    }
    let chrooted = if p.chroot {
        unistd::chroot(data_dir).map_err(sys(format!("chroot into {}", data_dir.display())))?;
        unistd::chdir("/").map_err(sys("chdir / after chroot"))?;
        true
    } else {
        tracing::warn!("chroot disabled by `[privileges] chroot = false`");
        false
    };
    unistd::setgroups(&[user.gid]).map_err(sys("setgroups"))?;
    unistd::setgid(user.gid).map_err(sys("setgid"))?;
    unistd::setuid(user.uid).map_err(sys("setuid"))?;
    // Paired check: the drop must be irreversible.
    if unistd::setuid(Uid::from_raw(0)).is_ok() || unistd::setgid(Gid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::NotDropped);
    }
    assert!(!Uid::effective().is_root());
    let data_dir = if chrooted { PathBuf::from("/") } else { data_dir.to_owned() };
    Ok(Dropped { data_dir, chrooted, user: Some(name.to_string()) })
}

/// A path under the old `data_dir` as seen after the chroot.
pub fn rebase(path: &Path, old_root: &Path, dropped: &Dropped) -> Option<PathBuf> {
    if !dropped.chrooted {
        return Some(path.to_owned());
    }
    path.strip_prefix(old_root).ok().map(|rel| Path::new("/").join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebase_maps_paths_into_the_chroot() {
        let d = Dropped { data_dir: "/".into(), chrooted: true, user: None };
        assert_eq!(rebase(Path::new("/srv/mail/tls/c.pem"), Path::new("/srv/mail"), &d), Some("/tls/c.pem".into()));
        assert_eq!(rebase(Path::new("/etc/c.pem"), Path::new("/srv/mail"), &d), None);
        let d = Dropped { data_dir: "/srv/mail".into(), chrooted: false, user: None };
        assert_eq!(rebase(Path::new("/etc/c.pem"), Path::new("/srv/mail"), &d), Some("/etc/c.pem".into()));
    }

    #[test]
    fn root_needs_a_user_unless_allowed() {
        let p = Privileges { user: None, chroot: true, allow_root: false };
        assert!(matches!(check(&p, true), Err(PrivilegeError::RootWithoutUser)));
        assert!(check(&p, false).is_ok());
        let p = Privileges { user: Some("no-such-user-xyz".into()), chroot: true, allow_root: false };
        assert!(matches!(check(&p, true), Err(PrivilegeError::UnknownUser(_))));
        let p = Privileges { user: None, chroot: false, allow_root: true };
        assert!(check(&p, true).is_ok());
    }
}
