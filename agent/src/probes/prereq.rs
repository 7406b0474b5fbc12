//! What the probes need from the machine, checked before anything is loaded so that a missing
//! piece is named with its fix instead of surfacing as a bare EPERM or ENOENT from the kernel.

use std::path::{Path, PathBuf};

use imgstream_ebpf::tp;

/// A prerequisite of the probes that this machine lacks.
#[derive(Debug, thiserror::Error)]
pub enum PrereqError {
    /// Not root and without the capabilities BPF needs.
    #[error(
        "attaching eBPF probes needs root (or CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH); \
         run `imgstream` as root, or deploy the DaemonSet with `privileged: true`"
    )]
    NotPrivileged,
    /// tracefs is not mounted anywhere the agent looks.
    #[error(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing); \
         mount it with `mount -t tracefs tracefs /sys/kernel/tracing` (in the DaemonSet, \
         mount the host's /sys/kernel/tracing)"
    )]
    NoTracefs,
    /// The kernel lacks this tracepoint (syscall ones need CONFIG_FTRACE_SYSCALLS).
    #[error(
        "tracepoint {0} does not exist under {1}: this kernel lacks it (syscall tracepoints \
         need CONFIG_FTRACE_SYSCALLS)"
    )]
    MissingTracepoint(String, PathBuf),
    /// A tracepoint's record layout differs from the one the programs were built for.
    #[error(
        "tracepoint {tracepoint} has field `{field}` at offset {found:?}, the probes expect {expected}"
    )]
    UnexpectedLayout {
        tracepoint: String,
        field: &'static str,
        expected: usize,
        found: Option<usize>,
    },
}

/// CAP_SYS_ADMIN, CAP_PERFMON and CAP_BPF bit numbers.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks privileges, tracefs and the record layout of each `syscalls/<tracepoint>`.
pub fn check_prerequisites(tracepoints: &[&str]) -> Result<(), PrereqError> {
    let tracefs = check_access()?;
    for tracepoint in tracepoints {
        let format = read_format(&tracefs, "syscalls", tracepoint)?;
        check_layout(tracepoint, &format, expected_fields(tracepoint))?;
    }
    Ok(())
}

/// Fields a program reads from a tracepoint record, and where.
pub(super) type Fields = &'static [(&'static str, usize)];

/// Checks privileges, tracefs and the record layouts of the start-latency tracepoints:
/// (category, tracepoint, fields).
pub(super) fn check_tracepoints(tracepoints: &[(&str, &str, Fields)]) -> Result<(), PrereqError> {
    let tracefs = check_access()?;
    for (category, tracepoint, fields) in tracepoints {
        let format = read_format(&tracefs, category, tracepoint)?;
        check_layout(tracepoint, &format, fields)?;
    }
    Ok(())
}

fn check_access() -> Result<PathBuf, PrereqError> {
    if !privileged() {
        return Err(PrereqError::NotPrivileged);
    }
    find_tracefs().ok_or(PrereqError::NoTracefs)
}

fn read_format(tracefs: &Path, category: &str, tracepoint: &str) -> Result<String, PrereqError> {
    let dir = tracefs.join("events").join(category).join(tracepoint);
    std::fs::read_to_string(dir.join("format")).map_err(|_| {
        PrereqError::MissingTracepoint(format!("{category}/{tracepoint}"), tracefs.into())
    })
}

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| cap_eff & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

fn find_tracefs() -> Option<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
        .map(Path::to_path_buf)
}

/// The fields each rename tracepoint must have where the programs read them.
fn expected_fields(tracepoint: &str) -> &'static [(&'static str, usize)] {
    const RENAME: [(&str, usize); 2] = [("oldname", tp::arg(0)), ("newname", tp::arg(1))];
    const RENAMEAT: [(&str, usize); 4] = [
        ("olddfd", tp::arg(0)),
        ("oldname", tp::arg(1)),
        ("newdfd", tp::arg(2)),
        ("newname", tp::arg(3)),
    ];
    const RENAMEAT2: [(&str, usize); 5] = [
        ("olddfd", tp::arg(0)),
        ("oldname", tp::arg(1)),
        ("newdfd", tp::arg(2)),
        ("newname", tp::arg(3)),
        ("flags", tp::arg(4)),
    ];
    const EXIT: [(&str, usize); 1] = [("ret", tp::RET)];
    match tracepoint {
        "sys_enter_rename" => &RENAME,
        "sys_enter_renameat" => &RENAMEAT,
        "sys_enter_renameat2" => &RENAMEAT2,
        t if t.starts_with("sys_exit_") => &EXIT,
        _ => &[],
    }
}

fn check_layout(
    tracepoint: &str,
    format: &str,
    fields: &[(&'static str, usize)],
) -> Result<(), PrereqError> {
    for &(field, expected) in fields {
        let found = field_offset(format, field);
        if found != Some(expected) {
            return Err(PrereqError::UnexpectedLayout {
                tracepoint: tracepoint.to_string(),
                field,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// Offset of `field` in a tracefs `format` file
/// (`field:const char * oldname;\toffset:24;\tsize:8;\tsigned:0;`).
fn field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        rest.split(';')
            .find_map(|kv| kv.trim().strip_prefix("offset:")?.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RENAMEAT2_FORMAT: &str = "name: sys_enter_renameat2
ID: 872
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int olddfd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:const char * oldname;\toffset:24;\tsize:8;\tsigned:0;
\tfield:int newdfd;\toffset:32;\tsize:8;\tsigned:0;
\tfield:const char * newname;\toffset:40;\tsize:8;\tsigned:0;
\tfield:unsigned int flags;\toffset:48;\tsize:8;\tsigned:0;
";

    #[test]
    fn reads_offsets_from_tracefs_format() {
        assert_eq!(field_offset(RENAMEAT2_FORMAT, "oldname"), Some(24));
        assert_eq!(field_offset(RENAMEAT2_FORMAT, "flags"), Some(48));
        assert_eq!(field_offset(RENAMEAT2_FORMAT, "name"), None);
        check_layout(
            "sys_enter_renameat2",
            RENAMEAT2_FORMAT,
            expected_fields("sys_enter_renameat2"),
        )
        .unwrap();
    }

    #[test]
    fn a_moved_field_is_refused() {
        let moved = RENAMEAT2_FORMAT.replace("offset:48", "offset:56");
        let err = check_layout(
            "sys_enter_renameat2",
            &moved,
            expected_fields("sys_enter_renameat2"),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            PrereqError::UnexpectedLayout {
                field: "flags",
                expected: 48,
                found: Some(56),
                ..
            }
        ));
        let err = check_layout(
            "sys_exit_rename",
            "garbage",
            expected_fields("sys_exit_rename"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("`ret`"), "{err}");
    }
}
