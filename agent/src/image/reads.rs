//! Recorded reads: which bytes of which files a workload read as it started, in the order it
//! first read them. `imgstream mount --record-reads` writes them (one JSON object per line);
//! `imgstream convert --prefetch-from` turns them into the eStargz TOC's prefetch list and
//! puts the files first in the layer.

use std::{
    io::{self, BufRead, Write},
    path::Path,
};

use serde::{Deserialize, Serialize};

/// One read: `size` bytes at `offset` of the file at `path` in layer `layer` (0 = bottom).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRead {
    pub layer: usize,
    pub path: String,
    pub offset: u64,
    pub size: u64,
}

/// Lines accepted in a record file: far more than any start reads, few enough to hold.
pub const MAX_RECORDS: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReadsError {
    #[error("reading {0}")]
    Io(String, #[source] io::Error),
    #[error("{file}, line {line}: {why}")]
    Line {
        file: String,
        line: usize,
        why: String,
    },
    #[error("{0} has more than {MAX_RECORDS} records")]
    TooMany(String),
}

/// Writes `reads` to `path`, one JSON object per line.
pub fn write(path: &Path, reads: &[RecordedRead]) -> io::Result<()> {
    let mut out = io::BufWriter::new(std::fs::File::create(path)?);
    for read in reads {
        serde_json::to_writer(&mut out, read)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads a record file written by [`write`] (blank lines are skipped).
pub fn read(path: &Path) -> Result<Vec<RecordedRead>, ReadsError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| ReadsError::Io(name.clone(), e))?;
    let mut reads = Vec::new();
    for (i, line) in io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| ReadsError::Io(name.clone(), e))?;
        if line.trim().is_empty() {
            continue;
        }
        if reads.len() == MAX_RECORDS {
            return Err(ReadsError::TooMany(name));
        }
        let read = serde_json::from_str(&line).map_err(|e| ReadsError::Line {
            file: name.clone(),
            line: i + 1,
            why: e.to_string(),
        })?;
        reads.push(read);
    }
    Ok(reads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_lines() {
        let dir = std::env::temp_dir().join(format!("imgstream-reads-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("reads.jsonl");
        let reads = vec![
            RecordedRead {
                layer: 0,
                path: "usr/bin/php".into(),
                offset: 0,
                size: 4096,
            },
            RecordedRead {
                layer: 1,
                path: "etc/php.ini".into(),
                offset: 8192,
                size: 100,
            },
        ];
        write(&file, &reads).unwrap();
        assert_eq!(read(&file).unwrap(), reads);

        std::fs::write(
            &file,
            "{\"layer\":0,\"path\":\"a\",\"offset\":0,\"size\":1}\n\nnot json\n",
        )
        .unwrap();
        let err = read(&file).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        std::fs::write(
            &file,
            "{\"layer\":-1,\"path\":\"a\",\"offset\":0,\"size\":1}\n",
        )
        .unwrap();
        assert!(read(&file).is_err());
        assert!(matches!(
            read(&dir.join("missing")),
            Err(ReadsError::Io(..))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
