//! Writing eStargz layers. The layout is the one stargz-snapshotter's own writer produces:
//! each entry's tar header goes into the gzip member that is open, each chunk of a regular
//! file's data starts a new member (so the TOC can point at it), the TOC entry with the
//! end-of-archive blocks gets a member of its own, and the 51-byte footer ends the blob.
//! Decompressed, the whole blob is an ordinary tar, so runtimes that do not stream still
//! unpack it.

use std::io::{self, Read, Write};

use base64::Engine as _;
use flate2::{Compression, write::GzEncoder};

use super::{
    index::normalize,
    toc::{
        NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, PrefetchChunk, TOC_NAME, Toc, TocEntry,
        footer_bytes,
    },
};
use crate::{
    image::tar::{Header, Kind, TarWriter},
    oci::digest::{Digest, Hasher},
};

/// How layers are written.
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Regular files larger than this are split into chunks of this size.
    pub chunk_size: u64,
    /// gzip level, 0 to 9.
    pub level: u32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            level: 6,
        }
    }
}

/// What a finished layer is, for its descriptor and the image config.
#[derive(Clone, Debug)]
pub struct LayerSummary {
    /// Digest and size of the compressed blob.
    pub digest: Digest,
    pub size: u64,
    /// Digest of the decompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    /// Digest of the TOC JSON (the `containerd.io/snapshot/stargz/toc.digest` annotation).
    pub toc_digest: Digest,
}

/// Counts and hashes what reaches the output.
pub(crate) struct Counting<W> {
    pub(crate) inner: W,
    pub(crate) written: u64,
    pub(crate) hash: Hasher,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A writer of compressed units (gzip members, zstd frames) that a file's data is cut into,
/// so that each chunk can be fetched and decompressed on its own.
pub(crate) trait Units {
    /// Closes the open unit and opens the next; returns the offset where it starts.
    fn next_unit(&mut self) -> io::Result<u64>;
    /// Writes uncompressed tar bytes into the open unit.
    fn put(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// One chunk of a file as written.
pub(crate) struct Written {
    /// Where its unit starts in the blob.
    pub offset: u64,
    pub file_offset: u64,
    pub size: u64,
    pub digest: Digest,
}

/// Writes the `header.size` bytes of `data` into `units`, each `chunk_size` of them starting
/// a unit of its own; returns the chunks and the digest of the whole file.
pub(crate) fn write_chunks(
    units: &mut impl Units,
    header: &Header,
    data: &mut dyn Read,
    chunk_size: u64,
) -> io::Result<(Vec<Written>, Digest)> {
    let mut file_hash = Hasher::new();
    let mut written = Vec::new();
    let mut done = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    while done < header.size {
        let this = chunk_size.max(1).min(header.size - done);
        let offset = units.next_unit()?;
        let mut chunk_hash = Hasher::new();
        let mut left = this;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = data.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} ended after {} of {} bytes",
                        header.name,
                        done + this - left,
                        header.size
                    ),
                ));
            }
            chunk_hash.update(&buf[..n]);
            file_hash.update(&buf[..n]);
            units.put(&buf[..n])?;
            left -= n as u64;
        }
        written.push(Written {
            offset,
            file_offset: done,
            size: this,
            digest: chunk_hash.finish(),
        });
        done += this;
    }
    Ok((written, file_hash.finish()))
}

/// Builds an eStargz blob entry by entry.
pub struct EstargzWriter<W: Write> {
    member: Option<GzEncoder<Counting<W>>>,
    options: WriterOptions,
    entries: Vec<TocEntry<'static>>,
    diff: Hasher,
    uncompressed: u64,
    /// Reads (path, offset, size) that become the TOC's prefetch list.
    prefetch_reads: Vec<(String, u64, u64)>,
}

impl<W: Write> Units for EstargzWriter<W> {
    /// Writes uncompressed tar bytes into the open member.
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.diff.update(bytes);
        self.uncompressed += bytes.len() as u64;
        self.member().write_all(bytes)
    }

    /// Closes the open member and opens the next; returns the offset where it starts.
    fn next_unit(&mut self) -> io::Result<u64> {
        let counting = self.member.take().expect("open member").finish()?;
        let offset = counting.written;
        self.member = Some(GzEncoder::new(
            counting,
            Compression::new(self.options.level.min(9)),
        ));
        Ok(offset)
    }
}

impl<W: Write> EstargzWriter<W> {
    pub fn new(out: W, options: WriterOptions) -> Self {
        let counting = Counting {
            inner: out,
            written: 0,
            hash: Hasher::new(),
        };
        let level = Compression::new(options.level.min(9));
        Self {
            member: Some(GzEncoder::new(counting, level)),
            options: WriterOptions {
                chunk_size: options.chunk_size.max(1),
                ..options
            },
            entries: Vec::new(),
            diff: Hasher::new(),
            uncompressed: 0,
            prefetch_reads: Vec::new(),
        }
    }

    fn member(&mut self) -> &mut GzEncoder<Counting<W>> {
        self.member
            .as_mut()
            .expect("a member is always open until finish")
    }

    /// Appends one entry; `data` supplies exactly `header.size` bytes for regular files.
    pub fn append(&mut self, header: &Header, data: &mut dyn Read) -> io::Result<()> {
        self.put(&TarWriter::header_bytes(header))?;
        let mut entry = toc_entry(header);
        if header.kind != Kind::Regular || header.size == 0 {
            self.entries.push(entry);
            return Ok(());
        }
        let chunk_size = self.options.chunk_size;
        let (written, file_digest) = write_chunks(self, header, data, chunk_size)?;
        let last = written.len().saturating_sub(1);
        let chunk_entries: Vec<(u64, u64, u64, Digest)> = written
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                // The last chunk's size is left out: "the rest of the file".
                let size = if i == last { 0 } else { w.size };
                (w.offset, w.file_offset, size, w.digest)
            })
            .collect();
        self.put(&vec![0u8; TarWriter::padding(header.size)])?;
        let chunked = chunk_entries.len() > 1;
        for (i, (offset, chunk_offset, chunk_size, digest)) in chunk_entries.into_iter().enumerate()
        {
            if i == 0 {
                entry.offset = offset as i64;
                entry.chunk_size = if chunked { chunk_size as i64 } else { 0 };
                entry.chunk_digest = digest.to_string().into();
                entry.digest = Default::default(); // set below, once the whole file is hashed
                self.entries.push(entry.clone());
            } else {
                self.entries.push(TocEntry {
                    name: entry.name.clone(),
                    kind: "chunk".into(),
                    offset: offset as i64,
                    chunk_offset: chunk_offset as i64,
                    chunk_size: chunk_size as i64,
                    chunk_digest: digest.to_string().into(),
                    ..TocEntry::default()
                });
            }
        }
        let file_digest = file_digest.to_string();
        let first = self
            .entries
            .iter_mut()
            .rev()
            .find(|e| e.kind == "reg" && e.name == entry.name);
        if let Some(first) = first {
            first.digest = file_digest.into();
        }
        Ok(())
    }

    /// Appends the landmark that tells readers where prioritised files end
    /// (`.prefetch.landmark`), or that there are none (`.no.prefetch.landmark`).
    pub fn append_landmark(&mut self, prioritised: bool) -> io::Result<()> {
        let name = if prioritised {
            PREFETCH_LANDMARK
        } else {
            NO_PREFETCH_LANDMARK
        };
        let mut header = Header::new(name, Kind::Regular);
        header.size = 1;
        self.append(&header, &mut &[0x0f_u8][..])
    }

    /// Records reads of this layer's files, (path, offset, size) in the order a workload made
    /// them: the chunks they touch become the TOC's prefetch list. Reads of paths the layer
    /// does not have as regular files are ignored.
    pub fn prefetch_reads(&mut self, reads: impl IntoIterator<Item = (String, u64, u64)>) {
        self.prefetch_reads.extend(reads);
    }

    /// Writes the TOC and the footer and returns what the layer is.
    pub fn finish(mut self) -> io::Result<(W, LayerSummary)> {
        let prefetch = prefetch_list(&self.entries, &self.prefetch_reads);
        let toc = Toc {
            version: 1,
            entries: std::mem::take(&mut self.entries),
            prefetch,
        };
        // Compact: readers parse it, nobody reads it by eye, and it is a third smaller.
        let json = serde_json::to_vec(&toc).map_err(io::Error::other)?;
        let toc_digest = Digest::of(&json);
        let toc_offset = self.next_unit()?;
        let mut header = Header::new(TOC_NAME, Kind::Regular);
        header.size = json.len() as u64;
        self.put(&TarWriter::header_bytes(&header))?;
        self.put(&json)?;
        self.put(&vec![0u8; TarWriter::padding(header.size)])?;
        self.put(&TarWriter::end_of_archive())?;
        let mut counting = self.member.take().expect("open member").finish()?;
        counting.write_all(&footer_bytes(toc_offset))?;
        let summary = LayerSummary {
            digest: counting.hash.clone().finish(),
            size: counting.written,
            diff_id: self.diff.clone().finish(),
            uncompressed_size: self.uncompressed,
            toc_digest,
        };
        Ok((counting.inner, summary))
    }
}

/// The prefetch list of a layer of `entries`: the chunks `reads` touch, first touch first.
pub(crate) fn prefetch_list(
    entries: &[TocEntry],
    reads: &[(String, u64, u64)],
) -> Vec<PrefetchChunk> {
    // Chunk starts of every regular file, by normalised path.
    let mut starts: std::collections::HashMap<String, (String, Vec<u64>)> = Default::default();
    for e in entries {
        let path = normalize(&e.name).unwrap_or_default();
        match &*e.kind {
            "reg" if e.size > 0 => {
                starts.insert(path, (e.name.to_string(), vec![0]));
            }
            "chunk" => {
                if let Some((_, s)) = starts.get_mut(&path) {
                    s.push(e.chunk_offset as u64);
                }
            }
            _ => {}
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut list = Vec::new();
    for (path, offset, size) in reads {
        let Some((name, chunks)) = normalize(path).ok().and_then(|p| starts.get(&p)) else {
            continue;
        };
        let end = offset.saturating_add((*size).max(1));
        // The chunk holding `offset`, then every chunk that starts before `end`.
        let first = chunks.partition_point(|&s| s <= *offset).saturating_sub(1);
        for &start in chunks[first..].iter().take_while(|&&s| s < end) {
            if seen.insert((name.as_str(), start)) {
                list.push(PrefetchChunk {
                    name: name.clone(),
                    chunk_offset: start,
                });
            }
        }
    }
    list
}

/// The TOC entry of a tar header, fields as the Go implementation fills them.
pub(crate) fn toc_entry(h: &Header) -> TocEntry<'static> {
    let (kind, type_bits) = match h.kind {
        Kind::Directory => ("dir", 0o040_000),
        Kind::Regular => ("reg", 0o100_000),
        Kind::Symlink => ("symlink", 0o120_000),
        Kind::HardLink => ("hardlink", 0o100_000),
        Kind::CharDevice => ("char", 0o020_000),
        Kind::BlockDevice => ("block", 0o060_000),
        Kind::Fifo => ("fifo", 0o010_000),
    };
    TocEntry {
        name: h.name.clone().into(),
        kind: kind.into(),
        size: if h.kind == Kind::Regular { h.size } else { 0 },
        modtime: if h.mtime == 0 {
            Default::default()
        } else {
            crate::time::format_rfc3339(h.mtime).into()
        },
        link_name: h.link_name.clone().into(),
        mode: i64::from(h.mode & 0o7777) | type_bits,
        uid: h.uid,
        gid: h.gid,
        user_name: h.uname.clone().into(),
        group_name: h.gname.clone().into(),
        dev_major: i64::from(h.dev_major),
        dev_minor: i64::from(h.dev_minor),
        xattrs: h
            .xattrs
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect(),
        ..TocEntry::default()
    }
}
