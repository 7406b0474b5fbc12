//! The agent's parts stand apart: a store that cannot be opened and a detections file on a
//! full disk leave the snapshotter (which containerd waits on) and the probes running, and
//! `/healthz` says which part failed.

mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[test]
fn a_failed_part_is_reported_while_the_snapshotter_runs() {
    support::require_root();
    let dir = support::scratch("agent-parts");
    let api = format!("127.0.0.1:{}", support::free_port());
    let socket = dir.join("snapshotter.sock");
    // A store below a regular file cannot be created.
    std::fs::write(dir.join("not-a-dir"), b"").unwrap();
    let log = dir.join("agent.log");
    let mut child = Command::new(support::imgstream_bin())
        .args(["agent", "--api-addr", &api])
        .arg("--store")
        .arg(dir.join("not-a-dir/agent.redb"))
        .args(["--detections", "/dev/full"])
        .arg("--snapshotter-socket")
        .arg(&socket)
        .arg("--snapshotter-root")
        .arg(dir.join("snapshotter"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = api.parse().unwrap();
    let (status, body) = loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the agent exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if socket.exists() && std::net::TcpStream::connect(addr).is_ok() {
            break support::http_get(addr, "/healthz");
        }
        assert!(Instant::now() < deadline, "the agent did not come up");
        std::thread::sleep(Duration::from_millis(100));
    };
    let parts: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(parts["snapshotter"], "running", "{body}");
    assert_eq!(parts["rename-probes"], "running", "{body}");
    let store = parts["store"].as_str().unwrap_or_default();
    assert!(store.starts_with("failed: "), "{body}");
    // SIGTERM: a clean exit.
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
