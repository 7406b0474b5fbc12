//! The self-test's cases and their judgement.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{EnxioMount, Helper, Options, SelftestError};
use crate::{
    attribution::{CgroupResolver, find_cgroup2_mount},
    detect::{Detection, Detector, SourceKind, Verdict, Via},
    events::{DirFd, RenameFailure, RenameSyscall, boot_ns_now},
    probes::RenameProbes,
    selftest::helper::Call,
};

/// How long to wait for an event that must come.
pub(super) const EVENT_DEADLINE: Duration = Duration::from_secs(5);
/// How long to keep listening at the end for events that must not come.
const SETTLE: Duration = Duration::from_millis(500);

/// What a case must lead to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// A detection, confirmed (the source was seen to be a symlink) or not.
    Detected { confirmed: bool, truncated: bool },
    /// An ENXIO event that the detector drops: the source is not a symlink.
    NotSymlink,
    /// No event at all (the rename succeeded or failed with another errno).
    NoEvent,
}

/// Whether the helper is still alive when the detector looks at the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Alive,
    Exited,
}

#[derive(Clone, Debug)]
struct Case {
    name: &'static str,
    call: Call,
    old: String,
    new: String,
    flags: u32,
    cwd: Option<PathBuf>,
    dirfd: Option<PathBuf>,
    caller: Caller,
    errno: i32,
    expect: Expect,
}

/// The result of one case.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// All results, with the kernel they ran on.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cases: Vec<CaseResult>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.cases.iter().all(|c| c.passed)
    }

    /// One line per case, then a summary line.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for case in &self.cases {
            let mark = if case.passed { "ok  " } else { "FAIL" };
            out.push_str(&format!("{mark} {}: {}\n", case.name, case.detail));
        }
        let failed = self.cases.iter().filter(|c| !c.passed).count();
        out.push_str(&format!(
            "selftest on {}: {} cases passed, {failed} failed\n",
            self.kernel,
            self.cases.len() - failed
        ));
        out
    }
}

fn cases(mnt: &Path, plain: &Path) -> Vec<Case> {
    let at = |dir: &Path, name: &str| dir.join(name).display().to_string();
    let base = |name, call, old: String, new: String| Case {
        name,
        call,
        old,
        new,
        flags: 0,
        cwd: None,
        dirfd: None,
        caller: Caller::Exited,
        errno: libc::ENXIO,
        expect: Expect::Detected {
            confirmed: true,
            truncated: false,
        },
    };
    // A path to the symlink longer than the probe records (the kernel folds the slashes).
    let long_link = format!(
        "{}{}link",
        mnt.display(),
        "/".repeat(imgstream_ebpf::PATH_CAP + 16)
    );
    vec![
        base(
            "rename(2) of a symlink, caller exited",
            Call::Rename,
            at(mnt, "link"),
            at(mnt, "new-rename"),
        ),
        Case {
            cwd: Some(mnt.to_path_buf()),
            caller: Caller::Alive,
            ..base(
                "renameat(2) of a symlink, cwd-relative",
                Call::Renameat,
                "link".into(),
                "new-renameat".into(),
            )
        },
        Case {
            dirfd: Some(mnt.to_path_buf()),
            caller: Caller::Alive,
            ..base(
                "renameat(2) of a symlink, dirfd-relative",
                Call::Renameat,
                "link".into(),
                "new-renameat-fd".into(),
            )
        },
        Case {
            flags: libc::RENAME_NOREPLACE,
            ..base(
                "renameat2(2) RENAME_NOREPLACE of a symlink, caller exited",
                Call::Renameat2,
                at(mnt, "link"),
                at(mnt, "new-renameat2"),
            )
        },
        Case {
            expect: Expect::NotSymlink,
            ..base(
                "ENXIO renaming a regular file, caller exited",
                Call::Renameat2,
                at(mnt, "file"),
                at(mnt, "new-file-exited"),
            )
        },
        Case {
            caller: Caller::Alive,
            expect: Expect::NotSymlink,
            ..base(
                "ENXIO renaming a regular file, caller alive",
                Call::Rename,
                at(mnt, "file"),
                at(mnt, "new-file-alive"),
            )
        },
        Case {
            errno: libc::ENOENT,
            expect: Expect::NoEvent,
            ..base(
                "rename failing with ENOENT",
                Call::Renameat2,
                at(mnt, "absent"),
                at(mnt, "new-enoent"),
            )
        },
        Case {
            errno: 0,
            expect: Expect::NoEvent,
            ..base(
                "successful rename",
                Call::Rename,
                at(plain, "before"),
                at(plain, "new-success"),
            )
        },
        Case {
            caller: Caller::Alive,
            expect: Expect::Detected {
                confirmed: false,
                truncated: true,
            },
            ..base(
                "symlink path longer than the probe records",
                Call::Rename,
                long_link,
                at(mnt, "new-long"),
            )
        },
    ]
}

/// A cgroup laid out like a kubelet (cgroupfs driver) container's, under a private parent.
pub(super) struct TestCgroup {
    pub(super) base: PathBuf,
    pub(super) container: PathBuf,
    pod_uid: String,
    container_id: String,
}

impl TestCgroup {
    fn create() -> Result<Self, SelftestError> {
        let root = find_cgroup2_mount()?;
        let seed = boot_ns_now() ^ u64::from(std::process::id()) << 32;
        let pod_uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            seed as u32,
            (seed >> 32) as u16,
            (seed >> 48) as u16 & 0xfff,
            seed as u16 & 0xfff,
            seed & 0xffff_ffff_ffff
        );
        let container_id = format!("{seed:016x}").repeat(4);
        let base = root.join(format!("imgstream-selftest-{}", std::process::id()));
        let container = base
            .join("kubepods/besteffort")
            .join(format!("pod{pod_uid}"))
            .join(&container_id);
        std::fs::create_dir_all(&container)
            .map_err(|e| SelftestError::Prepare(container.clone(), e))?;
        Ok(Self {
            base,
            container,
            pod_uid,
            container_id,
        })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Leaf first; cgroup directories are removed with rmdir, never recursively.
        let mut dir = self.container.clone();
        while dir.starts_with(&self.base) {
            let _ = std::fs::remove_dir(&dir);
            if !dir.pop() {
                break;
            }
        }
    }
}

/// Scratch directories, removed when dropped.
struct Workdir {
    root: PathBuf,
    mnt: PathBuf,
    plain: PathBuf,
}

impl Workdir {
    fn create(parent: &Path) -> Result<Self, SelftestError> {
        let root = parent.join(format!("imgstream-selftest-{}", std::process::id()));
        let (mnt, plain) = (root.join("mnt"), root.join("plain"));
        for dir in [&mnt, &plain] {
            std::fs::create_dir_all(dir).map_err(|e| SelftestError::Prepare(dir.clone(), e))?;
        }
        let before = plain.join("before");
        std::fs::write(&before, b"x").map_err(|e| SelftestError::Prepare(before, e))?;
        Ok(Self { root, mnt, plain })
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.mnt);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Events judged so far.
struct Judged {
    failure: RenameFailure,
    detection: Option<Detection>,
    not_symlink: Option<SourceKind>,
}

struct Run {
    probes: RenameProbes,
    detector: Detector,
    judged: Vec<Judged>,
}

impl Run {
    /// Drains the probes, judging each event now (while its caller may still be alive).
    fn pump(&mut self, wait: Duration) -> Result<(), SelftestError> {
        for event in self.probes.next_batch(wait)? {
            let Ok(failure) = event else { continue };
            let (detection, not_symlink) = match self.detector.judge(failure.clone()) {
                Verdict::Report(d) => (Some(*d), None),
                Verdict::NotSymlink(kind) => (None, Some(kind)),
            };
            self.judged.push(Judged {
                failure,
                detection,
                not_symlink,
            });
        }
        Ok(())
    }

    fn find(&self, new: &str) -> Option<&Judged> {
        self.judged.iter().find(|j| j.failure.new.path == new)
    }

    /// Pumps until an event for `new` arrives or the deadline passes.
    fn wait_for(&mut self, new: &str) -> Result<(), SelftestError> {
        let deadline = Instant::now() + EVENT_DEADLINE;
        while self.find(new).is_none() && Instant::now() < deadline {
            self.pump(Duration::from_millis(100))?;
        }
        Ok(())
    }
}

/// Runs every case and returns the report. Errors only when the test cannot run at all.
pub fn run(options: &Options) -> Result<Report, SelftestError> {
    let probes = RenameProbes::attach()?;
    let work = Workdir::create(&options.workdir)?;
    let _fuse = EnxioMount::mount(&work.mnt)?;
    let cgroup = TestCgroup::create()?;
    let cgroup_dir = cgroup.container.display().to_string();
    let mut peer = Helper::spawn(
        &options.helper,
        &["stay".into(), "--cgroup".into(), cgroup_dir.clone()],
    )?;
    peer.line()?;

    let mut run = Run {
        probes,
        detector: Detector::new(Some(CgroupResolver::discover()?)),
        judged: Vec::new(),
    };
    let mut results = Vec::new();
    for case in cases(&work.mnt, &work.plain) {
        let mut args = vec![
            "rename".to_string(),
            "--call".into(),
            format!("{:?}", case.call).to_lowercase(),
            "--old".into(),
            case.old.clone(),
            "--new".into(),
            case.new.clone(),
            "--flags".into(),
            case.flags.to_string(),
            "--cgroup".into(),
            cgroup_dir.clone(),
        ];
        if let Some(cwd) = &case.cwd {
            args.extend(["--cwd".into(), cwd.display().to_string()]);
        }
        if let Some(dir) = &case.dirfd {
            args.extend(["--dirfd".into(), dir.display().to_string()]);
        }
        if case.caller == Caller::Alive {
            args.push("--linger".into());
        }
        let mut helper = Helper::spawn(&options.helper, &args)?;
        let errno_line = helper.line()?;
        let caller_pid = helper.pid();
        if case.caller == Caller::Exited {
            helper.finish();
        }
        if case.expect != Expect::NoEvent {
            run.wait_for(&case.new)?;
        }
        helper.finish();
        results.push((case, errno_line, caller_pid));
    }
    // Anything still in flight (events that must not exist included) arrives now.
    run.pump(SETTLE)?;
    run.pump(Duration::ZERO)?;
    let drops = run.probes.drops();
    peer.finish();

    let mut cases: Vec<CaseResult> = results
        .iter()
        .map(|(case, errno_line, pid)| judge_case(&run, case, errno_line, *pid, &cgroup))
        .collect();
    cases.push(CaseResult {
        name: "no events dropped by the kernel side".into(),
        passed: drops.rename_events_dropped == 0 && drops.rename_inflight_full == 0,
        detail: format!("{drops:?}"),
    });
    drop(run);
    cases.extend(super::start_latency::cases(options, &cgroup)?);
    cases.extend(super::maps::cases(options, &cgroup)?);
    Ok(Report {
        kernel: kernel_release(),
        cases,
    })
}

fn judge_case(run: &Run, case: &Case, errno_line: &str, pid: u32, cg: &TestCgroup) -> CaseResult {
    let outcome = check_case(run, case, errno_line, pid, cg);
    CaseResult {
        name: case.name.to_string(),
        passed: outcome.is_ok(),
        detail: outcome.unwrap_or_else(|why| why),
    }
}

/// `Ok(what was seen)` or `Err(what was wrong)`.
fn check_case(
    run: &Run,
    case: &Case,
    errno_line: &str,
    pid: u32,
    cg: &TestCgroup,
) -> Result<String, String> {
    let want_errno = format!("errno={}", case.errno);
    if errno_line != want_errno {
        return Err(format!(
            "the helper's call returned {errno_line}, expected {want_errno}"
        ));
    }
    let judged = run.find(&case.new);
    let judged = match (case.expect, judged) {
        (Expect::NoEvent, None) => return Ok("no event, as expected".into()),
        (Expect::NoEvent, Some(j)) => return Err(format!("unexpected event: {:?}", j.failure)),
        (_, None) => return Err(format!("no event within {EVENT_DEADLINE:?}")),
        (_, Some(j)) => j,
    };
    let f = &judged.failure;
    let want_syscall = match case.call {
        Call::Rename => RenameSyscall::Rename,
        Call::Renameat => RenameSyscall::Renameat,
        Call::Renameat2 => RenameSyscall::Renameat2,
    };
    let cut = |path: &str| -> String { path.chars().take(imgstream_ebpf::PATH_CAP - 1).collect() };
    let checks = [
        (
            f.syscall == want_syscall,
            format!("syscall {:?}, expected {want_syscall:?}", f.syscall),
        ),
        (f.tgid == pid, format!("tgid {}, expected {pid}", f.tgid)),
        (f.ret == -libc::ENXIO, format!("ret {}", f.ret)),
        (
            f.flags == case.flags,
            format!("flags {:#x}, expected {:#x}", f.flags, case.flags),
        ),
        (
            f.old.path == cut(&case.old),
            format!("old path {:?}", f.old.path),
        ),
        (f.new.path == case.new, format!("new path {:?}", f.new.path)),
        (
            matches!(
                (case.dirfd.is_some(), f.old.dir),
                (true, DirFd::Fd(_)) | (false, DirFd::Cwd)
            ),
            format!("old dir {:?}", f.old.dir),
        ),
    ];
    if let Some((_, why)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(why.clone());
    }
    match (case.expect, &judged.detection, &judged.not_symlink) {
        (Expect::NotSymlink, None, Some(kind)) => {
            Ok(format!("ENXIO seen, dropped: source is {kind:?}"))
        }
        (Expect::NotSymlink, Some(d), _) => Err(format!("reported a non-symlink: {:?}", d.source)),
        (
            Expect::Detected {
                confirmed,
                truncated,
            },
            Some(d),
            _,
        ) => check_detection(d, confirmed, truncated, case.caller, pid, cg),
        (Expect::Detected { .. }, None, kind) => {
            Err(format!("not reported; source judged {kind:?}"))
        }
        (Expect::NoEvent, ..) | (Expect::NotSymlink, None, None) => {
            Err("inconsistent judgement".into())
        }
    }
}

fn check_detection(
    d: &Detection,
    confirmed: bool,
    truncated: bool,
    caller: Caller,
    pid: u32,
    cg: &TestCgroup,
) -> Result<String, String> {
    if d.confirmed != confirmed || d.failure.old.truncated != truncated {
        return Err(format!(
            "confirmed={} truncated={}, expected {confirmed}/{truncated} ({:?})",
            d.confirmed, d.failure.old.truncated, d.source
        ));
    }
    if confirmed {
        let via_ok = match (caller, d.inspected_via) {
            (Caller::Alive, Via::Caller(p)) => p == pid,
            (Caller::Exited, Via::CgroupPeer(p)) => p != pid,
            _ => false,
        };
        if !via_ok {
            return Err(format!(
                "inspected via {:?} with the caller {caller:?}",
                d.inspected_via
            ));
        }
    }
    let container = d.container.as_ref().ok_or("no container attributed")?;
    if container.container_id != cg.container_id
        || container.pod_uid.as_deref() != Some(&cg.pod_uid)
    {
        return Err(format!("attributed to {container:?}"));
    }
    Ok(format!(
        "reported: {} -> {}, {:?}, via {:?}, container {}…, pod {}",
        d.failure.old.path.chars().take(60).collect::<String>(),
        d.failure.new.path,
        d.flag_names,
        d.inspected_via,
        &container.container_id[..12],
        cg.pod_uid
    ))
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
