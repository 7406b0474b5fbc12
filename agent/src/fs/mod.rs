//! The image filesystem: one `fuse_backend_rs` `FileSystem` implementation over an image's
//! layers, read-only, in the merged or one-layer view ([`tree`]). File data comes from the
//! [`Fetcher`] (cache, else the registry, chunk by chunk); metadata comes from the layers'
//! TOCs and is all in memory, so `ls -l` never touches the network.
//!
//! Transports ([`fusedev`] for host mounts, [`virtiofs`] for VMs) only move messages to and
//! from this type.

pub(crate) mod ahead;
pub mod fusedev;
pub mod keeper;
mod loader;
pub use loader::OtherLayers;
pub mod options;
pub mod passthrough;

pub mod tree;
pub mod virtiofs;

use std::{
    ffi::CStr,
    io,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fuse_backend_rs::{
    abi::fuse_abi::{FsOptions, OpenOptions, stat64, statvfs64},
    api::filesystem::{
        Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyWriter,
    },
};

pub use tree::{Kind, Tree, View};

use crate::{
    fetch::{ChunkRef, Fetcher, layer::RemoteLayer, readaround::ReadAroundConfig},
    image::reads::{MAX_RECORDS, RecordedRead},
};

/// How long the kernel may cache names and attributes: the image never changes.
const TTL: Duration = Duration::from_secs(3600);
/// A read that waited longer than this for its chunks is traced (target `imgstream::reads`).
const SLOW_READ: Duration = Duration::from_millis(2);

/// Filesystem options.
#[derive(Clone, Copy, Debug)]
pub struct FsConfig {
    /// A read waiting on the network fails with EIO after this long.
    pub read_deadline: Duration,
    /// Keep a record of every file read ([`ImageFs::recorded_reads`]).
    pub record_reads: bool,
    /// What a miss fetches besides the chunks it needs.
    pub read_around: ReadAroundConfig,
    /// Fetch the libraries a program needs when a reader reads its ELF headers
    /// ([`loader`]).
    pub loader_prefetch: bool,
    /// Fetch the code the loader prefetch finds too large to fetch whole in pieces while
    /// the link idles ([`crate::fetch`]'s idle fill).
    pub idle_fill: bool,
    /// What INIT asks the kernel for ([`options`]).
    pub fuse_options: options::FuseOptions,
    /// Ask for FUSE passthrough (Linux 6.9): opens of cached files handed to backing files
    /// ([`passthrough`]). Only the FUSE transport can; it costs the no-open option.
    pub passthrough: bool,
    /// Read cached files ahead of a reader going through a directory ([`ahead`]).
    pub dir_readahead: bool,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            read_deadline: Duration::from_secs(30),
            record_reads: false,
            read_around: ReadAroundConfig::default(),
            loader_prefetch: true,
            idle_fill: true,
            fuse_options: options::FuseOptions::default(),
            passthrough: true,
            dir_readahead: true,
        }
    }
}

/// Requests counted by kind: what shows which FUSE options the kernel took.
#[derive(Debug, Default)]
pub(crate) struct Asked {
    pub(crate) open: std::sync::atomic::AtomicU64,
    /// READs: none for a file opened in passthrough mode.
    pub(crate) read: std::sync::atomic::AtomicU64,
    pub(crate) opendir: std::sync::atomic::AtomicU64,
    pub(crate) readdir: std::sync::atomic::AtomicU64,
    pub(crate) readdirplus: std::sync::atomic::AtomicU64,
}

/// Counts one request in `counter`.
fn asked(counter: &std::sync::atomic::AtomicU64) {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// A read, as recorded: layer, node in that layer's index, offset, size.
type Read = (usize, usize, u64, u32);

/// Requests (of every image this process serves) whose handling panicked: each was answered
/// with EIO and its worker went on. Exported as `imgstream_fs_request_panics_total`.
pub static REQUEST_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs one request's handler; a panic inside it becomes EIO for that request alone, logged
/// with what was asked and counted. The worker thread (FUSE or virtio-fs) and every lock the
/// handler held stay usable (`crate::sync`'s policy), so the mount keeps serving.
fn guarded<T>(
    op: &'static str,
    ino: u64,
    offset: u64,
    handler: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)) {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            REQUEST_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(op, ino, offset, panic = %what, "a request panicked; answered with EIO");
            Err(errno(libc::EIO))
        }
    }
}

/// An image, served as a read-only filesystem.
pub struct ImageFs {
    tree: Arc<Tree>,
    layers: Arc<[RemoteLayer]>,
    fetcher: Arc<Fetcher>,
    config: FsConfig,
    /// Reads in the order they came, when recording (at most `reads::MAX_RECORDS`).
    recorded: Option<Mutex<Vec<Read>>>,
    /// Fetches the libraries of programs readers start.
    loader: Option<loader::Loader>,
    /// Whether the kernel takes ENOSYS to OPEN (OPENDIR) as "never ask again": set at INIT
    /// when it offers that and the config asks for it.
    no_open: std::sync::atomic::AtomicBool,
    no_opendir: std::sync::atomic::AtomicBool,
    /// Requests of the kinds the FUSE options spare, as the kernel sent them.
    pub(crate) asked: Asked,
    /// Opens of complete files handed to backing files.
    passthrough: passthrough::Passthrough,
    /// Reads cached files ahead of readers going through directories.
    ahead: Option<ahead::DirAhead>,
    /// Tests: the next read panics (to show a panicking request is answered).
    #[cfg(test)]
    pub(crate) panic_next_read: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ImageFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageFs")
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl ImageFs {
    /// The `view` of `layers` (bottom first), reading data through `fetcher`.
    pub fn new(
        layers: Arc<[RemoteLayer]>,
        view: View,
        fetcher: Arc<Fetcher>,
        config: FsConfig,
    ) -> Self {
        let indexes: Vec<_> = layers.iter().map(|l| &l.index).collect();
        let tree = Arc::new(Tree::build(&indexes, view));
        let loader = config.loader_prefetch.then(|| {
            loader::Loader::new(
                tree.clone(),
                layers.clone(),
                fetcher.clone(),
                (config.read_deadline, config.idle_fill),
            )
        });
        let passthrough = passthrough::Passthrough::new(fetcher.cache().clone());
        let ahead = config
            .dir_readahead
            .then(|| ahead::DirAhead::new(tree.clone(), layers.clone(), fetcher.cache().clone()));
        Self {
            ahead,
            tree,
            layers,
            fetcher,
            loader,
            recorded: config.record_reads.then(Default::default),
            config,
            no_open: Default::default(),
            no_opendir: Default::default(),
            asked: Asked::default(),
            passthrough,
            #[cfg(test)]
            panic_next_read: Default::default(),
        }
    }

    /// Starts the loader prefetch's walk from the image's program before any reader starts
    /// it: the first of `candidates` (absolute paths, as [`crate::oci::config::Run`] lists
    /// them) that is a regular file of this view. Returns its path; `None` when none is, or
    /// the prefetch is off.
    pub fn walk_from_program(&self, candidates: &[String]) -> Option<String> {
        let loader = self.loader.as_ref()?;
        let (path, inode) = candidates.iter().find_map(|path| {
            let inode = self.tree.resolve(path.as_bytes())?;
            (inode.kind == tree::Kind::Regular && inode.data.is_some()).then_some((path, inode))
        })?;
        loader.walk_from_program(inode.ino);
        Some(path.clone())
    }

    /// Sets where the loader prefetch looks for libraries this view lacks: the image's
    /// other layers, each mounted on its own (the snapshotter's views are one layer each,
    /// and a program's libraries are often in another layer than the program).
    pub fn set_other_layers(&self, elsewhere: OtherLayers) {
        if let Some(loader) = &self.loader {
            loader.set_other_layers(elsewhere);
        }
    }

    /// Starts the loader prefetch's walk from the libraries of `wanted` that are regular
    /// files of this view (each library as the paths it may be at, the first one here
    /// taken), all in one walk. Returns, for each, whether it is here.
    pub fn walk_from_libraries(&self, wanted: &[Vec<String>]) -> Vec<bool> {
        let found: Vec<Option<u64>> = wanted
            .iter()
            .map(|paths| {
                paths.iter().find_map(|path| {
                    let inode = self.tree.resolve(path.as_bytes())?;
                    (inode.kind == tree::Kind::Regular && inode.data.is_some()).then_some(inode.ino)
                })
            })
            .collect();
        if let Some(loader) = &self.loader {
            let inos: Vec<u64> = found.iter().flatten().copied().collect();
            if !inos.is_empty() {
                loader.walk_from_libraries(&inos);
            }
        }
        found.iter().map(Option::is_some).collect()
    }

    /// The reads recorded so far (with [`FsConfig::record_reads`]), in the order they came,
    /// each with its layer's index in the image and the file's path in that layer.
    pub fn recorded_reads(&self) -> Vec<RecordedRead> {
        let Some(recorded) = &self.recorded else {
            return Vec::new();
        };
        let recorded = crate::sync::lock(recorded);
        recorded
            .iter()
            .map(|&(layer, node, offset, size)| RecordedRead {
                layer,
                path: self.layers[layer].index.nodes[node].path.clone(),
                offset,
                size: size.into(),
            })
            .collect()
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Gives the mount's FUSE connection to passthrough, which registers backing files on
    /// it. Until then (and without it) every open is served through the agent.
    pub fn attach_fuse_device(&self, device: std::os::fd::OwnedFd) {
        self.passthrough.attach(device);
    }

    /// Files whose cached bytes the directory read-ahead asked into the page cache.
    #[cfg(test)]
    pub(crate) fn dir_ahead_files(&self) -> u64 {
        self.ahead.as_ref().map_or(0, |a| {
            a.stats.files.load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// Whether INIT enabled FUSE passthrough and it still works.
    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.enabled()
    }

    /// Which path opens took, and the backing files written.
    pub fn passthrough_stats(&self) -> &passthrough::PassthroughStats {
        &self.passthrough.stats
    }

    /// Backing files queued and not written yet.
    pub fn passthrough_pending(&self) -> usize {
        self.passthrough.pending()
    }

    /// Keeps the passthrough open counts in a ledger file at `path` for FUSE connection
    /// `connection` (see [`passthrough::ledger`]), so that the next agent on the connection
    /// goes on from them even if this one is killed. Nothing when passthrough is not asked
    /// for.
    pub fn keep_passthrough_ledger(&self, path: &Path, connection: u64) -> io::Result<()> {
        if !self.config.passthrough {
            return Ok(());
        }
        let ledger = passthrough::ledger::Ledger::create(path, connection, self.inode_slots())?;
        self.passthrough.keep_ledger(ledger);
        Ok(())
    }

    /// Goes on with passthrough on an adopted connection `connection`, on `device`, from the
    /// ledger at `path` the previous agent kept (or the table an agent before the ledger
    /// wrote there), and keeps the ledger from here on. Returns whether it did: without
    /// either, every open is served through the agent (the modes the kernel has open files
    /// in are unknown).
    pub fn take_over_passthrough(
        &self,
        path: &Path,
        connection: u64,
        device: std::os::fd::OwnedFd,
    ) -> bool {
        use passthrough::ledger::Ledger;
        if !self.config.passthrough {
            return false;
        }
        let is_file = |ino| {
            self.tree
                .get(ino)
                .is_some_and(|inode| inode.kind == Kind::Regular)
        };
        let slots = self.inode_slots();
        let ledger = match Ledger::open(path, connection, slots) {
            // INIT never enabled it on this connection: the kernel would refuse every
            // backing file.
            Ok(Some(ledger)) if !ledger.negotiated() => return false,
            Ok(Some(ledger)) => {
                let lines: Vec<_> = ledger.lines().collect();
                if self
                    .passthrough
                    .take_over(lines.into_iter(), is_file)
                    .is_none()
                {
                    return false;
                }
                Some(ledger)
            }
            Ok(None) => {
                let taken = std::fs::read_to_string(path)
                    .ok()
                    .as_deref()
                    .and_then(passthrough::parse_table)
                    .and_then(|lines| self.passthrough.take_over(lines.into_iter(), is_file));
                if taken.is_none() {
                    return false;
                }
                Ledger::create(path, connection, slots)
                    .inspect_err(|err| tracing::warn!(%err, path = %path.display(), "no passthrough ledger: a crash of this agent will leave files held open in passthrough mode failing to open"))
                    .ok()
            }
            Err(err) => {
                tracing::warn!(%err, path = %path.display(), "no passthrough ledger to go on from");
                return false;
            }
        };
        self.passthrough.set_negotiated(true);
        if let Some(ledger) = ledger {
            self.passthrough.keep_ledger(ledger);
        }
        self.passthrough.attach(device);
        true
    }

    /// Inode numbers the tree uses are below this.
    fn inode_slots(&self) -> u64 {
        self.tree.iter().map(|inode| inode.ino).max().unwrap_or(0) + 1
    }

    fn inode(&self, ino: u64) -> io::Result<&tree::Inode> {
        self.tree.get(ino).ok_or_else(|| errno(libc::ENOENT))
    }

    fn stat(&self, inode: &tree::Inode) -> stat64 {
        // SAFETY: stat64 is plain integers; all-zero is a valid value.
        let mut st: stat64 = unsafe { std::mem::zeroed() };
        let (type_bits, rdev) = match inode.kind {
            Kind::Directory => (libc::S_IFDIR, 0),
            Kind::Regular => (libc::S_IFREG, 0),
            Kind::Symlink(_) => (libc::S_IFLNK, 0),
            Kind::CharDevice(ma, mi) => (libc::S_IFCHR, libc::makedev(ma, mi)),
            Kind::BlockDevice(ma, mi) => (libc::S_IFBLK, libc::makedev(ma, mi)),
            Kind::Fifo => (libc::S_IFIFO, 0),
        };
        st.st_ino = inode.ino;
        st.st_mode = type_bits | (inode.mode & 0o7777);
        st.st_nlink = inode.nlink.into();
        st.st_uid = inode.uid;
        st.st_gid = inode.gid;
        st.st_rdev = rdev;
        st.st_size = inode.size as i64;
        st.st_blksize = 4096;
        st.st_blocks = inode.size.div_ceil(512) as i64;
        for (secs, nsecs) in [
            (&mut st.st_mtime, &mut st.st_mtime_nsec),
            (&mut st.st_ctime, &mut st.st_ctime_nsec),
            (&mut st.st_atime, &mut st.st_atime_nsec),
        ] {
            *secs = inode.mtime.0;
            *nsecs = inode.mtime.1.into();
        }
        st
    }

    fn entry(&self, inode: &tree::Inode) -> Entry {
        Entry {
            inode: inode.ino,
            generation: 0,
            attr: self.stat(inode),
            attr_flags: 0,
            attr_timeout: TTL,
            entry_timeout: TTL,
        }
    }

    /// The entries of directory `ino` from position `offset`, into `add_entry`.
    fn list(
        &self,
        ino: u64,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let dir = self.inode(ino)?;
        if dir.kind != Kind::Directory {
            return Err(errno(libc::ENOTDIR));
        }
        let dots = [(b".".as_slice(), dir.ino), (b"..".as_slice(), dir.parent)];
        let children = dir
            .children
            .iter()
            .map(|(name, &child)| (name.as_slice(), child));
        for (i, (name, child)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(offset as usize)
        {
            let type_ = match self.tree.get(child).map(|c| &c.kind) {
                Some(Kind::Directory) => libc::DT_DIR,
                Some(Kind::Regular) => libc::DT_REG,
                Some(Kind::Symlink(_)) => libc::DT_LNK,
                Some(Kind::CharDevice(..)) => libc::DT_CHR,
                Some(Kind::BlockDevice(..)) => libc::DT_BLK,
                Some(Kind::Fifo) => libc::DT_FIFO,
                None => libc::DT_UNKNOWN,
            };
            let entry = DirEntry {
                ino: child,
                offset: i as u64 + 1,
                type_: type_.into(),
                name,
            };
            if add_entry(entry)? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Bytes `[offset, offset + size)` of a regular file into `w`.
    fn read_into(
        &self,
        inode: &tree::Inode,
        w: &mut dyn io::Write,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        let Some((layer, node_index)) = inode.data else {
            return Err(errno(libc::EISDIR));
        };
        if offset >= inode.size || size == 0 {
            return Ok(0);
        }
        let end = inode.size.min(offset + u64::from(size));
        let remote = &self.layers[layer];
        let node = &remote.index.nodes[node_index];
        let first = node
            .chunks
            .partition_point(|c| c.file_offset + c.size <= offset);
        let last = node.chunks.partition_point(|c| c.file_offset < end);
        let refs: Vec<ChunkRef<'_>> = node.chunks[first..last]
            .iter()
            .map(|chunk| ChunkRef {
                blob: remote.desc.digest,
                chunk,
            })
            .collect();
        tracing::trace!(
            target: "imgstream::reads",
            ino = inode.ino,
            offset,
            size,
            chunks = last - first,
            "read"
        );
        if let Some(recorded) = &self.recorded {
            let mut recorded = crate::sync::lock(recorded);
            if recorded.len() < MAX_RECORDS {
                recorded.push((layer, node_index, offset, size));
            }
        }
        if let Some(loader) = &self.loader {
            if offset == 0 {
                loader.read_asked(inode.ino);
            }
            loader.read_in((layer, node_index), offset);
        }
        let asked = Instant::now();
        let deadline = asked + self.config.read_deadline;
        let data = self
            .fetcher
            .read(&refs, (remote, node_index), deadline)
            .map_err(|err| {
                let err = crate::error_chain(&err);
                tracing::warn!(%err, ino = inode.ino, offset, "read failed");
                errno(libc::EIO)
            })?;
        let waited = asked.elapsed();
        if waited > SLOW_READ {
            tracing::trace!(
                target: "imgstream::reads",
                path = node.path,
                offset,
                size,
                secs = waited.as_secs_f64(),
                "read waited"
            );
        }
        let mut written = 0;
        for (i, (chunk, bytes)) in node.chunks[first..last].iter().zip(&data).enumerate() {
            let from = offset.max(chunk.file_offset) - chunk.file_offset;
            let to = end.min(chunk.file_offset + chunk.size) - chunk.file_offset;
            // The fetcher checks every chunk's length against the TOC; a slice out of range
            // would still be an EIO here, never a panic in a worker.
            let part = chunk
                .slice(bytes)
                .and_then(|part| part.get(from as usize..to as usize))
                .ok_or_else(|| errno(libc::EIO))?;
            if i == 0
                && offset == 0
                && let Some(loader) = &self.loader
            {
                loader.read_start(inode.ino, part);
            }
            w.write_all(part)?;
            written += (to - from) as usize;
        }
        Ok(written)
    }
}

impl FileSystem for ImageFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut want = self.config.fuse_options.flags();
        let passthrough = self.config.passthrough && capable.contains(FsOptions::PASSTHROUGH);
        if passthrough {
            // Passthrough is decided at OPEN, which no-open would never send; the flag
            // lives in INIT's second word.
            want.remove(FsOptions::ZERO_MESSAGE_OPEN);
            want |= FsOptions::PASSTHROUGH | FsOptions::INIT_EXT;
        }
        let enabled = capable & want;
        use std::sync::atomic::Ordering::Relaxed;
        self.no_open
            .store(enabled.contains(FsOptions::ZERO_MESSAGE_OPEN), Relaxed);
        self.no_opendir
            .store(enabled.contains(FsOptions::ZERO_MESSAGE_OPENDIR), Relaxed);
        self.passthrough.set_negotiated(passthrough);
        let names = options::FuseOptions::from_flags(enabled).names();
        let why = match (self.config.passthrough, passthrough) {
            (_, true) => "cached files are read by the kernel from backing files",
            (false, _) => "turned off",
            (true, false) => {
                "the kernel does not offer it (Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)"
            }
        };
        tracing::info!(options = ?names, passthrough, why, "FUSE options negotiated");
        Ok(want)
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        guarded("lookup", parent, 0, || {
            let inode = self
                .tree
                .lookup(parent, name.to_bytes())
                .ok_or_else(|| errno(libc::ENOENT))?;
            Ok(self.entry(inode))
        })
    }

    fn getattr(
        &self,
        _ctx: &Context,
        ino: u64,
        _handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        guarded("getattr", ino, 0, || Ok((self.stat(self.inode(ino)?), TTL)))
    }

    fn readlink(&self, _ctx: &Context, ino: u64) -> io::Result<Vec<u8>> {
        guarded("readlink", ino, 0, || match &self.inode(ino)?.kind {
            Kind::Symlink(target) => Ok(target.clone()),
            _ => Err(errno(libc::EINVAL)),
        })
    }

    fn open(
        &self,
        _ctx: &Context,
        ino: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        asked(&self.asked.open);
        guarded("open", ino, 0, || {
            let inode = self.inode(ino)?;
            if (flags as i32 & libc::O_ACCMODE) != libc::O_RDONLY
                || flags as i32 & libc::O_TRUNC != 0
            {
                return Err(errno(libc::EROFS));
            }
            if inode.kind == Kind::Directory {
                return Err(errno(libc::EISDIR));
            }
            if self.no_open.load(std::sync::atomic::Ordering::Relaxed) {
                // The kernel opens every file from now on without asking, keeping its page
                // cache (a write open of the read-only mount never gets this far).
                return Err(errno(libc::ENOSYS));
            }
            if let Some(ahead) = &self.ahead {
                ahead.opened(ino, self.passthrough.enabled());
            }
            if let Some((layer, node)) = inode.data {
                let node = &self.layers[layer].index.nodes[node];
                if let passthrough::Open::Backing(id) = self.passthrough.open(ino, node) {
                    // Alone: the kernel refuses passthrough opens with page cache flags.
                    return Ok((
                        Some(passthrough::PASSTHROUGH_HANDLE),
                        OpenOptions::PASSTHROUGH,
                        Some(id),
                    ));
                }
            }
            // The content never changes: let the kernel keep its page cache across opens.
            Ok((None, OpenOptions::KEEP_CACHE, None))
        })
    }
    fn read(
        &self,
        _ctx: &Context,
        ino: u64,
        _handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        asked(&self.asked.read);
        guarded("read", ino, offset, || {
            #[cfg(test)]
            if self
                .panic_next_read
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                panic!("injected by a test");
            }
            let inode = self.inode(ino)?;
            // With no OPEN sent, a file's first read is the sign that a reader opened it.
            if offset == 0
                && let Some(ahead) = &self.ahead
                && self.no_open.load(std::sync::atomic::Ordering::Relaxed)
            {
                ahead.opened(ino, false);
            }
            self.read_into(inode, w, size, offset)
        })
    }

    fn release(
        &self,
        _ctx: &Context,
        ino: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        guarded("release", ino, 0, || {
            self.passthrough.release(ino, handle);
            Ok(())
        })
    }

    fn opendir(
        &self,
        _ctx: &Context,
        ino: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        asked(&self.asked.opendir);
        guarded("opendir", ino, 0, || match self.inode(ino)?.kind {
            // From now on the kernel opens directories without asking, caching listings.
            Kind::Directory if self.no_opendir.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(errno(libc::ENOSYS))
            }
            Kind::Directory => Ok((None, OpenOptions::CACHE_DIR)),
            _ => Err(errno(libc::ENOTDIR)),
        })
    }

    fn readdir(
        &self,
        _ctx: &Context,
        ino: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        asked(&self.asked.readdir);
        guarded("readdir", ino, offset, || self.list(ino, offset, add_entry))
    }

    /// Entries with their attributes: the kernel needs no LOOKUP for what it listed.
    fn readdirplus(
        &self,
        _ctx: &Context,
        ino: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        asked(&self.asked.readdirplus);
        guarded("readdirplus", ino, offset, || {
            self.list(ino, offset, &mut |entry| {
                // `.` and `..` are not looked up by the kernel from a listing: an entry
                // with inode 0 is what it skips.
                let plus = match (entry.name, self.tree.get(entry.ino)) {
                    ([b'.'] | [b'.', b'.'], _) | (_, None) => Entry {
                        inode: 0,
                        ..self.entry(self.inode(ino)?)
                    },
                    (_, Some(child)) => self.entry(child),
                };
                add_entry(entry, plus)
            })
        })
    }

    fn releasedir(&self, _ctx: &Context, _ino: u64, _flags: u32, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        ino: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        guarded("getxattr", ino, 0, || {
            let inode = self.inode(ino)?;
            let name = name.to_str().map_err(|_| errno(libc::ENODATA))?;
            let value = inode.xattrs.get(name).ok_or_else(|| errno(libc::ENODATA))?;
            if size == 0 {
                return Ok(GetxattrReply::Count(value.len() as u32));
            }
            if value.len() > size as usize {
                return Err(errno(libc::ERANGE));
            }
            Ok(GetxattrReply::Value(value.clone()))
        })
    }

    fn listxattr(&self, _ctx: &Context, ino: u64, size: u32) -> io::Result<ListxattrReply> {
        guarded("listxattr", ino, 0, || {
            let inode = self.inode(ino)?;
            let mut names = Vec::new();
            for name in inode.xattrs.keys() {
                names.extend_from_slice(name.as_bytes());
                names.push(0);
            }
            if size == 0 {
                return Ok(ListxattrReply::Count(names.len() as u32));
            }
            if names.len() > size as usize {
                return Err(errno(libc::ERANGE));
            }
            Ok(ListxattrReply::Names(names))
        })
    }

    /// The disk behind the mount: what the chunk cache takes on it (used) and the room it
    /// has left there (free), so `df` on a lazy layer, and kubelet through it, see the space
    /// streaming really uses; inodes are the image's own, none free (it is read-only).
    fn statfs(&self, _ctx: &Context, _ino: u64) -> io::Result<statvfs64> {
        const UNIT: u64 = 4096;
        // SAFETY: statvfs64 is plain integers; all-zero is a valid value.
        let mut st: statvfs64 = unsafe { std::mem::zeroed() };
        let space = self.fetcher.cache().space().unwrap_or_default();
        let (used, room) = (space.used.div_ceil(UNIT), space.room / UNIT);
        st.f_bsize = UNIT;
        st.f_frsize = UNIT;
        st.f_blocks = used + room;
        st.f_bfree = room;
        st.f_bavail = room;
        st.f_files = self.tree.iter().count() as u64;
        st.f_namemax = 255;
        Ok(st)
    }

    fn access(&self, _ctx: &Context, ino: u64, mask: u32) -> io::Result<()> {
        guarded("access", ino, 0, || {
            self.inode(ino)?;
            if mask as i32 & libc::W_OK != 0 {
                return Err(errno(libc::EROFS));
            }
            Ok(())
        })
    }
}
