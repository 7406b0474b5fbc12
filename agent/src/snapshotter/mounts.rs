//! What containerd mounts for a snapshot: overlayfs over the parents' layer directories (an
//! active snapshot's own directory as the upper layer), or a bind mount where overlayfs is
//! not needed; and how much a snapshot's directory holds. Pure path computation: no
//! metadata, no I/O but the usage walk.

use std::path::{Path, PathBuf};

use super::proto::Mount;

/// The mounts of a snapshot whose directory is `dir` and whose parents' layer directories
/// are `lowers` (nearest first): writable when `active`, read-only otherwise.
pub(super) fn mounts(active: bool, dir: &Path, lowers: &[PathBuf]) -> Vec<Mount> {
    let joined = |dirs: &[PathBuf]| {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    let bind = |source: &Path, mode: &str| Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![mode.into(), "rbind".into()],
    };
    let overlay = |options: Vec<String>| Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    };
    if active {
        if lowers.is_empty() {
            vec![bind(&dir.join("fs"), "rw")]
        } else {
            vec![overlay(vec![
                format!("workdir={}", dir.join("work").display()),
                format!("upperdir={}", dir.join("fs").display()),
                format!("lowerdir={}", joined(lowers)),
            ])]
        }
    } else {
        match lowers {
            [] => vec![bind(&dir.join("fs"), "ro")],
            [only] => vec![bind(only, "ro")],
            _ => vec![overlay(vec![format!("lowerdir={}", joined(lowers))])],
        }
    }
}

/// Bytes (in allocated blocks) and inodes under `dir`, not crossing into other filesystems.
pub(super) fn disk_usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let (mut size, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            inodes += 1;
            size += (meta.blocks() * 512) as i64;
            if meta.is_dir() && meta.dev() == root.dev() {
                stack.push(entry.path());
            }
        }
    }
    (size, inodes)
}
