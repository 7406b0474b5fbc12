//! zstd layers (`application/vnd.oci.image.layer.v1.tar+zstd`). A plain one is a zstd
//! stream of the tar and is read whole. A zstd:chunked one, as containers/storage writes it
//! (podman and buildah `--compression-format zstd:chunked`), is also an ordinary zstd stream
//! of the tar, but every file's data starts a zstd frame of its own (large files are cut into
//! chunks, a frame each), and a table of contents in the CRFS JSON form eStargz uses follows
//! the tar in a skippable frame, which decoders pass over. Two annotations on the layer
//! descriptor say where the TOC is (`offset:length:uncompressed length:type`) and what the
//! compressed TOC's digest is, so the image manifest vouches for the TOC and the TOC's
//! digests for every chunk. The footer the writer appends repeats the position; like
//! containers/storage's own reader, this one needs only the annotations.

mod writer;

use std::io::{self, BufRead};

use super::estargz::{
    EstargzError, LayerIndex, MAX_CHUNK, MAX_TOC_COMPRESSED, MAX_TOC_JSON, Toc, Unit,
};
pub use writer::{ChunkedOptions, ChunkedWriter};

use crate::oci::{digest::Digest, manifest::Descriptor};

/// Annotations holding the compressed TOC's digest: containers/storage's current key, and
/// the one podman 4 and buildah 1.28 write.
pub const TOC_CHECKSUM_ANNOTATIONS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];
/// Annotations holding the TOC's position, `offset:length:uncompressed length:type`.
pub const TOC_POSITION_ANNOTATIONS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];
/// The one TOC type there is: CRFS JSON.
const TOC_TYPE_CRFS: u64 = 1;
/// A zstd skippable frame's header: magic and length.
pub const SKIPPABLE_HEADER: u64 = 8;
/// Largest window (as a power of two) a frame of a layer read whole may ask the streaming
/// decoder for: libzstd's own default limit, 128 MiB. Chunks and TOCs are decoded in one
/// pass into a buffer of the size the TOC gives them, which needs no window at all.
const MAX_WINDOW_LOG: u32 = 27;

/// Where a zstd:chunked layer's TOC is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TocPosition {
    /// Where the compressed TOC starts (after its skippable frame's header).
    pub offset: u64,
    /// Its compressed length.
    pub length: u64,
    /// Its length as JSON.
    pub uncompressed: u64,
}

impl TocPosition {
    /// Where the TOC's skippable frame starts: every chunk of the layer lies before it.
    pub fn frame_start(&self) -> u64 {
        self.offset.saturating_sub(SKIPPABLE_HEADER)
    }
}

/// A streaming decoder of the zstd frames in `input` (skippable frames passed over), with a
/// bounded window: for layers read whole.
pub fn decoder<'a, R: BufRead + 'a>(input: R) -> io::Result<zstd::stream::read::Decoder<'a, R>> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input)?;
    decoder.window_log_max(MAX_WINDOW_LOG)?;
    Ok(decoder)
}

/// Decodes the whole zstd frames at the start of `input` until they have produced exactly
/// `len` bytes (skippable frames give none). Frames that give more, or input that ends
/// first, are an error. Each frame is decoded in one pass straight into the output, so
/// memory is `len` whatever window a frame declares.
pub fn decode_frames(input: &[u8], len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("too long"))?;
    let mut out = vec![0u8; len];
    let mut produced = 0;
    let mut rest = input;
    let mut context = zstd::bulk::Decompressor::new()?;
    while produced < len {
        if rest.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the frames end after {produced} of {len} bytes"),
            ));
        }
        let frame = zstd::zstd_safe::find_frame_compressed_size(rest)
            .map_err(|code| io::Error::other(zstd::zstd_safe::get_error_name(code)))?;
        let (this, after) = rest.split_at(frame.min(rest.len()));
        produced += context.decompress_to_buffer(this, &mut out[produced..])?;
        rest = after;
    }
    Ok(out)
}

/// The TOC position and digest of a zstd:chunked layer, from its descriptor; `None` for a
/// layer that is not zstd:chunked (no position annotation).
pub fn toc_of(desc: &Descriptor) -> Option<Result<(TocPosition, Digest), EstargzError>> {
    let annotation = |keys: &[&str]| keys.iter().find_map(|k| desc.annotations.get(*k));
    let position = annotation(&TOC_POSITION_ANNOTATIONS)?;
    Some((|| {
        let bad = |why: String| EstargzError::BadToc(format!("zstd:chunked: {why}"));
        let fields: Vec<u64> = position
            .split(':')
            .map(|f| f.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad(format!("TOC position {position:?} is not four numbers")))?;
        let [offset, length, uncompressed, kind] = fields[..] else {
            return Err(bad(format!(
                "TOC position {position:?} is not four numbers"
            )));
        };
        if kind != TOC_TYPE_CRFS {
            return Err(bad(format!("TOC type {kind} (only 1, CRFS JSON, exists)")));
        }
        let position = TocPosition {
            offset,
            length,
            uncompressed,
        };
        if offset < SKIPPABLE_HEADER || offset.checked_add(length).is_none_or(|end| end > desc.size)
        {
            return Err(bad(format!(
                "the TOC at {offset}, {length} bytes, lies outside the {}-byte layer",
                desc.size
            )));
        }
        if length > MAX_TOC_COMPRESSED || uncompressed > MAX_TOC_JSON {
            return Err(bad(format!(
                "a TOC of {length} bytes ({uncompressed} as JSON) is over the limits ({MAX_TOC_COMPRESSED}, {MAX_TOC_JSON})"
            )));
        }
        let checksum = annotation(&TOC_CHECKSUM_ANNOTATIONS).ok_or_else(|| {
            bad("no TOC checksum annotation: the TOC could not be verified".into())
        })?;
        let digest = checksum
            .parse()
            .map_err(|_| bad(format!("TOC checksum {checksum:?} is not a digest")))?;
        Ok((position, digest))
    })())
}

/// Validates the TOC of a zstd:chunked layer of `blob_size` bytes, `compressed` being the
/// bytes at its position: they must hash to `expected`, decompress to at most the position's
/// uncompressed length, and describe files whose chunks all lie before the TOC.
pub fn read_toc(
    compressed: &[u8],
    position: &TocPosition,
    expected: &Digest,
    blob_size: u64,
) -> Result<LayerIndex, EstargzError> {
    let actual = Digest::of(compressed);
    if actual != *expected {
        return Err(EstargzError::TocDigest {
            expected: *expected,
            actual,
        });
    }
    let bad = |why: String| EstargzError::BadToc(format!("zstd:chunked: {why}"));
    if compressed.len() as u64 != position.length {
        return Err(bad(format!(
            "{} bytes of TOC, its position says {}",
            compressed.len(),
            position.length
        )));
    }
    let json = decode_frames(compressed, position.uncompressed).map_err(|e| {
        bad(format!(
            "the TOC does not decompress to the {} bytes its position gives: {e}",
            position.uncompressed
        ))
    })?;
    let mut toc: Toc = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
    for entry in &mut toc.entries {
        // A file in one chunk carries its digest only as the file's.
        if entry.kind == "reg" && entry.size > 0 && entry.chunk_digest.is_empty() {
            entry.chunk_digest = entry.digest.clone();
        }
    }
    let mut index = LayerIndex::from_toc(toc, position.frame_start(), blob_size)?;
    for node in &mut index.nodes {
        for chunk in &mut node.chunks {
            if chunk.size > MAX_CHUNK {
                return Err(bad(format!("a chunk of {} bytes", chunk.size)));
            }
            chunk.unit = Unit::Frame;
        }
    }
    // A chunk's range runs to the next chunk's start, as an eStargz member's does: the next
    // file's header frame comes with it (a few hundred bytes), so that the chunks of a
    // layer tile it and adjacent ones go in one request. Decoding stops at the chunk's size.
    Ok(index)
}

#[cfg(test)]
mod tests;
