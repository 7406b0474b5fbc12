//! Directory read-ahead of cached files: a reader going through a directory's files in
//! listing order (`tar`, `cp -r`, a scanner, an interpreter loading a package whole) has the
//! next files' cached bytes read from the disk while it is still on the current one.
//!
//! The kernel reads ahead within a file, never across files, so a reader of many small files
//! waits for the disk once per file, on a local disk as through this mount. Here the tree is
//! known: when a reader opens (or, with no OPEN sent, first reads) the file after the one it
//! opened last in the same directory, or, right after that, one of the first files of another
//! directory (a walk of a tree going on), the next [`FILES`] files of that listing are looked
//! up in the cache and their backing files (with passthrough) or chunks asked into the page
//! cache (`POSIX_FADV_WILLNEED`) by a thread of the mount's own. An open of one file alone, or
//! opens out of listing order, read nothing ahead; a lone open copies no listing, and a
//! directory of more than [`LISTING`] entries is not followed. What is read ahead is only
//! ever what is cached: a missing chunk is never fetched from here.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
    mpsc,
};

use super::{passthrough, tree::Tree};
use crate::{cache::ChunkCache, fetch::layer::RemoteLayer, oci::digest::Digest};

/// Files read ahead of a reader, at most.
pub(crate) const FILES: usize = 16;
/// A file larger than this is left to the kernel's readahead within the file.
const LARGEST: u64 = 1 << 20;
/// An open at most this many entries after the last one still goes through the directory in
/// order (the entries between may be directories, or files the reader skips).
const STRIDE: usize = 4;
/// Directories followed at once (readers going through several in parallel).
const DIRS: usize = 8;
/// A directory with more entries than this is not followed (following one copies its
/// listing).
const LISTING: usize = 4096;
/// Files waiting for the thread; more are not read ahead.
const QUEUED: usize = 256;

/// What to read ahead for one file: its backing file (passthrough), else its chunks.
struct Job {
    backing: Option<Digest>,
    chunks: Vec<Digest>,
}

/// A directory a reader goes through.
#[derive(Debug)]
struct Walk {
    dir: u64,
    /// Its entries, in listing order: copied when a second file of it is opened (or the
    /// first, when a walk of the tree goes on into it), empty until then.
    order: Vec<u64>,
    /// The last file opened, and its position in `order` once there is one.
    last: (u64, usize),
    /// Entries before this were read ahead (or passed).
    ahead: usize,
    /// When it was last used, for dropping the least recently used.
    used: u64,
}

impl Walk {
    /// Where `ino` is in the listing: looked for from the last open on, where a reader
    /// going in order is, then before it.
    fn position(&self, ino: u64) -> Option<usize> {
        let from = self.last.1.min(self.order.len());
        let (before, after) = self.order.split_at(from);
        after
            .iter()
            .position(|&i| i == ino)
            .map(|i| from + i)
            .or_else(|| before.iter().position(|&i| i == ino))
    }
}

/// Files read ahead by every mount of this process: `imgstream_dir_readahead_files_total`.
pub(crate) static FILES_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Counters.
#[derive(Debug, Default)]
pub(crate) struct AheadStats {
    /// Files whose cached bytes were asked into the page cache ahead of a reader.
    pub(crate) files: AtomicU64,
}

/// The read-ahead of one mount.
pub(crate) struct DirAhead {
    tree: Arc<Tree>,
    layers: Arc<[RemoteLayer]>,
    cache: Arc<ChunkCache>,
    /// The directories followed, a clock for their use, and whether the last open was in
    /// order in its directory.
    walks: Mutex<(Vec<Walk>, u64, bool)>,
    queue: Mutex<Option<mpsc::SyncSender<Job>>>,
    pub(crate) stats: Arc<AheadStats>,
}

impl std::fmt::Debug for DirAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirAhead").finish_non_exhaustive()
    }
}

impl DirAhead {
    pub(crate) fn new(tree: Arc<Tree>, layers: Arc<[RemoteLayer]>, cache: Arc<ChunkCache>) -> Self {
        Self {
            tree,
            layers,
            cache,
            walks: Mutex::new((Vec::new(), 0, false)),
            queue: Mutex::new(None),
            stats: Arc::default(),
        }
    }

    /// A reader opened (or first read) file `ino`: reads ahead of it when it goes through its
    /// directory in order; `backing` asks for backing files rather than chunks.
    pub(crate) fn opened(&self, ino: u64, backing: bool) {
        let next = self.next(ino);
        if next.is_empty() {
            return;
        }
        let mut queue = crate::sync::lock(&self.queue);
        if queue.is_none() {
            *queue = self.spawn();
        }
        let Some(queue) = queue.as_ref() else {
            return;
        };
        for ino in next {
            let Some((layer, node)) = self.tree.get(ino).and_then(|i| i.data) else {
                continue;
            };
            let node = &self.layers[layer].index.nodes[node];
            let job = Job {
                backing: backing.then(|| passthrough::backing_key(node)),
                chunks: node.chunks.iter().map(|c| c.digest).collect(),
            };
            if queue.try_send(job).is_err() {
                break;
            }
        }
    }

    /// The files to read ahead of an open of `ino`: none unless it follows the last open in
    /// its directory closely; then the regular files of at most [`LARGEST`] bytes after it,
    /// up to [`FILES`] ahead, that were not handed over before.
    pub(crate) fn next(&self, ino: u64) -> Vec<u64> {
        let Some(dir) = self.tree.get(ino).map(|i| i.parent) else {
            return Vec::new();
        };
        let mut walks = crate::sync::lock(&self.walks);
        let (walks, clock, in_order_before) = &mut *walks;
        *clock += 1;
        let now = *clock;
        let Some(i) = walks.iter().position(|w| w.dir == dir) else {
            // A directory's first open: in order when it is one of the listing's first
            // entries and the reader was going through a directory in order just before (a
            // walk of a tree goes from one directory's files to the next's). Otherwise it is
            // only noted: its listing is copied if another of its files is opened.
            let head = self
                .tree
                .get(dir)
                .and_then(|d| d.children.values().take(STRIDE + 1).position(|&i| i == ino));
            let order = match head {
                Some(_) if *in_order_before => self.listing(dir),
                _ => None,
            };
            *in_order_before = order.is_some();
            if walks.len() >= DIRS
                && let Some(oldest) = (0..walks.len()).min_by_key(|&i| walks[i].used)
            {
                walks.swap_remove(oldest);
            }
            let at = head.unwrap_or(0);
            let mut walk = Walk {
                dir,
                order: order.unwrap_or_default(),
                last: (ino, at),
                ahead: at + 1,
                used: now,
            };
            let next = self.ahead_of(&mut walk, at);
            walks.push(walk);
            return next;
        };
        let walk = &mut walks[i];
        walk.used = now;
        if walk.order.is_empty() {
            // The directory's second open: follow it from here on.
            let first = walk.last.0;
            walk.order = self.listing(dir).unwrap_or_default();
            walk.last = (first, 0);
            let Some(at) = walk.position(first) else {
                walk.last = (ino, 0);
                *in_order_before = false;
                return Vec::new();
            };
            walk.last.1 = at;
            walk.ahead = at + 1;
        }
        let Some(at) = walk.position(ino) else {
            walk.last.0 = ino;
            *in_order_before = false;
            return Vec::new();
        };
        let in_order = at > walk.last.1 && at - walk.last.1 <= STRIDE;
        walk.last = (ino, at);
        *in_order_before = in_order;
        if !in_order {
            // A reader that starts over (or jumps) hands over again from here when it goes
            // on in order: what was handed over before may have been evicted, or not
            // cached yet then.
            walk.ahead = at + 1;
            return Vec::new();
        }
        self.ahead_of(walk, at)
    }

    /// The files of `walk` to read ahead of its entry `at`, that were not handed over before.
    fn ahead_of(&self, walk: &mut Walk, at: usize) -> Vec<u64> {
        let from = walk.ahead.max(at + 1);
        let to = (at + 1 + FILES).min(walk.order.len());
        if from >= to {
            return Vec::new();
        }
        walk.ahead = to;
        walk.order[from..to]
            .iter()
            .copied()
            .filter(|&i| {
                self.tree
                    .get(i)
                    .is_some_and(|n| n.data.is_some() && n.size > 0 && n.size <= LARGEST)
            })
            .collect()
    }

    /// The entries of directory `dir` in listing order, unless there are more than
    /// [`LISTING`].
    fn listing(&self, dir: u64) -> Option<Vec<u64>> {
        let children = &self.tree.get(dir)?.children;
        (children.len() <= LISTING).then(|| children.values().copied().collect())
    }

    /// The thread that asks the disk; it ends with the mount (the sender's drop).
    fn spawn(&self) -> Option<mpsc::SyncSender<Job>> {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUED);
        let cache = self.cache.clone();
        let stats = self.stats.clone();
        std::thread::Builder::new()
            .name("dir-ahead".into())
            .spawn(move || {
                for job in rx {
                    let warmed = job.backing.is_some_and(|key| cache.warm(&key, true))
                        // Every chunk, not up to the first one there.
                        || job
                            .chunks
                            .iter()
                            .filter(|digest| cache.warm(digest, false))
                            .count()
                            > 0;
                    if warmed {
                        stats.files.fetch_add(1, Ordering::Relaxed);
                        FILES_TOTAL.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .inspect_err(|err| tracing::warn!(%err, "no directory read-ahead thread"))
            .ok()
            .map(|_| tx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::{
        fs::View,
        image::tar::{Header, Kind},
        testing::{estargz_layer, layer_index, scratch_cache},
    };

    /// A directory `d` of 40 files of 4 KiB (`d/f00`..`d/f39`), a subdirectory among them
    /// (`d/f05x`, one file), a file past the size bound (`d/f07x`), and a directory `e` of
    /// three files.
    fn layer() -> RemoteLayer {
        let mut entries = vec![
            (Header::new("d/f05x/inner", Kind::Regular), vec![1; 10]),
            (
                Header::new("d/f07x", Kind::Regular),
                vec![0; LARGEST as usize + 1],
            ),
        ];
        for i in 0..40u8 {
            entries.push((
                Header::new(&format!("d/f{i:02}"), Kind::Regular),
                vec![i; 4096],
            ));
        }
        for name in ["e/a", "e/b", "e/c"] {
            entries.push((Header::new(name, Kind::Regular), name.as_bytes().to_vec()));
        }
        for i in 0..=LISTING {
            entries.push((Header::new(&format!("big/{i:05}"), Kind::Regular), vec![1]));
        }
        let (blob, summary) = estargz_layer(&entries, 1 << 20, false);
        let (index, toc) = layer_index(&blob, None).expect("an index");
        RemoteLayer::new(crate::testing::layer_descriptor(&summary), index, toc)
    }

    struct Fixture {
        ahead: DirAhead,
        tree: Arc<Tree>,
        layers: Arc<[RemoteLayer]>,
        cache: Arc<ChunkCache>,
        dir: std::path::PathBuf,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let layers: Arc<[RemoteLayer]> = Arc::from(vec![layer()]);
            let tree = Arc::new(Tree::build(&[&layers[0].index], View::Merged));
            let (dir, cache) = scratch_cache(name);
            let ahead = DirAhead::new(tree.clone(), layers.clone(), cache.clone());
            Self {
                ahead,
                tree,
                layers,
                cache,
                dir,
            }
        }

        fn ino(&self, path: &str) -> u64 {
            self.tree.resolve(path.as_bytes()).expect(path).ino
        }

        fn names(&self, inos: &[u64]) -> Vec<String> {
            inos.iter()
                .map(|&ino| {
                    let parent = self.tree.get(ino).expect("an inode").parent;
                    let (name, _) = self
                        .tree
                        .get(parent)
                        .expect("a directory")
                        .children
                        .iter()
                        .find(|(_, i)| **i == ino)
                        .expect("an entry of its directory");
                    String::from_utf8_lossy(name).into_owned()
                })
                .collect()
        }

        fn next(&self, path: &str) -> Vec<String> {
            self.names(&self.ahead.next(self.ino(path)))
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn files(range: std::ops::Range<u8>) -> Vec<String> {
        range.map(|i| format!("f{i:02}")).collect()
    }

    #[test]
    fn a_reader_going_through_a_directory_gets_the_next_files_once_and_no_one_else_does() {
        let f = Fixture::new("ahead-next");
        // One open is no walk; the next file in the listing is.
        assert!(f.next("/d/f00").is_empty());
        let mut expected = files(2..5);
        // The subdirectory and the file past the bound are passed over, and still count
        // towards the files ahead.
        expected.extend(files(5..7));
        expected.extend(files(7..16));
        assert_eq!(f.next("/d/f01"), expected);
        // Further on: only what was not handed over before.
        assert_eq!(f.next("/d/f02"), files(16..17));
        assert_eq!(f.next("/d/f03"), files(17..18));
        // A jump further than the stride, or back, or the same file again: no walk.
        assert!(f.next("/d/f12").is_empty());
        assert!(f.next("/d/f12").is_empty());
        assert!(f.next("/d/f04").is_empty());
        // In order again from there: handed over again from there (what was handed over
        // before may not have been cached then, or was evicted since).
        assert_eq!(f.next("/d/f05"), files(6..20));
        // The end of the listing ends it.
        assert!(f.next("/d/f38").is_empty());
        assert!(f.next("/d/f39").is_empty());
        // From there into another directory's first file: that one is read ahead at once.
        assert_eq!(f.next("/e/a"), ["b", "c"]);
        // Out of order, then into a directory: nothing.
        assert!(f.next("/d/f30").is_empty());
        assert!(f.next("/d/f05x/inner").is_empty());
        // Directories and unknown inodes are nothing.
        assert!(f.ahead.next(f.ino("/d")).is_empty());
        assert!(f.ahead.next(u64::MAX).is_empty());
    }

    #[test]
    fn a_lone_open_copies_no_listing_and_a_huge_directory_is_never_followed() {
        let f = Fixture::new("ahead-bounds");
        let listed = |dir: &str| {
            let dir = f.ino(dir);
            let walks = crate::sync::lock(&f.ahead.walks);
            walks.0.iter().find(|w| w.dir == dir).map(|w| w.order.len())
        };
        // One open in a directory is noted; its listing is not copied.
        assert!(f.next("/d/f00").is_empty());
        assert_eq!(listed("/d"), Some(0));
        // The second open in it copies the listing (42 entries) and reads ahead.
        assert!(!f.next("/d/f01").is_empty());
        assert_eq!(listed("/d"), Some(42));
        // A directory of more entries than a walk copies: nothing, however it is read.
        for i in 0..8 {
            assert!(f.next(&format!("/big/{i:05}")).is_empty());
        }
        assert_eq!(listed("/big"), Some(0));
    }

    #[test]
    fn only_cached_files_are_read_ahead() {
        let f = Fixture::new("ahead-cached");
        // Of the files ahead of f01 (f02..f15), f02..f09 are cached and the rest are not.
        let index = &f.layers[0].index;
        for i in 2..10u8 {
            let node = index.get(&format!("d/f{i:02}")).expect("a file");
            for chunk in &node.chunks {
                f.cache.put(&chunk.digest, &[i; 4096]).expect("cached");
            }
        }
        f.ahead.opened(f.ino("/d/f00"), false);
        assert_eq!(f.ahead.stats.files.load(Ordering::Relaxed), 0);
        f.ahead.opened(f.ino("/d/f01"), false);
        // The thread goes through all fourteen; it is done when the queue is empty.
        let until = Instant::now() + Duration::from_secs(10);
        while f.ahead.stats.files.load(Ordering::Relaxed) < 8 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(f.ahead.stats.files.load(Ordering::Relaxed), 8);
    }
}
