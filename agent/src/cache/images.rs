//! Which images use which chunks, for eviction: the least recently used images that are not
//! mounted give their chunks back when the cache would exceed its limit.
//!
//! Each image has a record `images/<hex>.chunks` (its chunk digests, 32 bytes each) and a
//! last-used time (the record's mtime). A mounted image holds an exclusive `flock` on
//! `images/<hex>.lock` for as long as it is mounted, so any process sharing the cache can tell
//! which images are in use, and a crashed mount releases its lock with its file descriptors.

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::oci::digest::Digest;

/// A mounted image's hold on its chunks; released when dropped.
#[derive(Debug)]
pub struct Pin {
    _lock: File,
}

pub(super) fn dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("images")
}

/// Records that image `key` uses `chunks` and pins it until the returned [`Pin`] is dropped.
pub(super) fn pin(cache_dir: &Path, key: &Digest, chunks: &[Digest]) -> io::Result<Pin> {
    let dir = dir(cache_dir);
    crate::private::own_dir(&dir)?;
    let lock = crate::private::file_options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{}.lock", key.hex())))?;
    // SAFETY: flock on an fd this function owns; no memory is passed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut bytes = Vec::with_capacity(chunks.len() * 32);
    for chunk in chunks {
        bytes.extend_from_slice(&chunk.raw());
    }
    let record = dir.join(format!("{}.chunks", key.hex()));
    let tmp = record.with_extension(format!("tmp-{}", std::process::id()));
    crate::private::write(&tmp, &bytes)?;
    fs::rename(&tmp, &record)?;
    Ok(Pin { _lock: lock })
}

/// An image record: its key, last use, and whether some process has it mounted.
pub(super) struct Record {
    pub key: String,
    pub last_used: SystemTime,
    pub mounted: bool,
    pub path: PathBuf,
}

pub(super) fn records(cache_dir: &Path) -> Vec<Record> {
    let dir = dir(cache_dir);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.strip_suffix(".chunks")?.to_string();
            let last_used = e.metadata().ok()?.modified().ok()?;
            let mounted = is_locked(&dir.join(format!("{key}.lock")));
            Some(Record {
                key,
                last_used,
                mounted,
                path: e.path(),
            })
        })
        .collect()
}

/// The lock of image `key`, held exclusively: `None` while any process has the image
/// mounted (or it has no lock file). Holding it keeps new mounts of the image from pinning
/// it until it is dropped.
pub(super) fn claim(cache_dir: &Path, key: &Digest) -> Option<File> {
    let file = File::options()
        .write(true)
        .open(dir(cache_dir).join(format!("{}.lock", key.hex())))
        .ok()?;
    // SAFETY: flock on an fd this function owns; the lock goes with the returned file.
    (unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(file)
}

/// Removes image `key`'s record and lock file (the caller holds the lock from [`claim`]).
pub(super) fn forget(cache_dir: &Path, key: &Digest) {
    for ext in ["chunks", "lock"] {
        let _ = fs::remove_file(dir(cache_dir).join(format!("{}.{ext}", key.hex())));
    }
}

/// Whether another holder has the image pinned (a shared lock we cannot upgrade past).
fn is_locked(path: &Path) -> bool {
    let Ok(file) = File::options().write(true).open(path) else {
        return false;
    };
    // SAFETY: flock on an fd this function owns.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if free {
        // SAFETY: as above.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    }
    !free
}

/// The chunk digests a record lists.
pub(super) fn chunks_of(record: &Path) -> HashSet<[u8; 32]> {
    fs::read(record)
        .map(|b| {
            b.chunks_exact(32)
                .map(|c| c.try_into().expect("32 bytes"))
                .collect()
        })
        .unwrap_or_default()
}
