//! `cargo xtask demo`: the main job on its built-in default, no cluster and no outside
//! registry.
//!
//! 1. Image streaming (agent/examples/demo.rs): a sample image served from a local registry
//!    behind a 100 Mbit/s link, started by two containerd instances over CRI, one with
//!    imgstream as its snapshotter and one without; PullImage -> first log line for both,
//!    and imgstream's latency report.
//! 2. The rename-ENXIO detector: it starts `imgstream agent`, mounts a FUSE filesystem that
//!    emulates the overlayfs regression, and runs coreutils `mv` on a symlink and on a regular
//!    file from inside a cgroup laid out like a Kubernetes pod's container. The agent flags
//!    the symlink rename (with the container id and pod UID) and stays quiet about the
//!    regular file.
//!
//! Everything is cleaned up afterwards.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cmd, setup};

const POD_UID: &str = "d3a0d3a0-0000-4000-8000-000000000001";
const CONTAINER_ID: &str = "de1105de1105de1105de1105de1105de1105de1105de1105de1105de1105de11";

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the demo needs root: it loads eBPF programs, mounts FUSE and creates a cgroup");
    }
    setup::run()?;
    cmd::run(Command::new("cargo").current_dir(root).args([
        "build",
        "-p",
        "imgstream-agent",
        "--bin",
        "imgstream",
        "--example",
        "demo",
    ]))?;
    println!("\n=== Part 1: image streaming ===\n");
    cmd::run(&mut Command::new(root.join("target/debug/examples/demo")))
        .context("the streaming demo failed")?;
    println!("\n=== Part 2: the rename-ENXIO detector ===");
    let imgstream = root.join("target/debug/imgstream");
    let scratch = std::env::temp_dir().join(format!("imgstream-demo-{}", std::process::id()));
    let mnt = scratch.join("rootfs");
    std::fs::create_dir_all(&mnt)?;
    let cgroup = Cgroup::create()?;
    let detections = scratch.join("detections.jsonl");

    println!("\n1. Start the agent (rename-ENXIO probes on rename, renameat, renameat2)");
    let mut agent = Guard(
        Command::new(&imgstream)
            .args(["agent", "--detections"])
            .arg(&detections)
            .stderr(Stdio::piped())
            .spawn()
            .context("starting imgstream agent")?,
    );
    wait_for_line(&mut agent.0, "watching rename", "the agent")?;

    println!(
        "\n2. Mount an image filesystem that has the overlayfs symlink-rename regression (emulated with FUSE)"
    );
    let mut emulation = Guard(
        Command::new(&imgstream)
            .args(["selftest-helper", "emulate", "--mountpoint"])
            .arg(&mnt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    wait_for_stdout(&mut emulation.0, "ready")?;
    println!(
        "   {}: a symlink `link` and a regular file `file`",
        mnt.display()
    );

    println!("\n3. Inside pod {POD_UID}'s container, `mv` both");
    for name in ["link", "file"] {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec mv {dir}/{name} {dir}/{name}.moved",
            cgroup.container.display(),
            dir = mnt.display()
        );
        let out = Command::new("sh").args(["-c", &script]).output()?;
        println!(
            "   $ mv {name} {name}.moved  ->  {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    println!("\n4. What the agent reported");
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&detections).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains(&mnt.display().to_string()))
        {
            break line.to_string();
        }
        if Instant::now() > deadline {
            bail!("the agent reported nothing within 10 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Give a wrong report on the regular file time to show up, if there were one.
    std::thread::sleep(Duration::from_millis(500));
    let all = std::fs::read_to_string(&detections)?;
    let ours: Vec<&str> = all
        .lines()
        .filter(|l| l.contains(&mnt.display().to_string()))
        .collect();
    println!("   {line}");
    let flagged_pod = line.contains(POD_UID) && line.contains(CONTAINER_ID);
    let file_reported = ours.iter().any(|l| l.contains("file.moved"));

    drop(emulation);
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let status = agent.0.wait()?;
    drop(cgroup);
    let _ = std::fs::remove_dir_all(&scratch);

    println!(
        "\ndemo: symlink rename flagged for pod {POD_UID}: {}; regular-file rename reported: {}; agent exit: {status}",
        if flagged_pod { "yes" } else { "NO" },
        if file_reported { "YES (wrong)" } else { "no" }
    );
    if !flagged_pod || file_reported || !status.success() {
        bail!("the demo did not go as expected");
    }
    Ok(())
}

/// A child process killed and reaped when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_line(child: &mut Child, needle: &str, what: &str) -> anyhow::Result<()> {
    let stderr = child.stderr.take().context("stderr")?;
    let mut reader = BufReader::new(stderr);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("{what} exited before it was ready");
        }
        eprint!("   {line}");
        if line.contains(needle) {
            break;
        }
    }
    // Keep forwarding the agent's log so its detection line shows.
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            eprintln!("   {line}");
        }
    });
    Ok(())
}

fn wait_for_stdout(child: &mut Child, needle: &str) -> anyhow::Result<()> {
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.contains(needle) {
        bail!("the emulation did not start: {line:?}");
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

/// A cgroup laid out like a kubelet (cgroupfs driver) container's, removed when dropped.
struct Cgroup {
    base: PathBuf,
    container: PathBuf,
}

impl Cgroup {
    fn create() -> anyhow::Result<Self> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let root = mounts
            .lines()
            .find(|l| {
                l.split(" - ")
                    .nth(1)
                    .is_some_and(|r| r.starts_with("cgroup2 "))
            })
            .and_then(|l| l.split_whitespace().nth(4))
            .context("no cgroup2 hierarchy is mounted")?;
        let base = Path::new(root).join("imgstream-demo");
        let container = base
            .join("kubepods/besteffort")
            .join(format!("pod{POD_UID}"))
            .join(CONTAINER_ID);
        std::fs::create_dir_all(&container)
            .with_context(|| format!("creating {}", container.display()))?;
        Ok(Self { base, container })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let mut dir = self.container.clone();
        while dir.starts_with(&self.base) {
            let _ = std::fs::remove_dir(&dir);
            if !dir.pop() {
                break;
            }
        }
    }
}
