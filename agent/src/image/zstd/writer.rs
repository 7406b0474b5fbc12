//! Writing zstd:chunked layers in the layout containers/storage writes them: the tar stream
//! in zstd frames, each regular file's data (each chunk of a large one) in frames of its own
//! that the TOC points at, headers and padding in the frames between, then the compressed
//! TOC in a skippable frame and the footer in another. Decompressed, the blob is the tar.

use std::io::{self, Read, Write};

use super::{SKIPPABLE_HEADER, TOC_TYPE_CRFS, TocPosition};
use crate::{
    image::{
        estargz::{
            Counting, LayerSummary, Toc, TocEntry, Units, Written, prefetch_list, toc_entry,
            write_chunks,
        },
        tar::{Header, Kind, TarWriter},
    },
    oci::digest::{Digest, Hasher},
};

/// A skippable frame's magic (the first of the sixteen), little-endian.
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
/// The footer's magic, after its four numbers.
const FOOTER_MAGIC: &[u8; 8] = b"GNUlInUx";

/// How zstd:chunked layers are written.
#[derive(Clone, Copy, Debug)]
pub struct ChunkedOptions {
    /// Regular files larger than this are split into chunks of this size.
    pub chunk_size: u64,
    /// zstd level, 1 to 19.
    pub level: i32,
}

impl Default for ChunkedOptions {
    /// containers/storage compresses at level 10 by default; 3 is zstd's own default and
    /// several times faster at a few percent more bytes.
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            level: 3,
        }
    }
}

type Frame<W> = zstd::stream::write::Encoder<'static, Counting<W>>;

/// Builds a zstd:chunked blob entry by entry.
pub struct ChunkedWriter<W: Write> {
    frame: Option<Frame<W>>,
    options: ChunkedOptions,
    entries: Vec<TocEntry<'static>>,
    diff: Hasher,
    uncompressed: u64,
    /// Reads (path, offset, size) that become the TOC's prefetch list.
    prefetch_reads: Vec<(String, u64, u64)>,
}

impl<W: Write> Units for ChunkedWriter<W> {
    /// Writes uncompressed tar bytes into the open frame.
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.diff.update(bytes);
        self.uncompressed += bytes.len() as u64;
        self.frame()?.write_all(bytes)
    }

    /// Closes the open frame and opens the next; returns the offset where it starts.
    fn next_unit(&mut self) -> io::Result<u64> {
        let counting = self.close_frame()?;
        let offset = counting.written;
        self.frame = Some(Frame::new(counting, self.options.level)?);
        Ok(offset)
    }
}

impl<W: Write> ChunkedWriter<W> {
    pub fn new(out: W, options: ChunkedOptions) -> io::Result<Self> {
        let counting = Counting {
            inner: out,
            written: 0,
            hash: Hasher::new(),
        };
        let options = ChunkedOptions {
            chunk_size: options.chunk_size.max(1),
            level: options.level.clamp(1, 19),
        };
        Ok(Self {
            frame: Some(Frame::new(counting, options.level)?),
            options,
            entries: Vec::new(),
            diff: Hasher::new(),
            uncompressed: 0,
            prefetch_reads: Vec::new(),
        })
    }

    fn frame(&mut self) -> io::Result<&mut Frame<W>> {
        self.frame
            .as_mut()
            .ok_or_else(|| io::Error::other("the writer failed earlier"))
    }

    /// Closes the open frame; returns its output and the offset where the next one starts.
    fn close_frame(&mut self) -> io::Result<Counting<W>> {
        let frame = self
            .frame
            .take()
            .ok_or_else(|| io::Error::other("the writer failed earlier"))?;
        frame.finish()
    }

    /// Appends one entry; `data` supplies exactly `header.size` bytes for regular files.
    pub fn append(&mut self, header: &Header, data: &mut dyn Read) -> io::Result<()> {
        self.put(&TarWriter::header_bytes(header))?;
        let mut entry = toc_entry(header);
        // containers/storage records the header's permission bits, without the type's.
        entry.mode &= 0o7777;
        if header.kind != Kind::Regular || header.size == 0 {
            self.entries.push(entry);
            return Ok(());
        }
        let chunk_size = self.options.chunk_size;
        let (chunks, file_digest) = write_chunks(self, header, data, chunk_size)?;
        let end = self.next_unit()?;
        self.put(&vec![0u8; TarWriter::padding(header.size)])?;
        entry.digest = file_digest.to_string().into();
        entry.end_offset = end as i64;
        let chunked = chunks.len() > 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let Written {
                offset,
                file_offset: chunk_offset,
                size,
                digest,
            } = chunk;
            if i == 0 {
                entry.offset = offset as i64;
                // A file in one chunk is described by its own digest, as containers/storage
                // writes it.
                if chunked {
                    entry.chunk_size = size as i64;
                    entry.chunk_digest = digest.to_string().into();
                }
                self.entries.push(entry.clone());
            } else {
                self.entries.push(TocEntry {
                    name: entry.name.clone(),
                    kind: "chunk".into(),
                    offset: offset as i64,
                    chunk_offset: chunk_offset as i64,
                    chunk_size: size as i64,
                    chunk_digest: digest.to_string().into(),
                    ..TocEntry::default()
                });
            }
        }
        Ok(())
    }

    /// Records reads of this layer's files, (path, offset, size) in the order a workload made
    /// them: the chunks they touch become the TOC's prefetch list (imgstream's extension,
    /// which other readers ignore).
    pub fn prefetch_reads(&mut self, reads: impl IntoIterator<Item = (String, u64, u64)>) {
        self.prefetch_reads.extend(reads);
    }

    /// Ends the tar, writes the TOC and the footer, and returns what the layer is
    /// (`toc_digest` is the compressed TOC's, the checksum annotation's value) and where its
    /// TOC is (the position annotation's value).
    pub fn finish(mut self) -> io::Result<(W, LayerSummary, TocPosition)> {
        self.put(&TarWriter::end_of_archive())?;
        let mut out = self.close_frame()?;
        let toc = Toc {
            version: 1,
            prefetch: prefetch_list(&self.entries, &self.prefetch_reads),
            entries: std::mem::take(&mut self.entries),
        };
        let json = serde_json::to_vec(&toc).map_err(io::Error::other)?;
        let compressed = zstd::bulk::compress(&json, self.options.level)?;
        let position = TocPosition {
            offset: out.written + SKIPPABLE_HEADER,
            length: compressed.len() as u64,
            uncompressed: json.len() as u64,
        };
        skippable(&mut out, &compressed)?;
        let mut footer = Vec::with_capacity(40);
        for n in [
            position.offset,
            position.length,
            position.uncompressed,
            TOC_TYPE_CRFS,
        ] {
            footer.extend_from_slice(&n.to_le_bytes());
        }
        footer.extend_from_slice(FOOTER_MAGIC);
        skippable(&mut out, &footer)?;
        let summary = LayerSummary {
            digest: out.hash.clone().finish(),
            size: out.written,
            diff_id: self.diff.clone().finish(),
            uncompressed_size: self.uncompressed,
            toc_digest: Digest::of(&compressed),
        };
        Ok((out.inner, summary, position))
    }
}

/// Writes `data` as a zstd skippable frame.
fn skippable(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::other("a skippable frame holds at most 4 GiB"))?;
    out.write_all(&SKIPPABLE_MAGIC)?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(data)
}

impl TocPosition {
    /// The value of the position annotation.
    pub fn annotation(&self) -> String {
        format!(
            "{}:{}:{}:{TOC_TYPE_CRFS}",
            self.offset, self.length, self.uncompressed
        )
    }
}
