//! Container start latency, measured by the real agent's eBPF probes on real containers: a
//! private containerd and runc (Debian's) run an image whose entrypoint reads CLOCK_BOOTTIME
//! as its first act and again just before its first log line, and writes both into a truth
//! file on the host. The agent's start -> first log line must bracket that, by at most 15 ms; a
//! container that never writes is reported as such; output redirected to a file is not a log
//! line; a restarted container gets a second record. The store survives an agent restart,
//! and `imgstream report` prints the table and writes the chart from the same data.

mod support;

use std::{collections::BTreeMap, path::Path};

use imgstream::starts::StartRecord;
use support::{Agent, Containerd, Registry};

/// How much longer the measured start -> first log line may be than the container's own
/// clocks say. The probes' events bracket the container's readings (the exec comes before
/// its first instruction, the write after its last reading), so the difference is never
/// negative; it is the time the new process waited for a CPU before its first reading, and
/// its write after the last: 0.1 to 0.9 ms on a quiet machine, 2.1 ms seen once under CI's
/// load, and 5.4 and 5.9 ms in two CI runs of 2026-12-04 (the second with nothing else on
/// the machine's two cores), when 5 ms was the bound. A mix-up of events (cgroup creation
/// instead of exec, say) is tens of ms: create to start took 36-144 ms in that day's bench
/// runs.
const TOLERANCE_NS: i64 = 15_000_000;
/// Both sides read CLOCK_BOOTTIME; this much below zero would still be rounding.
const CLOCK_SLACK_NS: i64 = 50_000;

/// One test at a time: on two cores, a second containerd and agent busy at once can keep a
/// freshly exec'd entrypoint off the CPU for tens of milliseconds before its first clock
/// reading, which the probes rightly count as start latency and the truth file cannot see.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The truth file: `start NS`, `log NS`, `redirected NS` lines (CLOCK_BOOTTIME).
fn truth(path: &Path) -> BTreeMap<String, i64> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn check_latency(record: &StartRecord, truth: &BTreeMap<String, i64>, name: &str) -> i64 {
    let measured = record.first_log_ns.expect("a first log line") as i64
        - record.started_ns.expect("a start") as i64;
    let expected = truth["log"] - truth["start"];
    let error = measured - expected;
    assert!(
        (-CLOCK_SLACK_NS..=TOLERANCE_NS).contains(&error),
        "{name}: measured {measured} ns, the container's clock says {expected} ns: {record:?} {truth:?}"
    );
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_are_measured_against_the_containers_own_clock() {
    let _serial = SERIAL.lock().await;
    support::require_root();
    let scratch = support::scratch("start-latency");
    let registry = Registry::start("start-latency", None);
    let reg = registry.host();
    let rootfs = support::clockprobe_rootfs(&scratch.join("rootfs"), &[]);
    let layout = scratch.join("layout");
    support::build_image(&layout, "v1", &[rootfs], &["/clockprobe", "log", "0"]).await;
    let image = format!("{reg}/clockprobe:v1");
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{image}"),
    );
    let containerd = Containerd::start("start-latency");
    let (ok, _, err) = containerd.ctr(&["images", "pull", "--plain-http", &image]);
    assert!(ok, "ctr pull: {err}");

    let agent_dir = scratch.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    // A short first-log window: containers of other tests running meanwhile (a pod sandbox
    // that never logs) stop holding the write probes after it.
    let agent = Agent::start(&agent_dir, &["--first-log-window-secs", "5"]);
    let truth_dir = scratch.join("truth");
    std::fs::create_dir_all(&truth_dir).unwrap();
    let run = |id: &str, truth_name: &str, args: &[&str]| {
        let mount = format!(
            "type=bind,src={},dst=/truth,options=rbind:rw",
            truth_dir.display()
        );
        let truth_file = format!("/truth/{truth_name}");
        let mut argv = vec!["run", "--rm", "--mount", &mount, &image, id, "/clockprobe"];
        argv.extend_from_slice(args);
        argv.push(&truth_file);
        let (ok, stdout, stderr) = containerd.ctr(&argv);
        assert!(ok, "ctr run {id}: {stderr}");
        (stdout, stderr)
    };
    let (out, _) = run("log-150", "log-150", &["log", "150"]);
    assert!(out.starts_with("boottime="), "{out}");
    run("log-400", "log-400", &["log", "400"]);
    run("silent", "silent", &["silent", "200"]);
    let (out, err) = run("redirect", "redirect", &["redirect", "250"]);
    assert!(
        out.is_empty() && err.starts_with("boottime="),
        "{out} / {err}"
    );
    run("again", "again-1", &["log", "100"]);
    run("again", "again-2", &["log", "100"]);

    // The agent handles events within a poll interval; give it a moment.
    std::thread::sleep(std::time::Duration::from_millis(800));
    let (status, body) = agent.get("/v1/starts?namespace=imgstream-test");
    assert_eq!(status, 200, "{body}");
    let records: Vec<StartRecord> = serde_json::from_str(&body).unwrap();
    let by_id = |id: &str| -> Vec<&StartRecord> {
        records.iter().filter(|r| r.container_id == id).collect()
    };
    let mut errors = Vec::new();
    for name in ["log-150", "log-400"] {
        let found = by_id(name);
        assert_eq!(found.len(), 1, "one record for {name}: {records:?}");
        let record = found[0];
        errors.push(check_latency(record, &truth(&truth_dir.join(name)), name));
        assert_eq!(record.log_fd, Some(1));
        assert!(record.create_to_start().is_some() && record.exited_ns.is_some());
        assert_eq!(record.program.as_deref(), Some("/clockprobe"));
    }
    let silent = by_id("silent");
    assert_eq!(silent.len(), 1);
    assert!(
        silent[0].never_logged() && silent[0].exited_ns.is_some(),
        "{:?}",
        silent[0]
    );
    let redirect = by_id("redirect");
    let redirect_truth = truth(&truth_dir.join("redirect"));
    errors.push(check_latency(redirect[0], &redirect_truth, "redirect"));
    assert_eq!(
        redirect[0].log_fd,
        Some(2),
        "the write to the file was not the first log line"
    );
    let mut again = by_id("again");
    again.sort_by_key(|r| r.created_ns);
    assert_eq!(again.len(), 2, "a restart is a record of its own");
    assert_ne!(again[0].cgroup_id, again[1].cgroup_id);
    for (record, file) in again.iter().zip(["again-1", "again-2"]) {
        errors.push(check_latency(record, &truth(&truth_dir.join(file)), file));
    }
    eprintln!("start -> first log line, measured minus the container's own clock (ns): {errors:?}");

    let (status, metrics) = agent.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "imgstream_container_start_to_first_log_seconds_count{namespace=\"imgstream-test\"} 5"
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "imgstream_probe_dropped_total{probe=\"lifecycle\",reason=\"ring_buffer_full\"} 0"
    ));
    assert_eq!(agent.get("/healthz").0, 200);
    // With every container done, the write probes come off again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !agent
        .get("/metrics")
        .1
        .contains("imgstream_write_probes_armed 0")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the write probes stayed attached"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // The report, from the API: the table and the chart.
    let svg = scratch.join("starts.svg");
    let out = support::imgstream(&[
        "report",
        "--api",
        &format!("http://{}", agent.api),
        "--namespace",
        "imgstream-test",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(
        table.contains("6 container starts, 1 never wrote a log line"),
        "{table}"
    );
    assert!(table.contains("imgstream-test"), "{table}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.contains("<polyline") && chart.contains("imgstream-test (n=5)"),
        "{chart}"
    );

    // The store outlives the agent.
    agent.stop();
    let agent = Agent::start(&agent_dir, &[]);
    let (_, body) = agent.get("/v1/starts?namespace=imgstream-test");
    let again: Vec<StartRecord> = serde_json::from_str(&body).unwrap();
    assert_eq!(again.len(), records.len(), "records survive a restart");
    agent.stop();
    let out = support::imgstream(&[
        "report",
        "--store",
        agent_dir.join("agent.redb").to_str().unwrap(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["containers"], records.len());
    assert_eq!(report["never_logged"], 1);

    drop(containerd);
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// kubelet's part, over containerd's CRI socket in kubelet's order: a pod with an init
/// container and an app container that is restarted once. The records carry pod, namespace, container names and
/// the image from CRI; the pod sandbox is left out; each start is a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pods_are_named_and_their_sandboxes_left_out() {
    use k8s_cri::v1::{
        ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, Mount,
        PullImageRequest, RunPodSandboxRequest, StartContainerRequest,
        image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    };
    let _serial = SERIAL.lock().await;
    support::require_root();
    let scratch = support::scratch("start-latency-cri");
    let registry = Registry::start("start-latency-cri", None);
    let reg = registry.host();
    let rootfs = support::clockprobe_rootfs(&scratch.join("rootfs"), &[]);
    // The sandbox image is the same program, pausing: told apart by CRI, not by its name.
    for (tag, cmd) in [
        ("v1", ["/clockprobe", "log", "0"]),
        ("pause", ["/clockprobe", "pause", "0"]),
    ] {
        let layout = scratch.join(format!("layout-{tag}"));
        support::build_image(&layout, tag, std::slice::from_ref(&rootfs), &cmd).await;
        support::skopeo_copy(
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{reg}/clockprobe:{tag}"),
        );
    }
    let image = format!("{reg}/clockprobe:v1");
    let containerd = Containerd::start_cri(
        "start-latency-cri",
        &reg,
        &format!("{reg}/clockprobe:pause"),
    );
    let agent_dir = scratch.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = Agent::start(
        &agent_dir,
        &["--cri-socket", containerd.socket.to_str().unwrap()],
    );

    let channel = imgstream::cri::channel(&containerd.socket).await.unwrap();
    let mut images = ImageServiceClient::new(channel.clone());
    let runtime = RuntimeServiceClient::new(channel);
    let logs = scratch.join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let sandbox_config =
        support::cri::sandbox_config("shop", "web", "0f0e0d0c-0b0a-4909-8807-060504030201", &logs);
    let sandbox = runtime
        .clone()
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    // kubelet's order: the image is pulled for the pod once its sandbox runs.
    images
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let truth_dir = scratch.join("truth");
    std::fs::create_dir_all(&truth_dir).unwrap();
    let start = |name: &'static str, attempt: u32, args: Vec<String>| {
        let (sandbox, sandbox_config, image, truth_dir) = (
            sandbox.clone(),
            sandbox_config.clone(),
            image.clone(),
            truth_dir.clone(),
        );
        let mut runtime = runtime.clone();
        async move {
            let id = runtime
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: sandbox,
                    config: Some(ContainerConfig {
                        metadata: Some(ContainerMetadata {
                            name: name.into(),
                            attempt,
                        }),
                        image: Some(ImageSpec {
                            image,
                            ..Default::default()
                        }),
                        command: vec!["/clockprobe".into()],
                        args,
                        log_path: format!("{name}-{attempt}.log"),
                        // kubelet's labels; the init container goes without, so that the
                        // agent has to ask the sandbox for the pod.
                        labels: if name == "init" {
                            Default::default()
                        } else {
                            [
                                ("io.kubernetes.pod.name", "web"),
                                ("io.kubernetes.pod.namespace", "shop"),
                                (
                                    "io.kubernetes.pod.uid",
                                    "0f0e0d0c-0b0a-4909-8807-060504030201",
                                ),
                                ("io.kubernetes.container.name", name),
                            ]
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect()
                        },
                        mounts: vec![Mount {
                            container_path: "/truth".into(),
                            host_path: truth_dir.display().to_string(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    sandbox_config: Some(sandbox_config),
                })
                .await
                .unwrap()
                .into_inner()
                .container_id;
            runtime
                .start_container(StartContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .unwrap();
            id
        }
    };
    let args = |mode: &str, ms: u32, truth: &str| {
        vec![mode.to_string(), ms.to_string(), format!("/truth/{truth}")]
    };
    let init = start("init", 0, args("silent", 50, "init")).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let app0 = start("app", 0, args("log", 200, "app-0")).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let app1 = start("app", 1, args("log", 300, "app-1")).await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;

    let (status, body) = agent.get("/v1/starts?namespace=shop&pod=web");
    assert_eq!(status, 200, "{body}");
    let records: Vec<StartRecord> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        records.len(),
        3,
        "init, app, app restarted, and no sandbox: {records:#?}"
    );
    assert!(
        !records.iter().any(|r| r.container_id == sandbox),
        "the sandbox is left out"
    );
    let find = |id: &str| records.iter().find(|r| r.container_id == id).unwrap();
    for (id, name) in [(&init, "init"), (&app0, "app"), (&app1, "app")] {
        let r = find(id);
        assert_eq!(r.pod.name.as_deref(), Some("web"));
        assert_eq!(r.pod.namespace.as_deref(), Some("shop"));
        assert_eq!(r.pod.container.as_deref(), Some(name));
        assert_eq!(
            r.pod.uid.as_deref(),
            Some("0f0e0d0c-0b0a-4909-8807-060504030201")
        );
        assert_eq!(r.image.as_deref(), Some(image.as_str()), "{r:?}");
    }
    assert!(find(&init).never_logged());
    check_latency(find(&app0), &truth(&truth_dir.join("app-0")), "app-0");
    check_latency(find(&app1), &truth(&truth_dir.join("app-1")), "app-1");

    let out = support::imgstream(&[
        "report",
        "--api",
        &format!("http://{}", agent.api),
        "--compare",
        "label:io.kubernetes.container.name",
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(table.contains(&image) && table.contains("shop"), "{table}");
    assert!(table.contains("comparison"), "{table}");
    agent.stop();
    drop(containerd);
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// How far a phase's end may lie outside the times the test took around the call that
/// caused it. The probes' marks come from the kernel's events inside the calls (within
/// 0.1 ms here); the image proxy's from its handler, which starts after the test's clock
/// reading and answers before the test's next, with gRPC in between both ways: 0.1-1 ms
/// on a quiet machine, 3.05 ms seen once with two test binaries' builds running.
const CALL_SLACK_NS: u64 = 10_000_000;

/// `t` lies within `(before, after)`, give or take [`CALL_SLACK_NS`].
fn within(what: &str, t: Option<u64>, (before, after): (u64, u64)) -> u64 {
    let t = t.unwrap_or_else(|| panic!("{what}: not seen"));
    eprintln!(
        "{what}: {:+.3} ms from the call's start, {:+.3} ms from its end",
        (t as f64 - before as f64) / 1e6,
        (t as f64 - after as f64) / 1e6
    );
    assert!(
        t + CALL_SLACK_NS >= before && t <= after + CALL_SLACK_NS,
        "{what} at {t}, outside the call's {before}..{after} ({} ms before, {} ms after)",
        (before as f64 - t as f64) / 1e6,
        (t as f64 - after as f64) / 1e6,
    );
    t
}

/// kubelet's part in kubelet's order (the pod cgroup, RunPodSandbox, PullImage through the
/// agent's CRI image proxy, CreateContainer, StartContainer) for a pod of a streamed image
/// under a cgroupfs-style pod cgroup and one of a pulled image under a systemd-style slice,
/// and a third pulled past the proxy (the snapshotter's view of the pull): every mark of
/// each pod's timeline lies within the times the test took around the call that caused it,
/// start -> first log line agrees with the container's own clock, and the bytes on the
/// streamed start's critical path are what the counting proxy carried for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_timed_in_kubelets_order() {
    use imgstream::starts::pods::{FROM_PROXY, FROM_SNAPSHOTTER, PodTimeline};
    use support::{
        Fault, Proxy,
        cri::{CgroupLayout, Kubelet, clockprobe_images, snapshotter_args, wait_for_log},
    };
    let _serial = SERIAL.lock().await;
    support::require_root();
    let scratch = support::scratch("start-latency-pods");
    let registry = Registry::start("start-latency-pods", None);
    let reg = registry.host();
    let rootfs = support::clockprobe_rootfs(&scratch.join("rootfs"), &[]);
    clockprobe_images(&scratch, &reg, "app", &rootfs).await;
    // A second conversion (other chunks, so other layers), for a pull kubelet makes past
    // the image proxy.
    let converted = support::imgstream(&[
        "convert",
        &format!("{reg}/app:v1"),
        &format!("{reg}/app:esgz-again"),
        "--chunk-size",
        "512K",
        "--insecure-registry",
        &reg,
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    assert!(converted.status.success(), "{converted:?}");
    // The agent reaches the registry through the counting proxy; containerd, told the
    // proxy's name is a mirror of the registry, goes straight to it: what the proxy carries
    // is the agent's alone.
    let proxy = Proxy::start(registry.addr, Fault::None);
    let host = proxy.host();
    let socket = scratch.join("snapshotter.sock");
    let dropin = String::from_utf8(
        support::imgstream(&["containerd-config", "--socket", socket.to_str().unwrap()]).stdout,
    )
    .unwrap()
    .replace("version = 2\n", "");
    let mirror = format!(
        "[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{host}\"]\n  endpoint = [\"http://{reg}\"]\n"
    );
    let containerd = Containerd::start_cri_with(
        "start-latency-pods",
        &reg,
        &format!("{reg}/app:pause"),
        &format!("{dropin}{mirror}"),
    );
    let agent_dir = scratch.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let image_socket = scratch.join("image.sock");
    let mut args = snapshotter_args(&containerd, &socket, &agent_dir, &host);
    args.extend(
        [
            "--cri-image-proxy",
            image_socket.to_str().unwrap(),
            "--cri-upstream",
            containerd.socket.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&agent_dir, &args);
    // The sandbox image first, as a node has it: containerd's channel to the snapshotter
    // is up before the timed pulls.
    let mut images = k8s_cri::v1::image_service_client::ImageServiceClient::new(
        imgstream::cri::channel(&containerd.socket).await.unwrap(),
    );
    support::cri::pull(&mut images, &format!("{reg}/app:pause"))
        .await
        .unwrap();

    let truth_dir = scratch.join("truth");
    std::fs::create_dir_all(&truth_dir).unwrap();
    let mut runs = Vec::new();
    let mut carried = 0;
    for (pod, tag, layout) in [
        ("streamed", "esgz", CgroupLayout::Cgroupfs),
        ("pulled", "v1", CgroupLayout::SystemdSlices),
        ("unproxied", "esgz-again", CgroupLayout::Cgroupfs),
    ] {
        let mut kubelet = Kubelet {
            image_service: image_socket.clone(),
            layout,
            ..Kubelet::new(&containerd)
        };
        if pod == "unproxied" {
            // kubelet's image service is containerd's own: only the snapshotter sees the
            // pull, from its first layer's Prepare.
            kubelet.image_service = containerd.socket.clone();
        }
        let before = proxy.bytes();
        let run = kubelet
            .run_pod(
                &format!("{host}/app:{tag}"),
                ("kubelet-order", pod),
                vec![
                    "/clockprobe".into(),
                    "log".into(),
                    "150".into(),
                    format!("/truth/{pod}"),
                ],
                vec![k8s_cri::v1::Mount {
                    container_path: "/truth".into(),
                    host_path: truth_dir.display().to_string(),
                    ..Default::default()
                }],
                &scratch.join(format!("logs-{pod}")),
            )
            .await;
        wait_for_log(&run.log);
        // The clockprobe exits after its line; the agent handles events within a poll.
        std::thread::sleep(std::time::Duration::from_millis(800));
        if pod == "streamed" {
            carried = proxy.bytes() - before;
        }
        runs.push((pod, layout, run));
    }

    let (status, body) = agent.get("/v1/pods?namespace=kubelet-order");
    assert_eq!(status, 200, "{body}");
    let timelines: Vec<PodTimeline> = serde_json::from_str(&body).unwrap();
    let (_, body) = agent.get("/v1/starts?namespace=kubelet-order");
    let starts: Vec<StartRecord> = serde_json::from_str(&body).unwrap();
    assert_eq!(timelines.len(), 3, "{timelines:#?}");
    for (pod, layout, run) in &runs {
        let t = timelines
            .iter()
            .find(|t| t.uid == run.uid)
            .unwrap_or_else(|| panic!("no timeline of {pod}: {timelines:#?}"));
        let times = run.times;
        eprintln!("{pod}: {t:#?}\n{times:?}");
        assert_eq!(t.pod.as_deref(), Some(*pod));
        assert_eq!(t.cgroup_path.as_deref(), Some(run.cgroup.as_str()));
        let driver = match layout {
            CgroupLayout::Cgroupfs => "cgroupfs",
            CgroupLayout::SystemdSlices => "systemd",
        };
        assert_eq!(t.driver.as_deref(), Some(driver));
        within("pod cgroup", t.created_ns, times.pod_cgroup);
        within("sandbox cgroup", t.sandbox_created_ns, times.run_sandbox);
        within("sandbox exec", t.sandbox_started_ns, times.run_sandbox);
        let [c] = &t.containers[..] else {
            panic!("{pod}: one container, the sandbox left out: {t:#?}")
        };
        assert_eq!(c.container_id, run.container_id);
        let pull = c.pull.as_ref().unwrap();
        if *pod == "unproxied" {
            // The layers' part of the pull lies inside the call.
            assert_eq!(pull.source, FROM_SNAPSHOTTER, "{pod}");
            within("layers' pull start", Some(pull.start_ns), times.pull);
            within("layers' pull end", Some(pull.end_ns), times.pull);
            assert!(pull.start_ns < pull.end_ns);
        } else {
            assert_eq!(pull.source, FROM_PROXY, "{pod}");
            within(
                "pull start",
                Some(pull.start_ns),
                (times.pull.0, times.pull.0),
            );
            within("pull end", Some(pull.end_ns), (times.pull.1, times.pull.1));
        }
        let served = if *pod == "pulled" {
            "unpacked"
        } else {
            "streamed"
        };
        assert_eq!(pull.served.as_deref(), Some(served), "{pod}");
        within(
            "container cgroup",
            Some(c.created_ns),
            (times.create.0, times.start.1),
        );
        // The exec follows StartContainer's runc start, and may land after its answer.
        assert!(
            c.started_ns.unwrap() + CALL_SLACK_NS >= times.start.0,
            "{pod}: exec before StartContainer"
        );
        let record = starts
            .iter()
            .find(|s| s.container_id == run.container_id)
            .unwrap();
        assert_eq!(
            (record.started_ns, record.first_log_ns),
            (c.started_ns, c.first_log_ns)
        );
        check_latency(record, &truth(&truth_dir.join(pod)), pod);
        let phases = c.phases;
        let secs = |a: u64, b: Option<u64>| (b.unwrap() - a) as f64 / 1e9;
        let close = |got: Option<f64>, want: f64| (got.unwrap() - want).abs() < 1e-6;
        let created = t.created_ns.unwrap();
        assert!(close(phases.sandbox, secs(created, t.sandbox_started_ns)));
        assert!(close(phases.pull, secs(pull.start_ns, Some(pull.end_ns))));
        assert!(close(phases.total, secs(created, c.first_log_ns)));
        match (*pod, c.critical_path) {
            ("streamed", Some(critical)) => {
                // The proxy carried the same bodies, with each response's headers.
                eprintln!("critical path: {critical:?}; the proxy carried {carried} bytes");
                // The manifest and the layer's end at least: footer and TOC, one request
                // when the round trip is worth the TOC's bytes, else two.
                assert!(critical.requests >= 2, "{critical:?}");
                assert!(!critical.fully_cached, "no background download here");
                assert!(
                    critical.bytes <= carried
                        && carried <= critical.bytes + 1024 * (critical.requests + 8),
                    "{critical:?} against the proxy's {carried} bytes"
                );
            }
            ("pulled", None) => {}
            ("unproxied", Some(critical)) => assert!(critical.requests >= 2, "{critical:?}"),
            (pod, critical) => panic!("{pod}: critical path {critical:?}"),
        }
    }

    let (_, metrics) = agent.get("/metrics");
    assert!(
        metrics.contains(
            "imgstream_pod_startup_phase_seconds_count{phase=\"pull\",namespace=\"kubelet-order\"} 3"
        ),
        "{metrics}"
    );
    let out = support::imgstream(&[
        "report",
        "--api",
        &format!("http://{}", agent.api),
        "--pods",
        "--namespace",
        "kubelet-order",
        "--compare",
        "served",
        "--svg",
        scratch.join("pods.svg").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 pods, 3 container starts"), "{text}");
    assert!(text.contains("unpacked against streamed: median"), "{text}");
    let svg = std::fs::read_to_string(scratch.join("pods.svg")).unwrap();
    assert!(
        svg.contains("kubelet-order/streamed app") && svg.contains("<polyline"),
        "{svg}"
    );
    agent.stop();
    drop(containerd);
    drop(proxy);
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}
