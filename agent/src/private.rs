//! State only root may read. The agent runs as root and keeps private image data (chunks,
//! TOCs, manifests), containers' writable layers and its records on the node: directories
//! it creates are 0700 and files 0600, whatever the umask, so that no other user on the node
//! can read them or reach a setuid binary inside a layer through them (the pattern of
//! containerd's CVE-2021-41103).

use std::{
    fs::{DirBuilder, OpenOptions, Permissions},
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Mode of the directories the agent creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files the agent creates.
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` and any missing parents as 0700. Directories that existed keep their mode:
/// this is for the parents of paths an operator chose (`--store /tmp/x.redb` must not
/// change `/tmp`).
pub fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// [`create_dir`] for a directory that is the agent's own (its cache's and snapshotter's
/// subdirectories): made 0700 even if it existed (older versions created them 0755).
pub fn own_dir(path: &Path) -> io::Result<()> {
    create_dir(path)?;
    restrict(path, DIR_MODE)
}

/// Options that create a file as 0600.
pub fn file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Writes `bytes` to a new or truncated file that is 0600.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let mut file = file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    restrict(path, FILE_MODE)?;
    file.write_all(bytes)
}

/// Sets `path`'s permission bits to `mode`.
pub fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn directories_and_files_are_private_whatever_the_umask() {
        let dir = std::env::temp_dir().join(format!("imgstream-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for old in ["shared", "owned"] {
            std::fs::create_dir_all(dir.join(old)).unwrap();
            restrict(&dir.join(old), 0o755).unwrap();
        }
        create_dir(&dir.join("a/b")).unwrap();
        create_dir(&dir.join("shared")).unwrap();
        own_dir(&dir.join("owned")).unwrap();
        write(&dir.join("a/b/f"), b"x").unwrap();
        assert_eq!(mode(&dir.join("a")), DIR_MODE);
        assert_eq!(mode(&dir.join("a/b")), DIR_MODE);
        assert_eq!(
            mode(&dir.join("shared")),
            0o755,
            "an operator's directory is left alone"
        );
        assert_eq!(
            mode(&dir.join("owned")),
            DIR_MODE,
            "the agent's own is tightened"
        );
        assert_eq!(mode(&dir.join("a/b/f")), FILE_MODE);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
