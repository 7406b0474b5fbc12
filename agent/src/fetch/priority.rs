//! Readers first: the background download yields to on-demand fetches. Each on-demand fetch
//! is counted while it runs ([`ReaderGate::enter`]); a background batch waits while any runs
//! and, before it starts, until reads have been quiet for a while, so that a starting
//! container's burst of reads has the link to itself.

use std::{
    sync::{
        Condvar, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::shutdown::Shutdown;

/// How often waiting background work looks again.
const RECHECK: Duration = Duration::from_millis(50);

/// The on-demand fetches running now, and when the last one ended.
pub(super) struct ReaderGate {
    running: AtomicUsize,
    done: (Mutex<()>, Condvar),
    /// When the last on-demand fetch ended, in ns since `born` (`u64::MAX`: never).
    last_ended_ns: AtomicU64,
    born: Instant,
    /// Set when readers read so much that the background should not yield to them.
    off: std::sync::atomic::AtomicBool,
    /// Bytes fetched for readers (their misses, read-around, prefetch: all but the
    /// background download's), by every fetcher sharing this gate.
    pub(super) reader_bytes: AtomicU64,
    /// The compressed size of what the fetchers sharing this gate serve (0: not known yet).
    pub(super) image_bytes: AtomicU64,
    /// What runs once the gate opens ([`ReaderGate::when_open`]).
    on_open: Mutex<Vec<OnOpen>>,
}

type OnOpen = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for ReaderGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderGate")
            .field("running", &self.running)
            .field("off", &self.off)
            .field("reader_bytes", &self.reader_bytes)
            .field("image_bytes", &self.image_bytes)
            .finish_non_exhaustive()
    }
}

/// Counts an on-demand fetch for as long as it lives.
pub(super) struct OnDemand<'a>(&'a ReaderGate);

impl Drop for OnDemand<'_> {
    fn drop(&mut self) {
        let gate = self.0;
        let now = gate.born.elapsed().as_nanos() as u64;
        gate.last_ended_ns.store(now, Ordering::Release);
        if gate.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            gate.done.1.notify_all();
        }
    }
}

impl ReaderGate {
    pub(super) fn new() -> Self {
        Self {
            running: AtomicUsize::new(0),
            done: (Mutex::new(()), Condvar::new()),
            last_ended_ns: AtomicU64::new(u64::MAX),
            born: Instant::now(),
            off: std::sync::atomic::AtomicBool::new(false),
            reader_bytes: AtomicU64::new(0),
            image_bytes: AtomicU64::new(0),
            on_open: Mutex::new(Vec::new()),
        }
    }

    /// From now on nothing waits for readers; waiting background work goes on at once.
    /// Returns whether it was on until now.
    pub(super) fn open(&self) -> bool {
        let was_on = !self.off.swap(true, Ordering::AcqRel);
        {
            let _guard = crate::sync::lock(&self.done.0);
            self.done.1.notify_all();
        }
        if was_on {
            let hooks = std::mem::take(&mut *crate::sync::lock(&self.on_open));
            for hook in hooks {
                hook();
            }
        }
        was_on
    }

    /// Runs `hook` once the gate opens (at once if it is open).
    pub(super) fn when_open(&self, hook: impl FnOnce() + Send + 'static) {
        let mut hooks = crate::sync::lock(&self.on_open);
        // Checked under the lock `open` takes after setting `off`: a hook is either run
        // here or found there, never missed.
        if !self.is_open() {
            hooks.push(Box::new(hook));
            return;
        }
        drop(hooks);
        hook();
    }

    /// Whether [`ReaderGate::open`] was called.
    pub(super) fn is_open(&self) -> bool {
        self.off.load(Ordering::Acquire)
    }

    /// Marks an on-demand fetch as running until the guard is dropped.
    pub(super) fn enter(&self) -> OnDemand<'_> {
        self.running.fetch_add(1, Ordering::AcqRel);
        OnDemand(self)
    }

    /// On-demand fetches running now.
    pub(super) fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Blocks while on-demand fetches run (bounded by `deadline`).
    pub(super) fn yield_to_readers(&self, deadline: Instant) {
        let (lock, cv) = &self.done;
        let mut guard = crate::sync::lock(lock);
        while self.running() > 0 && !self.is_open() && Instant::now() < deadline {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(RECHECK);
            guard = cv
                .wait_timeout(guard, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Whether an on-demand fetch has run or runs.
    pub(super) fn seen(&self) -> bool {
        self.running() > 0 || self.last_ended_ns.load(Ordering::Acquire) != u64::MAX
    }

    /// Whether none runs and none ended in the last `quiet` (false before any ran).
    pub(super) fn quiet_for(&self, quiet: Duration) -> bool {
        let last = self.last_ended_ns.load(Ordering::Acquire);
        last != u64::MAX
            && self.running() == 0
            && self
                .born
                .elapsed()
                .saturating_sub(Duration::from_nanos(last))
                >= quiet
    }

    /// Waits (until `deadline`) for on-demand reads to go quiet: none running, and none
    /// ended in the last `quiet`.
    pub(super) fn wait_quiet(&self, quiet: Duration, deadline: Instant, stop: &Shutdown) {
        loop {
            let last = self.last_ended_ns.load(Ordering::Acquire);
            let since = (last != u64::MAX).then(|| {
                self.born
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(last))
            });
            let recent = since.is_some_and(|s| s < quiet);
            if (self.running() == 0 && !recent)
                || self.is_open()
                || Instant::now() >= deadline
                || stop.is_triggered()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::ReaderGate;

    #[test]
    fn what_waits_for_the_gate_to_open_runs_once_when_it_opens_or_at_once_after() {
        let gate = ReaderGate::new();
        let ran = Arc::new(AtomicUsize::new(0));
        let count = |ran: &Arc<AtomicUsize>| {
            let ran = ran.clone();
            move || {
                ran.fetch_add(1, Ordering::SeqCst);
            }
        };
        gate.when_open(count(&ran));
        gate.when_open(count(&ran));
        assert_eq!(ran.load(Ordering::SeqCst), 0, "the gate is not open yet");
        assert!(gate.open(), "it was on");
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        assert!(!gate.open(), "opened once only");
        assert_eq!(
            ran.load(Ordering::SeqCst),
            2,
            "a second open runs nothing again"
        );
        gate.when_open(count(&ran));
        assert_eq!(ran.load(Ordering::SeqCst), 3, "open already: at once");
    }
}
