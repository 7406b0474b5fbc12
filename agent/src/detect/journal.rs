//! Where detections are written: stdout, or a JSON-lines file kept under a size bound by
//! rotation (`<file>.1` holds the previous part). A write that fails (a full disk, a closed
//! pipe) is counted and logged, never fatal: the agent keeps detecting, flagging pods and
//! serving images, and the next write tries again (the file is reopened).

use std::{
    fs::File,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

/// Size at which the detections file is rotated, by default.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;

/// The detections' output.
#[derive(Debug)]
pub enum Journal {
    Stdout,
    File(RotatingFile),
}

impl Journal {
    /// The file at `path` (created 0600, appended to), or stdout.
    pub fn open(path: Option<&Path>, max_bytes: u64) -> io::Result<Self> {
        Ok(match path {
            Some(path) => Self::File(RotatingFile::open(path, max_bytes)?),
            None => Self::Stdout,
        })
    }

    /// Writes one line (a newline is added).
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Self::Stdout => {
                let mut out = io::stdout().lock();
                writeln!(out, "{line}").and_then(|()| out.flush())
            }
            Self::File(file) => file.write_line(line),
        }
    }
}

/// A file that is rotated before it would pass `max_bytes`.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    /// `None` after a failed write: reopened by the next.
    file: Option<File>,
    len: u64,
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let mut file = Self {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            file: None,
            len: 0,
        };
        file.reopen()?;
        Ok(file)
    }

    fn reopen(&mut self) -> io::Result<&mut File> {
        let file = crate::private::file_options()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.len = file.metadata()?.len();
        Ok(self.file.insert(file))
    }

    /// The previous part's path.
    pub fn rotated_path(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".1");
        PathBuf::from(name)
    }

    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        let bytes = line.len() as u64 + 1;
        if self.len > 0 && self.len + bytes > self.max_bytes {
            self.file = None;
            std::fs::rename(&self.path, self.rotated_path())?;
            self.len = 0;
        }
        let file = match self.file.as_mut() {
            Some(file) => file,
            None => self.reopen()?,
        };
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        match file.write_all(&buf).and_then(|()| file.flush()) {
            Ok(()) => {
                self.len += bytes;
                Ok(())
            }
            Err(err) => {
                // What a failed append left is unknown: start from the file as it is.
                self.file = None;
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_rotated_before_it_passes_its_bound() {
        let dir = std::env::temp_dir().join(format!("imgstream-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let path = dir.join("enxio.jsonl");
        let mut file = RotatingFile::open(&path, 100).expect("the file opens");
        let line = "x".repeat(29); // 30 bytes with its newline
        for _ in 0..7 {
            file.write_line(&line).expect("the line is written");
        }
        // 3 lines (90 bytes) per part: 3 rotated away once, 3 then, 1 now; the oldest went.
        let now = std::fs::read_to_string(&path).expect("the file reads back");
        let before = std::fs::read_to_string(file.rotated_path()).expect("the file reads back");
        assert_eq!((now.lines().count(), before.lines().count()), (1, 3));
        assert!(std::fs::metadata(&path).expect("the file is there").len() <= 100);
        // A new writer continues the file where it is.
        let mut again = RotatingFile::open(&path, 100).expect("the file opens");
        again.write_line(&line).expect("the line is written");
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("the file reads back")
                .lines()
                .count(),
            2
        );
        std::fs::remove_dir_all(&dir).expect("the scratch directory goes");
    }

    #[test]
    fn a_full_disk_is_an_error_for_that_line_only() {
        // /dev/full takes the open and fails every write with ENOSPC.
        let mut file =
            RotatingFile::open(Path::new("/dev/full"), u64::MAX).expect("the file opens");
        let err = file.write_line("{}").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        // The next line tries again (and fails again, here), without a panic or a stuck state.
        assert!(file.write_line("{}").is_err());
    }
}
