//! `cargo xtask demo`: image streaming on this machine, start to finish, with real parts and no
//! cluster. A sample image (an entrypoint, a thousand small files and 96 MB of data it never
//! reads) is pushed as it is (plain gzip) and converted to eStargz, and served by Debian's
//! docker-registry from a network namespace behind a 100 Mbit/s link (tc tbf). One
//! containerd (Debian's, with its CRI plugin and runc) has imgstream as its snapshotter;
//! the agent also stands in kubelet's image service (its CRI image proxy) and watches with
//! its probes. The demo plays kubelet in kubelet's order (pod cgroup, RunPodSandbox,
//! PullImage, CreateContainer, StartContainer) for the same pod twice: from the plain image,
//! which containerd pulls and unpacks whole, and from the eStargz one, which streams. It
//! times PullImage to the container's first log line for both, prints each pod's timeline
//! as the agent saw it, and checks that the agent's streamed/pulled comparison agrees with
//! its own within 5 %. Everything is removed afterwards.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use anyhow::Context as _;

use support::{
    Agent, Containerd, Registry, SlowLink,
    cri::{Kubelet, clockprobe_images, wait_for_log},
};

const RATE: &str = "100mbit";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    support::require_root();
    let scratch = support::scratch("demo");
    println!("imgstream demo: the same pod started from a streamed image and from a pulled one\n");

    println!("1. Build the sample image: an entrypoint, 1,000 small files, 96 MB of data");
    let rootfs =
        support::clockprobe_rootfs(&scratch.join("rootfs"), &["srv/assets", "usr/share/app"]);
    for i in 0..12u64 {
        let path = rootfs.join(format!("srv/assets/pack{i:02}.bin"));
        std::fs::write(&path, support::noise(i + 1, 8 << 20))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for i in 0..1000u64 {
        let path = rootfs.join(format!("usr/share/app/module{i:04}.txt"));
        std::fs::write(&path, format!("module {i}\n").repeat(40))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("2. Serve it from a registry behind a {RATE} link, as eStargz");
    let link = SlowLink::new("demo", RATE);
    let registry = Registry::start_in_netns("demo", &link.netns, &link.ip);
    let reg = registry.host();
    let layer = clockprobe_images(&scratch, &reg, "demo", &rootfs).await;
    println!(
        "   {reg}/demo:esgz, one layer of {:.1} MB",
        layer as f64 / 1e6
    );

    println!(
        "3. Start containerd (CRI, runc) with the imgstream agent as its snapshotter and image service"
    );
    let socket = scratch.join("snapshotter.sock");
    let socket_arg = socket.display().to_string();
    let dropin = String::from_utf8(
        support::imgstream(&["containerd-config", "--socket", &socket_arg]).stdout,
    )
    .context("`imgstream containerd-config` printed something other than UTF-8")?
    .replace("version = 2\n", "");
    let sandbox = format!("{reg}/demo:pause");
    let containerd = Containerd::start_cri_with("demo", &reg, &sandbox, &dropin);
    let agent_dir = scratch.join("agent");
    std::fs::create_dir_all(&agent_dir)
        .with_context(|| format!("creating {}", agent_dir.display()))?;
    let image_service = scratch.join("image.sock");
    let args = [
        "--cri-socket".to_string(),
        containerd.socket.display().to_string(),
        "--snapshotter-socket".into(),
        socket.display().to_string(),
        "--snapshotter-root".into(),
        agent_dir.join("snapshotter").display().to_string(),
        "--cache-dir".into(),
        agent_dir.join("cache").display().to_string(),
        "--insecure-registry".into(),
        reg.clone(),
        "--cri-image-proxy".into(),
        image_service.display().to_string(),
        "--cri-upstream".into(),
        containerd.socket.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&agent_dir, &args);
    // The sandbox image, as a node has it (and containerd's channel to the snapshotter up).
    let mut images = k8s_cri::v1::image_service_client::ImageServiceClient::new(
        imgstream::cri::channel(&containerd.socket).await?,
    );
    support::cri::pull(&mut images, &sandbox)
        .await
        .context("pulling the sandbox image")?;
    let truth = scratch.join("truth");
    std::fs::create_dir_all(&truth).with_context(|| format!("creating {}", truth.display()))?;

    println!(
        "4. Run the pod as kubelet does: pod cgroup, RunPodSandbox, PullImage, CreateContainer, StartContainer\n"
    );
    let kubelet = Kubelet {
        image_service,
        ..Kubelet::new(&containerd)
    };
    let mut timings = Vec::new();
    for (name, tag) in [("pulled", "v1"), ("streamed", "esgz")] {
        let run = kubelet
            .run_pod(
                &format!("{reg}/demo:{tag}"),
                (name, "web"),
                vec![
                    "/clockprobe".into(),
                    "log".into(),
                    "100".into(),
                    format!("/truth/{name}"),
                ],
                vec![k8s_cri::v1::Mount {
                    container_path: "/truth".into(),
                    host_path: truth.display().to_string(),
                    ..Default::default()
                }],
                &scratch.join(format!("logs-{name}")),
            )
            .await;
        wait_for_log(&run.log);
        let took = run.pull_called.elapsed();
        println!(
            "   {name:>8} ({reg}/demo:{tag}): PullImage -> first log line in {:.2} s",
            took.as_secs_f64()
        );
        timings.push((name, run.uid, took));
    }
    let ratio = timings[0].2.as_secs_f64() / timings[1].2.as_secs_f64();
    println!(
        "\n   the streamed pod logged {ratio:.1}x sooner; the full download alone needs {:.1} s at {RATE}",
        layer as f64 * 8.0 / 100e6
    );

    println!("\n5. imgstream report --pods (what the agent saw of each pod)\n");
    std::thread::sleep(Duration::from_millis(800));
    let api = format!("http://{}", agent.api);
    let out = support::imgstream(&["report", "--api", &api, "--pods", "--compare", "served"]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let out = support::imgstream(&["report", "--api", &api, "--pods", "--json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("`imgstream report --pods --json`")?;
    // The agent's PullImage -> first log line, from each pod's timeline.
    let seen = |uid: &str| -> Option<f64> {
        let pod = report["timelines"]
            .as_array()?
            .iter()
            .find(|t| t["uid"] == uid)?;
        let app = &pod["containers"][0];
        let pulled = app["pull"]["start_ns"].as_u64()?;
        Some(app["first_log_ns"].as_u64()?.checked_sub(pulled)? as f64 / 1e9)
    };
    let (Some(pulled), Some(streamed)) = (seen(&timings[0].1), seen(&timings[1].1)) else {
        anyhow::bail!("the agent has no PullImage -> first log line for both pods");
    };
    let agent_ratio = pulled / streamed;
    let agreement = agent_ratio / ratio;
    println!(
        "   the agent: PullImage -> first log line {pulled:.2} s pulled, {streamed:.2} s streamed, {agent_ratio:.1}x; the demo's own clock: {ratio:.1}x ({:+.1} %)",
        (agreement - 1.0) * 100.0
    );
    if (agreement - 1.0).abs() > 0.05 {
        anyhow::bail!("the agent's comparison is more than 5 % from the demo's own");
    }
    agent.stop();
    drop(containerd);
    drop(registry);
    drop(link);
    let _ = std::fs::remove_dir_all(&scratch);
    println!("done; everything the demo started is stopped and removed");
    Ok(())
}
