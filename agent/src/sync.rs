//! The crate's one policy for poisoned locks: carry on with the data.
//!
//! A panic while serving one request is caught at its worker (FUSE, virtio-fs, gRPC) and
//! answered with an error; the agent keeps serving every other request. A lock that request
//! held is then poisoned, and refusing it forever (or panicking on it) would turn one bad
//! request into a dead mount. Every mutex in this crate guards data whose invariants hold
//! between statements (counters, maps of in-flight work, queues, buffers), so the data a
//! panicking holder left behind is still valid, and the lock is taken as if it were clean.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, poisoned or not.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Read-locks `lock`, poisoned or not.
pub fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Write-locks `lock`, poisoned or not.
pub fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_holder_leaves_the_data_usable() {
        let m = Mutex::new(vec![1]);
        let _ = std::panic::catch_unwind(|| {
            let mut guard = m.lock().unwrap();
            guard.push(2);
            panic!("a request failed while holding the lock");
        });
        assert!(m.is_poisoned());
        lock(&m).push(3);
        assert_eq!(*lock(&m), [1, 2, 3]);
    }
}
