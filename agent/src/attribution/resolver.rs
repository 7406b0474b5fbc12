//! cgroup v2 id -> path, by walking the cgroup2 hierarchy: in cgroup2fs a cgroup's id is the
//! inode number of its directory. Results are cached; a miss triggers one bounded re-walk.

use std::{
    collections::HashMap,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Errors resolving a cgroup id.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No cgroup2 filesystem is mounted.
    #[error(
        "no cgroup2 mount found in /proc/self/mountinfo (mount one: `mount -t cgroup2 none /sys/fs/cgroup`)"
    )]
    NoCgroup2Mount,
    /// Reading mountinfo failed.
    #[error("reading /proc/self/mountinfo")]
    Mountinfo(#[source] io::Error),
}

/// The deepest a walk goes; kubelet's deepest layout is 4 levels under the root.
const MAX_DEPTH: usize = 12;
/// The most directories one walk visits, so a hostile hierarchy cannot stall the agent.
const MAX_DIRS: usize = 200_000;

/// Resolves cgroup v2 ids to paths relative to the cgroup2 root ("/kubepods/...").
#[derive(Debug)]
pub struct CgroupResolver {
    root: PathBuf,
    cache: HashMap<u64, String>,
}

impl CgroupResolver {
    /// A resolver for the cgroup2 hierarchy mounted at `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            cache: HashMap::new(),
        }
    }

    /// A resolver for the cgroup2 mount found in `/proc/self/mountinfo`.
    pub fn discover() -> Result<Self, ResolveError> {
        Ok(Self::new(find_cgroup2_mount()?))
    }

    /// Where the cgroup2 hierarchy is mounted.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of cgroup `id` relative to the hierarchy root, or `None` if no such cgroup
    /// exists (any more).
    pub fn resolve(&mut self, id: u64) -> Option<String> {
        if let Some(path) = self.cache.get(&id) {
            return Some(path.clone());
        }
        self.cache = walk(&self.root);
        self.cache.get(&id).cloned()
    }

    /// The absolute directory of a cgroup path returned by [`Self::resolve`].
    pub fn dir_of(&self, cgroup_path: &str) -> PathBuf {
        self.root.join(cgroup_path.trim_start_matches('/'))
    }
}

fn walk(root: &Path) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    let mut visited = 0;
    while let Some((dir, depth)) = stack.pop() {
        visited += 1;
        if visited > MAX_DIRS {
            tracing::warn!(root = %root.display(), "cgroup walk stopped after {MAX_DIRS} directories");
            break;
        }
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
        found.insert(meta.ino(), format!("/{}", rel.display()));
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    found
}

/// The first cgroup2 mount point in `/proc/self/mountinfo` (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn find_cgroup2_mount() -> Result<PathBuf, ResolveError> {
    let info = crate::mountinfo::read().map_err(ResolveError::Mountinfo)?;
    cgroup2_mount_in(&info).ok_or(ResolveError::NoCgroup2Mount)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    crate::mountinfo::mounts(mountinfo)
        .find_map(|(mount_point, fstype)| (fstype == "cgroup2").then_some(mount_point))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_mountinfo() {
        let hybrid = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount_in("garbage\n1 2 3\n - \n"), None);
        let escaped = r"25 1 0:22 / /mnt/with\040space rw - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount_in(escaped),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn walk_maps_inode_numbers_to_relative_paths() {
        let tmp = std::env::temp_dir().join(format!("imgstream-walk-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("a/b")).unwrap();
        let ino = std::fs::metadata(tmp.join("a/b")).unwrap().ino();
        let mut resolver = CgroupResolver::new(tmp.clone());
        assert_eq!(resolver.resolve(ino).as_deref(), Some("/a/b"));
        assert_eq!(resolver.dir_of("/a/b"), tmp.join("a/b"));
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(resolver.resolve(u64::MAX), None);
    }
}
