//! The local chunk cache: every verified chunk of every image, stored once by its digest (so
//! images share what they have in common), each with a crc32 checked on every read.
//!
//! A chunk lives in `chunks/<64 hex>` (one flat directory, as containerd's content store
//! keeps blobs: a directory per two hex digits would cost a filesystem block each for a few
//! chunks, the most a small cache has): a 16-byte header (magic, crc32 of the data,
//! data length) and the decompressed data. Files are written to a temporary name through the
//! chosen [`engine`] (io_uring or synchronous, data synced) and renamed into place, so a crash
//! leaves either no chunk or a whole one. A chunk whose header or crc32 is wrong is moved to
//! `quarantine/` and reported as a miss, so the caller fetches it again: corrupt data is never
//! served. Nothing is kept in memory about the chunks, so the cache survives restarts as is.
//!
//! Image metadata (eStargz TOCs, manifests) lives apart from chunks, in `meta/<kind>/<64 hex>`
//! with the same framing, through a typed API ([`ChunkCache::put_toc`],
//! [`ChunkCache::get_manifest`], ...): a TOC or manifest can never be read as a chunk, nor a
//! chunk as one, whatever digests an image claims.
//!
//! Next to the store: [`MemoryCache`], the recently verified chunks kept in memory, and
//! [`WriteBehind`], the thread that writes readers' chunks off the read path.
//!
//! The usage the cache counts, and holds to its limit, is what its directory takes on disk as
//! `du` counts it (allocated blocks of every file and directory in it), measured when the
//! cache opens and kept up to date by every write and removal, so that the snapshotter's
//! `Usage` and a lazy mount's `statfs` tell kubelet the truth.
//!
//! This module knows nothing of registries or filesystems: it maps digests to bytes.

pub mod budget;
pub mod engine;
mod images;
mod memory;
mod writer;

use std::{
    fs::{self, File},
    io::{self, Read},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use serde::Serialize;

pub use budget::{Lease, Memory, MemoryBudget};
pub use engine::{CacheEngine, SyncEngine, UringEngine};
pub use images::Pin;
pub use memory::MemoryCache;
pub use writer::{MAX_QUEUED_BYTES, WriteBehind};

use crate::oci::digest::Digest;

const MAGIC: &[u8; 4] = b"ISC1";
const HEADER: usize = 16;
/// Corrupt entries kept for inspection; older ones are deleted.
pub const QUARANTINE_KEPT: usize = 16;

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("preparing the cache directory {0}")]
    Prepare(PathBuf, #[source] io::Error),
    #[error("the cache disk is full (writing {0})")]
    Full(PathBuf),
    #[error("writing chunk {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("reading chunk {0}")]
    Read(PathBuf, #[source] io::Error),
}

/// Where the cache lives and how it writes.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Upper bound of the bytes the cache directory takes on disk; `None` for no limit.
    pub limit_bytes: Option<u64>,
    /// Use io_uring when the kernel allows it.
    pub prefer_uring: bool,
}

/// Counters, for logs and metrics.
#[derive(Debug, Default, Serialize)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Chunks found corrupt and quarantined.
    pub corrupt: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Chunks removed to make room (least recently used images that are not mounted).
    pub evicted: AtomicU64,
    /// Chunks not cached because the limit would have been exceeded.
    pub skipped_over_limit: AtomicU64,
    pub write_errors: AtomicU64,
}

/// The chunk store.
pub struct ChunkCache {
    dir: PathBuf,
    engine: Box<dyn CacheEngine>,
    limit: Option<u64>,
    /// Bytes on disk under `dir` (allocated blocks), reservations of writes under way included.
    usage: AtomicU64,
    /// The filesystem's allocation unit, to estimate a write's blocks before it is made.
    block: u64,
    evicting: std::sync::Mutex<()>,
    pub stats: CacheStats,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.dir)
            .field("engine", &self.engine.name())
            .finish_non_exhaustive()
    }
}

impl ChunkCache {
    /// Opens (creating if needed) the cache at `config.dir` and measures what it holds.
    pub fn open(config: &CacheConfig) -> Result<Self, CacheError> {
        for sub in [
            "chunks",
            "files",
            "meta/toc",
            "meta/manifest",
            "meta/span-index",
            "quarantine",
            "tmp",
            "layers",
            "images",
        ] {
            let dir = config.dir.join(sub);
            crate::private::own_dir(&dir).map_err(|e| CacheError::Prepare(dir.clone(), e))?;
        }
        // Leftovers of writes interrupted by a crash.
        if let Ok(entries) = fs::read_dir(config.dir.join("tmp")) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        flatten_chunks(&config.dir.join("chunks"));
        let usage = disk_usage(&config.dir);
        let block = space(&config.dir).map_or(4096, |s| s.block.max(512));
        let engine = engine::probe(config.prefer_uring);
        tracing::info!(dir = %config.dir.display(), engine = engine.name(), usage, "chunk cache opened");
        Ok(Self {
            dir: config.dir.clone(),
            engine,
            limit: config.limit_bytes,
            usage: AtomicU64::new(usage),
            block,
            evicting: std::sync::Mutex::new(()),
            stats: CacheStats::default(),
        })
    }

    /// The cache's directory (other parts keep files of their own under it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Which engine writes ("io_uring" or "sync").
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// The size limit, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Bytes the cache directory takes on disk now (as `du` counts them).
    pub fn usage(&self) -> u64 {
        self.usage.load(Ordering::Relaxed)
    }

    /// The filesystem the cache is on, and the room the cache has left on it: the free space
    /// any user may take, less what the size limit forbids.
    pub fn space(&self) -> io::Result<CacheSpace> {
        let fs = space(&self.dir)?;
        let room = match self.limit {
            Some(limit) => fs.available.min(limit.saturating_sub(self.usage())),
            None => fs.available,
        };
        Ok(CacheSpace {
            used: self.usage(),
            room,
            filesystem: fs,
        })
    }

    /// Bytes on disk of what image `key` has cached (every chunk, TOC, manifest and span
    /// index its record lists, and the record), and how many files that is. What other
    /// images share is counted for each; the cache's directories for none.
    pub fn image_usage(&self, key: &Digest) -> (u64, u64) {
        let record = images::dir(&self.dir).join(format!("{}.chunks", key.hex()));
        let Ok(meta) = fs::symlink_metadata(&record) else {
            return (0, 0);
        };
        let (mut bytes, mut files) = (on_disk(&meta), 1);
        for raw in images::chunks_of(&record) {
            let digest = Digest::from_raw(raw);
            for path in self.paths_under(&digest) {
                if let Ok(meta) = fs::symlink_metadata(&path) {
                    bytes += on_disk(&meta);
                    files += 1;
                }
            }
        }
        (bytes, files)
    }

    /// Counts a file another part wrote under the cache directory (a whole layer's rewrite).
    pub fn count_file(&self, path: &Path) {
        if let Ok(meta) = fs::symlink_metadata(path) {
            self.usage.fetch_add(on_disk(&meta), Ordering::Relaxed);
        }
    }

    /// The blocks a file of `len` bytes is expected to take, before it is written.
    fn estimate(&self, len: u64) -> u64 {
        len.div_ceil(self.block) * self.block
    }

    /// Replaces the estimate a write reserved with the blocks its file took.
    fn settle(&self, estimate: u64, path: &Path) {
        let actual = fs::symlink_metadata(path).map_or(estimate, |m| on_disk(&m));
        if actual >= estimate {
            self.usage.fetch_add(actual - estimate, Ordering::Relaxed);
        } else {
            self.unaccount(estimate - actual);
        }
    }

    /// Takes `bytes` off the usage, never below zero.
    fn unaccount(&self, bytes: u64) {
        let _ = self
            .usage
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("chunks").join(digest.hex())
    }

    /// Every place something may be cached under `digest`.
    fn paths_under(&self, digest: &Digest) -> [PathBuf; 5] {
        [
            self.path(digest),
            self.backing_path(digest),
            self.meta_path(MetaKind::Toc, digest),
            self.meta_path(MetaKind::Manifest, digest),
            self.meta_path(MetaKind::SpanIndex, digest),
        ]
    }

    fn backing_path(&self, key: &Digest) -> PathBuf {
        self.dir.join("files").join(key.hex())
    }

    /// Starts reading what is cached under `digest` (a backing file with `backing`, else a
    /// chunk) into the page cache and returns without waiting for the disk; `false` when
    /// nothing is there. Opening it brings its inode in too, so the open that comes after
    /// costs no disk read. Nothing is checked here: the reader that comes after checks.
    pub fn warm(&self, digest: &Digest, backing: bool) -> bool {
        use std::os::fd::AsRawFd as _;
        let path = if backing {
            self.backing_path(digest)
        } else {
            self.path(digest)
        };
        let Ok(file) = File::open(path) else {
            return false;
        };
        // SAFETY: advice on an open descriptor of ours; it reads nothing into our memory.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
        true
    }

    /// The backing file kept under `key` ([`ChunkCache::write_backing`]), opened for reading;
    /// `None` if there is none (or it cannot be opened).
    pub fn open_backing(&self, key: &Digest) -> Option<File> {
        File::open(self.backing_path(key)).ok()
    }

    /// Writes the backing file of a whole file under `key`: the bytes `range` of each chunk
    /// in `parts`, in order, each chunk read as [`ChunkCache::get`] reads it (header and crc32
    /// checked; chunks were checked against their digests before they were stored). The
    /// file is synced before it is renamed into place: the kernel reads it with no check of
    /// ours, so a torn one must never appear. Returns `false`, writing nothing, when a chunk
    /// is missing or corrupt, or the size limit leaves no room.
    pub fn write_backing(
        &self,
        key: &Digest,
        parts: &[(Digest, std::ops::Range<usize>)],
    ) -> Result<bool, CacheError> {
        let mut results = self.write_backings(&[(*key, parts.to_vec())]);
        results.pop().unwrap_or(Ok(false))
    }

    /// [`ChunkCache::write_backing`] of several files at once, with one sync of the cache's
    /// filesystem for all of them before any is renamed into place: a small file's backing
    /// file costs its writes, not a flush of its own (10,000 flushes of small files held a
    /// reader of the same disk to half its speed). A lone file is flushed on its own. One
    /// result per job, in order.
    pub fn write_backings(&self, jobs: &[BackingJob]) -> Vec<Result<bool, CacheError>> {
        let mut results: Vec<Option<Result<bool, CacheError>>> = Vec::with_capacity(jobs.len());
        // (job, temporary file, reserved size, the file) of each file written, not yet in
        // place.
        let mut written: Vec<(usize, PathBuf, u64, File)> = Vec::new();
        for (n, (key, parts)) in jobs.iter().enumerate() {
            if self.backing_path(key).exists() {
                results.push(Some(Ok(true)));
                continue;
            }
            let len: usize = parts.iter().map(|(_, r)| r.len()).sum();
            let size = self.estimate(len as u64);
            if !self.reserve(size) {
                self.stats
                    .skipped_over_limit
                    .fetch_add(1, Ordering::Relaxed);
                results.push(Some(Ok(false)));
                continue;
            }
            let tmp = unique(self.dir.join("tmp").join(key.hex()));
            match self.write_backing_tmp(&tmp, parts) {
                Ok(Some(file)) => {
                    written.push((n, tmp, size, file));
                    results.push(None);
                }
                Ok(None) => {
                    let _ = fs::remove_file(&tmp);
                    self.unaccount(size);
                    results.push(Some(Ok(false)));
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    self.unaccount(size);
                    results.push(Some(Err(self.write_error(self.backing_path(key), e))));
                }
            }
        }
        // One file: its own flush, as cheap as it gets; more: one flush of the filesystem.
        let synced = match &written[..] {
            [] => Ok(()),
            [(.., file)] => file.sync_data(),
            _ => sync_filesystem(&self.dir.join("tmp")),
        };
        for (n, tmp, size, file) in written {
            drop(file);
            let path = self.backing_path(&jobs[n].0);
            let placed = synced
                .as_ref()
                .map_err(|e| io::Error::new(e.kind(), e.to_string()))
                .and_then(|()| fs::rename(&tmp, &path));
            results[n] = Some(match placed {
                Ok(()) => {
                    self.settle(size, &path);
                    Ok(true)
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    self.unaccount(size);
                    Err(self.write_error(path, e))
                }
            });
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Ok(false)))
            .collect()
    }

    /// Writes a backing file's bytes to `tmp`, and returns it; `Ok(None)` when a chunk is
    /// missing or corrupt.
    fn write_backing_tmp(
        &self,
        tmp: &Path,
        parts: &[(Digest, std::ops::Range<usize>)],
    ) -> io::Result<Option<File>> {
        let mut file = crate::private::file_options()
            .write(true)
            .create_new(true)
            .open(tmp)?;
        for (digest, range) in parts {
            let Ok(Some(unit)) = self.get(digest) else {
                return Ok(None);
            };
            let Some(bytes) = unit.get(range.clone()) else {
                return Ok(None);
            };
            io::Write::write_all(&mut file, bytes)?;
        }
        Ok(Some(file))
    }

    /// A write error, counted; a full disk told apart.
    fn write_error(&self, path: PathBuf, e: io::Error) -> CacheError {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
            CacheError::Full(path)
        } else {
            CacheError::Write(path, e)
        }
    }

    fn meta_path(&self, kind: MetaKind, digest: &Digest) -> PathBuf {
        self.dir.join("meta").join(kind.dir()).join(digest.hex())
    }

    /// Counts `size` bytes as used before they are written, so that concurrent writers can
    /// never take the cache over its limit together. Evicts to make room when needed; `false`
    /// when there is no room.
    fn reserve(&self, size: u64) -> bool {
        let Some(limit) = self.limit else {
            self.usage.fetch_add(size, Ordering::Relaxed);
            return true;
        };
        let mut evicted = false;
        loop {
            let used = self.usage.load(Ordering::Acquire);
            if used + size > limit {
                if evicted || !self.evict(limit.saturating_sub(size)) {
                    return false;
                }
                evicted = true;
                continue;
            }
            if self
                .usage
                .compare_exchange(used, used + size, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// Records that image `key` (its manifest digest) uses `chunks` (and the TOCs and
    /// manifests cached under the digests listed with them) and pins it against eviction
    /// while the returned [`Pin`] lives, across processes sharing the cache.
    pub fn pin_image(&self, key: &Digest, chunks: &[Digest]) -> Result<Pin, CacheError> {
        let record = images::dir(&self.dir).join(format!("{}.chunks", key.hex()));
        let before = fs::symlink_metadata(&record).map_or(0, |m| on_disk(&m));
        let pin = images::pin(&self.dir, key, chunks)
            .map_err(|e| CacheError::Prepare(images::dir(&self.dir), e))?;
        self.unaccount(before);
        self.count_file(&record);
        Ok(pin)
    }

    /// Deletes an image's record (and lock file), counting its blocks off the usage.
    fn forget_image(&self, key: &Digest) {
        let record = images::dir(&self.dir).join(format!("{}.chunks", key.hex()));
        if let Ok(meta) = fs::symlink_metadata(&record) {
            self.unaccount(on_disk(&meta));
        }
        images::forget(&self.dir, key);
    }

    /// Frees space down to `target` bytes: first everything cached under the digests of the
    /// least recently used images that no process has mounted (chunks, TOCs and manifests
    /// alike), keeping what any mounted image uses; then, oldest first, TOCs and manifests no
    /// mounted image names (an image opened and never mounted, an index). Returns whether
    /// usage is now at or under `target`.
    fn evict(&self, target: u64) -> bool {
        let _one_at_a_time = crate::sync::lock(&self.evicting);
        if self.usage() <= target {
            return true;
        }
        let mut records = images::records(&self.dir);
        let keep: std::collections::HashSet<[u8; 32]> = records
            .iter()
            .filter(|r| r.mounted)
            .flat_map(|r| images::chunks_of(&r.path))
            .collect();
        records.retain(|r| !r.mounted);
        records.sort_by_key(|r| r.last_used);
        for record in records {
            for raw in images::chunks_of(&record.path) {
                if keep.contains(&raw) {
                    continue;
                }
                self.remove_everything_under(&Digest::from_raw(raw));
            }
            tracing::info!(image = %record.key, usage = self.usage(), "evicted an unmounted image's chunks");
            if let Ok(meta) = fs::symlink_metadata(&record.path)
                && fs::remove_file(&record.path).is_ok()
            {
                self.unaccount(on_disk(&meta));
            }
            if self.usage() <= target {
                return true;
            }
        }
        let mut orphans: Vec<(SystemTime, PathBuf)> =
            [MetaKind::Toc, MetaKind::Manifest, MetaKind::SpanIndex]
                .into_iter()
                .filter_map(|kind| fs::read_dir(self.dir.join("meta").join(kind.dir())).ok())
                .flat_map(|entries| entries.flatten())
                .filter(|e| {
                    let name = e.file_name();
                    let digest = name
                        .to_str()
                        .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
                    !digest.is_some_and(|d| keep.contains(&d.raw()))
                })
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect();
        orphans.sort();
        for (_, path) in orphans {
            if self.usage() <= target {
                break;
            }
            self.remove_entry(&path);
        }
        self.usage() <= target
    }

    /// Gives back the space of image `key` (a layer's digest, for the snapshotter) once
    /// nothing uses it: every chunk, TOC, manifest and span index its record lists that no
    /// other image's record lists is deleted now, and its record goes; what other images
    /// share stays, and is evicted with them. Nothing is deleted while any process has the
    /// image mounted. Returns the bytes freed, or `None` when it is mounted or unknown here.
    pub fn release_image(&self, key: &Digest) -> Option<u64> {
        let _one_at_a_time = crate::sync::lock(&self.evicting);
        let _claimed = images::claim(&self.dir, key)?;
        let record = images::dir(&self.dir).join(format!("{}.chunks", key.hex()));
        if !record.exists() {
            return None;
        }
        let keep: std::collections::HashSet<[u8; 32]> = images::records(&self.dir)
            .iter()
            .filter(|r| r.key != key.hex())
            .flat_map(|r| images::chunks_of(&r.path))
            .collect();
        let before = self.usage();
        for raw in images::chunks_of(&record) {
            if keep.contains(&raw) {
                continue;
            }
            self.remove_everything_under(&Digest::from_raw(raw));
        }
        self.forget_image(key);
        Some(before.saturating_sub(self.usage()))
    }

    /// Forgets images long gone: every image no process has mounted, not in `keep`, and not
    /// used for `unused` is released ([`ChunkCache::release_image`]), then TOCs, manifests and
    /// span indexes no image names and untouched as long are deleted. The cache stays within
    /// what the node still runs even with no size limit. Returns the images released and the
    /// bytes freed.
    pub fn prune(
        &self,
        keep: &std::collections::HashSet<Digest>,
        unused: std::time::Duration,
    ) -> (usize, u64) {
        let before = self.usage();
        let now = SystemTime::now();
        let old = |t: SystemTime| now.duration_since(t).is_ok_and(|age| age >= unused);
        let mut released = 0;
        for record in images::records(&self.dir) {
            let Ok(key) = format!("sha256:{}", record.key).parse::<Digest>() else {
                continue;
            };
            if record.mounted || keep.contains(&key) || !old(record.last_used) {
                continue;
            }
            if self.release_image(&key).is_some() {
                released += 1;
            }
        }
        let named: std::collections::HashSet<[u8; 32]> = images::records(&self.dir)
            .iter()
            .flat_map(|r| images::chunks_of(&r.path))
            .collect();
        let _one_at_a_time = crate::sync::lock(&self.evicting);
        for kind in [MetaKind::Toc, MetaKind::Manifest, MetaKind::SpanIndex] {
            let Ok(entries) = fs::read_dir(self.dir.join("meta").join(kind.dir())) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let digest = name
                    .to_str()
                    .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
                let in_use = digest.is_some_and(|d| named.contains(&d.raw()) || keep.contains(&d));
                let modified = entry.metadata().and_then(|m| m.modified());
                if !in_use && modified.is_ok_and(old) {
                    self.remove_entry(&entry.path());
                }
            }
        }
        (released, before.saturating_sub(self.usage()))
    }

    /// Removes whatever is cached under `digest`: a chunk, or a TOC, manifest or span index.
    fn remove_everything_under(&self, digest: &Digest) {
        for path in self.paths_under(digest) {
            self.remove_entry(&path);
        }
    }

    /// Removes one cached entry, counting its bytes off the usage.
    fn remove_entry(&self, path: &Path) {
        if let Ok(meta) = fs::symlink_metadata(path)
            && fs::remove_file(path).is_ok()
        {
            self.unaccount(on_disk(&meta));
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Deletes a chunk, if it is cached.
    pub fn remove(&self, digest: &Digest) {
        self.remove_entry(&self.path(digest));
    }

    /// Deletes the span index kept for `layer`, if any.
    pub fn remove_span_index(&self, layer: &Digest) {
        self.remove_entry(&self.meta_path(MetaKind::SpanIndex, layer));
    }

    /// Whether a chunk file exists (not verified).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).exists()
    }

    /// The chunk's data if it is cached and intact. A corrupt chunk is quarantined and
    /// reported as absent.
    pub fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>, CacheError> {
        let found = self.read_entry(&self.path(digest), digest)?;
        let counter = if found.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(found)
    }

    /// An eStargz TOC member kept by [`ChunkCache::put_toc`] under the TOC's digest, if it is
    /// cached and its framing intact (the caller still checks it against the digest).
    pub fn get_toc(&self, toc_digest: &Digest) -> Result<Option<CachedToc>, CacheError> {
        let Some(bytes) =
            self.read_entry(&self.meta_path(MetaKind::Toc, toc_digest), toc_digest)?
        else {
            return Ok(None);
        };
        let Some((offset, member)) = bytes.split_first_chunk::<8>() else {
            return Ok(None);
        };
        Ok(Some(CachedToc {
            offset: u64::from_le_bytes(*offset),
            member: member.to_vec(),
        }))
    }

    /// Keeps a layer's compressed TOC member (which starts at `offset` in the blob) under
    /// the TOC's digest. Returns `false` when the size limit left no room.
    pub fn put_toc(
        &self,
        toc_digest: &Digest,
        offset: u64,
        member: &[u8],
    ) -> Result<bool, CacheError> {
        let mut entry = Vec::with_capacity(8 + member.len());
        entry.extend_from_slice(&offset.to_le_bytes());
        entry.extend_from_slice(member);
        self.write_entry(
            &self.meta_path(MetaKind::Toc, toc_digest),
            toc_digest,
            &entry,
        )
    }

    /// A manifest (or index) kept by [`ChunkCache::put_manifest`], if cached and intact (the
    /// caller still checks it against the digest).
    pub fn get_manifest(&self, digest: &Digest) -> Result<Option<Vec<u8>>, CacheError> {
        self.read_entry(&self.meta_path(MetaKind::Manifest, digest), digest)
    }

    /// Keeps a manifest's bytes under their digest. Returns `false` when the size limit left
    /// no room.
    pub fn put_manifest(&self, digest: &Digest, bytes: &[u8]) -> Result<bool, CacheError> {
        self.write_entry(&self.meta_path(MetaKind::Manifest, digest), digest, bytes)
    }

    /// The span index kept for the plain gzip layer `layer` (as encoded), if any. Whose
    /// layer it indexes is for the caller to check: the index names it.
    pub fn get_span_index(&self, layer: &Digest) -> Result<Option<Vec<u8>>, CacheError> {
        self.read_entry(&self.meta_path(MetaKind::SpanIndex, layer), layer)
    }

    /// Whether a span index of `layer` is kept (not read, so not checked).
    pub fn has_span_index(&self, layer: &Digest) -> bool {
        self.meta_path(MetaKind::SpanIndex, layer).exists()
    }

    /// Keeps `encoded`, the span index of `layer`. Returns `false` when the size limit left
    /// no room.
    pub fn put_span_index(&self, layer: &Digest, encoded: &[u8]) -> Result<bool, CacheError> {
        self.write_entry(&self.meta_path(MetaKind::SpanIndex, layer), layer, encoded)
    }

    /// The data of the entry at `path` if it exists and its framing and crc32 are intact; a
    /// corrupt entry is quarantined (named after `digest`) and reported as absent.
    fn read_entry(&self, path: &Path, digest: &Digest) -> Result<Option<Vec<u8>>, CacheError> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::Read(path.to_path_buf(), e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| CacheError::Read(path.to_path_buf(), e))?;
        match check(&bytes) {
            Some(()) => {
                bytes.drain(..HEADER);
                Ok(Some(bytes))
            }
            None => {
                // Another reader of the same entry may have quarantined it, and a fetch put a
                // good one in its place, since this one opened it: move only what was read.
                use std::os::unix::fs::MetadataExt as _;
                let read = file.metadata().map(|m| (m.dev(), m.ino())).ok();
                let there = fs::symlink_metadata(path).map(|m| (m.dev(), m.ino())).ok();
                if read.is_some() && read == there {
                    self.quarantine(digest, path);
                }
                Ok(None)
            }
        }
    }

    /// Moves a corrupt entry aside for inspection. It still takes its blocks, so it stays
    /// counted; the quarantine keeps the [`QUARANTINE_KEPT`] newest and deletes the rest.
    fn quarantine(&self, digest: &Digest, path: &Path) {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let to = self
            .dir
            .join("quarantine")
            .join(format!("{}.{stamp}", digest.hex()));
        match fs::rename(path, &to) {
            Ok(()) => {}
            // Moved by another reader that found it corrupt too: counted once, by that one.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => self.remove_entry(path),
        }
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(chunk = %digest, to = %to.display(), "cached chunk failed its crc32 check; quarantined, it will be fetched again");
        let mut kept: Vec<(SystemTime, PathBuf)> = fs::read_dir(self.dir.join("quarantine"))
            .into_iter()
            .flat_map(|entries| entries.flatten())
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        kept.sort();
        let excess = kept.len().saturating_sub(QUARANTINE_KEPT);
        for (_, old) in kept.into_iter().take(excess) {
            if let Ok(meta) = fs::symlink_metadata(&old)
                && fs::remove_file(&old).is_ok()
            {
                self.unaccount(on_disk(&meta));
            }
        }
    }

    /// Stores a chunk (already verified against its digest by the caller). Returns `false`
    /// when it was not stored because the size limit would be exceeded.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<bool, CacheError> {
        let stored = self.write_entry(&self.path(digest), digest, data)?;
        if !stored {
            self.stats
                .skipped_over_limit
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(stored)
    }

    /// Writes `data`, framed, to `path` through a temporary file and a rename, within the
    /// size limit. An entry already there is kept. `false` when the limit left no room.
    fn write_entry(&self, path: &Path, digest: &Digest, data: &[u8]) -> Result<bool, CacheError> {
        if path.exists() {
            return Ok(true);
        }
        let size = self.estimate((HEADER + data.len()) as u64);
        if !self.reserve(size) {
            return Ok(false);
        }
        let tmp = unique(self.dir.join("tmp").join(digest.hex()));
        let result = (|| {
            if let Some(parent) = path.parent() {
                crate::private::create_dir(parent)?;
            }
            let file = crate::private::file_options()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            let header = header(data);
            // Not synced: an entry torn by a crash fails its crc32 check and is fetched again.
            self.engine.write_parts(&file, &[&header, data], false)?;
            fs::rename(&tmp, path)
        })();
        match result {
            Ok(()) => {
                self.settle(size, path);
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_written
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                self.unaccount(size);
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                let path = path.to_path_buf();
                if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
                {
                    Err(CacheError::Full(path))
                } else {
                    Err(CacheError::Write(path, e))
                }
            }
        }
    }
}

/// The key spaces of image metadata, each apart from the chunks and from each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MetaKind {
    Toc,
    Manifest,
    /// Span indexes of plain gzip layers, under the layer's digest.
    SpanIndex,
}

impl MetaKind {
    fn dir(self) -> &'static str {
        match self {
            MetaKind::Toc => "toc",
            MetaKind::Manifest => "manifest",
            MetaKind::SpanIndex => "span-index",
        }
    }
}

/// An eStargz TOC member as cached: where it starts in its blob, and its compressed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedToc {
    pub offset: u64,
    pub member: Vec<u8>,
}

/// A temporary name no other writer uses at the same time.
/// A backing file to write: its key, and the bytes of each chunk it is made of.
pub type BackingJob = (Digest, Vec<(Digest, std::ops::Range<usize>)>);

/// Flushes the filesystem `dir` is on (`syncfs(2)`): every file written to it so far is
/// on disk when it returns.
fn sync_filesystem(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let dir = File::open(dir)?;
    // SAFETY: syncfs on a descriptor this function owns for the call's duration.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unique(base: PathBuf) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    base.with_extension(format!("{}-{n}", std::process::id()))
}

fn header(data: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
    h[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
    h
}

/// Whether a chunk file's bytes are intact.
fn check(bytes: &[u8]) -> Option<()> {
    let head = bytes.get(..HEADER)?;
    let data = &bytes[HEADER..];
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let len = u64::from_le_bytes(head[8..16].try_into().ok()?);
    (head[..4] == *MAGIC && len == data.len() as u64 && crc32fast::hash(data) == crc).then_some(())
}

/// Bytes `meta`'s file takes on disk: its allocated blocks, as `du` counts them.
fn on_disk(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    meta.blocks() * 512
}

/// What `du` counts for `dir`: the blocks of the directory and of everything in it, symlinks
/// not followed.
fn disk_usage(dir: &Path) -> u64 {
    let mut total = fs::symlink_metadata(dir).map_or(0, |m| on_disk(&m));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            total += on_disk(&meta);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Moves chunks kept under the earlier layout, `chunks/<2 hex>/<64 hex>`, up into the flat
/// directory, and removes the emptied subdirectories.
fn flatten_chunks(chunks: &Path) {
    let Ok(entries) = fs::read_dir(chunks) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if let Ok(inner) = fs::read_dir(entry.path()) {
            for chunk in inner.flatten() {
                let _ = fs::rename(chunk.path(), chunks.join(chunk.file_name()));
            }
        }
        let _ = fs::remove_dir(entry.path());
    }
}

/// A filesystem's size and free space, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FilesystemSpace {
    /// The allocation unit.
    pub block: u64,
    pub total: u64,
    /// Free for root.
    pub free: u64,
    /// Free for anyone.
    pub available: u64,
    pub files: u64,
    pub files_free: u64,
}

/// The cache's share of its filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheSpace {
    /// What the cache takes on disk.
    pub used: u64,
    /// What it may still take: the filesystem's available space, within the size limit.
    pub room: u64,
    pub filesystem: FilesystemSpace,
}

/// `statvfs` of the filesystem holding `path`.
fn space(path: &Path) -> io::Result<FilesystemSpace> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain integers; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok(FilesystemSpace {
        block: st.f_bsize as u64,
        total: st.f_blocks as u64 * unit,
        free: st.f_bfree as u64 * unit,
        available: st.f_bavail as u64 * unit,
        files: st.f_files as u64,
        files_free: st.f_ffree as u64,
    })
}

#[cfg(test)]
mod tests;
