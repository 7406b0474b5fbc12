//! The start-latency probes: cgroup creation, first exec, first log line and exit of each
//! watched cgroup (see agent-ebpf's `lifecycle.rs`). The agent decides which new cgroups are
//! containers and [`StartProbes::unwatch`]es the rest.

use std::{os::fd::AsRawFd, time::Duration};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use imgstream_ebpf::{ContainerState, KernelOffsets, counter, maps, programs, tp, tp_fields};

use super::{
    PROBES_OBJECT, ProbeError,
    prereq::Fields,
    raise_memlock_limit,
    sweep::{self, CgroupRoot},
    wait_readable,
};
use crate::events::{DecodeError, Lifecycle};

/// (program, category, tracepoint, fields the program reads at fixed offsets).
const TRACEPOINTS: [(&str, &str, &str, Fields); 5] = [
    (
        programs::CGROUP_MKDIR,
        "cgroup",
        "cgroup_mkdir",
        &[
            ("root", tp_fields::MKDIR_ROOT),
            ("id", tp_fields::MKDIR_ID),
            ("path", tp_fields::MKDIR_PATH),
        ],
    ),
    (
        programs::PROCESS_EXEC,
        "sched",
        "sched_process_exec",
        &[("filename", tp_fields::EXEC_FILENAME)],
    ),
    (programs::PROCESS_EXIT, "sched", "sched_process_exit", &[]),
    (
        programs::ENTER_WRITE,
        "syscalls",
        "sys_enter_write",
        &[("fd", tp::arg(0)), ("count", tp::arg(2))],
    ),
    (
        programs::ENTER_WRITEV,
        "syscalls",
        "sys_enter_writev",
        &[("fd", tp::arg(0)), ("vlen", tp::arg(2))],
    ),
];

/// What the start-latency programs dropped, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LifecycleDrops {
    /// Events lost to a full ring buffer.
    pub events_dropped: u64,
    /// New cgroups not watched because the state map refused them.
    pub containers_full: u64,
    /// Writes whose file type could not be read (counted as log lines).
    pub log_fd_unreadable: u64,
}

/// The write programs, attached only while a container waits for its first log line: each
/// write(2) of every process pays for them while attached.
const WRITE_PROGRAMS: [&str; 2] = [programs::ENTER_WRITE, programs::ENTER_WRITEV];

/// The start-latency probes, loaded and attached. Detached when dropped.
pub struct StartProbes {
    ebpf: Ebpf,
    /// The write programs' links while armed.
    write_links: Vec<(&'static str, TracePointLinkId)>,
    events: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    /// Where cgroups are looked up by id, to sweep the state map (none: no sweeping).
    cgroups: Option<CgroupRoot>,
    /// Whether the log-line check can tell files from pipes (the kernel has BTF).
    pub redirects_detected: bool,
}

impl std::fmt::Debug for StartProbes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartProbes")
            .field("redirects_detected", &self.redirects_detected)
            .finish_non_exhaustive()
    }
}

impl StartProbes {
    /// Checks the tracepoints' layouts, loads the programs, writes the kernel's struct
    /// offsets and attaches.
    pub fn attach() -> Result<Self, ProbeError> {
        let layouts: Vec<(&str, &str, Fields)> = TRACEPOINTS
            .iter()
            .map(|(_, category, name, fields)| (*category, *name, *fields))
            .collect();
        super::prereq::check_tracepoints(&layouts)?;
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(PROBES_OBJECT).map_err(ProbeError::LoadObject)?;
        let offsets = match super::btf::kernel_offsets() {
            Ok(offsets) => offsets,
            Err(err) => {
                tracing::warn!(%err, "no kernel BTF: writes to a file a container redirected its stdout to will count as log lines");
                KernelOffsets::default()
            }
        };
        {
            let map = ebpf
                .map_mut(maps::OFFSETS)
                .ok_or(ProbeError::MissingMap(maps::OFFSETS))?;
            let mut array: Array<_, KernelOffsets> =
                Array::try_from(map).map_err(|source| ProbeError::Map {
                    name: maps::OFFSETS,
                    source,
                })?;
            array.set(0, offsets, 0).map_err(|source| ProbeError::Map {
                name: maps::OFFSETS,
                source,
            })?;
        }
        for (program, category, tracepoint, _) in TRACEPOINTS {
            let attach_err = |source| ProbeError::Attach {
                program,
                tracepoint,
                source,
            };
            let prog: &mut TracePoint = ebpf
                .program_mut(program)
                .ok_or(ProbeError::MissingProgram(program))?
                .try_into()
                .map_err(attach_err)?;
            prog.load().map_err(attach_err)?;
            if !WRITE_PROGRAMS.contains(&program) {
                prog.attach(category, tracepoint).map_err(attach_err)?;
            }
        }
        let take = |name: &'static str, ebpf: &mut Ebpf| {
            ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))
        };
        let events =
            RingBuf::try_from(take(maps::LIFECYCLE_EVENTS, &mut ebpf)?).map_err(|source| {
                ProbeError::Map {
                    name: maps::LIFECYCLE_EVENTS,
                    source,
                }
            })?;
        let counters =
            PerCpuArray::try_from(take(maps::COUNTERS, &mut ebpf)?).map_err(|source| {
                ProbeError::Map {
                    name: maps::COUNTERS,
                    source,
                }
            })?;
        tracing::info!(
            tracepoints = TRACEPOINTS.len(),
            redirects_detected = offsets.valid == 1,
            "start-latency probes attached"
        );
        let cgroups = crate::attribution::find_cgroup2_mount()
            .ok()
            .and_then(|root| CgroupRoot::open(&root).ok());
        if cgroups.is_none() {
            tracing::warn!(
                "the cgroup2 root could not be opened: watched cgroups that vanish unseen are not swept"
            );
        }
        Ok(Self {
            ebpf,
            write_links: Vec::new(),
            events,
            counters,
            cgroups,
            redirects_detected: offsets.valid == 1,
        })
    }

    fn containers(&mut self) -> Option<HashMap<&mut MapData, u64, ContainerState>> {
        HashMap::try_from(self.ebpf.map_mut(maps::CONTAINERS)?).ok()
    }

    /// Removes the state of watched cgroups that no longer exist (the agent missed their
    /// creation or their end: a full ring buffer, an agent restart); how many.
    pub fn sweep(&mut self) -> usize {
        let Some(cgroups) = self.cgroups.take() else {
            return 0;
        };
        let swept = self
            .containers()
            .map_or(0, |mut map| sweep::sweep(&mut map, |id| !cgroups.alive(id)));
        self.cgroups = Some(cgroups);
        swept
    }

    /// Fills the state map with cgroups that do not exist, until it refuses one:
    /// `Ok(how many)`, or `Err(how many)` if it never refused (it evicts).
    pub(crate) fn fill_containers(&mut self) -> Result<u64, u64> {
        let Some(mut map) = self.containers() else {
            return Err(0);
        };
        // Ids from the top of the range: kernfs hands them out from the bottom.
        let limit = 2 * u64::from(maps::CONTAINERS_ENTRIES);
        sweep::fill(&mut map, ContainerState::default(), |n| u64::MAX - n, limit)
    }

    /// Waits up to `timeout` for events, then returns all that are queued (possibly none).
    pub fn next_batch(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<Result<Lifecycle, DecodeError>>, ProbeError> {
        let mut batch = self.drain();
        if batch.is_empty() {
            wait_readable(self.events.as_raw_fd(), timeout)?;
            batch = self.drain();
        }
        Ok(batch)
    }

    fn drain(&mut self) -> Vec<Result<Lifecycle, DecodeError>> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            out.push(Lifecycle::decode(&item));
        }
        out
    }

    /// Attaches the write programs (a container is starting); idempotent.
    pub fn arm_writes(&mut self) -> Result<(), ProbeError> {
        if !self.write_links.is_empty() {
            return Ok(());
        }
        for (program, category, tracepoint, _) in TRACEPOINTS
            .iter()
            .filter(|(program, ..)| WRITE_PROGRAMS.contains(program))
        {
            let attach_err = |source| ProbeError::Attach {
                program,
                tracepoint,
                source,
            };
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut(program)
                .ok_or(ProbeError::MissingProgram(program))?
                .try_into()
                .map_err(attach_err)?;
            let link = prog.attach(category, tracepoint).map_err(attach_err)?;
            self.write_links.push((program, link));
        }
        tracing::debug!("write probes armed");
        Ok(())
    }

    /// Detaches the write programs (no container waits for its first log line).
    pub fn disarm_writes(&mut self) {
        for (program, link) in self.write_links.drain(..) {
            if let Some(prog) = self.ebpf.program_mut(program)
                && let Ok(prog) = <&mut TracePoint>::try_from(prog)
                && let Err(err) = prog.detach(link)
            {
                tracing::warn!(%err, program, "detaching a write probe failed");
            }
        }
        tracing::debug!("write probes disarmed");
    }

    pub fn writes_armed(&self) -> bool {
        !self.write_links.is_empty()
    }

    /// Stops watching a cgroup (not a container, or done with).
    pub fn unwatch(&mut self, cgroup_id: u64) {
        let Some(map) = self.ebpf.map_mut(maps::CONTAINERS) else {
            return;
        };
        if let Ok(mut containers) = HashMap::<_, u64, ContainerState>::try_from(map) {
            let _ = containers.remove(&cgroup_id);
        }
    }

    /// The kernel side's drop counters.
    pub fn drops(&self) -> LifecycleDrops {
        let sum = |index: u32| {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        LifecycleDrops {
            events_dropped: sum(counter::LIFECYCLE_EVENTS_DROPPED),
            containers_full: sum(counter::CONTAINERS_FULL),
            log_fd_unreadable: sum(counter::LOG_FD_UNREADABLE),
        }
    }
}
