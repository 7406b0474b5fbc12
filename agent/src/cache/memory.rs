//! Verified chunks kept in memory, so that the consecutive reads a chunk serves (FUSE reads
//! are at most 1 MiB, chunks up to 4 MiB) do not each read and check it from disk again.
//! First in, first out, bounded by bytes twice: its own cap, and the agent's memory budget
//! ([`super::budget`]), which every kept chunk holds a lease of.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use super::budget::{Lease, MemoryBudget};
use crate::oci::digest::Digest;

/// Chunks by digest, at most `cap` bytes of them.
#[derive(Debug)]
pub struct MemoryCache {
    map: HashMap<Digest, (Arc<Vec<u8>>, Lease)>,
    order: VecDeque<Digest>,
    bytes: usize,
    cap: usize,
    budget: Arc<MemoryBudget>,
}

impl MemoryCache {
    pub fn new(cap: usize, budget: Arc<MemoryBudget>) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            cap,
            budget,
        }
    }

    pub fn get(&self, digest: &Digest) -> Option<Arc<Vec<u8>>> {
        self.map.get(digest).map(|(data, _)| data.clone())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.map.contains_key(digest)
    }

    /// Keeps `data`, dropping the oldest chunks to make room, within the cap and the budget;
    /// a chunk there is no room for (larger than the cap, or the budget taken by others) is
    /// not kept.
    pub fn insert(&mut self, digest: Digest, data: Arc<Vec<u8>>) {
        if data.len() > self.cap || self.map.contains_key(&digest) {
            return;
        }
        while self.bytes + data.len() > self.cap && self.drop_oldest() {}
        let lease = loop {
            if let Some(lease) = self.budget.try_acquire(data.len() as u64) {
                break lease;
            }
            if !self.drop_oldest() {
                return;
            }
        };
        self.bytes += data.len();
        self.order.push_back(digest);
        self.map.insert(digest, (data, lease));
    }

    /// Drops the chunk, if it is kept.
    pub fn remove(&mut self, digest: &Digest) {
        if let Some((gone, _lease)) = self.map.remove(digest) {
            self.bytes -= gone.len();
            self.order.retain(|d| d != digest);
        }
    }

    /// Drops the oldest chunk (its lease with it); false when there is none.
    fn drop_oldest(&mut self) -> bool {
        let Some(old) = self.order.pop_front() else {
            return false;
        };
        if let Some((gone, _lease)) = self.map.remove(&old) {
            self.bytes -= gone.len();
        }
        true
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_chunks_make_room_and_the_bound_holds() {
        let mut m = MemoryCache::new(10, MemoryBudget::new(1 << 20));
        let chunk = |n: u8, len: usize| (Digest::of(&[n]), Arc::new(vec![n; len]));
        for n in 0..4 {
            let (d, data) = chunk(n, 4);
            m.insert(d, data);
            assert!(m.bytes() <= 10);
        }
        assert!(m.get(&chunk(0, 4).0).is_none(), "the oldest went first");
        assert!(m.get(&chunk(3, 4).0).is_some());
        let (big, data) = chunk(9, 11);
        m.insert(big, data);
        assert!(
            m.get(&big).is_none(),
            "larger than the whole cache: not kept"
        );
    }

    #[test]
    fn two_caches_share_one_budget_and_give_back_what_they_drop() {
        let budget = MemoryBudget::new(10);
        let (mut a, mut b) = (
            MemoryCache::new(10, budget.clone()),
            MemoryCache::new(10, budget.clone()),
        );
        let chunk = |n: u8| (Digest::of(&[n]), Arc::new(vec![n; 4]));
        let (d1, c1) = chunk(1);
        let (d2, c2) = chunk(2);
        let (d3, c3) = chunk(3);
        a.insert(d1, c1);
        a.insert(d2, c2);
        assert_eq!(budget.used(), 8);
        // b finds 2 bytes left: it cannot take a's, and keeps nothing.
        b.insert(d3, c3.clone());
        assert!(b.get(&d3).is_none());
        assert_eq!(budget.used(), 8);
        // a, at the budget too, drops its own oldest to keep a third.
        a.insert(d3, c3);
        assert!(a.get(&d1).is_none() && a.get(&d3).is_some());
        assert_eq!(budget.used(), 8);
        drop(a);
        assert_eq!(budget.used(), 0, "a dropped cache gives its leases back");
    }
}
