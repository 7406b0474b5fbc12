//! Private images with kubelet's credentials: Debian's docker-registry with htpasswd auth,
//! Debian's containerd (CRI plugin) with `imgstream agent` as its snapshotter, and the
//! agent's CRI image proxy where kubelet's `--image-service-endpoint` would point. The test
//! plays kubelet: the credentials exist only in the `auth` of its PullImage calls (the node
//! has no docker config), yet the image's layer is mounted lazily (pulled past the proxy, the
//! lazy mount is refused and counted as such, and containerd unpacks the layer) and the pod starts from
//! it having fetched a part of it; without them the pull fails with the registry's refusal
//! and nothing is mounted; no file the agent writes holds the secret; and removing the pod
//! and the image unmounts the layer, deletes its cached chunks and drops its repository's
//! credentials while another repository's stay.

mod support;

use std::path::Path;

use k8s_cri::v1::{
    AuthConfig, FilesystemUsage, ImageFsInfoRequest, ImageSpec, ListImagesRequest,
    ListPodSandboxRequest, RemoveImageRequest, RemovePodSandboxRequest, StopPodSandboxRequest,
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use support::{
    Agent, Fault, Proxy, Registry,
    cri::{containerd_for_imgstream, pull_with, snapshotter_args, start_pod, wait_for_log},
};

const USER: &str = "puller";
const SECRET: &str = "pr1vate-Pull-S3cret";

/// Pushes the image in layout `src` to `dst` with the registry's credentials.
fn push(src: &str, dst: &str) {
    support::skopeo_copy_as(src, dst, Some(&format!("{USER}:{SECRET}")));
}

/// Builds and pushes, with the registry's credentials, `private/app:esgz` (the entrypoint and
/// 16 MB it does not read at start, in `data/blob0` and `data/blob1`, converted to eStargz)
/// and `private/pause:v1`. Returns the app layer's size.
async fn push_images(scratch: &Path, reg: &str) -> u64 {
    let rootfs = support::clockprobe_rootfs(&scratch.join("rootfs"), &["data"]);
    for i in 0..2u64 {
        std::fs::write(rootfs.join(format!("data/blob{i}")), blob(i)).unwrap();
    }
    let v1 = scratch.join("layout-v1");
    support::build_image(&v1, "v1", &[rootfs], &["/clockprobe", "log", "0"]).await;
    let esgz = scratch.join("layout-esgz");
    let layer_bytes = support::cri::convert_clockprobe_image(
        scratch,
        &format!("oci:{}:v1", v1.display()),
        &format!("oci:{}:esgz", esgz.display()),
        &[],
    );
    push(
        &format!("oci:{}:esgz", esgz.display()),
        &format!("docker://{reg}/private/app:esgz"),
    );
    let pause_rootfs = support::cri::pause_rootfs(scratch);
    let pause = scratch.join("layout-pause");
    support::build_image(
        &pause,
        "v1",
        &[pause_rootfs],
        &["/clockprobe", "pause", "0"],
    )
    .await;
    push(
        &format!("oci:{}:v1", pause.display()),
        &format!("docker://{reg}/private/pause:v1"),
    );
    layer_bytes
}

/// The agent's flags in these tests: containerd's snapshotter with its state under
/// `agent_dir`, the image proxy on `image_socket` where kubelet's `--image-service-endpoint`
/// would point, the background download on from the mount, no credentials of the node's
/// own; then `extra`.
fn agent_args(
    containerd: &support::Containerd,
    socket: &Path,
    agent_dir: &Path,
    registry: &str,
    image_socket: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = snapshotter_args(containerd, socket, agent_dir, registry)
        .into_iter()
        .filter(|a| a != "--no-background")
        .collect();
    let no_docker_config = agent_dir.join("no-docker-config.json");
    args.extend(
        [
            "--cri-image-proxy",
            image_socket.to_str().unwrap(),
            "--cri-upstream",
            containerd.socket.to_str().unwrap(),
            "--auth-file",
            no_docker_config.to_str().unwrap(),
            "--background-delay-secs",
            "0",
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .map(String::from),
    );
    args
}

/// The bytes of the app image's `data/blob{i}`.
fn blob(i: u64) -> Vec<u8> {
    support::noise(i + 1, 8 << 20)
}

/// RemoveImage `image`, as kubelet's image GC does it.
async fn remove_image(images: &mut ImageServiceClient<tonic::transport::Channel>, image: &str) {
    images
        .remove_image(RemoveImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("RemoveImage {image}: {e}"));
}

/// How many files there are under `dir`.
fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => files_in(&e.path()),
                Ok(_) => 1,
                Err(_) => 0,
            })
            .sum()
    })
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if kind.is_file()
            && std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path.display().to_string());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_streams_with_the_credentials_kubelet_hands_its_pull() {
    support::require_root();
    let scratch = support::scratch("private-images");
    let registry = Registry::start("private-images", Some((USER, SECRET)));
    let reg = registry.host();

    let layer_bytes = push_images(&scratch, &reg).await;

    // Everything containerd and the agent fetch goes through the counting proxy.
    let proxy = Proxy::start(registry.addr, Fault::None);
    let host = proxy.host();
    let (app, pause_image) = (
        format!("{host}/private/app:esgz"),
        format!("{host}/private/pause:v1"),
    );
    let socket = scratch.join("snapshotter.sock");
    let containerd = containerd_for_imgstream("private-images", &host, &pause_image, &socket);
    let agent_dir = scratch.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let image_socket = scratch.join("kubelet-image.sock");
    // The background download runs, slowly (16 MB at 256 KB/s): it is still under way when
    // the image is removed.
    let (kube_api, api_seen) = support::kube::mock_api().await;
    let agent_args = agent_args(
        &containerd,
        &socket,
        &agent_dir,
        &host,
        &image_socket,
        &[
            "--background-bandwidth",
            "256K",
            // Events go to the stand-in API server.
            "--flag-pods-as",
            "node-1",
            "--kube-api",
            &kube_api,
        ],
    );
    let args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let agent = Agent::start(&agent_dir, &args);
    // kubelet's view: the image service is the agent's socket.
    let mut images = ImageServiceClient::new(imgstream::cri::channel(&image_socket).await.unwrap());
    let auth = AuthConfig {
        username: USER.into(),
        password: SECRET.into(),
        ..Default::default()
    };

    // kubelet pulling past the proxy (straight from containerd, with the credentials): the
    // agent never saw them, so the registry refuses its lazy mount, containerd unpacks the
    // layer, and the log and /metrics say why.
    let mut direct =
        ImageServiceClient::new(imgstream::cri::channel(&containerd.socket).await.unwrap());
    pull_with(&mut direct, &app, Some(auth.clone()))
        .await
        .unwrap_or_else(|e| panic!("PullImage {app} from containerd itself: {e}"));
    let agent_log = agent.log_text();
    assert!(
        agent_log.contains("lazy mount refused by the registry")
            && !agent_log.contains("layer mounted lazily"),
        "{agent_log}"
    );
    let (status, page) = support::http_get(agent.api, "/metrics");
    assert_eq!(status, 200);
    let series = r#"imgstream_layers_opened_total{how="whole",why="lazy_mount_credentials"}"#;
    assert_eq!(support::metric(&page, series), 1, "{page}");
    // Gone again, so that the pulls below prepare the layer afresh.
    remove_image(&mut direct, &app).await;

    // Without credentials: the registry's refusal, passed through, and nothing mounted.
    let refused = pull_with(&mut images, &app, None).await.unwrap_err();
    let message = refused.message().to_ascii_lowercase();
    assert!(
        message.contains("401") || message.contains("unauthorized"),
        "{refused:?}"
    );
    assert!(
        !agent.log_text().contains("layer mounted lazily"),
        "{}",
        agent.log_text()
    );

    // With them, as an imagePullSecret gives them: both images pulled, the app's layer lazily.
    pull_with(&mut images, &pause_image, Some(auth.clone()))
        .await
        .unwrap_or_else(|e| panic!("PullImage {pause_image}: {e}"));
    let before = proxy.bytes();
    // kubelet's pull for a pod carries the pod's sandbox config.
    let pod_uid = "6e0d2c1a-8f43-4b6e-9b1e-0c7a4d5e2f11";
    let sandbox = support::cri::sandbox_config("private", "private", pod_uid, &scratch);
    support::cri::pull_for(&mut images, &app, Some(auth), Some(sandbox))
        .await
        .unwrap_or_else(|e| panic!("PullImage {app}: {e}"));
    let agent_log = agent.log_text();
    assert!(agent_log.contains("layer mounted lazily"), "{agent_log}");
    // The proxy saw the pull before containerd prepared the layer: the manifest and the TOC
    // were fetched ahead, with the pull's credentials, and the layer's opening waited for
    // them (so the line comes first).
    let line_of = |what: &str| {
        agent_log
            .lines()
            .position(|line| line.contains(what) && line.contains(&format!("image={app}")))
            .unwrap_or_else(|| panic!("no {what:?} line for {app}: {agent_log}"))
    };
    assert!(
        line_of("pull seen: the image's manifest and TOCs are fetched before containerd asks")
            < line_of("layer mounted lazily"),
        "{agent_log}"
    );

    // GKE's signals: the pod is told its image streams, and /metrics counts the images
    // pulled through the proxy by how their layers were served (the pause image's layer is
    // not eStargz: unpacked).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let event = loop {
        let found = api_seen
            .lock()
            .unwrap()
            .iter()
            .find(|seen| seen.body["reason"] == "ImageStreaming")
            .cloned();
        if let Some(event) = found {
            break event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ImageStreaming Event: {}",
            agent.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        (event.method.as_str(), event.path.as_str()),
        ("POST", "/api/v1/namespaces/private/events")
    );
    assert_eq!(
        event.body["message"],
        format!("image {app} is backed by imgstream: 1 of 1 layers lazy")
    );
    assert_eq!(event.body["type"], "Normal");
    assert_eq!(
        event.body["involvedObject"],
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "name": "private", "namespace": "private", "uid": pod_uid})
    );
    assert_eq!(
        api_seen
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.body["reason"] == "ImageStreaming")
            .count(),
        1,
        "one Event, for the streamed image only"
    );
    let (_, page) = support::http_get(agent.api, "/metrics");
    for (how, count) in [("streamed", 1), ("partly_streamed", 0), ("unpacked", 1)] {
        let series = format!("imgstream_images_pulled_total{{how=\"{how}\"}}");
        assert_eq!(support::metric(&page, &series), count, "{series}");
    }
    let listed = images
        .list_images(ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(
        listed.iter().any(|i| i.repo_tags.contains(&app)),
        "ListImages through the proxy: {listed:?}"
    );
    // ImageFsInfo is containerd's own answer, passed through.
    let mountpoints = |filesystems: Vec<FilesystemUsage>| -> Vec<String> {
        filesystems
            .into_iter()
            .filter_map(|fs| fs.fs_id.map(|id| id.mountpoint))
            .collect()
    };
    let proxied = images
        .image_fs_info(ImageFsInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    eprintln!("ImageFsInfo through the proxy: {proxied:?}");
    let own = direct
        .image_fs_info(ImageFsInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let proxied = mountpoints(proxied.image_filesystems);
    assert!(!proxied.is_empty());
    assert_eq!(proxied, mountpoints(own.image_filesystems));

    // The pod starts from the lazy layer, with a part of it fetched.
    let truth = scratch.join("truth");
    std::fs::create_dir_all(&truth).unwrap();
    let command = ["/clockprobe", "log", "100", "/truth/private"].map(String::from);
    let mounts = vec![k8s_cri::v1::Mount {
        container_path: "/truth".into(),
        host_path: truth.display().to_string(),
        ..Default::default()
    }];
    let log = start_pod(
        &containerd,
        &app,
        ("private", "private"),
        command.to_vec(),
        mounts,
        &scratch.join("pod-logs"),
    )
    .await;
    let line = wait_for_log(&log);
    let fetched = proxy.bytes() - before;
    eprintln!(
        "private image: {fetched} bytes of a {layer_bytes}-byte layer by its first log line: {}",
        line.trim()
    );
    assert!(
        fetched < layer_bytes / 4,
        "the start fetched {fetched} bytes of a {layer_bytes}-byte layer: not lazily"
    );

    // kubelet deletes the pod, then its image GC removes the image: containerd removes the
    // layer's snapshot, the lazy mount goes, and the chunks it alone used are deleted then.
    let mut runtime =
        RuntimeServiceClient::new(imgstream::cri::channel(&containerd.socket).await.unwrap());
    let sandboxes = runtime
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    for sandbox in sandboxes {
        let pod_sandbox_id = sandbox.id;
        // containerd can lose its shim's connection while it kills a container that has
        // already exited ("ttrpc: closed", seen in CI): kubelet asks again, and so does this.
        let mut attempt = 0;
        loop {
            let stopped = runtime
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: pod_sandbox_id.clone(),
                })
                .await;
            attempt += 1;
            match stopped {
                Ok(_) => break,
                Err(status) if attempt < 3 => {
                    eprintln!("StopPodSandbox, attempt {attempt}: {status}; asking again");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(status) => panic!("StopPodSandbox failed {attempt} times: {status}"),
            }
        }
        runtime
            .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id })
            .await
            .unwrap();
    }
    let chunks_dir = agent_dir.join("cache").join("chunks");
    assert!(files_in(&chunks_dir) > 0, "the start's chunks are cached");
    // Removing the app's image drops its repository's credentials; the pause image's stay.
    remove_image(&mut images, &app).await;
    let agent_log = agent.log_text();
    let dropped: Vec<&str> = agent_log
        .lines()
        .filter(|l| l.contains("its credentials are dropped"))
        .collect();
    assert!(
        dropped.len() == 1 && dropped[0].contains("private/app"),
        "{agent_log}"
    );

    agent
        .wait_for_log(
            "removed lazy layer's cached chunks freed",
            std::time::Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        files_in(&chunks_dir),
        0,
        "no chunk of the removed image is left"
    );
    // Its background download stopped with it: not finished, and nothing fetched since.
    let fetched = proxy.bytes();
    assert!(
        !agent.log_text().contains("background download complete"),
        "{}",
        agent.log_text()
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        proxy.bytes(),
        fetched,
        "nothing is fetched once the image is removed"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let snapshots = agent_dir.join("snapshotter").display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&snapshots)),
        "the lazy layer is unmounted: {mounts}"
    );

    // No file the agent wrote (its store, snapshotter metadata, cache, log) holds the
    // secret, plainly or as docker's base64 `user:password`.
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{SECRET}"));
    for needle in [SECRET, encoded.as_str()] {
        let holding = files_holding(&agent_dir, needle.as_bytes());
        assert!(holding.is_empty(), "{needle:?} found in {holding:?}");
    }
    agent.stop();
    drop(containerd);
    support::unmount_all_under(&scratch);
}

/// The plugin written for the test, in kubelet's exec protocol: it checks the request on its
/// stdin, asks the token server for a fresh short-lived password, as a cloud's credential
/// helper asks its IAM, and answers it for the whole registry, cached for an hour.
fn credential_helper(tokens: &support::TokenServer, registry: &str) -> String {
    format!(
        r#"#!/bin/bash
request=$(cat)
case "$request" in
  *'"kind":"CredentialProviderRequest"'*) ;;
  *) echo "not a CredentialProviderRequest: $request" >&2; exit 1 ;;
esac
exec 3<>/dev/tcp/{ip}/{port}
printf 'GET /password HTTP/1.0\r\n\r\n' >&3
password=$(sed '1,/^\r$/d' <&3)
printf '{{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"1h","auth":{{"{registry}":{{"username":"{USER}","password":"%s"}}}}}}' "$password"
"#,
        ip = tokens.addr.ip(),
        port = tokens.addr.port(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_that_expire_mid_download_are_renewed_through_the_credential_provider_plugin() {
    support::require_root();
    let scratch = support::scratch("credential-renewal");
    let tokens = support::TokenServer::start(&scratch, (USER, SECRET), 3600);
    let registry = Registry::start_with_auth("credential-renewal", tokens.registry_auth());
    push_images(&scratch, &registry.host()).await;

    let proxy = Proxy::start(registry.addr, Fault::None);
    let host = proxy.host();
    let (app, pause_image) = (
        format!("{host}/private/app:esgz"),
        format!("{host}/private/pause:v1"),
    );
    // kubelet's credential provider set-up, given to the agent as it is to kubelet.
    let bin = scratch.join("credential-providers");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("test-credential-helper");
    std::fs::write(&helper, credential_helper(&tokens, &host)).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = scratch.join("credential-providers.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: test-credential-helper\n    matchImages: [\"{host}\"]\n    defaultCacheDuration: 1h\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n"
        ),
    )
    .unwrap();

    let socket = scratch.join("snapshotter.sock");
    let containerd = containerd_for_imgstream("credential-renewal", &host, &pause_image, &socket);
    let agent_dir = scratch.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let image_socket = scratch.join("kubelet-image.sock");
    let agent_args = agent_args(
        &containerd,
        &socket,
        &agent_dir,
        &host,
        &image_socket,
        &[
            "--image-credential-provider-config",
            config.to_str().unwrap(),
            "--image-credential-provider-bin-dir",
            bin.to_str().unwrap(),
            // The whole image downloads in the background at 2 MB/s: about 8 s, over which
            // the credentials below expire twice.
            "--background-bandwidth",
            "2M",
        ],
    );
    let args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let agent = Agent::start(&agent_dir, &args);
    let mut images = ImageServiceClient::new(imgstream::cri::channel(&image_socket).await.unwrap());

    // From here on every registry token lasts 2 s and every password 3 s. kubelet asked its
    // plugin for one and hands it to the pulls.
    tokens.expire_quickly(2, 3);
    let auth = AuthConfig {
        username: USER.into(),
        password: tokens.issue_password(),
        ..Default::default()
    };
    for image in [&pause_image, &app] {
        pull_with(&mut images, image, Some(auth.clone()))
            .await
            .unwrap_or_else(|e| panic!("PullImage {image}: {e}"));
    }
    assert!(agent.log_text().contains("layer mounted lazily"));

    // A container that reads its two 8 MB files when told to, while the download runs: once
    // the pull's password has expired, and again later.
    let triggers = scratch.join("triggers");
    std::fs::create_dir_all(&triggers).unwrap();
    let mounts = vec![k8s_cri::v1::Mount {
        container_path: "/triggers".into(),
        host_path: triggers.display().to_string(),
        ..Default::default()
    }];
    let command = [
        "/clockprobe",
        "readafter",
        "0",
        "/triggers/truth",
        "/triggers/go0",
        "/data/blob0",
        "/triggers/go1",
        "/data/blob1",
    ]
    .map(String::from);
    let log = start_pod(
        &containerd,
        &app,
        ("private", "renewal"),
        command.to_vec(),
        mounts,
        &scratch.join("pod-logs"),
    )
    .await;
    support::cri::wait_for_line(&log, "waiting");
    for (i, trigger) in ["go0", "go1"].iter().enumerate() {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        std::fs::write(triggers.join(trigger), b"").unwrap();
        let path = format!("/data/blob{i}");
        let data = blob(i as u64);
        let line = support::cri::wait_for_line(&log, &path);
        let expected = format!("{path} {} {:016x}", data.len(), support::fnv1a(&data));
        assert!(line.contains(&expected), "{line:?}, expected {expected:?}");
    }

    agent
        .wait_for_log(
            "background download complete: the whole image is cached",
            std::time::Duration::from_secs(120),
        )
        .await;
    // The pull's password expired during the download, so the registry refused it, and the
    // agent asked the plugin for new ones (kubelet's first one is the test's own).
    let plugin_runs = tokens
        .passwords
        .handed_out
        .load(std::sync::atomic::Ordering::SeqCst)
        - 1;
    let agent_log = agent.log_text();
    let renewals = agent_log
        .matches("credentials from the credential provider plugin")
        .count();
    eprintln!(
        "{plugin_runs} plugin runs, {} tokens, for a download of about 8 s",
        tokens.issued.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(plugin_runs >= 1, "{agent_log}");
    assert_eq!(renewals, plugin_runs, "{agent_log}");
    let (status, page) = support::http_get(agent.api, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        support::metric(&page, "imgstream_fetch_errors_total"),
        0,
        "{page}"
    );
    assert!(
        !agent_log.contains("refused the credentials"),
        "no request failed for want of credentials: {agent_log}"
    );

    // Disk figures kubelet can trust, after the reads and the whole download: the cache's
    // own count and each lazy layer's statfs agree with `du` of the cache; the snapshotter's
    // Usage summed over its snapshots (containerd's figure) and ImageFsInfo through the
    // proxy (kubelet's) with `du` of the cache and of the other snapshots' directories.
    let cache_dir = agent_dir.join("cache");
    let snapshots_dir = agent_dir.join("snapshotter").join("snapshots");
    let cache_count = || {
        let (_, page) = support::http_get(agent.api, "/metrics");
        support::metric(&page, "imgstream_cache_size_bytes")
    };
    // The last chunks are written behind the reads: wait until the count stands still.
    let mut last = cache_count();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = cache_count();
        if now == last {
            break;
        }
        last = now;
    }
    let cache_on_disk = du(&cache_dir, false);
    let images_on_disk = cache_on_disk + du(&snapshots_dir, true);
    within("the cache's own count", cache_count(), cache_on_disk);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let lazy: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(" - fuse") && l.contains(snapshots_dir.to_str().unwrap()))
        .filter_map(|l| l.split(' ').nth(4))
        .collect();
    assert!(!lazy.is_empty(), "the app's layer is mounted lazily");
    let cache_fs = statvfs(&cache_dir);
    for mount in &lazy {
        let st = statvfs(Path::new(mount));
        let unit = st.f_frsize;
        within(
            "statfs used",
            (st.f_blocks - st.f_bfree) * unit,
            cache_on_disk,
        );
        within(
            "statfs available",
            st.f_bavail * unit,
            cache_fs.f_bavail * cache_fs.f_frsize,
        );
    }
    let (ok, usage, err) = containerd.ctr_ns(
        "k8s.io",
        &["snapshots", "--snapshotter", "imgstream", "usage", "-b"],
    );
    assert!(ok, "{err}");
    let summed: u64 = usage
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    within("Usage summed over the snapshots", summed, images_on_disk);
    let info = images
        .image_fs_info(ImageFsInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ours = info
        .image_filesystems
        .iter()
        .find(|fs| {
            fs.fs_id.as_ref().is_some_and(|id| {
                id.mountpoint
                    .ends_with(imgstream::cri::image_proxy::IMAGE_FS)
            })
        })
        .unwrap_or_else(|| panic!("no imgstream filesystem in {info:?}"));
    within(
        "ImageFsInfo's used bytes",
        ours.used_bytes.as_ref().map_or(0, |v| v.value),
        images_on_disk,
    );
    eprintln!(
        "on disk: cache {cache_on_disk}, with the other snapshots {images_on_disk}; Usage summed {summed}; ImageFsInfo {:?}",
        ours.used_bytes
    );

    // No password, the pull's or the plugin's, is in what the agent wrote.
    for password in tokens.passwords.handed() {
        let holding = files_holding(&agent_dir, password.as_bytes());
        assert!(holding.is_empty(), "{password:?} found in {holding:?}");
    }
    agent.stop();
    drop(containerd);
    support::unmount_all_under(&scratch);
}

/// `du -s` of `path` in bytes; with `one_filesystem`, lazy layers' mounts are not entered.
fn du(path: &Path, one_filesystem: bool) -> u64 {
    let mut command = std::process::Command::new("du");
    command.args(["-s", "--block-size=1"]);
    if one_filesystem {
        command.arg("-x");
    }
    let out = command.arg(path).output().expect("du runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du prints a size")
}

/// Asserts that `figure` is within 1 % of `truth`.
fn within(what: &str, figure: u64, truth: u64) {
    eprintln!("{what}: {figure} against {truth}");
    assert!(
        figure.abs_diff(truth) * 100 <= truth,
        "{what}: {figure} bytes, {truth} on disk"
    );
}

fn statvfs(path: &Path) -> libc::statvfs {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs is plain integers; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    let status = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    assert_eq!(status, 0, "statvfs {}", path.display());
    st
}
