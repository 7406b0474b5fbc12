//! Prefetch what the dynamic loader will read: when a reader reads the start of an ELF
//! program or library, the libraries it needs, and theirs, are fetched before the loader
//! asks for them.
//!
//! A starting container spends most of its misses in the loader: the program's first page,
//! then each library it needs, opened one after another, each a round trip to the registry
//! that waits for the one before (PHP loading its extensions measured 56 such first reads,
//! scattered over the layer, at 20 ms each). The names of those libraries are in the files
//! themselves. So when a reader's read of a file's first bytes shows ELF headers, this
//! module reads the program's dynamic section, finds each `DT_NEEDED` library the way the
//! loader does (the object's `DT_RUNPATH` or `DT_RPATH`, `$ORIGIN` expanded, then the
//! multiarch and default directories, symlinks followed within the image), and fetches, for
//! the whole set at once, each library's headers, its first segment (symbols, relocations)
//! and its writable segment (what relocation writes), then does the same with their
//! libraries: a few round trips per level of the dependency tree instead of a few per
//! library. The fetches are read-around fetches: readers that want those chunks meanwhile
//! wait for them, a failed one is fetched again by the reader, and they count as read-around
//! bytes.
//!
//! Libraries are looked up in the mount's own view: the whole image for `imgstream mount`,
//! the layer itself under the snapshotter (which mounts each layer on its own). A library in
//! another layer is then left to the reader. `ld.so.cache` is not read; a library found in
//! another directory than the loader picks costs its bytes, nothing else.

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

use super::tree::{Kind, Tree};
use crate::{
    fetch::{ChunkRef, Fetcher, Priority, layer::RemoteLayer},
    image::elf::{self, Dynamic, Object},
    oci::digest::Digest,
};

/// Files of one mount whose libraries are looked for at most.
const MAX_FILES: usize = 4096;
/// Programs waiting for their libraries to be looked for; more are left to their readers.
const QUEUE: usize = 64;
/// Bytes read for an object's headers.
const HEAD: u64 = 4096;
/// Bytes at a file's end fetched with its headers.
const TAIL: u64 = 64 << 10;
/// Bytes of an object's first and writable segments fetched at most.
const SEGMENT: u64 = 1 << 20;
/// Bytes one fetch holds at most (compressed and decompressed, as the budget counts).
const BATCH: u64 = 24 << 20;
/// Levels of libraries of libraries followed at most.
const MAX_DEPTH: usize = 16;
/// Directories of one `DT_RUNPATH` taken at most.
const MAX_SEARCH: usize = 16;

/// Looks for the libraries of the programs its mount's readers start.
pub(super) struct Loader {
    shared: Arc<Shared>,
    /// Started at the first program, so a mount with none has no thread.
    queue: OnceLock<Option<SyncSender<u64>>>,
}

struct Shared {
    tree: Arc<Tree>,
    layers: Arc<[RemoteLayer]>,
    fetcher: Arc<Fetcher>,
    deadline: Duration,
    /// Inodes whose libraries were looked for, or are being.
    seen: Mutex<HashSet<u64>>,
    /// Programs queued or being worked on (tests wait for 0).
    pending: AtomicUsize,
}

impl Loader {
    pub(super) fn new(
        tree: Arc<Tree>,
        layers: Arc<[RemoteLayer]>,
        fetcher: Arc<Fetcher>,
        deadline: Duration,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                tree,
                layers,
                fetcher,
                deadline,
                seen: Mutex::new(HashSet::new()),
                pending: AtomicUsize::new(0),
            }),
            queue: OnceLock::new(),
        }
    }

    /// A reader read the first bytes of `ino`, which are `head`: when they are ELF headers,
    /// its libraries are looked for, once per file, on the loader thread.
    pub(super) fn read_start(&self, ino: u64, head: &[u8]) {
        if !head.starts_with(elf::MAGIC) || !self.shared.first_time(ino) {
            return;
        }
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
            let shared = self.shared.clone();
            std::thread::Builder::new()
                .name("loader-prefetch".into())
                .spawn(move || shared.run(rx))
                .map_err(|err| tracing::warn!(%err, "no loader prefetch thread"))
                .ok()
                .map(|_| tx)
        });
        let Some(queue) = queue else { return };
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = queue.try_send(ino) {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Waits until every program queued so far was worked through, or `timeout` passes.
    #[cfg(test)]
    pub(super) fn wait_idle(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while self.shared.pending.load(Ordering::Acquire) > 0 {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// A file, and a range of it.
type Want<'f> = (&'f File, Range<u64>);

/// A file of the view: its inode, layer position and node index there, and size.
#[derive(Clone)]
struct File {
    layer: usize,
    node: usize,
    size: u64,
}

impl Shared {
    /// Marks `ino` as looked at; false when it was, or when the mount's bound is reached.
    fn first_time(&self, ino: u64) -> bool {
        let mut seen = crate::sync::lock(&self.seen);
        seen.len() < MAX_FILES && seen.insert(ino)
    }

    fn run(&self, queue: Receiver<u64>) {
        while let Ok(ino) = queue.recv() {
            // A panic here would end prefetching for the mount, never a read.
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.closure(ino);
            }));
            if done.is_err() {
                tracing::error!(ino, "looking for a program's libraries panicked");
            }
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn file(&self, ino: u64) -> Option<File> {
        let inode = self.tree.get(ino)?;
        let (layer, node) = inode.data?;
        Some(File {
            layer,
            node,
            size: inode.size,
        })
    }

    fn path(&self, file: &File) -> &str {
        &self.layers[file.layer].index.nodes[file.node].path
    }

    /// Fetches the libraries of `root`, then of those, level by level.
    fn closure(&self, root: u64) {
        let Some(root) = self.file(root) else { return };
        // The reader just read the headers (cached now): a static program needs nothing,
        // and its end is not fetched.
        let head = self.bytes(&[(&root, 0..HEAD)], &[]).pop().flatten();
        let dynamic = head
            .and_then(|head| Object::parse(&head, root.size))
            .is_some_and(|object| object.dynamic.is_some());
        if !dynamic {
            return;
        }
        let mut level = vec![root];
        for _ in 0..MAX_DEPTH {
            if level.is_empty() {
                return;
            }
            level = self.next_level(&level);
        }
    }

    /// For each of `files`: its headers (and its end), then its dynamic section with its
    /// first and writable segments, then the names of its libraries, each step one fetch for
    /// all of them. The libraries found, not looked at before.
    fn next_level(&self, files: &[File]) -> Vec<File> {
        let heads: Vec<Want<'_>> = files.iter().map(|f| (f, 0..HEAD)).collect();
        // The dynamic section is in the writable segment, which linkers put last: fetched
        // with the headers, the next step usually finds it cached and costs no round trip.
        let tails: Vec<Want<'_>> = files
            .iter()
            .map(|f| (f, f.size.saturating_sub(TAIL)..f.size))
            .collect();
        let heads = self.bytes(&heads, &tails);
        let objects: Vec<(&File, Object)> = files
            .iter()
            .zip(heads)
            .filter_map(|(f, head)| Some((f, Object::parse(&head?, f.size)?)))
            .collect();
        let mut dynamics = Vec::new();
        let mut segments = Vec::new();
        for (f, object) in &objects {
            let Some(dynamic) = object.dynamic.clone() else {
                continue;
            };
            let end = dynamic.end.min(dynamic.start + elf::MAX_DYNAMIC_BYTES);
            dynamics.push((*f, dynamic.start..end));
            // What the loader touches next, fetched for the cache only: the first segment
            // (symbol tables, relocations) and the writable ones.
            segments.extend(
                object
                    .loads
                    .iter()
                    .filter(|s| s.offset == 0 || s.writable)
                    .map(|s| (*f, s.offset..s.offset + s.file_size.min(SEGMENT))),
            );
        }
        let fetched = self.bytes(&dynamics, &segments);
        let parsed: Vec<(&File, &Object, Dynamic)> = objects
            .iter()
            .filter(|(_, o)| o.dynamic.is_some())
            .zip(fetched)
            .filter_map(|((f, o), bytes)| Some((*f, o, Dynamic::parse(&bytes?))))
            .collect();
        // Each object's string table, from its first library's name to its last one's.
        let tables: Vec<Option<(Want<'_>, u64)>> = parsed
            .iter()
            .map(|(f, object, dynamic)| {
                let at = object.file_offset(dynamic.strtab?.0)?;
                let span = dynamic.names_span()?;
                let range = at.checked_add(span.start)?..at.checked_add(span.end)?;
                Some(((*f, range), span.start))
            })
            .collect();
        let wanted: Vec<Want<'_>> = tables.iter().flatten().map(|(w, _)| w.clone()).collect();
        let mut fetched = self.bytes(&wanted, &[]).into_iter();
        let mut next = Vec::new();
        for ((f, object, dynamic), table) in parsed.iter().zip(&tables) {
            let Some((_, first)) = table else { continue };
            let Some(bytes) = fetched.next().flatten() else {
                continue;
            };
            let name = |offset: u64| elf::string_at(&bytes, offset.checked_sub(*first)?);
            let dirs = self.search_dirs(f, object, dynamic.search.and_then(name));
            for library in dynamic.needed.iter().filter_map(|&n| name(n)) {
                if library.contains('/') {
                    continue;
                }
                let found = dirs.iter().find_map(|dir| {
                    let inode = self.tree.resolve(format!("{dir}/{library}").as_bytes())?;
                    (inode.kind == Kind::Regular).then_some(inode.ino)
                });
                if let Some(file) = found
                    .filter(|&ino| self.first_time(ino))
                    .and_then(|ino| self.file(ino))
                {
                    next.push(file);
                }
            }
        }
        next
    }

    /// Where the loader looks for a library of `f`: its run path (`$ORIGIN` being `f`'s
    /// directory), the multiarch directories of its machine, the default ones.
    fn search_dirs(&self, f: &File, object: &Object, search: Option<&str>) -> Vec<String> {
        let origin = match self.path(f).rsplit_once('/') {
            Some((dir, _)) => format!("/{dir}"),
            None => "/".into(),
        };
        let mut dirs: Vec<String> = search
            .map(|search| {
                search
                    .split(':')
                    .take(MAX_SEARCH)
                    .map(|d| d.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(triplet) = object.triplet() {
            dirs.push(format!("/lib/{triplet}"));
            dirs.push(format!("/usr/lib/{triplet}"));
        }
        dirs.extend(["/lib64", "/usr/lib64", "/lib", "/usr/lib"].map(String::from));
        dirs
    }

    /// The chunks holding `range` of a file (clipped to the file).
    fn chunks_of<'s>(&'s self, (f, range): &Want<'_>) -> impl Iterator<Item = ChunkRef<'s>> {
        let layer = &self.layers[f.layer];
        let chunks = &layer.index.nodes[f.node].chunks;
        let (start, end) = (range.start.min(f.size), range.end.min(f.size));
        let first = chunks.partition_point(|c| c.file_offset + c.size <= start);
        let last = chunks.partition_point(|c| c.file_offset < end).max(first);
        chunks[first..last].iter().map(|chunk| ChunkRef {
            blob: layer.desc.digest,
            chunk,
        })
    }

    /// Fetches the chunks of `wants` and of `warm` together (read-around fetches, beside
    /// any reader's, in batches of at most [`BATCH`] bytes so that no fetch holds the
    /// memory budget readers need), then returns the bytes of each of `wants`; `None` for
    /// one that could not be fetched.
    fn bytes(&self, wants: &[Want<'_>], warm: &[Want<'_>]) -> Vec<Option<Vec<u8>>> {
        type Key = (Digest, u64);
        let key = |c: &ChunkRef<'_>| (c.blob, c.chunk.blob_offset);
        let wanted: HashSet<Key> = wants
            .iter()
            .flat_map(|w| self.chunks_of(w))
            .map(|c| key(&c))
            .collect();
        let mut unique = HashSet::new();
        let all: Vec<ChunkRef<'_>> = wants
            .iter()
            .chain(warm)
            .flat_map(|w| self.chunks_of(w))
            .filter(|c| unique.insert(key(c)))
            .collect();
        let deadline = Instant::now() + self.deadline;
        // What `wants` need is kept from the fetches; what is only warmed goes to the cache.
        let mut got: HashMap<Key, Arc<Vec<u8>>> = HashMap::new();
        let mut fetch = |batch: &[ChunkRef<'_>]| {
            // A failed batch costs only its chunks: readers fetch them.
            if let Ok(data) = self.fetcher.get(batch, Priority::ReadAround, deadline) {
                for (c, unit) in batch.iter().zip(data) {
                    if wanted.contains(&key(c)) {
                        got.insert(key(c), unit);
                    }
                }
            }
        };
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for c in all {
            let bytes = c.chunk.unit_len() + (c.chunk.blob_end - c.chunk.blob_offset);
            if !batch.is_empty() && batch_bytes + bytes > BATCH {
                fetch(&batch);
                batch.clear();
                batch_bytes = 0;
            }
            batch.push(c);
            batch_bytes += bytes;
        }
        if !batch.is_empty() {
            fetch(&batch);
        }
        wants
            .iter()
            .map(|want| {
                let (start, end) = (want.1.start.min(want.0.size), want.1.end.min(want.0.size));
                let mut out = Vec::with_capacity((end - start) as usize);
                for c in self.chunks_of(want) {
                    let part = c.chunk.slice(got.get(&key(&c))?)?;
                    let from = start.max(c.chunk.file_offset) - c.chunk.file_offset;
                    let to = end.min(c.chunk.file_offset + c.chunk.size) - c.chunk.file_offset;
                    out.extend_from_slice(part.get(from as usize..to as usize)?);
                }
                Some(out)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::{
        fetch::layer,
        fs::{FsConfig, ImageFs, View},
        image::tar::{Header, Kind as TarKind},
        registry::BlobSource,
        testing::{self, MemoryBlobs},
    };

    const LIBS: &str = "usr/lib/x86_64-linux-gnu";

    fn file(path: &str, data: Vec<u8>) -> (Header, Vec<u8>) {
        let mut h = Header::new(path, TarKind::Regular);
        h.mode = 0o755;
        (h, data)
    }

    fn symlink(path: &str, target: &str) -> (Header, Vec<u8>) {
        let mut h = Header::new(path, TarKind::Symlink);
        h.link_name = target.into();
        (h, Vec::new())
    }

    /// This machine's `ls` with the libraries it loads, laid out as a merged-/usr image does
    /// (`lib` a symlink to `usr/lib`, `libpcre2-8.so.0` a symlink to its versioned file),
    /// and a library nothing needs; 64 KiB chunks, served with every range counted.
    fn ls_image(
        runtime: &tokio::runtime::Runtime,
        dir: &std::path::Path,
        loader_prefetch: bool,
    ) -> (ImageFs, Arc<MemoryBlobs>) {
        let host = |name: &str| {
            std::fs::read(format!("/usr/lib/x86_64-linux-gnu/{name}"))
                .expect("a library of this Debian machine")
        };
        let pcre = std::fs::read_link("/usr/lib/x86_64-linux-gnu/libpcre2-8.so.0")
            .expect("libpcre2-8.so.0 is a symlink on Debian")
            .display()
            .to_string();
        let mut entries = vec![
            (Header::new("usr/", TarKind::Directory), Vec::new()),
            (Header::new("usr/bin/", TarKind::Directory), Vec::new()),
            file(
                "usr/bin/ls",
                std::fs::read("/usr/bin/ls").expect("this machine's ls"),
            ),
            symlink("lib", "usr/lib"),
            (Header::new("usr/lib/", TarKind::Directory), Vec::new()),
            (
                Header::new(&format!("{LIBS}/"), TarKind::Directory),
                Vec::new(),
            ),
            file(&format!("{LIBS}/libz.so.1"), host("libz.so.1")),
            file(&format!("{LIBS}/libselinux.so.1"), host("libselinux.so.1")),
            file(&format!("{LIBS}/libc.so.6"), host("libc.so.6")),
            symlink(&format!("{LIBS}/libpcre2-8.so.0"), &pcre),
            file(&format!("{LIBS}/{pcre}"), host(&pcre)),
            (Header::new("opt/", TarKind::Directory), Vec::new()),
            (Header::new("opt/app/", TarKind::Directory), Vec::new()),
            (Header::new("opt/app/bin/", TarKind::Directory), Vec::new()),
        ];
        // The `elf` fuzz target's seeds as programs: one that needs libc.so.6 and
        // libm.so.6 (not in this image) with run path `$ORIGIN/../lib` (not in it either),
        // and hostile ones.
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/elf");
        for seed in std::fs::read_dir(&seeds).expect("the elf fuzz seeds") {
            let seed = seed.expect("a directory entry").path();
            let name = seed
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .to_string();
            entries.push(file(
                &format!("opt/app/bin/{name}"),
                std::fs::read(&seed).expect("a committed seed"),
            ));
        }
        for (h, data) in &mut entries {
            h.size = data.len() as u64;
        }
        let (blob, summary) = testing::estargz_layer(&entries, 64 << 10, false);
        let desc = testing::layer_descriptor(&summary);
        let source = Arc::new(MemoryBlobs::default().with(blob));
        let opened = runtime
            .block_on(layer::open_cached(source.as_ref(), &desc, None))
            .expect("the layer opens");
        source.ranges.store(0, Ordering::SeqCst);
        let (_, cache) = testing::scratch_cache(&dir.display().to_string().replace('/', "-"));
        let blobs: Arc<dyn BlobSource> = source.clone();
        let fetcher = Arc::new(Fetcher::new(runtime.handle().clone(), blobs, cache));
        let fs = ImageFs::new(
            Arc::from(vec![opened]),
            View::Merged,
            fetcher,
            FsConfig {
                loader_prefetch,
                ..FsConfig::default()
            },
        );
        (fs, source)
    }

    /// Whether every chunk of `path` from `range` is cached (in memory or on disk).
    fn fetched(fs: &ImageFs, path: &str, range: Range<u64>) -> bool {
        let inode = fs.tree.resolve(path.as_bytes()).expect("in the image");
        let (l, n) = inode.data.expect("a regular file");
        let chunks = &fs.layers[l].index.nodes[n].chunks;
        chunks
            .iter()
            .filter(|c| c.file_offset < range.end && c.file_offset + c.size > range.start)
            .all(|c| fs.fetcher.cache().contains(&c.digest))
    }

    fn read_head(fs: &ImageFs, path: &str) -> Vec<u8> {
        let inode = fs
            .tree
            .resolve(path.as_bytes())
            .expect("in the image")
            .clone();
        let mut out = Vec::new();
        fs.read_into(&inode, &mut out, 4096, 0)
            .expect("the read succeeds");
        fs.fetcher.flush_cache_writes();
        out
    }

    #[test]
    fn reading_a_programs_headers_fetches_the_libraries_it_loads_and_theirs() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir = std::env::temp_dir().join(format!("imgstream-loader-{}", std::process::id()));
        let (fs, source) = ls_image(&runtime, &dir, true);
        let head = read_head(&fs, "/usr/bin/ls");
        assert_eq!(
            head,
            std::fs::read("/usr/bin/ls").expect("this machine's ls")[..4096]
        );
        assert!(
            fs.loader
                .as_ref()
                .expect("the loader prefetch is on")
                .wait_idle(Duration::from_secs(30))
        );
        fs.fetcher.flush_cache_writes();
        // ls needs libselinux and libc; libselinux needs libpcre2-8 (found through both
        // symlinks) and ld.so (not in this image: nothing to fetch). Each one's headers are
        // cached with nobody having read them; the library nothing needs is not.
        for lib in ["libselinux.so.1", "libc.so.6", "libpcre2-8.so.0"] {
            let path = format!("/lib/x86_64-linux-gnu/{lib}");
            assert!(fetched(&fs, &path, 0..4096), "{lib} was not fetched");
        }
        assert!(!fetched(&fs, &format!("/{LIBS}/libz.so.1"), 0..4096));
        // libc's writable segment too (what relocation writes), without reading it.
        let libc =
            std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").expect("this machine's libc");
        let object = Object::parse(&libc[..4096], libc.len() as u64).expect("libc is ELF");
        let data = object
            .loads
            .iter()
            .find(|s| s.writable)
            .expect("libc has a data segment");
        assert!(fetched(
            &fs,
            "/lib/x86_64-linux-gnu/libc.so.6",
            data.offset..data.offset + data.file_size.min(SEGMENT)
        ));
        // The loader then reads those libraries from the cache: no request.
        let requests = source.ranges.load(Ordering::SeqCst);
        for lib in ["libselinux.so.1", "libc.so.6", "libpcre2-8.so.0"] {
            read_head(&fs, &format!("/lib/x86_64-linux-gnu/{lib}"));
        }
        assert_eq!(source.ranges.load(Ordering::SeqCst), requests);
        // Each library is looked at once: reading them again queues nothing.
        assert_eq!(
            fs.loader
                .as_ref()
                .expect("the loader prefetch is on")
                .shared
                .pending
                .load(Ordering::SeqCst),
            0
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn with_the_prefetch_off_only_what_is_read_is_fetched() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir = std::env::temp_dir().join(format!("imgstream-loader-off-{}", std::process::id()));
        let (fs, source) = ls_image(&runtime, &dir, false);
        read_head(&fs, "/usr/bin/ls");
        assert!(fs.loader.is_none());
        assert_eq!(source.ranges.load(Ordering::SeqCst), 1);
        assert!(!fetched(&fs, "/lib/x86_64-linux-gnu/libc.so.6", 0..4096));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn run_paths_missing_libraries_and_hostile_programs_cost_no_more_than_their_bounds() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir = std::env::temp_dir().join(format!("imgstream-loader-bad-{}", std::process::id()));
        let (fs, source) = ls_image(&runtime, &dir, true);
        let loader = fs.loader.as_ref().expect("the loader prefetch is on");
        // Not ELF, a directory, an inode that does not exist: nothing fetched.
        loader.read_start(1, b"#!/bin/sh\n");
        assert_eq!(loader.shared.pending.load(Ordering::SeqCst), 0);
        loader.read_start(1, elf::MAGIC);
        loader.read_start(u64::MAX, elf::MAGIC);
        assert!(loader.wait_idle(Duration::from_secs(10)));
        assert_eq!(source.ranges.load(Ordering::SeqCst), 0);
        // A program whose run path names a directory the image lacks: its libc is found in
        // the multiarch directory after it, its libm nowhere (left to the loader).
        read_head(&fs, "/opt/app/bin/program.bin");
        assert!(loader.wait_idle(Duration::from_secs(30)));
        fs.fetcher.flush_cache_writes();
        assert!(fetched(&fs, "/usr/lib/x86_64-linux-gnu/libc.so.6", 0..4096));
        // Hostile programs (65,535 program headers; a dynamic section of 5,000 DT_NEEDED
        // entries pointing past any table and no end; segments and tables far beyond the
        // file; names with no end): each read is answered, the loader goes idle, and
        // nothing but their own bytes is fetched.
        for name in [
            "hostile-phnum.bin",
            "hostile-endless-dynamic.bin",
            "hostile-far.bin",
            "hostile-unterminated.bin",
        ] {
            let before = source.ranges.load(Ordering::SeqCst);
            read_head(&fs, &format!("/opt/app/bin/{name}"));
            assert!(loader.wait_idle(Duration::from_secs(30)), "{name}");
            assert!(
                source.ranges.load(Ordering::SeqCst) - before <= 2,
                "{name}: its head and end at most"
            );
        }
        assert!(!fetched(
            &fs,
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
            0..4096
        ));
        // Each file is looked at once: reading its head again queues nothing.
        read_head(&fs, "/opt/app/bin/program.bin");
        assert_eq!(loader.shared.pending.load(Ordering::SeqCst), 0);
        // Past the bound of files per mount, nothing more is looked at.
        for ino in 10_000..10_000 + MAX_FILES as u64 {
            loader.shared.first_time(ino);
        }
        assert!(!loader.shared.first_time(5));
        let _ = std::fs::remove_dir_all(dir);
    }
}
