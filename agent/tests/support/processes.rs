//! The `imgstream` binary as the tests run it: one-shot commands, `mount`, the agent,
//! the FUSE keeper; and reading its HTTP API.

use super::*;

/// Runs the `imgstream` binary with `args`, asserting it succeeds; returns its output.
pub fn imgstream(args: &[&str]) -> std::process::Output {
    let out = Command::new(imgstream_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "imgstream {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `imgstream mount` as a child process; SIGTERM and wait on drop.
pub struct Mounted {
    child: Child,
    pub mountpoint: PathBuf,
    log: Option<PathBuf>,
}

impl Mounted {
    pub fn start(image: &str, mountpoint: &Path, cache: &Path, reg: &str, extra: &[&str]) -> Self {
        Self::start_logged(image, mountpoint, cache, reg, extra, None)
    }

    /// As `start`, with the mount's log written to `log` (see `log_text`).
    pub fn start_logged(
        image: &str,
        mountpoint: &Path,
        cache: &Path,
        reg: &str,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Self {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut cmd = Command::new(imgstream_bin());
        cmd.args(["mount", image])
            .arg(mountpoint)
            .arg("--cache-dir")
            .arg(cache)
            .args(["--insecure-registry", reg])
            .args(extra)
            .stdin(Stdio::null());
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).unwrap());
        }
        let child = cmd.spawn().unwrap();
        wait_until_mounted(mountpoint, Duration::from_secs(20));
        Self {
            child,
            mountpoint: mountpoint.to_path_buf(),
            log: log.map(Path::to_path_buf),
        }
    }

    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }

    pub fn stop(mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "imgstream mount exited with {status}");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(
            !mounts.contains(self.mountpoint.to_str().unwrap()),
            "unmounted on SIGTERM"
        );
    }
}

impl Mounted {
    /// Unmounts the mount point from outside, as `umount` does, and waits for the process
    /// to notice and exit cleanly on its own.
    pub fn unmount_from_outside(mut self) {
        let status = Command::new("umount")
            .arg(&self.mountpoint)
            .status()
            .unwrap();
        assert!(status.success(), "umount {}", self.mountpoint.display());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "imgstream mount still runs 20 s after its mount point was unmounted"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "imgstream mount exited with {status}");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // After a failed assertion: no orphan process, no stale mount.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// The value of the sample `series` (name and labels, as exposed) in a `/metrics` page.
pub fn metric(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .parse()
        .unwrap()
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    // Chunked bodies do not occur: the API answers with Content-Length.
    (status, body)
}

/// `imgstream agent` as a child process, with a store and an API on a free loopback port.
pub struct Agent {
    child: Child,
    pub api: SocketAddr,
    pub store: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(dir, extra, &[])
    }

    /// [`Agent::start`] with `env` added to the agent's environment.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(String, String)]) -> Self {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let store = dir.join("agent.redb");
        let log = dir.join(format!("agent-{}.log", api.port()));
        let child = Command::new(imgstream_bin())
            .args(["agent", "--api-addr", &api.to_string(), "--store"])
            .arg(&store)
            .arg("--detections")
            .arg(dir.join("detections.jsonl"))
            .args(extra)
            .envs(env.iter().map(|(name, value)| (name, value)))
            .env(
                "IMGSTREAM_LOG",
                std::env::var("IMGSTREAM_AGENT_LOG")
                    .unwrap_or_else(|_| "info,imgstream::agent=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut agent = Self {
            child,
            api,
            store,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                matches!(agent.child.try_wait(), Ok(None)),
                "the agent exited: {}",
                agent.log_text()
            );
            let attached = agent.log_text().contains("watching container starts");
            if attached && std::net::TcpStream::connect(api).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not start: {}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing `needle`; panics with the log after
    /// `within`.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the agent's log within {within:?}: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.api, path)
    }

    /// SIGTERM; the agent exits 0.
    pub fn stop(mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "the agent exited with {status}: {}",
            self.log_text()
        );
    }
}

impl Agent {
    /// Kills the agent (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `imgstream fuse-keeper` as a child process; killed on drop.
pub struct FuseKeeper {
    child: Child,
    pub socket: PathBuf,
}

impl FuseKeeper {
    pub fn start(socket: &Path) -> Self {
        Self::start_under(socket, &[])
    }

    /// Started through `wrapper` (a command line that runs the keeper's, as `setpriv`).
    pub fn start_under(socket: &Path, wrapper: &[&str]) -> Self {
        // One left by a killed keeper would look like this one being up.
        let _ = std::fs::remove_file(socket);
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(imgstream_bin());
                command
            }
            None => Command::new(imgstream_bin()),
        };
        let child = command
            .args(["fuse-keeper", "--socket"])
            .arg(socket)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the FUSE keeper did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket: socket.to_path_buf(),
        }
    }
}

impl FuseKeeper {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status (within 10 s, or a panic).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the FUSE keeper ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FuseKeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lazily unmounts every mount under `dir` (deepest first): what a keeper left mounted.
pub fn unmount_all_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| p.starts_with(dir.to_str().unwrap()))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `imgstream` binary: cargo's path for tests and benches; next to the examples'
/// directory for the demo (an example, built together with the binary by `cargo xtask demo`).
pub fn imgstream_bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_imgstream") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("imgstream")))
            .unwrap_or_else(|| PathBuf::from("imgstream")),
    }
}

/// Waits until `mountpoint` shows in /proc/self/mounts; fails the caller after `within`.
pub fn wait_until_mounted(mountpoint: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    let path = mountpoint.to_str().expect("a UTF-8 mount point");
    while !std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .contains(path)
    {
        assert!(Instant::now() < deadline, "{path} was not mounted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `stderr` to its end on a thread of its own (so the child never blocks on a full
/// pipe); the receiver gets a message for every line that contains `needle`.
pub fn on_line(
    stderr: std::process::ChildStderr,
    needle: &'static str,
) -> std::sync::mpsc::Receiver<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(needle) {
                let _ = tx.send(());
            }
        }
    });
    rx
}
