//! The passthrough ledger: each inode's open counts and backing id, kept in a file the agent
//! maps shared, so that they outlive the agent.
//!
//! The kernel holds every inode of a FUSE mount in one io mode, and an open answered in the
//! other fails with EIO. A file held open in passthrough mode (a running program's binary, a
//! library every process maps) must therefore be answered in passthrough mode, on the same
//! backing id, by whichever agent serves the connection next, and nothing in the kernel can
//! be asked which mode an inode is in. The agent writes each change to this mapping before it
//! answers the kernel (an open) or right after (a release): plain stores into a shared page,
//! which the kernel keeps whatever happens to the process. A killed agent's successor, handed
//! the connection by the keeper, reads the counts here and goes on from them.
//!
//! The file: a header of four words (magic, the connection's device number, the number of
//! inode slots, 1 once INIT enabled passthrough on the connection), then one word per inode
//! number: 0 for an inode nothing holds, else bit 63
//! set, the backing id in bits 40-62, passthrough opens in bits 20-39 and cached opens in bits
//! 0-19 (counts beyond 2^20 - 1 are recorded as that).

use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

const MAGIC: u64 = u64::from_le_bytes(*b"imgspt01");
const HEADER: usize = 4;
/// The header word that says whether INIT enabled passthrough.
const NEGOTIATED: usize = 3;
const PRESENT: u64 = 1 << 63;
const COUNT_MAX: u32 = (1 << 20) - 1;
/// The largest backing id a line holds: a larger one is not used for passthrough.
pub(crate) const ID_MAX: u32 = (1 << 23) - 1;

/// One inode's line in the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Line {
    pub cached: u32,
    /// The backing id and its passthrough opens (0: registered, idle).
    pub backing: Option<(u32, u32)>,
}

impl Line {
    fn encode(self) -> u64 {
        if self.cached == 0 && self.backing.is_none() {
            return 0;
        }
        let (id, n) = self.backing.unwrap_or((0, 0));
        PRESENT
            | u64::from(id.min(ID_MAX)) << 40
            | u64::from(n.min(COUNT_MAX)) << 20
            | u64::from(self.cached.min(COUNT_MAX))
    }

    fn decode(word: u64) -> Option<Self> {
        if word & PRESENT == 0 {
            return None;
        }
        let field = |shift: u32, max: u32| ((word >> shift) & u64::from(max)) as u32;
        let id = field(40, ID_MAX);
        Some(Self {
            cached: field(0, COUNT_MAX),
            backing: (id > 0).then(|| (id, field(20, COUNT_MAX))),
        })
    }
}

/// A ledger file, mapped.
pub(crate) struct Ledger {
    words: NonNull<AtomicU64>,
    len: usize,
    path: PathBuf,
    _file: File,
}

// SAFETY: the mapping is only ever accessed through atomics, and lives as long as the value.
unsafe impl Send for Ledger {}
// SAFETY: as above.
unsafe impl Sync for Ledger {}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field("inodes", &(self.len - HEADER))
            .finish()
    }
}

impl Ledger {
    /// A new, empty ledger at `path` (replacing what was there) for the FUSE connection
    /// `connection` (its device number), with a slot for each inode number below `inodes`.
    pub(crate) fn create(path: &Path, connection: u64, inodes: u64) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        let len = Self::len_for(inodes)?;
        file.set_len((len * 8) as u64)?;
        let this = Self::map(file, len, path)?;
        this.word(1).store(connection, Ordering::Relaxed);
        this.word(2).store(inodes, Ordering::Relaxed);
        // Last: a ledger cut short by a crash while it was made has no magic.
        this.word(0).store(MAGIC, Ordering::Release);
        Ok(this)
    }

    /// The ledger at `path`, if it is one kept for `connection` with `inodes` slots; `None`
    /// when the file is something else (an older agent's table, another connection's).
    pub(crate) fn open(path: &Path, connection: u64, inodes: u64) -> io::Result<Option<Self>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = Self::len_for(inodes)?;
        if file.metadata()?.len() != (len * 8) as u64 {
            return Ok(None);
        }
        let this = Self::map(file, len, path)?;
        let header = [0, 1, 2].map(|i| this.word(i).load(Ordering::Acquire));
        Ok((header == [MAGIC, connection, inodes]).then_some(this))
    }

    fn len_for(inodes: u64) -> io::Result<usize> {
        usize::try_from(inodes)
            .ok()
            .and_then(|n| n.checked_add(HEADER))
            .filter(|n| n.checked_mul(8).is_some())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many inodes"))
    }

    fn map(file: File, len: usize, path: &Path) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of `len * 8` bytes of an open file that is that
        // long; unmapped in `drop`, and only ever accessed through atomics.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let words = NonNull::new(at.cast::<AtomicU64>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            words,
            len,
            path: path.to_path_buf(),
            _file: file,
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len, "a ledger word within the mapping");
        // SAFETY: `i` is within the mapping, which is page-aligned (so 8-byte aligned) and
        // lives as long as `self`.
        unsafe { &*self.words.as_ptr().add(i) }
    }

    /// Records `line` as inode `ino`'s (`None`: nothing holds it). An inode beyond the
    /// ledger's slots is not recorded.
    pub(crate) fn record(&self, ino: u64, line: Option<Line>) {
        let Some(i) = usize::try_from(ino)
            .ok()
            .and_then(|i| i.checked_add(HEADER))
            .filter(|i| *i < self.len)
        else {
            return;
        };
        self.word(i)
            .store(line.map_or(0, Line::encode), Ordering::Relaxed);
    }

    /// Records whether INIT enabled passthrough on the connection (a successor must not ask
    /// for backing files on a connection that never negotiated them).
    pub(crate) fn set_negotiated(&self, on: bool) {
        self.word(NEGOTIATED)
            .store(u64::from(on), Ordering::Relaxed);
    }

    pub(crate) fn negotiated(&self) -> bool {
        self.word(NEGOTIATED).load(Ordering::Relaxed) == 1
    }

    /// Every inode with a line, in inode order.
    pub(crate) fn lines(&self) -> impl Iterator<Item = (u64, Line)> + '_ {
        (HEADER..self.len).filter_map(|i| {
            let line = Line::decode(self.word(i).load(Ordering::Relaxed))?;
            Some(((i - HEADER) as u64, line))
        })
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this length; nothing borrows it past here.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_outlive_the_mapping() {
        let (dir, _) = crate::testing::scratch_cache("passthrough-ledger");
        let path = dir.join("mnt.passthrough");
        let lines = [
            (
                1,
                Line {
                    cached: 2,
                    backing: None,
                },
            ),
            (
                5,
                Line {
                    cached: 0,
                    backing: Some((7, 3)),
                },
            ),
            (
                6,
                Line {
                    cached: 0,
                    backing: Some((ID_MAX, 0)),
                },
            ),
            (
                9,
                Line {
                    cached: COUNT_MAX,
                    backing: Some((1, COUNT_MAX)),
                },
            ),
        ];
        {
            let ledger = Ledger::create(&path, 42, 10).expect("created");
            for (ino, line) in lines {
                ledger.record(ino, Some(line));
            }
            ledger.record(
                3,
                Some(Line {
                    cached: 1,
                    backing: None,
                }),
            );
            ledger.record(3, None);
            ledger.record(
                10,
                Some(Line {
                    cached: 1,
                    backing: None,
                }),
            );
            ledger.record(
                u64::MAX,
                Some(Line {
                    cached: 1,
                    backing: None,
                }),
            );
        }
        let again = Ledger::open(&path, 42, 10)
            .expect("it opens")
            .expect("the same connection's");
        assert!(!again.negotiated(), "not until INIT said so");
        again.set_negotiated(true);
        assert!(again.negotiated());
        assert_eq!(again.lines().collect::<Vec<_>>(), lines);
        assert!(
            Ledger::open(&path, 43, 10).expect("it opens").is_none(),
            "another connection"
        );
        assert!(
            Ledger::open(&path, 42, 11).expect("it opens").is_none(),
            "another tree"
        );
        drop(again);
        let fresh = Ledger::create(&path, 42, 10).expect("made again");
        assert_eq!(fresh.lines().count(), 0, "a new connection's starts empty");
        std::fs::write(&path, "7 3 1 0\n").expect("an older agent's table");
        assert!(Ledger::open(&path, 42, 10).expect("it opens").is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn counts_beyond_the_fields_are_recorded_at_their_largest() {
        let line = Line {
            cached: u32::MAX,
            backing: Some((u32::MAX, u32::MAX)),
        };
        assert_eq!(
            Line::decode(line.encode()),
            Some(Line {
                cached: COUNT_MAX,
                backing: Some((ID_MAX, COUNT_MAX)),
            })
        );
        assert_eq!(Line::default().encode(), 0);
    }
}
