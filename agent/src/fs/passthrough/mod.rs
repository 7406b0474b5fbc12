//! FUSE passthrough (Linux 6.9): once every chunk of a file is cached, its opens are handed to
//! a backing file, so the kernel serves reads and mmaps of it from that file and never asks
//! the agent.
//!
//! A file's backing file is written once, off the read path: its first open after it is
//! complete is served as before (through the agent) and queues the file; a thread writes it
//! from the verified chunks into the cache's `files/` ([`ChunkCache::write_backing`]) and the
//! opens that come after it pass through. Backing files live under a key in the image's cache
//! record, so they count towards the cache's limit and go with the image's chunks.
//!
//! The kernel's rule is that one inode is either in cached mode (opens served through the
//! agent, sharing the page cache) or in passthrough mode on one backing file, never both at
//! once: an open in the other mode fails with EIO. So each inode's opens are counted here:
//! while any open of an inode is in cached mode, its new opens are too; while it has a
//! backing file registered, all of its opens use that one.
//!
//! A backing id stays registered when the last open of its file is released, so that the
//! next open of the file (a program started again, a script included on every request) costs
//! the round trip and nothing more: no open of the backing file, no registration. At most
//! [`IDLE`] such ids per mount are kept, the least recently released given back first.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs::File,
    io,
    ops::Range,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
};

pub(crate) mod ledger;

use self::ledger::{Ledger, Line};
use crate::{
    cache::ChunkCache,
    image::estargz::{Chunk, Node, Unit},
    oci::digest::Digest,
};

/// The handle of an open served in passthrough mode (cached opens have 0).
pub(crate) const PASSTHROUGH_HANDLE: u64 = 1;

/// Files waiting to be written as backing files, at most: a reader opening more than this
/// many complete files at once gets the rest at its next opens.
const QUEUED: usize = 4096;

/// Backing files written together, with one flush of the disk for all of them.
const WRITE_BATCH: usize = 256;

/// Backing ids kept registered with no open using them, at most, per mount. Each pins an open
/// file (and its inode) in the kernel: about a kilobyte.
const IDLE: usize = 1024;

/// `FUSE_DEV_IOC_BACKING_OPEN`: `_IOW(229, 1, struct fuse_backing_map)`.
const BACKING_OPEN: u32 = ioc_write(1, std::mem::size_of::<BackingMap>());
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const BACKING_CLOSE: u32 = ioc_write(2, std::mem::size_of::<u32>());

/// The kernel's `struct fuse_backing_map`.
#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

/// `_IOW(FUSE_DEV_IOC_MAGIC, nr, size)` on Linux's generic ioctl layout. (The request is a
/// `c_ulong` to glibc and a `c_int` to musl: [`libc::Ioctl`] at the call.)
const fn ioc_write(nr: u32, size: usize) -> u32 {
    const WRITE: u32 = 1;
    const MAGIC: u32 = 229;
    (WRITE << 30) | ((size as u32) << 16) | (MAGIC << 8) | nr
}

/// The key a file's backing file is kept under: for a file that is one whole eStargz or
/// zstd:chunked chunk, that chunk's digest (its content's); otherwise a digest of where its
/// bytes are (each chunk's digest, offset and size), which [`backing_keys`] adds to the
/// image's cache record.
pub fn backing_key(node: &Node) -> Digest {
    match node.chunks.as_slice() {
        [only] if whole(node, only) => only.digest,
        chunks => {
            let mut what = b"imgstream backing file v1\0".to_vec();
            for chunk in chunks {
                what.extend_from_slice(&chunk.digest.raw());
                what.extend_from_slice(&chunk.unit_offset().to_le_bytes());
                what.extend_from_slice(&chunk.size.to_le_bytes());
            }
            Digest::of(&what)
        }
    }
}

fn whole(node: &Node, chunk: &Chunk) -> bool {
    !matches!(chunk.unit, Unit::Span { .. }) && chunk.file_offset == 0 && chunk.size == node.size
}

/// The backing keys of `nodes` that are not already chunk digests: what an image's cache
/// record must list besides its chunks for its backing files to go with it.
pub fn backing_keys<'a>(nodes: impl Iterator<Item = &'a Node>) -> impl Iterator<Item = Digest> {
    nodes
        .filter(|n| n.size > 0 && !matches!(n.chunks.as_slice(), [only] if whole(n, only)))
        .map(backing_key)
}

/// Counters: which path opens took, and the backing files written.
#[derive(Debug)]
pub struct PassthroughStats {
    /// Opens handed to a backing file.
    pub opens: AtomicU64,
    /// Opens served through the agent (the file is not complete, has no backing file yet,
    /// or another open of it is in cached mode).
    pub cached_opens: AtomicU64,
    /// Backing ids registered with the kernel (an idle one is used again without this).
    pub registered: AtomicU64,
    /// Backing files written by this mount.
    pub written: AtomicU64,
    /// Backing files that could not be written or registered.
    pub failed: AtomicU64,
}

impl Default for PassthroughStats {
    fn default() -> Self {
        Self::new()
    }
}

impl PassthroughStats {
    const fn new() -> Self {
        Self {
            opens: AtomicU64::new(0),
            cached_opens: AtomicU64::new(0),
            registered: AtomicU64::new(0),
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

/// The same counters for every mount of this process, for `/metrics`.
pub static TOTALS: PassthroughStats = PassthroughStats::new();

/// Counts one in a mount's `counter` and in the process's.
fn count(stats: &PassthroughStats, counter: fn(&PassthroughStats) -> &AtomicU64) {
    counter(stats).fetch_add(1, Ordering::Relaxed);
    counter(&TOTALS).fetch_add(1, Ordering::Relaxed);
}

/// Opens of one inode, by mode.
#[derive(Debug, Default)]
struct Opens {
    cached: u32,
    /// The registered backing id and how many passthrough opens use it (none: it is idle).
    backing: Option<(u32, u32)>,
    /// When its backing id last went idle, in [`Table::released`]'s count.
    idle_since: u64,
}

/// Every inode with opens or an idle backing id.
#[derive(Debug, Default)]
struct Table {
    opens: HashMap<u64, Opens>,
    /// Inodes whose backing id went idle, oldest first, with when; an inode opened again
    /// since is skipped when its turn comes (its `idle_since` no longer matches).
    idle: VecDeque<(u64, u64)>,
    /// Backing ids that went idle so far.
    released: u64,
    /// Where each change is written for the next agent, when one is kept.
    ledger: Option<Ledger>,
}

impl Table {
    /// Writes inode `ino`'s counts to the ledger: call after every change to them.
    fn note(&self, ino: u64) {
        if let Some(ledger) = &self.ledger {
            let line = self.opens.get(&ino).map(|o| Line {
                cached: o.cached,
                backing: o.backing,
            });
            ledger.record(ino, line);
        }
    }

    /// A table from the lines a previous agent left, if each names a file (`is_file`).
    fn from_lines(
        lines: impl Iterator<Item = (u64, Line)>,
        is_file: impl Fn(u64) -> bool,
    ) -> Option<Self> {
        let mut table = Table::default();
        for (ino, line) in lines {
            if !is_file(ino) || table.opens.contains_key(&ino) {
                return None;
            }
            let mut opens = Opens {
                cached: line.cached,
                backing: line.backing,
                idle_since: 0,
            };
            if matches!(line.backing, Some((_, 0))) {
                table.released += 1;
                opens.idle_since = table.released;
                table.idle.push_back((ino, table.released));
            }
            table.opens.insert(ino, opens);
        }
        Some(table)
    }

    /// Counts down one open of `ino` (`passthrough`: in that mode); returns the backing ids
    /// to give back to the kernel: the least recently used idle ones beyond [`IDLE`].
    fn release(&mut self, ino: u64, passthrough: bool) -> Vec<u32> {
        let Some(entry) = self.opens.get_mut(&ino) else {
            return Vec::new();
        };
        match &mut entry.backing {
            Some((_, n)) if passthrough && *n > 0 => {
                *n -= 1;
                if *n == 0 {
                    self.released += 1;
                    entry.idle_since = self.released;
                    self.idle.push_back((ino, self.released));
                }
            }
            _ if !passthrough => entry.cached = entry.cached.saturating_sub(1),
            _ => {}
        }
        if entry.cached == 0 && entry.backing.is_none() {
            self.opens.remove(&ino);
        }
        self.note(ino);
        let mut closed = Vec::new();
        while self.idle.len() > IDLE {
            let Some((ino, since)) = self.idle.pop_front() else {
                break;
            };
            let Some(entry) = self.opens.get_mut(&ino) else {
                continue;
            };
            if let Some((id, 0)) = entry.backing
                && entry.idle_since == since
            {
                closed.push(id);
                entry.backing = None;
                if entry.cached == 0 {
                    self.opens.remove(&ino);
                }
                self.note(ino);
            }
        }
        closed
    }
}

/// A file to write as a backing file: its key and each chunk's part.
type Job = (Digest, Vec<(Digest, Range<usize>)>);

/// Passthrough for one mount.
pub(crate) struct Passthrough {
    /// The connection's /dev/fuse, for the ioctls; set once mounted.
    device: OnceLock<OwnedFd>,
    /// Negotiated at INIT, and still working (a refused registration turns it off).
    enabled: AtomicBool,
    /// Negotiated at INIT (on this connection, by this agent or the one before it).
    negotiated: AtomicBool,
    opens: Mutex<Table>,
    cache: Arc<ChunkCache>,
    queue: Mutex<Option<mpsc::SyncSender<Job>>>,
    /// The writer of backing files, joined when the mount goes.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    queued: Arc<Mutex<HashSet<Digest>>>,
    /// Set when the mount goes: the writer drops what is still queued.
    stopped: Arc<AtomicBool>,
    pub(crate) stats: Arc<PassthroughStats>,
}

impl Drop for Passthrough {
    /// Stops the writer and waits for the batch it is on: once a mount is gone nothing
    /// writes into the cache for it (its image may be released, its directory removed).
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        drop(crate::sync::lock(&self.queue).take());
        if let Some(writer) = crate::sync::lock(&self.writer).take() {
            let _ = writer.join();
        }
    }
}

impl std::fmt::Debug for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passthrough")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// How an open is to be answered.
pub(crate) enum Open {
    /// Through the agent (`handle` 0).
    Cached,
    /// On the backing file registered as this id.
    Backing(u32),
}

impl Passthrough {
    pub(crate) fn new(cache: Arc<ChunkCache>) -> Self {
        Self {
            device: OnceLock::new(),
            enabled: AtomicBool::new(false),
            negotiated: AtomicBool::new(false),
            opens: Mutex::default(),
            cache,
            queue: Mutex::new(None),
            writer: Mutex::new(None),
            queued: Arc::new(Mutex::new(HashSet::new())),
            stopped: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Whether INIT enabled it (and nothing turned it off since).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// What INIT decided: on or off for the connection's life, kept in the ledger too.
    pub(crate) fn set_negotiated(&self, on: bool) {
        self.negotiated.store(on, Ordering::Relaxed);
        self.set_enabled(on);
        if let Some(ledger) = &crate::sync::lock(&self.opens).ledger {
            ledger.set_negotiated(on);
        }
    }

    /// Gives it the connection to register backing files on.
    pub(crate) fn attach(&self, device: OwnedFd) {
        let _ = self.device.set(device);
    }

    /// Decides how to answer an open of inode `ino`, file `node`.
    pub(crate) fn open(&self, ino: u64, node: &Node) -> Open {
        if !self.enabled() || node.size == 0 {
            return Open::Cached;
        }
        let Some(device) = self.device.get() else {
            return self.cached(ino);
        };
        {
            let mut table = crate::sync::lock(&self.opens);
            let entry = table.opens.entry(ino).or_default();
            if entry.cached > 0 {
                entry.cached += 1;
                table.note(ino);
                count(&self.stats, |s| &s.cached_opens);
                return Open::Cached;
            }
            if let Some((id, n)) = &mut entry.backing {
                *n += 1;
                let id = *id;
                table.note(ino);
                count(&self.stats, |s| &s.opens);
                return Open::Backing(id);
            }
        }
        let key = backing_key(node);
        // One open when the backing file is there; when it is not, a stat per chunk until
        // the first one missing.
        let Some(file) = self.cache.open_backing(&key) else {
            if node.chunks.iter().all(|c| self.cache.contains(&c.digest)) {
                self.queue(key, node);
            }
            return self.cached(ino);
        };
        // A file that is one whole chunk shares its backing file with every file of that
        // digest. A TOC that gives the digest another size than its bytes have is served
        // through the agent, which refuses the chunk, never with the other file's bytes.
        if file.metadata().map(|m| m.len()).ok() != Some(node.size) {
            return self.cached(ino);
        }
        let id = match backing_open(device, &file) {
            Ok(id) if id > ledger::ID_MAX => {
                // Never seen (the kernel numbers them from 1, lowest free first), but the
                // ledger could not hold it.
                backing_close(device, id);
                return self.cached(ino);
            }
            Ok(id) => {
                count(&self.stats, |s| &s.registered);
                id
            }
            Err(err) => {
                count(&self.stats, |s| &s.failed);
                // EPERM (no CAP_SYS_ADMIN), EOPNOTSUPP (not negotiated after all), ELOOP
                // (the cache is on a stacked filesystem): none gets better with retrying.
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EPERM | libc::EOPNOTSUPP | libc::ELOOP | libc::ENOTTY)
                ) {
                    tracing::warn!(%err, cache = %self.cache.dir().display(), "FUSE passthrough turned off for this mount: the kernel refused a backing file; reads go through the agent");
                    self.set_enabled(false);
                } else {
                    tracing::warn!(%err, %key, "a backing file could not be registered; this open goes through the agent");
                }
                return self.cached(ino);
            }
        };
        let mut table = crate::sync::lock(&self.opens);
        let entry = table.opens.entry(ino).or_default();
        let (answer, spare) = match &mut entry.backing {
            // Another open registered one meanwhile: use it, give ours back.
            Some((theirs, n)) => {
                *n += 1;
                count(&self.stats, |s| &s.opens);
                (Open::Backing(*theirs), Some(id))
            }
            None if entry.cached > 0 => {
                entry.cached += 1;
                count(&self.stats, |s| &s.cached_opens);
                (Open::Cached, Some(id))
            }
            None => {
                entry.backing = Some((id, 1));
                count(&self.stats, |s| &s.opens);
                (Open::Backing(id), None)
            }
        };
        table.note(ino);
        drop(table);
        if let Some(spare) = spare {
            backing_close(device, spare);
        }
        answer
    }

    /// Counts a cached-mode open of `ino`.
    fn cached(&self, ino: u64) -> Open {
        let mut table = crate::sync::lock(&self.opens);
        table.opens.entry(ino).or_default().cached += 1;
        table.note(ino);
        count(&self.stats, |s| &s.cached_opens);
        Open::Cached
    }

    /// An open of `ino` answered with `handle` was released.
    pub(crate) fn release(&self, ino: u64, handle: u64) {
        let closed = crate::sync::lock(&self.opens).release(ino, handle == PASSTHROUGH_HANDLE);
        if let Some(device) = self.device.get() {
            for id in closed {
                backing_close(device, id);
            }
        }
    }

    /// Queues `node`'s backing file to be written under `key`.
    fn queue(&self, key: Digest, node: &Node) {
        if !crate::sync::lock(&self.queued).insert(key) {
            return;
        }
        let parts = node
            .chunks
            .iter()
            .map(|c| {
                let start = c.unit_offset() as usize;
                (c.digest, start..start + c.size as usize)
            })
            .collect();
        let mut queue = crate::sync::lock(&self.queue);
        if queue.is_none() {
            *queue = self.spawn_writer();
        }
        let sent = queue
            .as_ref()
            .is_some_and(|q| q.try_send((key, parts)).is_ok());
        if !sent {
            crate::sync::lock(&self.queued).remove(&key);
        }
    }

    /// The thread that writes backing files, until this mount is dropped.
    fn spawn_writer(&self) -> Option<mpsc::SyncSender<Job>> {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUED);
        let (cache, queued, stats, stopped) = (
            self.cache.clone(),
            self.queued.clone(),
            self.stats.clone(),
            self.stopped.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("backing-files".into())
            .spawn(move || {
                // What is queued is written in batches, with one flush of the disk each.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    // An image unmounted may be released next: write nothing for it.
                    if stopped.load(Ordering::Relaxed) {
                        break;
                    }
                    let results = cache.write_backings(&batch);
                    for ((key, _), result) in batch.iter().zip(results) {
                        match result {
                            Ok(true) => count(&stats, |s| &s.written),
                            Ok(false) => count(&stats, |s| &s.failed),
                            Err(err) => {
                                count(&stats, |s| &s.failed);
                                let err = crate::error_chain(&err);
                                tracing::warn!(%err, "a backing file for passthrough was not written");
                            }
                        }
                        crate::sync::lock(&queued).remove(key);
                    }
                }
            });
        match spawned {
            Ok(writer) => {
                *crate::sync::lock(&self.writer) = Some(writer);
                Some(tx)
            }
            Err(err) => {
                tracing::warn!(%err, "no thread to write backing files; passthrough stays off");
                self.set_enabled(false);
                None
            }
        }
    }

    /// Writes every change to the open counts to `ledger` from now on (and what they are
    /// now), so that the next agent on this connection can go on from them, however this
    /// one ends ([`ledger`]). `ledger` is a new one, or the one the counts were taken over
    /// from: it has no line the table lacks.
    pub(crate) fn keep_ledger(&self, ledger: Ledger) {
        let mut table = crate::sync::lock(&self.opens);
        if self.negotiated.load(Ordering::Relaxed) {
            ledger.set_negotiated(true);
        }
        table.ledger = Some(ledger);
        let inos: Vec<u64> = table.opens.keys().copied().collect();
        for ino in inos {
            table.note(ino);
        }
    }

    /// Takes over the open counts and backing ids a previous agent serving this connection
    /// left, so that opens of files its readers still hold keep the mode the kernel has them
    /// in (an open in the other mode would fail with EIO). `None` when a line names an inode
    /// that is not a file of the tree (`is_file`), or one inode twice.
    pub(crate) fn take_over(
        &self,
        lines: impl Iterator<Item = (u64, Line)>,
        is_file: impl Fn(u64) -> bool,
    ) -> Option<()> {
        let taken = Table::from_lines(lines, is_file)?;
        let mut table = crate::sync::lock(&self.opens);
        let ledger = table.ledger.take();
        *table = taken;
        table.ledger = ledger;
        Some(())
    }

    /// Backing files queued and not written yet.
    pub(crate) fn pending(&self) -> usize {
        crate::sync::lock(&self.queued).len()
    }
}

/// The lines of the table an agent before the ledger wrote when it left a mount: `ino
/// backing-id passthrough-opens cached-opens` per inode. `None` when `text` is not one.
pub(crate) fn parse_table(text: &str) -> Option<Vec<(u64, Line)>> {
    text.lines()
        .map(|line| {
            let mut fields = line.split(' ').map(str::parse::<u64>);
            let (Some(Ok(ino)), Some(Ok(id)), Some(Ok(n)), Some(Ok(cached)), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return None;
            };
            let (id, n, cached) = (
                u32::try_from(id).ok().filter(|id| *id <= ledger::ID_MAX)?,
                u32::try_from(n).ok()?,
                u32::try_from(cached).ok()?,
            );
            Some((
                ino,
                Line {
                    cached,
                    backing: (id > 0).then_some((id, n)),
                },
            ))
        })
        .collect()
}

/// Registers `file` with the FUSE connection `device`; returns its backing id.
fn backing_open(device: &OwnedFd, file: &File) -> io::Result<u32> {
    let map = BackingMap {
        fd: file.as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: the ioctl reads a `fuse_backing_map` from `&map`, which lives across the call;
    // both descriptors are open.
    let id = unsafe { libc::ioctl(device.as_raw_fd(), BACKING_OPEN as libc::Ioctl, &map) };
    if id < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(id as u32)
}

/// Gives backing id `id` back to the connection (open files keep their backing file).
fn backing_close(device: &OwnedFd, id: u32) {
    // SAFETY: the ioctl reads a u32 from `&id`, which lives across the call.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), BACKING_CLOSE as libc::Ioctl, &id) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        tracing::debug!(%err, id, "closing a backing id");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From <linux/fuse.h>: _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t).
        assert_eq!(BACKING_OPEN, 0x4010_e501);
        assert_eq!(BACKING_CLOSE, 0x4004_e502);
    }

    #[test]
    fn idle_backing_ids_are_kept_up_to_the_bound_and_the_oldest_given_back() {
        let mut table = Table::default();
        let open = |table: &mut Table, ino: u64, id: u32| {
            let entry = table.opens.entry(ino).or_default();
            match &mut entry.backing {
                Some((_, n)) => *n += 1,
                None => entry.backing = Some((id, 1)),
            }
        };
        for ino in 0..IDLE as u64 {
            open(&mut table, ino, ino as u32 + 1);
            assert!(table.release(ino, true).is_empty());
        }
        // Inode 0 is used again: inode 1 is now the least recently released.
        open(&mut table, 0, 0);
        assert!(table.release(0, true).is_empty());
        assert_eq!(table.opens.len(), IDLE);
        open(&mut table, 5000, 5001);
        assert_eq!(
            table.release(5000, true),
            vec![2],
            "inode 1's id given back"
        );
        assert!(!table.opens.contains_key(&1));
        assert_eq!(table.opens.get(&0).and_then(|o| o.backing), Some((1, 0)));
        // One open still held is never given back, however long ago it was opened.
        open(&mut table, 2, 0);
        for ino in 6000..6000 + 2 * IDLE as u64 {
            open(&mut table, ino, 9);
            let _ = table.release(ino, true);
        }
        assert_eq!(table.opens.get(&2).and_then(|o| o.backing), Some((3, 1)));
        assert!(table.idle.len() <= IDLE, "the queue is bounded too");
        let idle = table
            .opens
            .values()
            .filter(|o| matches!(o.backing, Some((_, 0))))
            .count();
        assert_eq!(idle, IDLE);
    }

    #[test]
    fn the_open_counts_go_through_the_ledger_to_the_next_agent_and_garbage_is_refused() {
        let (dir, cache) = crate::testing::scratch_cache("passthrough-handover");
        let path = dir.join("mnt.passthrough");
        let before = Passthrough::new(cache.clone());
        {
            let mut table = crate::sync::lock(&before.opens);
            table.opens.insert(
                7,
                Opens {
                    backing: Some((3, 2)),
                    ..Opens::default()
                },
            );
        }
        // Kept from here on: what was there is written, and every change after it.
        before.set_negotiated(true);
        before.keep_ledger(Ledger::create(&path, 1, 20).expect("a ledger"));
        assert!(matches!(before.cached(9), Open::Cached));
        {
            let mut table = crate::sync::lock(&before.opens);
            table.opens.insert(
                11,
                Opens {
                    backing: Some((5, 1)),
                    ..Opens::default()
                },
            );
            assert!(table.release(11, true).is_empty(), "kept registered, idle");
        }
        // The agent is gone without a word: its successor reads the ledger.
        drop(before);
        let ledger = Ledger::open(&path, 1, 20)
            .expect("it opens")
            .expect("this connection's");
        assert!(ledger.negotiated(), "INIT's answer is kept too");
        let after = Passthrough::new(cache.clone());
        let lines: Vec<_> = ledger.lines().collect();
        assert!(
            after
                .take_over(lines.into_iter(), |ino| [7, 9, 11].contains(&ino))
                .is_some()
        );
        after.keep_ledger(ledger);
        // The old opens' releases come to the new agent and count down what it took over.
        after.release(7, PASSTHROUGH_HANDLE);
        after.release(9, 0);
        {
            let table = crate::sync::lock(&after.opens);
            assert_eq!(table.opens.get(&7).and_then(|o| o.backing), Some((3, 1)));
            assert!(
                !table.opens.contains_key(&9),
                "its last cached open was released"
            );
            assert_eq!(table.opens.get(&11).and_then(|o| o.backing), Some((5, 0)));
            assert_eq!(
                table.idle.len(),
                1,
                "idle, and given back first when it comes to that"
            );
            let written: Vec<_> = table.ledger.as_ref().expect("kept").lines().collect();
            assert_eq!(
                written,
                [
                    (
                        7,
                        Line {
                            cached: 0,
                            backing: Some((3, 1))
                        }
                    ),
                    (
                        11,
                        Line {
                            cached: 0,
                            backing: Some((5, 0))
                        }
                    ),
                ],
                "the releases are in the ledger too"
            );
        }
        // An agent before the ledger left a text table.
        let fresh = Passthrough::new(cache);
        let lines = parse_table("7 3 2 0\n9 0 0 1\n").expect("a table");
        assert!(
            fresh
                .take_over(lines.into_iter(), |ino| ino == 7 || ino == 9)
                .is_some()
        );
        for garbage in [
            "7 3 2",
            "7 3 2 0 1",
            "x 3 2 0",
            "7 3 2 -1",
            "7 99999999999 1 0",
            "7 8388608 1 0",
        ] {
            assert!(parse_table(garbage).is_none(), "{garbage:?} refused");
        }
        for refused in ["8 3 2 0", "7 3 1 0\n7 3 1 0"] {
            let lines = parse_table(refused).expect("well formed");
            assert!(
                fresh.take_over(lines.into_iter(), |ino| ino == 7).is_none(),
                "{refused:?} refused"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_successor_asks_for_backing_files_only_where_init_enabled_passthrough() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let (dir, _) = crate::testing::scratch_cache("passthrough-negotiated");
        let dev_null = || OwnedFd::from(File::open("/dev/null").expect("/dev/null"));
        let zero = std::time::Duration::ZERO;
        let first = crate::testing::hello_image_fs(&runtime, &dir.join("first"), zero);
        let path = dir.join("mnt.passthrough");
        first.keep_passthrough_ledger(&path, 7).expect("kept");
        // The kernel did not offer passthrough at INIT (Linux before 6.9, say).
        first.passthrough.set_negotiated(false);
        let second = crate::testing::hello_image_fs(&runtime, &dir.join("second"), zero);
        assert!(!second.take_over_passthrough(&path, 7, dev_null()));
        assert!(!second.passthrough_enabled());
        // It did: the successor goes on with it.
        first.passthrough.set_negotiated(true);
        assert!(second.take_over_passthrough(&path, 7, dev_null()));
        assert!(second.passthrough_enabled());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_dropped_mount_waits_for_its_backing_file_writer() {
        let (dir, cache) = crate::testing::scratch_cache("pt-writer-join");
        let passthrough = Passthrough::new(cache.clone());
        // Many files of one cached chunk each: the writer is still at them when the mount goes.
        for i in 0..2000u32 {
            let data = i.to_le_bytes().repeat(1024);
            let digest = Digest::of(&data);
            assert!(cache.put(&digest, &data).expect("a cache write"));
            let node = Node {
                path: format!("f{i}"),
                kind: crate::image::estargz::NodeKind::Regular,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: data.len() as u64,
                mtime: (0, 0),
                xattrs: Default::default(),
                digest: None,
                chunks: vec![Chunk {
                    file_offset: 0,
                    size: data.len() as u64,
                    blob_offset: 0,
                    blob_end: 1,
                    digest,
                    unit: Unit::Member,
                }],
            };
            passthrough.queue(backing_key(&node), &node);
        }
        drop(passthrough);
        // The writer's hold on the cache is gone with it: nothing writes for this mount now.
        assert_eq!(Arc::strong_count(&cache), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
