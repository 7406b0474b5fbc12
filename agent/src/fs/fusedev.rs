//! The FUSE transport: mounts any `FileSystem` on a directory through /dev/fuse and serves it
//! with worker threads. It moves messages only; what the files are is the filesystem's
//! business. Unmounts (lazily, so busy mounts do not linger) when dropped.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
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
}

/// A mounted filesystem and its worker threads.
pub struct FuseMount {
    session: FuseSession,
    workers: Vec<thread::JoinHandle<()>>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl FuseMount {
    /// Mounts `fs` read-only (or not) at `mountpoint` and serves it with `threads` workers.
    pub fn mount<F>(
        fs: Arc<F>,
        mountpoint: &Path,
        fsname: &str,
        readonly: bool,
        threads: usize,
    ) -> Result<Self, MountError>
    where
        F: FileSystem + Send + Sync + 'static,
    {
        let where_ = mountpoint.display().to_string();
        let mut session = FuseSession::new(mountpoint, fsname, "", readonly)
            .map_err(|e| MountError::Mount(where_.clone(), e))?;
        session.mount().map_err(|e| MountError::Mount(where_, e))?;
        let server = Arc::new(Server::new(fs));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let channel = session.new_channel().map_err(MountError::Channel)?;
            let server = server.clone();
            let worker = thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || serve(channel, &server))
                .map_err(MountError::Thread)?;
            workers.push(worker);
        }
        Ok(Self {
            session,
            workers,
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
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
        if let Err(err) = self.session.umount() {
            tracing::warn!(%err, mountpoint = %self.mountpoint.display(), "unmounting failed; run `umount -l` on it");
        }
        let _ = self.session.wake();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
