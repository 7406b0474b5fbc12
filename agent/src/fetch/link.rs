//! Guesses take turns on the link: on a link with a round trip to speak of, the bytes in
//! flight are bounded to a few bandwidth-delay products for guesses (read-around windows,
//! libraries' segments and code the loader prefetch warms, a wide walk's requests), which
//! wait in line for room, while readers' own misses, and the requests a narrow loader walk
//! is waiting on, go at once and count.
//!
//! A request shares the link with every answer still arriving, so its wait grows with the
//! bytes in flight ahead of it. A starting program 50 ms from its registry had, unbounded,
//! megabytes of guesses in flight (whole code segments, the first segments of a level of
//! libraries) while the walk's next step waited for a library's 100 KB head and readers'
//! own misses for theirs: 0.1-0.3 s each where the round trip is 0.05 s. A window of a few
//! bandwidth-delay products still keeps the link full. Guesses go in three lines, each in
//! the order its guesses were made: the small requests a wide walk waits on before it can
//! look further (a module's headers, its dynamic section, its libraries' names) ahead of
//! everything ([`Line::Front`]: a 50 ms trace had PHP's module walk behind megabytes of code
//! in line, and the program reaching libraries, abseil's one after another, that no walk had
//! found yet); then what the dynamic loader touches for certain in each library a walk found
//! ([`Line::Middle`]: its first and writable segments, the start of its code, which a 50 ms
//! trace saw faulted at while the library's whole code still waited in line); then the bulk
//! that may never be read ([`Line::Back`]: code fetched whole, read-around windows). A reader that
//! comes to wait for a guess still in line promotes it ([`LinkGate::promote`]). On a near
//! link (loopback, a registry next door) nothing waits: an answer's wait there is its own
//! transfer, and holding a reader's read-around back only slows it. Behind all three, on any
//! link, the idle fill's pieces ([`Line::Idle`], [`super::fill`]) wait for the link to carry
//! nothing at all. The background download is not counted: it yields to readers on its own.
//!
//! The gate also measures the link ([`Bandwidth`]): every answer of every fetcher sharing it,
//! the background download's too, so that the window here, the read-around windows and the
//! code the loader fetches whole are sized by one measure of one link.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

/// The window, in bandwidth-delay products of the link.
pub(super) const WINDOW_BDPS: u64 = 2;
/// The smallest window.
pub(super) const MIN_WINDOW: u64 = 512 << 10;
/// A link whose bandwidth-delay product is below this has no round trip to speak of (5 ms
/// at 100 Mbit/s): guesses are not held back there.
pub(super) const NEAR: u64 = 64 << 10;

/// Where a guess waits in line: each line behind the ones declared before it, a guess
/// behind the others of its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Line {
    /// Small requests a walk waits on before it can look further: ahead of every bulk guess,
    /// in their order.
    Front,
    /// What the dynamic loader touches for certain once it opens a library the walk found:
    /// the first segment (symbols, relocations), the writable ones (what relocation writes),
    /// the start of the code (where the constructors it runs are). Ahead of the bulk guesses
    /// that may never be read.
    Middle,
    /// Bulk guesses (read-around windows, code fetched whole), in their order.
    Back,
    /// The idle fill's pieces ([`crate::fetch::fill`]): each goes only while nothing else is
    /// in flight, and then counts, so the next waits for it.
    Idle,
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

/// The bandwidth of the link, from the recent large responses of every fetcher that shares
/// it (the layers of an image, [`super::ImageReaders`]): a layer whose fetcher has had few
/// answers yet sizes its guesses by what its image's other layers measured, not by
/// [`ASSUMED_RATE`].
///
/// The smaller answers arriving meanwhile share the link uncounted, so the measure reads
/// below the link: PHP's starts measured the bench's 100 Mbit/s link at about 48 Mbit/s
/// through the span index (0 ms, its spans answer in tens of kilobytes) and 68-72 Mbit/s
/// from eStargz (50 ms). What it sizes (read-around windows, the window here, the code
/// the loader fetches whole) was tuned against this measure, not against the link: counting
/// each smaller answer's share of the time large ones were arriving (a trial build, 3 cold
/// starts each, one run) measured 11-13 MB/s and fetched more by the first line; the
/// converted image started 50 ms away later (3.36 s against 3.15 s, 2.5 MB more), the
/// unconverted one level (3.78 s against 3.81 s), and both level at 0 ms.
#[derive(Debug, Default)]
pub(super) struct Bandwidth {
    /// (bytes, asked, answered) of recent successful requests of at least
    /// [`RATE_SAMPLE_BYTES`], newest last.
    samples: VecDeque<(u64, Instant, Instant)>,
    /// Whether the samples have held [`RATE_EVIDENCE`] bytes yet.
    measured: bool,
}

impl Bandwidth {
    /// Counts an answer; true the first time the answers are enough to measure the link.
    fn observe(&mut self, bytes: u64, asked: Instant, answered: Instant) -> bool {
        if bytes < RATE_SAMPLE_BYTES {
            return false;
        }
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((bytes, asked, answered.max(asked)));
        let first =
            !self.measured && self.samples.iter().map(|&(b, ..)| b).sum::<u64>() >= RATE_EVIDENCE;
        self.measured |= first;
        first
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

/// Bytes in flight, the guesses waiting for their turn, and the link's bandwidth.
#[derive(Debug)]
pub(super) struct LinkGate {
    state: Mutex<State>,
    /// Bytes allowed in flight at once (`u64::MAX`: no bound, for a source with no network).
    window: AtomicU64,
    bandwidth: Mutex<Bandwidth>,
}

#[derive(Debug, Default)]
struct State {
    in_flight: u64,
    waiting: VecDeque<Waiter>,
    tickets: u64,
}

impl State {
    /// Whether `bytes` more in `line` may go now: a request larger than the window goes
    /// alone, and one of the idle fill's only onto an empty link.
    fn fits(&self, bytes: u64, line: Line, window: u64) -> bool {
        match line {
            Line::Idle => self.in_flight == 0,
            _ => self.in_flight == 0 || self.in_flight.saturating_add(bytes) <= window,
        }
    }
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    bytes: u64,
    line: Line,
    wake: oneshot::Sender<()>,
}

/// A request's turn: its bytes count as in flight until it is dropped.
#[derive(Debug)]
pub(super) struct Turn {
    gate: Arc<LinkGate>,
    bytes: u64,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.gate.release(self.bytes);
    }
}

/// A guess in line for its turn ([`Queued::ticket`] names it to [`LinkGate::promote`]).
pub(super) struct Queued {
    ticket: u64,
    state: Queue,
}

enum Queue {
    Now(Turn),
    Waiting(Pending),
}

/// A request waiting for its turn; a wait given up (its deadline passed) after the turn was
/// granted hands the turn back.
struct Pending {
    gate: Arc<LinkGate>,
    bytes: u64,
    wake: Option<oneshot::Receiver<()>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut wake) = self.wake.take() {
            wake.close();
            if wake.try_recv().is_ok() {
                self.gate.release(self.bytes);
            }
        }
    }
}

impl Queued {
    pub(super) fn ticket(&self) -> u64 {
        self.ticket
    }

    /// Waits for the turn.
    pub(super) async fn turn(self) -> Turn {
        match self.state {
            Queue::Now(turn) => turn,
            Queue::Waiting(mut pending) => {
                if let Some(wake) = pending.wake.as_mut() {
                    // The gate never drops a waiter unanswered: an error cannot happen here,
                    // and would only mean going without a turn.
                    let _ = wake.await;
                }
                pending.wake = None;
                Turn {
                    gate: pending.gate.clone(),
                    bytes: pending.bytes,
                }
            }
        }
    }
}

impl LinkGate {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            window: AtomicU64::new(u64::MAX),
            bandwidth: Mutex::new(Bandwidth::default()),
        }
    }

    /// Counts an answer of `bytes` asked at `asked` and complete at `answered` towards the
    /// link's bandwidth (answers too small to say anything are left out). True once: for
    /// the answer that makes the answers enough to measure the link.
    pub(super) fn observe(&self, bytes: u64, asked: Instant, answered: Instant) -> bool {
        crate::sync::lock(&self.bandwidth).observe(bytes, asked, answered)
    }

    /// The link's bandwidth in bytes per second as measured so far, `rtt` away.
    pub(super) fn rate(&self, rtt: Duration) -> f64 {
        crate::sync::lock(&self.bandwidth).rate(rtt)
    }

    /// The bytes the link carries in a round trip of `rtt`, at the bandwidth measured so far.
    pub(super) fn bdp(&self, rtt: Duration) -> u64 {
        crate::sync::lock(&self.bandwidth).bdp(rtt)
    }

    /// Sets the window from the link's bandwidth-delay product: no bound for a source with
    /// no network (`None`) or a link with no round trip to speak of (below [`NEAR`]), where
    /// an answer's wait is its own transfer and nothing is gained by holding guesses back.
    pub(super) fn set_window(&self, bdp: Option<u64>) {
        let window = bdp.filter(|&bdp| bdp >= NEAR).map_or(u64::MAX, |bdp| {
            bdp.saturating_mul(WINDOW_BDPS).max(MIN_WINDOW)
        });
        self.window.store(window, Ordering::Release);
    }

    /// The largest guess asked for in one request: half the window (no bound where the
    /// window has none).
    pub(super) fn largest_guess(&self) -> u64 {
        match self.window.load(Ordering::Acquire) {
            u64::MAX => u64::MAX,
            window => window / 2,
        }
    }

    /// A request that does not wait (a reader's, or one a walk is waiting on): it goes now,
    /// and its bytes count, so that guesses wait for it.
    pub(super) fn enter(self: &Arc<Self>, bytes: u64) -> Turn {
        crate::sync::lock(&self.state).in_flight += bytes;
        Turn {
            gate: self.clone(),
            bytes,
        }
    }

    /// Puts a guess of `bytes` in `line`: it goes at once while the window has room and no
    /// guess it would pass is waiting, else after those before it (after the guesses of its
    /// own line and of the lines ahead of it only).
    pub(super) fn queue(self: &Arc<Self>, bytes: u64, line: Line) -> Queued {
        let window = self.window.load(Ordering::Acquire);
        let mut state = crate::sync::lock(&self.state);
        state.tickets += 1;
        let ticket = state.tickets;
        // Where it waits: behind every guess of its line or before it.
        let place = state.waiting.partition_point(|w| w.line <= line);
        if place == 0 && state.fits(bytes, line, window) {
            state.in_flight += bytes;
            return Queued {
                ticket,
                state: Queue::Now(Turn {
                    gate: self.clone(),
                    bytes,
                }),
            };
        }
        let (tx, rx) = oneshot::channel();
        state.waiting.insert(
            place,
            Waiter {
                ticket,
                bytes,
                line,
                wake: tx,
            },
        );
        Queued {
            ticket,
            state: Queue::Waiting(Pending {
                gate: self.clone(),
                bytes,
                wake: Some(rx),
            }),
        }
    }

    /// A reader waits for what guess `ticket` fetches: it goes now, if it still waits.
    pub(super) fn promote(&self, ticket: u64) {
        let mut state = crate::sync::lock(&self.state);
        let Some(at) = state.waiting.iter().position(|w| w.ticket == ticket) else {
            return;
        };
        if let Some(waiter) = state.waiting.remove(at)
            && waiter.wake.send(()).is_ok()
        {
            state.in_flight += waiter.bytes;
        }
    }

    /// Bytes in flight now.
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> u64 {
        crate::sync::lock(&self.state).in_flight
    }

    fn release(&self, bytes: u64) {
        let window = self.window.load(Ordering::Acquire);
        let mut state = crate::sync::lock(&self.state);
        state.in_flight = state.in_flight.saturating_sub(bytes);
        while let Some(next) = state.waiting.front() {
            if !state.fits(next.bytes, next.line, window) {
                break;
            }
            let Some(next) = state.waiting.pop_front() else {
                break;
            };
            // A waiter that gave up is skipped; one that is still there has its turn.
            if next.wake.send(()).is_ok() {
                state.in_flight += next.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ms` milliseconds after `base`.
    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    const MS_50: Duration = Duration::from_millis(50);

    #[test]
    fn the_bandwidth_is_what_large_answers_delivered_after_their_round_trip() {
        let gate = LinkGate::new();
        // Before a large answer, 100 Mbit/s is assumed: 625 kB in 50 ms.
        assert_eq!(gate.bdp(MS_50), 625_000);
        // 1 MB in 50 ms + 100 ms and then 3 MB in 50 ms + 300 ms: 10 MB/s. A small answer
        // does not count.
        let t = Instant::now();
        gate.observe(4096, t, at(t, 50));
        gate.observe(1_000_000, t, at(t, 150));
        gate.observe(3_000_000, at(t, 200), at(t, 550));
        assert_eq!(gate.bdp(MS_50), 500_000);
        // Half a millisecond away the same answers took 8 MB/s: 4 kB in a round trip.
        assert_eq!(gate.bdp(Duration::from_micros(500)), 4_008);
    }

    #[test]
    fn answers_that_share_the_link_measure_the_link_not_their_share_of_it() {
        let gate = LinkGate::new();
        // Four 1 MB answers arriving together over 400 ms, a round trip after they were
        // asked: the link carried 10 MB/s (each one alone got a quarter of it).
        let t = Instant::now();
        for _ in 0..4 {
            gate.observe(1_000_000, t, at(t, 450));
        }
        assert_eq!(gate.bdp(MS_50), 500_000);
        // Then, overlapping the last 100 ms of those, 2 MB more ending 100 ms later: 6 MB
        // over 500 ms of arriving.
        gate.observe(2_000_000, at(t, 300), at(t, 550));
        assert_eq!(gate.bdp(MS_50), 600_000);
        // An answer that came back faster than the round trip counts one millisecond.
        let fresh = LinkGate::new();
        fresh.observe(4_000_000, t, at(t, 20));
        assert_eq!(fresh.bdp(MS_50), 200_000_000);
    }

    #[test]
    fn a_few_answers_are_no_measure_of_the_link() {
        let gate = LinkGate::new();
        // The first answers of a start, which shared the link with larger ones still
        // arriving: 1.5 MB in 450 ms would be 3.75 MB/s. Until 4 MB have been measured,
        // 100 Mbit/s stands.
        let t = Instant::now();
        assert!(!gate.observe(800_000, t, at(t, 450)));
        assert!(!gate.observe(700_000, t, at(t, 450)));
        assert_eq!(gate.bdp(MS_50), 625_000);
        assert!(!gate.observe(2_499_999, t, at(t, 450)));
        assert_eq!(gate.bdp(MS_50), 625_000);
        // Another answer, and they measure it: 4.1 MB over 400 ms. The gate says so once.
        assert!(gate.observe(RATE_SAMPLE_BYTES, at(t, 300), at(t, 450)));
        assert_eq!(RATE_SAMPLE_BYTES, 131_072);
        assert_eq!(gate.bdp(MS_50), 516_383); // 4,131,071 bytes / 0.4 s * 0.05 s
        assert!(!gate.observe(RATE_SAMPLE_BYTES, at(t, 400), at(t, 450)));
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime for the test")
    }

    /// Queues a guess of `bytes` in `line` and a task that, once it has its turn, says
    /// `name` on `order` and holds the turn for 10 ms.
    fn in_line(
        gate: &Arc<LinkGate>,
        (bytes, line): (u64, Line),
        name: &'static str,
        order: &tokio::sync::mpsc::UnboundedSender<&'static str>,
    ) -> tokio::task::JoinHandle<()> {
        let queued = gate.queue(bytes, line);
        let order = order.clone();
        tokio::spawn(async move {
            let turn = queued.turn().await;
            order.send(name).expect("the test listens");
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(turn);
        })
    }

    #[test]
    fn guesses_wait_for_room_in_the_window_in_their_order_and_others_never_wait() {
        runtime().block_on(async {
            let gate = Arc::new(LinkGate::new());
            gate.set_window(Some(NEAR)); // window: MIN_WINDOW
            let reader = gate.enter(MIN_WINDOW);
            // A reader's request counts, and nothing else fits beside it...
            let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
            let spawn = |bytes, name| in_line(&gate, (bytes, Line::Back), name, &order_tx);
            let first = spawn(450 << 10, "first");
            let second = spawn(100 << 10, "second");
            let third = spawn(100 << 10, "third");
            tokio::task::yield_now().await;
            assert_eq!(gate.in_flight(), MIN_WINDOW, "both guesses wait");
            // ...but another reader's request goes at once.
            let other = gate.enter(1 << 20);
            assert_eq!(gate.in_flight(), MIN_WINDOW + (1 << 20));
            drop((reader, other));
            // In their order, though the second is smaller, and one at a time: they do not
            // fit beside each other.
            assert_eq!(order.recv().await, Some("first"));
            assert_eq!(gate.in_flight(), 450 << 10);
            assert_eq!(order.recv().await, Some("second"));
            // The third fits beside the second.
            assert_eq!(order.recv().await, Some("third"));
            first.await.expect("no panic");
            second.await.expect("no panic");
            third.await.expect("no panic");
            assert_eq!(gate.in_flight(), 0, "every turn was handed back");
        });
    }

    #[test]
    fn a_walks_requests_then_segments_go_ahead_of_bulk_guesses_each_in_their_order() {
        runtime().block_on(async {
            let gate = Arc::new(LinkGate::new());
            gate.set_window(Some(NEAR)); // window: MIN_WINDOW
            let reader = gate.enter(MIN_WINDOW);
            let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
            // Each fills more than half the window: they go one at a time.
            let spawn = |line, name| in_line(&gate, (300 << 10, line), name, &order_tx);
            let tasks = [
                spawn(Line::Back, "code"),
                spawn(Line::Middle, "first segment"),
                spawn(Line::Front, "first head"),
                spawn(Line::Back, "read-around"),
                spawn(Line::Middle, "second segment"),
                spawn(Line::Front, "second head"),
            ];
            tokio::task::yield_now().await;
            drop(reader);
            for expected in [
                "first head",
                "second head",
                "first segment",
                "second segment",
                "code",
                "read-around",
            ] {
                assert_eq!(order.recv().await, Some(expected));
            }
            for task in tasks {
                task.await.expect("no panic");
            }
            // A front request that fits goes at once, even past a bulk guess that does not.
            let ahead = gate.queue(300 << 10, Line::Back).turn().await;
            let bulk = gate.queue(300 << 10, Line::Back);
            assert!(matches!(bulk.state, Queue::Waiting(_)), "no room for it");
            let head = gate.queue(100 << 10, Line::Front);
            assert!(matches!(head.state, Queue::Now(_)), "room for this one");
            // Nothing passes a front request waiting, however small.
            let second = gate.queue(200 << 10, Line::Front);
            assert!(matches!(second.state, Queue::Waiting(_)));
            let small = gate.queue(1, Line::Back);
            assert!(matches!(small.state, Queue::Waiting(_)));
            drop((ahead, bulk, head, second, small));
            assert_eq!(gate.in_flight(), 0);
        });
    }

    #[test]
    fn the_idle_fill_goes_only_onto_an_empty_link_and_nothing_waits_for_it() {
        runtime().block_on(async {
            let gate = Arc::new(LinkGate::new());
            // No bound on a near link, but for the idle line.
            gate.set_window(None);
            let reader = gate.enter(4096);
            let piece = gate.queue(64 << 10, Line::Idle);
            assert!(
                matches!(piece.state, Queue::Waiting(_)),
                "a reader's request is in flight"
            );
            // Guesses and readers go past the waiting piece.
            let guess = gate.queue(1 << 20, Line::Back);
            assert!(matches!(guess.state, Queue::Now(_)));
            let other = gate.enter(4096);
            let piece = tokio::spawn(piece.turn());
            drop((reader, guess));
            tokio::task::yield_now().await;
            assert!(!piece.is_finished(), "one request is still in flight");
            drop(other);
            let turn = tokio::time::timeout(Duration::from_secs(5), piece)
                .await
                .expect("the piece goes once the link is empty")
                .expect("no panic");
            assert_eq!(gate.in_flight(), 64 << 10);
            // The next piece waits for this one; a reader does not.
            let next = gate.queue(64 << 10, Line::Idle);
            assert!(matches!(next.state, Queue::Waiting(_)));
            let reader = gate.enter(4096);
            drop((turn, reader));
            let next = tokio::time::timeout(Duration::from_secs(5), next.turn())
                .await
                .expect("the next piece goes once both ended");
            drop(next);
            assert_eq!(gate.in_flight(), 0);
        });
    }

    #[test]
    fn a_promoted_guess_goes_at_once() {
        runtime().block_on(async {
            let gate = Arc::new(LinkGate::new());
            gate.set_window(Some(NEAR));
            let ahead = gate.queue(MIN_WINDOW, Line::Back).turn().await;
            let behind = gate.queue(MIN_WINDOW, Line::Back);
            let promoted = gate.queue(MIN_WINDOW, Line::Back);
            gate.promote(promoted.ticket());
            let turn = tokio::time::timeout(Duration::from_secs(5), promoted.turn())
                .await
                .expect("a promoted guess does not wait for room");
            assert_eq!(gate.in_flight(), 2 * MIN_WINDOW);
            gate.promote(behind.ticket() + 100); // no such ticket: nothing happens
            drop((ahead, turn));
            let behind = tokio::time::timeout(Duration::from_secs(5), behind.turn())
                .await
                .expect("the one behind goes once there is room");
            assert_eq!(gate.in_flight(), MIN_WINDOW);
            drop(behind);
            assert_eq!(gate.in_flight(), 0);
        });
    }

    #[test]
    fn a_request_larger_than_the_window_goes_and_a_near_link_or_none_means_no_bound() {
        runtime().block_on(async {
            let gate = Arc::new(LinkGate::new());
            gate.set_window(Some(1 << 20)); // window: 2 MiB
            let huge = gate.queue(8 << 20, Line::Back).turn().await;
            assert_eq!(gate.in_flight(), 8 << 20);
            drop(huge);
            gate.set_window(Some(NEAR - 1));
            let a = gate.queue(64 << 20, Line::Back).turn().await;
            let b = gate.queue(64 << 20, Line::Back).turn().await;
            drop((a, b));
            gate.set_window(None);
            let a = gate.queue(64 << 20, Line::Back).turn().await;
            let b = gate.queue(64 << 20, Line::Back).turn().await;
            assert_eq!(gate.in_flight(), 128 << 20);
            drop((a, b));
            assert_eq!(gate.in_flight(), 0);
        });
    }

    #[test]
    fn a_wait_given_up_hands_its_turn_back() {
        runtime().block_on(async {
            let gate = Arc::new(LinkGate::new());
            gate.set_window(Some(NEAR));
            let first = gate.queue(MIN_WINDOW, Line::Back).turn().await;
            let gave_up = tokio::time::timeout(
                Duration::from_millis(10),
                gate.queue(MIN_WINDOW, Line::Back).turn(),
            )
            .await;
            assert!(
                gave_up.is_err(),
                "no room: the second waits out its deadline"
            );
            drop(first);
            assert_eq!(
                gate.in_flight(),
                0,
                "the waiter that gave up was skipped, not handed a turn it keeps"
            );
        });
    }
}
