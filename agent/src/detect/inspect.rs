//! Looks at the source of a failed rename from outside the process that attempted it.
//!
//! The rename failed, so the source is still where the caller named it. It is looked up in the
//! caller's own view of the filesystem: `/proc/<pid>/root` for absolute paths (resolved with
//! `openat2(RESOLVE_IN_ROOT)`, so the container's absolute symlinks stay inside its root),
//! `/proc/<pid>/cwd` or `/proc/<pid>/fd/<n>` for relative ones. When the caller has already
//! exited (`mv` does, right after the failure), an absolute path is looked up through another
//! live process of the same cgroup: processes of one container share its mount namespace.

use std::{
    ffi::CString,
    fs::OpenOptions,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    path::Path,
};

use serde::Serialize;

use crate::events::{DirFd, PathArg};

/// What the source of a rename turned out to be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SourceKind {
    /// A symbolic link: the case the overlayfs regression breaks.
    Symlink,
    /// Something else (regular file, directory, ...), named by its `ls -l` type letter.
    Other { file_type: char },
    /// Nothing by that name.
    Missing,
    /// The source could not be looked at; `reason` says why.
    Unknown { reason: String },
}

/// Whose view of the filesystem the source was looked up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "by", content = "pid")]
pub enum Via {
    /// The process that made the call.
    Caller(u32),
    /// Another live process in the caller's cgroup (the caller had exited).
    CgroupPeer(u32),
    /// Nobody: see [`SourceKind::Unknown`].
    Nobody,
}

/// How many processes of a cgroup are tried before giving up.
const MAX_PEERS: usize = 16;

/// Looks up `source`, as process `tgid` named it. `cgroup_dir` is the caller's cgroup
/// directory, used to find a peer when the caller is gone.
pub fn inspect_source(tgid: u32, cgroup_dir: Option<&Path>, source: &PathArg) -> (SourceKind, Via) {
    if source.truncated {
        return (
            unknown("the path was longer than the probe records"),
            Via::Nobody,
        );
    }
    if source.path.is_empty() {
        return (SourceKind::Missing, Via::Caller(tgid));
    }
    match kind_in_process(tgid, source) {
        Ok(kind) => return (kind, Via::Caller(tgid)),
        Err(Lookup::ProcessGone) => {}
        Err(Lookup::Failed(err)) => {
            return (
                unknown(&format!("looking it up through /proc/{tgid} failed: {err}")),
                Via::Nobody,
            );
        }
    }
    if !source.path.starts_with('/') {
        return (
            unknown("the process exited before it could be inspected and the path is relative"),
            Via::Nobody,
        );
    }
    let Some(dir) = cgroup_dir else {
        return (
            unknown("the process exited and its cgroup is unknown"),
            Via::Nobody,
        );
    };
    for peer in cgroup_peers(dir)
        .into_iter()
        .filter(|&p| p != tgid)
        .take(MAX_PEERS)
    {
        if let Ok(kind) = kind_in_process(peer, source) {
            return (kind, Via::CgroupPeer(peer));
        }
    }
    (
        unknown("the process exited and no other process of its cgroup is alive"),
        Via::Nobody,
    )
}

fn unknown(reason: &str) -> SourceKind {
    SourceKind::Unknown {
        reason: reason.to_string(),
    }
}

enum Lookup {
    /// `/proc/<pid>` (or the part of it needed) is gone: the process exited.
    ProcessGone,
    Failed(io::Error),
}

fn kind_in_process(pid: u32, source: &PathArg) -> Result<SourceKind, Lookup> {
    let absolute = source.path.starts_with('/');
    let base = match (absolute, source.dir) {
        (true, _) => format!("/proc/{pid}/root"),
        (false, DirFd::Cwd) => format!("/proc/{pid}/cwd"),
        (false, DirFd::Fd(fd)) => format!("/proc/{pid}/fd/{fd}"),
    };
    let base = open_path(Path::new(&base)).map_err(|err| match err.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => Lookup::ProcessGone,
        _ => Lookup::Failed(err),
    })?;
    let path = CString::new(source.path.trim_start_matches('/'))
        .map_err(|_| Lookup::Failed(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let stat = if absolute {
        stat_in_root(&base, &path)
    } else {
        stat_at(&base, &path)
    };
    match stat {
        Ok(mode) => Ok(kind_of(mode)),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(SourceKind::Missing),
        Err(err) => Err(Lookup::Failed(err)),
    }
}

fn open_path(path: &Path) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(file.into())
}

/// `lstat` of `path` resolved inside the root directory `root` (RESOLVE_IN_ROOT).
fn stat_in_root(root: &OwnedFd, path: &CString) -> io::Result<libc::mode_t> {
    // SAFETY: open_how is plain integers; all-zero is valid (and required for unused fields).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `root` is an open fd, `path` a NUL-terminated string and `how` a valid open_how
    // whose size is passed alongside; the kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    stat_at(&fd, c"")
}

/// `fstatat(dir, path, AT_SYMLINK_NOFOLLOW)`; an empty `path` stats `dir` itself.
fn stat_at(dir: &OwnedFd, path: &std::ffi::CStr) -> io::Result<libc::mode_t> {
    // SAFETY: all-zero is a valid `stat` value; the kernel overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if path.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: `dir` is open, `path` NUL-terminated, `st` writable for the call.
    let rc = unsafe { libc::fstatat(dir.as_raw_fd(), path.as_ptr(), &mut st, flags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_mode)
}

fn kind_of(mode: libc::mode_t) -> SourceKind {
    let file_type = match mode & libc::S_IFMT {
        libc::S_IFLNK => return SourceKind::Symlink,
        libc::S_IFREG => '-',
        libc::S_IFDIR => 'd',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '?',
    };
    SourceKind::Other { file_type }
}

fn cgroup_peers(cgroup_dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup_dir.join("cgroup.procs"))
        .map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(path: &str, dir: DirFd) -> PathArg {
        PathArg {
            path: path.to_string(),
            truncated: false,
            dir,
        }
    }

    #[test]
    fn looks_through_the_callers_root_cwd_and_fds() {
        let tmp = std::env::temp_dir().join(format!("imgstream-inspect-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::os::unix::fs::symlink("/nowhere", tmp.join("link")).unwrap();
        std::fs::write(tmp.join("file"), b"x").unwrap();
        let me = std::process::id();
        let abs = |name: &str| arg(tmp.join(name).to_str().unwrap(), DirFd::Cwd);

        assert_eq!(
            inspect_source(me, None, &abs("link")),
            (SourceKind::Symlink, Via::Caller(me))
        );
        assert_eq!(
            inspect_source(me, None, &abs("file")).0,
            SourceKind::Other { file_type: '-' }
        );
        assert_eq!(
            inspect_source(me, None, &abs("absent")).0,
            SourceKind::Missing
        );

        let dir = std::fs::File::open(&tmp).unwrap();
        let by_fd = arg("link", DirFd::Fd(dir.as_raw_fd()));
        assert_eq!(inspect_source(me, None, &by_fd).0, SourceKind::Symlink);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn exited_callers_and_truncated_paths_are_unknown() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let (kind, via) = inspect_source(gone, None, &arg("relative", DirFd::Cwd));
        assert!(matches!(kind, SourceKind::Unknown { .. }), "{kind:?}");
        assert_eq!(via, Via::Nobody);
        let cut = PathArg {
            path: "/x".into(),
            truncated: true,
            dir: DirFd::Cwd,
        };
        assert!(matches!(
            inspect_source(1, None, &cut).0,
            SourceKind::Unknown { .. }
        ));
    }
}
