//! Verified chunks kept in memory, so that the consecutive reads a chunk serves (FUSE reads
//! are at most 1 MiB, chunks up to 4 MiB) do not each read and check it from disk again.
//! First in, first out, bounded by bytes: sequential readers are what it is for.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use crate::oci::digest::Digest;

/// Chunks by digest, at most `cap` bytes of them.
#[derive(Debug)]
pub struct MemoryCache {
    map: HashMap<Digest, Arc<Vec<u8>>>,
    order: VecDeque<Digest>,
    bytes: usize,
    cap: usize,
}

impl MemoryCache {
    pub fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    pub fn get(&self, digest: &Digest) -> Option<Arc<Vec<u8>>> {
        self.map.get(digest).cloned()
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.map.contains_key(digest)
    }

    /// Keeps `data`, dropping the oldest chunks to make room; a chunk larger than the whole
    /// cache is not kept.
    pub fn insert(&mut self, digest: Digest, data: Arc<Vec<u8>>) {
        if data.len() > self.cap || self.map.contains_key(&digest) {
            return;
        }
        while self.bytes + data.len() > self.cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.map.remove(&old) {
                self.bytes -= gone.len();
            }
        }
        self.bytes += data.len();
        self.order.push_back(digest);
        self.map.insert(digest, data);
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
        let mut m = MemoryCache::new(10);
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
}
