//! The FUSE transport: mounts any `FileSystem` on a directory through /dev/fuse and serves it
//! with worker threads. It moves messages only; what the files are is the filesystem's
//! business. Unmounts (lazily, so busy mounts do not linger) when dropped.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
};

use fuse_backend_rs::{
    api::{filesystem::FileSystem, server::Server},
    transport::{FuseChannel, FuseSession},
};

/// Errors mounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Creating or mounting the FUSE session failed (no /dev/fuse, not root, not a directory).
    #[error("mounting FUSE at {0}")]
    Mount(String, #[source] fuse_backend_rs::transport::Error),
    /// Opening a FUSE channel failed.
    #[error("opening a FUSE channel")]
    Channel(#[source] fuse_backend_rs::transport::Error),
    #[error("starting a FUSE worker thread")]
    Thread(#[source] std::io::Error),
    /// Making the directory an adopted connection's session is opened on.
    #[error("preparing {0} to serve an adopted FUSE connection")]
    Placeholder(PathBuf, #[source] std::io::Error),
    /// A descriptor handed over to adopt is not a FUSE connection.
    #[error("the descriptor kept for {0} is not /dev/fuse")]
    NotFuse(String),
    /// The mount point is missing or not a directory.
    #[error("mount point {0}: {1}")]
    MountPoint(PathBuf, &'static str),
}

/// Checks that `mountpoint` is a directory one can mount on: a clear error now rather than
/// the kernel's or the session's later (after an image's manifest and TOCs were fetched).
pub fn check_mountpoint(mountpoint: &Path) -> Result<(), MountError> {
    let why = match std::fs::metadata(mountpoint) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => "not a directory",
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            "no such directory (create it first)"
        }
        Err(_) => "cannot be looked at",
    };
    Err(MountError::MountPoint(mountpoint.to_path_buf(), why))
}

/// Whether `file` is a FUSE connection: the character device 10:229, /dev/fuse.
pub fn is_fuse_device(file: &std::fs::File) -> bool {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    file.metadata().is_ok_and(|m| {
        m.file_type().is_char_device()
            && libc::major(m.rdev()) == 10
            && libc::minor(m.rdev()) == 229
    })
}

/// A mounted filesystem and its worker threads.
pub struct FuseMount {
    /// `None` once left mounted for another process to serve.
    session: Option<FuseSession>,
    workers: Vec<thread::JoinHandle<()>>,
    mountpoint: PathBuf,
    readahead: Option<Readahead>,
    /// For an adopted connection: the empty directory its session was created on (see
    /// [`FuseMount::adopt`]).
    placeholder: Option<PathBuf>,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

/// `FUSE_NOTIFY_RESEND` (Linux 6.9): the kernel queues again the requests a server read
/// but never answered.
const FUSE_NOTIFY_RESEND: i32 = 7;

impl FuseMount {
    /// Mounts `fs` read-only (or not) at `mountpoint` and serves it with `threads` workers,
    /// with the kernel's readahead set to `readahead_kb` (`None`: the kernel's default).
    pub fn mount<F>(
        fs: Arc<F>,
        mountpoint: &Path,
        fsname: &str,
        readonly: bool,
        threads: usize,
        readahead_kb: Option<u32>,
    ) -> Result<Self, MountError>
    where
        F: FileSystem + Send + Sync + 'static,
    {
        check_mountpoint(mountpoint)?;
        let where_ = mountpoint.display().to_string();
        let mut session = FuseSession::new(mountpoint, fsname, "", readonly)
            .map_err(|e| MountError::Mount(where_.clone(), e))?;
        session.mount().map_err(|e| MountError::Mount(where_, e))?;
        let mut this = Self::start(session, fs, mountpoint, threads)?;
        this.readahead = match readahead_kb {
            Some(kb) => Readahead::set(mountpoint, kb)
                .inspect_err(|err| tracing::warn!(%err, mountpoint = %mountpoint.display(), kb, "the FUSE mount keeps the kernel's readahead"))
                .ok(),
            None => Readahead::of(mountpoint).ok(),
        };
        Ok(this)
    }

    /// Serves `fs` on a FUSE connection already mounted at `mountpoint`, its /dev/fuse
    /// descriptor `file` taken back from a keeper after a restart. The kernel's INIT is long
    /// done, so requests are served from the first one read; those the previous server read
    /// and never answered are asked for again.
    pub fn adopt<F>(
        fs: Arc<F>,
        mountpoint: &Path,
        fsname: &str,
        file: std::fs::File,
        threads: usize,
    ) -> Result<Self, MountError>
    where
        F: FileSystem + Send + Sync + 'static,
    {
        // Nothing may look at the mount point before the workers run: with no server, a
        // stat of it waits forever. The session (which canonicalises its path) is made on an
        // empty directory next to it, and this type unmounts the real mount point itself.
        let where_ = mountpoint.display().to_string();
        // Serving requests read from anything else (a keeper's file mixed up, a socket)
        // would answer garbage, or write replies into a stranger's file.
        if !is_fuse_device(&file) {
            return Err(MountError::NotFuse(where_));
        }
        let mut placeholder = mountpoint.as_os_str().to_owned();
        placeholder.push(".adopting");
        let placeholder = PathBuf::from(placeholder);
        std::fs::create_dir_all(&placeholder)
            .map_err(|e| MountError::Placeholder(placeholder.clone(), e))?;
        let mut session = FuseSession::new(&placeholder, fsname, "", true)
            .map_err(|e| MountError::Mount(where_, e))?;
        session.set_fuse_file(file);
        let mut this = Self::start(session, fs, mountpoint, threads)?;
        this.placeholder = Some(placeholder);
        this.readahead = Readahead::of(mountpoint).ok();
        let mut resend = [0u8; 16];
        resend[..4].copy_from_slice(&16u32.to_ne_bytes());
        resend[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
        if let Some(mut file) = this.session.as_ref().and_then(|s| s.get_fuse_file())
            && let Err(err) = std::io::Write::write_all(&mut file, &resend)
        {
            tracing::warn!(%err, mountpoint = %mountpoint.display(), "the kernel did not resend unanswered requests (FUSE_NOTIFY_RESEND needs Linux 6.9); a read in flight when the agent stopped may hang");
        }
        Ok(this)
    }

    fn start<F>(
        session: FuseSession,
        fs: Arc<F>,
        mountpoint: &Path,
        threads: usize,
    ) -> Result<Self, MountError>
    where
        F: FileSystem + Send + Sync + 'static,
    {
        let server = Arc::new(Server::new(fs));
        let mut this = Self {
            session: Some(session),
            workers: Vec::new(),
            readahead: None,
            mountpoint: mountpoint.to_path_buf(),
            placeholder: None,
        };
        for i in 0..threads.max(1) {
            let session = this.session.as_ref().expect("just set");
            let channel = session.new_channel().map_err(MountError::Channel)?;
            let server = server.clone();
            let worker = thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || serve(channel, &server))
                .map_err(MountError::Thread)?;
            this.workers.push(worker);
        }
        Ok(this)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether the kernel ended the session: every worker returned, as they do once the
    /// mount point is unmounted from outside (`umount`) or the connection is aborted.
    pub fn ended(&self) -> bool {
        !self.workers.is_empty() && self.workers.iter().all(thread::JoinHandle::is_finished)
    }

    /// The readahead this mount set, if it set one.
    pub fn readahead(&self) -> Option<&Readahead> {
        self.readahead.as_ref()
    }

    /// The connection's /dev/fuse descriptor, to hand to a keeper.
    pub fn fuse_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.session.as_ref()?.get_fuse_file().map(|f| f.as_fd())
    }

    /// Stops serving once the requests being served are answered, and leaves the mount in
    /// place for the next agent (a keeper holds the connection meanwhile). The descriptor
    /// stays open in this process until it exits.
    pub fn leave_mounted(mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let _ = session.wake();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        // Dropping the session would unmount it.
        std::mem::forget(session);
    }
}

/// The readahead of a FUSE connection once everything it serves is in the local cache: a
/// read then costs a local read, and a large window lets the kernel keep several requests in
/// flight (with `max-pages` and `async-read`). Measured (`cargo xtask bench fuse`, README):
/// a cached 128 MB file read at 39-60 % of local disk with the kernel's 128 KiB, 58-82 %
/// with 1 MiB and 76-101 % with 4 MiB (two runs); 16 MiB gained nothing more.
pub const CACHED_READAHEAD_KB: u32 = 4096;

/// The readahead knob of a FUSE connection: its backing device is named after the mount's
/// device number in /sys/class/bdi. Clones share what was done to it.
#[derive(Clone, Debug)]
pub struct Readahead {
    knob: PathBuf,
    /// What the kernel had set when the mount was made.
    found_kb: Option<u32>,
    state: Arc<Mutex<ReadaheadState>>,
}

/// Where a mount's readahead is: only ever forward, so that a late [`Readahead::restore`]
/// never lowers the window [`Readahead::cached`] gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadaheadState {
    /// As the mount was made with it.
    AsMounted,
    /// The kernel's value back.
    Restored,
    /// [`CACHED_READAHEAD_KB`].
    Cached,
    /// The mount is no longer this process's to set.
    Forgotten,
}

impl Readahead {
    /// Sets the readahead of the FUSE connection mounted at `mountpoint` to `kb`. Page
    /// faults and reads then ask for little more than they need, which matters while every
    /// page comes over the network.
    fn set(mountpoint: &Path, kb: u32) -> std::io::Result<Self> {
        let this = Self::of(mountpoint)?;
        this.write(kb)?;
        Ok(this)
    }

    /// The knob of the FUSE connection mounted at `mountpoint`.
    fn of(mountpoint: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(mountpoint)?.dev();
        let knob = PathBuf::from(format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        ));
        Ok(Self {
            found_kb: read_kb(&knob).ok(),
            knob,
            state: Arc::new(Mutex::new(ReadaheadState::AsMounted)),
        })
    }

    fn write(&self, kb: u32) -> std::io::Result<()> {
        std::fs::write(&self.knob, kb.to_string())
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.knob.display())))
    }

    /// The kernel's own readahead back (what it had when the mount was made), unless the
    /// image is cached already: files opened from now on get it.
    pub fn restore(&self) {
        let mut state = crate::sync::lock(&self.state);
        let Some(kb) = self
            .found_kb
            .filter(|_| *state == ReadaheadState::AsMounted)
        else {
            return;
        };
        match self.write(kb) {
            Ok(()) => {
                *state = ReadaheadState::Restored;
                tracing::info!(kb, knob = %self.knob.display(), "readers read most of the image: the kernel's readahead is back");
            }
            Err(err) => tracing::debug!(%err, "the kernel's readahead not restored"),
        }
    }

    /// The image is all cached: [`CACHED_READAHEAD_KB`].
    pub fn cached(&self) {
        let mut state = crate::sync::lock(&self.state);
        if *state == ReadaheadState::Forgotten {
            return;
        }
        match self.write(CACHED_READAHEAD_KB) {
            Ok(()) => *state = ReadaheadState::Cached,
            Err(err) => tracing::debug!(%err, "readahead not raised for the cached image"),
        }
    }

    /// The mount is unmounted or left to another process: nothing sets its knob from now on
    /// (its device number may name another mount by then).
    fn forget(&self) {
        *crate::sync::lock(&self.state) = ReadaheadState::Forgotten;
    }

    /// The knob's value now, KiB.
    pub fn kb(&self) -> std::io::Result<u32> {
        read_kb(&self.knob)
    }
}

/// The readahead, in KiB, that the knob `knob` holds.
fn read_kb(knob: &Path) -> std::io::Result<u32> {
    std::fs::read_to_string(knob)?.trim().parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", knob.display()),
        )
    })
}

fn serve<F: FileSystem + Send + Sync>(mut channel: FuseChannel, server: &Server<Arc<F>>) {
    loop {
        match channel.get_request() {
            Ok(Some((reader, writer))) => {
                if let Err(err) = server.handle_message(reader, writer.into(), None, None) {
                    if matches!(err, fuse_backend_rs::Error::EncodeMessage(_)) {
                        break; // the kernel ended the session
                    }
                    tracing::debug!(%err, "FUSE request failed");
                }
            }
            Ok(None) => break, // woken to exit
            Err(err) => {
                tracing::debug!(%err, "FUSE channel closed");
                break;
            }
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        // Its device number may go to another mount: a late hook must not set that one's.
        if let Some(readahead) = &self.readahead {
            readahead.forget();
        }
        // Unmounted from outside already (the workers saw the kernel end the session): a
        // mount point that is no mount then is no failure. The session's own unmount sees that
        // on its descriptor.
        let gone = self.ended();
        let Some(mut session) = self.session.take() else {
            return;
        };
        let unmounted = match &self.placeholder {
            None => session.umount().map_err(|e| e.to_string()),
            Some(placeholder) => {
                // The session knows only its placeholder: unmount the real mount point here.
                let result = match umount_lazy(&self.mountpoint) {
                    Err(err) if gone && err.raw_os_error() == Some(libc::EINVAL) => Ok(()),
                    other => other.map_err(|e| e.to_string()),
                };
                let _ = session.umount();
                let _ = std::fs::remove_dir(placeholder);
                result
            }
        };
        if let Err(err) = unmounted {
            tracing::warn!(%err, mountpoint = %self.mountpoint.display(), "unmounting failed; run `umount -l` on it");
        }
        let _ = session.wake();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// umount2(MNT_DETACH): the mount goes now, busy or not.
pub fn umount_lazy(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_non_directory_mount_point_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("imgstream-mountpoint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let missing = dir.join("missing");
        let err = check_mountpoint(&missing).expect_err("a missing directory");
        assert_eq!(
            err.to_string(),
            format!(
                "mount point {}: no such directory (create it first)",
                missing.display()
            )
        );
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let file = dir.join("file");
        std::fs::write(&file, b"").expect("a file");
        let err = check_mountpoint(&file).expect_err("a file");
        assert!(err.to_string().ends_with(": not a directory"), "{err}");
        assert!(check_mountpoint(&dir).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn only_dev_fuse_is_a_fuse_connection() {
        let null = std::fs::File::open("/dev/null").expect("it opens");
        assert!(!is_fuse_device(&null));
        let file = std::fs::File::open("/proc/self/status").expect("it opens");
        assert!(!is_fuse_device(&file));
        // Opening /dev/fuse needs nothing but the device; where it is missing there is no
        // FUSE to test anyway.
        if let Ok(fuse) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            assert!(is_fuse_device(&fuse));
        }
        struct Nothing;
        impl FileSystem for Nothing {
            type Inode = u64;
            type Handle = u64;
        }
        let err = FuseMount::adopt(
            Arc::new(Nothing),
            Path::new("/nonexistent/imgstream-adopt"),
            "imgstream",
            null,
            1,
        )
        .expect_err("a descriptor that is not /dev/fuse is refused");
        assert!(matches!(err, MountError::NotFuse(_)), "{err}");
    }

    /// Reads `path` on another thread, bypassing the page cache (so the kernel neither
    /// retries a failed readahead nor answers from memory): `None` if it was not answered
    /// within `limit`.
    fn read_within(path: &Path, limit: std::time::Duration) -> Option<std::io::Result<Vec<u8>>> {
        use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_path_buf();
        thread::spawn(move || {
            let read = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .and_then(|mut file| {
                    let mut data = Vec::new();
                    file.read_to_end(&mut data).map(|_| data)
                });
            let _ = tx.send(read);
        });
        rx.recv_timeout(limit).ok()
    }

    #[test]
    fn a_read_that_panics_gets_eio_and_the_only_worker_serves_the_next() {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let dir = std::env::temp_dir().join(format!("imgstream-fuse-panic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let fs = crate::testing::hello_image_fs(&runtime, &dir, std::time::Duration::ZERO);
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("a mount point");
        // One worker: if a panic took it, nothing would answer the next read.
        let mount = FuseMount::mount(fs.clone(), &mnt, "imgstream-test", true, 1, None)
            .expect("mounting needs root and /dev/fuse");
        let connection = {
            use std::os::unix::fs::MetadataExt as _;
            libc::minor(std::fs::metadata(&mnt).expect("the mount answers").dev())
        };
        let file = mnt.join("data/hello.bin");
        let limit = std::time::Duration::from_secs(20);
        let panics = crate::fs::REQUEST_PANICS.load(std::sync::atomic::Ordering::SeqCst);
        fs.panic_next_read
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let first = read_within(&file, limit);
        let second = first.as_ref().and_then(|_| read_within(&file, limit));
        if second.is_none() {
            // Unanswered readers sleep in the kernel until the connection is aborted: end it
            // so that the test fails instead of hanging.
            let _ = std::fs::write(format!("/sys/fs/fuse/connections/{connection}/abort"), "1");
        }
        let first = first.expect("the panicking read was answered");
        assert_eq!(
            first.as_ref().err().and_then(std::io::Error::raw_os_error),
            Some(libc::EIO),
            "the panicking read fails with EIO (it read {:?} bytes)",
            first.as_ref().map(Vec::len).ok()
        );
        assert!(crate::fs::REQUEST_PANICS.load(std::sync::atomic::Ordering::SeqCst) > panics);
        let second = second
            .expect("the worker answered the next read")
            .expect("the next read succeeds");
        assert!(
            second == crate::testing::hello_content(),
            "the next read has the file's bytes"
        );
        drop(mount);
        drop(runtime);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_plain_gzip_layer_mounts_through_its_span_index_and_reads_a_span_per_miss() {
        use std::sync::atomic::Ordering;

        use crate::{
            fetch::{Fetcher, layer},
            fs::{FsConfig, ImageFs, View},
            image::gzip::{BuildOptions, MIN_SPAN, SpanIndex},
            oci::digest::Digest,
            registry::BlobSource,
            testing::{MemoryBlobs, gzip, layer_tar, plain_descriptor, scratch_cache},
        };
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let (tar, files) = layer_tar();
        let blob = gzip(&tar, 6);
        let desc = plain_descriptor(&blob);
        let index = SpanIndex::build(blob.as_slice(), BuildOptions { span: MIN_SPAN })
            .expect("the layer indexes");
        let opened = layer::open_indexed(
            &desc,
            &index,
            Digest::of(&index.encode().expect("an index encodes")),
        )
        .expect("it opens");
        let source = Arc::new(MemoryBlobs::default().with(blob.clone()));
        let (dir, cache) = scratch_cache("fuse-span");
        let dyn_source: Arc<dyn BlobSource> = source.clone();
        let fetcher = Arc::new(Fetcher::new(runtime.handle().clone(), dyn_source, cache));
        let fs = Arc::new(ImageFs::new(
            Arc::from(vec![opened]),
            View::Merged,
            fetcher.clone(),
            FsConfig::default(),
        ));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("a mount point");
        let mount = FuseMount::mount(fs, &mnt, "imgstream-test", true, 2, None)
            .expect("mounting needs root and /dev/fuse");
        // A small file: the one span that holds it, and nothing else.
        let (name, data) = &files[1];
        let got = std::fs::read(mnt.join(name)).expect("it reads");
        assert!(got == *data, "{name} differs");
        assert_eq!(source.ranges.load(Ordering::SeqCst), 1);
        let span = index.spans_for(0..1);
        assert_eq!(span, 0..1, "the first file is in the first span");
        // Every file through the kernel, as the tar holds it.
        for (name, data) in &files {
            let got = std::fs::read(mnt.join(name)).expect("it reads");
            assert!(got == *data, "{name} differs");
        }
        let listed = std::fs::read_dir(mnt.join("etc"))
            .expect("a directory")
            .count();
        assert_eq!(listed, files.len());
        fetcher.flush_cache_writes();
        drop(mount);
        drop(runtime);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Everything a reader sees of the tree under `root`: per path, its type, mode, size,
    /// and content or link target.
    fn snapshot(root: &Path) -> std::collections::BTreeMap<String, (String, u32, u64, Vec<u8>)> {
        use std::os::unix::fs::MetadataExt as _;
        let mut seen = std::collections::BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("a listing").flatten() {
                let path = entry.path();
                let meta = std::fs::symlink_metadata(&path).expect("attributes");
                let (kind, body) = if meta.is_dir() {
                    stack.push(path.clone());
                    ("dir", Vec::new())
                } else if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&path).expect("a target");
                    ("symlink", target.into_os_string().into_encoded_bytes())
                } else if meta.is_file() {
                    (
                        "file",
                        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
                    )
                } else {
                    ("other", Vec::new())
                };
                let name = path
                    .strip_prefix(root)
                    .expect("under the root")
                    .display()
                    .to_string();
                seen.insert(name, (kind.to_string(), meta.mode(), meta.len(), body));
            }
        }
        seen
    }

    /// Whether this kernel can do FUSE passthrough: Linux 6.9 or later built with
    /// `CONFIG_FUSE_PASSTHROUGH` (as its `/proc/config.gz` says, when it has one).
    fn kernel_has_passthrough() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u32>().ok());
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        let config = std::fs::read("/proc/config.gz").ok().map(|gz| {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(
                &mut flate2::read::GzDecoder::new(gz.as_slice()),
                &mut text,
            );
            text
        });
        version >= (6, 9)
            && config.is_none_or(|c| c.lines().any(|l| l == "CONFIG_FUSE_PASSTHROUGH=y"))
    }

    /// Drops the kernel's clean page cache (every file's), so the next reads come from
    /// wherever the file's data lives.
    fn drop_page_cache() {
        std::fs::write("/proc/sys/vm/drop_caches", "1").expect("dropping caches needs root");
    }

    #[test]
    fn the_tree_is_the_same_with_every_fuse_option_and_passthrough_and_the_kernel_takes_them() {
        use std::sync::atomic::Ordering::SeqCst;

        use crate::{
            fetch::{Fetcher, layer},
            fs::{FsConfig, ImageFs, View, options::FuseOptions},
            image::tar::{Header, Kind},
            registry::BlobSource,
            testing::{MemoryBlobs, bytes, estargz_layer, layer_descriptor, scratch_cache},
        };
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        // Directories, files of mixed sizes and modes, and a symlink.
        let mut entries = vec![
            (Header::new("usr/", Kind::Directory), Vec::new()),
            (Header::new("usr/lib/", Kind::Directory), Vec::new()),
            (Header::new("etc/", Kind::Directory), Vec::new()),
        ];
        let files = 24;
        for i in 0..files {
            let dir = if i % 2 == 0 { "etc" } else { "usr/lib" };
            let mut header = Header::new(&format!("{dir}/file-{i}"), Kind::Regular);
            header.mode = [0o644, 0o755, 0o600][i % 3];
            let len = [0, 1, 4096, 70_000, 300_000, 1 << 20][i % 6] + i;
            entries.push((header, bytes(i as u64 + 1, len, i % 2 == 0)));
        }
        let with_data = files - 1; // file-0 is empty
        let mut link = Header::new("lib", Kind::Symlink);
        link.link_name = "usr/lib".into();
        entries.push((link, Vec::new()));
        let (layer_blob, summary) = estargz_layer(&entries, 64 * 1024, false);
        let desc = layer_descriptor(&summary);
        let passthrough_here = kernel_has_passthrough();
        let mut trees = Vec::new();
        for (options, passthrough) in [
            (FuseOptions::none(), false),
            (FuseOptions::all(), false),
            (FuseOptions::all(), true),
        ] {
            let opened = runtime
                .block_on(layer::open_cached(
                    &MemoryBlobs::default().with(layer_blob.clone()),
                    &desc,
                    None,
                ))
                .expect("it opens");
            // A one-chunk file whose cached chunk is damaged before its backing file is
            // written: it must never pass through.
            let damaged = opened
                .index
                .nodes
                .iter()
                .find(|n| n.path == "etc/file-2")
                .and_then(|n| n.chunks.first())
                .map(|c| c.digest)
                .expect("etc/file-2 has a chunk");
            let source: Arc<dyn BlobSource> =
                Arc::new(MemoryBlobs::default().with(layer_blob.clone()));
            let (dir, cache) = scratch_cache(&format!(
                "fuse-options-{}-{passthrough}",
                options.names().len()
            ));
            let fetcher = Arc::new(Fetcher::new(
                runtime.handle().clone(),
                source,
                cache.clone(),
            ));
            let fs = Arc::new(ImageFs::new(
                Arc::from(vec![opened]),
                View::Merged,
                fetcher.clone(),
                FsConfig {
                    fuse_options: options,
                    passthrough,
                    ..FsConfig::default()
                },
            ));
            let mnt = dir.join("mnt");
            std::fs::create_dir_all(&mnt).expect("a mount point");
            let mount = FuseMount::mount(fs.clone(), &mnt, "imgstream-test", true, 2, None)
                .expect("mounting needs root and /dev/fuse");
            if let Some(device) = mount.fuse_fd().and_then(|fd| fd.try_clone_to_owned().ok()) {
                fs.attach_fuse_device(device);
            }
            // Twice: the second pass is where the kernel asks no more.
            let tree = snapshot(&mnt);
            fetcher.flush_cache_writes();
            if passthrough {
                // Before the second pass finds the file complete and queues its backing
                // file.
                let chunk = dir.join("cache/chunks").join(damaged.hex());
                let mut raw = std::fs::read(&chunk).expect("the chunk is cached");
                let last = raw.len() - 1;
                raw[last] ^= 0xff;
                std::fs::write(&chunk, raw).expect("damaged");
            }
            let ahead = fs.dir_ahead_files();
            assert!(snapshot(&mnt) == tree, "the same tree the second time");
            // The second pass went through each directory in listing order with every file
            // cached: where the kernel asked for its opens (with no-open and no passthrough
            // it reads from its page cache and asks nothing), files ahead of it were asked
            // from the disk before it got to them.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let opens_asked = options == FuseOptions::none() || fs.passthrough_enabled();
            while opens_asked && fs.dir_ahead_files() == ahead {
                assert!(
                    std::time::Instant::now() < deadline,
                    "files read ahead of the second pass"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let asked = |counter: &std::sync::atomic::AtomicU64| counter.load(SeqCst);
            let (opens, opendirs, plus) = (
                asked(&fs.asked.open),
                asked(&fs.asked.opendir),
                asked(&fs.asked.readdirplus),
            );
            assert_eq!(fs.passthrough_enabled(), passthrough && passthrough_here);
            if options == FuseOptions::none() {
                assert!(opens as usize >= 2 * files, "every open asked: {opens}");
                assert!(opendirs >= 2, "every listing asked: {opendirs}");
                assert_eq!(plus, 0, "no READDIRPLUS unless asked for");
            } else if !fs.passthrough_enabled() {
                assert_eq!(opens, 1, "OPEN asked once, answered ENOSYS, never again");
                assert_eq!(opendirs, 1, "OPENDIR likewise");
                assert!(plus > 0, "listings came with attributes");
            } else {
                // Passthrough is decided at OPEN: every open is asked.
                assert!(opens as usize >= 2 * files, "every open asked: {opens}");
                assert_eq!(opendirs, 1, "OPENDIR asked once, never again");
            }
            if passthrough {
                // The second pass found every file complete and queued its backing file.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while fs.passthrough_pending() > 0 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "backing files written"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let stats = fs.passthrough_stats();
                let (before_reads, before_opens) =
                    (asked(&fs.asked.read), stats.opens.load(SeqCst));
                drop_page_cache();
                assert!(
                    snapshot(&mnt) == tree,
                    "the same tree through backing files"
                );
                let (reads, passed) = (
                    asked(&fs.asked.read) - before_reads,
                    stats.opens.load(SeqCst) - before_opens,
                );
                if passthrough_here {
                    // Every file with data but the damaged one: its chunk failed its crc32
                    // check, so it has no backing file and its reads still come here (and
                    // fetch it again).
                    assert_eq!(passed as usize, with_data - 1, "opens passed through");
                    assert!(stats.written.load(SeqCst) as usize >= with_data - 1);
                    assert!(
                        stats.failed.load(SeqCst) >= 1,
                        "the damaged chunk wrote no file"
                    );
                    assert!(
                        reads > 0 && reads < 8,
                        "only the damaged file was read here: {reads}"
                    );
                    assert!(!dir.join("cache/files").join(damaged.hex()).exists());
                    // Opened again and again: the backing id registered at its first open,
                    // idle since, is used again; no open of the backing file, no ioctl.
                    let (registered, opened) =
                        (stats.registered.load(SeqCst), stats.opens.load(SeqCst));
                    for _ in 0..3 {
                        drop(std::fs::read(mnt.join("etc/file-4")).expect("it reads"));
                    }
                    assert_eq!(stats.opens.load(SeqCst), opened + 3);
                    assert_eq!(
                        stats.registered.load(SeqCst),
                        registered,
                        "no new backing id"
                    );
                    // mmap and overlayfs on top (as containerd mounts it) pass through too.
                    let big = mnt.join("usr/lib/file-5");
                    let expected = std::fs::read(&big).expect("it reads");
                    drop_page_cache();
                    let before = asked(&fs.asked.read);
                    assert!(mapped(&big) == expected, "mmap reads the same bytes");
                    let overlay = dir.join("overlay");
                    for sub in ["upper", "work", "merged"] {
                        std::fs::create_dir_all(overlay.join(sub)).expect("a directory");
                    }
                    let options = format!(
                        "lowerdir={},upperdir={},workdir={}",
                        mnt.display(),
                        overlay.join("upper").display(),
                        overlay.join("work").display()
                    );
                    mount_overlay(&overlay.join("merged"), &options);
                    let through = std::fs::read(overlay.join("merged/usr/lib/file-5"));
                    unmount(&overlay.join("merged"));
                    assert!(through.expect("reads through overlayfs") == expected);
                    assert_eq!(asked(&fs.asked.read), before, "no READ reached the agent");
                } else {
                    assert_eq!(passed, 0, "no passthrough on this kernel");
                    assert!(reads > 0, "reads come to the agent");
                }
            }
            trees.push(tree);
            fetcher.flush_cache_writes();
            drop(mount);
            let _ = std::fs::remove_dir_all(&dir);
        }
        assert!(!trees[0].is_empty());
        assert!(trees[0] == trees[1], "the same tree either way");
        assert!(trees[0] == trees[2], "the same tree with passthrough");
        drop(runtime);
    }

    /// `path`'s bytes read through a shared mapping.
    fn mapped(path: &Path) -> Vec<u8> {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(path).expect("it opens");
        let len = file.metadata().expect("attributes").len() as usize;
        // SAFETY: a fresh read-only mapping of an open file, unmapped below before the file
        // is closed; nothing else maps it.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            let bytes = std::slice::from_raw_parts(at.cast::<u8>(), len).to_vec();
            libc::munmap(at, len);
            bytes
        }
    }

    fn mount_overlay(at: &Path, options: &str) {
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (source, target, kind, data) = (
            c("overlay"),
            c(at.to_str().expect("UTF-8")),
            c("overlay"),
            c(options),
        );
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                kind.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "overlayfs mounts: {}",
            std::io::Error::last_os_error()
        );
    }

    /// A knob that is a plain file holding `kb`, as the kernel's holds the value at mount.
    fn knob_file(name: &str, kb: u32) -> Readahead {
        let knob =
            std::env::temp_dir().join(format!("imgstream-readahead-{name}-{}", std::process::id()));
        std::fs::write(&knob, format!("{kb}\n")).expect("a scratch file");
        Readahead {
            knob,
            found_kb: Some(kb),
            state: Arc::new(Mutex::new(ReadaheadState::AsMounted)),
        }
    }

    #[test]
    fn readahead_only_ever_goes_forward_and_never_after_the_mount_is_gone() {
        let readahead = knob_file("forward", 128);
        readahead.write(0).expect("set for the start");
        readahead.clone().restore();
        assert_eq!(
            readahead.kb().expect("readable"),
            128,
            "the kernel's value back"
        );
        readahead.cached();
        assert_eq!(readahead.kb().expect("readable"), CACHED_READAHEAD_KB);
        readahead.restore();
        assert_eq!(
            readahead.kb().expect("readable"),
            CACHED_READAHEAD_KB,
            "a late restore does not lower a cached image's"
        );
        let _ = std::fs::remove_file(&readahead.knob);

        let gone = knob_file("gone", 128);
        gone.write(0).expect("set for the start");
        gone.forget();
        gone.restore();
        gone.cached();
        assert_eq!(
            gone.kb().expect("readable"),
            0,
            "an unmounted mount's device number may be another's: left alone"
        );
        let _ = std::fs::remove_file(&gone.knob);
    }

    fn unmount(at: &Path) {
        let target = std::ffi::CString::new(at.to_str().expect("UTF-8")).expect("no NUL");
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}
