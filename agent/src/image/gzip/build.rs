//! Building a span index: one pass over the layer, inflating it and reading its tar stream,
//! checkpoints placed as the bytes go by: inflate is stopped where a span reaches its
//! length, and the symbol it stopped in (zlib's `inflateMark`) is where the next span
//! starts, with the header of the block it is in; in a stored block, at the next block
//! boundary instead.

use std::io::{self, Read};

use super::{
    BlockHead, Checkpoint, Entry, GzipError, MAX_ENTRIES, MAX_HEAD_BITS, MAX_SPAN, MIN_SPAN, Span,
    SpanIndex, WINDOW, Window,
    inflate::{self, RawInflate, Step, Stop},
    refs,
};
use crate::{
    image::tar::TarReader,
    oci::digest::{Digest, Hasher},
};

/// How to build an index.
#[derive(Clone, Copy, Debug)]
pub struct BuildOptions {
    /// Uncompressed bytes between checkpoints: a span ends at the symbol where it reaches
    /// this length (up to 257 bytes before it, inside a match), or, inside a stored block,
    /// at the next block boundary.
    pub span: u64,
}

impl BuildOptions {
    /// For an index published with its windows apart: 128 KiB spans, chosen by measurement
    /// on the e2e bench's image (Apache and PHP, one 144 MB gzip layer; PHP's start through
    /// the snapshotter, 100 Mbit/s, 2 cold starts a size at 0 and 50 ms, one bench run a
    /// size, medians): 64K 3.74 / 5.04 s, 128K 2.81 / 4.35 s, 256K 3.04 / 4.27 s; again
    /// with a run of spans fetching only its first window and windows deflated hard, 64K
    /// 3.05 / 4.80 s, 128K 2.99 / 4.29 s (1M with windows held, another session: 3.30 /
    /// 4.60 s). Smaller spans fetch fewer bytes around each miss, but each span fetched
    /// alone brings its window (a few KiB), and below 128K that costs what it saves. Those
    /// spans ended at the first block boundary past their length (204 KiB on average at
    /// 128K); with checkpoints inside blocks (a trial of 2026-12-05, 3 cold starts at 0
    /// ms): 128K 2.62 s (2.49-3.00, 27.8 MB by the first line), 64K 3.13 s (2.81-3.19,
    /// 25.7 MB): fewer bytes, more requests and windows.
    pub fn published() -> Self {
        Self { span: 128 << 10 }
    }

    /// For an index kept in a node's cache with its windows held in memory (as a mount
    /// holds them): [`Default`].
    pub fn held() -> Self {
        Self::default()
    }
}

impl Default for BuildOptions {
    /// 1 MiB spans, for an index whose windows are held (in the index, then in a mount's
    /// memory), chosen by measurement on the e2e bench's image (Apache and PHP, one 144 MB
    /// gzip layer; PHP's start through the snapshotter, 100 Mbit/s, 2 cold starts a size,
    /// one session): the index is 0.8 % of the layer at 2 MiB, 1.5 % at 1 MiB and 2.7 % at
    /// 512 KiB, and the start took 4.03 s, 3.30 s and 3.24 s (5.20, 4.60 and 4.56 s 50 ms
    /// from the registry): smaller spans fetch fewer bytes around each miss, until the
    /// index (fetched before the mount) and its windows cost as much as that saves. 1 MiB
    /// is as fast as 512 KiB at half the index.
    fn default() -> Self {
        Self { span: 1 << 20 }
    }
}

impl SpanIndex {
    /// Indexes the gzip layer `layer`, read once from its first byte to its last.
    pub fn build(layer: impl Read, options: BuildOptions) -> Result<SpanIndex, GzipError> {
        if !(MIN_SPAN..=MAX_SPAN).contains(&options.span) {
            return Err(GzipError::SpanSize(options.span));
        }
        let mut tar = TarReader::new(Inflating::new(layer, Some(options.span))?);
        let mut entries = Vec::new();
        let tar_result = loop {
            match tar.next_header() {
                Ok(Some(header)) => {
                    if entries.len() == MAX_ENTRIES {
                        break Err(GzipError::TooManyEntries);
                    }
                    if tar.is_sparse() {
                        break Err(GzipError::SparseFile(header.name));
                    }
                    let data_offset = tar.position();
                    entries.push(Entry {
                        header,
                        data_offset,
                    });
                }
                Ok(None) => break Ok(()),
                Err(err) => break Err(GzipError::Tar(err)),
            }
        };
        // What went wrong in the gzip stream is the cause of what the tar reader saw.
        let mut inflating = tar.into_inner();
        if let Some(err) = inflating.failed.take() {
            return Err(err);
        }
        tar_result?;
        // The rest: tar padding after the end-of-archive blocks, trailers, later members.
        let drained = io::copy(&mut inflating, &mut io::sink());
        if let Some(err) = inflating.failed.take() {
            return Err(err);
        }
        drained.map_err(GzipError::Io)?;
        let (layer, compressed_size, uncompressed_size, spans) = inflating.finish()?;
        Ok(SpanIndex {
            layer,
            compressed_size,
            uncompressed_size,
            spans,
            entries,
            windows: None,
        })
    }
}

/// A span to cut out of a layer read through ([`read_through`]): where it starts in the
/// uncompressed stream, how long it is, and what its bytes must hash to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    pub at: u64,
    pub len: u64,
    pub digest: Digest,
}

/// Reads the gzip layer `layer` once, from its first byte to its last, inflating it: each of
/// `cuts` (in stream order, not overlapping, at most [`MAX_SPAN`] long) is handed to `each`
/// once its bytes match its digest, and at the end the whole layer must be `size` bytes
/// whose SHA-256 is `digest`. This is what lets a layer's descriptor vouch for the spans an
/// index describes: a span that does not match, or a layer that is not the one the
/// descriptor names, is an error, and `each` has then seen only spans that matched.
pub fn read_through(
    layer: impl Read,
    cuts: &[Cut],
    digest: &Digest,
    size: u64,
    mut each: impl FnMut(&Cut, Vec<u8>),
) -> Result<(), GzipError> {
    let mut inflating = Inflating::new(layer, None)?;
    let failed = |inflating: &mut Inflating<_>, err: io::Error| {
        inflating.failed.take().unwrap_or(GzipError::Io(err))
    };
    let mut position = 0u64;
    for cut in cuts {
        if cut.at < position {
            return Err(GzipError::Inflate(format!(
                "the span at uncompressed byte {} overlaps the one before it",
                cut.at
            )));
        }
        if cut.len > MAX_SPAN {
            return Err(GzipError::SpanTooLong {
                at: cut.at,
                len: cut.len,
            });
        }
        let gap = cut.at - position;
        let skipped = io::copy(&mut (&mut inflating).take(gap), &mut io::sink())
            .map_err(|e| failed(&mut inflating, e))?;
        let mut bytes = vec![0; cut.len as usize];
        if skipped < gap {
            return Err(GzipError::SpanShort {
                at: cut.at,
                len: cut.len,
            });
        }
        match inflating.read_exact(&mut bytes) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(GzipError::SpanShort {
                    at: cut.at,
                    len: cut.len,
                });
            }
            Err(e) => return Err(failed(&mut inflating, e)),
        }
        if !cut.digest.matches(&bytes) {
            return Err(GzipError::SpanDigest { at: cut.at });
        }
        each(cut, bytes);
        position = cut.at + cut.len;
    }
    io::copy(&mut inflating, &mut io::sink()).map_err(|e| failed(&mut inflating, e))?;
    let (actual, read, _, _) = inflating.finish()?;
    if read != size || actual != *digest {
        return Err(GzipError::LayerDigest {
            expected: *digest,
            size,
            actual,
            read,
        });
    }
    Ok(())
}

/// Where the reader is in the gzip stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Deflate,
    Trailer,
    Done,
}

/// The uncompressed stream of a gzip layer as a `Read`, recording checkpoints and span
/// digests on the way. Its errors reach the tar reader as `io::Error`s; the `GzipError`
/// behind one is kept in `failed`.
struct Inflating<R> {
    input: R,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`; `offset` is the layer offset of `buf[start]`.
    start: usize,
    end: usize,
    offset: u64,
    eof: bool,
    /// The layer's digest, over every byte read.
    layer: Hasher,
    state: State,
    inflate: RawInflate,
    /// The member's last uncompressed bytes (at least the last [`WINDOW`] of them).
    window: Vec<u8>,
    member_crc: crc32fast::Hasher,
    member_len: u64,
    /// Uncompressed bytes between checkpoints, at least; `None` records none.
    span: Option<u64>,
    total_out: u64,
    spans: Vec<Span>,
    /// The span being read: its checkpoint and its bytes' digest so far.
    current: Option<(Checkpoint, Hasher)>,
    /// The start of the current span, kept until its window can be made sparse.
    start_of_span: Option<StartOfSpan>,
    /// The last (up to) [`RECENT`] compressed bytes inflate consumed: a symbol it stops in
    /// may have begun in them, and a checkpoint at a block boundary inside the last one
    /// needs it.
    recent: Vec<u8>,
    /// The start of the block being inflated: its first compressed bytes (enough for its
    /// header), of which the first `skip` bits belong to the block before; `None` before
    /// the first member.
    block: Option<(Vec<u8>, usize)>,
    /// The span being read is to end at the next block boundary: no checkpoint could be
    /// placed inside the block where it reached its length.
    at_boundary: bool,
    /// While the start of a span that begins inside a block is being checked: how many
    /// spans there were with the one before it, and that one's digest before it was
    /// finished, to join the two if the checkpoint between them is given up.
    joinable: Option<(usize, Hasher)>,
    failed: Option<GzipError>,
}

/// Compressed bytes kept of a block's start: its header is at most [`MAX_HEAD_BITS`].
const BLOCK_START: usize = MAX_HEAD_BITS as usize / 8 + 2;
/// Compressed bytes kept of those before an inflate call: a symbol and the bits inflate
/// holds take at most 48 + 63 bits.
const RECENT: usize = 16;

/// The compressed and inflated bytes after a checkpoint, up to where no back-reference can
/// reach its window any more ([`refs::sparse_window`]).
struct StartOfSpan {
    /// The checkpoint's whole window.
    window: Vec<u8>,
    compressed: Vec<u8>,
    inflated: Vec<u8>,
}

/// Most bits of a symbol inflate's mark may leave out: a distance code's (see
/// [`inflate::Mark::counted`]).
const MAX_UNCOUNTED: u64 = 15;

/// Compressed bytes kept for one span's start at most: 32 KiB of output take a few KiB to
/// a few tens of KiB; a stream that needs more keeps its whole window.
const MAX_START_OF_SPAN: usize = 256 * 1024;

/// Compressed bytes read at a time.
const READ: usize = 256 * 1024;

impl<R: Read> Inflating<R> {
    fn new(input: R, span: Option<u64>) -> Result<Self, GzipError> {
        Ok(Self {
            input,
            buf: vec![0; READ],
            start: 0,
            end: 0,
            offset: 0,
            eof: false,
            layer: Hasher::new(),
            state: State::Header,
            inflate: RawInflate::new()?,
            window: Vec::with_capacity(2 * WINDOW),
            member_crc: crc32fast::Hasher::new(),
            member_len: 0,
            span,
            total_out: 0,
            spans: Vec::new(),
            current: None,
            start_of_span: None,
            recent: Vec::with_capacity(2 * RECENT),
            block: None,
            at_boundary: false,
            joinable: None,
            failed: None,
        })
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    /// Reads more input after what is pending; false at the end of the layer.
    fn fill(&mut self) -> Result<bool, GzipError> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // Only a long gzip header needs more than one read's worth pending, and
            // `header_len` refuses one before it passes MAX_HEADER.
            let grown = (self.buf.len() * 2).min(inflate::MAX_HEADER + READ);
            if grown == self.buf.len() {
                return Err(GzipError::Inflate("no progress with a full buffer".into()));
            }
            self.buf.resize(grown, 0);
        }
        let n = loop {
            match self.input.read(&mut self.buf[self.end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(GzipError::Io(e)),
            }
        };
        self.layer.update(&self.buf[self.end..self.end + n]);
        self.end += n;
        self.eof = n == 0;
        Ok(n > 0)
    }

    /// Closes the current span (if any) and opens one at `checkpoint`, whose window is
    /// `window`: set once the span's start shows what of it is referred to (or, failing
    /// that, whole).
    fn checkpoint(&mut self, checkpoint: Checkpoint, window: Vec<u8>) -> Result<(), GzipError> {
        let compressed = if checkpoint.bits > 0 {
            self.recent.last().copied().into_iter().collect()
        } else {
            Vec::new()
        };
        self.open_span(checkpoint, window, compressed)
    }

    /// [`Self::checkpoint`], the compressed bytes from the one holding its first bits given.
    fn open_span(
        &mut self,
        checkpoint: Checkpoint,
        window: Vec<u8>,
        compressed: Vec<u8>,
    ) -> Result<(), GzipError> {
        let closed = self.close_span()?;
        self.joinable = closed
            .filter(|_| checkpoint.head.is_some())
            .map(|hasher| (self.spans.len(), hasher));
        self.at_boundary = false;
        self.start_of_span = (!window.is_empty()).then(|| StartOfSpan {
            window,
            compressed,
            inflated: Vec::new(),
        });
        self.current = Some((checkpoint, Hasher::new()));
        Ok(())
    }

    /// Output room left before the span being read reaches its length, if it is to end
    /// there (inside a block) rather than at the next block boundary.
    fn room_in_span(&self) -> Option<usize> {
        let span = self.span?;
        let (start, _) = self.current.as_ref()?;
        let left = (start.uncompressed + span).checked_sub(self.total_out)?;
        (left > 0 && !self.at_boundary).then(|| usize::try_from(left).unwrap_or(usize::MAX))
    }

    /// A checkpoint at the symbol inflate stopped in, after `step` consumed
    /// `buf[start..start + step.consumed]` (not yet consumed) and stopped inside a block:
    /// the checkpoint and the compressed bytes from the one holding its first bit to the end
    /// of that input. `None` where none can be placed: a stored block, a header too long to
    /// have been kept, a symbol begun before the bytes kept, or one whose first bit is not
    /// known for sure. `produced` is what the step wrote.
    fn inside_block(&self, step: &Step, produced: &[u8]) -> Option<(Checkpoint, Vec<u8>)> {
        let mark = step.mark?;
        if mark.written > step.produced {
            return None;
        }
        let (block, skip) = self.block.as_ref()?;
        let head = refs::block_head(block, *skip)?;
        let codes = refs::BlockCodes::of(&head)?;
        let end = (self.offset + step.consumed as u64) * 8;
        let last = end.checked_sub(u64::from(step.held) + mark.counted)?;
        let earliest = last.saturating_sub(MAX_UNCOUNTED) / 8;
        let input = &self.buf[self.start..self.start + step.consumed];
        let (bytes, from) = if earliest >= self.offset {
            (&input[(earliest - self.offset) as usize..], earliest)
        } else {
            // From the bytes before this call's input, as many as are kept.
            let before = (self.offset - earliest).min(self.recent.len() as u64) as usize;
            let mut bytes = Vec::with_capacity(before + input.len());
            bytes.extend_from_slice(&self.recent[self.recent.len() - before..]);
            bytes.extend_from_slice(input);
            let from = self.offset - before as u64;
            return self.placed(&codes, head, &bytes, from, last, (step, produced));
        };
        self.placed(&codes, head, bytes, from, last, (step, produced))
    }

    /// [`Self::inside_block`] given `bytes`, the compressed bytes from the layer's byte
    /// `from`: the symbol's first bit is `last` or, where zlib-rs's mark left out a distance
    /// code, that code's length before it. Of those places, the one whose bits decode (in
    /// the block's codes) to a symbol of the length the mark says, and, for a match of which
    /// the step wrote some bytes, one that copies those bytes; and only if it is the only
    /// one.
    fn placed(
        &self,
        codes: &refs::BlockCodes,
        head: BlockHead,
        bytes: &[u8],
        from: u64,
        last: u64,
        (step, produced): (&Step, &[u8]),
    ) -> Option<(Checkpoint, Vec<u8>)> {
        let mark = step.mark?;
        let split = produced.len().checked_sub(mark.written)?;
        let mut places = (0..=MAX_UNCOUNTED).filter_map(|uncounted| {
            let bit = last.checked_sub(uncounted)?.checked_sub(from * 8)?;
            let symbol = codes.symbol_at(bytes, usize::try_from(bit).ok()?)?;
            let fits = if uncounted == 0 {
                symbol.bits == mark.counted
            } else {
                symbol.distance_bits == uncounted && symbol.bits == mark.counted + uncounted
            };
            let copies = mark.written == 0
                || symbol.copy.is_some_and(|(length, distance)| {
                    usize::from(length) >= mark.written
                        && self.copies(&produced[..split], distance, &produced[split..])
                });
            (fits && copies).then_some(from * 8 + bit)
        });
        let first = places.next()?;
        if places.next().is_some() {
            return None;
        }
        #[cfg(test)]
        let first = first + tests::misplaced(self.spans.len());
        let checkpoint = Checkpoint {
            compressed: first.div_ceil(8),
            bits: ((8 - first % 8) % 8) as u8,
            uncompressed: self.total_out + (step.produced - mark.written) as u64,
            member: false,
            window: Window::default(),
            head: Some(head),
        };
        Some((checkpoint, bytes[(first / 8 - from) as usize..].to_vec()))
    }

    /// Whether a match `distance` back from the end of what was inflated before it (the
    /// window, then `before`) writes `written` first.
    fn copies(&self, before: &[u8], distance: u16, written: &[u8]) -> bool {
        let distance = usize::from(distance);
        let history = self.window.len() + before.len();
        if distance > history.min(WINDOW) {
            return false;
        }
        let at = |i: usize| {
            if i < self.window.len() {
                self.window[i]
            } else {
                before[i - self.window.len()]
            }
        };
        // A match may overlap what it writes: byte i copies byte i - distance, itself
        // written by the match when that is past the history.
        written.iter().enumerate().all(|(i, &byte)| {
            let source = history + i - distance;
            let expected = if source < history {
                at(source)
            } else {
                written[source - history]
            };
            byte == expected
        })
    }

    /// Gives up the checkpoint inside a block whose span's start (`refused`) did not inflate
    /// from it alike: the span before it goes on through this one, as if the checkpoint had
    /// never been placed, and ends at the next block boundary. The last `unhashed` bytes of
    /// `refused` are not in the span's digest yet (the caller adds them). Placing a
    /// checkpoint inside a block rests on where zlib says the symbol it stopped in began;
    /// should that ever be wrong, this costs a longer span, not the index.
    fn join(&mut self, refused: StartOfSpan, unhashed: usize) -> Result<(), GzipError> {
        let at = self.current.as_ref().map_or(0, |(c, _)| c.uncompressed);
        let error = || {
            GzipError::Inflate(format!(
                "no resuming inside the block at uncompressed byte {at}"
            ))
        };
        let (count, mut hasher) = self.joinable.take().ok_or_else(error)?;
        if count == 0 || self.spans.len() != count {
            return Err(error());
        }
        let before = self.spans.pop().ok_or_else(error)?;
        let hashed = refused
            .inflated
            .len()
            .checked_sub(unhashed)
            .ok_or_else(error)?;
        hasher.update(&refused.inflated[..hashed]);
        tracing::debug!(
            at,
            "a checkpoint inside a deflate block did not resume alike: its span is joined to the one before"
        );
        self.current = Some((before.start, hasher));
        self.at_boundary = true;
        Ok(())
    }

    /// Ends the current span, if any: its digest (and, for a span that has bytes, the digest
    /// before it was finished, in case the span after it is joined to it).
    fn close_span(&mut self) -> Result<Option<Hasher>, GzipError> {
        // A span too short to take its window out of reach settles its start with what
        // there is of it (it keeps all of its window).
        if let Some(refused) =
            follow_start_of_span(&mut self.start_of_span, &mut self.current, &[], &[], true)?
        {
            self.join(refused, 0)?;
        }
        let Some((start, hasher)) = self.current.take() else {
            return Ok(None);
        };
        let len = self.total_out - start.uncompressed;
        // A checkpoint with nothing after it (the stream ends in empty blocks, as Go's
        // gzip writers end it, which podman and buildah push with) opens no span.
        if len == 0 {
            return Ok(None);
        }
        let unfinished = hasher.clone();
        self.spans.push(Span {
            start,
            len,
            digest: hasher.finish(),
        });
        Ok(Some(unfinished))
    }

    /// Whether checkpoints are recorded and the span being read is long enough to end at
    /// the next boundary.
    fn span_full(&self) -> bool {
        self.span.is_some_and(|span| {
            self.current
                .as_ref()
                .is_none_or(|(start, _)| self.total_out - start.uncompressed >= span)
        })
    }

    fn finish(mut self) -> Result<(Digest, u64, u64, Vec<Span>), GzipError> {
        self.close_span()?;
        Ok((self.layer.finish(), self.offset, self.total_out, self.spans))
    }

    /// The next uncompressed bytes into `out`: 0 only at the end of the layer.
    fn step(&mut self, out: &mut [u8]) -> Result<usize, GzipError> {
        let mut idle = 0;
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Header => match inflate::header_len(self.pending()) {
                    Ok(Some(n)) => {
                        if self.span_full() {
                            self.checkpoint(
                                Checkpoint {
                                    compressed: self.offset,
                                    bits: 0,
                                    uncompressed: self.total_out,
                                    member: true,
                                    window: Window::default(),
                                    head: None,
                                },
                                Vec::new(),
                            )?;
                        }
                        self.consume(n);
                        self.block = Some((Vec::new(), 0));
                        self.inflate.reset()?;
                        self.window.clear();
                        self.member_crc = crc32fast::Hasher::new();
                        self.member_len = 0;
                        self.state = State::Deflate;
                    }
                    Ok(None) => {
                        if !self.fill()? {
                            return Err(GzipError::Truncated {
                                offset: self.offset,
                            });
                        }
                    }
                    Err(err) => {
                        return Err(GzipError::BadHeader {
                            offset: self.offset,
                            reason: err.to_string(),
                        });
                    }
                },
                State::Deflate => {
                    if self.start == self.end && !self.fill()? {
                        return Err(GzipError::Truncated {
                            offset: self.offset,
                        });
                    }
                    let (start, end) = (self.start, self.end);
                    // Stop where the span reaches its length, to end it there.
                    let room = self.room_in_span();
                    let cap = room.map_or(out.len(), |r| r.min(out.len()));
                    let out = &mut out[..cap];
                    let step = self.inflate.inflate(&self.buf[start..end], out, true)?;
                    let consumed = &self.buf[start..start + step.consumed];
                    if let Some((block, _)) = self.block.as_mut()
                        && block.len() < BLOCK_START
                    {
                        let take = consumed.len().min(BLOCK_START - block.len());
                        block.extend_from_slice(&consumed[..take]);
                    }
                    let inside = if step.produced > 0 && room == Some(step.produced) {
                        let inside = self.inside_block(&step, &out[..step.produced]);
                        self.at_boundary = inside.is_none();
                        inside
                    } else {
                        None
                    };
                    self.recent
                        .extend_from_slice(&consumed[consumed.len().saturating_sub(RECENT)..]);
                    if self.recent.len() > RECENT {
                        self.recent.drain(..self.recent.len() - RECENT);
                    }
                    if let Some(refused) = follow_start_of_span(
                        &mut self.start_of_span,
                        &mut self.current,
                        consumed,
                        &out[..step.produced],
                        step.stop == Stop::End,
                    )? {
                        self.join(refused, step.produced)?;
                    }
                    self.consume(step.consumed);
                    let produced = &out[..step.produced];
                    self.member_len += produced.len() as u64;
                    self.member_crc.update(produced);
                    // A checkpoint inside the block splits what was produced: the bytes of
                    // the symbol it is at (part of a match) are the next span's.
                    let split = inside.as_ref().map_or(produced.len(), |(c, ..)| {
                        (c.uncompressed - self.total_out) as usize
                    });
                    self.produce(&produced[..split]);
                    if let Some((checkpoint, compressed)) = inside {
                        let window =
                            self.window[self.window.len().saturating_sub(WINDOW)..].to_vec();
                        self.open_span(checkpoint, window, compressed)?;
                        if let Some(refused) = follow_start_of_span(
                            &mut self.start_of_span,
                            &mut self.current,
                            &[],
                            &produced[split..],
                            false,
                        )? {
                            self.join(refused, produced.len() - split)?;
                        }
                        self.produce(&produced[split..]);
                    }
                    match step.stop {
                        Stop::Block { bits } => {
                            self.block = Some(if bits > 0 {
                                (
                                    self.recent.last().copied().into_iter().collect(),
                                    usize::from(8 - bits),
                                )
                            } else {
                                (Vec::new(), 0)
                            });
                            if self.span_full() {
                                let window = self.window
                                    [self.window.len().saturating_sub(WINDOW)..]
                                    .to_vec();
                                self.checkpoint(
                                    Checkpoint {
                                        compressed: self.offset,
                                        bits,
                                        uncompressed: self.total_out,
                                        member: false,
                                        window: Window::default(),
                                        head: None,
                                    },
                                    window,
                                )?;
                            }
                        }
                        Stop::End => self.state = State::Trailer,
                        _ => {}
                    }
                    if let Some((start, _)) = &self.current
                        && self.total_out - start.uncompressed > MAX_SPAN
                    {
                        return Err(GzipError::Inflate(format!(
                            "no deflate block ends within {MAX_SPAN} bytes after byte {} of the uncompressed stream",
                            start.uncompressed
                        )));
                    }
                    if step.produced > 0 {
                        return Ok(step.produced);
                    }
                    if step.consumed > 0 || step.stop == Stop::End {
                        idle = 0;
                    } else {
                        // zlib stops at a block boundary once without moving; more than
                        // that means it wants input.
                        idle += 1;
                        if (step.stop == Stop::Room || idle > 2) && !self.fill()? {
                            return Err(GzipError::Truncated {
                                offset: self.offset,
                            });
                        }
                        if idle > 8 {
                            return Err(GzipError::Inflate("inflate makes no progress".into()));
                        }
                    }
                }
                State::Trailer => {
                    while self.pending().len() < inflate::TRAILER {
                        if !self.fill()? {
                            return Err(GzipError::Truncated {
                                offset: self.offset,
                            });
                        }
                    }
                    let trailer = &self.pending()[..inflate::TRAILER];
                    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
                    let size = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
                    let member_end = self.offset;
                    let computed =
                        std::mem::replace(&mut self.member_crc, crc32fast::Hasher::new());
                    if computed.finalize() != crc {
                        return Err(GzipError::Trailer {
                            offset: member_end,
                            what: "CRC-32",
                        });
                    }
                    if self.member_len as u32 != size {
                        return Err(GzipError::Trailer {
                            offset: member_end,
                            what: "size",
                        });
                    }
                    self.consume(inflate::TRAILER);
                    self.state = self.after_member(member_end)?;
                }
            }
        }
    }

    /// Uncompressed bytes of the current span, inflated: counted, hashed, kept as window.
    fn produce(&mut self, produced: &[u8]) {
        self.total_out += produced.len() as u64;
        if let Some((_, hasher)) = self.current.as_mut() {
            hasher.update(produced);
        }
        self.window.extend_from_slice(produced);
        if self.window.len() > 2 * WINDOW {
            self.window.drain(..self.window.len() - WINDOW);
        }
    }

    /// After a member's trailer: another member, or the end of the layer (zero padding, as
    /// some tools write, is allowed there).
    fn after_member(&mut self, member_end: u64) -> Result<State, GzipError> {
        loop {
            if self.start == self.end && !self.fill()? {
                return Ok(State::Done);
            }
            let pending = self.pending();
            if pending[0] != 0 {
                return Ok(State::Header);
            }
            let zeros = pending.iter().take_while(|&&b| b == 0).count();
            let rest = pending.len() - zeros;
            self.consume(zeros);
            if rest > 0 {
                return Err(GzipError::TrailingGarbage { offset: member_end });
            }
        }
    }
}

/// Follows the start of the current span with what one inflate call consumed and produced;
/// once the window is out of reach (or the member ended), keeps only the window bytes the
/// span refers to. A checkpoint inside a block that does not resume to the bytes it was
/// read to is handed back (the start of its span, what it inflated included).
fn follow_start_of_span(
    start_of_span: &mut Option<StartOfSpan>,
    current: &mut Option<(Checkpoint, Hasher)>,
    consumed: &[u8],
    produced: &[u8],
    ended: bool,
) -> Result<Option<StartOfSpan>, GzipError> {
    let Some(start) = start_of_span.as_mut() else {
        return Ok(None);
    };
    start.compressed.extend_from_slice(consumed);
    start.inflated.extend_from_slice(produced);
    let too_long = start.compressed.len() > MAX_START_OF_SPAN;
    if !too_long && !ended && start.inflated.len() < WINDOW {
        return Ok(None);
    }
    let (Some(start), Some((checkpoint, _))) = (start_of_span.take(), current.as_mut()) else {
        return Ok(None);
    };
    let (stream, bits) = match &checkpoint.head {
        // Inside a block, inflation resumes from the block's header spliced onto the
        // stream at the checkpoint. That it does, to the same bytes, is shown here, or the
        // checkpoint is given up (the caller joins its span to the one before).
        Some(head) => {
            let (stream, _) = head.splice(&start.compressed, checkpoint.bits);
            if !inflates_alike(&start.window, &stream, 0, &start.inflated) {
                return Ok(Some(start));
            }
            (stream, 0)
        }
        None => (start.compressed, checkpoint.bits),
    };
    let sparse = (!too_long)
        .then(|| refs::sparse_window(&start.window, &stream, bits, &start.inflated))
        .flatten()
        .filter(|sparse| inflates_alike(sparse, &stream, bits, &start.inflated));
    checkpoint.window = Window::new(sparse.as_deref().unwrap_or(&start.window));
    Ok(None)
}

/// Whether zlib, given `window` as its dictionary, inflates the start of a span (from
/// `compressed`, whose first byte holds `bits` of it) to `inflated`, what it did with the
/// whole window: the sparse window is checked by the inflater that will use it, not only
/// by the decoder that found it.
fn inflates_alike(window: &[u8], compressed: &[u8], bits: u8, inflated: &[u8]) -> bool {
    let Ok(Some((mut inflate, mut input))) = RawInflate::resume(bits, window, compressed) else {
        return false;
    };
    let want = inflated.len().min(WINDOW);
    let mut out = vec![0u8; want];
    let mut produced = 0;
    while produced < want {
        // A little at a time: a stream resumed a few bits off differs at once.
        let end = (produced + 4096).min(want);
        let Ok(step) = inflate.inflate(input, &mut out[produced..end], false) else {
            return false;
        };
        input = &input[step.consumed..];
        if out[produced..produced + step.produced] != inflated[produced..produced + step.produced] {
            return false;
        }
        produced += step.produced;
        if step.stop == Stop::End || (step.consumed == 0 && step.produced == 0) {
            break;
        }
    }
    produced == want || inflated.len() == produced
}

impl<R: Read> Read for Inflating<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.step(out).map_err(|err| {
            let io = io::Error::other(err.to_string());
            self.failed = Some(err);
            self.state = State::Done;
            io
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::Cell;

    thread_local! {
        /// The checkpoint inside a block placed while this many spans are finished is placed
        /// a bit off, by a test.
        pub(in super::super) static MISPLACE: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// Bits to move the checkpoint placed while `spans` spans are finished by: 1 for the one
    /// a test picked.
    pub(in super::super) fn misplaced(spans: usize) -> u64 {
        u64::from(MISPLACE.with(Cell::get) == Some(spans))
    }
}
