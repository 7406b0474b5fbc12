//! eStargz: gzip tar layers in which every file (or chunk of a large file) is its own gzip
//! member and a table of contents at the end says where each one is, so that single files can
//! be fetched with range requests and verified on their own (stargz-snapshotter's
//! `docs/estargz.md`).
//!
//! This module owns the format: footer, TOC, validation ([`LayerIndex`]), decoding and checking
//! one chunk, and writing layers ([`EstargzWriter`]). It does no I/O of its own; callers hand
//! it byte ranges they fetched.

mod index;
mod toc;
mod writer;

use std::io::Read;

use flate2::read::GzDecoder;

pub use index::{
    Chunk, LayerIndex, MAX_ENTRIES, MAX_PATH_DEPTH, MAX_PATH_LEN, Node, NodeKind, Unit, normalize,
};
pub use toc::{
    FOOTER_SIZE, MAX_CHUNK, MAX_TOC_COMPRESSED, MAX_TOC_JSON, NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK, PrefetchChunk, TOC_DIGEST_ANNOTATION, TOC_NAME, Toc, TocEntry,
    UNCOMPRESSED_SIZE_ANNOTATION, footer_bytes, parse_footer,
};
pub(crate) use writer::{Counting, Units, Written, prefetch_list, toc_entry, write_chunks};
pub use writer::{EstargzWriter, LayerSummary, WriterOptions};

use crate::{
    image::tar::{Kind, TarReader},
    oci::digest::Digest,
};

/// Errors reading an eStargz layer.
#[derive(Debug, thiserror::Error)]
pub enum EstargzError {
    /// The blob is not eStargz (an ordinary gzip layer, say); it must be read whole.
    #[error("not an eStargz layer: {0}")]
    NotEstargz(&'static str),
    /// The TOC member could not be decompressed or is not a tar entry named stargz.index.json.
    #[error("the TOC member is malformed: {0}")]
    BadTocMember(String),
    /// The TOC does not hash to the digest the manifest gives for it.
    #[error("TOC digest mismatch: the manifest says {expected}, the layer's TOC is {actual}")]
    TocDigest { expected: Digest, actual: Digest },
    /// The TOC JSON does not parse or breaks the format's rules.
    #[error("the TOC is invalid: {0}")]
    BadToc(String),
    /// One TOC entry breaks the format's rules.
    #[error("TOC entry {index} ({name:?}): {why}")]
    BadEntry {
        index: usize,
        name: String,
        why: String,
    },
    /// A chunk's bytes do not decompress to its size.
    #[error("chunk at blob offset {offset} does not decompress: {why}")]
    BadChunk { offset: u64, why: String },
    /// A chunk's bytes do not hash to its chunkDigest.
    #[error("chunk at blob offset {offset}: digest mismatch (expected {expected}, got {actual})")]
    ChunkDigest {
        offset: u64,
        expected: Digest,
        actual: Digest,
    },
}

impl EstargzError {
    /// Whether fetching the same bytes again might succeed (the data was damaged in transit,
    /// not wrong at its source as far as we can tell).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::BadChunk { .. } | Self::ChunkDigest { .. })
    }
}

/// Decodes the TOC member (the bytes from the footer's TOC offset to the footer) and checks
/// its digest against `expected`, when given. Returns the validated index and the TOC digest.
pub fn read_toc(
    member: &[u8],
    toc_offset: u64,
    blob_size: u64,
    expected: Option<&Digest>,
) -> Result<(LayerIndex, Digest), EstargzError> {
    if member.len() as u64 > MAX_TOC_COMPRESSED {
        return Err(EstargzError::BadTocMember(format!(
            "{} compressed bytes exceed the limit",
            member.len()
        )));
    }
    let bad = |why: String| EstargzError::BadTocMember(why);
    let mut tar = TarReader::new(GzDecoder::new(member));
    let header = tar
        .next_header()
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("empty".into()))?;
    if header.name != TOC_NAME || header.kind != Kind::Regular {
        return Err(bad(format!(
            "first entry is {:?}, not {TOC_NAME}",
            header.name
        )));
    }
    if header.size > MAX_TOC_JSON {
        return Err(bad(format!(
            "TOC of {} bytes exceeds the {MAX_TOC_JSON}-byte limit",
            header.size
        )));
    }
    let mut json = Vec::with_capacity(header.size.min(1 << 20) as usize);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tar.read_data(&mut buf).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            break;
        }
        json.extend_from_slice(&buf[..n]);
    }
    let actual = Digest::of(&json);
    if let Some(expected) = expected
        && *expected != actual
    {
        return Err(EstargzError::TocDigest {
            expected: *expected,
            actual,
        });
    }
    // The parsed entries borrow their strings from the JSON, which lives until the index is
    // built from them (before, the entries held copies and the JSON was freed first: the
    // same peak, a third of the parse's time spent allocating and freeing them).
    let toc: Toc =
        serde_json::from_slice(&json).map_err(|e| EstargzError::BadToc(e.to_string()))?;
    Ok((LayerIndex::from_toc(toc, toc_offset, blob_size)?, actual))
}

/// Decodes what a chunk's blob range holds, from its bytes (`chunk.blob_offset` onwards; at
/// least up to `chunk.blob_end`), and checks its digest: for eStargz the chunk's gzip
/// member, for zstd:chunked its zstd frames, for a plain gzip layer the span the chunk is
/// part of. Corrupt data is never
/// returned.
pub fn decode_chunk(member: &[u8], chunk: &Chunk) -> Result<Vec<u8>, EstargzError> {
    decode_unit(member, chunk, crate::image::gzip::SpanWindow::Own)
}

/// [`decode_chunk`], told where a span's window comes from (fetched from its place, when
/// its checkpoint keeps it apart, or the span before it).
pub fn decode_unit(
    member: &[u8],
    chunk: &Chunk,
    window: crate::image::gzip::SpanWindow<'_>,
) -> Result<Vec<u8>, EstargzError> {
    let bad = |why: String| EstargzError::BadChunk {
        offset: chunk.blob_offset,
        why,
    };
    if let Unit::Span { start, len, .. } = &chunk.unit {
        return crate::image::gzip::inflate_span(start, window, *len, &chunk.digest, member)
            .map_err(|err| bad(err.to_string()));
    }
    let data = match chunk.unit {
        Unit::Frame => {
            crate::image::zstd::decode_frames(member, chunk.size).map_err(|e| bad(e.to_string()))?
        }
        _ => {
            let mut data = Vec::with_capacity(chunk.size as usize);
            GzDecoder::new(member)
                .take(chunk.size)
                .read_to_end(&mut data)
                .map_err(|e| bad(e.to_string()))?;
            data
        }
    };
    let read = data.len();
    if read as u64 != chunk.size {
        return Err(bad(format!("{read} of {} bytes", chunk.size)));
    }
    let actual = Digest::of(&data);
    if actual != chunk.digest {
        return Err(EstargzError::ChunkDigest {
            offset: chunk.blob_offset,
            expected: chunk.digest,
            actual,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests;
