//! Events as the agent understands them, decoded from the raw ABI records of `imgstream-ebpf`.
//!
//! Owns decoding and validation of ring-buffer bytes (a short or odd record is an error, never
//! a panic) and the boot-clock to wall-clock conversion. Knows nothing of how events are
//! produced (`probes`) or what they mean for a pod (`detect`, `attribution`).

use std::time::{Duration, SystemTime};

use imgstream_ebpf::{
    LifecycleEvent, RenameEvent, TRUNCATED_NEW, TRUNCATED_OLD, lifecycle, syscall,
};
use serde::Serialize;

/// Errors decoding a record from the kernel.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The record is shorter than the ABI type it should hold.
    #[error("event record is {got} bytes, expected at least {want}")]
    ShortRecord { got: usize, want: usize },
    /// The syscall number is not one of the rename syscalls.
    #[error("rename event names syscall {0}, which is not rename, renameat or renameat2")]
    UnknownSyscall(u32),
    /// A lifecycle event of a kind this agent does not know.
    #[error("lifecycle event of unknown kind {0}")]
    UnknownKind(u32),
}

/// What happened to a watched cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LifecycleKind {
    /// The cgroup was created; its path relative to the cgroup v2 root.
    Created { path: String },
    /// The first exec in it; the program's path.
    Started { program: String },
    /// The first write to its stdout or stderr; the fd and its file type (`S_IFMT` bits, 0
    /// when unknown).
    FirstLog { fd: i32, file_type: u32 },
    /// The started process exited.
    Exited,
}

/// One start-latency event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lifecycle {
    /// CLOCK_BOOTTIME nanoseconds.
    pub boot_ns: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub comm: String,
    #[serde(flatten)]
    pub kind: LifecycleKind,
}

impl Lifecycle {
    /// Decodes one ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let want = size_of::<LifecycleEvent>();
        if bytes.len() < want {
            return Err(DecodeError::ShortRecord {
                got: bytes.len(),
                want,
            });
        }
        // SAFETY: at least `size_of::<LifecycleEvent>()` bytes (checked above), read
        // unaligned; the type is integers and byte arrays, valid for every bit pattern.
        let raw: LifecycleEvent =
            unsafe { bytes.as_ptr().cast::<LifecycleEvent>().read_unaligned() };
        let kind = match raw.kind {
            lifecycle::CREATED => LifecycleKind::Created {
                path: c_string(&raw.path),
            },
            lifecycle::STARTED => LifecycleKind::Started {
                program: c_string(&raw.path),
            },
            lifecycle::FIRST_LOG => LifecycleKind::FirstLog {
                fd: raw.detail,
                file_type: raw.file_type,
            },
            lifecycle::EXITED => LifecycleKind::Exited,
            other => return Err(DecodeError::UnknownKind(other)),
        };
        Ok(Self {
            boot_ns: raw.boot_ns,
            cgroup_id: raw.cgroup_id,
            tgid: raw.tgid,
            comm: c_string(&raw.comm),
            kind,
        })
    }
}

/// Which rename syscall failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RenameSyscall {
    Rename,
    Renameat,
    Renameat2,
}

impl RenameSyscall {
    fn from_nr(nr: u32) -> Result<Self, DecodeError> {
        match nr {
            syscall::RENAME => Ok(Self::Rename),
            syscall::RENAMEAT => Ok(Self::Renameat),
            syscall::RENAMEAT2 => Ok(Self::Renameat2),
            other => Err(DecodeError::UnknownSyscall(other)),
        }
    }
}

/// Where a path argument is resolved from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "fd")]
pub enum DirFd {
    /// `AT_FDCWD`: the caller's working directory.
    Cwd,
    /// An open directory fd of the caller.
    Fd(i32),
}

impl DirFd {
    fn from_raw(fd: i32) -> Self {
        if fd == imgstream_ebpf::AT_FDCWD {
            Self::Cwd
        } else {
            Self::Fd(fd)
        }
    }
}

/// One path argument of a failed rename.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PathArg {
    /// The path as the caller passed it (lossy UTF-8), possibly cut.
    pub path: String,
    /// The path did not fit in the kernel record and was cut.
    pub truncated: bool,
    /// What a relative `path` is relative to.
    pub dir: DirFd,
}

/// A rename, renameat or renameat2 call that failed with `ENXIO`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RenameFailure {
    pub syscall: RenameSyscall,
    /// CLOCK_BOOTTIME nanoseconds at syscall exit.
    pub boot_ns: u64,
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub old: PathArg,
    pub new: PathArg,
    /// renameat2 flags (0 for the other two syscalls).
    pub flags: u32,
    /// Raw return value, `-ENXIO`.
    pub ret: i32,
}

impl RenameFailure {
    /// Decodes one ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let want = size_of::<RenameEvent>();
        if bytes.len() < want {
            return Err(DecodeError::ShortRecord {
                got: bytes.len(),
                want,
            });
        }
        // SAFETY: the slice holds at least `size_of::<RenameEvent>()` bytes (checked above),
        // `read_unaligned` does not need alignment, and `RenameEvent` is plain integers and byte
        // arrays, valid for every bit pattern.
        let raw: RenameEvent = unsafe { bytes.as_ptr().cast::<RenameEvent>().read_unaligned() };
        Ok(Self {
            syscall: RenameSyscall::from_nr(raw.syscall)?,
            boot_ns: raw.boot_ns,
            pid: raw.pid,
            tgid: raw.tgid,
            comm: c_string(&raw.comm),
            cgroup_id: raw.cgroup_id,
            old: PathArg {
                path: c_string(&raw.old_path),
                truncated: raw.truncated & TRUNCATED_OLD != 0,
                dir: DirFd::from_raw(raw.olddfd),
            },
            new: PathArg {
                path: c_string(&raw.new_path),
                truncated: raw.truncated & TRUNCATED_NEW != 0,
                dir: DirFd::from_raw(raw.newdfd),
            },
            flags: raw.flags,
            ret: raw.ret,
        })
    }

    /// Names of the renameat2 flags that are set (unknown bits as hex).
    pub fn flag_names(&self) -> Vec<String> {
        rename_flag_names(self.flags)
    }
}

/// Names of renameat2 flags: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`, `RENAME_WHITEOUT`.
pub fn rename_flag_names(flags: u32) -> Vec<String> {
    const KNOWN: [(u32, &str); 3] = [
        (libc::RENAME_NOREPLACE, "RENAME_NOREPLACE"),
        (libc::RENAME_EXCHANGE, "RENAME_EXCHANGE"),
        (libc::RENAME_WHITEOUT, "RENAME_WHITEOUT"),
    ];
    let mut names: Vec<String> = KNOWN
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| name.to_string())
        .collect();
    let unknown = flags & !KNOWN.iter().fold(0, |acc, (bit, _)| acc | bit);
    if unknown != 0 {
        names.push(format!("{unknown:#x}"));
    }
    names
}

/// Bytes up to the first NUL (or all of them), as lossy UTF-8.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Converts CLOCK_BOOTTIME readings (what BPF programs stamp) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    /// Wall time at boot, estimated once.
    boot_wall: SystemTime,
}

impl BootClock {
    /// Samples both clocks now: the boot clock between two wall-clock readings, the closest
    /// of three tries (a thread preempted between two readings would skew the pair by as
    /// long as it waited).
    pub fn new() -> Self {
        let mut best: Option<(Duration, SystemTime)> = None;
        for _ in 0..3 {
            let before = SystemTime::now();
            let since_boot = Duration::from_nanos(boot_ns_now());
            let after = SystemTime::now();
            let spread = after.duration_since(before).unwrap_or_default();
            let wall = before + spread / 2;
            let Some(boot_wall) = wall.checked_sub(since_boot) else {
                continue;
            };
            if best.is_none_or(|(s, _)| spread < s) {
                best = Some((spread, boot_wall));
            }
        }
        Self {
            boot_wall: best.map_or(SystemTime::UNIX_EPOCH, |(_, b)| b),
        }
    }

    /// Wall time of a boot-clock reading.
    pub fn to_wall(self, boot_ns: u64) -> SystemTime {
        self.boot_wall + Duration::from_nanos(boot_ns)
    }
}

impl Default for BootClock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_BOOTTIME now, in nanoseconds: the clock of `bpf_ktime_get_boot_ns()`.
pub fn boot_ns_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_event(syscall: u32, old: &[u8], new: &[u8]) -> RenameEvent {
        let mut ev = RenameEvent {
            boot_ns: 42,
            cgroup_id: 7,
            pid: 100,
            tgid: 99,
            olddfd: imgstream_ebpf::AT_FDCWD,
            newdfd: 5,
            flags: libc::RENAME_NOREPLACE,
            syscall,
            ret: -6,
            truncated: TRUNCATED_NEW,
            comm: [0; 16],
            old_path: [0; imgstream_ebpf::PATH_CAP],
            new_path: [0; imgstream_ebpf::PATH_CAP],
        };
        ev.comm[..2].copy_from_slice(b"mv");
        ev.old_path[..old.len()].copy_from_slice(old);
        ev.new_path[..new.len()].copy_from_slice(new);
        ev
    }

    fn bytes_of(ev: &RenameEvent) -> Vec<u8> {
        // SAFETY: `RenameEvent` is repr(C) with no padding; viewing it as bytes is sound.
        unsafe {
            std::slice::from_raw_parts((ev as *const RenameEvent).cast::<u8>(), size_of_val(ev))
        }
        .to_vec()
    }

    #[test]
    fn decodes_every_field() {
        let ev = raw_event(syscall::RENAMEAT2, b"/a/link", b"b");
        let got = RenameFailure::decode(&bytes_of(&ev)).unwrap();
        assert_eq!(got.syscall, RenameSyscall::Renameat2);
        assert_eq!(
            (got.pid, got.tgid, got.cgroup_id, got.boot_ns),
            (100, 99, 7, 42)
        );
        assert_eq!(got.comm, "mv");
        assert_eq!(
            got.old,
            PathArg {
                path: "/a/link".into(),
                truncated: false,
                dir: DirFd::Cwd
            }
        );
        assert_eq!(
            got.new,
            PathArg {
                path: "b".into(),
                truncated: true,
                dir: DirFd::Fd(5)
            }
        );
        assert_eq!(got.flag_names(), vec!["RENAME_NOREPLACE"]);
    }

    #[test]
    fn rejects_short_records_and_unknown_syscalls() {
        let ev = raw_event(syscall::RENAME, b"a", b"b");
        let bytes = bytes_of(&ev);
        assert!(matches!(
            RenameFailure::decode(&bytes[..100]),
            Err(DecodeError::ShortRecord { got: 100, .. })
        ));
        let ev = raw_event(59, b"a", b"b");
        assert!(matches!(
            RenameFailure::decode(&bytes_of(&ev)),
            Err(DecodeError::UnknownSyscall(59))
        ));
    }

    #[test]
    fn unterminated_path_reads_to_the_end_and_bad_utf8_is_lossy() {
        let mut ev = raw_event(syscall::RENAME, b"", b"\xffx");
        ev.old_path = [b'a'; imgstream_ebpf::PATH_CAP];
        let got = RenameFailure::decode(&bytes_of(&ev)).unwrap();
        assert_eq!(got.old.path.len(), imgstream_ebpf::PATH_CAP);
        assert_eq!(got.new.path, "\u{fffd}x");
    }

    #[test]
    fn unknown_flag_bits_are_shown() {
        assert_eq!(
            rename_flag_names(libc::RENAME_EXCHANGE | 0x100),
            ["RENAME_EXCHANGE", "0x100"]
        );
        assert!(rename_flag_names(0).is_empty());
    }

    #[test]
    fn boot_clock_maps_now_to_now() {
        let clock = BootClock::new();
        let wall = clock.to_wall(boot_ns_now());
        let skew = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(skew < Duration::from_secs(5), "skew {skew:?}");
    }
}
