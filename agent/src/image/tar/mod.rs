//! Tar headers: a streaming reader for untrusted layer tarballs and a writer for the layers
//! imgstream builds.
//!
//! The reader understands ustar (with the `prefix` field), GNU long names and link names
//! (`L`, `K`), PAX extended headers (`x`; global `g` ones are skipped) including
//! `SCHILY.xattr.*`, base-256 numbers, and sparse files as GNU tar writes them with
//! `--sparse` (the old GNU `S` entries, and PAX formats 0.0, 0.1 and 1.0, its default with
//! `--format=posix`): a sparse file reads as the whole file, its holes as zeros, under its
//! real name and size, as Go's archive/tar (containerd's unpacking) and GNU tar extract it.
//! Everything a header claims is bounded: metadata records (long names, PAX) may not exceed
//! [`MAX_META`], a sparse map [`MAX_STRETCHES`] stretches, the holes of a stream's sparse
//! files [`MAX_HOLES`] bytes, checksums are verified, and a truncated archive is an error,
//! never a hang or an allocation of the claimed size.

mod reader;
#[cfg(test)]
mod tests;
mod writer;

use std::{collections::BTreeMap, io};

pub use reader::TarReader;
pub use writer::{TarWriter, write_entry};

/// Most bytes of GNU long-name and PAX records one entry may carry, all of them together.
pub const MAX_META: u64 = 1 << 20;
/// Most stretches of data one sparse file's map may list.
pub const MAX_STRETCHES: usize = 1 << 18;
/// Most bytes of holes the sparse files of one stream may claim, all of them together: a
/// hole costs its stream nothing, but every reader of the expanded file (a rewrite into the
/// cache, a conversion) pays for its zeros.
pub const MAX_HOLES: u64 = 4 << 30;
/// A tar block: every header and every data run is padded to a whole number of them.
const BLOCK: usize = 512;

/// Errors reading a tar stream.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading the tar stream")]
    Io(#[from] io::Error),
    #[error("tar header at byte {offset} has a bad checksum")]
    Checksum { offset: u64 },
    #[error("tar header at byte {offset}: field `{field}` is not a number")]
    Number { offset: u64, field: &'static str },
    #[error("tar stream ends inside an entry (at byte {offset})")]
    Truncated { offset: u64 },
    #[error(
        "tar metadata record of {size} bytes at byte {offset} exceeds the {MAX_META}-byte limit"
    )]
    MetaTooLarge { offset: u64, size: u64 },
    #[error("malformed PAX record at byte {offset}")]
    Pax { offset: u64 },
    #[error("tar entry type {kind:?} at byte {offset} is not supported")]
    UnsupportedType { offset: u64, kind: char },
    #[error("tar entry at byte {offset} has no name")]
    EmptyName { offset: u64 },
    #[error("tar entry at byte {offset} claims {size} bytes, more than a stream can hold")]
    SizeOverflow { offset: u64, size: u64 },
    #[error(
        "tar entry at byte {offset}: its {what} is not UTF-8, and imgstream's paths are (the file would show under another name)"
    )]
    NotUtf8 { offset: u64, what: &'static str },
    #[error("sparse file at byte {offset}: {why}")]
    Sparse { offset: u64, why: &'static str },
    #[error(
        "sparse files claim {holes} bytes of holes by byte {offset} of the tar stream, more than the {MAX_HOLES} bytes imgstream fills in"
    )]
    TooManyHoles { offset: u64, holes: u64 },
}

/// The bytes `size` bytes of data take in a stream: rounded up to whole blocks. `None` past
/// what a `u64` holds (only a hostile size field gets there).
fn padded(size: u64) -> Option<u64> {
    size.checked_next_multiple_of(BLOCK as u64)
}

/// What a tar entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Regular,
    HardLink,
    Symlink,
    CharDevice,
    BlockDevice,
    Directory,
    Fifo,
}

impl Kind {
    /// The type flag a header of this kind is written with.
    pub(crate) fn flag(self) -> u8 {
        match self {
            Kind::Regular => b'0',
            Kind::HardLink => b'1',
            Kind::Symlink => b'2',
            Kind::CharDevice => b'3',
            Kind::BlockDevice => b'4',
            Kind::Directory => b'5',
            Kind::Fifo => b'6',
        }
    }

    /// The kind written as `flag` (by [`Kind::flag`]).
    pub(crate) fn from_flag(flag: u8) -> Option<Kind> {
        [
            Kind::Regular,
            Kind::HardLink,
            Kind::Symlink,
            Kind::CharDevice,
            Kind::BlockDevice,
            Kind::Directory,
            Kind::Fifo,
        ]
        .into_iter()
        .find(|k| k.flag() == flag)
    }
}

/// One entry's metadata, with long names and PAX overrides applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub kind: Kind,
    pub link_name: String,
    /// Permission bits including setuid, setgid and sticky (no file type bits).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub uname: String,
    pub gname: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Header {
    /// An empty header of `kind` named `name`.
    pub fn new(name: &str, kind: Kind) -> Self {
        Self {
            name: name.to_string(),
            kind,
            link_name: String::new(),
            mode: if kind == Kind::Directory {
                0o755
            } else {
                0o644
            },
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            uname: String::new(),
            gname: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
        }
    }
}
