//! `cargo xtask bench e2e`: the headline measurement. A realistic image (Debian's
//! packages for Apache, PHP 8.2 and common PHP extensions with their whole dependency closure,
//! unpacked with `dpkg -x`: about 340 MB and 9,000 files) is served by Debian's
//! docker-registry from a network namespace behind a rate-limited veth link (tc tbf,
//! 100 Mbit/s). On a cold node (fresh containerd, fresh agent, empty cache, each repetition)
//! the test plays kubelet over CRI and times PullImage to the container's first log line:
//! `php -r 'echo "ready\n";'`, which loads 49 extensions (about 38 MB of files) before it
//! prints. Streamed (imgstream as containerd's snapshotter) against containerd's default
//! overlayfs snapshotter, same run, several repetitions; medians and their ratio, bytes that
//! crossed the link before the first log line, the transfer floor (those bytes at the link's
//! rate), and the time until the whole image is in imgstream's cache.
//!
//! The packages are downloaded with apt once, into ~/.cache/imgstream/bench-e2e.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use support::{Agent, Containerd, Registry, SlowLink, cri};

const RATE_MBIT: f64 = 100.0;
const REPETITIONS: usize = 3;
const PACKAGES: [&str; 12] = [
    "apache2",
    "libapache2-mod-php8.2",
    "php8.2-cli",
    "php8.2-intl",
    "php8.2-gd",
    "php8.2-mysql",
    "php8.2-xml",
    "php8.2-curl",
    "php8.2-mbstring",
    "php8.2-zip",
    "coreutils",
    "dash",
];
const COMMAND: [&str; 3] = ["/usr/bin/php8.2", "-r", "echo \"ready\\n\";"];
/// eStargz chunk size: a page fault fetches the compressed chunk around it.
const CHUNK_SIZE: &str = "64K";

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mkdir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn list(dir: &Path) -> anyhow::Result<impl Iterator<Item = std::fs::DirEntry>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten())
}

/// The packages' dependency closure, downloaded once.
fn debs() -> anyhow::Result<Vec<PathBuf>> {
    let cache = imgstream_vm_tests::kernels::cache_dir().join("bench-e2e/debs");
    mkdir(&cache)?;
    let closure = run(Command::new("apt-cache")
        .args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(PACKAGES))?;
    let mut names: Vec<&str> = closure
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .collect();
    names.sort_unstable();
    names.dedup();
    let have: Vec<String> = list(&cache)?
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !have.iter().any(|f| f.starts_with(&format!("{n}_"))))
        .collect();
    if !missing.is_empty() {
        println!("   downloading {} packages with apt", missing.len());
        run(Command::new("apt-get")
            .arg("download")
            .args(&missing)
            .current_dir(&cache))?;
    }
    Ok(list(&cache)?
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect())
}

/// The root filesystem: every package unpacked, PHP's extensions enabled as the packages'
/// maintainer scripts would.
fn rootfs(dir: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("rootfs");
    mkdir(&root)?;
    for deb in debs()? {
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    for d in ["proc", "sys", "dev", "tmp", "etc/php/8.2/mods-available"] {
        mkdir(&root.join(d))?;
    }
    let conf_d = root.join("etc/php/8.2/cli/conf.d");
    mkdir(&conf_d)?;
    let _ = std::fs::copy(
        root.join("usr/lib/php/8.2/php.ini-production"),
        root.join("etc/php/8.2/cli/php.ini"),
    );
    for share in list(&root.join("usr/share"))? {
        if !share.file_name().to_string_lossy().starts_with("php8.2-") {
            continue;
        }
        for module in list(&share.path())? {
            let Ok(inis) = std::fs::read_dir(module.path()) else {
                continue;
            };
            for ini in inis
                .flatten()
                .filter(|i| i.path().extension().is_some_and(|e| e == "ini"))
            {
                let name = ini.file_name().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(ini.path())
                    .with_context(|| format!("reading {}", ini.path().display()))?;
                let available = root.join("etc/php/8.2/mods-available").join(&name);
                std::fs::write(&available, &text)
                    .with_context(|| format!("writing {}", available.display()))?;
                let priority = text
                    .lines()
                    .find_map(|l| l.split("priority=").nth(1))
                    .map_or("20".to_string(), |p| p.trim().to_string());
                let _ = std::os::unix::fs::symlink(
                    format!("/etc/php/8.2/mods-available/{name}"),
                    conf_d.join(format!("{priority}-{name}")),
                );
            }
        }
    }
    Ok(root)
}

/// Records what the command reads as it starts: the converted image mounted with
/// `imgstream mount --record-reads`, the command run in a chroot on it. Returns the record.
fn record_reads(scratch: &Path, esgz_layout: &Path) -> anyhow::Result<PathBuf> {
    let reads = scratch.join("reads.jsonl");
    let reads_arg = reads.display().to_string();
    let mounted = support::Mounted::start(
        &format!("oci:{}:esgz", esgz_layout.display()),
        &scratch.join("record-mnt"),
        &scratch.join("record-cache"),
        "localhost:1",
        &["--record-reads", &reads_arg, "--no-background"],
    );
    let out = run(Command::new("chroot")
        .arg(&mounted.mountpoint)
        .args(COMMAND))?;
    mounted.stop();
    if out != "ready\n" {
        bail!("the command printed {out:?} on the recording mount, not \"ready\"");
    }
    let lines = std::fs::read_to_string(&reads)
        .with_context(|| format!("reading {}", reads.display()))?
        .lines()
        .count();
    println!("   recorded {lines} reads of the command's start (imgstream mount --record-reads)");
    Ok(reads)
}

fn rx_bytes(interface: &str) -> anyhow::Result<u64> {
    let path = format!("/sys/class/net/{interface}/statistics/rx_bytes");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("{path} holds {text:?}, not a byte count"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One cold start: (seconds from PullImage to the first log line, bytes over the link by
/// then, seconds until the image was all fetched when streamed).
async fn cold_start(
    scratch: &Path,
    reg: &str,
    image: &str,
    streamed: bool,
    interface: &str,
) -> anyhow::Result<(f64, u64, Option<f64>)> {
    let name = match (streamed, image.ends_with(":prefetch")) {
        (false, _) => "pulled",
        (true, false) => "streamed",
        (true, true) => "prefetch",
    };
    let dir = scratch.join(format!("{name}-{}", support::free_port()));
    mkdir(&dir)?;
    let socket = dir.join("snapshotter.sock");
    let socket_arg = socket.display().to_string();
    let sandbox = format!("{reg}/pause:v1");
    let containerd = if streamed {
        let dropin = String::from_utf8(
            support::imgstream(&["containerd-config", "--socket", &socket_arg]).stdout,
        )
        .context("`imgstream containerd-config` printed something other than UTF-8")?
        .replace("version = 2\n", "");
        Containerd::start_cri_with(&format!("bench-{name}"), reg, &sandbox, &dropin)
    } else {
        Containerd::start_cri(&format!("bench-{name}"), reg, &sandbox)
    };
    let agent = streamed.then(|| {
        let args = [
            "--snapshotter-socket".to_string(),
            socket.display().to_string(),
            "--snapshotter-root".into(),
            dir.join("snapshotter").display().to_string(),
            "--cache-dir".into(),
            dir.join("cache").display().to_string(),
            "--insecure-registry".into(),
            reg.to_string(),
            // As the DaemonSet runs it: the background download waits for the container's
            // start, then for its reads to go quiet.
            "--background-delay-secs".into(),
            "3".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(&dir, &args)
    });
    // The sandbox image first: not part of what is timed.
    // As kubelet does: retried while containerd's channel to the proxy snapshotter, dialled
    // before the agent listened, is still in its reconnect backoff.
    let mut images = k8s_cri::v1::image_service_client::ImageServiceClient::new(
        imgstream::cri::channel(&containerd.socket)
            .await
            .context("connecting to containerd's CRI socket")?,
    );
    support::cri::pull(&mut images, &sandbox)
        .await
        .context("pulling the sandbox image")?;
    let before = rx_bytes(interface)?;
    let started = Instant::now();
    let log = cri::run_pod_with(
        &containerd,
        image,
        ("bench", name),
        COMMAND.map(String::from).to_vec(),
        Vec::new(),
        &dir.join("logs"),
    )
    .await;
    cri::wait_for_line(&log, "ready");
    let took = started.elapsed().as_secs_f64();
    let fetched = rx_bytes(interface)?.saturating_sub(before);
    // The agent logs when a layer's background download has cached all of it.
    let cached = agent.as_ref().and_then(|agent| {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !agent.log_text().contains("background download complete") {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(started.elapsed().as_secs_f64())
    });
    println!(
        "   {name:>8}: PullImage -> first log line {took:6.2} s, {:6.1} MB over the link by then{}",
        fetched as f64 / 1e6,
        cached.map_or(String::new(), |c| format!(
            ", whole image cached after {c:.1} s"
        ))
    );
    if let Some(agent) = agent {
        agent.stop();
    }
    drop(containerd);
    Ok((took, fetched, cached))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    support::require_root();
    let scratch = support::scratch("bench-e2e");
    let scratch_arg = scratch.display().to_string();
    println!("1. Build the image from Debian's packages (Apache, PHP 8.2 and extensions)");
    let root = rootfs(&scratch)?;
    let tarball = scratch.join("layer.tar.gz");
    support::gnu_tar_gz(&root, &tarball);
    let layout = scratch.join("layout");
    support::build_image_from_tarballs(&layout, "v1", &[tarball], &COMMAND).await;
    let esgz_layout = scratch.join("esgz-layout");
    let out = support::imgstream(&[
        "convert",
        &format!("oci:{}:v1", layout.display()),
        &format!("oci:{}:esgz", esgz_layout.display()),
        "--chunk-size",
        CHUNK_SIZE,
        "--json",
        "--scratch",
        &scratch_arg,
    ]);
    let converted: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("`imgstream convert --json` printed something other than JSON")?;
    let reads = record_reads(&scratch, &esgz_layout)?;
    let reads_arg = reads.display().to_string();
    support::imgstream(&[
        "convert",
        &format!("oci:{}:v1", layout.display()),
        &format!("oci:{}:prefetch", esgz_layout.display()),
        "--chunk-size",
        CHUNK_SIZE,
        "--prefetch-from",
        &reads_arg,
        "--scratch",
        &scratch_arg,
    ]);
    let layer_size = |field: &str| {
        converted["layers"][0][field]
            .as_u64()
            .with_context(|| format!("`imgstream convert --json` gave no layers[0].{field}"))
    };
    let (plain_bytes, esgz_bytes) = (layer_size("source_size")?, layer_size("size")?);
    let du = run(Command::new("du").args(["-sb"]).arg(&root))?;
    let unpacked: u64 = du
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du printed {du:?}"))?;
    let files = walkdir_count(&root);
    println!(
        "   {:.0} MB unpacked in {files} files; layer {:.0} MB gzip, {:.0} MB as eStargz ({CHUNK_SIZE} chunks)",
        unpacked as f64 / 1e6,
        plain_bytes as f64 / 1e6,
        esgz_bytes as f64 / 1e6
    );

    println!("2. Serve it from a registry behind a {RATE_MBIT} Mbit/s link");
    let link = SlowLink::new("e2e", &format!("{RATE_MBIT}mbit"));
    let registry = Registry::start_in_netns("bench-e2e", &link.netns, &link.ip);
    let reg = registry.host();
    let interface = "isbh-e2e";
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reg}/php:plain"),
    );
    for tag in ["esgz", "prefetch"] {
        support::skopeo_copy(
            &format!("oci:{}:{tag}", esgz_layout.display()),
            &format!("docker://{reg}/php:{tag}"),
        );
    }
    let pause_root = support::clockprobe_rootfs(&scratch.join("pause-rootfs"), &[]);
    let pause_layout = scratch.join("pause-layout");
    support::build_image(
        &pause_layout,
        "v1",
        &[pause_root],
        &["/clockprobe", "pause", "0"],
    )
    .await;
    support::skopeo_copy(
        &format!("oci:{}:v1", pause_layout.display()),
        &format!("docker://{reg}/pause:v1"),
    );

    println!("3. Cold starts, {REPETITIONS} of each, alternating");
    // (label, image, streamed): containerd's own pull; imgstream on demand only; imgstream
    // with the recorded prefetch list.
    let setups = [
        (
            "containerd's overlayfs snapshotter (pulled)",
            format!("{reg}/php:esgz"),
            false,
        ),
        ("imgstream, on demand only", format!("{reg}/php:esgz"), true),
        (
            "imgstream, with the recorded prefetch list",
            format!("{reg}/php:prefetch"),
            true,
        ),
    ];
    let mut results: Vec<Vec<(f64, u64, Option<f64>)>> = vec![Vec::new(); setups.len()];
    for _ in 0..REPETITIONS {
        for ((_, image, streamed), runs) in setups.iter().zip(&mut results) {
            runs.push(cold_start(&scratch, &reg, image, *streamed, interface).await?);
        }
    }
    let mut table = format!(
        "Image: {:.0} MB unpacked, {files} files; {:.0} MB gzip, {:.0} MB eStargz ({CHUNK_SIZE} chunks). \
         Link: {RATE_MBIT} Mbit/s. Medians of {REPETITIONS} cold starts each.\n\n\
         | setup | PullImage -> first log line | sooner than pulled | bytes over the link by then | transfer floor (share of the time) | whole image cached |\n\
         |---|---|---|---|---|---|\n",
        unpacked as f64 / 1e6,
        plain_bytes as f64 / 1e6,
        esgz_bytes as f64 / 1e6
    );
    let pulled = median(results[0].iter().map(|r| r.0).collect());
    for ((label, _, streamed), runs) in setups.iter().zip(&results) {
        let took = median(runs.iter().map(|r| r.0).collect());
        if !streamed {
            let _ = writeln!(
                table,
                "| {label} | {took:.2} s | 1x | the whole image | | |"
            );
            continue;
        }
        let bytes = median(runs.iter().map(|r| r.1 as f64).collect());
        let floor = bytes * 8.0 / (RATE_MBIT * 1e6);
        let cached: Vec<f64> = runs.iter().filter_map(|r| r.2).collect();
        let _ = writeln!(
            table,
            "| {label} | {took:.2} s | **{:.1}x** | {:.1} MB ({:.0} % of the layer) | {floor:.2} s ({:.0} %) | {} |",
            pulled / took,
            bytes / 1e6,
            bytes / esgz_bytes as f64 * 100.0,
            floor / took * 100.0,
            if cached.is_empty() {
                "not finished".to_string()
            } else {
                format!("{:.1} s", median(cached))
            }
        );
    }
    println!("\n{table}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    mkdir(&out)?;
    let table_file = out.join("e2e.md");
    std::fs::write(&table_file, &table)
        .with_context(|| format!("writing {}", table_file.display()))?;
    drop(registry);
    drop(link);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

fn walkdir_count(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            n += 1;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    n
}
