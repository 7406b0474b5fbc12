//! The kernel/user ABI of imgstream's eBPF programs, defined once.
//!
//! Everything the kernel programs (`src/main.rs`) and the agent exchange lives here: the
//! `#[repr(C)]` records sent through ring buffers, the map names, the tracepoints the programs
//! attach to and the offsets they read. Every record has explicit padding and a pinned size, so
//! a field added on one side without the other fails to compile instead of corrupting events.
//!
//! This crate knows nothing about loading, attaching or interpreting events; that is the
//! agent's `probes` module. With the `user` feature it implements `aya::Pod` for the records.
#![no_std]

use core::mem::size_of;

/// Longest path, NUL included, that a rename event carries. Longer paths are cut and marked
/// with [`TRUNCATED_OLD`] / [`TRUNCATED_NEW`].
pub const PATH_CAP: usize = 1024;

/// Length of the kernel's `task_struct::comm`, NUL included.
pub const COMM_LEN: usize = 16;

/// `ENXIO`, the errno the overlayfs symlink-rename regression returns.
pub const ENXIO: i64 = 6;

/// Bit in [`RenameEvent::truncated`]: the old path did not fit in [`PATH_CAP`].
pub const TRUNCATED_OLD: u32 = 1 << 0;
/// Bit in [`RenameEvent::truncated`]: the new path did not fit in [`PATH_CAP`].
pub const TRUNCATED_NEW: u32 = 1 << 1;

/// `AT_FDCWD` as the syscall sees it: the directory fd meaning "the caller's cwd".
pub const AT_FDCWD: i32 = -100;

/// The rename syscalls, by their x86_64 numbers (the value of [`RenameEvent::syscall`]).
pub mod syscall {
    /// `rename(oldname, newname)`.
    pub const RENAME: u32 = 82;
    /// `renameat(olddfd, oldname, newdfd, newname)`.
    pub const RENAMEAT: u32 = 264;
    /// `renameat2(olddfd, oldname, newdfd, newname, flags)`.
    pub const RENAMEAT2: u32 = 316;
}

/// Offsets into the `syscalls/sys_enter_*` and `sys_exit_*` tracepoint records.
///
/// Syscall tracepoints store each argument in an 8-byte slot after an 8-byte common header and
/// the 4-byte syscall number (padded to 16). The agent checks these against
/// `events/syscalls/*/format` in tracefs before it attaches anything.
pub mod tp {
    /// Offset of the first syscall argument (`args[0]`) in a `sys_enter_*` record.
    pub const ARG0: usize = 16;
    /// Size of one argument slot.
    pub const ARG_SLOT: usize = 8;
    /// Offset of `ret` (a `long`) in a `sys_exit_*` record.
    pub const RET: usize = 16;

    /// Offset of argument `n` in a `sys_enter_*` record.
    pub const fn arg(n: usize) -> usize {
        ARG0 + n * ARG_SLOT
    }
}

/// Map names, shared so that the loader cannot ask for a map that does not exist.
pub mod maps {
    /// Ring buffer of [`super::RenameEvent`].
    pub const RENAME_EVENTS: &str = "RENAME_EVENTS";
    /// Per-thread arguments of a rename in flight (key: `pid_tgid`).
    pub const RENAME_INFLIGHT: &str = "RENAME_INFLIGHT";
    /// Per-CPU `u64` counters, indexed by [`super::counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Ring buffer of [`super::LifecycleEvent`].
    pub const LIFECYCLE_EVENTS: &str = "LIFECYCLE_EVENTS";
    /// Cgroups being watched (key: cgroup id, value: [`super::ContainerState`]).
    pub const CONTAINERS: &str = "CONTAINERS";
    /// One [`super::KernelOffsets`], written by the agent before it attaches.
    pub const OFFSETS: &str = "OFFSETS";
    /// Entries [`RENAME_INFLIGHT`] holds at most (renames in flight at once, node-wide).
    pub const RENAME_INFLIGHT_ENTRIES: u32 = 16384;
    /// Entries [`CONTAINERS`] holds at most (cgroups watched at once).
    pub const CONTAINERS_ENTRIES: u32 = 8192;
}

/// Indexes into the [`maps::COUNTERS`] per-CPU array. Nothing the programs drop is silent.
pub mod counter {
    /// Rename events lost because the ring buffer was full.
    pub const RENAME_EVENTS_DROPPED: u32 = 0;
    /// Renames not tracked because the in-flight map was full.
    pub const RENAME_INFLIGHT_FULL: u32 = 1;
    /// Failed renames whose paths could not be read from user memory.
    pub const RENAME_PATH_UNREADABLE: u32 = 2;
    /// Lifecycle events lost because the ring buffer was full.
    pub const LIFECYCLE_EVENTS_DROPPED: u32 = 3;
    /// New cgroups not watched because the state map refused the entry.
    pub const CONTAINERS_FULL: u32 = 4;
    /// Writes to fd 1 or 2 whose file type could not be read (then counted as log lines).
    pub const LOG_FD_UNREADABLE: u32 = 5;
    /// Number of counters.
    pub const COUNT: u32 = 6;
}

/// What a [`LifecycleEvent`] reports.
pub mod lifecycle {
    /// A cgroup was created (`cgroup/cgroup_mkdir`); the event carries its path.
    pub const CREATED: u32 = 1;
    /// The first exec inside a watched cgroup (`sched/sched_process_exec`); carries the
    /// program's path.
    pub const STARTED: u32 = 2;
    /// The first `write`/`writev` of a non-zero count to fd 1 or 2, going to a pipe, FIFO,
    /// socket or terminal, from any task of a watched cgroup.
    pub const FIRST_LOG: u32 = 3;
    /// The task started by [`STARTED`] exited (`sched/sched_process_exit` of its thread group
    /// leader).
    pub const EXITED: u32 = 4;
}

/// Bits of [`ContainerState::seen`]: which first events were sent.
pub mod seen {
    pub const STARTED: u32 = 1 << 0;
    pub const LOGGED: u32 = 1 << 1;
    pub const EXITED: u32 = 1 << 2;
}

/// Program names, as the loader looks them up in the object file.
pub mod programs {
    /// `sys_enter_rename`.
    pub const ENTER_RENAME: &str = "enter_rename";
    /// `sys_enter_renameat`.
    pub const ENTER_RENAMEAT: &str = "enter_renameat";
    /// `sys_enter_renameat2`.
    pub const ENTER_RENAMEAT2: &str = "enter_renameat2";
    /// `sys_exit_rename`, `sys_exit_renameat` and `sys_exit_renameat2` share one program.
    pub const EXIT_RENAME: &str = "exit_rename";
    /// `cgroup/cgroup_mkdir`.
    pub const CGROUP_MKDIR: &str = "cgroup_mkdir";
    /// `sched/sched_process_exec`.
    pub const PROCESS_EXEC: &str = "process_exec";
    /// `sched/sched_process_exit`.
    pub const PROCESS_EXIT: &str = "process_exit";
    /// `syscalls/sys_enter_write`.
    pub const ENTER_WRITE: &str = "enter_write";
    /// `syscalls/sys_enter_writev`.
    pub const ENTER_WRITEV: &str = "enter_writev";
}

/// Offsets into the non-syscall tracepoint records the lifecycle programs read, checked
/// against tracefs by the agent before it attaches.
pub mod tp_fields {
    /// `cgroup/cgroup_mkdir`: `int root` (the hierarchy; 0 is cgroup v2).
    pub const MKDIR_ROOT: usize = 8;
    /// `cgroup/cgroup_mkdir`: `u64 id`.
    pub const MKDIR_ID: usize = 16;
    /// `cgroup/cgroup_mkdir`: `__data_loc char[] path` (u32: length << 16 | offset).
    pub const MKDIR_PATH: usize = 24;
    /// `sched/sched_process_exec`: `__data_loc char[] filename`.
    pub const EXEC_FILENAME: usize = 8;
}

/// Longest cgroup or program path a lifecycle event carries, NUL included.
pub const LIFECYCLE_PATH_CAP: usize = 256;

/// Where the fields the log-line check reads sit in this kernel's structs, from its BTF. The
/// programs follow `current->files->fdt->fd[n]->f_inode->i_mode` to tell a pipe from a file
/// a container redirected its output to. With `valid == 0` (no BTF), every write to fd 1 or
/// 2 counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub valid: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 24);

/// What the kernel side remembers of a watched cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ContainerState {
    /// Process started by the first exec (its thread group id), 0 before.
    pub init_tgid: u32,
    /// [`seen`] bits.
    pub seen: u32,
}
const _: () = assert!(size_of::<ContainerState>() == 8);

/// One lifecycle event, as sent through [`maps::LIFECYCLE_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LifecycleEvent {
    /// `bpf_ktime_get_boot_ns()` when it happened (CLOCK_BOOTTIME).
    pub boot_ns: u64,
    /// The cgroup (v2 id).
    pub cgroup_id: u64,
    /// One of [`lifecycle`].
    pub kind: u32,
    /// Process id of the task (thread group id).
    pub tgid: u32,
    /// [`lifecycle::FIRST_LOG`]: the fd written (1 or 2); [`lifecycle::EXITED`]: the exit
    /// code as `wait(2)` reports it; otherwise 0.
    pub detail: i32,
    /// [`lifecycle::FIRST_LOG`]: the file type bits (`S_IFMT`) of the fd, 0 if unknown.
    pub file_type: u32,
    /// Task name, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// [`lifecycle::CREATED`]: the cgroup's path; [`lifecycle::STARTED`]: the program's.
    pub path: [u8; LIFECYCLE_PATH_CAP],
}
const _: () = assert!(size_of::<LifecycleEvent>() == 32 + COMM_LEN + LIFECYCLE_PATH_CAP);

/// A rename recorded at `sys_enter`, kept per thread until its `sys_exit`.
///
/// Only the user pointers are kept: the path strings are copied at exit, and only for the
/// rare renames that failed with `ENXIO`, so the common path costs one map update.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RenameInflight {
    /// User address of the old path.
    pub oldname: u64,
    /// User address of the new path.
    pub newname: u64,
    /// Directory fd the old path is relative to ([`AT_FDCWD`] for `rename`).
    pub olddfd: i32,
    /// Directory fd the new path is relative to.
    pub newdfd: i32,
    /// `renameat2` flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`, ...); 0 for the others.
    pub flags: u32,
    /// One of [`syscall`].
    pub syscall: u32,
}
const _: () = assert!(size_of::<RenameInflight>() == 32);

/// A rename that failed with `ENXIO`, as sent through [`maps::RENAME_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RenameEvent {
    /// `bpf_ktime_get_boot_ns()` at syscall exit (CLOCK_BOOTTIME).
    pub boot_ns: u64,
    /// cgroup v2 id of the calling task (`bpf_get_current_cgroup_id()`).
    pub cgroup_id: u64,
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// See [`RenameInflight::olddfd`].
    pub olddfd: i32,
    /// See [`RenameInflight::newdfd`].
    pub newdfd: i32,
    /// See [`RenameInflight::flags`].
    pub flags: u32,
    /// One of [`syscall`].
    pub syscall: u32,
    /// The syscall's return value (always `-ENXIO` today).
    pub ret: i32,
    /// [`TRUNCATED_OLD`] | [`TRUNCATED_NEW`].
    pub truncated: u32,
    /// Task name, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// Old path as the caller passed it, NUL-terminated.
    pub old_path: [u8; PATH_CAP],
    /// New path as the caller passed it, NUL-terminated.
    pub new_path: [u8; PATH_CAP],
}
const _: () = assert!(size_of::<RenameEvent>() == 64 + 2 * PATH_CAP);

#[cfg(feature = "user")]
mod user {
    // SAFETY: `RenameInflight` is `repr(C)`, made of integers only, with no padding (size
    // pinned above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::RenameInflight {}
    // SAFETY: as above: integers and byte arrays, `repr(C)`, no padding.
    unsafe impl aya::Pod for super::RenameEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ContainerState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LifecycleEvent {}
}
