//! The windows a span index keeps apart ([`crate::image::gzip::WindowsBlob`]), fetched with
//! the spans that need them: a request for a run of spans goes with one for their windows,
//! side by side, so a miss waits one round trip as before, and the mount never downloads
//! the windows of spans nobody reads.

use std::ops::Range;

use bytes::Bytes;

use crate::{
    image::{
        estargz::{Chunk, Unit},
        gzip::SpanWindow,
    },
    oci::digest::Digest,
    registry::{BlobSource, RegistryError},
};

/// Bytes between two windows a request fetches rather than asking twice: a window is a
/// few KiB, a round trip is worth far more.
const GAP: u64 = 16 << 10;

/// Ranges of windows blobs, one request each.
pub(super) type Wanted = Vec<(Digest, Range<u64>)>;

/// The windows blob ranges `chunks` (one range request's, in blob order) need: those of
/// spans that keep their window apart, but not of a span that comes right after another of
/// them (inflated first, its last 32 KiB are the window: [`SpanWindow::Preceding`]), nor of
/// the span starting at `preceded` (the uncompressed offset of one whose span before is at
/// hand, cached); windows next to each other, or nearly, in one range.
pub(super) fn wanted<'a>(chunks: impl Iterator<Item = &'a Chunk>, preceded: Option<u64>) -> Wanted {
    // (start, end, window length, place) of each span, in the uncompressed stream.
    let mut spans: Vec<(u64, u64, u64, Option<crate::image::gzip::WindowPlace>)> = chunks
        .filter_map(|c| match &c.unit {
            Unit::Span { start, len, .. } => Some((
                start.uncompressed,
                start.uncompressed + len,
                start.window.len() as u64,
                start.window.place(),
            )),
            Unit::Member | Unit::Frame => None,
        })
        .collect();
    spans.sort_by_key(|&(at, ..)| at);
    spans.dedup_by_key(|&mut (at, ..)| at);
    let mut places: Vec<(Digest, Range<u64>)> = spans
        .iter()
        .enumerate()
        .filter(|&(i, &(at, _, window, _))| {
            let after_one = i > 0 && {
                let (prev_at, prev_end, ..) = spans[i - 1];
                prev_end == at && prev_end - prev_at >= window
            };
            !after_one && preceded != Some(at)
        })
        .filter_map(|(_, &(.., place))| place)
        .map(|p| (p.blob, p.range.0..p.range.1))
        .collect();
    places.sort_by_key(|(blob, range)| (*blob, range.start));
    let mut out: Wanted = Vec::new();
    for (blob, range) in places {
        match out.last_mut() {
            Some((b, last)) if *b == blob && range.start <= last.end.saturating_add(GAP) => {
                last.end = last.end.max(range.end);
            }
            _ => out.push((blob, range)),
        }
    }
    out
}

/// Windows as fetched: pieces of windows blobs.
#[derive(Debug, Default)]
pub(super) struct Fetched {
    pieces: Vec<(Digest, u64, Bytes)>,
}

impl Fetched {
    /// Bytes fetched.
    pub(super) fn len(&self) -> u64 {
        self.pieces.iter().map(|(_, _, b)| b.len() as u64).sum()
    }

    /// Where the window of `chunk`'s span comes from, given `inflated`, the spans of the
    /// same request inflated before it and the cached one before the first (where each
    /// ends, its bytes): the one that ends where it starts and holds its whole window, if it
    /// keeps its window apart ([`wanted`] did not ask for that window); else the window
    /// fetched; else its own.
    pub(super) fn window<'a, B>(&'a self, chunk: &Chunk, inflated: &'a [(u64, B)]) -> SpanWindow<'a>
    where
        B: std::ops::Deref<Target: AsRef<[u8]>>,
    {
        if let Unit::Span { start, .. } = &chunk.unit
            && start.window.place().is_some()
            && let Some((_, before)) = inflated.iter().find(|(end, bytes)| {
                *end == start.uncompressed && (**bytes).as_ref().len() >= start.window.len()
            })
        {
            return SpanWindow::Preceding((**before).as_ref());
        }
        self.fetched(chunk)
            .map_or(SpanWindow::Own, SpanWindow::Fetched)
    }

    fn fetched(&self, chunk: &Chunk) -> Option<&[u8]> {
        let Unit::Span { start, .. } = &chunk.unit else {
            return None;
        };
        let place = start.window.place()?;
        let (from, to) = place.range;
        self.pieces.iter().find_map(|(blob, at, bytes)| {
            let offset = from.checked_sub(*at)?;
            let end = to.checked_sub(*at)?;
            (*blob == place.blob)
                .then(|| bytes.get(offset as usize..end as usize))
                .flatten()
        })
    }
}

/// Fetches `wanted` from `source`, one request after another (a run of spans has its
/// windows side by side: one request, usually).
pub(super) async fn fetch(
    source: &dyn BlobSource,
    wanted: &Wanted,
) -> Result<Fetched, RegistryError> {
    let mut pieces = Vec::with_capacity(wanted.len());
    for (blob, range) in wanted {
        let bytes = source.read_range(blob, range.clone()).await?;
        pieces.push((*blob, range.start, bytes));
    }
    Ok(Fetched { pieces })
}

/// Where `chunk`'s span ends in the uncompressed stream, if its unit is a span: the key
/// [`Fetched::window`] finds it by once inflated.
pub(super) fn span_end(chunk: &Chunk) -> Option<u64> {
    match &chunk.unit {
        Unit::Span { start, len, .. } => Some(start.uncompressed + len),
        Unit::Member | Unit::Frame => None,
    }
}
