//! One memory budget for the whole agent: every fetcher's chunk bytes in memory — received and
//! decompressed by a range request, kept in a fetcher's recent-chunks cache, queued for the
//! cache writer — are leased from it, however many layers are mounted. A node running many
//! lazy images then holds at most the budget in chunk data, not a share per layer.
//!
//! The budget is two pools ([`Memory`]): half for fetches in flight, half for chunks kept
//! (recent chunks, queued writes). Kept chunks are given back only when their cache drops
//! them, so they never take what a fetch waits for. Fetches wait for their lease (up to
//! their deadline): a fetch larger than its whole pool waits until it can have all of it, so
//! a hostile 64 MiB chunk is fetched alone, never beside others past the bound. Each fetch
//! takes one lease for everything it asks for, so no fetch holds part of the pool while
//! waiting for more. Keeping in memory and queueing for the writer only try: without room, a
//! chunk is not kept (it is on disk or comes again) and is written on the caller's thread.
//! The background download leases only below three quarters of the fetch pool
//! ([`BACKGROUND_SHARE`]), so readers never wait behind it.

use std::{
    sync::{
        Arc, Condvar, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

/// The budget when the agent sets none: well under the DaemonSet's 512 MiB memory limit,
/// beside the TOCs, the runtime and the probes.
pub const DEFAULT_BYTES: u64 = 256 << 20;

/// The part of the budget the background download may lease; the rest is the readers'.
pub const BACKGROUND_SHARE: f64 = 0.75;

/// What the budget saw, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct BudgetStats {
    /// The most ever leased at once.
    pub peak: AtomicU64,
    /// Fetches that waited for room.
    pub waits: AtomicU64,
    /// Fetches whose deadline passed while they waited.
    pub timeouts: AtomicU64,
}

/// Bytes leased out of a fixed total.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
    pub stats: BudgetStats,
}

/// Bytes taken from a budget; given back when dropped.
#[derive(Debug)]
pub struct Lease {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut used = crate::sync::lock(&self.budget.used);
        *used = used.saturating_sub(self.bytes);
        drop(used);
        self.budget.freed.notify_all();
    }
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            used: Mutex::new(0),
            freed: Condvar::new(),
            stats: BudgetStats::default(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes leased now.
    pub fn used(&self) -> u64 {
        *crate::sync::lock(&self.used)
    }

    /// `bytes` (at most the whole budget), waiting until they are free; `None` if `deadline`
    /// passes first.
    pub fn acquire(self: &Arc<Self>, bytes: u64, deadline: Instant) -> Option<Lease> {
        self.acquire_below(bytes, self.limit, deadline)
    }

    /// [`MemoryBudget::acquire`], leaving `limit - ceiling` to others: what the background
    /// download asks with, so that readers never wait on its leases.
    pub fn acquire_below(
        self: &Arc<Self>,
        bytes: u64,
        ceiling: u64,
        deadline: Instant,
    ) -> Option<Lease> {
        let ceiling = ceiling.clamp(1, self.limit);
        let bytes = bytes.min(ceiling);
        let mut used = crate::sync::lock(&self.used);
        if *used + bytes > ceiling {
            self.stats.waits.fetch_add(1, Ordering::Relaxed);
        }
        while *used + bytes > ceiling {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            used = match self.freed.wait_timeout(used, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        Some(self.take(&mut used, bytes))
    }

    /// `bytes` if they are free now.
    pub fn try_acquire(self: &Arc<Self>, bytes: u64) -> Option<Lease> {
        let mut used = crate::sync::lock(&self.used);
        (*used + bytes <= self.limit).then(|| self.take(&mut used, bytes))
    }

    fn take(self: &Arc<Self>, used: &mut u64, bytes: u64) -> Lease {
        *used += bytes;
        self.stats.peak.fetch_max(*used, Ordering::Relaxed);
        Lease {
            budget: self.clone(),
            bytes,
        }
    }
}

/// The agent's chunk memory: a pool for fetches in flight and one for chunks kept.
#[derive(Debug)]
pub struct Memory {
    pub fetches: Arc<MemoryBudget>,
    pub kept: Arc<MemoryBudget>,
}

impl Memory {
    /// `total` bytes, half for each pool.
    pub fn new(total: u64) -> Arc<Self> {
        Arc::new(Self {
            fetches: MemoryBudget::new(total / 2),
            kept: MemoryBudget::new(total - total / 2),
        })
    }

    /// Both pools together.
    pub fn limit(&self) -> u64 {
        self.fetches.limit() + self.kept.limit()
    }
}

static GLOBAL: OnceLock<Arc<Memory>> = OnceLock::new();

/// The agent's memory: [`DEFAULT_BYTES`], unless [`set_global`] came first.
pub fn global() -> Arc<Memory> {
    GLOBAL.get_or_init(|| Memory::new(DEFAULT_BYTES)).clone()
}

/// Sizes the agent's memory; `false` if it was already in use (its size stays).
pub fn set_global(bytes: u64) -> bool {
    GLOBAL.set(Memory::new(bytes)).is_ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn leases_never_pass_the_limit_and_a_large_one_waits_for_all_of_it() {
        let budget = MemoryBudget::new(100);
        let a = budget.try_acquire(60).expect("room");
        assert!(budget.try_acquire(50).is_none(), "60 + 50 > 100");
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(budget.acquire(50, soon).is_none(), "the deadline passes");
        assert_eq!(budget.stats.timeouts.load(Ordering::Relaxed), 1);
        // One larger than the whole budget waits for all of it, and gets it once `a` goes.
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || {
                let lease = budget.acquire(1_000, Instant::now() + Duration::from_secs(10));
                (lease.is_some(), budget.used())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(a);
        let (got, used) = waiter.join().expect("no panic");
        assert!(got);
        assert_eq!(used, 100, "clamped to the whole budget");
        assert_eq!(budget.used(), 0, "given back when dropped");
        assert_eq!(budget.stats.peak.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn a_ceiling_leaves_the_rest_to_others() {
        let budget = MemoryBudget::new(100);
        let soon = || Instant::now() + Duration::from_millis(20);
        let background = budget
            .acquire_below(70, 75, soon())
            .expect("below the ceiling");
        assert!(
            budget.acquire_below(10, 75, soon()).is_none(),
            "70 + 10 > 75"
        );
        let reader = budget
            .acquire(30, soon())
            .expect("the readers' quarter is free");
        assert_eq!(budget.used(), 100);
        drop((background, reader));
    }
}
