//! Random access into unmodified gzip layers: a span index.
//!
//! A gzip layer is one deflate stream (or several members, one after the other) that can
//! only be decompressed from its start. Reading it once, [`SpanIndex::build`] records a
//! checkpoint every `span` uncompressed bytes: where the stream goes on from there in the
//! compressed layer (to the bit), where in the uncompressed stream, and the 32 KiB of
//! uncompressed bytes before it that back-references may reach. A checkpoint sits between
//! two symbols of a deflate block and carries that block's header (its Huffman codes);
//! where none can be placed there (in a stored block), it sits at the next block boundary.
//! With these, [`SpanIndex::inflate_span`] decompresses any one span from the
//! compressed bytes between its checkpoint and the next, and checks them against the span's
//! SHA-256 before a byte is handed out. The index also lists every tar entry with the
//! offset of its data in the uncompressed stream, so a file's bytes are found in the spans
//! that cover them.
//!
//! The index is built from the layer, not from anything it claims: until a layer's whole
//! digest is checked, a span digest is as trustworthy as whoever produced the index.

mod build;
mod format;
mod inflate;
mod layer;
mod refs;
#[cfg(test)]
mod tests;

use std::ops::Range;

pub use build::{BuildOptions, Cut, read_through};
pub use format::{FormatError, MAX_DECODED, WINDOWS_TYPE};

use crate::{image::tar::Header, oci::digest::Digest};

/// Media type of an encoded span index, and `artifactType` of the artifact that publishes
/// one beside its image.
pub const SPAN_INDEX_TYPE: &str = "application/vnd.imgstream.gzip-span-index.v1+gzip";
/// Uncompressed bytes back-references may reach: deflate's window.
pub const WINDOW: usize = 32 * 1024;
/// Smallest span between checkpoints: below this the windows cost more than they save.
pub const MIN_SPAN: u64 = 64 * 1024;
/// Largest span: every read of it is decompressed in memory at once.
pub const MAX_SPAN: u64 = 64 << 20;
/// Most tar entries one indexed layer may hold (as for eStargz TOCs).
pub const MAX_ENTRIES: usize = crate::image::estargz::MAX_ENTRIES;

/// Errors building or using a span index.
#[derive(Debug, thiserror::Error)]
pub enum GzipError {
    #[error("reading the layer")]
    Io(#[source] std::io::Error),
    #[error("gzip header at byte {offset}: {reason}")]
    BadHeader { offset: u64, reason: String },
    #[error("gzip header: {0}")]
    Header(String),
    #[error("inflating: {0}")]
    Inflate(String),
    #[error("the layer ends inside a gzip member (at byte {offset})")]
    Truncated { offset: u64 },
    #[error("gzip member ending at byte {offset} fails its {what} check")]
    Trailer { offset: u64, what: &'static str },
    #[error("bytes that are not gzip after the member ending at byte {offset}")]
    TrailingGarbage { offset: u64 },
    #[error("the layer's tar stream")]
    Tar(#[source] crate::image::tar::TarError),
    #[error("the layer holds more than {MAX_ENTRIES} tar entries")]
    TooManyEntries,
    #[error(
        "the layer holds a sparse file, {0:?}: a span index gives each file's data as one run of the stream, which a sparse file's holes are not"
    )]
    SparseFile(String),
    #[error("span size {0} is outside {MIN_SPAN}..={MAX_SPAN}")]
    SpanSize(u64),
    #[error("span {index} does not exist (the index has {count})")]
    NoSpan { index: usize, count: usize },
    #[error("span {index}: {got} compressed bytes given, {want} expected")]
    SpanBytes { index: usize, got: u64, want: u64 },
    #[error(
        "the span at uncompressed byte {at} is {len} bytes long, more than the {MAX_SPAN} allowed"
    )]
    SpanTooLong { at: u64, len: u64 },
    #[error("the span at uncompressed byte {at} ends before its {len} bytes")]
    SpanShort { at: u64, len: u64 },
    #[error(
        "the span at uncompressed byte {at} does not match its digest: the layer or the index is not what was indexed"
    )]
    SpanDigest { at: u64 },
    #[error(
        "the layer read is {read} bytes with digest {actual}, not the {size} bytes of {expected} its descriptor names"
    )]
    LayerDigest {
        expected: Digest,
        size: u64,
        actual: Digest,
        read: u64,
    },
}

/// A place in the layer where inflation can resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Offset in the compressed layer of the first whole byte after the resume point.
    pub compressed: u64,
    /// How many high bits of the byte before `compressed` belong to what follows (0..=7).
    pub bits: u8,
    /// Offset in the uncompressed stream.
    pub uncompressed: u64,
    /// A gzip member header starts at `compressed` (then `bits` is 0 and `window` empty).
    pub member: bool,
    /// The (up to) [`WINDOW`] uncompressed bytes of this member before the resume point
    /// that the span refers back to: the end of them, from the first byte referred to, the
    /// others zeroed ([`refs`]).
    pub window: Window,
    /// For a checkpoint inside a compressed deflate block (between two of its symbols,
    /// rather than at a block boundary): that block's header, which inflation resumes from,
    /// followed by the stream at the checkpoint. Blocks are often 100 KiB or more of
    /// output, so without these a span could not end before the block did.
    pub head: Option<BlockHead>,
}

/// Most bits a compressed block's header takes: 3 bits of type, 14 of counts, 19 code
/// length codes of 3 bits, and at most 316 code lengths of at most 7 + 7 bits.
pub const MAX_HEAD_BITS: u16 = 3 + 14 + 19 * 3 + 316 * 14;

/// The header of a compressed deflate block: its first `bits` bits, packed from bit 0 as
/// deflate packs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockHead {
    bytes: Box<[u8]>,
    bits: u16,
}

impl BlockHead {
    /// `None` unless `bytes` holds exactly `bits` bits (3..=[`MAX_HEAD_BITS`]).
    pub fn new(bytes: Vec<u8>, bits: u16) -> Option<Self> {
        ((3..=MAX_HEAD_BITS).contains(&bits) && bytes.len() == usize::from(bits).div_ceil(8)).then(
            || Self {
                bytes: bytes.into(),
                bits,
            },
        )
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn bits(&self) -> u16 {
        self.bits
    }

    /// A deflate stream that starts with this header and goes on with the stream in
    /// `bytes` after a checkpoint inside the block: `bytes` starts with the byte holding
    /// its first bits, `bits` of them (its high ones; 0: all of it). Returns it with the
    /// number of bytes it has before `bytes[1]` (its bytes from there on are those of
    /// `bytes`).
    ///
    /// The stream after the checkpoint must keep its place within bytes: a stored block in
    /// it starts at the next byte boundary. So the header is put after as many empty
    /// blocks as align the checkpoint's bit where it was in its byte.
    fn splice(&self, bytes: &[u8], bits: u8) -> (Vec<u8>, usize) {
        let Some((&first, rest)) = bytes.split_first() else {
            return (Vec::new(), 0);
        };
        let skip = u32::from((8 - bits) % 8);
        let mut out = refs::BitWriter::with_capacity(self.bytes.len() + bytes.len() + 24);
        let misaligned = (skip + 8 - u32::from(self.bits % 8)) % 8;
        refs::empty_blocks(&mut out, misaligned);
        let whole = usize::from(self.bits / 8);
        for &byte in &self.bytes[..whole] {
            out.push(u64::from(byte), 8);
        }
        if !self.bits.is_multiple_of(8) {
            out.push(u64::from(self.bytes[whole]), u32::from(self.bits % 8));
        }
        out.push(u64::from(first >> skip), 8 - skip);
        let mut out = out.finish();
        let before = out.len();
        out.extend_from_slice(rest);
        (out, before)
    }
}

/// A checkpoint's window: held in memory, deflated (a sparse window, mostly zeros, takes a
/// few KiB this way instead of up to 32), or kept apart in the index's windows blob
/// ([`WindowsBlob`]), fetched with the span that needs it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Window {
    kept: Kept,
    len: usize,
}

#[derive(Clone, Default, PartialEq, Eq)]
enum Kept {
    #[default]
    Empty,
    Deflated(Box<[u8]>),
    /// If deflating failed (it does not, into memory): the bytes as they are.
    Raw(Box<[u8]>),
    /// Deflated, at `at` in the windows blob `blob`, `deflated` bytes long.
    Apart {
        blob: Digest,
        at: u64,
        deflated: u32,
    },
}

/// Where a window kept apart is: its blob, and its deflated bytes' range in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowPlace {
    pub blob: Digest,
    pub range: (u64, u64),
}

/// The blob an index keeps its windows in, apart from the rest of it: a mount reads the
/// index without them and fetches each window with the span that needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowsBlob {
    pub digest: Digest,
    pub size: u64,
}

impl Window {
    pub fn new(bytes: &[u8]) -> Self {
        if bytes.is_empty() {
            return Self::default();
        }
        let kept = match deflate_at(bytes, flate2::Compression::fast()) {
            Ok(deflated) => Kept::Deflated(deflated.into_boxed_slice()),
            Err(_) => Kept::Raw(bytes.into()),
        };
        Self {
            kept,
            len: bytes.len(),
        }
    }

    /// Uncompressed length.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A window of `len` bytes kept apart, deflated, at `at` in `blob`.
    pub fn apart(blob: Digest, at: u64, deflated: u32, len: usize) -> Self {
        Self {
            kept: Kept::Apart { blob, at, deflated },
            len,
        }
    }

    /// Where it is, if it is kept apart (its bytes then come from there: [`Self::bytes_from`]).
    pub fn place(&self) -> Option<WindowPlace> {
        match self.kept {
            Kept::Apart { blob, at, deflated } => Some(WindowPlace {
                blob,
                range: (at, at + u64::from(deflated)),
            }),
            _ => None,
        }
    }

    /// Bytes of memory it holds.
    pub fn held(&self) -> usize {
        match &self.kept {
            Kept::Empty | Kept::Apart { .. } => 0,
            Kept::Deflated(b) | Kept::Raw(b) => b.len(),
        }
    }

    /// Its bytes deflated at the best compression (none for an empty window).
    fn deflated_best(&self) -> Result<Vec<u8>, GzipError> {
        let bytes = self.bytes()?;
        if bytes.is_empty() {
            return Ok(bytes);
        }
        deflate_at(&bytes, flate2::Compression::best()).map_err(GzipError::Io)
    }

    /// The window's bytes, held in memory.
    pub fn bytes(&self) -> Result<Vec<u8>, GzipError> {
        match &self.kept {
            Kept::Empty => Ok(Vec::new()),
            Kept::Raw(bytes) => Ok(bytes.to_vec()),
            Kept::Deflated(deflated) => self.inflate(deflated, "held in memory"),
            Kept::Apart { .. } => Err(GzipError::Inflate(
                "a window kept apart was not fetched".into(),
            )),
        }
    }

    /// The window's bytes from `deflated`, what was fetched from its place (a window not
    /// kept apart has its own: [`Self::bytes`]).
    pub fn bytes_from(&self, deflated: &[u8]) -> Result<Vec<u8>, GzipError> {
        match &self.kept {
            Kept::Apart { deflated: n, .. } if deflated.len() == *n as usize => {
                self.inflate(deflated, "kept apart")
            }
            Kept::Apart { .. } => Err(GzipError::Inflate(
                "a window kept apart was not fetched whole".into(),
            )),
            _ => self.bytes(),
        }
    }

    fn inflate(&self, deflated: &[u8], kept: &str) -> Result<Vec<u8>, GzipError> {
        use std::io::Read as _;
        let mut out = Vec::with_capacity(self.len);
        flate2::read::DeflateDecoder::new(deflated)
            .take(self.len as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| GzipError::Inflate(format!("a window {kept}: {e}")))?;
        if out.len() != self.len {
            return Err(GzipError::Inflate(format!(
                "a window {kept} is not its length"
            )));
        }
        Ok(out)
    }
}

fn deflate_at(bytes: &[u8], level: flate2::Compression) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), level);
    encoder.write_all(bytes)?;
    encoder.finish()
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("len", &self.len)
            .field("held", &self.held())
            .finish()
    }
}

/// The uncompressed bytes from one checkpoint to the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: Checkpoint,
    /// Uncompressed length.
    pub len: u64,
    /// SHA-256 of the uncompressed bytes.
    pub digest: Digest,
}

/// A tar entry of the layer and where its data starts in the uncompressed stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub header: Header,
    pub data_offset: u64,
}

/// Checkpoints, span digests and the tar entries of one gzip layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanIndex {
    /// The digest of the layer as indexed (the whole compressed blob).
    pub layer: Digest,
    /// The layer's size as indexed.
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub spans: Vec<Span>,
    pub entries: Vec<Entry>,
    /// Where the windows are when they are kept apart (each span's checkpoint says where in
    /// it); `None`: they are held in the index.
    pub windows: Option<WindowsBlob>,
}

impl SpanIndex {
    /// The spans holding any of the uncompressed bytes `range` (empty if none do).
    pub fn spans_for(&self, range: Range<u64>) -> Range<usize> {
        if range.start >= range.end || range.start >= self.uncompressed_size {
            return 0..0;
        }
        let first = self
            .spans
            .partition_point(|s| s.start.uncompressed + s.len <= range.start);
        let end = self
            .spans
            .partition_point(|s| s.start.uncompressed < range.end);
        first..end.max(first)
    }

    /// The compressed bytes span `index` is inflated from: from the byte holding its first
    /// bits to the byte holding the next span's first bits.
    pub fn span_range(&self, index: usize) -> Result<Range<u64>, GzipError> {
        let span = self.span(index)?;
        let start = span.start.compressed - u64::from(span.start.bits > 0);
        let end = self
            .spans
            .get(index + 1)
            .map_or(self.compressed_size, |next| next.start.compressed);
        Ok(start..end)
    }

    fn span(&self, index: usize) -> Result<&Span, GzipError> {
        self.spans.get(index).ok_or(GzipError::NoSpan {
            index,
            count: self.spans.len(),
        })
    }

    /// Decompresses span `index` from `bytes`, exactly its [`Self::span_range`], and checks
    /// it against the span's digest: what comes back is what was indexed, or an error.
    pub fn inflate_span(&self, index: usize, bytes: &[u8]) -> Result<Vec<u8>, GzipError> {
        let span = self.span(index)?;
        let range = self.span_range(index)?;
        let want = range.end - range.start;
        if bytes.len() as u64 != want {
            return Err(GzipError::SpanBytes {
                index,
                got: bytes.len() as u64,
                want,
            });
        }
        inflate_span(&span.start, SpanWindow::Own, span.len, &span.digest, bytes)
    }
}

/// Where the window of a span being inflated comes from.
#[derive(Clone, Copy, Debug)]
pub enum SpanWindow<'a> {
    /// The checkpoint's own, held in memory (an error if it is kept apart).
    Own,
    /// The checkpoint's window kept apart, as fetched from its place: its deflated bytes.
    Fetched(&'a [u8]),
    /// The uncompressed bytes right before the checkpoint (the span before, just inflated):
    /// their last [`WINDOW`] bytes are the whole window. Bytes of an earlier member among
    /// them are never referred to.
    Preceding(&'a [u8]),
}

/// Decompresses the `len` bytes of a span that starts at `start` from `bytes` (its
/// compressed bytes: from the byte holding its first bits up to the next span's start) and
/// checks them against `digest`. Bytes past the span's end are ignored.
pub fn inflate_span(
    start: &Checkpoint,
    window: SpanWindow<'_>,
    len: u64,
    digest: &Digest,
    bytes: &[u8],
) -> Result<Vec<u8>, GzipError> {
    let at = start.uncompressed;
    if len > MAX_SPAN {
        return Err(GzipError::SpanTooLong { at, len });
    }
    let short = || GzipError::SpanShort { at, len };
    let mut out = vec![0u8; len as usize];
    // Inside a block, the stream inflated is the block's header spliced onto `bytes` at
    // the checkpoint; `spliced` says where that stream's bits are in `bytes`, to find the
    // member's trailer where it ends.
    let mut spliced = None;
    let stream;
    let (mut inflate, mut input) = if start.member {
        (
            inflate::RawInflate::new()?,
            skip_header(bytes).ok_or_else(short)?,
        )
    } else {
        let held;
        let dictionary = match window {
            SpanWindow::Own => {
                held = start.window.bytes()?;
                &held[..]
            }
            SpanWindow::Fetched(deflated) => {
                held = start.window.bytes_from(deflated)?;
                &held[..]
            }
            SpanWindow::Preceding(bytes) => &bytes[bytes.len().saturating_sub(WINDOW)..],
        };
        match &start.head {
            None => inflate::RawInflate::resume(start.bits, dictionary, bytes)?,
            Some(head) => {
                let before;
                (stream, before) = head.splice(bytes, start.bits);
                spliced = Some((&stream[..], before));
                inflate::RawInflate::resume(0, dictionary, &stream)?
            }
        }
        .ok_or_else(short)?
    };
    let mut produced = 0;
    while produced < out.len() {
        let step = inflate.inflate(input, &mut out[produced..], false)?;
        input = &input[step.consumed..];
        produced += step.produced;
        match step.stop {
            inflate::Stop::End if produced < out.len() => {
                // The span goes on in the next member, whose trailer is at the byte after
                // the deflate stream's last bit: in `bytes`, not in the spliced stream.
                if let Some((stream, before)) = spliced.take() {
                    let used = ((stream.len() - input.len()) as u64 * 8)
                        .checked_sub(u64::from(step.held))
                        .ok_or_else(short)?;
                    // Byte `before - 1` of the stream is `bytes[0]`.
                    let end = (before as u64)
                        .checked_sub(1)
                        .and_then(|first| used.div_ceil(8).checked_sub(first));
                    input = end
                        .and_then(|end| bytes.get(end as usize..))
                        .ok_or_else(short)?;
                }
                let after = input.get(inflate::TRAILER..).ok_or_else(short)?;
                input = skip_header(after).ok_or_else(short)?;
                inflate.reset()?;
            }
            _ if step.consumed == 0 && step.produced == 0 => return Err(short()),
            _ => {}
        }
    }
    if !digest.matches(&out) {
        return Err(GzipError::SpanDigest { at });
    }
    Ok(out)
}

/// `input` after the gzip header it starts with, if it starts with a whole one.
fn skip_header(input: &[u8]) -> Option<&[u8]> {
    match inflate::header_len(input) {
        Ok(Some(n)) => input.get(n..),
        _ => None,
    }
}
