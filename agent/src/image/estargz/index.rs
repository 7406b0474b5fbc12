//! A TOC validated into a [`LayerIndex`] that the rest of imgstream can trust: paths
//! normalised and unique, parent directories made explicit, chunks tiling each file and lying
//! before the TOC, hard links resolved to earlier entries, the prefetch list resolved.

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine as _;

use super::{
    EstargzError,
    toc::{FOOTER_SIZE, MAX_CHUNK, PREFETCH_LANDMARK, PrefetchChunk, Toc, TocEntry},
};
use crate::oci::digest::Digest;

/// Most entries a TOC may hold (a large image has a few hundred thousand files).
pub const MAX_ENTRIES: usize = 1_000_000;
/// Longest path a TOC entry may name, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Most components a TOC entry's path may have.
pub const MAX_PATH_DEPTH: usize = 512;
/// Directories one layer may replace by a later entry of another kind at most: each takes
/// everything under it out of the layer, a walk over the layer's files.
pub(super) const MAX_REPLACED_DIRS: usize = 64;

/// What a file is, once validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Directory,
    Regular,
    Symlink {
        target: String,
    },
    /// A second name for the regular file at `target` (its index in [`LayerIndex::nodes`]).
    HardLink {
        target: usize,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One chunk of a regular file's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk within the file.
    pub file_offset: u64,
    /// Decompressed size.
    pub size: u64,
    /// Where its gzip member starts in the blob.
    pub blob_offset: u64,
    /// Where the next gzip member starts: fetching `blob_offset..blob_end` is enough.
    pub blob_end: u64,
    /// The digest of what `blob_offset..blob_end` decodes to (the unit the cache keeps).
    pub digest: Digest,
    pub unit: Unit,
}

/// What a chunk's blob range decodes to, and where the file's bytes are in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Unit {
    /// eStargz: a gzip member holding exactly this chunk of the file.
    #[default]
    Member,
    /// A span of a plain gzip layer, found through its span index: the file's `size` bytes
    /// are at `offset` among the span's `len`. Every file that has bytes in the span shares
    /// it (and its digest).
    Span {
        start: std::sync::Arc<crate::image::gzip::Checkpoint>,
        len: u64,
        offset: u64,
        /// The span that ends where this one starts, as the cache keys it (its digest and
        /// length), when its bytes can stand in for this span's window: same member, and at
        /// least as long as the window. Once it is cached, a miss here fetches no window.
        before: Option<(Digest, u64)>,
    },
    /// zstd:chunked: zstd frames holding exactly this chunk of the file.
    Frame,
}

impl Chunk {
    /// How many bytes the blob range decodes to: what the cache keeps under `digest`.
    pub fn unit_len(&self) -> u64 {
        match &self.unit {
            Unit::Member | Unit::Frame => self.size,
            Unit::Span { len, .. } => *len,
        }
    }

    /// Where the chunk's bytes start in what the blob range decodes to.
    pub fn unit_offset(&self) -> u64 {
        match &self.unit {
            Unit::Member | Unit::Frame => 0,
            Unit::Span { offset, .. } => *offset,
        }
    }

    /// Whether this chunk's blob range goes on from `prev`'s with no gap (so one range
    /// request fetches both): for eStargz the next member, for spans the next span, which
    /// may share a byte with it.
    pub fn follows(&self, prev: &Chunk) -> bool {
        prev.blob_offset < self.blob_offset && self.blob_offset <= prev.blob_end
    }

    /// This chunk's bytes of `unit`, what its blob range decoded to (`None` if `unit` is
    /// shorter than the chunk says: never so for a verified unit).
    pub fn slice<'a>(&self, unit: &'a [u8]) -> Option<&'a [u8]> {
        let start = self.unit_offset();
        unit.get(start as usize..start.checked_add(self.size)? as usize)
    }
}

/// A validated file of the layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Normalised path: relative, no `.`/`..`, no trailing slash; "" is the root.
    pub path: String,
    pub kind: NodeKind,
    /// Permission bits, including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Digest of the whole content, when the TOC gives it.
    pub digest: Option<Digest>,
    pub chunks: Vec<Chunk>,
}

/// A layer's files as its TOC describes them, validated.
#[derive(Clone, Debug)]
pub struct LayerIndex {
    pub nodes: Vec<Node>,
    by_path: HashMap<String, usize>,
    /// Where the TOC's gzip member starts.
    pub toc_offset: u64,
    /// Whether the layer marks prioritised files, and the offset where they end.
    pub prefetch_end: Option<u64>,
    /// The TOC's prefetch list as (node, chunk) indexes, in the order the workload read them.
    pub prefetch: Vec<(usize, usize)>,
}

impl LayerIndex {
    /// Validates `toc` for a blob of `blob_size` bytes whose TOC member starts at `toc_offset`.
    pub fn from_toc(toc: Toc, toc_offset: u64, blob_size: u64) -> Result<Self, EstargzError> {
        if toc.version != 1 {
            return Err(EstargzError::BadToc(format!(
                "version {} (only 1 is defined)",
                toc.version
            )));
        }
        if toc_offset.saturating_add(FOOTER_SIZE) > blob_size {
            return Err(EstargzError::BadToc(format!(
                "TOC offset {toc_offset} lies beyond the blob ({blob_size} bytes)"
            )));
        }
        if toc.entries.len() > MAX_ENTRIES {
            return Err(EstargzError::BadToc(format!(
                "{} entries, more than the {MAX_ENTRIES} allowed",
                toc.entries.len()
            )));
        }
        let mut index = Self {
            nodes: Vec::new(),
            by_path: HashMap::new(),
            toc_offset,
            prefetch_end: None,
            prefetch: Vec::new(),
        };
        let prefetch = toc.prefetch;
        index.insert_dir("", None)?;
        let mut hardlinks: Vec<(usize, String)> = Vec::new();
        let mut replaced = Replaced::default();
        let mut member_starts: Vec<u64> = vec![toc_offset];
        for (i, entry) in toc.entries.into_iter().enumerate() {
            let bad = |why: String| EstargzError::BadEntry {
                index: i,
                name: shorten(&entry.name),
                why,
            };
            let path = normalize(&entry.name).map_err(|why| bad(why.into()))?;
            if path.len() > MAX_PATH_LEN || path.split('/').count() > MAX_PATH_DEPTH {
                return Err(bad(format!(
                    "the path is longer than {MAX_PATH_LEN} bytes or deeper than {MAX_PATH_DEPTH} components"
                )));
            }
            if entry.kind == "chunk" {
                let node = index
                    .by_path
                    .get(&path)
                    .copied()
                    .ok_or_else(|| bad("chunk of an unknown file".into()))?;
                let chunk = chunk_of(&entry, toc_offset).map_err(bad)?;
                let file = &mut index.nodes[node];
                let expected = file.chunks.last().map(|c| c.file_offset + c.size);
                if file.kind != NodeKind::Regular || expected != Some(chunk.file_offset) {
                    return Err(bad("chunk does not continue its file".into()));
                }
                member_starts.push(chunk.blob_offset);
                file.chunks.push(chunk);
                continue;
            }
            if path.is_empty() {
                // "./" as an entry: the root's own metadata.
                if entry.kind != "dir" {
                    return Err(bad("the root is not a directory".into()));
                }
                let root = &mut index.nodes[0];
                apply_meta(root, &entry).map_err(bad)?;
                continue;
            }
            // A name seen before: the later entry replaces the earlier one, as tar
            // extraction does (GNU tar, containerd's unpacking, estargz's own builder), but
            // for a directory over a directory, which only takes the later one's metadata.
            if let Some(&old) = index.by_path.get(&path)
                && !(entry.kind == "dir" && index.is_implicit_dir(&path))
            {
                index
                    .replace(old, &mut replaced)
                    .map_err(|why| bad(why.into()))?;
            }
            let kind = match &*entry.kind {
                "dir" => NodeKind::Directory,
                "reg" => NodeKind::Regular,
                "symlink" => {
                    if entry.link_name.is_empty() {
                        return Err(bad("symlink without a target".into()));
                    }
                    NodeKind::Symlink {
                        target: entry.link_name.to_string(),
                    }
                }
                "hardlink" => NodeKind::HardLink { target: usize::MAX },
                "char" | "block" => {
                    let (major, minor) = (
                        u32::try_from(entry.dev_major),
                        u32::try_from(entry.dev_minor),
                    );
                    let (Ok(major), Ok(minor)) = (major, minor) else {
                        return Err(bad("device numbers out of range".into()));
                    };
                    if entry.kind == "char" {
                        NodeKind::CharDevice { major, minor }
                    } else {
                        NodeKind::BlockDevice { major, minor }
                    }
                }
                "fifo" => NodeKind::Fifo,
                other => return Err(bad(format!("unknown type {:?}", shorten(other)))),
            };
            let mut node = Node::bare(path, kind, 0);
            apply_meta(&mut node, &entry).map_err(bad)?;
            if node.kind == NodeKind::Regular {
                node.size = entry.size;
                if !entry.digest.is_empty() {
                    node.digest = Some(
                        entry
                            .digest
                            .parse()
                            .map_err(|e| bad(format!("digest: {e}")))?,
                    );
                }
                if entry.size > 0 {
                    let chunk = chunk_of(&entry, toc_offset).map_err(bad)?;
                    if chunk.file_offset != 0 {
                        return Err(bad("first chunk does not start at offset 0".into()));
                    }
                    member_starts.push(chunk.blob_offset);
                    node.chunks.push(chunk);
                }
                if node.path == PREFETCH_LANDMARK {
                    index.prefetch_end = Some(entry.offset as u64);
                }
            }
            let link_target = match node.kind {
                NodeKind::HardLink { .. } => Some(
                    normalize(&entry.link_name)
                        .map_err(|why| bad(format!("hardlink target: {why}")))?,
                ),
                _ => None,
            };
            if node.kind == NodeKind::Directory {
                let path = node.path.clone();
                index.insert_dir(&path, Some(node))?;
            } else {
                // Inserting may first add implicit parent directories: use the index it returns.
                let at = index.insert(node)?;
                if let Some(target) = link_target {
                    replaced.link_targets.insert(target.clone());
                    hardlinks.push((at, target));
                }
            }
        }
        if !replaced.gone.is_empty() {
            index.compact(&replaced.gone, &mut hardlinks);
        }
        index.finish_chunks(member_starts)?;
        index.resolve_hardlinks(hardlinks)?;
        index.resolve_prefetch(prefetch)?;
        Ok(index)
    }

    /// Resolves the prefetch list: every entry must name a chunk of a regular file. Repeats
    /// are dropped, so the list is never longer than the layer's chunks.
    fn resolve_prefetch(&mut self, list: Vec<PrefetchChunk>) -> Result<(), EstargzError> {
        let mut seen = std::collections::HashSet::new();
        for (i, entry) in list.into_iter().enumerate() {
            let found = normalize(&entry.name).ok().and_then(|path| {
                let node = *self.by_path.get(&path)?;
                let chunks = &self.nodes[node].chunks;
                let at = chunks.partition_point(|c| c.file_offset < entry.chunk_offset);
                (chunks.get(at)?.file_offset == entry.chunk_offset).then_some((node, at))
            });
            let Some(found) = found else {
                return Err(EstargzError::BadToc(format!(
                    "prefetch entry {i} ({}, offset {}) is not a chunk of a file in the layer",
                    shorten(&entry.name),
                    entry.chunk_offset
                )));
            };
            if seen.insert(found) {
                self.prefetch.push(found);
            }
        }
        Ok(())
    }

    /// The chunks to fetch as soon as the layer is mounted, as (node, chunk) indexes: the
    /// TOC's prefetch list when it has one, else the prioritised files before the prefetch
    /// landmark (eStargz's own convention), in blob order; else none.
    pub fn prefetch_chunks(&self) -> Vec<(usize, usize)> {
        if !self.prefetch.is_empty() {
            return self.prefetch.clone();
        }
        let Some(end) = self.prefetch_end else {
            return Vec::new();
        };
        let mut chunks: Vec<(u64, usize, usize)> = self
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(n, node)| {
                node.chunks
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.blob_end <= end)
                    .map(move |(c, chunk)| (chunk.blob_offset, n, c))
            })
            .collect();
        chunks.sort_unstable();
        chunks.into_iter().map(|(_, n, c)| (n, c)).collect()
    }

    /// The node at `path` (normalised or not), if any.
    pub fn get(&self, path: &str) -> Option<&Node> {
        let path = normalize(path).ok()?;
        self.by_path.get(&path).map(|&i| &self.nodes[i])
    }

    /// Index of the node at `path` in [`Self::nodes`].
    pub fn position(&self, path: &str) -> Option<usize> {
        self.by_path.get(&normalize(path).ok()?).copied()
    }

    /// The regular file a node's data lives in: itself, or a hard link's target.
    pub fn data_node<'a>(&'a self, node: &'a Node) -> &'a Node {
        match node.kind {
            NodeKind::HardLink { target } => &self.nodes[target],
            _ => node,
        }
    }

    /// Takes node `old` out of the layer, for a later entry of the same name: a directory
    /// with everything under it, as containerd's unpacking removes it. A file a hard link
    /// before it named is not replaced (the link would have to keep the old file's data,
    /// which has no name left).
    fn replace(&mut self, old: usize, replaced: &mut Replaced) -> Result<(), &'static str> {
        let path = self.nodes[old].path.clone();
        if replaced.link_targets.contains(&path) {
            return Err("replaces a file that an earlier hard link names");
        }
        self.by_path.remove(&path);
        replaced.gone.insert(old);
        if self.nodes[old].kind != NodeKind::Directory {
            return Ok(());
        }
        replaced.dirs += 1;
        if replaced.dirs > MAX_REPLACED_DIRS {
            return Err("more directories replaced by other kinds of entry than imgstream follows");
        }
        let prefix = format!("{path}/");
        if replaced.link_targets.iter().any(|t| t.starts_with(&prefix)) {
            return Err("replaces a directory holding a file that an earlier hard link names");
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if node.path.starts_with(&prefix) && self.by_path.get(&node.path) == Some(&i) {
                self.by_path.remove(&node.path);
                replaced.gone.insert(i);
            }
        }
        Ok(())
    }

    /// Drops the nodes later entries replaced ([`Self::replace`]), renumbering the others
    /// and the hard links waiting to be resolved.
    fn compact(&mut self, gone: &HashSet<usize>, links: &mut Vec<(usize, String)>) {
        let mut renumbered = vec![usize::MAX; self.nodes.len()];
        for (i, node) in std::mem::take(&mut self.nodes).into_iter().enumerate() {
            if !gone.contains(&i) {
                renumbered[i] = self.nodes.len();
                self.nodes.push(node);
            }
        }
        for at in self.by_path.values_mut() {
            *at = renumbered[*at];
        }
        links.retain_mut(|(at, _)| {
            *at = renumbered[*at];
            *at != usize::MAX
        });
    }

    fn is_implicit_dir(&self, path: &str) -> bool {
        self.by_path
            .get(path)
            .is_some_and(|&i| self.nodes[i].kind == NodeKind::Directory)
    }

    fn insert(&mut self, node: Node) -> Result<usize, EstargzError> {
        let parent = parent_of(&node.path);
        let parent = match self.by_path.get(parent) {
            Some(&at) => at,
            None => {
                let parent = parent.to_string();
                self.insert_dir(&parent, None)?;
                self.by_path[&parent]
            }
        };
        if self.nodes[parent].kind != NodeKind::Directory {
            return Err(EstargzError::BadEntry {
                index: self.nodes.len(),
                name: shorten(&node.path),
                why: "its parent is not a directory".into(),
            });
        }
        let i = self.nodes.len();
        self.by_path.insert(node.path.clone(), i);
        self.nodes.push(node);
        Ok(i)
    }

    /// Adds (or, for an explicit entry, updates) a directory and any missing parents, from
    /// the outermost missing one down: a loop, not a recursion, so a deep path costs no stack.
    fn insert_dir(&mut self, path: &str, explicit: Option<Node>) -> Result<(), EstargzError> {
        if let Some(&i) = self.by_path.get(path) {
            if let Some(node) = explicit {
                self.nodes[i] = node;
            }
            return Ok(());
        }
        let mut missing = vec![path.to_string()];
        let mut at = path;
        while !at.is_empty() {
            at = parent_of(at);
            if self.by_path.contains_key(at) {
                break;
            }
            missing.push(at.to_string());
        }
        let mut explicit = explicit;
        while let Some(dir) = missing.pop() {
            let node = match explicit.take_if(|_| missing.is_empty()) {
                Some(node) => node,
                None => implicit_dir(&dir),
            };
            if dir.is_empty() {
                self.by_path.insert(String::new(), self.nodes.len());
                self.nodes.push(node);
            } else {
                self.insert(node)?;
            }
        }
        Ok(())
    }

    /// Checks every file's chunks cover it exactly and gives each chunk its member's end.
    fn finish_chunks(&mut self, mut starts: Vec<u64>) -> Result<(), EstargzError> {
        starts.sort_unstable();
        starts.dedup();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let covered = node.chunks.last().map_or(0, |c| c.file_offset + c.size);
            let bad = |why: String| EstargzError::BadEntry {
                index: i,
                name: shorten(&node.path),
                why,
            };
            // A last chunk of size 0 means "the rest of the file".
            if let Some(last) = node.chunks.last_mut()
                && last.size == 0
            {
                last.size = node
                    .size
                    .checked_sub(last.file_offset)
                    .ok_or_else(|| bad("chunk beyond the file".into()))?;
                if last.size > MAX_CHUNK {
                    return Err(bad(format!(
                        "chunk of {} bytes exceeds the {MAX_CHUNK}-byte limit",
                        last.size
                    )));
                }
            } else if node.kind == NodeKind::Regular && covered != node.size {
                return Err(bad(format!(
                    "chunks cover {covered} of {} bytes",
                    node.size
                )));
            }
            for chunk in &mut node.chunks {
                let next = starts.partition_point(|&s| s <= chunk.blob_offset);
                chunk.blob_end = starts.get(next).copied().unwrap_or(self.toc_offset);
            }
        }
        Ok(())
    }

    fn resolve_hardlinks(&mut self, links: Vec<(usize, String)>) -> Result<(), EstargzError> {
        for (i, target) in links {
            let bad = |why: &str| EstargzError::BadEntry {
                index: i,
                name: shorten(&self.nodes[i].path),
                why: why.to_string(),
            };
            let Some(&t) = self.by_path.get(&target) else {
                return Err(bad("hardlink to a missing file"));
            };
            // Link to the data node; a chain through other links is followed, a cycle refused.
            let mut seen = 0;
            let mut at = t;
            loop {
                match &self.nodes[at].kind {
                    NodeKind::HardLink { target } if *target != usize::MAX => at = *target,
                    NodeKind::HardLink { .. } => {
                        // Not resolved yet: resolve through its own recorded target name.
                        return Err(bad("hardlink to a hardlink (cycle or unsupported chain)"));
                    }
                    NodeKind::Directory => return Err(bad("hardlink to a directory")),
                    _ => break,
                }
                seen += 1;
                if seen > 64 {
                    return Err(bad("hardlink cycle"));
                }
            }
            if at == i {
                return Err(bad("hardlink to itself"));
            }
            self.nodes[i].kind = NodeKind::HardLink { target: at };
        }
        Ok(())
    }
}

/// What later entries of the same name replaced while a TOC is read.
#[derive(Default)]
struct Replaced {
    /// Nodes taken out.
    gone: HashSet<usize>,
    /// Directories replaced by another kind of entry.
    dirs: usize,
    /// Every path a hard link read so far names.
    link_targets: HashSet<String>,
}

fn chunk_of(entry: &TocEntry, toc_offset: u64) -> Result<Chunk, String> {
    let offset = u64::try_from(entry.offset).map_err(|_| "negative offset")?;
    if offset == 0 || offset >= toc_offset {
        return Err(format!(
            "data offset {offset} outside the blob's data (TOC at {toc_offset})"
        ));
    }
    let file_offset = u64::try_from(entry.chunk_offset).map_err(|_| "negative chunkOffset")?;
    let size = u64::try_from(entry.chunk_size).map_err(|_| "negative chunkSize")?;
    if size > MAX_CHUNK {
        return Err(format!(
            "chunk of {size} bytes exceeds the {MAX_CHUNK}-byte limit"
        ));
    }
    if entry.chunk_digest.is_empty() {
        return Err("no chunkDigest: the chunk could not be verified".into());
    }
    let digest = entry
        .chunk_digest
        .parse()
        .map_err(|e| format!("chunkDigest: {e}"))?;
    Ok(Chunk {
        file_offset,
        size,
        blob_offset: offset,
        blob_end: 0,
        digest,
        unit: Unit::Member,
    })
}

fn apply_meta(node: &mut Node, e: &TocEntry) -> Result<(), String> {
    node.mode = (e.mode & 0o7777) as u32;
    node.uid = u32::try_from(e.uid).map_err(|_| "uid out of range")?;
    node.gid = u32::try_from(e.gid).map_err(|_| "gid out of range")?;
    node.mtime = if e.modtime.is_empty() {
        (0, 0)
    } else {
        crate::time::parse_rfc3339(&e.modtime).map_err(|e| e.to_string())?
    };
    for (key, value) in &e.xattrs {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| format!("xattr {key} is not base64"))?;
        node.xattrs.insert(key.clone(), bytes);
    }
    Ok(())
}

/// Normalises a tar name: strips "./" and "/" prefixes and trailing "/", refuses "..",
/// NUL and empty components in the middle.
pub fn normalize(name: &str) -> Result<String, &'static str> {
    if name.contains('\0') {
        return Err("name contains NUL");
    }
    let mut path = String::with_capacity(name.len());
    for part in name.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err("name escapes the layer (`..`)"),
            p => {
                if !path.is_empty() {
                    path.push('/');
                }
                path.push_str(p);
            }
        }
    }
    Ok(path)
}

/// A directory the TOC implies (a parent of an entry) without listing it.
fn implicit_dir(path: &str) -> Node {
    Node::bare(path.to_string(), NodeKind::Directory, 0o755)
}

impl Node {
    /// A node of `kind` at `path` with `mode`, owned by root, with no data, times or xattrs
    /// yet.
    fn bare(path: String, kind: NodeKind, mode: u32) -> Self {
        Node {
            path,
            kind,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: (0, 0),
            xattrs: BTreeMap::new(),
            digest: None,
            chunks: Vec::new(),
        }
    }
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

fn shorten(s: &str) -> String {
    s.chars().take(200).collect()
}
