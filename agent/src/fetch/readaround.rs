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
//! carries the files beside them that the start never opens), measured: the round trip is the source's shortest
//! recent time to a first byte ([`crate::registry::BlobSource::round_trip`]), the bandwidth
//! what the fetcher's own large responses delivered together over the time they were
//! arriving (each with that round trip taken out: responses that share the link count as
//! the link's rate, not as each one's share of it), once they are enough to tell
//! ([`RATE_EVIDENCE`]; 100 Mbit/s is assumed until then). On loopback the window shrinks to
//! almost nothing, for a source with no network (a local layout) it is nothing, and 50 ms
//! away at 100 Mbit/s it is about 310 kB.
//!
//! A reader whose misses land where the last window ended is reading the layer in order: its
//! window doubles on each such miss, as the kernel's readahead does. Within one file (a large
//! data file, a model's weights) up to the cap; across files only up to
//! [`CROSS_FILE_GROWTH`] times the base window: a start that loads a directory of modules in
//! name order also misses in blob order, file after file, and each doubling saves it round
//! trips, but it wants what it loads, not the megabytes after it. (A tree read whole is
//! served by the background download going to full speed once most of the image was fetched
//! for it, see [`super::GREEDY_SHARE`].)

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

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

/// Requests remembered for the link's figures.
const SAMPLES: usize = 64;
/// Responses at least this large say something about bandwidth.
const RATE_SAMPLE_BYTES: u64 = 128 << 10;
/// The bandwidth assumed until responses have measured it: 100 Mbit/s.
pub(crate) const ASSUMED_RATE: f64 = 12.5e6;
/// Bytes of large responses it takes to measure the bandwidth (a third of a second at
/// 100 Mbit/s). The first responses of a start share the link with larger ones still
/// arriving, which are not counted yet: a 50 ms trace of PHP's start had the first few
/// measure 1.5 MB/s in one run and 39 MB/s in another, on a 12.5 MB/s link, and the
/// libraries whose code the loader prefetch sizes by it were left to their misses in the
/// first (3.95 s to the first log line against 3.30 s).
const RATE_EVIDENCE: u64 = 4_000_000;
/// A miss this close after where the last window ended continues a read in blob order.
const SEQUENTIAL_SLACK: u64 = 64 << 10;
/// A read in blob order across files grows its window to at most this many base windows.
const CROSS_FILE_GROWTH: u64 = 8;

/// The bandwidth of the link to one source, from recent large responses.
#[derive(Debug, Default)]
struct Link {
    /// (bytes, asked, answered) of recent successful requests of at least
    /// [`RATE_SAMPLE_BYTES`], newest last.
    samples: VecDeque<(u64, Instant, Instant)>,
}

impl Link {
    fn observe(&mut self, bytes: u64, asked: Instant, answered: Instant) {
        if bytes < RATE_SAMPLE_BYTES {
            return;
        }
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((bytes, asked, answered.max(asked)));
    }

    /// Bytes per second the recent large responses delivered together over the time any of
    /// them was arriving: each from a round trip after it was asked (at least a millisecond
    /// before its end: a burst the link let through at once does not count as its rate),
    /// overlapping ones counted once; [`ASSUMED_RATE`] until they hold [`RATE_EVIDENCE`]
    /// bytes.
    fn rate(&self, rtt: Duration) -> f64 {
        let mut arriving: Vec<(Instant, Instant)> = self
            .samples
            .iter()
            .map(|&(_, asked, answered)| {
                let last_ms = answered
                    .checked_sub(Duration::from_millis(1))
                    .unwrap_or(answered);
                let first_byte = (asked + rtt).min(last_ms);
                (first_byte.max(asked), answered)
            })
            .collect();
        arriving.sort_unstable();
        let mut busy = Duration::ZERO;
        let mut until: Option<Instant> = None;
        for (from, to) in arriving {
            let from = until.map_or(from, |u| from.max(u));
            if to > from {
                busy += to - from;
            }
            until = Some(until.map_or(to, |u| u.max(to)));
        }
        let bytes: u64 = self.samples.iter().map(|&(b, ..)| b).sum();
        if bytes < RATE_EVIDENCE || busy.is_zero() {
            ASSUMED_RATE
        } else {
            bytes as f64 / busy.as_secs_f64()
        }
    }

    /// Bytes the link carries in one round trip.
    fn bdp(&self, rtt: Duration) -> u64 {
        (rtt.as_secs_f64() * self.rate(rtt)) as u64
    }
}

/// Where the last read-around window of a blob ended, how large it was, and the file
/// whose miss it followed.
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
    link: Mutex<Link>,
    streams: Mutex<HashMap<Digest, Stream>>,
}

impl ReadAround {
    pub(super) fn new(config: ReadAroundConfig) -> Self {
        Self {
            config,
            link: Mutex::new(Link::default()),
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// The largest window.
    pub(super) fn max_window(&self) -> u64 {
        self.config.max_window
    }

    /// A request asked at `asked` was answered with `bytes` at `answered`.
    pub(super) fn observe(&self, bytes: u64, asked: Instant, answered: Instant) {
        crate::sync::lock(&self.link).observe(bytes, asked, answered);
    }

    /// The link's bandwidth-delay product for round trip `rtt`, bandwidth as measured so far.
    pub(super) fn bdp(&self, rtt: Duration) -> u64 {
        crate::sync::lock(&self.link).bdp(rtt)
    }

    /// Bytes to fetch after `end` for a reader of `file` (an index of the layer's files) that
    /// missed `start..end` of `blob`, over a link with round trip `rtt` (`None`: no network,
    /// no window). [`ReadAround::covered`] then says where the fetch really ended.
    pub(super) fn window(
        &self,
        blob: Digest,
        file: usize,
        (start, end): (u64, u64),
        rtt: Option<Duration>,
    ) -> u64 {
        let Some(rtt) = rtt.filter(|_| self.config.bdp_multiple > 0.0) else {
            return 0;
        };
        let base =
            ((self.bdp(rtt) as f64 * self.config.bdp_multiple) as u64).min(self.config.max_window);
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

    const MS_50: Option<Duration> = Some(Duration::from_millis(50));

    /// `ms` milliseconds after `base`.
    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn no_window_without_a_network_or_when_off() {
        let on = ReadAround::new(ReadAroundConfig::default());
        assert_eq!(on.window(blob(), 7, (0, 100), None), 0);
        let off = ReadAround::new(ReadAroundConfig {
            bdp_multiple: 0.0,
            ..Default::default()
        });
        assert_eq!(off.window(blob(), 7, (0, 100), MS_50), 0);
    }

    #[test]
    fn the_window_is_a_multiple_of_the_measured_bandwidth_delay_product() {
        let ra = ReadAround::new(ReadAroundConfig {
            bdp_multiple: 2.0,
            ..Default::default()
        });
        // Before a large response, 100 Mbit/s is assumed: 625 kB in 50 ms.
        assert_eq!(ra.bdp(Duration::from_millis(50)), 625_000);
        // 1 MB in 50 ms + 100 ms and then 3 MB in 50 ms + 300 ms: 10 MB/s. A small answer
        // does not count.
        let t = Instant::now();
        ra.observe(4096, t, at(t, 50));
        ra.observe(1_000_000, t, at(t, 150));
        ra.observe(3_000_000, at(t, 200), at(t, 550));
        assert_eq!(ra.bdp(Duration::from_millis(50)), 500_000);
        assert_eq!(ra.window(blob(), 7, (0, 4096), MS_50), 1_000_000);
        // A miss somewhere else starts over at the base window.
        assert_eq!(
            ra.window(blob(), 7, (50_000_000, 50_004_096), MS_50),
            1_000_000
        );
        // Half a millisecond away (the responses above then took 8 MB/s), the window is
        // almost nothing.
        let near = Some(Duration::from_micros(500));
        assert_eq!(ra.window(blob(), 7, (0, 4096), near), 8_016);
    }

    #[test]
    fn responses_that_share_the_link_measure_the_link_not_their_share_of_it() {
        let ra = ReadAround::new(ReadAroundConfig::default());
        let rtt = Duration::from_millis(50);
        // Four 1 MB answers arriving together over 400 ms, a round trip after they were
        // asked: the link carried 10 MB/s (each one alone got a quarter of it).
        let t = Instant::now();
        for _ in 0..4 {
            ra.observe(1_000_000, t, at(t, 450));
        }
        assert_eq!(ra.bdp(rtt), 500_000);
        // Then, overlapping the last 100 ms of those, 2 MB more ending 100 ms later: 6 MB
        // over 500 ms of arriving.
        ra.observe(2_000_000, at(t, 300), at(t, 550));
        assert_eq!(ra.bdp(rtt), 600_000);
        // An answer that came back faster than the round trip counts one millisecond.
        let fresh = ReadAround::new(ReadAroundConfig::default());
        fresh.observe(4_000_000, t, at(t, 20));
        assert_eq!(fresh.bdp(rtt), 200_000_000);
    }

    #[test]
    fn a_few_responses_are_no_measure_of_the_link() {
        let ra = ReadAround::new(ReadAroundConfig::default());
        let rtt = Duration::from_millis(50);
        // The first answers of a start, which shared the link with larger ones still
        // arriving: 1.5 MB in 450 ms would be 3.75 MB/s. Until 4 MB have been measured,
        // 100 Mbit/s stands.
        let t = Instant::now();
        ra.observe(800_000, t, at(t, 450));
        ra.observe(700_000, t, at(t, 450));
        assert_eq!(ra.bdp(rtt), 625_000);
        ra.observe(2_499_999, t, at(t, 450));
        assert_eq!(ra.bdp(rtt), 625_000);
        // Another answer, and they measure it: 4.1 MB over 400 ms.
        ra.observe(RATE_SAMPLE_BYTES, at(t, 300), at(t, 450));
        assert_eq!(RATE_SAMPLE_BYTES, 131_072);
        assert_eq!(ra.bdp(rtt), 516_383); // 4,131,071 bytes / 0.4 s * 0.05 s
    }

    #[test]
    fn misses_through_a_file_double_the_window_up_to_the_cap() {
        let ra = ReadAround::new(ReadAroundConfig {
            bdp_multiple: 1.0,
            max_window: 4 << 20,
        });
        let rtt = Some(Duration::from_millis(10));
        let t = Instant::now();
        ra.observe(4_000_000, t, at(t, 410));
        let base = ra.window(blob(), 7, (0, 1000), rtt);
        assert_eq!(base, 100_000);
        // The window's last chunk ended a little after the window.
        ra.covered(blob(), 1000 + base + 500);
        let mut at = 1000 + base + 500 + 700;
        let mut windows = Vec::new();
        for _ in 0..8 {
            let w = ra.window(blob(), 7, (at, at + 1000), rtt);
            windows.push(w);
            at += 1000 + w;
        }
        assert_eq!(windows[0], 200_000);
        assert_eq!(windows[1], 400_000);
        assert_eq!(windows[7], 4 << 20);
        // Another blob keeps its own state.
        assert_eq!(
            ra.window(Digest::of(b"other"), 7, (at, at + 1000), rtt),
            base
        );
        // A miss inside the last window, or far after it, is no read in order.
        assert_eq!(ra.window(blob(), 7, (at - 10, at), rtt), base);
        let far = at + base + (1 << 20);
        assert_eq!(ra.window(blob(), 7, (far, far + 1000), rtt), base);
        // File after file where the windows ended: growing, to eight base windows only.
        let mut at = far + 1000 + base;
        let mut windows = Vec::new();
        for file in 8..14 {
            let w = ra.window(blob(), file, (at, at + 1000), rtt);
            windows.push(w);
            at += 1000 + w;
        }
        assert_eq!(
            windows,
            [200_000, 400_000, 800_000, 800_000, 800_000, 800_000]
        );
    }
}
