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
}

/// Indexes into the [`maps::COUNTERS`] per-CPU array. Nothing the programs drop is silent.
pub mod counter {
    /// Rename events lost because the ring buffer was full.
    pub const RENAME_EVENTS_DROPPED: u32 = 0;
    /// Renames not tracked because the in-flight map was full.
    pub const RENAME_INFLIGHT_FULL: u32 = 1;
    /// Failed renames whose paths could not be read from user memory.
    pub const RENAME_PATH_UNREADABLE: u32 = 2;
    /// Number of counters.
    pub const COUNT: u32 = 3;
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
}

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
}
