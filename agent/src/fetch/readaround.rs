//! Read-around: when a reader misses, also fetch what follows its chunks in the blob, in a
//! request of its own that runs beside the reader's.
//!
//! A starting container opens one file after another (the dynamic loader, then each library,
//! then each module), and each miss costs a round trip to the registry. Files read together
//! were usually written together, so they sit next to each other in the layer. The bytes the
//! link can carry while one request waits for its answer (the bandwidth-delay product) are
//! nearly free: fetching them beside a miss costs about one round trip of link time and saves
//! a round trip for every later miss they cover. So the window after a miss is a share of
//! the bandwidth-delay product (half of one by default: the libraries a program loads, and
//! their code, are fetched by `fs::loader`, which knows them, and a wider window mostly
//! carries the files beside them that the start never opens), as the link measured it
//! ([`super::link::Bandwidth`]: the source's round trip, and the rate the large responses of
//! every fetcher on the link delivered together). On loopback the window shrinks to almost
//! nothing, for a source with no network (a local layout) it is nothing, and 50 ms away at
//! 100 Mbit/s it is about 310 kB.
//!
//! A reader whose misses land where the last window ended is reading the layer in order: its
//! window doubles on each such miss, as the kernel's readahead does. Within one file (a large
//! data file, a model's weights) up to the cap; across files only up to
//! [`CROSS_FILE_GROWTH`] times the base window: a start that loads a directory of modules in
//! name order also misses in blob order, file after file, and each doubling saves it round
//! trips, but it wants what it loads, not the megabytes after it. (A tree read whole is
//! served by the background download going to full speed once most of the image was fetched
//! for it, see [`super::GREEDY_SHARE`].)

use std::{collections::HashMap, sync::Mutex};

use crate::oci::digest::Digest;

/// How read-around sizes its windows.
#[derive(Clone, Copy, Debug)]
pub struct ReadAroundConfig {
    /// The window after a miss, in bandwidth-delay products of the link (0: off).
    pub bdp_multiple: f64,
    /// Largest window, also for readers that read in blob order.
    pub max_window: u64,
}

impl Default for ReadAroundConfig {
    fn default() -> Self {
        // Half a product by `bench e2e` (PHP's start 50 ms away, defaults otherwise, cold
        // starts of 0.5, 1 and 2 alternating in one run, 3 each): 2.89 s (2.88-2.89) against
        // 2.98 s (2.88-3.42) with 1 and 3.04 s (2.96-3.08) with 2, 26.5-27.3 MB by the first
        // line against 27.1-30.5 and 28.3-29.3 MB. The loader prefetch fetches the libraries
        // and their code a start loads, and the window beyond a miss mostly carried the files
        // next to them that it never opens, on a link that was the start's bottleneck. Before
        // the loader prefetch fetched code, 2 beat 4 (2.18 / 3.73 / 5.84 s at 0 / 20 / 50 ms
        // against 2.33 / 3.97 / 5.73 s), and before the loader prefetch, 4 beat 1 by 25 %.
        Self {
            bdp_multiple: 0.5,
            max_window: 16 << 20,
        }
    }
}

/// A miss this close after where the last window ended continues a read in blob order.
const SEQUENTIAL_SLACK: u64 = 64 << 10;
/// A read in blob order across files grows its window to at most this many base windows.
const CROSS_FILE_GROWTH: u64 = 8;

#[derive(Clone, Copy, Debug)]
struct Stream {
    end: u64,
    window: u64,
    file: usize,
}

/// Read-around state of one fetcher.
#[derive(Debug)]
pub(super) struct ReadAround {
    config: ReadAroundConfig,
    streams: Mutex<HashMap<Digest, Stream>>,
}

impl ReadAround {
    pub(super) fn new(config: ReadAroundConfig) -> Self {
        Self {
            config,
            streams: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn max_window(&self) -> u64 {
        self.config.max_window
    }

    /// The window after a miss of `(start, end)` by a reader of `file`, on a link whose
    /// bandwidth-delay product is `bdp` (`None`: a source with no network, no window).
    pub(super) fn window(
        &self,
        blob: Digest,
        file: usize,
        (start, end): (u64, u64),
        bdp: Option<u64>,
    ) -> u64 {
        let Some(bdp) = bdp.filter(|_| self.config.bdp_multiple > 0.0) else {
            return 0;
        };
        let base = ((bdp as f64 * self.config.bdp_multiple) as u64).min(self.config.max_window);
        let mut streams = crate::sync::lock(&self.streams);
        let window = match streams.get(&blob) {
            Some(s) if start >= s.end && start - s.end <= SEQUENTIAL_SLACK => {
                let cap = if s.file == file {
                    self.config.max_window
                } else {
                    base.saturating_mul(CROSS_FILE_GROWTH)
                        .min(self.config.max_window)
                };
                (s.window.max(base) * 2).min(cap)
            }
            _ => base,
        };
        streams.insert(
            blob,
            Stream {
                end: end + window,
                window,
                file,
            },
        );
        window
    }

    /// The window after a miss of `blob` ended at `end` (the end of its last chunk): a reader
    /// in blob order misses next right there.
    pub(super) fn covered(&self, blob: Digest, end: u64) {
        if let Some(s) = crate::sync::lock(&self.streams).get_mut(&blob) {
            s.end = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> Digest {
        Digest::of(b"blob")
    }

    /// 10 MB/s, 50 ms away.
    const BDP_50_MS: Option<u64> = Some(500_000);

    #[test]
    fn no_window_without_a_network_or_when_off() {
        let on = ReadAround::new(ReadAroundConfig::default());
        assert_eq!(on.window(blob(), 7, (0, 100), None), 0);
        let off = ReadAround::new(ReadAroundConfig {
            bdp_multiple: 0.0,
            ..Default::default()
        });
        assert_eq!(off.window(blob(), 7, (0, 100), BDP_50_MS), 0);
    }

    #[test]
    fn the_window_is_a_multiple_of_the_bandwidth_delay_product() {
        let ra = ReadAround::new(ReadAroundConfig {
            bdp_multiple: 2.0,
            ..Default::default()
        });
        assert_eq!(ra.window(blob(), 7, (0, 4096), BDP_50_MS), 1_000_000);
        // A miss somewhere else starts over at the base window.
        assert_eq!(
            ra.window(blob(), 7, (50_000_000, 50_004_096), BDP_50_MS),
            1_000_000
        );
        // Half a millisecond away at 8 MB/s, the window is almost nothing.
        assert_eq!(ra.window(blob(), 7, (0, 4096), Some(4_008)), 8_016);
        // And never more than the cap.
        let capped = ReadAround::new(ReadAroundConfig {
            bdp_multiple: 2.0,
            max_window: 600_000,
        });
        assert_eq!(capped.window(blob(), 7, (0, 4096), BDP_50_MS), 600_000);
    }

    #[test]
    fn misses_through_a_file_double_the_window_up_to_the_cap() {
        let ra = ReadAround::new(ReadAroundConfig {
            bdp_multiple: 1.0,
            max_window: 4 << 20,
        });
        // 10 MB/s, 10 ms away.
        let bdp = Some(100_000);
        let base = ra.window(blob(), 7, (0, 1000), bdp);
        assert_eq!(base, 100_000);
        // The window's last chunk ended a little after the window.
        ra.covered(blob(), 1000 + base + 500);
        let mut at = 1000 + base + 500 + 700;
        let mut windows = Vec::new();
        for _ in 0..8 {
            let w = ra.window(blob(), 7, (at, at + 1000), bdp);
            windows.push(w);
            at += 1000 + w;
        }
        assert_eq!(windows[0], 200_000);
        assert_eq!(windows[1], 400_000);
        assert_eq!(windows[7], 4 << 20);
        // Another blob keeps its own state.
        assert_eq!(
            ra.window(Digest::of(b"other"), 7, (at, at + 1000), bdp),
            base
        );
        // A miss inside the last window, or far after it, is no read in order.
        assert_eq!(ra.window(blob(), 7, (at - 10, at), bdp), base);
        let far = at + base + (1 << 20);
        assert_eq!(ra.window(blob(), 7, (far, far + 1000), bdp), base);
        // File after file where the windows ended: growing, to eight base windows only.
        let mut at = far + 1000 + base;
        let mut windows = Vec::new();
        for file in 8..14 {
            let w = ra.window(blob(), file, (at, at + 1000), bdp);
            windows.push(w);
            at += 1000 + w;
        }
        assert_eq!(
            windows,
            [200_000, 400_000, 800_000, 800_000, 800_000, 800_000]
        );
    }
}
