//! The inode table of an image, in one of two views:
//!
//! - **merged**: every layer applied bottom to top, OCI whiteouts (`.wh.NAME`) removing what
//!   lower layers had at that name and opaque markers (`.wh..wh..opq`) hiding a directory's
//!   lower contents, as a container sees the image (VM sandboxes, `imgstream mount`);
//! - **one layer**: what overlayfs expects of a lower directory, with whiteouts turned into
//!   0:0 character devices and opaque markers into the `trusted.overlay.opaque` xattr (what a
//!   containerd snapshotter mounts).
//!
//! Inode numbers are assigned in a fixed order from the layers' TOCs, so they are stable for
//! an image; hard links share one inode. eStargz landmark files are not image content and
//! are left out.

use std::collections::{BTreeMap, HashMap};

use crate::{
    image::estargz::{LayerIndex, NO_PREFETCH_LANDMARK, NodeKind, PREFETCH_LANDMARK},
    oci::digest::{Digest, Hasher},
};

/// `FUSE_ROOT_ID`.
pub const ROOT_INO: u64 = 1;
/// Symlinks [`Tree::resolve`] follows in one path at most (the kernel's limit is 40).
pub const MAX_SYMLINK_HOPS: usize = 40;
/// Changes whenever [`Tree::layout`] hashes other fields, so digests of two versions never
/// match by accident.
const LAYOUT_VERSION: &[u8] = b"imgstream tree layout 1\0";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to know a lower directory is opaque.
pub const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Which view of the image to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Merged,
    /// One layer, by position (0 = bottom), in overlayfs lower-directory form.
    Layer(usize),
}

/// A view that is neither `merged` nor `layer:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither `merged` nor `layer:N`")]
pub struct ViewError(String);

impl std::str::FromStr for View {
    type Err = ViewError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "merged" => Ok(View::Merged),
            _ => s
                .strip_prefix("layer:")
                .and_then(|n| n.parse().ok())
                .map(View::Layer)
                .ok_or_else(|| ViewError(s.into())),
        }
    }
}

/// What an inode is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Directory,
    Regular,
    Symlink(Vec<u8>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

/// One inode.
#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Directory entries, by name.
    pub children: BTreeMap<Vec<u8>, u64>,
    pub parent: u64,
    /// Names pointing at this inode (hard links).
    pub nlink: u32,
    /// Where a regular file's data is: (layer position, node index in that layer's index).
    pub data: Option<(usize, usize)>,
    /// Layer position that created or last replaced this entry.
    layer: usize,
    /// Unreachable since a whiteout or replacement removed it.
    dead: bool,
    /// Directory entries naming this inode, kept as entries come and go.
    names: u32,
}

/// The inode table.
#[derive(Clone, Debug)]
pub struct Tree {
    /// `inodes[ino - 1]`.
    inodes: Vec<Inode>,
}

impl Tree {
    /// Builds `view` of `layers` (bottom first).
    pub fn build(layers: &[&LayerIndex], view: View) -> Self {
        let mut tree = Self { inodes: Vec::new() };
        tree.inodes
            .push(new_inode(ROOT_INO, ROOT_INO, Kind::Directory, 0));
        match view {
            View::Merged => {
                for (position, index) in layers.iter().enumerate() {
                    tree.apply(index, position, false);
                }
            }
            View::Layer(position) => {
                if let Some(index) = layers.get(position) {
                    tree.apply(index, position, true);
                }
            }
        }
        tree.count_links();
        tree
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        let inode = self
            .inodes
            .get(usize::try_from(ino.checked_sub(1)?).ok()?)?;
        (!inode.dead).then_some(inode)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<&Inode> {
        self.get(*self.get(parent)?.children.get(name)?)
    }

    /// The inode at absolute `path`, following symlinks (at most [`MAX_SYMLINK_HOPS`] of
    /// them) as the kernel would within this tree, `..` included; `None` when a part is
    /// missing, not a directory, or the links go round.
    pub fn resolve(&self, path: &[u8]) -> Option<&Inode> {
        // Parts still to walk, the next one last.
        let mut parts: Vec<&[u8]> = path.split(|&b| b == b'/').rev().collect();
        let mut at = self.get(ROOT_INO)?;
        let mut hops = 0;
        while let Some(part) = parts.pop() {
            match part {
                b"" | b"." => continue,
                b".." => {
                    at = self.get(at.parent)?;
                    continue;
                }
                _ => {}
            }
            if at.kind != Kind::Directory {
                return None;
            }
            let next = self.lookup(at.ino, part)?;
            match &next.kind {
                Kind::Symlink(target) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return None;
                    }
                    if target.first() == Some(&b'/') {
                        at = self.get(ROOT_INO)?;
                    }
                    parts.extend(target.split(|&b| b == b'/').rev());
                }
                _ => at = next,
            }
        }
        Some(at)
    }

    /// Live inodes.
    pub fn iter(&self) -> impl Iterator<Item = &Inode> {
        self.inodes.iter().filter(|i| !i.dead)
    }

    /// A digest of what a FUSE connection serving this tree has told the kernel, or may
    /// have: which inode number is which entry, its parent, kind, attributes and where its
    /// data is. A connection is served again by another agent only if its tree has the same
    /// layout (an agent whose tree building changed, or a layer whose TOC did, would answer
    /// the kernel's cached inode numbers with other files).
    pub fn layout(&self) -> Digest {
        let mut hasher = Hasher::new();
        hasher.update(LAYOUT_VERSION);
        let mut put = |bytes: &[u8]| hasher.update(bytes);
        for (n, inode) in self.inodes.iter().enumerate() {
            put(&(n as u64).to_le_bytes());
            put(&[u8::from(inode.dead)]);
            let (kind, extra): (u8, &[u8]) = match &inode.kind {
                Kind::Directory => (1, &[]),
                Kind::Regular => (2, &[]),
                Kind::Symlink(target) => (3, target),
                Kind::CharDevice(..) => (4, &[]),
                Kind::BlockDevice(..) => (5, &[]),
                Kind::Fifo => (6, &[]),
            };
            put(&[kind]);
            put(&(extra.len() as u64).to_le_bytes());
            put(extra);
            if let Kind::CharDevice(major, minor) | Kind::BlockDevice(major, minor) = inode.kind {
                put(&major.to_le_bytes());
                put(&minor.to_le_bytes());
            }
            for n in [inode.ino, inode.parent, inode.size] {
                put(&n.to_le_bytes());
            }
            for n in [inode.mode, inode.uid, inode.gid, inode.nlink] {
                put(&n.to_le_bytes());
            }
            put(&inode.mtime.0.to_le_bytes());
            put(&inode.mtime.1.to_le_bytes());
            let (layer, node) = inode
                .data
                .map_or((u64::MAX, u64::MAX), |(l, n)| (l as u64, n as u64));
            put(&layer.to_le_bytes());
            put(&node.to_le_bytes());
            put(&(inode.children.len() as u64).to_le_bytes());
            for (name, ino) in &inode.children {
                put(&(name.len() as u64).to_le_bytes());
                put(name);
                put(&ino.to_le_bytes());
            }
        }
        hasher.finish()
    }

    /// Applies one layer's entries on top of what the tree holds.
    fn apply(&mut self, index: &LayerIndex, position: usize, overlay_form: bool) {
        // This layer's nodes -> inodes, for hard links.
        let mut made: HashMap<usize, u64> = HashMap::new();
        for (n, node) in index.nodes.iter().enumerate() {
            if node.path.is_empty() {
                let root = &mut self.inodes[0];
                (root.mode, root.uid, root.gid, root.mtime) =
                    (node.mode, node.uid, node.gid, node.mtime);
                root.xattrs = node.xattrs.clone();
                continue;
            }
            if node.path == PREFETCH_LANDMARK || node.path == NO_PREFETCH_LANDMARK {
                continue;
            }
            let (dir_path, name) = node.path.rsplit_once('/').unwrap_or(("", &node.path));
            let Some(parent) = self.dir_at(dir_path) else {
                continue;
            };
            if name == OPAQUE_MARKER {
                if overlay_form {
                    self.inodes[(parent - 1) as usize]
                        .xattrs
                        .insert(OVERLAY_OPAQUE_XATTR.into(), b"y".to_vec());
                } else {
                    let lower: Vec<(Vec<u8>, u64)> = self.inodes[(parent - 1) as usize]
                        .children
                        .iter()
                        .filter(|&(_, &c)| self.inodes[(c - 1) as usize].layer < position)
                        .map(|(k, &v)| (k.clone(), v))
                        .collect();
                    for (child_name, _) in lower {
                        self.unlink(parent, &child_name);
                    }
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                if overlay_form {
                    let mut inode = self.new_node(parent, Kind::CharDevice(0, 0), position);
                    inode.mode = 0;
                    (inode.uid, inode.gid, inode.mtime) = (node.uid, node.gid, node.mtime);
                    self.attach(parent, hidden.as_bytes(), inode);
                } else if let Some(&old) = self.inodes[(parent - 1) as usize]
                    .children
                    .get(hidden.as_bytes())
                    && self.inodes[(old - 1) as usize].layer < position
                {
                    self.unlink(parent, hidden.as_bytes());
                }
                continue;
            }
            if let NodeKind::HardLink { target } = node.kind
                && let Some(&ino) = made.get(&target)
                && !self.inodes[(ino - 1) as usize].dead
            {
                self.unlink(parent, name.as_bytes());
                self.link(parent, name.as_bytes(), ino);
                continue;
            }
            let data_node = index.data_node(node);
            let kind = match &data_node.kind {
                NodeKind::Directory => Kind::Directory,
                NodeKind::Regular | NodeKind::HardLink { .. } => Kind::Regular,
                NodeKind::Symlink { target } => Kind::Symlink(target.as_bytes().to_vec()),
                NodeKind::CharDevice { major, minor } => Kind::CharDevice(*major, *minor),
                NodeKind::BlockDevice { major, minor } => Kind::BlockDevice(*major, *minor),
                NodeKind::Fifo => Kind::Fifo,
            };
            let existing = self.inodes[(parent - 1) as usize]
                .children
                .get(name.as_bytes())
                .copied();
            if kind == Kind::Directory
                && let Some(old) = existing
                && self.inodes[(old - 1) as usize].kind == Kind::Directory
            {
                // A directory again: the upper layer's metadata, the merged contents.
                let dir = &mut self.inodes[(old - 1) as usize];
                (dir.mode, dir.uid, dir.gid, dir.mtime, dir.layer) =
                    (node.mode, node.uid, node.gid, node.mtime, position);
                dir.xattrs = node.xattrs.clone();
                made.insert(n, old);
                continue;
            }
            let mut inode = self.new_node(parent, kind, position);
            (inode.mode, inode.uid, inode.gid, inode.mtime) = (
                data_node.mode,
                data_node.uid,
                data_node.gid,
                data_node.mtime,
            );
            inode.xattrs = data_node.xattrs.clone();
            if inode.kind == Kind::Regular {
                inode.size = data_node.size;
                let data_index = match node.kind {
                    NodeKind::HardLink { target } => target,
                    _ => n,
                };
                inode.data = Some((position, data_index));
            }
            if let Kind::Symlink(target) = &inode.kind {
                inode.size = target.len() as u64;
            }
            let ino = self.attach(parent, name.as_bytes(), inode);
            made.insert(n, ino);
            if let NodeKind::HardLink { target } = node.kind {
                made.entry(target).or_insert(ino);
            }
        }
    }

    fn new_node(&self, parent: u64, kind: Kind, layer: usize) -> Inode {
        new_inode(self.inodes.len() as u64 + 1, parent, kind, layer)
    }

    /// Adds `inode` as `name` in `parent`, replacing what was there.
    fn attach(&mut self, parent: u64, name: &[u8], inode: Inode) -> u64 {
        self.unlink(parent, name);
        let ino = inode.ino;
        self.inodes.push(inode);
        self.link(parent, name, ino);
        ino
    }

    fn link(&mut self, parent: u64, name: &[u8], ino: u64) {
        self.inodes[(parent - 1) as usize]
            .children
            .insert(name.to_vec(), ino);
        self.inodes[(ino - 1) as usize].names += 1;
    }

    /// Removes `name` from `parent`. An inode left with no name is dead, and a dead
    /// directory takes its subtree along.
    fn unlink(&mut self, parent: u64, name: &[u8]) {
        let Some(ino) = self.inodes[(parent - 1) as usize].children.remove(name) else {
            return;
        };
        let inode = &mut self.inodes[(ino - 1) as usize];
        inode.names -= 1;
        if inode.names > 0 {
            return;
        }
        inode.dead = true;
        let names: Vec<Vec<u8>> = inode.children.keys().cloned().collect();
        for child in names {
            self.unlink(ino, &child);
        }
    }

    /// The directory at `path` (creating missing ones, as a TOC's implicit parents).
    fn dir_at(&mut self, path: &str) -> Option<u64> {
        let mut at = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at = match self.inodes[(at - 1) as usize].children.get(part.as_bytes()) {
                Some(&c) if self.inodes[(c - 1) as usize].kind == Kind::Directory => c,
                Some(_) => return None,
                None => {
                    let mut dir = self.new_node(at, Kind::Directory, 0);
                    dir.mode = 0o755;
                    self.attach(at, part.as_bytes(), dir)
                }
            };
        }
        Some(at)
    }

    fn count_links(&mut self) {
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
        for inode in self.inodes.iter().filter(|i| !i.dead) {
            let dirs = inode
                .children
                .values()
                .filter(|&&c| self.inodes[(c - 1) as usize].kind == Kind::Directory)
                .count();
            subdirs.insert(inode.ino, dirs as u32);
        }
        for inode in self.inodes.iter_mut().filter(|i| !i.dead) {
            inode.nlink = if inode.kind == Kind::Directory {
                2 + subdirs.get(&inode.ino).copied().unwrap_or(0)
            } else {
                inode.names.max(1)
            };
        }
    }
}

fn new_inode(ino: u64, parent: u64, kind: Kind, layer: usize) -> Inode {
    Inode {
        ino,
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: (0, 0),
        xattrs: BTreeMap::new(),
        children: BTreeMap::new(),
        parent,
        nlink: 1,
        data: None,
        layer,
        dead: false,
        names: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        image::tar::{Header, Kind as TarKind},
        testing::{estargz_layer, layer_index},
    };

    fn file(path: &str, data: &[u8]) -> (Header, Vec<u8>) {
        (Header::new(path, TarKind::Regular), data.to_vec())
    }

    fn dir(path: &str) -> (Header, Vec<u8>) {
        (Header::new(path, TarKind::Directory), Vec::new())
    }

    fn hard_link(path: &str, target: &str) -> (Header, Vec<u8>) {
        let mut h = Header::new(path, TarKind::HardLink);
        h.link_name = target.into();
        (h, Vec::new())
    }

    fn index(entries: &[(Header, Vec<u8>)]) -> LayerIndex {
        let (blob, _) = estargz_layer(entries, 4096, true);
        layer_index(&blob, None).unwrap().0
    }

    /// The inode at `path` (slash-separated, from the root), if the view has it.
    fn at<'a>(tree: &'a Tree, path: &str) -> Option<&'a Inode> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(tree.get(ROOT_INO)?, |dir, name| {
                tree.lookup(dir.ino, name.as_bytes())
            })
    }

    fn names(tree: &Tree, path: &str) -> Vec<String> {
        at(tree, path)
            .unwrap()
            .children
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn the_layout_digest_is_stable_for_a_tree_and_changes_with_its_numbering_or_attributes() {
        let (bottom, top) = layers();
        let merged = Tree::build(&[&bottom, &top], View::Merged);
        // Built again from the same TOCs: the same numbering, the same digest.
        let (bottom_again, top_again) = layers();
        assert_eq!(
            merged.layout(),
            Tree::build(&[&bottom_again, &top_again], View::Merged).layout()
        );
        // Another view, or one file one byte longer: another numbering or other attributes.
        assert_ne!(
            merged.layout(),
            Tree::build(&[&bottom, &top], View::Layer(1)).layout()
        );
        let longer = index(&[
            dir("etc/"),
            file("etc/.wh.a", b""),
            file("etc/b", b"new b!"),
        ]);
        let shorter = index(&[dir("etc/"), file("etc/.wh.a", b""), file("etc/b", b"new b")]);
        assert_ne!(
            Tree::build(&[&bottom, &longer], View::Merged).layout(),
            Tree::build(&[&bottom, &shorter], View::Merged).layout()
        );
        // The same entries in another order number the inodes differently.
        let swapped = index(&[dir("etc/"), file("etc/b", b"new b"), file("etc/.wh.a", b"")]);
        assert_ne!(
            Tree::build(&[&bottom, &swapped], View::Layer(1)).layout(),
            Tree::build(&[&bottom, &shorter], View::Layer(1)).layout()
        );
    }

    /// A bottom layer, and a top layer that whites out, makes a directory opaque, replaces
    /// a file and removes one name of a hard-linked pair.
    fn layers() -> (LayerIndex, LayerIndex) {
        let bottom = index(&[
            dir("etc/"),
            file("etc/a", b"a"),
            file("etc/b", b"old b"),
            dir("keep/"),
            file("keep/x", b"x"),
            dir("opq/"),
            file("opq/old", b"old"),
            file("f", b"shared data"),
            hard_link("g", "f"),
        ]);
        let top = index(&[
            dir("etc/"),
            file("etc/.wh.a", b""),
            file("etc/b", b"new b"),
            dir("opq/"),
            file("opq/.wh..wh..opq", b""),
            file("opq/new", b"new"),
            file(".wh.g", b""),
        ]);
        (bottom, top)
    }

    #[test]
    fn the_merged_view_applies_whiteouts_opaque_directories_and_replacements() {
        let (bottom, top) = layers();
        let tree = Tree::build(&[&bottom, &top], View::Merged);
        assert!(at(&tree, "etc/a").is_none(), "whited out");
        assert_eq!(names(&tree, "etc"), ["b"], "no whiteout file is shown");
        assert_eq!(
            at(&tree, "etc/b").unwrap().data.unwrap().0,
            1,
            "the top layer's b"
        );
        assert_eq!(
            names(&tree, "opq"),
            ["new"],
            "the opaque directory hides the lower one"
        );
        assert_eq!(names(&tree, "keep"), ["x"], "untouched directories stay");
        let mut root = names(&tree, "");
        root.sort();
        assert_eq!(root, ["etc", "f", "keep", "opq"], "no landmark, no g");
        assert_eq!(at(&tree, "f").unwrap().nlink, 1, "g's name is gone");
        assert_eq!(tree.iter().filter(|i| i.kind == Kind::Directory).count(), 4);
    }

    #[test]
    fn hard_links_share_one_inode() {
        let (bottom, _) = layers();
        let tree = Tree::build(&[&bottom], View::Merged);
        let (f, g) = (at(&tree, "f").unwrap(), at(&tree, "g").unwrap());
        assert_eq!(f.ino, g.ino);
        assert_eq!(f.nlink, 2);
        assert_eq!(f.size, 11);
    }

    #[test]
    fn one_layer_is_shown_in_overlayfs_lower_form() {
        let (bottom, top) = layers();
        let tree = Tree::build(&[&bottom, &top], View::Layer(1));
        assert_eq!(
            at(&tree, "etc/a").unwrap().kind,
            Kind::CharDevice(0, 0),
            "a whiteout is a 0:0 character device"
        );
        assert_eq!(at(&tree, "g").unwrap().kind, Kind::CharDevice(0, 0));
        let opq = at(&tree, "opq").unwrap();
        assert_eq!(
            opq.xattrs.get(OVERLAY_OPAQUE_XATTR).map(Vec::as_slice),
            Some(&b"y"[..])
        );
        assert_eq!(
            names(&tree, "opq"),
            ["new"],
            "the marker itself is not an entry"
        );
        assert!(at(&tree, "keep").is_none(), "only this layer's entries");
    }

    #[test]
    fn paths_resolve_through_symlinks_as_the_kernel_would_and_loops_end() {
        let link = |path: &str, target: &str| {
            let mut h = Header::new(path, TarKind::Symlink);
            h.link_name = target.into();
            (h, Vec::new())
        };
        let tree = Tree::build(
            &[&index(&[
                dir("usr/"),
                dir("usr/lib/"),
                file("usr/lib/libc.so.6", b"elf"),
                link("lib", "usr/lib"),
                link("usr/lib/libc.so", "libc.so.6"),
                link("usr/lib/abs", "/usr/lib/libc.so.6"),
                link("usr/lib/up", "../lib/./libc.so.6"),
                link("loop-a", "loop-b"),
                link("loop-b", "loop-a"),
                link("usr/lib/dangling", "nothing"),
            ])],
            View::Merged,
        );
        let libc = at(&tree, "usr/lib/libc.so.6").expect("in the tree").ino;
        for path in [
            "/usr/lib/libc.so.6",
            "/lib/libc.so.6",
            "/lib/libc.so",
            "lib/abs",
            "/lib//./up",
            "/usr/../lib/libc.so.6",
        ] {
            assert_eq!(
                tree.resolve(path.as_bytes()).map(|i| i.ino),
                Some(libc),
                "{path}"
            );
        }
        assert_eq!(
            tree.resolve(b"/lib").map(|i| i.kind.clone()),
            Some(Kind::Directory)
        );
        for path in [
            "/loop-a",
            "/loop-a/x",
            "/usr/lib/dangling",
            "/usr/lib/libc.so.6/x",
            "/no",
        ] {
            assert!(tree.resolve(path.as_bytes()).is_none(), "{path}");
        }
        // `..` of the root is the root.
        assert_eq!(
            tree.resolve(b"/../../usr/lib/libc.so.6").map(|i| i.ino),
            Some(libc)
        );
    }
}
