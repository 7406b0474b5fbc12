//! Prefetch what the dynamic loader will read: when a reader reads the start of an ELF
//! program or library, the libraries it needs, and theirs, are fetched before the loader
//! asks for them.
//!
//! A starting container spends most of its misses in the loader: the program's first page,
//! then each library it needs, opened one after another, each a round trip to the registry
//! that waits for the one before (PHP loading its extensions measured 56 such first reads,
//! scattered over the layer, at 20 ms each). The names of those libraries are in the files
//! themselves. So when a reader's read of a file's first bytes shows ELF headers, this
//! module first fetches the program's interpreter (`PT_INTERP`, which the kernel starts
//! before anything else), then reads the program's dynamic section, finds each `DT_NEEDED`
//! library the way the loader does (the object's `DT_RUNPATH` or `DT_RPATH`, `$ORIGIN`
//! expanded, then the multiarch and default directories, symlinks followed within the
//! image), and fetches each library's headers and end (where the dynamic section and the
//! names are), then does the same with their libraries: a round trip or two per level of the
//! dependency tree instead of a few per library. A walk's files are looked at by a few
//! threads, each file as soon as the one that needs it was (not when the slowest file of its
//! level arrives: over a link they arrive at different times, and the loader goes down one
//! chain after another), in the order they were found, breadth first, as the loader opens
//! them. Each file's first segment (symbols, relocations) and writable segments (what
//! relocation writes) are only warmed: fetched as guesses that wait in line for the link
//! ([`crate::fetch`]'s link gate) while the walk goes on.
//!
//! Every program or library a reader starts roots a walk of its own, on a thread of its own
//! ([`MAX_WALKS`] at once), even when another walk found it before: the dynamic loader maps
//! a module's libraries breadth first, one after another, so the walk rooted where the
//! program is stays a level ahead of it, whatever wider walk is still behind. Two walks
//! wanting the same chunk fetch it once. The fetches are read-around fetches: readers that
//! want those chunks meanwhile wait for them, a failed one is fetched again by the reader,
//! and they count as read-around bytes.
//!
//! Two guesses go with it. A module a program opens itself (`dlopen`: PHP's extensions,
//! Apache's modules), read from a directory that is not one the loader searches, is rarely
//! alone: the program opens the others of its directory one after another, each with its
//! own libraries. So the first one a program asks for brings its directory's other modules
//! (up to [`MAX_SIBLINGS`]) into a wide walk of their own, as it asks (its name tells; its
//! headers are not waited for), whose requests are all guesses in line
//! (the program promotes those it comes to wait for), and their libraries are fetched
//! together instead of module after module; when a round trip is worth more link time
//! than a module's head and end (a bandwidth-delay product of at least [`HEAD`] +
//! [`TAIL`]: 5 ms at 100 Mbit/s), since nearer than that the walk's bytes only crowd out
//! what the program reads meanwhile (measured at 0 ms: 2.63 s against 2.20 s before it). And the code an object's constructors and
//! callers run, and the constant data they read, are touched page by page, each page a
//! miss that waits a round trip (a trace of PHP's start 50 ms away: 30 such misses in
//! libraries whose headers had been fetched): a read-only segment no larger than a few
//! bandwidth-delay products of the link costs less link time to fetch whole than the round
//! trips its misses would wait, so it is fetched, on a thread of its own
//! that the walk does not wait for, as guesses in line; but for the unwind tables at the
//! end of the constant data (`PT_GNU_EH_FRAME` on, 40-55 % of that segment in libc, PHP and
//! ICU), which only an exception or a backtrace reads (lld puts constant data and tables in
//! the first segment, warmed with the headers: they are left out there too). How many
//! products grows with the round trip ([`code_bdps`]): most libraries' code is touched in
//! a few pages, and where a round trip is short the start is bound by the link, which the
//! rest of a segment fetched whole takes from what the program reads. On a link with no
//! round trip to speak of (loopback, a local layout) none is, and larger ones are left to
//! their readers.
//!
//! Libraries are looked up in the mount's own view: the whole image for `imgstream mount`,
//! the layer itself under the snapshotter (which mounts each layer on its own). A library in
//! another layer is then left to the reader. `ld.so.cache` is not read; a library found in
//! another directory than the loader picks costs its bytes, nothing else.

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    sync::{
        Arc, Condvar, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender},
    },
    time::{Duration, Instant},
};

use super::tree::{Kind, Tree};
use crate::{
    fetch::{ChunkRef, Fetcher, Line, Priority, layer::RemoteLayer},
    image::elf::{self, Dynamic, Object},
    oci::digest::Digest,
};

/// Files of one mount whose libraries are looked for at most.
const MAX_FILES: usize = 4096;
/// Walks running at once; a program read while this many run is left to the others.
const MAX_WALKS: usize = 4;
/// Bytes read for an object's headers.
const HEAD: u64 = 4096;
/// Bytes at a file's end fetched with its headers.
const TAIL: u64 = 64 << 10;
/// Bytes of an object's first and writable segments fetched at most.
const SEGMENT: u64 = 1 << 20;
/// Bytes at the start of an object's code fetched with its segments: the loader runs
/// `.init` and the constructors linkers put first in the code (`.text.startup`), and a fault
/// there reads 128 KiB ahead (a 50 ms trace of PHP's start: six faults at the first code
/// page of libraries whose headers and segments had been fetched, 0.07-0.18 s each).
const CODE_START: u64 = 128 << 10;
/// Levels of libraries of libraries followed at most.
const MAX_DEPTH: usize = 16;
/// Threads of one walk looking at the files it found at once, each taking its share of
/// those waiting (`bench e2e`, PHP's start 50 ms away, 3 cold starts each, medians, one
/// bench run per setting: 8 threads 3.50 s, 16 threads 3.67 s, 8 threads taking one file at
/// a time 3.60 s; two runs of one build differed by 0.3 s, so 8 is a pick, not a proven best).
const WALKERS: usize = 8;
/// The dynamic loaders programs built for this machine name as their interpreter, glibc's
/// then musl's: the first of them in a mount is fetched beside the headers of the first
/// program walked, before those headers name it, as a guess ahead of every other
/// ([`Line::Front`]) that the walk does not wait for. The kernel maps the interpreter next, and
/// waiting for the program's headers to name it cost the start a round trip (a 50 ms trace:
/// the program's headers came 61 ms after the walk asked, the interpreter 59 ms after that,
/// and the program had waited 57 ms for it). A static program costs the guess's bytes.
#[cfg(target_arch = "x86_64")]
const USUAL_INTERPRETERS: &[&str] = &["/lib64/ld-linux-x86-64.so.2", "/lib/ld-musl-x86_64.so.1"];
#[cfg(target_arch = "aarch64")]
const USUAL_INTERPRETERS: &[&str] = &["/lib/ld-linux-aarch64.so.1", "/lib/ld-musl-aarch64.so.1"];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const USUAL_INTERPRETERS: &[&str] = &[];
/// Directories of one `DT_RUNPATH` taken at most.
const MAX_SEARCH: usize = 16;
/// Other modules of a module's directory walked with it at most.
const MAX_SIBLINGS: usize = 64;
/// Read-only segments (code, constant data) of at most this many bandwidth-delay products
/// are fetched whole, on a far link (`bench e2e`, PHP's start 50 ms away, defaults
/// otherwise, 3 cold starts each, medians: 0: 5.55 s, 1: 4.88 s, 2: 4.54 s, 4: 4.29 s,
/// 8: 4.10 s, 16: 4.13 s)...
const MAX_CODE_BDPS: f64 = 8.0;
/// ...and at least this many on a near one (the unconverted image through its span index,
/// a trial run for each, 3 cold starts each, medians, 0 ms round trip (the registry's own
/// 4-6 ms): 0: 2.21 s and 19.7 MB by the first line, 2: 2.14 s and 22.3 MB, 4: 2.40 s and
/// 25.6 MB, 8: 2.55 s and 27.5 MB; 50 ms: 0: 5.35 s, 2: 4.23 s, 4: 3.94 s, 8: 3.80 s).
const MIN_CODE_BDPS: f64 = 2.0;
/// A bandwidth-delay product more for each this much round trip: 2 at 0 ms (4-6 ms to the
/// registry's first byte), about 4 at 20 ms, 8 from 48 ms.
const CODE_RTT_UNIT: Duration = Duration::from_millis(6);
/// ...and of this many bytes, whatever the link.
const MAX_CODE: u64 = 16 << 20;
/// Walks' code hand-overs waiting for the code thread; more are left to readers.
const CODE_QUEUE: usize = 256;
/// Where loaders look for libraries by default: a module found there is a library like any
/// other, and its directory's other files are not modules of the same program (nor are the
/// files at the image's root, `""`).
const LIBRARY_DIRS: [&str; 6] = ["lib", "usr/lib", "lib64", "usr/lib64", "usr/local/lib", ""];

/// Looks for the libraries of the programs its mount's readers start.
pub(super) struct Loader {
    shared: Arc<Shared>,
    /// The code thread's queue; the thread starts at the first program, so a mount with none
    /// has no thread, and ends when the mount drops this loader and the walks end.
    code: OnceLock<CodeQueue>,
}

struct Shared {
    tree: Arc<Tree>,
    layers: Arc<[RemoteLayer]>,
    fetcher: Arc<Fetcher>,
    deadline: Duration,
    /// Whether code too large to fetch whole goes to the fetcher's idle fill.
    idle_fill: bool,
    /// Segments too large to fetch whole, by file, until a reader reads in one of them: it
    /// then goes to the idle fill ([`Loader::read_in`]).
    unread_code: Mutex<HashMap<(usize, usize), Code>>,
    /// Inodes a reader read the start of: each is the root of one walk at most.
    seen: Mutex<HashSet<u64>>,
    /// Directories whose modules a walk took along.
    module_dirs: Mutex<HashSet<u64>>,
    /// Files whose libraries a walk looked for, or is looking for: each file's once, by the
    /// first walk to get to it.
    expanded: Mutex<HashSet<(usize, usize)>>,
    /// Whether a walk fetched [`USUAL_INTERPRETERS`]'s beside its root's headers (the
    /// mount's first walk does).
    interpreter_guessed: AtomicBool,
    /// Walks running now.
    walking: AtomicUsize,
    /// Walks and code fetches queued or being worked on (tests wait for 0).
    pending: AtomicUsize,
    /// Where libraries this view lacks are looked for: the image's other layers, when each
    /// is mounted on its own (the snapshotter), set once they are ([`OtherLayers`]).
    elsewhere: OnceLock<OtherLayers>,
}

/// Hands libraries a walk found no file for in its own view (each as the paths it may be
/// at, in the loader's order) to the image's other layers, which walk from those they hold.
pub type OtherLayers = Arc<dyn Fn(Vec<Vec<String>>) + Send + Sync>;

impl Loader {
    pub(super) fn new(
        tree: Arc<Tree>,
        layers: Arc<[RemoteLayer]>,
        fetcher: Arc<Fetcher>,
        (deadline, idle_fill): (Duration, bool),
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                tree,
                layers,
                fetcher,
                deadline,
                idle_fill,
                unread_code: Mutex::new(HashMap::new()),
                seen: Mutex::new(HashSet::new()),
                module_dirs: Mutex::new(HashSet::new()),
                expanded: Mutex::new(HashSet::new()),
                interpreter_guessed: AtomicBool::new(false),
                walking: AtomicUsize::new(0),
                pending: AtomicUsize::new(0),
                elsewhere: OnceLock::new(),
            }),
            code: OnceLock::new(),
        }
    }

    /// A reader read the first bytes of `ino`, which are `head`: when they are ELF headers,
    /// its libraries are looked for, once per file, on a thread of its own.
    ///
    /// Every program or library a reader starts roots a walk of its own, even when another
    /// walk already found it: a walk goes breadth first, and the program does not wait for
    /// it. The dynamic loader maps a module's libraries breadth first, one after another
    /// (PHP's curl module: libcurl, then libcurl's fifteen libraries), so a walk rooted
    /// where the program is fetches, one level ahead of it, what it opens next, while a wide
    /// walk (a directory of modules) is still a level or two behind. What two walks both
    /// want is fetched once: the fetcher merges them.
    pub(super) fn read_start(&self, ino: u64, head: &[u8]) {
        if head.starts_with(elf::MAGIC) {
            self.walk_from_program(ino);
        }
    }

    /// A reader asks for the first bytes of `ino`, not here yet. When it is named like a
    /// shared object and sits in a directory the loader does not search (a program's own
    /// modules: PHP's extensions, Apache's modules), the other modules of its directory are
    /// walked now, by a wide walk of their own, not once its headers have come and shown a
    /// library: the program opens them next, one after another, and the walk then starts a
    /// fetch earlier (a 50 ms trace of PHP's start: the first module's headers came 113 ms
    /// after the program asked, and the next two modules' reads waited 59 and 52 ms for a
    /// walk that had started only then). A file so named that is no module costs its
    /// directory's heads. Only where [`Shared::modules_worth_a_guess`], as when the headers
    /// show a library ([`Shared::closure`]).
    pub(super) fn read_asked(&self, ino: u64) {
        let shared = &self.shared;
        if !shared.modules_worth_a_guess() {
            return;
        }
        let Some(module) = shared.file(ino) else {
            return;
        };
        let name = shared.path(&module).rsplit('/').next().unwrap_or_default();
        if !named_like_a_module(name.as_bytes()) {
            return;
        }
        let siblings = shared.siblings(ino, &module);
        if siblings.is_empty() {
            return;
        }
        tracing::debug!(
            module = shared.path(&module),
            others = siblings.len(),
            "a program opens a module: the other modules of its directory are walked with it"
        );
        shared.walk_wide(siblings, self.code_queue());
    }

    /// A reader reads `file` (layer and node) at `offset`: when that is inside a segment of
    /// code too large to fetch whole, the program runs there, and the segment goes to the
    /// fetcher's idle fill, from the chunk read on to its end, then its start.
    pub(super) fn read_in(&self, file: (usize, usize), offset: u64) {
        let shared = &self.shared;
        if !shared.idle_fill {
            return;
        }
        let inside = |segments: &Code| segments.iter().position(|(_, r)| r.contains(&offset));
        // Every read comes here: the link's measure is only looked at for a read inside a
        // kept segment. Near the registry the fill does not run: the segment stays kept.
        let kept = crate::sync::lock(&shared.unread_code)
            .get(&file)
            .is_some_and(|segments| inside(segments).is_some());
        if !kept || !shared.fetcher.fill_pays() {
            return;
        }
        let (f, range) = {
            let mut unread = crate::sync::lock(&shared.unread_code);
            // Another read may have handed it over meanwhile.
            let Some(segments) = unread.get_mut(&file) else {
                return;
            };
            let Some(at) = inside(segments) else {
                return;
            };
            let segment = segments.swap_remove(at);
            if segments.is_empty() {
                unread.remove(&file);
            }
            segment
        };
        let mut chunks: Vec<(Digest, crate::image::estargz::Chunk)> = Vec::new();
        for part in [offset..range.end, range.start..offset] {
            chunks.extend(
                shared
                    .chunks_of(&(&f, part))
                    .map(|c| (c.blob, c.chunk.clone())),
            );
        }
        shared.fetcher.fill(chunks);
    }

    /// Looks for the libraries of `ino`, an image's program no reader started yet (the one
    /// its configuration runs), once per file, on a thread of its own: the walk then has
    /// the time from the layer's mount to the container's start ahead of the loader. A file
    /// that is no dynamic ELF program costs its first chunk.
    pub(super) fn walk_from_program(&self, ino: u64) {
        if !self.shared.first_time(ino) {
            return;
        }
        let shared = &self.shared;
        if shared.walking.fetch_add(1, Ordering::AcqRel) >= MAX_WALKS {
            shared.walking.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let code = self.code_queue();
        shared.pending.fetch_add(1, Ordering::AcqRel);
        let walker = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("loader-prefetch".into())
            .spawn(move || walker.walk(ino, code));
        if let Err(err) = spawned {
            tracing::warn!(%err, "no loader prefetch thread");
            shared.walking.fetch_sub(1, Ordering::AcqRel);
            shared.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Sets where libraries this view lacks are looked for (once; later calls are ignored).
    pub(super) fn set_other_layers(&self, elsewhere: OtherLayers) {
        let _ = self.shared.elsewhere.set(elsewhere);
    }

    /// Walks from `inos`, libraries another layer's walk needs (one walk for all of them,
    /// looked at together as that walk's next level), each file once.
    pub(super) fn walk_from_libraries(&self, inos: &[u64]) {
        let shared = &self.shared;
        let roots: Vec<File> = inos
            .iter()
            .filter(|&&ino| shared.first_time(ino))
            .filter_map(|&ino| shared.file(ino))
            .collect();
        if roots.is_empty() || shared.walking.fetch_add(1, Ordering::AcqRel) >= MAX_WALKS {
            if !roots.is_empty() {
                shared.walking.fetch_sub(1, Ordering::AcqRel);
            }
            return;
        }
        shared.spawn_walk(roots, self.code_queue(), false);
    }

    /// The code thread's queue, the thread started on first use.
    fn code_queue(&self) -> CodeQueue {
        self.code
            .get_or_init(|| {
                let (code_tx, code_rx) = std::sync::mpsc::sync_channel(CODE_QUEUE);
                let shared = self.shared.clone();
                std::thread::Builder::new()
                    .name("loader-code".into())
                    .spawn(move || shared.fetch_code(code_rx))
                    .map_err(|err| tracing::warn!(%err, "no thread to fetch libraries' code"))
                    .ok()
                    .map(|_| code_tx)
            })
            .clone()
    }

    /// Waits until every walk started so far ended and what it fetched landed, or `timeout`
    /// passes.
    #[cfg(test)]
    pub(super) fn wait_idle(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        // The walks and the code thread, then the guesses they left in flight.
        while self.shared.pending.load(Ordering::Acquire) > 0
            || !self.shared.fetcher.nothing_in_flight()
        {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// What one walk found and has not looked at yet, shared by its threads.
struct Walk {
    state: Mutex<WalkState>,
    /// Files were found, or a thread finished looking at some.
    changed: Condvar,
}

struct WalkState {
    /// Files found, with their depth, in the order they were found.
    queue: std::collections::VecDeque<(File, usize)>,
    /// Files this walk found (another walk may look at them too).
    visited: HashSet<(usize, usize)>,
    /// Threads looking at files now: the walk ends when none is and nothing is queued.
    busy: usize,
}

/// A file, and a range of it.
type Want<'f> = (&'f File, Range<u64>);
/// Ranges of files for the code thread.
type Code = Vec<(File, Range<u64>)>;
type CodeQueue = Option<SyncSender<Code>>;

/// A file of the view: its inode, layer position and node index there, and size.
#[derive(Clone)]
struct File {
    layer: usize,
    node: usize,
    size: u64,
}

impl File {
    /// The file's place in the view: its layer and node.
    fn key(&self) -> (usize, usize) {
        (self.layer, self.node)
    }
}

/// Whether a file's name is a shared object's: `*.so` or `*.so.*`.
fn named_like_a_module(name: &[u8]) -> bool {
    name.ends_with(b".so") || name.windows(4).any(|w| w == b".so.")
}

impl Shared {
    /// Whether a module's directory is worth a wide walk: a round trip is worth more link
    /// time than a module's head and end (see the module's documentation).
    fn modules_worth_a_guess(&self) -> bool {
        self.fetcher
            .link_bdp()
            .is_some_and(|bdp| bdp >= HEAD + TAIL)
    }

    /// Marks `ino` as looked at; false when it was, or when the mount's bound is reached.
    fn first_time(&self, ino: u64) -> bool {
        let mut seen = crate::sync::lock(&self.seen);
        seen.len() < MAX_FILES && seen.insert(ino)
    }

    /// Claims `file`'s libraries for the calling walk; false when another walk did, or
    /// when the mount's bound is reached.
    fn first_expansion(&self, file: &File) -> bool {
        let mut expanded = crate::sync::lock(&self.expanded);
        expanded.len() < MAX_FILES && expanded.insert(file.key())
    }

    /// The walk rooted at `ino`, on its thread.
    fn walk(self: &Arc<Self>, ino: u64, code: CodeQueue) {
        // A panic here would end this walk, never a read.
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.closure(ino, &code);
        }));
        if done.is_err() {
            tracing::error!(ino, "looking for a program's libraries panicked");
        }
        self.walking.fetch_sub(1, Ordering::AcqRel);
        self.pending.fetch_sub(1, Ordering::AcqRel);
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

    /// Fetches the code ranges the walks hand over, what was handed over meanwhile in one
    /// fetch, without holding the walks up.
    fn fetch_code(&self, queue: Receiver<Code>) {
        while let Ok(mut code) = queue.recv() {
            // What the walks handed over while the last fetch ran goes in one fetch: its
            // ranges are asked for side by side, not one file's after another's.
            let mut handed = 1;
            while let Ok(more) = queue.try_recv() {
                code.extend(more);
                handed += 1;
            }
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let wants: Vec<Want<'_>> = code.iter().map(|(f, r)| (f, r.clone())).collect();
                self.bytes(&[], &wants, Some(Line::Back));
            }));
            if done.is_err() {
                tracing::error!("fetching libraries' code panicked");
            }
            self.pending.fetch_sub(handed, Ordering::AcqRel);
        }
    }

    /// The other modules of the directory of `module` (a shared object a program opened
    /// itself, not found by this walk), when that directory is no library directory: files
    /// named like shared objects, not looked at before, [`MAX_SIBLINGS`] at most.
    fn siblings(&self, ino: u64, module: &File) -> Vec<File> {
        let path = self
            .path(module)
            .trim_start_matches("./")
            .trim_start_matches('/');
        let dir = path.rsplit_once('/').map_or("", |(dir, _)| dir);
        let multiarch = dir.rsplit_once('/').is_some_and(|(parent, name)| {
            LIBRARY_DIRS.contains(&parent) && name.contains("-linux-")
        });
        if LIBRARY_DIRS.contains(&dir) || multiarch {
            return Vec::new();
        }
        let Some(parent) = self.tree.get(ino).and_then(|i| self.tree.get(i.parent)) else {
            return Vec::new();
        };
        // One walk per directory takes its modules along.
        if !crate::sync::lock(&self.module_dirs).insert(parent.ino) {
            return Vec::new();
        }
        parent
            .children
            .iter()
            .filter(|&(name, &child)| child != ino && named_like_a_module(name))
            .filter_map(|(_, &child)| {
                let inode = self.tree.get(child)?;
                (inode.kind == Kind::Regular).then_some(child)
            })
            .take(MAX_SIBLINGS)
            .filter_map(|child| self.file(child))
            .collect()
    }

    /// Fetches the libraries of `ino`, then of those, breadth first; for a module, the other
    /// modules of its directory are walked too, by a wide walk of their own.
    fn closure(self: &Arc<Self>, ino: u64, code: &CodeQueue) {
        let Some(root) = self.file(ino) else { return };
        // The reader just read the headers (cached now; fetched here for a program no
        // reader started yet). Its end, where linkers put the dynamic section, comes with
        // them: the walk's first look at it then waits one round trip, not two (a static
        // program costs that chunk).
        let tail = root.size.saturating_sub(TAIL)..root.size;
        if let Some(loader) = self.guess_interpreter() {
            let loader_tail = loader.size.saturating_sub(TAIL)..loader.size;
            self.warm_in(&[(&loader, 0..HEAD), (&loader, loader_tail)], Line::Front);
        }
        let Some(head) = self
            .bytes(&[(&root, 0..HEAD)], &[(&root, tail)], None)
            .pop()
            .flatten()
        else {
            return;
        };
        let Some(object) =
            Object::parse(&head, root.size).filter(|object| object.dynamic.is_some())
        else {
            return;
        };
        let interpreter = object.interpreter_path(&head);
        let loader = match interpreter
            .as_ref()
            .and_then(|path| self.tree.resolve(path.as_bytes()))
            .filter(|inode| inode.kind == Kind::Regular)
            .and_then(|inode| self.file(inode.ino))
        {
            Some(loader) => Some(loader),
            None => {
                self.look_elsewhere(
                    interpreter
                        .into_iter()
                        .map(|p| vec![p.to_string()])
                        .collect(),
                );
                None
            }
        };
        let siblings = if object.library && self.modules_worth_a_guess() {
            self.siblings(ino, &root)
        } else {
            Vec::new()
        };
        if !siblings.is_empty() {
            tracing::debug!(
                module = self.path(&root),
                others = siblings.len(),
                "a program opened a module: the other modules of its directory are walked with it"
            );
            self.walk_wide(siblings, code.clone());
        }
        // The kernel maps a program's interpreter (the dynamic loader) before anything else:
        // its headers and end are fetched at once, beside the walk's look at the program's
        // libraries, not before it (a 50 ms trace: the program's headers, the interpreter's,
        // then the program's end, one round trip after another, while the program's first
        // library waited for all three).
        let fetch_loader = |loader: &File| {
            let tail = loader.size.saturating_sub(TAIL)..loader.size;
            self.bytes(&[(loader, 0..HEAD)], &[(loader, tail)], None);
        };
        std::thread::scope(|scope| {
            if let Some(loader) = &loader {
                let spawned = std::thread::Builder::new()
                    .name("loader-prefetch".into())
                    .spawn_scoped(scope, || fetch_loader(loader));
                if spawned.is_err() {
                    fetch_loader(loader);
                }
            }
            self.walk_from(vec![root], code, false);
        });
    }

    /// The first of [`USUAL_INTERPRETERS`] this view holds as a regular file, for the
    /// mount's first walk; `None` for the others.
    fn guess_interpreter(&self) -> Option<File> {
        if self.interpreter_guessed.swap(true, Ordering::AcqRel) {
            return None;
        }
        USUAL_INTERPRETERS.iter().find_map(|path| {
            let inode = self.tree.resolve(path.as_bytes())?;
            (inode.kind == Kind::Regular).then(|| self.file(inode.ino))?
        })
    }

    /// Walks the other modules of a directory on a thread of its own. Its requests are
    /// guesses: they wait in line for the link behind what the program waits for (the walk
    /// rooted where it is), and the program promotes those it comes to wait for.
    fn walk_wide(self: &Arc<Self>, modules: Vec<File>, code: CodeQueue) {
        self.spawn_walk(modules, code, true);
    }

    /// Walks from `roots` on a thread of its own: a wide walk (a directory's modules), or
    /// one that took one of [`MAX_WALKS`] (another layer's libraries), which it gives back.
    fn spawn_walk(self: &Arc<Self>, roots: Vec<File>, code: CodeQueue, wide: bool) {
        let counted = !wide;
        let end = move |shared: &Self| {
            if counted {
                shared.walking.fetch_sub(1, Ordering::AcqRel);
            }
            shared.pending.fetch_sub(1, Ordering::AcqRel);
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        let walker = self.clone();
        let spawned = std::thread::Builder::new()
            .name("loader-prefetch".into())
            .spawn(move || {
                let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    walker.walk_from(roots, &code, wide);
                }));
                if done.is_err() {
                    tracing::error!(wide, "looking for libraries panicked");
                }
                end(&walker);
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, wide, "no loader prefetch thread");
            end(self);
        }
    }

    /// The walk from `roots` (`wide`: its requests are guesses in line). Each file found is
    /// looked at as soon as the file that needs it was, by one of [`WALKERS`] threads, not
    /// when the slowest file of its level arrives: the loader goes down one chain of
    /// libraries after another, and a level's files arrive over a link at different times.
    /// Files are taken in the order they were found (breadth first, each file's libraries in
    /// its `DT_NEEDED` order), as the loader opens them.
    fn walk_from(&self, roots: Vec<File>, code: &CodeQueue, wide: bool) {
        let walk = Walk {
            state: Mutex::new(WalkState {
                // What this walk looked at: each file once (another walk may look at it too).
                visited: roots.iter().map(File::key).collect(),
                queue: roots.into_iter().map(|f| (f, 0)).collect(),
                busy: 0,
            }),
            changed: Condvar::new(),
        };
        std::thread::scope(|scope| {
            for _ in 1..WALKERS {
                let spawned = std::thread::Builder::new()
                    .name("loader-prefetch".into())
                    .spawn_scoped(scope, || self.work_on(&walk, code, wide));
                if let Err(err) = spawned {
                    // The walk goes on with fewer threads.
                    tracing::debug!(%err, "no more threads for a walk");
                    break;
                }
            }
            self.work_on(&walk, code, wide);
        });
    }

    /// One of a walk's threads: looks at the files the walk found, a share of those waiting
    /// at a time, until none is left and no other thread may find more.
    fn work_on(&self, walk: &Walk, code: &CodeQueue, wide: bool) {
        loop {
            let files = {
                let mut state = crate::sync::lock(&walk.state);
                loop {
                    if !state.queue.is_empty() {
                        // Files found together are asked for together, shared between the
                        // threads: a wide walk's first level is many modules.
                        let take = state.queue.len().div_ceil(WALKERS);
                        let files: Vec<(File, usize)> = state.queue.drain(..take).collect();
                        state.busy += 1;
                        break files;
                    }
                    if state.busy == 0 {
                        walk.changed.notify_all();
                        return;
                    }
                    state = walk
                        .changed
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            };
            let depth = files.iter().map(|(_, d)| *d).max().unwrap_or(0);
            let files: Vec<File> = files.into_iter().map(|(f, _)| f).collect();
            // A panic here loses these files' libraries, never the walk's other threads.
            let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.look_at(&files, code, wide)
            }))
            .unwrap_or_else(|_| {
                tracing::error!("looking for libraries panicked");
                Vec::new()
            });
            let mut state = crate::sync::lock(&walk.state);
            state.busy -= 1;
            if depth + 1 < MAX_DEPTH {
                for f in found {
                    if state.visited.len() < MAX_FILES && state.visited.insert(f.key()) {
                        state.queue.push_back((f, depth + 1));
                    }
                }
            }
            walk.changed.notify_all();
        }
    }

    /// For each of `files`: its headers (and its end), then its dynamic section with its
    /// first and writable segments, then the names of its libraries, each step one fetch for
    /// all of them. The libraries found, in the order the files need them.
    fn look_at(&self, files: &[File], code: &CodeQueue, wide: bool) -> Vec<File> {
        // A wide walk's requests wait in line, ahead of the bulk: the walk waits on them to
        // look further.
        let line = wide.then_some(Line::Front);
        // A file whose libraries a walk looked for already is left to that walk.
        let files: Vec<File> = files
            .iter()
            .filter(|f| self.first_expansion(f))
            .cloned()
            .collect();
        let files = &files[..];
        if tracing::enabled!(target: "imgstream::reads", tracing::Level::TRACE) {
            for f in files {
                tracing::trace!(target: "imgstream::reads", path = self.path(f), wide, "walk looks at");
            }
        }
        let heads: Vec<Want<'_>> = files.iter().map(|f| (f, 0..HEAD)).collect();
        // The dynamic section is in the writable segment, which linkers put last: fetched
        // with the headers, the next step usually finds it cached and costs no round trip.
        let tails: Vec<Want<'_>> = files
            .iter()
            .map(|f| (f, f.size.saturating_sub(TAIL)..f.size))
            .collect();
        let heads = self.bytes(&heads, &tails, line);
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
                    // Where a linker put the constant data and unwind tables in the first
                    // segment (lld does), the tables are left out here too.
                    .map(|s| object.warm_part(s))
                    .map(|r| (*f, r.start..r.end.min(r.start.saturating_add(SEGMENT)))),
            );
            segments.extend(self.code_start(object).map(|range| (*f, range)));
        }
        let fetched = self.bytes(&dynamics, &[], line);
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
        let mut fetched = self.bytes(&wanted, &[], line).into_iter();
        // The walk's own bytes first. The segments and the code are only warmed, not waited
        // for: the walk goes on to the next files, whose headers, smaller, take their turn on
        // the link before them.
        self.warm(&segments);
        self.hand_over_code(&objects, code);
        let mut next = Vec::new();
        let mut missing = Vec::new();
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
                match found.and_then(|ino| self.file(ino)) {
                    Some(file) => next.push(file),
                    None => {
                        missing.push(dirs.iter().map(|dir| format!("{dir}/{library}")).collect())
                    }
                }
            }
        }
        self.look_elsewhere(missing);
        next
    }

    /// Hands libraries not in this view to the image's other layers, if they are known.
    fn look_elsewhere(&self, missing: Vec<Vec<String>>) {
        if let (false, Some(elsewhere)) = (missing.is_empty(), self.elsewhere.get()) {
            elsewhere(missing);
        }
    }

    /// Hands the read-only segments (code, constant data) of `objects` that are cheaper to
    /// fetch whole than to miss (at most [`code_bdps`] bandwidth-delay products of the link)
    /// to the code thread; the larger ones are kept for the fetcher's idle fill, which a
    /// reader's read in one of them hands it to ([`Loader::read_in`]).
    fn hand_over_code(&self, objects: &[(&File, Object)], code: &CodeQueue) {
        let Some(limit) = self.code_limit() else {
            return;
        };
        let (ranges, larger): (Code, Code) = objects
            .iter()
            .flat_map(|(f, object)| {
                object
                    .loads
                    .iter()
                    // Code and read-only data but the unwind tables; what is at offset 0
                    // shares its segment with the headers, fetched anyway.
                    .filter(|s| !s.writable && s.offset > 0)
                    .map(|s| object.warm_part(s))
                    .map(|r| ((*f).clone(), r))
            })
            .partition(|(_, r)| r.end - r.start <= limit);
        if self.idle_fill && !larger.is_empty() {
            let mut unread = crate::sync::lock(&self.unread_code);
            for (f, r) in larger {
                let segments = unread.entry(f.key()).or_default();
                if !segments.iter().any(|(_, s)| *s == r) {
                    segments.push((f, r));
                }
            }
        }
        let Some(queue) = code else {
            return;
        };
        if !ranges.is_empty() {
            tracing::debug!(
                limit,
                segments = ranges.len(),
                bytes = ranges.iter().map(|(_, r)| r.end - r.start).sum::<u64>(),
                "code fetched whole"
            );
            self.pending.fetch_add(1, Ordering::AcqRel);
            // A full queue leaves these files' code to their readers.
            if queue.try_send(ranges).is_err() {
                self.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// The start of `object`'s code ([`CODE_START`] bytes), on a link far enough for a miss
    /// to cost more link time than that: fetched with the segments, ahead of the code
    /// fetched whole ([`hand_over_code`](Self::hand_over_code)), which waits behind every
    /// library's segments, and of the code too large for that.
    fn code_start(&self, object: &Object) -> Option<Range<u64>> {
        let limit = self.code_limit()?;
        let code = object.loads.iter().find(|s| s.executable && s.offset > 0)?;
        (limit >= CODE_START).then(|| code.offset..code.offset + code.file_size.min(CODE_START))
    }

    /// Read-only segments of at most this many bytes are fetched whole; `None` where no
    /// round trip is measured.
    fn code_limit(&self) -> Option<u64> {
        let bdp = self.fetcher.link_bdp()?;
        let rtt = self.fetcher.round_trip()?;
        Some(((bdp as f64 * code_bdps(rtt)) as u64).min(MAX_CODE))
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

    /// Starts fetching the chunks of `wants` into the cache (guesses in the middle of the
    /// line: behind a wide walk's own requests, ahead of code fetched whole and read-around
    /// windows, on a thread of their own) and returns at once.
    fn warm(&self, wants: &[Want<'_>]) {
        self.warm_in(wants, Line::Middle);
    }

    /// [`warm`](Self::warm) in `line`.
    fn warm_in(&self, wants: &[Want<'_>], line: Line) {
        let mut unique = HashSet::new();
        let chunks: Vec<(Digest, crate::image::estargz::Chunk)> = wants
            .iter()
            .flat_map(|w| self.chunks_of(w))
            .filter(|c| unique.insert((c.blob, c.chunk.blob_offset)))
            .map(|c| (c.blob, c.chunk.clone()))
            .collect();
        self.fetcher
            .guess(chunks, Instant::now() + self.deadline, line);
    }

    /// Fetches the chunks of `wants` and of `warm` together (read-around fetches, beside
    /// any reader's, in batches of at most [`crate::fetch::GUESS_BATCH`] bytes so that no
    /// fetch holds the memory budget readers need; `line`: where they wait in line for the
    /// link, as a wide walk's and the code thread's do; `None`: they go at once), then
    /// returns the bytes of each of `wants`; `None` for one that could not be fetched.
    fn bytes(
        &self,
        wants: &[Want<'_>],
        warm: &[Want<'_>],
        line: Option<Line>,
    ) -> Vec<Option<Vec<u8>>> {
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
            let data = match line {
                Some(line) => self.fetcher.get_guessed(batch, deadline, line),
                None => self.fetcher.get(batch, Priority::ReadAround, deadline),
            };
            if let Ok(data) = data {
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
            if !batch.is_empty() && batch_bytes + bytes > crate::fetch::GUESS_BATCH {
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

/// How many bandwidth-delay products of a read-only segment are fetched whole over a link
/// with round trip `rtt`: one per [`CODE_RTT_UNIT`], from [`MIN_CODE_BDPS`] to
/// [`MAX_CODE_BDPS`].
fn code_bdps(rtt: Duration) -> f64 {
    (rtt.as_secs_f64() / CODE_RTT_UNIT.as_secs_f64()).clamp(MIN_CODE_BDPS, MAX_CODE_BDPS)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::{
        fetch::{layer, readaround::ReadAroundConfig},
        fs::{FsConfig, ImageFs, View},
        image::tar::{Header, Kind as TarKind},
        registry::BlobSource,
        testing::{self, MemoryBlobs},
    };

    const LIBS: &str = "usr/lib/x86_64-linux-gnu";
    const MODULES: &str = "usr/lib/app/modules/";
    /// The test images' chunk size.
    const CHUNK: u64 = 64 << 10;

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

    /// The link a test's registry is behind.
    #[derive(Clone, Copy, PartialEq)]
    enum Link {
        /// No network in between (as a local layout).
        Local,
        /// 20 ms away behind 100 Mbit/s (a bandwidth-delay product of 250 KB).
        Far,
    }

    /// This machine's `ls` in `usr/bin`, and [`ls_libraries`].
    fn ls_and_its_libraries() -> Vec<(Header, Vec<u8>)> {
        let mut entries = vec![
            (Header::new("usr/", TarKind::Directory), Vec::new()),
            (Header::new("usr/bin/", TarKind::Directory), Vec::new()),
            file(
                "usr/bin/ls",
                std::fs::read("/usr/bin/ls").expect("this machine's ls"),
            ),
        ];
        entries.extend(ls_libraries());
        entries
    }

    /// `/lib` (a symlink to `usr/lib`, as on Debian) and this machine's libraries ls needs,
    /// theirs, and libz (which nothing there needs), at their Debian paths.
    fn ls_libraries() -> Vec<(Header, Vec<u8>)> {
        let host = |name: &str| {
            std::fs::read(format!("/usr/lib/x86_64-linux-gnu/{name}"))
                .expect("a library of this Debian machine")
        };
        let pcre = std::fs::read_link("/usr/lib/x86_64-linux-gnu/libpcre2-8.so.0")
            .expect("libpcre2-8.so.0 is a symlink on Debian")
            .display()
            .to_string();
        vec![
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
        ]
    }

    /// This machine's `ls` with the libraries it loads, laid out as a merged-/usr image does
    /// (`lib` a symlink to `usr/lib`, `libpcre2-8.so.0` a symlink to its versioned file), a
    /// library nothing needs, and a directory of modules a program would open itself (copies
    /// of libselinux and libz, and a note); 64 KiB chunks, served with every range counted,
    /// read-around off.
    fn ls_image(
        runtime: &tokio::runtime::Runtime,
        dir: &std::path::Path,
        loader_prefetch: bool,
        link: Link,
    ) -> (ImageFs, Arc<MemoryBlobs>) {
        let host = |name: &str| {
            std::fs::read(format!("/usr/lib/x86_64-linux-gnu/{name}"))
                .expect("a library of this Debian machine")
        };
        let mut entries = ls_and_its_libraries();
        entries.extend([
            (Header::new("opt/", TarKind::Directory), Vec::new()),
            (Header::new("opt/app/", TarKind::Directory), Vec::new()),
            (Header::new("opt/app/bin/", TarKind::Directory), Vec::new()),
            (Header::new("usr/lib/app/", TarKind::Directory), Vec::new()),
            (Header::new(MODULES, TarKind::Directory), Vec::new()),
            file(&format!("{MODULES}a.so"), host("libselinux.so.1")),
            file(&format!("{MODULES}b.so"), host("libz.so.1")),
            file(&format!("{MODULES}notes.txt"), b"not a module".to_vec()),
        ]);
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
        image_of(runtime, dir, entries, loader_prefetch, link)
    }

    /// An image of `entries` (their sizes set here) behind `link`, with no idle fill (whose
    /// pieces would land at times these tests do not wait for).
    fn image_of(
        runtime: &tokio::runtime::Runtime,
        dir: &std::path::Path,
        entries: Vec<(Header, Vec<u8>)>,
        loader_prefetch: bool,
        link: Link,
    ) -> (ImageFs, Arc<MemoryBlobs>) {
        let config = FsConfig {
            loader_prefetch,
            idle_fill: false,
            ..FsConfig::default()
        };
        image_with(runtime, dir, entries, config, link)
    }

    /// An image of `entries` (their sizes set here) behind `link`, served as `config` says.
    fn image_with(
        runtime: &tokio::runtime::Runtime,
        dir: &std::path::Path,
        mut entries: Vec<(Header, Vec<u8>)>,
        config: FsConfig,
        link: Link,
    ) -> (ImageFs, Arc<MemoryBlobs>) {
        for (h, data) in &mut entries {
            h.size = data.len() as u64;
        }
        let (blob, summary) = testing::estargz_layer(&entries, CHUNK, false);
        let desc = testing::layer_descriptor(&summary);
        let mut source = MemoryBlobs::default().with(blob);
        if link == Link::Far {
            let rtt = Duration::from_millis(20);
            source = source.delayed(rtt).throttled(12.5e6).far(rtt);
        }
        let source = Arc::new(source);
        let opened = runtime
            .block_on(layer::open_cached(source.as_ref(), &desc, None))
            .expect("the layer opens");
        source.ranges.store(0, Ordering::SeqCst);
        // Inside `dir`, which each test removes: a scratch cache of its own would be left.
        let cache = Arc::new(
            crate::cache::ChunkCache::open(&crate::cache::CacheConfig {
                dir: dir.join("chunk-cache"),
                limit_bytes: None,
                prefer_uring: false,
            })
            .expect("a cache in the test's directory"),
        );
        let blobs: Arc<dyn BlobSource> = source.clone();
        let fetcher = Arc::new(
            Fetcher::new(runtime.handle().clone(), blobs, cache).with_read_around(
                ReadAroundConfig {
                    bdp_multiple: 0.0,
                    ..ReadAroundConfig::default()
                },
            ),
        );
        let fs = ImageFs::new(Arc::from(vec![opened]), View::Merged, fetcher, config);
        (fs, source)
    }

    #[test]
    fn a_programs_interpreter_is_fetched_before_its_loader_asks() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let interpreter =
            std::fs::read("/lib64/ld-linux-x86-64.so.2").expect("this machine's dynamic loader");
        let entries = || {
            vec![
                (Header::new("usr/", TarKind::Directory), Vec::new()),
                (Header::new("usr/bin/", TarKind::Directory), Vec::new()),
                file(
                    "usr/bin/ls",
                    std::fs::read("/usr/bin/ls").expect("this machine's ls"),
                ),
                (Header::new("usr/lib/", TarKind::Directory), Vec::new()),
                (
                    Header::new(&format!("{LIBS}/"), TarKind::Directory),
                    Vec::new(),
                ),
                file(&format!("{LIBS}/ld-linux-x86-64.so.2"), interpreter.clone()),
                // ls names `/lib64/ld-linux-x86-64.so.2`, a symlink as on Debian.
                (Header::new("lib64/", TarKind::Directory), Vec::new()),
                symlink(
                    "lib64/ld-linux-x86-64.so.2",
                    &format!("/{LIBS}/ld-linux-x86-64.so.2"),
                ),
            ]
        };
        let interp = format!("/{LIBS}/ld-linux-x86-64.so.2");
        for on in [true, false] {
            let dir = std::env::temp_dir().join(format!(
                "imgstream-loader-interp-{on}-{}",
                std::process::id()
            ));
            let (fs, source) = image_of(&runtime, &dir, entries(), on, Link::Local);
            read_head(&fs, "/usr/bin/ls");
            if let Some(loader) = fs.loader.as_ref() {
                assert!(loader.wait_idle(Duration::from_secs(30)));
            }
            fs.fetcher.flush_cache_writes();
            // ls needs no library of this image: the interpreter is all the walk fetches.
            assert_eq!(fetched(&fs, &interp, 0..4096), on, "loader prefetch {on}");
            let requests = source.ranges.load(Ordering::SeqCst);
            read_head(&fs, "/lib64/ld-linux-x86-64.so.2");
            assert_eq!(
                source.ranges.load(Ordering::SeqCst) - requests,
                usize::from(!on),
                "the kernel's read of the interpreter"
            );
            let _ = std::fs::remove_dir_all(dir);
        }
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
        read_page(fs, path, 0)
    }

    /// The page at `offset` of `path`, read as a reader reads it.
    fn read_page(fs: &ImageFs, path: &str, offset: u64) -> Vec<u8> {
        let inode = fs
            .tree
            .resolve(path.as_bytes())
            .expect("in the image")
            .clone();
        let mut out = Vec::new();
        fs.read_into(&inode, &mut out, 4096, offset)
            .expect("the read succeeds");
        fs.fetcher.flush_cache_writes();
        out
    }

    #[test]
    fn reading_a_programs_headers_fetches_the_libraries_it_loads_and_theirs() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir = std::env::temp_dir().join(format!("imgstream-loader-{}", std::process::id()));
        let (fs, source) = ls_image(&runtime, &dir, true, Link::Local);
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
        // Each library's libraries are looked for once: the walks those reads root find every
        // file claimed by the first walk and fetch nothing.
        assert!(
            fs.loader
                .as_ref()
                .expect("the loader prefetch is on")
                .wait_idle(Duration::from_secs(30))
        );
        assert_eq!(source.ranges.load(Ordering::SeqCst), requests);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn libraries_another_layer_holds_are_walked_from_there() {
        // The snapshotter's views: one layer each, the program in one, its libraries in
        // another (as a Dockerfile's steps leave them).
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir =
            std::env::temp_dir().join(format!("imgstream-loader-layers-{}", std::process::id()));
        let program = vec![
            (Header::new("usr/", TarKind::Directory), Vec::new()),
            (Header::new("usr/bin/", TarKind::Directory), Vec::new()),
            file(
                "usr/bin/ls",
                std::fs::read("/usr/bin/ls").expect("this machine's ls"),
            ),
        ];
        let mut libraries = vec![(Header::new("usr/", TarKind::Directory), Vec::new())];
        libraries.extend(ls_libraries());
        let (top, _) = image_of(&runtime, &dir.join("top"), program, true, Link::Local);
        let (below, _) = image_of(&runtime, &dir.join("below"), libraries, true, Link::Local);
        let below = Arc::new(below);
        let asked = Arc::new(Mutex::new(Vec::new()));
        {
            let (below, asked) = (below.clone(), asked.clone());
            top.set_other_layers(Arc::new(move |wanted: Vec<Vec<String>>| {
                crate::sync::lock(&asked).extend(wanted.iter().map(|paths| paths[0].clone()));
                below.walk_from_libraries(&wanted);
            }));
        }
        read_head(&top, "/usr/bin/ls");
        for fs in [&top, &*below] {
            let loader = fs.loader.as_ref().expect("the loader prefetch is on");
            assert!(loader.wait_idle(Duration::from_secs(30)));
        }
        below.fetcher.flush_cache_writes();
        // ls's libraries were asked of the other layer, which fetched them and theirs (its
        // own walk found libpcre2-8 for libselinux); the library nobody needs stays there.
        let asked = crate::sync::lock(&asked).clone();
        assert!(
            asked.iter().any(|p| p.ends_with("/libselinux.so.1"))
                && asked.iter().any(|p| p.ends_with("/libc.so.6")),
            "{asked:?}"
        );
        for lib in ["libselinux.so.1", "libc.so.6", "libpcre2-8.so.0"] {
            let path = format!("/lib/x86_64-linux-gnu/{lib}");
            assert!(fetched(&below, &path, 0..4096), "{lib} was not fetched");
        }
        assert!(!fetched(&below, &format!("/{LIBS}/libz.so.1"), 0..4096));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Holds the first chunk of `path` in the registry until `source` releases it.
    fn hold_first_chunk(fs: &ImageFs, source: &MemoryBlobs, path: &str) {
        let at = fs
            .tree
            .resolve(path.as_bytes())
            .and_then(|inode| inode.data)
            .expect("the held file is in the image");
        let first = &fs.layers[at.0].index.nodes[at.1].chunks[0];
        source.hold(first.blob_offset..first.blob_end);
    }

    /// Reads the headers of `program` with the first chunk of `held` held in the registry:
    /// whether the walk fetched the headers of `wanted` meanwhile (waiting 30 s at most),
    /// and whether those of `held` were still missing then. The held chunk is answered and
    /// the walks are done when it returns.
    fn walk_with_one_held(
        fs: &ImageFs,
        source: &MemoryBlobs,
        program: &str,
        held: &str,
        wanted: &str,
    ) -> (bool, bool) {
        hold_first_chunk(fs, source, held);
        read_head(fs, program);
        let until = Instant::now() + Duration::from_secs(30);
        let found = loop {
            fs.fetcher.flush_cache_writes();
            if fetched(fs, wanted, 0..4096) {
                break true;
            }
            if Instant::now() >= until {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let held_missing = !fetched(fs, held, 0..4096);
        source.release();
        let loader = fs.loader.as_ref().expect("the loader prefetch is on");
        assert!(loader.wait_idle(Duration::from_secs(30)));
        fs.fetcher.flush_cache_writes();
        (found, held_missing)
    }

    #[test]
    fn a_library_is_looked_at_as_soon_as_the_one_needing_it_arrives() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir =
            std::env::temp_dir().join(format!("imgstream-loader-pipe-{}", std::process::id()));
        let (fs, source) = ls_image(&runtime, &dir, true, Link::Local);
        // ls needs libselinux and libc, found together; libselinux needs libpcre2-8. With
        // libc's headers held in the registry, the walk goes on from libselinux.
        let (found, libc_waited) = walk_with_one_held(
            &fs,
            &source,
            "/usr/bin/ls",
            &format!("/{LIBS}/libc.so.6"),
            &format!("/{LIBS}/libpcre2-8.so.0"),
        );
        assert!(found, "libpcre2-8 waited for libc, found beside libselinux");
        assert!(libc_waited, "libc's headers were held");
        assert!(fetched(&fs, &format!("/{LIBS}/libc.so.6"), 0..4096));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// `ls`, its libraries and this machine's dynamic loader, at its usual path too.
    fn ls_and_its_interpreter() -> Vec<(Header, Vec<u8>)> {
        let mut entries = ls_and_its_libraries();
        entries.extend([
            file(
                &format!("{LIBS}/ld-linux-x86-64.so.2"),
                std::fs::read("/lib64/ld-linux-x86-64.so.2").expect("this machine's loader"),
            ),
            (Header::new("lib64/", TarKind::Directory), Vec::new()),
            symlink(
                "lib64/ld-linux-x86-64.so.2",
                &format!("/{LIBS}/ld-linux-x86-64.so.2"),
            ),
        ]);
        entries
    }

    #[test]
    fn the_walk_does_not_wait_for_the_programs_interpreter() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir = std::env::temp_dir().join(format!(
            "imgstream-loader-interp-held-{}",
            std::process::id()
        ));
        let (fs, source) = image_of(&runtime, &dir, ls_and_its_interpreter(), true, Link::Local);
        // With the interpreter's headers held in the registry, the walk still looks at ls's
        // libraries: the kernel's and the loader's reads go side by side, one round trip
        // each, not one after the other.
        let interp = format!("/{LIBS}/ld-linux-x86-64.so.2");
        let (found, interp_waited) = walk_with_one_held(
            &fs,
            &source,
            "/usr/bin/ls",
            &interp,
            &format!("/{LIBS}/libselinux.so.1"),
        );
        assert!(found, "libselinux waited for the interpreter");
        assert!(interp_waited, "the interpreter's headers were held");
        assert!(fetched(&fs, &interp, 0..4096));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_usual_interpreter_is_fetched_before_the_first_programs_headers_name_it() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir = std::env::temp_dir().join(format!(
            "imgstream-loader-interp-guess-{}",
            std::process::id()
        ));
        let (fs, source) = image_of(&runtime, &dir, ls_and_its_interpreter(), true, Link::Local);
        // The image's program, walked before any container starts it (as the snapshotter
        // does), with its headers held in the registry: the interpreter comes meanwhile.
        let ls = fs.tree.resolve(b"/usr/bin/ls").expect("ls").clone();
        let (layer, node) = ls.data.expect("a regular file");
        let first = &fs.layers[layer].index.nodes[node].chunks[0];
        source.hold(first.blob_offset..first.blob_end);
        let loader = fs.loader.as_ref().expect("the loader prefetch is on");
        loader.walk_from_program(ls.ino);
        let interp = format!("/{LIBS}/ld-linux-x86-64.so.2");
        let until = Instant::now() + Duration::from_secs(30);
        while !fetched(&fs, &interp, 0..4096) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
            fs.fetcher.flush_cache_writes();
        }
        assert!(
            fetched(&fs, &interp, 0..4096),
            "the interpreter waited for ls"
        );
        assert!(
            !fetched(&fs, "/usr/bin/ls", 0..4096),
            "ls's headers were held"
        );
        source.release();
        assert!(loader.wait_idle(Duration::from_secs(30)));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The read-only segment after the code of the binary at `path`, and where its unwind
    /// tables start.
    fn constant_of(path: &str) -> (Range<u64>, u64) {
        let bytes = std::fs::read(path).expect("a binary of this machine");
        let object = Object::parse(&bytes[..4096], bytes.len() as u64).expect("ELF");
        let constant = object
            .loads
            .iter()
            .find(|s| !s.writable && !s.executable && s.offset > 0)
            .expect("a read-only segment after the code");
        (
            constant.offset..constant.offset + constant.file_size,
            object.unwind.expect("unwind tables"),
        )
    }

    /// Where the code of this machine's `path` is in the file.
    fn code_of(path: &str) -> Range<u64> {
        let bytes = std::fs::read(path).expect("a binary of this machine");
        let object = Object::parse(&bytes[..4096], bytes.len() as u64).expect("ELF");
        let code = object
            .loads
            .iter()
            .find(|s| s.executable)
            .expect("a code segment");
        code.offset..code.offset + code.file_size
    }

    /// A fresh image behind `link` in which a reader read the first page of `path`, once the
    /// loader prefetch did all that the read set off; and the image's cache directory.
    fn after_reading(
        runtime: &tokio::runtime::Runtime,
        name: &str,
        link: Link,
        path: &str,
    ) -> (ImageFs, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("imgstream-loader-{name}-{}", std::process::id()));
        let (fs, _) = ls_image(runtime, &dir, true, link);
        read_head(&fs, path);
        let loader = fs.loader.as_ref().expect("the loader prefetch is on");
        assert!(
            loader.wait_idle(Duration::from_secs(60)),
            "the prefetch went idle"
        );
        fs.fetcher.flush_cache_writes();
        (fs, dir)
    }

    #[test]
    fn a_module_brings_the_other_modules_of_its_directory_and_their_libraries() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        // A program opens module a (libselinux's bytes): module b (libz's) is fetched with
        // it, and the libraries of both; the note is no module.
        let (fs, dir) = after_reading(&runtime, "mod", Link::Far, &format!("/{MODULES}a.so"));
        assert!(fetched(&fs, &format!("/{MODULES}b.so"), 0..4096));
        for lib in ["libpcre2-8.so.0", "libc.so.6"] {
            assert!(fetched(&fs, &format!("/{LIBS}/{lib}"), 0..4096), "{lib}");
        }
        assert!(!fetched(&fs, &format!("/{MODULES}notes.txt"), 0..12));
        // The program then opens b: the wide walk looked for its libraries already, so the
        // walk rooted at it has nothing to fetch.
        let requests = fs.fetcher.stats.requests.load(Ordering::SeqCst);
        read_head(&fs, &format!("/{MODULES}b.so"));
        let loader = fs.loader.as_ref().expect("the loader prefetch is on");
        assert!(
            loader.wait_idle(Duration::from_secs(60)),
            "the prefetch went idle"
        );
        assert_eq!(fs.fetcher.stats.requests.load(Ordering::SeqCst), requests);
        let _ = std::fs::remove_dir_all(&dir);

        // A library read from a directory the loader searches brings no neighbours: libz,
        // next to libselinux and not needed by it, stays where it is.
        let libselinux = format!("/{LIBS}/libselinux.so.1");
        let (fs, dir) = after_reading(&runtime, "lib", Link::Far, &libselinux);
        assert!(fetched(&fs, &format!("/{LIBS}/libc.so.6"), 0..4096));
        assert!(!fetched(&fs, &format!("/{LIBS}/libz.so.1"), 0..4096));
        assert!(!fetched(&fs, &format!("/{MODULES}b.so"), 0..4096));
        let _ = std::fs::remove_dir_all(&dir);

        // With no round trip to save, a module brings only its own libraries.
        let (fs, dir) = after_reading(&runtime, "mod0", Link::Local, &format!("/{MODULES}a.so"));
        assert!(fetched(&fs, &format!("/{LIBS}/libpcre2-8.so.0"), 0..4096));
        assert!(!fetched(&fs, &format!("/{MODULES}b.so"), 0..4096));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_modules_neighbours_are_asked_for_before_its_own_headers_come() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir =
            std::env::temp_dir().join(format!("imgstream-loader-mod-early-{}", std::process::id()));
        let (fs, source) = ls_image(&runtime, &dir, true, Link::Far);
        // Module a's headers are held in the registry while a program reads them: module b's
        // come meanwhile, so the walk of a's directory did not wait for a's.
        let (a, b) = (format!("/{MODULES}a.so"), format!("/{MODULES}b.so"));
        hold_first_chunk(&fs, &source, &a);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| read_head(&fs, &a));
            let until = Instant::now() + Duration::from_secs(30);
            while !fetched(&fs, &b, 0..4096) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
                fs.fetcher.flush_cache_writes();
            }
            let b_came = fetched(&fs, &b, 0..4096);
            let a_held = !fetched(&fs, &a, 0..4096);
            source.release();
            let head = reader.join().expect("the reader did not panic");
            assert!(b_came, "module b's headers waited for a's");
            assert!(a_held, "module a's headers were held");
            assert!(head.starts_with(elf::MAGIC), "the reader got a's headers");
        });
        let loader = fs.loader.as_ref().expect("the loader prefetch is on");
        assert!(loader.wait_idle(Duration::from_secs(30)));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_code_fetched_whole_grows_with_the_round_trip_between_its_bounds() {
        let at = |ms| code_bdps(Duration::from_millis(ms));
        assert_eq!(at(0), MIN_CODE_BDPS);
        assert_eq!(at(6), MIN_CODE_BDPS);
        assert_eq!(at(24), 4.0);
        assert!(at(20) < at(30) && at(30) < at(40));
        assert_eq!(at(48), MAX_CODE_BDPS);
        assert_eq!(at(5000), MAX_CODE_BDPS);
    }

    #[test]
    fn code_cheaper_to_fetch_than_its_misses_is_fetched_whole_only_over_a_network() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let pcre = std::fs::canonicalize("/usr/lib/x86_64-linux-gnu/libpcre2-8.so.0")
            .expect("libpcre2-8 is installed")
            .display()
            .to_string();
        let small = [
            ("/usr/bin/ls", "/usr/bin/ls".to_string()),
            (
                "/usr/lib/x86_64-linux-gnu/libselinux.so.1",
                format!("/{LIBS}/libselinux.so.1"),
            ),
            (pcre.as_str(), format!("/{LIBS}/libpcre2-8.so.0")),
        ];
        // 20 ms at 100 Mbit/s: a bandwidth-delay product of 250 KB, and segments of 3.3 of
        // them (833 KB) are fetched whole. This machine's libc has more code than that, the
        // others less.
        let limit = (250e3 * code_bdps(Duration::from_millis(20))) as u64;
        let libc = code_of("/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert!(libc.end - libc.start > limit, "libc's code is {libc:?}");
        for (host, _) in &small {
            let code = code_of(host);
            assert!(code.end - code.start < limit, "{host}'s code is {code:?}");
        }
        let (fs, dir) = after_reading(&runtime, "far", Link::Far, "/usr/bin/ls");
        for (host, path) in &small {
            assert!(fetched(&fs, path, code_of(host)), "{path}'s code");
        }
        // libc's code is left to its readers, but for its start (`.init`, the PLT, the
        // constructors) and what shares a chunk with its other segments.
        let libc_path = format!("/{LIBS}/libc.so.6");
        assert!(fetched(
            &fs,
            &libc_path,
            libc.start..libc.start + CODE_START
        ));
        let middle = (libc.start + libc.end) / 2;
        assert!(!fetched(&fs, &libc_path, middle..middle + 1));
        // Its constant data is small enough to be fetched whole, but for the unwind tables
        // after it (only an exception reads them): a chunk wholly inside those is not.
        let (constant, unwind) = constant_of("/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert!(fetched(&fs, &libc_path, constant.start..unwind));
        let inside = unwind.next_multiple_of(CHUNK);
        assert!(
            inside + CHUNK <= constant.end,
            "libc's unwind tables hold a chunk"
        );
        assert!(!fetched(&fs, &libc_path, inside..inside + CHUNK));
        let _ = std::fs::remove_dir_all(&dir);

        // With no network in between, no code is fetched before it is read.
        let (fs, dir) = after_reading(&runtime, "near", Link::Local, "/usr/bin/ls");
        let code = code_of(&pcre);
        let middle = (code.start + code.end) / 2;
        assert!(!fetched(
            &fs,
            &format!("/{LIBS}/libpcre2-8.so.0"),
            middle..middle + 1
        ));
        // The start of libc's code is in no chunk its other segments share.
        let start = libc.start + CODE_START / 2;
        assert!(!fetched(&fs, &libc_path, start..start + 1));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn code_too_large_to_fetch_whole_is_filled_in_while_the_link_idles() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir =
            std::env::temp_dir().join(format!("imgstream-loader-fill-{}", std::process::id()));
        let (fs, source) = image_with(
            &runtime,
            &dir,
            ls_and_its_libraries(),
            FsConfig::default(),
            Link::Far,
        );
        read_head(&fs, "/usr/bin/ls");
        let loader = fs.loader.as_ref().expect("the loader prefetch is on");
        assert!(loader.wait_idle(Duration::from_secs(60)));
        // libc's code is more than the link's code limit (see the test above): it waits for
        // the program to run in it...
        let libc = code_of("/usr/lib/x86_64-linux-gnu/libc.so.6");
        let libc_path = format!("/{LIBS}/libc.so.6");
        std::thread::sleep(Duration::from_millis(200));
        let middle = (libc.start + libc.end) / 2;
        assert!(!fetched(&fs, &libc_path, middle..middle + 1));
        assert_eq!(fs.fetcher.stats.fill_requests.load(Ordering::SeqCst), 0);
        // ...and once a reader reads a page of it, the idle fill fetches the rest, in pieces
        // of a 64 KiB chunk or two, one at a time while nothing else is in flight.
        read_page(&fs, &libc_path, middle - middle % 4096);
        let until = Instant::now() + Duration::from_secs(60);
        while !fetched(&fs, &libc_path, libc.clone()) {
            assert!(Instant::now() < until, "libc's code was filled in");
            std::thread::sleep(Duration::from_millis(20));
            fs.fetcher.flush_cache_writes();
        }
        // In pieces of at most 64 KiB compressed (libc's 64 KiB chunks compress below that).
        let stats = &fs.fetcher.stats;
        let pieces = stats.fill_requests.load(Ordering::SeqCst);
        let bytes = stats.fill_bytes.load(Ordering::SeqCst);
        assert!(pieces > 1, "{pieces} pieces");
        assert!(
            bytes <= pieces * (64 << 10),
            "{bytes} bytes in {pieces} pieces"
        );
        assert!(source.ranges.load(Ordering::SeqCst) as u64 > pieces);
        // Nothing but code: libz, which nothing needs, was not filled.
        assert!(!fetched(&fs, &format!("/{LIBS}/libz.so.1"), 0..4096));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_images_program_is_walked_before_any_reader_starts_it() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir = std::env::temp_dir().join(format!("imgstream-loader-run-{}", std::process::id()));
        let (fs, source) = ls_image(&runtime, &dir, true, Link::Far);
        // The first candidate that is a file of the image: not a missing one, nor a directory.
        let candidates = ["/usr/local/bin/ls", "/usr/bin", "/usr/bin/ls"].map(String::from);
        assert_eq!(
            fs.walk_from_program(&candidates).as_deref(),
            Some("/usr/bin/ls")
        );
        let loader = fs.loader.as_ref().expect("the loader prefetch is on");
        assert!(loader.wait_idle(Duration::from_secs(60)));
        fs.fetcher.flush_cache_writes();
        // No reader read anything, and ls's libraries, and theirs, are in.
        for lib in ["libselinux.so.1", "libc.so.6", "libpcre2-8.so.0"] {
            assert!(fetched(&fs, &format!("/{LIBS}/{lib}"), 0..4096), "{lib}");
        }
        // The program's start then costs no request, and no second walk.
        let requests = source.ranges.load(Ordering::SeqCst);
        read_head(&fs, "/usr/bin/ls");
        assert!(loader.wait_idle(Duration::from_secs(60)));
        assert_eq!(source.ranges.load(Ordering::SeqCst), requests);
        assert_eq!(fs.walk_from_program(&["/nowhere".to_string()]), None);
        let _ = std::fs::remove_dir_all(&dir);

        // With the prefetch off there is no walk.
        let (fs, source) = ls_image(&runtime, &dir, false, Link::Far);
        assert_eq!(fs.walk_from_program(&candidates), None);
        assert_eq!(source.ranges.load(Ordering::SeqCst), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn with_the_prefetch_off_only_what_is_read_is_fetched() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir = std::env::temp_dir().join(format!("imgstream-loader-off-{}", std::process::id()));
        let (fs, source) = ls_image(&runtime, &dir, false, Link::Local);
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
        let (fs, source) = ls_image(&runtime, &dir, true, Link::Local);
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
