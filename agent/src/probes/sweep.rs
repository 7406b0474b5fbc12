//! Keeping the programs' hash maps honest. They are plain hash maps, not LRUs: a full map
//! refuses an entry and the program counts the refusal, where an LRU would evict an entry in
//! use without a word. What an LRU did for free, ageing out entries whose owner went away
//! unseen, the agent does here: entries of threads or cgroups that no longer exist are
//! swept.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, MapData, MapError},
};

/// Whether thread `tid` of process `tgid` (a `bpf_get_current_pid_tgid` key) still exists.
pub(super) fn thread_alive(pid_tgid: u64) -> bool {
    let (tgid, tid) = (pid_tgid >> 32, pid_tgid & 0xffff_ffff);
    Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
}

/// The cgroup2 root, to look cgroups up by id.
#[derive(Debug)]
pub(super) struct CgroupRoot {
    dir: File,
}

impl CgroupRoot {
    pub(super) fn open(path: &PathBuf) -> std::io::Result<Self> {
        Ok(Self {
            dir: File::open(path)?,
        })
    }

    /// Whether cgroup `id` still exists: a cgroup's id is its kernfs node id, which
    /// `open_by_handle_at` takes as a handle (FILEID_KERNFS), failing with ESTALE once the
    /// cgroup is gone. Any other failure counts as alive: never sweep what is not known gone.
    pub(super) fn alive(&self, id: u64) -> bool {
        /// `struct file_handle` with the 8 bytes of a kernfs handle.
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: u64,
        }
        const FILEID_KERNFS: i32 = 0xfe;
        let mut handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: a handle of the size it declares, valid for the call; the descriptor
        // returned, if any, is closed right away.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                self.dir.as_raw_fd(),
                &raw mut handle,
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a descriptor this function just opened.
            unsafe { libc::close(fd as i32) };
            return true;
        }
        let errno = std::io::Error::last_os_error().raw_os_error();
        !matches!(errno, Some(libc::ESTALE) | Some(libc::ENOENT))
    }
}

/// Removes the entries of `map` whose key `gone` says is gone; how many.
pub(super) fn sweep<V: Pod>(
    map: &mut HashMap<&mut MapData, u64, V>,
    gone: impl Fn(u64) -> bool,
) -> usize {
    let dead: Vec<u64> = map.keys().flatten().filter(|key| gone(*key)).collect();
    dead.iter().filter(|key| map.remove(key).is_ok()).count()
}

/// Inserts `value` under made-up keys (`key(0)`, `key(1)`, ...) until the map refuses one
/// for being full: how the self-test reaches a full map. `Ok(how many went in)`, or
/// `Err(how many)` when `limit` went in without a refusal (a map that evicts instead).
pub(crate) fn fill<V: Pod>(
    map: &mut HashMap<&mut MapData, u64, V>,
    value: V,
    key: impl Fn(u64) -> u64,
    limit: u64,
) -> Result<u64, u64> {
    for n in 0..limit {
        match map.insert(key(n), value, 0) {
            Ok(()) => {}
            Err(MapError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                return Ok(n);
            }
            Err(_) => return Err(n),
        }
    }
    Err(limit)
}
