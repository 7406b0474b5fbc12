//! A directory tree as text, one line per path: type, mode, owner, size, mtime, symlink
//! target, device numbers, xattrs and the sha256 of each file's content, plus one record per
//! group of hard links. Two trees are the same when their descriptions are; the host tests
//! compare FUSE mounts with it, and the guest compares its virtio-fs mount against the one
//! the host wrote from a GNU tar extraction.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io::{self, Read},
    os::unix::{ffi::OsStrExt, fs::FileTypeExt, fs::MetadataExt},
    path::Path,
};

use sha2::{Digest as _, Sha256};

/// Path (relative, no leading `./`) -> its description.
pub type Description = BTreeMap<String, String>;

/// Describes every path under `root` (not `root` itself).
pub fn describe(root: &Path) -> io::Result<Description> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let rel = path
                .strip_prefix(root)
                .map_err(io::Error::other)?
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path)?;
            let ft = meta.file_type();
            let what = if ft.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("symlink -> {}", std::fs::read_link(&path)?.display())
            } else if ft.is_file() {
                inodes.entry(meta.ino()).or_default().push(rel.clone());
                format!("file sha256:{}", sha256_file(&path)?)
            } else if ft.is_char_device() {
                format!("char {}:{}", major(meta.rdev()), minor(meta.rdev()))
            } else if ft.is_block_device() {
                format!("block {}:{}", major(meta.rdev()), minor(meta.rdev()))
            } else if ft.is_fifo() {
                "fifo".to_string()
            } else {
                "other".to_string()
            };
            let size = if ft.is_dir() { 0 } else { meta.size() };
            let line = format!(
                "{what} mode={:o} owner={}:{} size={size} mtime={} xattrs={:?}",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                meta.mtime(),
                xattrs(&path)?
            );
            out.insert(rel, line);
        }
    }
    // Hard links: the names sharing an inode, as one record.
    for mut names in inodes.into_values().filter(|n| n.len() > 1) {
        names.sort();
        out.insert(format!("hardlinks:{}", names[0]), names.join(" = "));
    }
    Ok(out)
}

fn major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}

fn minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}

fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Every extended attribute of `path` (not following symlinks), name -> value.
pub fn xattrs(path: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: a NUL-terminated path and a buffer of the length passed, both live for the call.
    let len = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if len < 0 {
        // Filesystems without xattrs (and special files on some) have none to list; a
        // listing that should have worked shows as missing entries against the expectation.
        return Ok(out);
    }
    names.truncate(len as usize);
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).map_err(io::Error::other)?;
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len >= 0 {
            value.truncate(len as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), value);
        }
    }
    Ok(out)
}

/// A description as text: `path<TAB>description` lines.
pub fn to_text(description: &Description) -> String {
    description
        .iter()
        .map(|(path, line)| format!("{path}\t{line}\n"))
        .collect()
}

/// Reads what [`to_text`] wrote.
pub fn from_text(text: &str) -> Result<Description, String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split_once('\t')
                .map(|(p, d)| (p.to_string(), d.to_string()))
                .ok_or_else(|| format!("malformed tree line {l:?}"))
        })
        .collect()
}

/// What differs, one line each: paths missing, paths extra, paths described differently.
pub fn differences(got: &Description, want: &Description) -> Vec<String> {
    let mut out = Vec::new();
    for (path, line) in want {
        match got.get(path) {
            None => out.push(format!("missing {path}: {line}")),
            Some(other) if other != line => {
                out.push(format!("differs {path}: want {line}, got {other}"))
            }
            Some(_) => {}
        }
    }
    for (path, line) in got {
        if !want.contains_key(path) {
            out.push(format!("extra {path}: {line}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_content_mode_or_link_shows() {
        let dir = std::env::temp_dir().join(format!("imgstream-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("d")).unwrap();
        std::fs::write(dir.join("d/f"), b"one").unwrap();
        std::fs::hard_link(dir.join("d/f"), dir.join("g")).unwrap();
        std::os::unix::fs::symlink("d/f", dir.join("l")).unwrap();
        let before = describe(&dir).unwrap();
        assert_eq!(from_text(&to_text(&before)).unwrap(), before);
        assert!(differences(&before, &before).is_empty());
        assert_eq!(before["hardlinks:d/f"], "d/f = g");
        assert!(before["d/f"].starts_with(
            "file sha256:7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
        ));

        std::fs::write(dir.join("d/f"), b"two").unwrap();
        std::fs::remove_file(dir.join("l")).unwrap();
        std::os::unix::fs::symlink("d", dir.join("l")).unwrap();
        let after = describe(&dir).unwrap();
        let diff = differences(&after, &before);
        assert_eq!(diff.len(), 3, "{diff:?}"); // d/f, g (same inode), l
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
