//! A tiny read-only FUSE filesystem whose `rename` always fails with `ENXIO`: the emulated
//! overlayfs symlink-rename regression (fixed in Linux 6.6 / 6.1.55, so no kernel here has
//! it). It holds a symlink `link`, an empty regular file `file` and nothing else.

use std::{ffi::CStr, io, path::Path, sync::Arc, time::Duration};

use fuse_backend_rs::{
    abi::fuse_abi::{FsOptions, stat64},
    api::filesystem::{Context, DirEntry, Entry, FileSystem},
};

use crate::fs::fusedev::FuseMount;
pub use crate::fs::fusedev::MountError;

const ROOT: u64 = 1;
const LINK: u64 = 2;
const FILE: u64 = 3;
/// What `link` points at; it need not exist.
const LINK_TARGET: &str = "file";

/// Names in the root directory, with their inodes and `DT_*` types.
const ENTRIES: [(&[u8], u64, u32); 2] = [
    (b"link", LINK, libc::DT_LNK as u32),
    (b"file", FILE, libc::DT_REG as u32),
];

struct EnxioFs;

fn attr(inode: u64) -> io::Result<stat64> {
    // SAFETY: stat64 is plain integers; all-zero is a valid value.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    st.st_ino = inode;
    st.st_nlink = 1;
    st.st_blksize = 4096;
    (st.st_mode, st.st_size) = match inode {
        ROOT => (libc::S_IFDIR | 0o755, 0),
        LINK => (libc::S_IFLNK | 0o777, LINK_TARGET.len() as i64),
        FILE => (libc::S_IFREG | 0o644, 0),
        _ => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
    };
    if inode == ROOT {
        st.st_nlink = 2;
    }
    Ok(st)
}

impl FileSystem for EnxioFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, _capable: FsOptions) -> io::Result<FsOptions> {
        Ok(FsOptions::empty())
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let found = ENTRIES.iter().find(|(n, ..)| *n == name.to_bytes());
        match (parent, found) {
            (ROOT, Some(&(_, inode, _))) => Ok(Entry {
                inode,
                generation: 0,
                attr: attr(inode)?,
                attr_flags: 0,
                attr_timeout: Duration::from_secs(1),
                entry_timeout: Duration::from_secs(1),
            }),
            _ => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        Ok((attr(inode)?, Duration::from_secs(1)))
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        match inode {
            LINK => Ok(LINK_TARGET.as_bytes().to_vec()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        if inode != ROOT {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        for (i, &(name, ino, type_)) in ENTRIES.iter().enumerate().skip(offset as usize) {
            let entry = DirEntry {
                ino,
                offset: i as u64 + 1,
                type_,
                name,
            };
            if add_entry(entry)? == 0 {
                break;
            }
        }
        Ok(())
    }

    fn rename(
        &self,
        _ctx: &Context,
        _olddir: u64,
        _oldname: &CStr,
        _newdir: u64,
        _newname: &CStr,
        _flags: u32,
    ) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENXIO))
    }
}

/// The emulation, mounted; unmounted when dropped.
pub struct EnxioMount {
    _mount: FuseMount,
}

impl EnxioMount {
    /// Mounts the filesystem at `mountpoint` (an existing directory) and serves it.
    pub fn mount(mountpoint: &Path) -> Result<Self, MountError> {
        let mount = FuseMount::mount(
            Arc::new(EnxioFs),
            mountpoint,
            "imgstream-enxio",
            false,
            1,
            None,
        )?;
        Ok(Self { _mount: mount })
    }
}
