//! How chunk files reach the disk: io_uring (linked write, write, fdatasync in one
//! submission) or plain synchronous writes, behind one trait and chosen by probing at
//! start-up (kernels or sandboxes without io_uring get the synchronous engine).

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::FileExt},
    sync::Mutex,
};

use io_uring::{IoUring, opcode, squeue, types};

/// Writes a whole file's content and makes it durable.
pub trait CacheEngine: Send + Sync {
    fn name(&self) -> &'static str;

    /// Writes `parts` one after the other from offset 0 of `file`; with `durable`, also syncs
    /// its data before returning.
    fn write_parts(&self, file: &File, parts: &[&[u8]], durable: bool) -> io::Result<()>;
}

/// `write_all` + `sync_data`.
#[derive(Debug, Default)]
pub struct SyncEngine;

impl CacheEngine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn write_parts(&self, file: &File, parts: &[&[u8]], durable: bool) -> io::Result<()> {
        let mut offset = 0;
        for part in parts {
            file.write_all_at(part, offset)?;
            offset += part.len() as u64;
        }
        if durable { file.sync_data() } else { Ok(()) }
    }
}

/// One ring, shared under a mutex: chunk writes are short and the fetcher, not the disk, is
/// the bottleneck. Each call submits its writes and the fdatasync linked, so they run in
/// order, and waits for all of their completions before returning.
pub struct UringEngine {
    ring: Mutex<IoUring>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringEngine")
    }
}

/// Most parts one call may pass (header and data, with room to spare).
const MAX_PARTS: usize = 6;

impl UringEngine {
    /// A ring, if this kernel and sandbox allow one (probed with a NOP round trip).
    pub fn probe() -> io::Result<Self> {
        let mut ring = IoUring::new(2 * MAX_PARTS as u32)?;
        let nop = opcode::Nop::new().build().user_data(0);
        // SAFETY: a NOP carries no buffers or file descriptors.
        unsafe { ring.submission().push(&nop) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("no completion for NOP"))?;
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(Self {
            ring: Mutex::new(ring),
        })
    }
}

impl CacheEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn write_parts(&self, file: &File, parts: &[&[u8]], durable: bool) -> io::Result<()> {
        if parts.len() > MAX_PARTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many parts for one submission",
            ));
        }
        let fd = types::Fd(file.as_raw_fd());
        let mut ring = self
            .ring
            .lock()
            .map_err(|_| io::Error::other("io_uring lock poisoned"))?;
        let mut offset = 0u64;
        let mut pushed = 0;
        for (i, part) in parts.iter().enumerate() {
            let len = u32::try_from(part.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "part too large"))?;
            // Link each write to the next entry, so they run in order and a failure cancels
            // the rest; the last entry of the submission carries no link.
            let link = i + 1 < parts.len() || durable;
            let flags = if link {
                squeue::Flags::IO_LINK
            } else {
                squeue::Flags::empty()
            };
            let write = opcode::Write::new(fd, part.as_ptr(), len)
                .offset(offset)
                .build()
                .flags(flags)
                .user_data(i as u64);
            // SAFETY: `part` and `file` stay borrowed until this function returns, and it does
            // not return before every submitted entry has completed (submit_and_wait below
            // waits for all of them), so the kernel never sees a dangling buffer or fd.
            unsafe { ring.submission().push(&write) }
                .map_err(|_| io::Error::other("submission queue full"))?;
            offset += part.len() as u64;
            pushed += 1;
        }
        if durable {
            let fsync = opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(parts.len() as u64);
            // SAFETY: as above; fsync carries only the fd, borrowed for the whole call.
            unsafe { ring.submission().push(&fsync) }
                .map_err(|_| io::Error::other("submission queue full"))?;
            pushed += 1;
        }
        ring.submit_and_wait(pushed)?;
        let mut first_error = None;
        let mut completed = 0;
        while completed < pushed {
            let Some(cqe) = ring.completion().next() else {
                ring.submit_and_wait(pushed - completed)?;
                continue;
            };
            completed += 1;
            let index = cqe.user_data() as usize;
            let result = cqe.result();
            let expected = parts.get(index).map_or(0, |p| p.len() as i32);
            if first_error.is_none() {
                if result < 0 && result != -libc::ECANCELED {
                    first_error = Some(io::Error::from_raw_os_error(-result));
                } else if result >= 0 && index < parts.len() && result != expected {
                    first_error = Some(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "short write through io_uring",
                    ));
                } else if result == -libc::ECANCELED {
                    first_error = Some(io::Error::other("io_uring write chain cancelled"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The io_uring engine when it works here, else the synchronous one.
pub fn probe(prefer_uring: bool) -> Box<dyn CacheEngine> {
    if prefer_uring {
        match UringEngine::probe() {
            Ok(engine) => return Box::new(engine),
            Err(err) => {
                tracing::warn!(%err, "io_uring is not available; the cache writes synchronously")
            }
        }
    }
    Box::new(SyncEngine)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(engine: &dyn CacheEngine) {
        let path = std::env::temp_dir().join(format!(
            "imgstream-engine-{}-{}",
            engine.name(),
            std::process::id()
        ));
        let file = File::create(&path).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        engine
            .write_parts(&file, &[b"header..", &data], true)
            .unwrap();
        engine
            .write_parts(&file, &[b"header..", &data], false)
            .unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..8], b"header..");
        assert!(back[8..] == data[..], "the data came back intact");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn both_engines_write_what_they_are_given() {
        round_trip(&SyncEngine);
        round_trip(&UringEngine::probe().expect("io_uring works on this machine (MACHINE.md)"));
    }

    #[test]
    fn uring_reports_errors() {
        let engine = UringEngine::probe().unwrap();
        // A read-only fd: the write fails with EBADF and the chain stops.
        let path = std::env::temp_dir().join(format!("imgstream-engine-ro-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let file = File::open(&path).unwrap();
        let err = engine.write_parts(&file, &[b"data"], true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
