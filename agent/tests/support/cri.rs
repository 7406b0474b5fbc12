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
    let channel = imgstream::cri::channel(&containerd.socket).await.unwrap();
    let mut images = ImageServiceClient::new(channel);
    pull(&mut images, image)
        .await
        .unwrap_or_else(|e| panic!("PullImage {image}: {e}"));
    start_pod(containerd, image, (namespace, pod), command, mounts, logs).await
}

/// [`run_pod_with`] of an image already pulled: the sandbox and the container are created
/// and started, and the container's log file is returned.
pub async fn start_pod(
    containerd: &Containerd,
    image: &str,
    (namespace, pod): (&str, &str),
    command: Vec<String>,
    mounts: Vec<Mount>,
    logs: &std::path::Path,
) -> std::path::PathBuf {
    let channel = imgstream::cri::channel(&containerd.socket).await.unwrap();
    let mut runtime = RuntimeServiceClient::new(channel);
    std::fs::create_dir_all(logs).unwrap();
    let uid = format!(
        "00000000-0000-4000-8000-{:012x}",
        pod.bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            & 0xffff_ffff_ffff
    );
    let sandbox_config = sandbox_config(namespace, pod, &uid, logs);
    let sandbox = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"))
        .into_inner()
        .pod_sandbox_id;
    let id = runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox,
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
                    ("io.kubernetes.container.name", "app"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}"))
        .into_inner()
        .container_id;
    runtime
        .start_container(StartContainerRequest { container_id: id })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}"));
    logs.join("app.log")
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
