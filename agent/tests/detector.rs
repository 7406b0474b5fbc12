//! Host end-to-end tests of the rename-ENXIO detector: real eBPF programs in the running
//! kernel, a real FUSE mount emulating the regression, the real `imgstream` binary.
//!
//! They need root, tracefs and /dev/fuse, so plain `cargo test` skips them; `cargo xtask ci`
//! runs them as root with `--include-ignored`.

use std::{
    ffi::CString,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use imgstream::selftest::{self, EnxioMount};

const IMGSTREAM: &str = env!("CARGO_BIN_EXE_imgstream");
const ROOT_ONLY: &str = "needs root, tracefs and /dev/fuse: `cargo xtask ci` runs it";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("imgstream-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs root, tracefs and /dev/fuse: `cargo xtask ci` runs it"]
fn selftest_passes_every_case_on_the_host_kernel() {
    let workdir = scratch("selftest");
    let report = selftest::run(&selftest::Options {
        helper: IMGSTREAM.into(),
        workdir: workdir.clone(),
    })
    .expect("selftest could not run");
    for case in &report.cases {
        println!(
            "{} {}: {}",
            if case.passed { "ok  " } else { "FAIL" },
            case.name,
            case.detail
        );
    }
    assert!(
        report.cases.len() >= 10,
        "cases went missing: {}",
        report.cases.len()
    );
    assert!(
        report.passed(),
        "{ROOT_ONLY}: some cases failed on {}",
        report.kernel
    );
    std::fs::remove_dir_all(workdir).unwrap();
}

/// Renames `old` to `new` with renameat2(2), returning the errno (0 on success).
fn renameat2(old: &Path, new: &Path, flags: u32) -> i32 {
    let old = CString::new(old.to_str().unwrap()).unwrap();
    let new = CString::new(new.to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            old.as_ptr(),
            libc::AT_FDCWD,
            new.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

#[test]
#[ignore = "needs root, tracefs and /dev/fuse: `cargo xtask ci` runs it"]
fn agent_reports_a_detection_as_json_and_stops_on_sigterm() {
    let dir = scratch("agent");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = dir.join("detections.jsonl");
    let mut agent = Command::new(IMGSTREAM)
        .args(["agent", "--detections", out.to_str().unwrap()])
        .arg("--store")
        .arg(dir.join("agent.redb"))
        .args(["--api-addr", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the agent to say it is watching before provoking anything.
    let mut stderr = BufReader::new(agent.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("watching rename") {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "agent exited early:\n{log}"
        );
        log.push_str(&line);
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));

    let mount = EnxioMount::mount(&mnt).unwrap();
    assert_eq!(
        renameat2(
            &mnt.join("link"),
            &mnt.join("moved"),
            libc::RENAME_NOREPLACE
        ),
        libc::ENXIO
    );
    assert_eq!(
        renameat2(&mnt.join("file"), &mnt.join("moved-file"), 0),
        libc::ENXIO
    );

    // Other tests run renames concurrently: only lines about this mount count.
    let ours = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|j| {
                j["new"]["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(mnt.to_str().unwrap()))
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let json = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(json) = ours(&text).into_iter().next() {
            break json;
        }
        assert!(Instant::now() < deadline, "no detection written");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(json["syscall"], "renameat2");
    assert_eq!(json["old"]["path"], mnt.join("link").to_str().unwrap());
    assert_eq!(json["new"]["path"], mnt.join("moved").to_str().unwrap());
    assert_eq!(json["flag_names"][0], "RENAME_NOREPLACE");
    assert_eq!(json["source"]["kind"], "symlink");
    assert_eq!(json["confirmed"], true);
    assert_eq!(json["tgid"], std::process::id());
    assert!(json["cgroup_path"].is_string(), "{json}");

    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    assert!(status.success(), "agent exit: {status:?}");
    drop(mount);
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        ours(&text).len(),
        1,
        "the regular-file rename must not be reported:\n{text}"
    );
    // The detection is a flag in the store, which the report lists.
    let report = Command::new(IMGSTREAM)
        .args(["report", "--json", "--store"])
        .arg(dir.join("agent.redb"))
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let flags = report["flags"].as_array().unwrap();
    assert!(
        flags
            .iter()
            .any(|f| f["path"] == mnt.join("link").to_str().unwrap()
                && f["new_path"] == mnt.join("moved").to_str().unwrap()
                && f["syscall"] == "renameat2"),
        "{report}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
#[ignore = "needs root, tracefs and /dev/fuse: `cargo xtask ci` runs it"]
fn missing_privileges_and_tracefs_give_clear_errors() {
    let as_nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([IMGSTREAM, "agent"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&as_nobody.stderr);
    assert_eq!(as_nobody.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");

    // A private mount namespace without tracefs.
    let script = format!(
        "umount -l /sys/kernel/tracing; umount -l /sys/kernel/debug/tracing 2>/dev/null; exec {IMGSTREAM} agent"
    );
    let no_tracefs = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&no_tracefs.stderr);
    assert_eq!(no_tracefs.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("tracefs is not mounted") && stderr.contains("mount -t tracefs"),
        "{stderr}"
    );
}
