//! The rename-ENXIO detector: `sys_enter_rename*` remembers each rename's arguments per
//! thread; the shared `sys_exit_rename*` program forgets them and, only when the call failed
//! with `ENXIO`, copies the paths into a [`RenameEvent`] on the ring buffer.
//!
//! Deciding whether the source was a symlink is left to userspace: without CO-RE, reading
//! dentry fields here would hard-code per-kernel struct offsets.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_boot_ns, bpf_probe_read_user, bpf_probe_read_user_str,
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use imgstream_ebpf::{
    COMM_LEN, ENXIO, PATH_CAP, RenameEvent, RenameInflight, TRUNCATED_NEW, TRUNCATED_OLD, counter,
    maps, syscall, tp,
};

/// 256 KiB: about 120 events between two drains of the agent.
#[map]
static RENAME_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// A plain hash map, not an LRU: a full map refuses the entry and the refusal is counted
/// (an LRU would evict silently and the counter would never fire). An entry whose `sys_exit`
/// never came (programs attached mid-syscall) is swept by the agent once its thread is gone.
#[map]
static RENAME_INFLIGHT: HashMap<u64, RenameInflight> =
    HashMap::with_max_entries(maps::RENAME_INFLIGHT_ENTRIES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Where one syscall's arguments sit in its `sys_enter_*` record.
struct EnterArgs {
    olddfd: Option<usize>,
    oldname: usize,
    newdfd: Option<usize>,
    newname: usize,
    flags: Option<usize>,
}

#[tracepoint]
fn enter_rename(ctx: TracePointContext) -> u32 {
    let args = EnterArgs {
        olddfd: None,
        oldname: tp::arg(0),
        newdfd: None,
        newname: tp::arg(1),
        flags: None,
    };
    remember(&ctx, syscall::RENAME, &args)
}

#[tracepoint]
fn enter_renameat(ctx: TracePointContext) -> u32 {
    let args = EnterArgs {
        olddfd: Some(tp::arg(0)),
        oldname: tp::arg(1),
        newdfd: Some(tp::arg(2)),
        newname: tp::arg(3),
        flags: None,
    };
    remember(&ctx, syscall::RENAMEAT, &args)
}

#[tracepoint]
fn enter_renameat2(ctx: TracePointContext) -> u32 {
    let args = EnterArgs {
        olddfd: Some(tp::arg(0)),
        oldname: tp::arg(1),
        newdfd: Some(tp::arg(2)),
        newname: tp::arg(3),
        flags: Some(tp::arg(4)),
    };
    remember(&ctx, syscall::RENAMEAT2, &args)
}

#[tracepoint]
fn exit_rename(ctx: TracePointContext) -> u32 {
    match try_exit_rename(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn remember(ctx: &TracePointContext, syscall: u32, args: &EnterArgs) -> u32 {
    let Ok(inflight) = read_enter_args(ctx, syscall, args) else {
        return 0;
    };
    // SAFETY: plain helper call, no pointers.
    let key = unsafe { bpf_get_current_pid_tgid() };
    if RENAME_INFLIGHT.insert(key, inflight, 0).is_err() {
        bump(counter::RENAME_INFLIGHT_FULL);
    }
    0
}

fn read_enter_args(
    ctx: &TracePointContext,
    syscall: u32,
    args: &EnterArgs,
) -> Result<RenameInflight, i32> {
    let slot = |offset: usize| -> Result<u64, i32> {
        // SAFETY: `offset` is one of the `tp::arg` slots, all inside the sys_enter record of
        // the tracepoint this program is attached to (checked against tracefs by the loader).
        unsafe { ctx.read_at::<u64>(offset) }
    };
    let dfd = |offset: Option<usize>| -> Result<i32, i32> {
        match offset {
            // The slot holds an `int` widened to 64 bits; the low half is the fd.
            Some(offset) => Ok(slot(offset)? as i32),
            None => Ok(imgstream_ebpf::AT_FDCWD),
        }
    };
    Ok(RenameInflight {
        oldname: slot(args.oldname)?,
        newname: slot(args.newname)?,
        olddfd: dfd(args.olddfd)?,
        newdfd: dfd(args.newdfd)?,
        flags: match args.flags {
            Some(offset) => slot(offset)? as u32,
            None => 0,
        },
        syscall,
    })
}

fn try_exit_rename(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: plain helper call, no pointers.
    let key = unsafe { bpf_get_current_pid_tgid() };
    let Some(inflight) = RENAME_INFLIGHT.get_ptr(key) else {
        return Ok(());
    };
    // SAFETY: the pointer comes from a successful lookup and is valid for this program run;
    // only this thread writes this key, and it is inside this very syscall exit.
    let inflight = unsafe { *inflight };
    let _ = RENAME_INFLIGHT.remove(key);

    // SAFETY: `tp::RET` is the `ret` field of every sys_exit record.
    let ret: i64 = unsafe { ctx.read_at(tp::RET)? };
    if ret != -ENXIO {
        return Ok(());
    }

    let Some(mut entry) = RENAME_EVENTS.reserve::<RenameEvent>(0) else {
        bump(counter::RENAME_EVENTS_DROPPED);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring buffer slot of the size of
    // `RenameEvent`; fields are written through raw pointers and never read before being set.
    unsafe {
        (*event).boot_ns = bpf_ktime_get_boot_ns();
        (*event).cgroup_id = bpf_get_current_cgroup_id();
        (*event).pid = key as u32;
        (*event).tgid = (key >> 32) as u32;
        (*event).olddfd = inflight.olddfd;
        (*event).newdfd = inflight.newdfd;
        (*event).flags = inflight.flags;
        (*event).syscall = inflight.syscall;
        (*event).ret = ret as i32;
        let comm = core::ptr::addr_of_mut!((*event).comm).cast::<c_void>();
        if bpf_get_current_comm(comm, COMM_LEN as u32) < 0 {
            (*event).comm[0] = 0;
        }
        let mut truncated = 0;
        let old = core::ptr::addr_of_mut!((*event).old_path).cast::<u8>();
        if copy_path(inflight.oldname, old) {
            truncated |= TRUNCATED_OLD;
        }
        let new = core::ptr::addr_of_mut!((*event).new_path).cast::<u8>();
        if copy_path(inflight.newname, new) {
            truncated |= TRUNCATED_NEW;
        }
        (*event).truncated = truncated;
    }
    entry.submit(0);
    Ok(())
}

/// Copies the user string at `src` into the `PATH_CAP` bytes at `dst`, always NUL-terminated.
/// Returns whether the string was longer than fits.
///
/// # Safety
/// `dst` must be valid for writes of `PATH_CAP` bytes.
unsafe fn copy_path(src: u64, dst: *mut u8) -> bool {
    let src = src as *const c_void;
    // SAFETY: `dst` has room for `PATH_CAP` bytes (caller's contract); the helper writes at most
    // that many, NUL included, and tolerates a faulting `src`.
    let copied = unsafe { bpf_probe_read_user_str(dst.cast(), PATH_CAP as u32, src) };
    if copied < 0 {
        bump(counter::RENAME_PATH_UNREADABLE);
        // SAFETY: `dst` is valid for at least one byte.
        unsafe { *dst = 0 };
        return false;
    }
    if copied as usize != PATH_CAP {
        return false;
    }
    // The buffer is full. The string was cut unless its last byte was the NUL itself: look at
    // the source byte that would have been the terminator.
    let mut next: u8 = 0;
    // SAFETY: reads one byte into a local; a fault only makes the helper return an error.
    let read = unsafe {
        bpf_probe_read_user(
            core::ptr::addr_of_mut!(next).cast(),
            1,
            src.cast::<u8>().wrapping_add(PATH_CAP - 1).cast(),
        )
    };
    read == 0 && next != 0
}

pub(crate) fn bump(index: u32) {
    if let Some(count) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on one CPU mid-run.
        unsafe { *count += 1 };
    }
}
