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
/// order, and reaps every completion of every entry the kernel took before it returns, on
/// success and failure alike: the ring is empty between calls, so a completion is always read
/// by the call whose entry it is.
pub struct UringEngine {
    ring: Mutex<Ring>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringEngine")
    }
}

/// Most parts one call may pass (header and data, with room to spare).
const MAX_PARTS: usize = 6;
/// Submission queue entries: one call's writes and its fdatasync, twice over.
const RING_ENTRIES: u32 = 2 * MAX_PARTS as u32;

/// The ring, and (in tests) a fault to inject into its next `io_uring_enter`.
struct Ring {
    ring: IoUring,
    #[cfg(test)]
    fault: Option<Fault>,
}

/// Failures of `io_uring_enter` that are rare in life and must still leave the ring sound.
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The kernel took the entries, then the wait was interrupted by a signal.
    InterruptedAfterSubmit,
    /// The call failed before the kernel took any entry (as `EINVAL` or `ENOMEM` do).
    FailedBeforeSubmit(i32),
}

impl Ring {
    fn new() -> io::Result<Self> {
        Ok(Self {
            ring: IoUring::new(RING_ENTRIES)?,
            #[cfg(test)]
            fault: None,
        })
    }

    /// `io_uring_enter`: submits what is queued and waits for `want` completions.
    fn enter(&mut self, want: usize) -> io::Result<usize> {
        #[cfg(test)]
        match self.fault.take() {
            Some(Fault::InterruptedAfterSubmit) => {
                self.ring.submit()?;
                return Err(io::Error::from_raw_os_error(libc::EINTR));
            }
            Some(Fault::FailedBeforeSubmit(errno)) => {
                return Err(io::Error::from_raw_os_error(errno));
            }
            None => {}
        }
        self.ring.submit_and_wait(want)
    }
}

impl UringEngine {
    /// A ring, if this kernel and sandbox allow one (probed with a NOP round trip).
    pub fn probe() -> io::Result<Self> {
        let mut ring = Ring::new()?;
        let nop = opcode::Nop::new().build().user_data(0);
        // SAFETY: a NOP carries no buffers or file descriptors.
        unsafe { ring.ring.submission().push(&nop) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        ring.ring.submit_and_wait(1)?;
        let cqe = ring
            .ring
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

    #[cfg(test)]
    fn inject(&self, fault: Fault) {
        crate::sync::lock(&self.ring).fault = Some(fault);
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
        let mut entries = Vec::with_capacity(MAX_PARTS + 1);
        let mut offset = 0u64;
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
            entries.push(
                opcode::Write::new(fd, part.as_ptr(), len)
                    .offset(offset)
                    .build()
                    .flags(flags)
                    .user_data(i as u64),
            );
            offset += part.len() as u64;
        }
        if durable {
            entries.push(
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(parts.len() as u64),
            );
        }
        let mut ring = crate::sync::lock(&self.ring);
        // SAFETY: every entry points into `parts` and at `file`, both borrowed for this whole
        // call, and the call does not return while the kernel holds any of them: `run` reaps
        // a completion for every entry the kernel took before returning, on every path, and
        // entries it never took are dropped with the ring. `push_multiple` queues all of the
        // entries or none.
        unsafe { ring.ring.submission().push_multiple(&entries) }
            .map_err(|_| io::Error::other("io_uring submission queue unexpectedly full"))?;
        run(&mut ring, parts)
    }
}

/// Submits the queued entries and reaps one completion for each entry the kernel took;
/// returns the first failure among them. If the kernel refused to take some entries, the ring
/// is replaced, so that they can never run later, and the refusal is returned.
fn run(ring: &mut Ring, parts: &[&[u8]]) -> io::Result<()> {
    let queued = ring.ring.submission().len();
    let mut refused = None;
    let mut first_error = None;
    let mut reaped = 0;
    loop {
        let left = ring.ring.submission().len();
        let taken = queued - left;
        while let Some(cqe) = ring.ring.completion().next() {
            reaped += 1;
            if first_error.is_none() {
                first_error = completion_error(cqe.user_data() as usize, cqe.result(), parts);
            }
        }
        if reaped >= taken && (left == 0 || refused.is_some()) {
            break;
        }
        // Entries still queued are submitted by this call too; it waits for what is in flight.
        match ring.enter(taken - reaped + left) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) if left == ring.ring.submission().len() && left > 0 => refused = Some(e),
            Err(e) => {
                // Nothing is left to submit and the wait failed: completions of entries the
                // kernel holds are still due, so wait again rather than return early.
                tracing::warn!(err = %e, "io_uring wait failed; waiting again for in-flight writes");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
    if let Some(err) = refused {
        *ring = Ring::new()?;
        return Err(err);
    }
    first_error.map_or(Ok(()), Err)
}

/// What a completion says went wrong, if anything: an error, a short write, or a link
/// cancelled by an earlier failure.
fn completion_error(index: usize, result: i32, parts: &[&[u8]]) -> Option<io::Error> {
    if result == -libc::ECANCELED {
        return Some(io::Error::other("io_uring write chain cancelled"));
    }
    if result < 0 {
        return Some(io::Error::from_raw_os_error(-result));
    }
    let expected = parts.get(index).map(|p| p.len());
    (expected.is_some_and(|len| result as usize != len))
        .then(|| io::Error::new(io::ErrorKind::WriteZero, "short write through io_uring"))
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

    /// Writes `head` and `data` to a fresh file (opened read-only when asked): the call's result.
    fn written(engine: &UringEngine, name: &str, data: &[u8], read_only: bool) -> io::Result<()> {
        let path =
            std::env::temp_dir().join(format!("imgstream-fault-{name}-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let file = if read_only {
            File::open(&path).unwrap()
        } else {
            File::options().write(true).open(&path).unwrap()
        };
        let result = engine.write_parts(&file, &[b"head", data], true);
        std::fs::remove_file(path).unwrap();
        result
    }

    #[test]
    fn an_interrupted_wait_still_reaps_its_own_completions() {
        let engine = UringEngine::probe().unwrap();
        let path = std::env::temp_dir().join(format!("imgstream-eintr-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        engine.inject(Fault::InterruptedAfterSubmit);
        engine
            .write_parts(&file, &[b"head", b"body"], true)
            .expect("the interrupted call waits again and finishes its writes");
        assert_eq!(std::fs::read(&path).unwrap(), b"headbody");
        std::fs::remove_file(path).unwrap();
        // The next call's failure is its own: it does not read the previous call's
        // completions as its result.
        let err = written(&engine, "after-eintr", b"x", true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        written(&engine, "after-eintr-ok", b"y", false).unwrap();
    }

    #[test]
    fn a_refused_submission_never_runs_later() {
        let engine = UringEngine::probe().unwrap();
        let path = std::env::temp_dir().join(format!("imgstream-refused-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        engine.inject(Fault::FailedBeforeSubmit(libc::ENOMEM));
        let err = engine
            .write_parts(&file, &[b"stale", b"write"], true)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOMEM), "{err}");
        // The next call submits only its own entries: its result is its own, and the
        // refused writes never reach the first file.
        let err = written(&engine, "after-refusal", b"x", true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        written(&engine, "after-refusal-ok", b"y", false).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"",
            "the refused entries never ran"
        );
        std::fs::remove_file(path).unwrap();
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
