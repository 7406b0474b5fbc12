//! Loading imgstream's eBPF programs into the kernel and draining what they report.
//!
//! Owns the embedded object file, the prerequisites (privileges, tracefs, the tracepoint
//! layouts the programs assume), attaching, and the ring buffer and drop counters. Hands out
//! decoded [`RenameFailure`]s; what they mean is `detect`'s business.

pub mod btf;
mod lifecycle;
mod prereq;
mod sweep;

use std::{os::fd::AsRawFd, time::Duration};

use aya::{
    Ebpf, EbpfError,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, TracePoint},
};
use imgstream_ebpf::{RenameInflight, counter, maps, programs};

pub use lifecycle::{LifecycleDrops, StartProbes};
pub use prereq::{PrereqError, check_prerequisites};

use crate::events::{DecodeError, RenameFailure};

/// The eBPF object built from `agent-ebpf` by `build.rs`.
pub(crate) static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imgstream-probes"));

/// Tracepoints of the detector: (program, tracepoint) in the `syscalls` category.
const RENAME_TRACEPOINTS: [(&str, &str); 6] = [
    (programs::ENTER_RENAME, "sys_enter_rename"),
    (programs::ENTER_RENAMEAT, "sys_enter_renameat"),
    (programs::ENTER_RENAMEAT2, "sys_enter_renameat2"),
    (programs::EXIT_RENAME, "sys_exit_rename"),
    (programs::EXIT_RENAME, "sys_exit_renameat"),
    (programs::EXIT_RENAME, "sys_exit_renameat2"),
];

/// Errors setting up the probes.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The machine lacks something the probes need; the message says how to fix it.
    #[error(transparent)]
    Prerequisite(#[from] PrereqError),
    /// The kernel refused the object (maps or BTF).
    #[error("loading the eBPF object into the kernel")]
    LoadObject(#[source] EbpfError),
    /// The object lacks a program the agent expects (agent and agent-ebpf out of step).
    #[error("the eBPF object has no program named {0}")]
    MissingProgram(&'static str),
    /// The object lacks a map the agent expects.
    #[error("the eBPF object has no map named {0}")]
    MissingMap(&'static str),
    /// The verifier rejected a program, or attaching it failed.
    #[error("loading or attaching {program} to syscalls/{tracepoint}")]
    Attach {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: ProgramError,
    },
    /// A map has another type than the agent expects.
    #[error("opening map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// Waiting on the ring buffer failed.
    #[error("polling the rename event ring buffer")]
    Poll(#[source] std::io::Error),
}

/// Drops the kernel side counted, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DropCounters {
    /// Rename events lost to a full ring buffer.
    pub rename_events_dropped: u64,
    /// Renames not tracked because the in-flight map was full.
    pub rename_inflight_full: u64,
    /// Failed renames whose path could not be read.
    pub rename_path_unreadable: u64,
}

/// The rename-ENXIO probes, loaded and attached. Detaches when dropped.
pub struct RenameProbes {
    // Keeps programs and links alive; holds the in-flight map.
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for RenameProbes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenameProbes").finish_non_exhaustive()
    }
}

impl RenameProbes {
    /// Checks prerequisites, loads the programs and attaches them to the rename tracepoints.
    pub fn attach() -> Result<Self, ProbeError> {
        check_prerequisites(&RENAME_TRACEPOINTS.map(|(_, tp)| tp))?;
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(PROBES_OBJECT).map_err(ProbeError::LoadObject)?;
        for (program, tracepoint) in RENAME_TRACEPOINTS {
            let prog: &mut TracePoint = ebpf
                .program_mut(program)
                .ok_or(ProbeError::MissingProgram(program))?
                .try_into()
                .map_err(|source| ProbeError::Attach {
                    program,
                    tracepoint,
                    source,
                })?;
            // The exit program serves three tracepoints: load it once, attach it thrice.
            if prog.fd().is_err() {
                prog.load().map_err(|source| ProbeError::Attach {
                    program,
                    tracepoint,
                    source,
                })?;
            }
            prog.attach("syscalls", tracepoint)
                .map_err(|source| ProbeError::Attach {
                    program,
                    tracepoint,
                    source,
                })?;
        }
        let map = |name: &'static str, ebpf: &mut Ebpf| {
            ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))
        };
        let events = RingBuf::try_from(map(maps::RENAME_EVENTS, &mut ebpf)?).map_err(|source| {
            ProbeError::Map {
                name: maps::RENAME_EVENTS,
                source,
            }
        })?;
        let counters =
            PerCpuArray::try_from(map(maps::COUNTERS, &mut ebpf)?).map_err(|source| {
                ProbeError::Map {
                    name: maps::COUNTERS,
                    source,
                }
            })?;
        tracing::info!(
            tracepoints = RENAME_TRACEPOINTS.len(),
            "rename-ENXIO probes attached"
        );
        Ok(Self {
            ebpf,
            events,
            counters,
        })
    }

    fn inflight(&mut self) -> Option<HashMap<&mut MapData, u64, RenameInflight>> {
        HashMap::try_from(self.ebpf.map_mut(maps::RENAME_INFLIGHT)?).ok()
    }

    /// Removes in-flight entries of threads that no longer exist (their `sys_exit` never
    /// came: the programs were attached mid-syscall); how many.
    pub fn sweep(&mut self) -> usize {
        self.inflight().map_or(0, |mut map| {
            sweep::sweep(&mut map, |key| !sweep::thread_alive(key))
        })
    }

    /// Fills the in-flight map with entries of a thread that does not exist, until it
    /// refuses one: `Ok(how many)`, or `Err(how many)` if it never refused (it evicts).
    pub(crate) fn fill_inflight(&mut self) -> Result<u64, u64> {
        let Some(mut map) = self.inflight() else {
            return Err(0);
        };
        let nobody = RenameInflight {
            oldname: 0,
            newname: 0,
            olddfd: 0,
            newdfd: 0,
            flags: 0,
            syscall: 0,
        };
        // Thread group u32::MAX is past any pid_max.
        let limit = 2 * u64::from(maps::RENAME_INFLIGHT_ENTRIES);
        sweep::fill(&mut map, nobody, |n| (u64::from(u32::MAX) << 32) | n, limit)
    }

    /// Waits up to `timeout` for events, then returns all that are queued (possibly none).
    pub fn next_batch(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<Result<RenameFailure, DecodeError>>, ProbeError> {
        let mut batch = self.drain();
        if batch.is_empty() {
            wait_readable(self.events.as_raw_fd(), timeout)?;
            batch = self.drain();
        }
        Ok(batch)
    }

    /// Everything queued in the ring buffer now, without waiting.
    pub fn drain(&mut self) -> Vec<Result<RenameFailure, DecodeError>> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            out.push(RenameFailure::decode(&item));
        }
        out
    }

    /// The kernel side's drop counters.
    pub fn drops(&self) -> DropCounters {
        let sum = |index: u32| {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        DropCounters {
            rename_events_dropped: sum(counter::RENAME_EVENTS_DROPPED),
            rename_inflight_full: sum(counter::RENAME_INFLIGHT_FULL),
            rename_path_unreadable: sum(counter::RENAME_PATH_UNREADABLE),
        }
    }
}

pub(crate) fn wait_readable(fd: i32, timeout: Duration) -> Result<(), ProbeError> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(ProbeError::Poll(err));
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it, best effort.
pub(crate) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: passes a valid rlimit by pointer; the call only reads it.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc != 0 {
        tracing::debug!("could not lift RLIMIT_MEMLOCK; fine on kernels 5.11 and later");
    }
}
