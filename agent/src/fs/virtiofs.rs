//! The virtio-fs transport: serves any `FileSystem` to a virtual machine as a vhost-user-fs
//! device backend. The VMM (QEMU's `vhost-user-fs-pci`, Cloud Hypervisor, Kata's runtimes)
//! connects to a unix socket, shares the guest's memory with us and hands over the
//! virtqueues; FUSE requests then arrive as descriptor chains and replies go back into the
//! guest's buffers. Like [`super::fusedev`], it moves messages only: the files are the
//! filesystem's business, so a host mount and a guest share one implementation and one cache.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT); queues 1.. carry requests. Each
//! queue has its own event thread, which only pops descriptor chains and hands them to a
//! pool of request threads: a read that waits on the registry never holds up the requests
//! behind it; at most a queue's size of its chains wait or run at once (see [`Dispatcher`]).
//! A guest that goes away ends its session; the backend then waits for the next connection
//! on the same socket.
//!
//! Everything in the rings comes from the guest and is untrusted: a chain that points outside
//! guest memory, has no room for a reply or holds a malformed FUSE message is completed with
//! zero bytes and logged, and the backend carries on.

use std::{
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use fuse_backend_rs::{
    api::{filesystem::FileSystem, server::Server},
    transport::{Reader, VirtioFsWriter},
};
use vhost::vhost_user::{
    Listener,
    message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures},
};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::{
    epoll::EventSet,
    event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier},
};

use crate::shutdown::Shutdown;

/// The guest's memory as the backend sees it.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// Bytes of the tag in the device's configuration space (virtio spec 5.11.4).
pub const TAG_LEN: usize = 36;
/// The one high-priority queue that comes before the request queues.
const HIPRIO_QUEUES: usize = 1;
/// Most request queues a guest may use (the kernel's virtiofs driver maps them to CPUs).
pub const MAX_REQUEST_QUEUES: usize = 16;

/// How the device looks to the guest and how many threads serve it.
#[derive(Clone, Debug)]
pub struct VirtioFsConfig {
    /// Request queues offered (the VMM decides how many it uses, at most this many).
    pub request_queues: usize,
    /// The largest virtqueue the guest may set up.
    pub queue_size: u16,
    /// Threads that run requests, shared by all queues and sessions.
    pub request_threads: usize,
    /// The tag, offered in the configuration space to VMMs that ask the backend for it
    /// (VHOST_USER_PROTOCOL_F_CONFIG). QEMU's `vhost-user-fs-pci` uses its own `tag=`
    /// property instead; the two must match for the guest to find the share under this name.
    pub tag: Option<String>,
}

impl Default for VirtioFsConfig {
    fn default() -> Self {
        Self {
            request_queues: 1,
            queue_size: 1024,
            request_threads: 4,
            tag: None,
        }
    }
}

/// Errors of the virtio-fs backend.
#[derive(Debug, thiserror::Error)]
pub enum VirtioFsError {
    #[error("the virtio-fs tag {0:?} is empty or longer than {TAG_LEN} bytes")]
    BadTag(String),
    #[error("{0} request queues: between 1 and {MAX_REQUEST_QUEUES}")]
    BadQueueCount(usize),
    #[error("listening on {0}")]
    Listen(PathBuf, #[source] vhost::vhost_user::Error),
    #[error("waiting for a connection on {0}")]
    Accept(PathBuf, #[source] io::Error),
    /// The library's error type implements Display only.
    #[error("setting up a vhost-user session: {0}")]
    Session(String),
    #[error("creating an event fd")]
    Event(#[source] io::Error),
    #[error("starting a request thread")]
    Thread(#[source] io::Error),
}

/// What the backend has done, for logs and tests.
#[derive(Debug, Default)]
pub struct VirtioFsStats {
    /// Guest connections accepted.
    pub sessions: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Chains that could not be served (bad descriptors, malformed messages).
    pub bad_requests: AtomicU64,
    /// Chains taken off the rings and not yet returned, all queues and sessions.
    pub in_flight: AtomicU64,
    /// Times a kick found its queue with as many chains in flight as the queue's size, so
    /// what the guest posted waited for room.
    pub deferrals: AtomicU64,
}

/// A request to run on a request thread.
type Job = Box<dyn FnOnce() + Send>;

/// The request threads: jobs in, run in any order.
struct RequestPool {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

impl RequestPool {
    fn start(threads: usize) -> Result<Self, VirtioFsError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            thread::Builder::new()
                .name(format!("virtiofs-req-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while taking a job, not while running it.
                        let job = crate::sync::lock(&rx).recv();
                        match job {
                            // A panic outside the filesystem's own guard (in the transport)
                            // ends that job, not the thread: the pool stays whole.
                            Ok(job) => {
                                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                                    .is_err()
                                {
                                    tracing::error!("a virtio-fs request job panicked");
                                }
                            }
                            Err(_) => return, // the pool was dropped
                        }
                    }
                })
                .map_err(VirtioFsError::Thread)?;
        }
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
        })
    }

    fn run(&self, job: Job) -> bool {
        crate::sync::lock(&self.jobs)
            .as_ref()
            .is_some_and(|tx| tx.send(job).is_ok())
    }
}

impl Drop for RequestPool {
    fn drop(&mut self) {
        crate::sync::lock(&self.jobs).take();
    }
}

/// How far one queue is behind: chains taken off its ring and not yet returned, and
/// whether taking stopped because there were as many as the queue's size.
#[derive(Debug, Default)]
struct QueueLoad {
    in_flight: AtomicUsize,
    deferred: AtomicBool,
}

/// Takes chains off the rings and runs them on the request threads, never more per queue
/// than the queue's size: as many as an honest guest can have outstanding, since a
/// descriptor is the guest's again only once returned. A guest that posts heads it already
/// handed over (or floods the ring faster than the registry answers) waits for room instead
/// of growing the host's job queue; the completion that makes room takes the next chains.
struct Dispatcher<F: FileSystem + Send + Sync + 'static> {
    server: Arc<Server<Arc<F>>>,
    memory: RwLock<Option<GuestMemory>>,
    event_idx: AtomicBool,
    loads: Vec<QueueLoad>,
    pool: Arc<RequestPool>,
    stats: Arc<VirtioFsStats>,
}

impl<F: FileSystem + Send + Sync + 'static> Dispatcher<F> {
    /// Takes what `vring` (queue `queue`) has, as room allows. With EVENT_IDX the guest kicks
    /// only when told to: keep taking until no chain arrived while notifications were off, or
    /// the guest waits forever; a queue at its limit is left to the completions.
    fn drain(self: &Arc<Self>, queue: usize, vring: &VringRwLock) -> io::Result<()> {
        let memory = crate::sync::read(&self.memory)
            .as_ref()
            .ok_or_else(|| io::Error::other("virtio-fs: a kick before the guest's memory"))?
            .memory();
        if !self.event_idx.load(Ordering::Relaxed) {
            self.dispatch(queue, vring, &memory);
            return Ok(());
        }
        loop {
            vring
                .disable_notification()
                .map_err(|e| io::Error::other(e.to_string()))?;
            if self.dispatch(queue, vring, &memory) == Taken::UpToTheLimit {
                return Ok(());
            }
            if !vring
                .enable_notification()
                .map_err(|e| io::Error::other(e.to_string()))?
            {
                return Ok(());
            }
        }
    }

    /// Takes available chains off `vring`, at most as many as leave the queue within its
    /// size, and hands each to a request thread.
    fn dispatch(
        self: &Arc<Self>,
        queue: usize,
        vring: &VringRwLock,
        memory: &GuestMemoryLoadGuard<GuestMemoryMmap>,
    ) -> Taken {
        let Some(load) = self.loads.get(queue) else {
            return Taken::All;
        };
        let (chains, taken) = {
            // Room is counted and taken under the ring's lock: two dispatchers of one queue
            // (an event thread and a completion) cannot both fill the same room.
            let mut state = vring.get_mut();
            let limit = usize::from(state.get_queue().size()).max(1);
            let mut room = limit.saturating_sub(load.in_flight.load(Ordering::SeqCst));
            if room == 0 {
                load.deferred.store(true, Ordering::SeqCst);
                // A completion between the load above and the flag would not have seen it:
                // look once more, now that any later completion will.
                room = limit.saturating_sub(load.in_flight.load(Ordering::SeqCst));
                if room == 0 {
                    self.stats.deferrals.fetch_add(1, Ordering::Relaxed);
                    return Taken::UpToTheLimit;
                }
            }
            let chains: Vec<Chain> = match state.get_queue_mut().iter(memory.clone()) {
                Ok(iter) => iter.take(room).collect(),
                Err(err) => {
                    // The guest's avail ring is broken; nothing on it can be trusted. The
                    // session stays up (the guest may reset the device), nothing is served.
                    self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%err, "virtio-fs: unreadable available ring");
                    return Taken::All;
                }
            };
            load.in_flight.fetch_add(chains.len(), Ordering::SeqCst);
            self.stats
                .in_flight
                .fetch_add(chains.len() as u64, Ordering::Relaxed);
            let taken = if chains.len() == room {
                // Maybe more wait on the ring: the completion of one of these takes them.
                // Set before any of them can complete.
                load.deferred.store(true, Ordering::SeqCst);
                Taken::UpToTheLimit
            } else {
                Taken::All
            };
            (chains, taken)
        };
        for chain in chains {
            let (this, vring, memory) = (self.clone(), vring.clone(), memory.clone());
            let job = Box::new(move || {
                complete(&this.server, &vring, &memory, chain, &this.stats);
                this.finished(queue, &vring);
            });
            if !self.pool.run(job) {
                tracing::warn!("virtio-fs: the request threads are gone; request dropped");
                self.finished_without_drain(queue);
            }
        }
        taken
    }

    /// One of queue `queue`'s chains went back to the guest: if taking had stopped at the
    /// limit, take more now.
    fn finished(self: &Arc<Self>, queue: usize, vring: &VringRwLock) {
        if self.finished_without_drain(queue)
            && let Err(err) = self.drain(queue, vring)
        {
            tracing::debug!(%err, queue, "virtio-fs: taking deferred chains failed");
        }
    }

    /// Counts one chain of `queue` as done; whether taking had stopped at the limit.
    fn finished_without_drain(&self, queue: usize) -> bool {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Some(load) = self.loads.get(queue) else {
            return false;
        };
        load.in_flight.fetch_sub(1, Ordering::SeqCst);
        load.deferred.swap(false, Ordering::SeqCst)
    }
}

/// Whether a dispatch took everything the ring had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Taken {
    All,
    UpToTheLimit,
}

/// The vhost-user-fs device of one session.
struct FsBackend<F: FileSystem + Send + Sync + 'static> {
    config: VirtioFsConfig,
    /// One exit event per queue thread: how the session's threads are told to stop.
    exits: Vec<(EventConsumer, EventNotifier)>,
    dispatcher: Arc<Dispatcher<F>>,
}

impl<F: FileSystem + Send + Sync + 'static> FsBackend<F> {
    fn new(
        server: Arc<Server<Arc<F>>>,
        config: VirtioFsConfig,
        pool: Arc<RequestPool>,
        stats: Arc<VirtioFsStats>,
    ) -> Result<Self, VirtioFsError> {
        let queues = HIPRIO_QUEUES + config.request_queues;
        let exits = (0..queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<Result<_, _>>()
            .map_err(VirtioFsError::Event)?;
        Ok(Self {
            config,
            exits,
            dispatcher: Arc::new(Dispatcher {
                server,
                memory: RwLock::new(None),
                event_idx: AtomicBool::new(false),
                loads: (0..queues).map(|_| QueueLoad::default()).collect(),
                pool,
                stats,
            }),
        })
    }

    #[cfg(test)]
    fn stats(&self) -> &VirtioFsStats {
        &self.dispatcher.stats
    }
}

/// Serves one chain and returns it to the guest.
fn complete<F: FileSystem + Send + Sync>(
    server: &Server<Arc<F>>,
    vring: &VringRwLock,
    memory: &GuestMemoryLoadGuard<GuestMemoryMmap>,
    chain: Chain,
    stats: &VirtioFsStats,
) {
    let head = chain.head_index();
    let written = match serve_chain(server, memory, chain) {
        Ok(written) => {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            written
        }
        Err(err) => {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%err, head, "virtio-fs: request not served");
            0
        }
    };
    // A full used ring or a session already gone: the guest is past caring.
    if let Err(err) = vring.add_used(head, written) {
        tracing::debug!(%err, head, "virtio-fs: returning a chain failed");
        return;
    }
    match vring.needs_notification() {
        Ok(true) => {
            if let Err(err) = vring.signal_used_queue() {
                tracing::debug!(%err, "virtio-fs: notifying the guest failed");
            }
        }
        Ok(false) => {}
        Err(err) => tracing::debug!(%err, "virtio-fs: reading the used event failed"),
    }
}

/// Why a chain was not served.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("bad descriptor chain: {0}")]
    Descriptors(fuse_backend_rs::transport::Error),
    #[error("FUSE message: {0}")]
    Message(fuse_backend_rs::Error),
}

fn serve_chain<F: FileSystem + Send + Sync>(
    server: &Server<Arc<F>>,
    memory: &GuestMemoryLoadGuard<GuestMemoryMmap>,
    chain: Chain,
) -> Result<u32, ChainError> {
    let reader =
        Reader::from_descriptor_chain(&**memory, chain.clone()).map_err(ChainError::Descriptors)?;
    let writer = VirtioFsWriter::new(&**memory, chain).map_err(ChainError::Descriptors)?;
    let written = server
        .handle_message(reader, writer.into(), None, None)
        .map_err(ChainError::Message)?;
    // A reply never exceeds the chain's writable bytes, which fit in u32 (the spec's limit).
    Ok(u32::try_from(written).unwrap_or(u32::MAX))
}

impl<F: FileSystem + Send + Sync + 'static> VhostUserBackend for FsBackend<F> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        HIPRIO_QUEUES + self.config.request_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.config.queue_size)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut features = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.config.tag.is_some() {
            features |= VhostUserProtocolFeatures::CONFIG;
        }
        features
    }

    fn set_event_idx(&self, enabled: bool) {
        self.dispatcher.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut config = [0u8; TAG_LEN + 4];
        if let Some(tag) = &self.config.tag {
            config[..tag.len()].copy_from_slice(tag.as_bytes());
        }
        let queues = u32::try_from(self.config.request_queues).unwrap_or(1);
        config[TAG_LEN..].copy_from_slice(&queues.to_le_bytes());
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        config[start..end].to_vec()
    }

    fn update_memory(&self, memory: GuestMemory) -> io::Result<()> {
        *crate::sync::write(&self.dispatcher.memory) = Some(memory);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One event thread per queue: a busy queue does not delay another's kicks.
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exits.get(thread_index)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "virtio-fs: unexpected event {evset:?}"
            )));
        }
        // `device_event` counts the queues of this thread, which has exactly one; the
        // thread's index is its queue's.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("virtio-fs: no queue {device_event}")))?;
        self.dispatcher.drain(thread_id, vring)
    }
}

/// A vhost-user-fs backend bound to its socket.
pub struct VirtioFsServer<F: FileSystem + Send + Sync + 'static> {
    server: Arc<Server<Arc<F>>>,
    config: VirtioFsConfig,
    listener: Listener,
    socket: PathBuf,
    pool: Arc<RequestPool>,
    pub stats: Arc<VirtioFsStats>,
}

impl<F: FileSystem + Send + Sync + 'static> std::fmt::Debug for VirtioFsServer<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioFsServer")
            .field("socket", &self.socket)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<F: FileSystem + Send + Sync + 'static> VirtioFsServer<F> {
    /// Binds `socket` (replacing a stale socket file) to serve `fs`.
    pub fn bind(fs: Arc<F>, socket: &Path, config: VirtioFsConfig) -> Result<Self, VirtioFsError> {
        if let Some(tag) = &config.tag
            && (tag.is_empty() || tag.len() > TAG_LEN)
        {
            return Err(VirtioFsError::BadTag(tag.clone()));
        }
        if !(1..=MAX_REQUEST_QUEUES).contains(&config.request_queues) {
            return Err(VirtioFsError::BadQueueCount(config.request_queues));
        }
        let listener =
            Listener::new(socket, true).map_err(|e| VirtioFsError::Listen(socket.into(), e))?;
        let pool = Arc::new(RequestPool::start(config.request_threads)?);
        Ok(Self {
            server: Arc::new(Server::new(fs)),
            config,
            listener,
            socket: socket.to_path_buf(),
            pool,
            stats: Arc::default(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Serves guests one session after another until `stop` is triggered. A guest that
    /// disconnects, cleanly or by dying, ends its session only.
    pub fn run(&mut self, stop: &Shutdown) -> Result<(), VirtioFsError> {
        while self.wait_for_connection(stop)? {
            self.session(stop)?;
        }
        Ok(())
    }

    /// Waits until a VMM connects (true) or `stop` is triggered (false).
    fn wait_for_connection(&self, stop: &Shutdown) -> Result<bool, VirtioFsError> {
        let mut pollfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while !stop.is_triggered() {
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut pollfd, 1, 200) };
            if ready > 0 {
                return Ok(true);
            }
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(VirtioFsError::Accept(self.socket.clone(), err));
                }
            }
        }
        Ok(false)
    }

    fn session(&mut self, stop: &Shutdown) -> Result<(), VirtioFsError> {
        let backend = Arc::new(FsBackend::new(
            self.server.clone(),
            self.config.clone(),
            self.pool.clone(),
            self.stats.clone(),
        )?);
        let mut daemon = VhostUserDaemon::new(
            "imgstream-virtiofs".into(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| VirtioFsError::Session(e.to_string()))?;
        daemon
            .start(&mut self.listener)
            .map_err(|e| VirtioFsError::Session(e.to_string()))?;
        let session = self.stats.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(session, socket = %self.socket.display(), "virtio-fs: a VMM connected");
        let handlers = daemon.get_epoll_handlers();
        let (done_tx, done_rx) = mpsc::channel();
        // `wait` blocks until the VMM goes away; it runs apart so that a stop is not held up.
        thread::Builder::new()
            .name("virtiofs-session".into())
            .spawn(move || {
                let result = daemon.wait();
                let _ = done_tx.send(result);
            })
            .map_err(VirtioFsError::Thread)?;
        loop {
            match done_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(result) => {
                    match result {
                        Ok(()) => tracing::info!(session, "virtio-fs: the VMM disconnected"),
                        Err(err) => {
                            tracing::info!(session, %err, "virtio-fs: the session ended")
                        }
                    }
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if stop.is_triggered() => {
                    tracing::info!(session, "virtio-fs: stopping with a VMM still connected");
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        for handler in handlers {
            handler.send_exit_event();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
