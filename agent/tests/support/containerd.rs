//! A private containerd (Debian's package) with its own root, state and socket.

use super::*;

/// A private containerd (Debian's package) with its own root, state and socket; stopped and
/// cleaned up when dropped.
pub struct Containerd {
    pub socket: PathBuf,
    child: Child,
    dir: PathBuf,
    /// Pod cgroups made for this containerd's pods (as kubelet does), removed with it.
    pod_cgroups: std::sync::Mutex<Vec<PathBuf>>,
}

impl Containerd {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n")
    }

    /// A containerd with its CRI plugin: pods get `sandbox_image`, and `registry` is
    /// reached over plain HTTP. The settings this machine needs: no CAP_SYS_RESOURCE, so
    /// `restrict_oom_score_adj`.
    pub fn start_cri(name: &str, registry: &str, sandbox_image: &str) -> Self {
        Self::start_cri_with(name, registry, sandbox_image, "")
    }

    /// [`Containerd::start_cri`] with more configuration appended (TOML).
    pub fn start_cri_with(name: &str, registry: &str, sandbox_image: &str, extra: &str) -> Self {
        Self::start_with(
            name,
            &format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{sandbox_image}\"\n  restrict_oom_score_adj = true\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{registry}\"]\n  endpoint = [\"http://{registry}\"]\n{extra}"
            ),
        )
    }

    fn start_with(name: &str, extra: &str) -> Self {
        let dir = scratch(&format!("containerd-{name}"));
        let socket = dir.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n{extra}",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .expect("containerd is needed: cargo xtask setup installs it");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = Command::new("ctr")
                .arg("-a")
                .arg(&socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start; see {}",
                dir.join("containerd.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            socket,
            child,
            dir,
            pod_cgroups: Default::default(),
        }
    }

    /// Removes the pod cgroup `dir` when this containerd goes (its containers' cgroups
    /// are gone then).
    pub fn remove_with(&self, dir: PathBuf) {
        self.pod_cgroups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir);
    }

    /// Runs `ctr -a SOCK -n imgstream-test ARGS`, returning (success, stdout, stderr).
    pub fn ctr(&self, args: &[&str]) -> (bool, String, String) {
        self.ctr_ns("imgstream-test", args)
    }

    /// Runs `ctr -a SOCK -n NAMESPACE ARGS` (CRI's namespace is `k8s.io`).
    pub fn ctr_ns(&self, namespace: &str, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", namespace])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers outlive containerd (their shims keep them): kill them first.
        for ns in ["imgstream-test", "k8s.io"] {
            let (_, tasks, _) = self.ctr_ns(ns, &["tasks", "ls", "-q"]);
            let tasks: Vec<&str> = tasks
                .lines()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .collect();
            for task in &tasks {
                self.ctr_ns(ns, &["tasks", "kill", "--signal", "SIGKILL", task]);
            }
            if !tasks.is_empty() {
                std::thread::sleep(Duration::from_millis(500));
            }
            for task in &tasks {
                self.ctr_ns(ns, &["tasks", "delete", "--force", task]);
            }
        }
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The sandboxes' and containers' cgroups went with their tasks; their pods' go now.
        for dir in self
            .pod_cgroups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            if let Err(err) = std::fs::remove_dir(&dir) {
                eprintln!("pod cgroup {} not removed: {err}", dir.display());
            }
        }
        // Overlay mounts of snapshots may linger: detach them before removing the tree.
        umount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
