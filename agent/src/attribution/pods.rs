//! The runtime's side of attribution: which pod a container id belongs to, asked of every
//! configured CRI runtime with a deadline, and asked again for ids the runtime did not know
//! yet (a sandbox is added to containerd's store only once its pause process runs).

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::cri::{Cri, Lookup};

/// Deadline of one CRI lookup.
const CRI_DEADLINE: Duration = Duration::from_secs(2);
/// Wait before asking CRI again about an id it did not know yet.
const CRI_RETRY: Duration = Duration::from_millis(300);
/// Times an unknown id is asked about before it is taken for a non-CRI container.
const CRI_ATTEMPTS: u32 = 10;

/// Every configured runtime, asked in turn.
#[derive(Debug)]
pub struct PodDirectory {
    /// One client per runtime; an id is asked of each until one knows it.
    cri: Vec<Cri>,
    runtime: tokio::runtime::Handle,
}

impl PodDirectory {
    pub fn new(cri: Vec<Cri>, runtime: tokio::runtime::Handle) -> Self {
        Self { cri, runtime }
    }

    /// What the runtimes say `container_id` is; `None` when no runtime is configured.
    /// Blocks the calling thread (never an async worker) for at most one deadline per
    /// runtime.
    pub fn lookup(&self, container_id: &str) -> Option<Lookup> {
        if self.cri.is_empty() {
            return None;
        }
        let mut answer = None;
        for cri in &self.cri {
            let (cri, id) = (cri.clone(), container_id.to_string());
            let lookup = self
                .runtime
                .block_on(async move { tokio::time::timeout(CRI_DEADLINE, cri.lookup(&id)).await });
            match lookup {
                Ok(Ok(Lookup::Unknown)) => answer = Some(Lookup::Unknown),
                Ok(Ok(found)) => {
                    tracing::debug!(container = container_id, ?found, "CRI lookup");
                    return Some(found);
                }
                Ok(Err(err)) => {
                    let err = crate::error_chain(&err);
                    tracing::warn!(%err, container = container_id, "CRI lookup failed")
                }
                Err(_) => tracing::warn!(container = container_id, "CRI lookup timed out"),
            }
        }
        answer
    }
}

/// A container the runtimes did not know when its cgroup appeared.
#[derive(Debug)]
struct Pending {
    cgroup_id: u64,
    container_id: String,
    attempts: u32,
    due: Instant,
}

/// Ids to ask about again, oldest first.
#[derive(Debug, Default)]
pub struct Retries(VecDeque<Pending>);

impl Retries {
    /// Asks about the container in `cgroup_id` again shortly.
    pub fn later(&mut self, cgroup_id: u64, container_id: &str) {
        self.0.push_back(Pending {
            cgroup_id,
            container_id: container_id.to_string(),
            attempts: 1,
            due: Instant::now() + CRI_RETRY,
        });
    }

    /// Asks `pods` about every id now due: the answers that settle an id (a sandbox or a
    /// container), by cgroup id. An id still unknown is asked again later, until
    /// [`CRI_ATTEMPTS`]; then it is taken for a non-CRI container and dropped.
    pub fn due(&mut self, pods: &PodDirectory) -> Vec<(u64, Lookup)> {
        let now = Instant::now();
        let mut settled = Vec::new();
        while self.0.front().is_some_and(|p| p.due <= now) {
            let Some(mut p) = self.0.pop_front() else {
                break;
            };
            match pods.lookup(&p.container_id) {
                Some(Lookup::Unknown) if p.attempts < CRI_ATTEMPTS => {
                    p.attempts += 1;
                    p.due = now + CRI_RETRY;
                    self.0.push_back(p);
                }
                Some(found @ (Lookup::Sandbox | Lookup::Container(_))) => {
                    settled.push((p.cgroup_id, found));
                }
                _ => {}
            }
        }
        settled
    }
}
