//! Fetches in flight, so that concurrent reads of one chunk make one request: the first
//! reader opens a flight and fetches; the others wait on it, each bounded by its own
//! deadline. Every flight opened is completed, success or failure.

use std::{
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use super::FetchError;
use crate::oci::digest::Digest;

/// A chunk being fetched; waiters block on `ready` until `result` is set.
#[derive(Default)]
pub(super) struct Inflight {
    result: Mutex<Option<Result<Arc<Vec<u8>>, FetchError>>>,
    ready: Condvar,
    /// Fetched because read-around guessed it would be read, not because a reader asked.
    guessed: bool,
    /// The guess's place in line for the link (0: none), for a reader to promote it.
    ticket: AtomicU64,
}

impl Inflight {
    /// A flight read-around opened.
    pub(super) fn guess() -> Self {
        Self {
            guessed: true,
            ..Self::default()
        }
    }

    /// Whether read-around opened this flight: when it fails, a reader that waited on it
    /// fetches the chunk itself.
    pub(super) fn guessed(&self) -> bool {
        self.guessed
    }

    /// Names the guess in line for the link that fetches this chunk.
    pub(super) fn set_ticket(&self, ticket: u64) {
        self.ticket.store(ticket, Ordering::Release);
    }

    /// The guess in line for the link that fetches this chunk, if any.
    pub(super) fn ticket(&self) -> Option<u64> {
        Some(self.ticket.load(Ordering::Acquire)).filter(|&t| t != 0)
    }

    /// Sets the result and wakes every waiter.
    pub(super) fn complete(&self, result: Result<Arc<Vec<u8>>, FetchError>) {
        *crate::sync::lock(&self.result) = Some(result);
        self.ready.notify_all();
    }

    /// The flight's result, or [`FetchError::Deadline`] once `deadline` passes.
    pub(super) fn wait(
        &self,
        digest: Digest,
        deadline: Instant,
    ) -> Result<Arc<Vec<u8>>, FetchError> {
        let mut result = crate::sync::lock(&self.result);
        loop {
            if let Some(r) = result.as_ref() {
                return r.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FetchError::Deadline(digest));
            }
            result = self
                .ready
                .wait_timeout(result, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}
