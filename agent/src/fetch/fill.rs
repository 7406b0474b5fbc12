//! The idle fill: code the loader prefetch found too large to fetch whole, once a program
//! runs in it, fetched in small pieces, one at a time, only while nothing else is on the
//! link.
//!
//! Near the registry the loader prefetch fetches only small read-only segments whole
//! ([`crate::fs`]'s loader: a few bandwidth-delay products), since there a start is bound by
//! the link and a segment fetched whole takes it from what the program reads. The code of
//! PHP, libcrypto and PHP's modules is larger, and a start faults it in page by page, a round
//! trip each (a 0 ms trace of the bench's unconverted image: 124 such waits of about 7 ms,
//! 0.9 s of a 2.0 s start). Between a start's bursts the link idles, though: a piece of that
//! code asked for then costs the start nothing, and saves it a miss whenever the program
//! comes to read it. So the loader hands such a segment here once a reader reads in it (the
//! start read 100 % of PHP's 25 spans of code, 90 % of libc's, but 4 % of libx265's 118,
//! whose constructors alone run), from the place read on, and a piece goes onto the link
//! only when no request at all is in flight ([`super::Line::Idle`]), one at a time, so that
//! a reader's next miss shares the link with one small answer at most. Segments take turns,
//! a piece each, so that a large one read in a few places does not hold the others back. A
//! reader that wants a chunk of a piece in flight waits for it like for any guess.
//!
//! Only on a link whose round trip is worth more than a piece's transfer ([`MIN_BDP`]). The
//! fill ends when the background download starts ([`Fill::stop`]): from then on it
//! fetches everything in large ranges, and a piece beside it only delays the cached image
//! (a trial that went on filling had the image whole 0.4-0.6 s later).

use std::{
    collections::{HashSet, VecDeque},
    sync::Mutex,
    time::Duration,
};

use crate::{image::estargz::Chunk, oci::digest::Digest};

/// Compressed bytes one piece asks for at most (a chunk larger than that goes alone).
pub(super) const PIECE: u64 = 64 << 10;
/// Chunks waiting at most; code handed over beyond that is left to its readers.
const MAX_QUEUED: usize = 16 << 10;
/// The fill runs only where a round trip carries at least this much. A piece in flight
/// delays a reader's next miss by its own transfer at most, and a piece the program comes to
/// read saves it a round trip: where a round trip carries less than two pieces, the one
/// costs about what the other saves (the bench's unconverted image 0 ms from the registry,
/// where a round trip carries about 60 KB, 6 alternating cold starts each: segments filled
/// once read in, 2.41 s against 2.29 s without the fill; filled as the walk found them,
/// 2.29 s against 2.26 s; 20 ms away, 2.94 s against 3.10 s and 2.89 s against 3.03 s; 50 ms
/// away, 3 each, 3.79 s against 3.66 s, and 2.84 s against 2.98 s for the converted image).
pub(super) const MIN_BDP: u64 = 2 * PIECE;
/// How long a piece waits for the link to idle before it is given up, and how long its
/// request may take.
pub(super) const PATIENCE: Duration = Duration::from_secs(30);

/// The segments waiting to be filled, each its chunks in the order they were handed over.
#[derive(Debug, Default)]
pub(super) struct Fill {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Segments, taking turns from the front; none is empty.
    queue: VecDeque<VecDeque<(Digest, Chunk)>>,
    /// Chunks in `queue`.
    queued: usize,
    /// Chunks in the queue or fetched by it, by blob and offset: each is queued once.
    seen: HashSet<(Digest, u64)>,
    /// Whether a thread drains the queue.
    draining: bool,
    /// Whether the background download took over: nothing is queued any more.
    stopped: bool,
}

impl Fill {
    /// Queues one segment's `chunks`, in their order, behind the segments waiting (chunks
    /// queued before, and any beyond [`MAX_QUEUED`], left out). Returns whether the caller is
    /// to start a thread that drains the queue ([`Fill::next_piece`] until it says `None`).
    pub(super) fn push(&self, chunks: impl IntoIterator<Item = (Digest, Chunk)>) -> bool {
        let mut state = crate::sync::lock(&self.state);
        if state.stopped {
            return false;
        }
        let mut segment = VecDeque::new();
        for (blob, chunk) in chunks {
            if state.queued + segment.len() >= MAX_QUEUED {
                break;
            }
            if state.seen.insert((blob, chunk.blob_offset)) {
                segment.push_back((blob, chunk));
            }
        }
        if !segment.is_empty() {
            state.queued += segment.len();
            state.queue.push_back(segment);
        }
        let start = !state.draining && !state.queue.is_empty();
        state.draining |= start;
        start
    }

    /// The next piece, from the segment whose turn it is (which then goes behind the others):
    /// its first chunk that `present` does not find (cached or in memory), and those adjacent
    /// to it in its blob after it, up to [`PIECE`] compressed bytes. `None` once nothing
    /// waits, or the fill stopped: the draining thread ends.
    pub(super) fn next_piece(
        &self,
        present: impl Fn(&Digest) -> bool,
    ) -> Option<Vec<(Digest, Chunk)>> {
        let mut state = crate::sync::lock(&self.state);
        while !state.stopped {
            let Some(mut segment) = state.queue.pop_front() else {
                break;
            };
            let mut piece: Vec<(Digest, Chunk)> = Vec::new();
            let mut bytes = 0u64;
            while let Some((blob, chunk)) = segment.front() {
                if present(&chunk.digest) {
                    segment.pop_front();
                    state.queued -= 1;
                    continue;
                }
                let size = chunk.blob_end.saturating_sub(chunk.blob_offset);
                let joins = piece.last().is_none_or(|(last_blob, last)| {
                    last_blob == blob && chunk.follows(last) && bytes.saturating_add(size) <= PIECE
                });
                if !joins {
                    break;
                }
                bytes = bytes.saturating_add(size);
                piece.extend(segment.pop_front());
                state.queued -= 1;
            }
            if !segment.is_empty() {
                state.queue.push_back(segment);
            }
            if !piece.is_empty() {
                return Some(piece);
            }
        }
        state.draining = false;
        None
    }

    /// Whether the background download took over.
    pub(super) fn stopped(&self) -> bool {
        crate::sync::lock(&self.state).stopped
    }

    /// Ends the fill: what waits is dropped, nothing more is queued, and the draining thread
    /// ends after the piece it is on.
    pub(super) fn stop(&self) {
        let mut state = crate::sync::lock(&self.state);
        state.stopped = true;
        state.queue = VecDeque::new();
        state.queued = 0;
        state.seen = HashSet::new();
    }

    /// The thread that drains the queue could not be started: the queue is dropped so the
    /// next hand-over tries again.
    pub(super) fn no_thread(&self) {
        let mut state = crate::sync::lock(&self.state);
        state.queue.clear();
        state.queued = 0;
        state.draining = false;
    }

    /// Chunks waiting.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        crate::sync::lock(&self.state).queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk `n` of a blob of 40 KiB chunks, one after another.
    fn chunk(n: u64) -> (Digest, Chunk) {
        let size = 40 << 10;
        let chunk = Chunk {
            file_offset: n * size,
            size,
            blob_offset: n * size,
            blob_end: (n + 1) * size,
            digest: Digest::of(&n.to_le_bytes()),
            unit: Default::default(),
        };
        (Digest::of(b"blob"), chunk)
    }

    fn offsets(piece: Option<Vec<(Digest, Chunk)>>) -> Vec<u64> {
        piece
            .expect("a piece")
            .iter()
            .map(|(_, c)| c.blob_offset / (40 << 10))
            .collect()
    }

    #[test]
    fn segments_take_turns_a_piece_each_skipping_what_is_cached() {
        let fill = Fill::default();
        // A large segment read in its middle (from chunk 10 on, then its start), and a
        // smaller one after it; chunk 12 is cached by then.
        assert!(
            fill.push([10, 11, 12, 13, 0, 1].map(chunk)),
            "a thread drains it"
        );
        assert!(
            !fill.push([20, 21, 10].map(chunk)),
            "the thread drains this too"
        );
        assert_eq!(fill.waiting(), 8, "chunk 10 is queued once");
        let cached = chunk(12).1.digest;
        let present = |d: &Digest| *d == cached;
        // A piece is at most 64 KiB: one 40 KiB chunk; adjacent ones only.
        assert_eq!(offsets(fill.next_piece(present)), [10]);
        assert_eq!(offsets(fill.next_piece(present)), [20]);
        assert_eq!(offsets(fill.next_piece(present)), [11]);
        assert_eq!(offsets(fill.next_piece(present)), [21]);
        assert_eq!(offsets(fill.next_piece(present)), [13]);
        assert_eq!(offsets(fill.next_piece(present)), [0]);
        assert_eq!(offsets(fill.next_piece(present)), [1]);
        assert!(fill.next_piece(present).is_none());
        assert_eq!(fill.waiting(), 0);
        // The thread ended with the queue: the next hand-over starts one.
        assert!(fill.push([30].map(chunk)));
        fill.stop();
        assert!(fill.next_piece(present).is_none());
        assert!(
            !fill.push([31].map(chunk)),
            "nothing is queued after the stop"
        );
        assert_eq!(fill.waiting(), 0);
    }
}
