//! Write-behind: chunks fetched for readers go to the cache on a thread of their own, off the
//! read path. The queue is bounded by bytes ([`MAX_QUEUED_BYTES`]) and each queued chunk holds
//! a lease of the agent's memory budget ([`super::budget`]); beyond either, or without the
//! thread, chunks are written inline, so a slow disk costs readers time, never memory, and
//! nothing fetched is dropped. A flush waits for what is queued; dropping the writer writes
//! what is queued and joins the thread.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
    mpsc::{SyncSender, sync_channel},
};

use super::{
    ChunkCache,
    budget::{Lease, MemoryBudget},
};
use crate::oci::digest::Digest;

/// Bytes of chunks queued for the writer thread at most.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;
/// Chunks queued at most (whatever their size).
const MAX_QUEUED_CHUNKS: usize = 1024;

/// What the writer thread is asked to do.
enum WriteJob {
    /// The lease is given back once the chunk is written.
    Put(Digest, Arc<Vec<u8>>, Lease),
    /// Answered once every chunk queued before it is written.
    Flush(SyncSender<()>),
}

/// The writer thread and its queue, over one cache.
pub struct WriteBehind {
    cache: Arc<ChunkCache>,
    /// Whether a failed write was already reported loudly.
    warned: Arc<AtomicBool>,
    tx: Option<SyncSender<WriteJob>>,
    queued: Arc<AtomicUsize>,
    budget: Arc<MemoryBudget>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("queued_bytes", &self.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl WriteBehind {
    /// Starts the writer thread (without it, every chunk is written inline).
    pub fn spawn(cache: Arc<ChunkCache>, budget: Arc<MemoryBudget>) -> Self {
        let warned = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel::<WriteJob>(MAX_QUEUED_CHUNKS);
        let queued = Arc::new(AtomicUsize::new(0));
        let (thread_cache, thread_warned, written) =
            (cache.clone(), warned.clone(), queued.clone());
        let thread = std::thread::Builder::new()
            .name("cache-writer".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        WriteJob::Put(digest, data, lease) => {
                            put(&thread_cache, &thread_warned, &digest, &data);
                            written.fetch_sub(data.len(), Ordering::AcqRel);
                            drop(lease);
                        }
                        WriteJob::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .inspect_err(
                |err| tracing::warn!(%err, "no cache writer thread: readers write chunks themselves"),
            )
            .ok();
        Self {
            cache,
            warned,
            tx: thread.is_some().then_some(tx),
            queued,
            budget,
            thread,
        }
    }

    /// Queues a chunk for the thread, or writes it now when the queue is full.
    pub fn write_behind(&self, digest: Digest, data: &Arc<Vec<u8>>) {
        if !self.queue(digest, data) {
            self.write_now(&digest, data);
        }
    }

    /// Writes a chunk now, on the caller's thread.
    pub fn write_now(&self, digest: &Digest, data: &[u8]) {
        put(&self.cache, &self.warned, digest, data);
    }

    /// Queues a chunk; false when the queue is full, the budget has no room or there is no
    /// thread.
    fn queue(&self, digest: Digest, data: &Arc<Vec<u8>>) -> bool {
        let Some(tx) = &self.tx else { return false };
        let len = data.len();
        if self.queued.fetch_add(len, Ordering::AcqRel) + len > MAX_QUEUED_BYTES {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        let Some(lease) = self.budget.try_acquire(len as u64) else {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        };
        if tx
            .try_send(WriteJob::Put(digest, data.clone(), lease))
            .is_err()
        {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Waits until every chunk queued so far is written (or the thread is gone).
    pub fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = sync_channel(1);
        if tx.send(WriteJob::Flush(done_tx)).is_ok() {
            // An error means the thread ended: nothing is left to wait for.
            let _ = done_rx.recv();
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes a chunk to the cache. A failure is reported loudly the first time, quietly after
/// (a full disk would otherwise log once per chunk); reads go on from the network either way.
fn put(cache: &ChunkCache, warned: &AtomicBool, digest: &Digest, data: &[u8]) {
    if let Err(err) = cache.put(digest, data) {
        if !warned.swap(true, Ordering::Relaxed) {
            let err = crate::error_chain(&err);
            tracing::error!(%err, dir = %cache.dir().display(), "chunks cannot be cached; reads keep working from the network");
        } else {
            tracing::debug!(%err, "chunk not cached");
        }
    }
}
