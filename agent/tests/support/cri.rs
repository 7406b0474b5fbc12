//! kubelet's part over a containerd's CRI socket, for the end-to-end test and the demo.

use std::time::Duration;

use k8s_cri::v1::{
    AuthConfig, ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PullImageRequest, RunPodSandboxRequest,
    StartContainerRequest, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};

use super::Containerd;

/// Runs a pod with one container of `image` over the CRI socket of `containerd`; returns the
/// container's log file.
pub async fn run_pod(
    containerd: &Containerd,
    image: &str,
    (namespace, pod): (&str, &str),
    truth_dir: &std::path::Path,
    logs: &std::path::Path,
) -> std::path::PathBuf {
    let command = vec![
        "/clockprobe".to_string(),
        "log".into(),
        "100".into(),
        format!("/truth/{pod}"),
    ];
    let mounts = vec![Mount {
        container_path: "/truth".into(),
        host_path: truth_dir.display().to_string(),
        ..Default::default()
    }];
    run_pod_with(containerd, image, (namespace, pod), command, mounts, logs).await
}

/// How long a pull is retried while containerd cannot reach a proxy snapshotter yet.
const PULL_UNAVAILABLE_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// PullImage as kubelet does it: retried while containerd answers `Unavailable`. containerd
/// dials a proxy snapshotter when it starts, before the agent listens, and its gRPC channel
/// then reconnects with backoff; a pull made inside that window fails with `Unavailable`
/// though the snapshotter is up (seen here on a loaded machine).
pub async fn pull(
    images: &mut ImageServiceClient<tonic::transport::Channel>,
    image: &str,
) -> Result<(), tonic::Status> {
    pull_with(images, image, None).await
}

/// [`pull`] with the credentials kubelet found for the image (an imagePullSecret's).
pub async fn pull_with(
    images: &mut ImageServiceClient<tonic::transport::Channel>,
    image: &str,
    auth: Option<AuthConfig>,
) -> Result<(), tonic::Status> {
    pull_for(images, image, auth, None).await
}

/// [`pull_with`] for the pod of `sandbox`, as kubelet pulls a pod's image (PullImage carries
/// the pod's sandbox config).
pub async fn pull_for(
    images: &mut ImageServiceClient<tonic::transport::Channel>,
    image: &str,
    auth: Option<AuthConfig>,
    sandbox: Option<PodSandboxConfig>,
) -> Result<(), tonic::Status> {
    let deadline = std::time::Instant::now() + PULL_UNAVAILABLE_FOR;
    loop {
        let request = PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: auth.clone(),
            sandbox_config: sandbox.clone(),
        };
        match images.pull_image(request).await {
            Ok(_) => return Ok(()),
            Err(e)
                if e.code() == tonic::Code::Unavailable && std::time::Instant::now() < deadline =>
            {
                eprintln!("PullImage {image}: {}; retrying", e.message());
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// [`run_pod`] with any command and mounts.
pub async fn run_pod_with(
    containerd: &Containerd,
    image: &str,
    (namespace, pod): (&str, &str),
    command: Vec<String>,
    mounts: Vec<Mount>,
    logs: &std::path::Path,
) -> std::path::PathBuf {
    let run = Kubelet::new(containerd)
        .run_pod(image, (namespace, pod), command, mounts, logs)
        .await;
    run.log
}

/// [`run_pod_with`] of an image already pulled (kubelet skips the pull of an image the
/// node has): the pod cgroup, the sandbox and the container are created and started, and
/// the container's log file is returned.
pub async fn start_pod(
    containerd: &Containerd,
    image: &str,
    (namespace, pod): (&str, &str),
    command: Vec<String>,
    mounts: Vec<Mount>,
    logs: &std::path::Path,
) -> std::path::PathBuf {
    let mut kubelet = Kubelet::new(containerd);
    kubelet.pull = false;
    kubelet
        .run_pod(image, (namespace, pod), command, mounts, logs)
        .await
        .log
}

/// How kubelet's cgroup driver names a pod's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// `/kubepods/besteffort/pod<uid>`.
    Cgroupfs,
    /// `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`, with
    /// the containers' cgroups made by the cgroupfs driver under it.
    SystemdSlices,
}

/// kubelet's part for one pod, in kubelet's order: it creates the pod's cgroup, then calls
/// RunPodSandbox, PullImage (with the pod's sandbox config), CreateContainer and
/// StartContainer.
pub struct Kubelet<'a> {
    pub containerd: &'a Containerd,
    /// Where PullImage goes: containerd's own socket, or the agent's CRI image proxy.
    pub image_service: std::path::PathBuf,
    pub layout: CgroupLayout,
    /// Whether to pull (kubelet does unless the node has the image).
    pub pull: bool,
}

/// The times of kubelet's calls for one pod, as the harness took them: (before, after),
/// in ns since the epoch.
#[derive(Clone, Copy, Debug, Default)]
pub struct KubeletTimes {
    pub pod_cgroup: (u64, u64),
    pub run_sandbox: (u64, u64),
    pub pull: (u64, u64),
    pub create: (u64, u64),
    pub start: (u64, u64),
}

/// One pod kubelet ran.
pub struct PodRun {
    pub log: std::path::PathBuf,
    pub uid: String,
    pub sandbox_id: String,
    pub container_id: String,
    /// The pod cgroup's path under the cgroup2 root, as kubelet made it.
    pub cgroup: String,
    pub times: KubeletTimes,
    /// When PullImage was called (the bench times from there).
    pub pull_called: std::time::Instant,
}

fn now_ns() -> u64 {
    imgstream::time::unix_ns(std::time::SystemTime::now())
}

/// `f`'s result and the times just before and after it.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, (u64, u64)) {
    let before = now_ns();
    let out = f.await;
    (out, (before, now_ns()))
}

impl<'a> Kubelet<'a> {
    /// Pulls through containerd's own image service, into a cgroupfs-style pod cgroup.
    pub fn new(containerd: &'a Containerd) -> Self {
        Self {
            containerd,
            image_service: containerd.socket.clone(),
            layout: CgroupLayout::Cgroupfs,
            pull: true,
        }
    }

    /// Runs a pod with one container, `app`, of `image`.
    pub async fn run_pod(
        &self,
        image: &str,
        (namespace, pod): (&str, &str),
        command: Vec<String>,
        mounts: Vec<Mount>,
        logs: &std::path::Path,
    ) -> PodRun {
        std::fs::create_dir_all(logs).unwrap();
        // A fresh UID per run: a pod cgroup left by an earlier run would not be created
        // again, and kubelet never reuses one.
        let seed = format!("{pod}/{}/{}", std::process::id(), now_ns());
        let hash = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            hash >> 32,
            (hash >> 16) & 0xffff,
            hash & 0xfff,
            (hash >> 20) & 0xfff,
            hash.rotate_left(17) & 0xffff_ffff_ffff
        );
        let cgroup = match self.layout {
            CgroupLayout::Cgroupfs => format!("/kubepods/besteffort/pod{uid}"),
            CgroupLayout::SystemdSlices => format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ),
        };
        let root = imgstream::attribution::find_cgroup2_mount().expect("a cgroup2 mount");
        let dir = root.join(cgroup.trim_start_matches('/'));
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        let ((), pod_cgroup) = timed(async {
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        })
        .await;
        self.containerd.remove_with(dir);

        let channel = imgstream::cri::channel(&self.containerd.socket)
            .await
            .unwrap();
        let mut runtime = RuntimeServiceClient::new(channel);
        let mut sandbox_config = sandbox_config(namespace, pod, &uid, logs);
        if let Some(linux) = sandbox_config.linux.as_mut() {
            linux.cgroup_parent = match self.layout {
                CgroupLayout::Cgroupfs => cgroup.clone(),
                // containerd hands a parent whose last component ends in `.slice` to
                // systemd (as `slice:cri-containerd:id`), which needs systemd as PID 1;
                // the trailing `/.` keeps it a plain path: runc's cgroupfs driver makes the
                // containers' cgroups right under the slice directory.
                CgroupLayout::SystemdSlices => format!("{cgroup}/."),
            };
        }
        let (sandbox, run_sandbox) = timed(runtime.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        }))
        .await;
        let sandbox_id = sandbox
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"))
            .into_inner()
            .pod_sandbox_id;
        let images_channel = imgstream::cri::channel(&self.image_service).await.unwrap();
        let mut images = ImageServiceClient::new(images_channel);
        let pull_called = std::time::Instant::now();
        let pull = if self.pull {
            let (pulled, pull) = timed(pull_for(
                &mut images,
                image,
                None,
                Some(sandbox_config.clone()),
            ))
            .await;
            pulled.unwrap_or_else(|e| panic!("PullImage {image}: {e}"));
            pull
        } else {
            (now_ns(), now_ns())
        };
        let (created, create) = timed(
            runtime.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.into(),
                        ..Default::default()
                    }),
                    command,
                    log_path: "app.log".into(),
                    mounts,
                    labels: [
                        ("io.kubernetes.pod.name", pod),
                        ("io.kubernetes.pod.namespace", namespace),
                        ("io.kubernetes.pod.uid", uid.as_str()),
                        ("io.kubernetes.container.name", "app"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox_config),
            }),
        )
        .await;
        let container_id = created
            .unwrap_or_else(|e| panic!("CreateContainer: {e}"))
            .into_inner()
            .container_id;
        let (started, start) = timed(runtime.start_container(StartContainerRequest {
            container_id: container_id.clone(),
        }))
        .await;
        started.unwrap_or_else(|e| panic!("StartContainer: {e}"));
        PodRun {
            log: logs.join("app.log"),
            uid,
            sandbox_id,
            container_id,
            cgroup,
            times: KubeletTimes {
                pod_cgroup,
                run_sandbox,
                pull,
                create,
                start,
            },
            pull_called,
        }
    }
}

/// A host-network pod sandbox as kubelet describes one (no hostname: a host-network sandbox
/// must not set it).
pub fn sandbox_config(
    namespace: &str,
    pod: &str,
    uid: &str,
    logs: &std::path::Path,
) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: pod.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A containerd with its CRI plugin whose snapshotter is the agent at `socket` (through the
/// drop-in `imgstream containerd-config` generates; deploy/ ships the same), pods getting
/// `sandbox_image` and `registry` reached over plain HTTP.
pub fn containerd_for_imgstream(
    name: &str,
    registry: &str,
    sandbox_image: &str,
    socket: &std::path::Path,
) -> Containerd {
    let dropin = super::imgstream(&["containerd-config", "--socket", socket.to_str().unwrap()]);
    Containerd::start_cri_with(
        name,
        registry,
        sandbox_image,
        &String::from_utf8(dropin.stdout)
            .unwrap()
            .replace("version = 2\n", ""),
    )
}

/// `imgstream agent` flags for containerd's snapshotter on `socket`, with its metadata and
/// cache under `dir` and `registry` over plain HTTP. The bytes a start fetches are its own:
/// no background download, and no read-around (it sizes its guesses by the link's measured
/// round trip, which depends on this machine's timing).
pub fn snapshotter_args(
    containerd: &Containerd,
    socket: &std::path::Path,
    dir: &std::path::Path,
    registry: &str,
) -> Vec<String> {
    [
        "--cri-socket",
        containerd.socket.to_str().unwrap(),
        "--snapshotter-socket",
        socket.to_str().unwrap(),
        "--snapshotter-root",
        &dir.join("snapshotter").display().to_string(),
        "--cache-dir",
        &dir.join("cache").display().to_string(),
        "--insecure-registry",
        registry,
        "--no-background",
        "--read-around-bdps",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

/// The root of a pod sandbox image under `scratch`: the clockprobe, to run as
/// `/clockprobe pause 0`, and the directories a container needs.
pub fn pause_rootfs(scratch: &std::path::Path) -> std::path::PathBuf {
    let root = scratch.join("pause-rootfs");
    for dir in ["proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(super::clockprobe(), root.join("clockprobe")).unwrap();
    root
}

/// Pushes `REG/NAME:v1` (entrypoint `/clockprobe log 0` over `rootfs`, which must hold it)
/// and `REG/NAME:pause` (the entrypoint alone, pausing: a pod sandbox image), then converts
/// v1 to `REG/NAME:esgz` (1 MiB chunks, the entrypoint first). Returns the eStargz layer's
/// size.
pub async fn clockprobe_images(
    scratch: &std::path::Path,
    reg: &str,
    name: &str,
    rootfs: &std::path::Path,
) -> u64 {
    let pause_rootfs = pause_rootfs(scratch);
    for (tag, cmd, root) in [
        ("v1", ["/clockprobe", "log", "0"], rootfs),
        (
            "pause",
            ["/clockprobe", "pause", "0"],
            pause_rootfs.as_path(),
        ),
    ] {
        let layout = scratch.join(format!("layout-{tag}"));
        super::build_image(&layout, tag, &[root.to_path_buf()], &cmd).await;
        super::skopeo_copy(
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{reg}/{name}:{tag}"),
        );
    }
    convert_clockprobe_image(
        scratch,
        &format!("{reg}/{name}:v1"),
        &format!("{reg}/{name}:esgz"),
        &["--insecure-registry", reg],
    )
}

/// `imgstream convert SRC DST` of a clockprobe image (1 MiB chunks, the entrypoint first),
/// with `extra` flags; returns the eStargz layer's size.
pub fn convert_clockprobe_image(
    scratch: &std::path::Path,
    src: &str,
    dst: &str,
    extra: &[&str],
) -> u64 {
    let mut args = vec![
        "convert",
        src,
        dst,
        "--chunk-size",
        "1M",
        "--prioritize",
        "clockprobe",
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
    ];
    args.extend(extra);
    let out = super::imgstream(&args);
    assert!(
        out.status.success(),
        "imgstream convert {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let converted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    converted["layers"][0]["size"].as_u64().unwrap()
}

/// Waits until the CRI log file holds the clockprobe's line.
pub fn wait_for_log(path: &std::path::Path) -> String {
    wait_for_line(path, "boottime=")
}

/// Waits until the CRI log file holds `needle`.
pub fn wait_for_line(path: &std::path::Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
