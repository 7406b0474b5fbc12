//! `cargo xtask demo`: image streaming on this machine, start to finish, with real parts and no
//! cluster. A sample image (an entrypoint, a thousand small files and 96 MB of data it never
//! reads) is converted to eStargz and served by Debian's docker-registry from a network
//! namespace behind a 100 Mbit/s link (tc tbf). Two containerd instances (Debian's, with
//! their CRI plugins and runc) run the same pod: one with imgstream as its snapshotter, one
//! with containerd's default overlayfs snapshotter. The demo plays kubelet over CRI, times
//! PullImage to the container's first log line for both, and prints imgstream's latency
//! report, which the agent's probes measured meanwhile. Everything is removed afterwards.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::Context as _;

use support::{
    Agent, Containerd, Registry, SlowLink,
    cri::{clockprobe_images, run_pod, wait_for_log},
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

    println!("3. Start two containerds (CRI, runc) and the imgstream agent");
    let socket = scratch.join("snapshotter.sock");
    let socket_arg = socket.display().to_string();
    let dropin = String::from_utf8(
        support::imgstream(&["containerd-config", "--socket", &socket_arg]).stdout,
    )
    .context("`imgstream containerd-config` printed something other than UTF-8")?
    .replace("version = 2\n", "");
    let sandbox = format!("{reg}/demo:pause");
    let streamed = Containerd::start_cri_with("demo-streamed", &reg, &sandbox, &dropin);
    let pulled = Containerd::start_cri("demo-pulled", &reg, &sandbox);
    let agent_dir = scratch.join("agent");
    std::fs::create_dir_all(&agent_dir)
        .with_context(|| format!("creating {}", agent_dir.display()))?;
    let args = [
        "--cri-socket".to_string(),
        streamed.socket.display().to_string(),
        "--cri-socket".into(),
        pulled.socket.display().to_string(),
        "--snapshotter-socket".into(),
        socket.display().to_string(),
        "--snapshotter-root".into(),
        agent_dir.join("snapshotter").display().to_string(),
        "--cache-dir".into(),
        agent_dir.join("cache").display().to_string(),
        "--insecure-registry".into(),
        reg.clone(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&agent_dir, &args);
    let truth = scratch.join("truth");
    std::fs::create_dir_all(&truth).with_context(|| format!("creating {}", truth.display()))?;
    let image = format!("{reg}/demo:esgz");

    println!("4. Run the pod: PullImage, RunPodSandbox, CreateContainer, StartContainer\n");
    let mut timings = Vec::new();
    for (name, containerd) in [("pulled", &pulled), ("streamed", &streamed)] {
        let started = Instant::now();
        let log = run_pod(
            containerd,
            &image,
            (name, "web"),
            &truth,
            &scratch.join(format!("logs-{name}")),
        )
        .await;
        wait_for_log(&log);
        let took = started.elapsed();
        println!(
            "   {name:>8}: PullImage -> first log line in {:.2} s",
            took.as_secs_f64()
        );
        timings.push(took);
    }
    let ratio = timings[0].as_secs_f64() / timings[1].as_secs_f64();
    println!(
        "\n   the streamed pod logged {ratio:.1}x sooner; the full download alone needs {:.1} s at {RATE}",
        layer as f64 * 8.0 / 100e6
    );

    println!("\n5. imgstream report (what the agent's probes measured)\n");
    std::thread::sleep(Duration::from_millis(800));
    let out = support::imgstream(&[
        "report",
        "--api",
        &format!("http://{}", agent.api),
        "--compare",
        "namespace",
    ]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    agent.stop();
    drop(streamed);
    drop(pulled);
    drop(registry);
    drop(link);
    let _ = std::fs::remove_dir_all(&scratch);
    println!("done; everything the demo started is stopped and removed");
    Ok(())
}
