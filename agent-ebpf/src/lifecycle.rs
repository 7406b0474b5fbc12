//! Container start latency: the first event of each kind per watched cgroup.
//!
//! `cgroup_mkdir` puts every new cgroup v2 directory in [`CONTAINERS`] and reports it; the
//! agent removes those that are not containers. For the cgroups left, the first exec
//! (start), the first write of a non-zero count to fd 1 or 2 that goes to a pipe, FIFO,
//! socket or terminal (first log line) and the exit of the started process each reach
//! userspace once: the state's `seen` bits stop the rest in the kernel. The common case, a
//! task outside any watched cgroup, costs one hash lookup.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::TracePointContext,
};
use imgstream_ebpf::{
    COMM_LEN, ContainerState, KernelOffsets, LIFECYCLE_PATH_CAP, LifecycleEvent, counter,
    lifecycle, maps, seen, tp, tp_fields,
};

use crate::rename::bump;

/// 256 KiB: about 800 events between two drains of the agent.
#[map]
static LIFECYCLE_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// A plain hash map, not an LRU: a full map refuses a new cgroup and the refusal is counted
/// (an LRU would evict a watched container silently). The agent unwatches what is not a
/// container or is done with, and sweeps the entries of cgroups that are gone.
#[map]
static CONTAINERS: HashMap<u64, ContainerState> =
    HashMap::with_max_entries(maps::CONTAINERS_ENTRIES, 0);

#[map]
static OFFSETS: Array<KernelOffsets> = Array::with_max_entries(1, 0);

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFBLK: u32 = 0o060000;

#[tracepoint]
fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    // SAFETY: the offsets are those of cgroup/cgroup_mkdir, checked against tracefs.
    let root: i32 = unsafe { ctx.read_at(tp_fields::MKDIR_ROOT) }.unwrap_or(-1);
    if root != 0 {
        return 0; // a cgroup v1 hierarchy: tasks carry v2 ids only
    }
    // SAFETY: as above.
    let Ok(id) = (unsafe { ctx.read_at::<u64>(tp_fields::MKDIR_ID) }) else {
        return 0;
    };
    if CONTAINERS.insert(id, ContainerState::default(), 0).is_err() {
        bump(counter::CONTAINERS_FULL);
        return 0;
    }
    // SAFETY: as above.
    let loc: u32 = unsafe { ctx.read_at(tp_fields::MKDIR_PATH) }.unwrap_or(0);
    emit(&ctx, id, lifecycle::CREATED, 0, 0, Some(loc));
    0
}

#[tracepoint]
fn process_exec(ctx: TracePointContext) -> u32 {
    // SAFETY: plain helper call.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let Some(state) = CONTAINERS.get_ptr_mut(cgroup) else {
        return 0;
    };
    // SAFETY: a pointer from a successful lookup, valid for this run; a racing update of the
    // same entry at worst sends one more event, which userspace ignores.
    let state = unsafe { &mut *state };
    if state.seen & seen::STARTED != 0 {
        return 0;
    }
    state.seen |= seen::STARTED;
    // SAFETY: plain helper call.
    state.init_tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    // SAFETY: the offset is that of sched/sched_process_exec's filename, checked by the agent.
    let loc: u32 = unsafe { ctx.read_at(tp_fields::EXEC_FILENAME) }.unwrap_or(0);
    emit(&ctx, cgroup, lifecycle::STARTED, 0, 0, Some(loc));
    0
}

#[tracepoint]
fn process_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: plain helper call.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let Some(state) = CONTAINERS.get_ptr_mut(cgroup) else {
        return 0;
    };
    // SAFETY: as in `process_exec`.
    let state = unsafe { &mut *state };
    // SAFETY: plain helper call.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    // Only the started process's leader thread ends the container's main process.
    if state.seen & seen::EXITED != 0 || tgid != state.init_tgid || tid != tgid {
        return 0;
    }
    state.seen |= seen::EXITED;
    emit(&ctx, cgroup, lifecycle::EXITED, 0, 0, None);
    0
}

#[tracepoint]
fn enter_write(ctx: TracePointContext) -> u32 {
    first_log(&ctx)
}

#[tracepoint]
fn enter_writev(ctx: TracePointContext) -> u32 {
    // writev's third argument is the iovec count, not bytes: a call with no iovecs writes
    // nothing, one with empty iovecs is rare enough to count.
    first_log(&ctx)
}

fn first_log(ctx: &TracePointContext) -> u32 {
    // SAFETY: plain helper call.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let Some(state) = CONTAINERS.get_ptr_mut(cgroup) else {
        return 0;
    };
    // SAFETY: as in `process_exec`.
    let state = unsafe { &mut *state };
    if state.seen & seen::LOGGED != 0 {
        return 0;
    }
    // SAFETY: args 0 and 2 of sys_enter_write/writev (fd, count/vlen), checked by the agent.
    let (Ok(fd), Ok(count)) = (unsafe { ctx.read_at::<u64>(tp::arg(0)) }, unsafe {
        ctx.read_at::<u64>(tp::arg(2))
    }) else {
        return 0;
    };
    if (fd != 1 && fd != 2) || count == 0 {
        return 0;
    }
    let file_type = fd_file_type(fd as u32);
    if file_type == S_IFREG || file_type == S_IFDIR || file_type == S_IFBLK {
        return 0; // redirected to a file: not the container's log
    }
    state.seen |= seen::LOGGED;
    emit(
        ctx,
        cgroup,
        lifecycle::FIRST_LOG,
        fd as i32,
        file_type,
        None,
    );
    0
}

/// The `S_IFMT` bits of the current task's file `fd`, or 0 when they cannot be read.
fn fd_file_type(fd: u32) -> u32 {
    let Some(offsets) = OFFSETS.get(0) else {
        return 0;
    };
    if offsets.valid == 0 {
        return 0;
    }
    // SAFETY: plain helper call; the task pointer is only ever read through the helper.
    let task = unsafe { bpf_get_current_task() };
    let read_ptr = |base: u64, offset: u32| -> Option<u64> {
        if base == 0 {
            return None;
        }
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes of kernel memory into a local; a bad address only makes the
        // helper fail.
        let rc = unsafe {
            bpf_probe_read_kernel(
                core::ptr::addr_of_mut!(value).cast(),
                8,
                (base + u64::from(offset)) as *const c_void,
            )
        };
        (rc == 0).then_some(value)
    };
    let mode = (|| {
        let files = read_ptr(task, offsets.task_files)?;
        let fdt = read_ptr(files, offsets.files_fdt)?;
        let fd_array = read_ptr(fdt, offsets.fdtable_fd)?;
        let file = read_ptr(fd_array, fd * 8)?;
        let inode = read_ptr(file, offsets.file_inode)?;
        if inode == 0 {
            return None;
        }
        let mut mode: u16 = 0;
        // SAFETY: as above, two bytes.
        let rc = unsafe {
            bpf_probe_read_kernel(
                core::ptr::addr_of_mut!(mode).cast(),
                2,
                (inode + u64::from(offsets.inode_mode)) as *const c_void,
            )
        };
        (rc == 0).then_some(u32::from(mode))
    })();
    match mode {
        Some(mode) => mode & S_IFMT,
        None => {
            bump(counter::LOG_FD_UNREADABLE);
            0
        }
    }
}

/// Sends one event; `loc` is a `__data_loc` string field of the tracepoint record to copy.
fn emit(
    ctx: &TracePointContext,
    cgroup: u64,
    kind: u32,
    detail: i32,
    file_type: u32,
    loc: Option<u32>,
) {
    let Some(mut entry) = LIFECYCLE_EVENTS.reserve::<LifecycleEvent>(0) else {
        bump(counter::LIFECYCLE_EVENTS_DROPPED);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` is a reserved, exclusively owned ring buffer slot of the size of
    // `LifecycleEvent`; every field is written before the slot is submitted.
    unsafe {
        (*event).boot_ns = bpf_ktime_get_boot_ns();
        (*event).cgroup_id = cgroup;
        (*event).kind = kind;
        (*event).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*event).detail = detail;
        (*event).file_type = file_type;
        let comm = core::ptr::addr_of_mut!((*event).comm).cast::<c_void>();
        if bpf_get_current_comm(comm, COMM_LEN as u32) < 0 {
            (*event).comm[0] = 0;
        }
        let path = core::ptr::addr_of_mut!((*event).path).cast::<u8>();
        *path = 0;
        if let Some(loc) = loc {
            let offset = (loc & 0xffff) as usize;
            let src = (ctx.as_ptr() as *const u8).wrapping_add(offset);
            let _ = bpf_probe_read_kernel_str(
                path.cast(),
                LIFECYCLE_PATH_CAP as u32,
                src.cast::<c_void>(),
            );
        }
    }
    entry.submit(0);
}
