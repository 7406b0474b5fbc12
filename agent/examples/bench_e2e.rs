//! `cargo xtask bench e2e`: the headline measurement. A realistic image (Debian's
//! packages for Apache, PHP 8.2 and common PHP extensions with their whole dependency closure,
//! unpacked with `dpkg -x`: about 340 MB and 9,000 files), converted by `imgstream convert`
//! with its defaults, is served by Debian's docker-registry from a network namespace behind a
//! rate-limited veth link (tc tbf, 100 Mbit/s) and a relay that adds a round-trip time
//! (0, 20 and 50 ms). On a cold node (fresh containerd, fresh snapshotter, empty cache, each
//! repetition) the bench plays kubelet over CRI in kubelet's order (the pod cgroup,
//! RunPodSandbox, PullImage, CreateContainer, StartContainer) and times PullImage to the
//! container's first log line: `php -r 'echo "ready\n";'`, which loads 49 extensions (about 38 MB of files)
//! before it prints. Side by side in one run, repetitions alternating: containerd's own pull
//! (overlayfs snapshotter), imgstream as containerd's snapshotter with its defaults (kubelet's
//! PullImage to containerd, and again to the agent's CRI image proxy, which fetches the
//! image's manifest and TOCs while containerd fetches its own), imgstream with a prefetch
//! list recorded from the same command (a tuned image), and
//! stargz-snapshotter v0.12 on the same eStargz bytes with its defaults (its daemon is a
//! benchmark tool built by `../shared/peers/build_stargz_grpc.sh`; `IMGSTREAM_STARGZ_GRPC`
//! names it, default `~/.cache/peer/containerd-stargz-grpc`, and its rows are left out,
//! saying so, when it is absent). Then a workload that reads the whole image before its first
//! line (`tar` of the root filesystem), at the first and the last round trip. Medians with min-max, ratios, bytes over the link by
//! the first log line, the transfer floor (those bytes at the link's rate).
//!
//! Before each timed start the bench runs `sync` and empties the page cache.
//!
//! `IMGSTREAM_BENCH_RTTS` (default `0,20,50`, ms) and `IMGSTREAM_BENCH_REPS` (default 3)
//! shorten a trial run; `IMGSTREAM_BENCH_SETUPS` picks rows; `IMGSTREAM_BENCH_AGENT_ARGS`
//! adds agent flags to every imgstream row (a sweep: the report then says the rows are
//! tuned); `IMGSTREAM_BENCH_B_ARGS` (agent flags) and `IMGSTREAM_BENCH_B_ENV` (`NAME=VALUE`
//! pairs for the agent, as a trial build's hooks read) run every imgstream row picked a second
//! time with them, each right after the row itself, for a change measured against the same
//! code without it in one run; `IMGSTREAM_BENCH_KEEP` keeps its logs. The packages are downloaded with apt once, into
//! ~/.cache/imgstream/bench-e2e. A full run writes its table to `target/bench/e2e.md`; a run
//! that any of those variables shortens or tunes writes `target/bench/e2e-trial.md`, so a trial
//! never replaces the last full run's table.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use support::{Agent, Containerd, Registry, RoundTrip, SlowLink, cri};

const RATE_MBIT: f64 = 100.0;
const PACKAGES: [&str; 13] = [
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
    "tar",
];
/// Where the layered image is cut: each of these subtrees a layer of its own (as the steps
/// of a Dockerfile leave them), the rest the bottom layer.
const LAYER_CUTS: [&str; 7] = [
    "./etc",
    "./usr/bin",
    "./usr/lib/x86_64-linux-gnu",
    "./usr/lib/php",
    "./usr/lib/apache2",
    "./usr/share",
    "./var",
];
/// The start: PHP with its 49 extensions.
const COMMAND: [&str; 3] = ["/usr/bin/php8.2", "-r", "echo \"ready\\n\";"];
/// A workload that reads every file of its image before its first line.
const READ_ALL: [&str; 3] = [
    "/bin/dash",
    "-c",
    "/bin/tar -cf - --one-file-system / | /usr/bin/wc -c >/dev/null; echo ready",
];

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

/// The tree of `root` as layers of gzip tar (GNU tar, as the one-layer image): the tree
/// but [`LAYER_CUTS`] at the bottom, then each cut that exists.
fn layered_tarballs(root: &Path, scratch: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let cuts: Vec<&str> = LAYER_CUTS
        .into_iter()
        .filter(|cut| root.join(cut).is_dir())
        .collect();
    let tar = |out: &Path, excludes: &[&str], members: &[&str]| -> anyhow::Result<()> {
        let mut cmd = Command::new("tar");
        cmd.args([
            "--format=pax",
            "--sort=name",
            "--numeric-owner",
            "--use-compress-program=gzip -1",
        ]);
        cmd.args(excludes.iter().map(|e| format!("--exclude={e}")));
        cmd.arg("-cf").arg(out).arg("-C").arg(root).args(members);
        run(&mut cmd).map(|_| ())
    };
    let mut tarballs = vec![scratch.join("layered-0.tar.gz")];
    tar(&tarballs[0], &cuts, &["."])?;
    for (i, cut) in cuts.iter().enumerate() {
        let out = scratch.join(format!("layered-{}.tar.gz", i + 1));
        tar(&out, &[], &[cut])?;
        tarballs.push(out);
    }
    Ok(tarballs)
}

fn rx_bytes(interface: &str) -> anyhow::Result<u64> {
    let path = format!("/sys/class/net/{interface}/statistics/rx_bytes");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("{path} holds {text:?}, not a byte count"))
}

/// Median, min and max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Who prepares the image's snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Snapshotter {
    /// containerd's overlayfs snapshotter: the whole image is pulled and unpacked.
    Pulled,
    Imgstream,
    Stargz,
}

/// One row's setup: who, which image tag, which command, and for imgstream, whether a
/// prefetch list learned on this node is kept across its cold starts.
#[derive(Clone, Copy, Debug)]
struct Setup {
    label: &'static str,
    snapshotter: Snapshotter,
    tag: &'static str,
    command: &'static [&'static str],
    /// kubelet's PullImage to the agent's CRI image proxy (`--cri-image-proxy`, kubelet's
    /// `--image-service-endpoint` pointed at imgstream, as private images need) instead of
    /// containerd's own socket.
    image_proxy: bool,
    learned: Option<Learned>,
    /// Run with a trial's second arm ([`ArmB`]).
    arm_b: bool,
}

impl Setup {
    /// The row's name in a trial's `IMGSTREAM_BENCH_SETUPS` and in its per-start lines.
    fn variant(&self) -> &'static str {
        if self.image_proxy {
            return "proxy";
        }
        self.learned.map_or(self.tag, |l| l.name)
    }
}

/// A trial's second arm: agent flags (`IMGSTREAM_BENCH_B_ARGS`) and `NAME=VALUE` pairs for
/// the agent's environment (`IMGSTREAM_BENCH_B_ENV`, read by a trial build's hooks), each
/// split at whitespace. Every imgstream row picked then runs again with them, right after
/// itself in each repetition, so that a change is measured against the code without it in
/// one run, from the same cold state, and not against another run's figures. A row with a
/// learned list keeps, in its B arm too, the list learned once with the defaults.
#[derive(Clone, Debug, Default, PartialEq)]
struct ArmB {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl ArmB {
    /// The arm the environment asks for; `None` when it asks for none.
    fn from_env() -> anyhow::Result<Option<Self>> {
        let env = env_words("IMGSTREAM_BENCH_B_ENV")
            .into_iter()
            .map(|pair| match pair.split_once('=') {
                Some((name, value)) if !name.is_empty() => {
                    Ok((name.to_string(), value.to_string()))
                }
                _ => bail!("IMGSTREAM_BENCH_B_ENV: {pair:?} is not NAME=VALUE"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let arm = Self {
            args: env_words("IMGSTREAM_BENCH_B_ARGS"),
            env,
        };
        Ok((arm != Self::default()).then_some(arm))
    }

    /// How a B row's label says what it runs with.
    fn describe(&self) -> String {
        let pairs = self.env.iter().map(|(n, v)| format!("{n}={v}"));
        let all: Vec<String> = self.args.iter().cloned().chain(pairs).collect();
        format!("trial arm B: `{}`", all.join(" "))
    }
}

/// A prefetch list imgstream learned from one start of `command` (on a node whose cache
/// was emptied since): the cold starts keep it, nothing else.
#[derive(Clone, Copy, Debug)]
struct Learned {
    name: &'static str,
    command: &'static [&'static str],
}

impl Learned {
    fn dir(&self, scratch: &Path) -> PathBuf {
        scratch.join(format!("learned-{}", self.name))
    }
}

/// Another command of the same image, to learn from.
const PHP_V: [&str; 3] = [
    "/bin/dash",
    "-c",
    "/usr/bin/php8.2 -v >/dev/null; echo ready",
];

/// One cold start's figures.
#[derive(Clone, Copy, Debug)]
struct Run {
    /// PullImage -> first log line, seconds.
    took: f64,
    /// Bytes over the link by then.
    fetched: u64,
    /// Seconds until imgstream had the whole image cached.
    cached: Option<f64>,
}

/// stargz-snapshotter's daemon, with its defaults, as containerd's proxy snapshotter.
struct StargzDaemon {
    child: std::process::Child,
    root: PathBuf,
    log: PathBuf,
}

impl StargzDaemon {
    fn start(binary: &Path, dir: &Path) -> anyhow::Result<(Self, PathBuf)> {
        let (socket, root, log, config) = (
            dir.join("stargz.sock"),
            dir.join("stargz-root"),
            dir.join("stargz.log"),
            dir.join("stargz.toml"),
        );
        // The registry is on 127.0.0.1, which it reaches over plain HTTP with no entry.
        std::fs::write(&config, "").context("writing stargz-snapshotter's config")?;
        let out = std::fs::File::create(&log).context("creating stargz-snapshotter's log")?;
        let child = Command::new(binary)
            .arg("--address")
            .arg(&socket)
            .arg("--root")
            .arg(&root)
            .arg("--config")
            .arg(&config)
            .args(["--log-level", "debug"])
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let daemon = Self { child, root, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!(
                    "stargz-snapshotter did not listen; see {}",
                    daemon.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok((daemon, socket))
    }

    /// Whether its log says a layer was mounted lazily (a remote snapshot: the sandbox
    /// image's plain layer is not), and the last word it logged on that.
    fn lazy(&self) -> (bool, String) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut said = text
            .lines()
            .filter(|l| l.contains("remote-snapshot-prepared"));
        let lazy = said
            .clone()
            .any(|l| l.contains("\"remote-snapshot-prepared\":\"true\""));
        (lazy, said.next_back().unwrap_or("nothing").to_string())
    }

    /// SIGINT unmounts its layers; what it leaves mounted is unmounted here.
    fn stop(mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        support::umount_below(&self.root);
    }
}

/// One cold start of `setup`'s command with a fresh containerd and snapshotter.
async fn cold_start(
    scratch: &Path,
    reg: &str,
    setup: &Setup,
    interface: &str,
    (stargz, arm_b): (Option<&Path>, Option<&ArmB>),
) -> anyhow::Result<Run> {
    let name = format!("{:?}", setup.snapshotter).to_lowercase();
    let dir = scratch.join(format!("{name}-{}", support::free_port()));
    mkdir(&dir)?;
    let sandbox = format!("{reg}/pause:v1");
    let image = format!("{reg}/php:{}", setup.tag);
    let mut stargz_daemon = None;
    let containerd = match setup.snapshotter {
        Snapshotter::Pulled => Containerd::start_cri(&format!("bench-{name}"), reg, &sandbox),
        Snapshotter::Imgstream => {
            let socket = dir.join("snapshotter.sock");
            let dropin = String::from_utf8(
                support::imgstream(&[
                    "containerd-config",
                    "--socket",
                    &socket.display().to_string(),
                ])
                .stdout,
            )
            .context("`imgstream containerd-config` printed something other than UTF-8")?
            .replace("version = 2\n", "");
            Containerd::start_cri_with(&format!("bench-{name}"), reg, &sandbox, &dropin)
        }
        Snapshotter::Stargz => {
            let binary = stargz.context("no stargz-snapshotter")?;
            let (daemon, socket) = StargzDaemon::start(binary, &dir)?;
            stargz_daemon = Some(daemon);
            let dropin = format!(
                "[proxy_plugins.stargz]\n  type = \"snapshot\"\n  address = \"{}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"stargz\"\n  disable_snapshot_annotations = false\n",
                socket.display()
            );
            Containerd::start_cri_with(&format!("bench-{name}"), reg, &sandbox, &dropin)
        }
    };
    let agent = (setup.snapshotter == Snapshotter::Imgstream).then(|| {
        let learned = setup
            .learned
            .map_or_else(|| dir.join("learned"), |l| l.dir(scratch));
        let mut args = vec![
            "--learned-dir".to_string(),
            learned.display().to_string(),
            "--snapshotter-socket".to_string(),
            dir.join("snapshotter.sock").display().to_string(),
            "--snapshotter-root".into(),
            dir.join("snapshotter").display().to_string(),
            "--cache-dir".into(),
            dir.join("cache").display().to_string(),
            "--insecure-registry".into(),
            reg.to_string(),
        ];
        if setup.image_proxy {
            args.extend([
                "--cri-image-proxy".into(),
                dir.join("image.sock").display().to_string(),
                "--cri-upstream".into(),
                containerd.socket.display().to_string(),
            ]);
        }
        args.extend(tuning());
        let arm = arm_b.filter(|_| setup.arm_b).cloned().unwrap_or_default();
        args.extend(arm.args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start_with_env(&dir, &args, &arm.env)
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
    // Cold as a node that never ran the image: dirty pages written, the page cache emptied
    // (the registry's blob files too, on both sides).
    drop_caches()?;
    let before = rx_bytes(interface)?;
    // kubelet's order: the pod cgroup and the sandbox first, then PullImage, timed from
    // there.
    let mut kubelet = cri::Kubelet::new(&containerd);
    if agent.is_some() && setup.image_proxy {
        kubelet.image_service = dir.join("image.sock");
    }
    let run = kubelet
        .run_pod(
            &image,
            ("bench", &name),
            setup.command.iter().map(|s| s.to_string()).collect(),
            Vec::new(),
            &dir.join("logs"),
        )
        .await;
    let started = run.pull_called;
    cri::wait_for_line(&run.log, "ready");
    let took = started.elapsed().as_secs_f64();
    let fetched = rx_bytes(interface)?.saturating_sub(before);
    // The agent logs when a layer's background download has cached all of it: the image is
    // cached once every layer it mounted lazily is.
    let cached = agent.as_ref().and_then(|agent| {
        let deadline = Instant::now() + Duration::from_secs(300);
        let all_cached = |log: &str| {
            let complete = log.matches("background download complete").count();
            complete > 0 && complete >= log.matches("layer mounted lazily").count()
        };
        // Every layer was prepared before the container started: none mounted lazily,
        // nothing to wait for.
        if !agent.log_text().contains("layer mounted lazily") {
            return None;
        }
        while !all_cached(&agent.log_text()) {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(started.elapsed().as_secs_f64())
    });
    println!(
        "   {name:>9} {:<10} PullImage -> first log line {took:6.2} s, {:6.1} MB over the link by then{}",
        format!("{}{}", setup.variant(), if setup.arm_b { " B" } else { "" }),
        fetched as f64 / 1e6,
        cached.map_or(String::new(), |c| format!(
            ", whole image cached after {c:.1} s"
        ))
    );
    if let Some(agent) = agent {
        let text = agent.log_text();
        agent.stop();
        if std::env::var_os("IMGSTREAM_BENCH_KEEP").is_some() {
            let kept = dir.with_extension("log");
            std::fs::write(&kept, &text).with_context(|| format!("keeping {}", kept.display()))?;
        }
        if setup.tag == "plain" && !text.contains("streamed through its span index") {
            bail!("imgstream did not stream the unconverted image through its span index");
        }
        if setup.tag == "layered-plain" && text.contains("span index refused") {
            bail!("imgstream refused a span index of the layered image as pushed");
        }
        if setup.tag == "zstd" && !text.contains("zstd:chunked layer: streamed through its TOC") {
            bail!("imgstream did not stream the zstd:chunked image through its TOC");
        }
    }
    drop(containerd);
    if let Some(daemon) = stargz_daemon {
        let (lazy, line) = daemon.lazy();
        daemon.stop();
        if !lazy {
            bail!("stargz-snapshotter did not mount the image lazily: its log says {line:?}");
        }
    }
    // Each cold start's snapshots and cache (a few hundred MB) go now, not at the end: a
    // whole run holds dozens of them.
    support::umount_below(&dir);
    if let Err(err) = std::fs::remove_dir_all(&dir) {
        eprintln!("   {} not removed: {err}", dir.display());
    }
    Ok(Run {
        took,
        fetched,
        cached,
    })
}

fn drop_caches() -> anyhow::Result<()> {
    let status = Command::new("sync").status().context("running sync")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache (root?)")
}

/// Agent flags a sweep adds to every imgstream row (`IMGSTREAM_BENCH_AGENT_ARGS`, split at
/// whitespace); the report says so, since the rows are then not the defaults.
fn tuning() -> Vec<String> {
    env_words("IMGSTREAM_BENCH_AGENT_ARGS")
}

/// The words of the environment variable `name` (none when it is not set).
fn env_words(name: &str) -> Vec<String> {
    std::env::var(name)
        .map(|a| a.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn env_list(name: &str, default: &str) -> anyhow::Result<Vec<u64>> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter(|n| !n.trim().is_empty())
        .map(|n| {
            n.trim()
                .parse()
                .with_context(|| format!("{name}: {n:?} is not a whole number"))
        })
        .collect()
}

/// The peer's daemon, if it was built.
fn stargz_binary() -> Option<PathBuf> {
    let path = std::env::var_os("IMGSTREAM_STARGZ_GRPC").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/peer/containerd-stargz-grpc")
        },
        PathBuf::from,
    );
    if path.exists() {
        Some(path)
    } else {
        println!(
            "   stargz-snapshotter's containerd-stargz-grpc is not at {} (build it with \
             ../shared/peers/build_stargz_grpc.sh, or name it with IMGSTREAM_STARGZ_GRPC): \
             its rows are left out",
            path.display()
        );
        None
    }
}

/// Runs `setups` `reps` times each, alternating, through a relay that adds `rtt` in front
/// of the registry at `upstream`; the runs of each setup in order.
async fn measure(
    scratch: &Path,
    (upstream, rtt): (std::net::SocketAddr, Duration),
    setups: &[Setup],
    reps: usize,
    interface: &str,
    (stargz, arm_b): (Option<&Path>, Option<&ArmB>),
) -> anyhow::Result<Vec<Vec<Run>>> {
    let relay = RoundTrip::start(upstream, rtt);
    let mut results = vec![Vec::new(); setups.len()];
    for _ in 0..reps {
        for (setup, runs) in setups.iter().zip(&mut results) {
            runs.push(cold_start(scratch, &relay.host(), setup, interface, (stargz, arm_b)).await?);
        }
    }
    Ok(results)
}

/// Table rows for one set of setups measured together.
fn rows(
    table: &mut String,
    rtt: &str,
    (setups, arm_b): (&[Setup], Option<&ArmB>),
    results: &[Vec<Run>],
    esgz_bytes: u64,
) {
    // Each row against the full pull, and stargz-snapshotter, on the same image (the first
    // one measured, if that image has none).
    let median_of = |kind: Snapshotter, tag: &str| {
        let of_kind = || {
            setups
                .iter()
                .zip(results)
                .filter(move |(s, _)| s.snapshotter == kind)
        };
        of_kind()
            .find(|(s, _)| s.tag == tag)
            .or_else(|| of_kind().next())
            .map(|(_, runs)| spread(runs.iter().map(|r| r.took).collect()).0)
    };
    let pulled_of = |tag: &str| median_of(Snapshotter::Pulled, tag);
    let stargz_of = |tag: &str| median_of(Snapshotter::Stargz, tag);
    // A B row follows its A row: the median it is compared with.
    let mut arm_a = None;
    for (setup, runs) in setups.iter().zip(results) {
        let (took, lo, hi) = spread(runs.iter().map(|r| r.took).collect());
        let bytes = spread(runs.iter().map(|r| r.fetched as f64).collect()).0;
        let floor = bytes * 8.0 / (RATE_MBIT * 1e6);
        let cached: Vec<f64> = runs.iter().filter_map(|r| r.cached).collect();
        let vs_stargz = match (setup.snapshotter, stargz_of(setup.tag)) {
            (Snapshotter::Imgstream, Some(peer)) => format!("**{:.2}x**", peer / took),
            _ => String::new(),
        };
        let label = match arm_b.filter(|_| setup.arm_b) {
            Some(arm) => format!(
                "{}, {}{}",
                setup.label,
                arm.describe(),
                arm_a.map_or(String::new(), |a: f64| format!(
                    " (its time {:.2}x that of arm A, the row above, in this run)",
                    took / a
                ))
            ),
            None => setup.label.to_string(),
        };
        arm_a = (!setup.arm_b).then_some(took);
        let _ = writeln!(
            table,
            "| {rtt} | {label} | {took:.2} s ({lo:.2}-{hi:.2}) | {} | {vs_stargz} | {:.1} MB ({:.0} %) | {floor:.2} s ({:.0} %) | {} |",
            pulled_of(setup.tag).map_or(String::new(), |p| format!("{:.1}x", p / took)),
            bytes / 1e6,
            bytes / esgz_bytes as f64 * 100.0,
            floor / took * 100.0,
            if cached.is_empty() {
                String::new()
            } else {
                format!("{:.1} s", spread(cached).0)
            }
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    support::require_root();
    let rtts = env_list("IMGSTREAM_BENCH_RTTS", "0,20,50")?;
    let reps = env_list("IMGSTREAM_BENCH_REPS", "3")?
        .first()
        .copied()
        .unwrap_or(3)
        .max(1) as usize;
    let stargz = stargz_binary();
    let scratch = support::scratch("bench-e2e");
    let scratch_arg = scratch.display().to_string();
    println!("1. Build the image from Debian's packages (Apache, PHP 8.2 and extensions)");
    let root = rootfs(&scratch)?;
    let tarball = scratch.join("layer.tar.gz");
    support::gnu_tar_gz(&root, &tarball);
    let layout = scratch.join("layout");
    support::build_image_from_tarballs(&layout, "v1", &[tarball], &COMMAND).await;
    let esgz_layout = scratch.join("esgz-layout");
    // `imgstream convert` as a new user runs it: no flags (`IMGSTREAM_BENCH_CHUNK` sets
    // --chunk-size, to measure other sizes).
    let chunk = std::env::var("IMGSTREAM_BENCH_CHUNK").ok();
    let chunk_args: Vec<&str> = chunk
        .as_deref()
        .map_or_else(Vec::new, |c| vec!["--chunk-size", c]);
    let mut convert = vec![
        "convert".to_string(),
        format!("oci:{}:v1", layout.display()),
        format!("oci:{}:esgz", esgz_layout.display()),
        "--json".into(),
        "--scratch".into(),
        scratch_arg.clone(),
    ];
    convert.extend(chunk_args.iter().map(|s| s.to_string()));
    let out = support::imgstream(&convert.iter().map(String::as_str).collect::<Vec<_>>());
    let converted: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("`imgstream convert --json` printed something other than JSON")?;
    let reads = record_reads(&scratch, &esgz_layout)?;
    let reads_arg = reads.display().to_string();
    let (layout_ref, prefetch_ref) = (
        format!("oci:{}:v1", layout.display()),
        format!("oci:{}:prefetch", esgz_layout.display()),
    );
    let mut convert = vec![
        "convert",
        &layout_ref,
        &prefetch_ref,
        "--prefetch-from",
        &reads_arg,
        "--scratch",
        &scratch_arg,
    ];
    convert.extend(&chunk_args);
    support::imgstream(&convert);
    // And as zstd:chunked (`convert --format zstd:chunked`, its defaults otherwise).
    let zstd_ref = format!("oci:{}:zstd", esgz_layout.display());
    let mut convert = vec![
        "convert",
        &layout_ref,
        &zstd_ref,
        "--format",
        "zstd:chunked",
        "--json",
        "--scratch",
        &scratch_arg,
    ];
    convert.extend(&chunk_args);
    let out = support::imgstream(&convert);
    let converted_zstd: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("`imgstream convert --json` printed something other than JSON")?;
    let zstd_bytes = converted_zstd["layers"][0]["size"]
        .as_u64()
        .context("`imgstream convert --json` gave no layers[0].size")?;
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
        "   {:.0} MB unpacked in {files} files; layer {:.0} MB gzip, {:.0} MB as eStargz ({})",
        unpacked as f64 / 1e6,
        plain_bytes as f64 / 1e6,
        esgz_bytes as f64 / 1e6,
        chunk
            .as_deref()
            .map_or("convert's defaults".to_string(), |c| format!(
                "--chunk-size {c}"
            ))
    );

    println!("2. Serve it from a registry behind a {RATE_MBIT} Mbit/s link");
    let link = SlowLink::new("e2e", &format!("{RATE_MBIT}mbit"));
    let registry = Registry::start_in_netns("bench-e2e", &link.netns, &link.ip);
    let interface = "isbh-e2e";
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/php:plain", registry.host()),
    );
    for tag in ["esgz", "prefetch", "zstd"] {
        support::skopeo_copy(
            &format!("oci:{}:{tag}", esgz_layout.display()),
            &format!("docker://{}/php:{tag}", registry.host()),
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
        &format!("docker://{}/pause:v1", registry.host()),
    );

    let mut start_setups = vec![
        Setup {
            label: "full pull (containerd's overlayfs snapshotter)",
            snapshotter: Snapshotter::Pulled,
            tag: "esgz",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
        Setup {
            label: "imgstream, defaults",
            snapshotter: Snapshotter::Imgstream,
            tag: "esgz",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
        Setup {
            label: "imgstream, defaults, PullImage through imgstream's CRI image proxy",
            snapshotter: Snapshotter::Imgstream,
            tag: "esgz",
            command: &COMMAND,
            image_proxy: true,
            arm_b: false,
            learned: None,
        },
        Setup {
            label: "imgstream, defaults, list learned from the same command's first start",
            snapshotter: Snapshotter::Imgstream,
            tag: "esgz",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: Some(Learned {
                name: "same",
                command: &COMMAND,
            }),
        },
        Setup {
            label: "imgstream, defaults, list learned from another command's first start (`php -v`)",
            snapshotter: Snapshotter::Imgstream,
            tag: "esgz",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: Some(Learned {
                name: "other",
                command: &PHP_V,
            }),
        },
        Setup {
            label: "imgstream, tuned: prefetch list recorded from the same command (`convert --prefetch-from`)",
            snapshotter: Snapshotter::Imgstream,
            tag: "prefetch",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
    ];
    // The image as pushed, never converted: pulled, and streamed through the span index
    // `imgstream index` publishes beside it.
    start_setups.extend([
        Setup {
            label: "full pull of the unconverted image (plain gzip)",
            snapshotter: Snapshotter::Pulled,
            tag: "plain",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
        Setup {
            label: "imgstream, unconverted image, span index published by `imgstream index` (defaults)",
            snapshotter: Snapshotter::Imgstream,
            tag: "plain",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
        Setup {
            label: "imgstream, unconverted image, span index, list learned from the same command's first start",
            snapshotter: Snapshotter::Imgstream,
            tag: "plain",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: Some(Learned {
                name: "plain-same",
                command: &COMMAND,
            }),
        },
    ]);
    // The image as zstd:chunked: pulled (containerd decompresses zstd), and streamed.
    start_setups.extend([
        Setup {
            label: "full pull of the zstd:chunked image",
            snapshotter: Snapshotter::Pulled,
            tag: "zstd",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
        Setup {
            label: "imgstream, zstd:chunked image (`convert --format zstd:chunked`, defaults)",
            snapshotter: Snapshotter::Imgstream,
            tag: "zstd",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
    ]);
    // The image as Dockerfiles leave images: in layers (bottom first, containerd prepares
    // them one after another), each converted with `convert`'s defaults.
    start_setups.extend([
        Setup {
            label: "full pull of the layered image (eStargz)",
            snapshotter: Snapshotter::Pulled,
            tag: "layered",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
        Setup {
            label: "imgstream, layered image (eStargz, `convert` defaults)",
            snapshotter: Snapshotter::Imgstream,
            tag: "layered",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
        // The same layers as pushed (plain gzip), as most images in registries are: pulled,
        // and streamed through the span indexes `imgstream index` publishes beside them.
        Setup {
            label: "full pull of the layered image as pushed (plain gzip)",
            snapshotter: Snapshotter::Pulled,
            tag: "layered-plain",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
        Setup {
            label: "imgstream, layered image as pushed, span indexes published by `imgstream index` (defaults)",
            snapshotter: Snapshotter::Imgstream,
            tag: "layered-plain",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        },
    ]);
    if stargz.is_some() {
        start_setups.push(Setup {
            label: "stargz-snapshotter v0.12, defaults",
            snapshotter: Snapshotter::Stargz,
            tag: "esgz",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        });
        start_setups.push(Setup {
            label: "stargz-snapshotter v0.12, defaults, layered image",
            snapshotter: Snapshotter::Stargz,
            tag: "layered",
            command: &COMMAND,
            image_proxy: false,
            arm_b: false,
            learned: None,
        });
    }
    // A trial run may pick setups by name: pulled, pulled:esgz, pulled:plain, pulled:zstd,
    // imgstream:esgz, imgstream:proxy, imgstream:same, imgstream:other, imgstream:prefetch, imgstream:plain,
    // imgstream:plain-same, imgstream:zstd, pulled:layered, imgstream:layered, pulled:layered-plain,
    // imgstream:layered-plain, stargz, stargz:esgz, stargz:layered.
    if let Ok(only) = std::env::var("IMGSTREAM_BENCH_SETUPS") {
        let only: Vec<&str> = only.split(',').map(str::trim).collect();
        start_setups.retain(|s| {
            let name = format!("{:?}", s.snapshotter).to_lowercase();
            let variant = s.variant();
            only.contains(&name.as_str()) || only.contains(&format!("{name}:{variant}").as_str())
        });
    }
    let arm_b = ArmB::from_env()?;
    if arm_b.is_some() {
        start_setups = start_setups
            .into_iter()
            .flat_map(|s| {
                let b =
                    (s.snapshotter == Snapshotter::Imgstream).then_some(Setup { arm_b: true, ..s });
                std::iter::once(s).chain(b)
            })
            .collect();
    }
    let mut layered_note = String::new();
    if start_setups
        .iter()
        .any(|s| s.tag == "layered" || s.tag == "layered-plain")
    {
        println!("   building the layered image (not timed)");
        let layered = scratch.join("layered-layout");
        let tarballs = layered_tarballs(&root, &scratch)?;
        support::build_image_from_tarballs(&layered, "v1", &tarballs, &COMMAND).await;
        let layered_ref = format!("oci:{}:v1", layered.display());
        let converted_ref = format!("oci:{}:layered", esgz_layout.display());
        support::imgstream(&[
            "convert",
            &layered_ref,
            &converted_ref,
            "--scratch",
            &scratch_arg,
        ]);
        support::skopeo_copy(
            &converted_ref,
            &format!("docker://{}/php:layered", registry.host()),
        );
        let host = registry.host();
        let as_pushed = format!("{host}/php:layered-plain");
        support::skopeo_copy(&layered_ref, &format!("docker://{as_pushed}"));
        if start_setups
            .iter()
            .any(|s| s.snapshotter == Snapshotter::Imgstream && s.tag == "layered-plain")
        {
            println!(
                "   publishing the layered image's span indexes (`imgstream index`, not timed)"
            );
            support::imgstream(&[
                "index",
                &as_pushed,
                "--insecure-registry",
                &host,
                "--scratch",
                &scratch_arg,
            ]);
        }
        layered_note = format!(
            " The layered image: the same tree in {} layers (the subtrees {} each a layer, the rest the bottom one).",
            tarballs.len(),
            LAYER_CUTS
                .iter()
                .filter(|cut| root.join(cut).is_dir())
                .map(|cut| format!("`{}`", cut.trim_start_matches("./")))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut index_note = String::new();
    if start_setups
        .iter()
        .any(|s| s.snapshotter == Snapshotter::Imgstream && s.tag == "plain")
    {
        println!("   publishing the unconverted image's span index (`imgstream index`, not timed)");
        let host = registry.host();
        let image = format!("{host}/php:plain");
        // `IMGSTREAM_BENCH_SPAN` sets --span, to measure other span sizes.
        let span = std::env::var("IMGSTREAM_BENCH_SPAN").ok();
        let mut args = vec![
            "index",
            &image,
            "--insecure-registry",
            &host,
            "--json",
            "--scratch",
            &scratch_arg,
        ];
        if let Some(span) = &span {
            args.extend(["--span", span]);
        }
        let out = support::imgstream(&args);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .context("`imgstream index --json` printed something other than JSON")?;
        let index_bytes = report["layers"][0]["index_bytes"]
            .as_u64()
            .context("`imgstream index --json` gave no layers[0].index_bytes")?;
        let windows_bytes = report["layers"][0]["windows_bytes"].as_u64().unwrap_or(0);
        index_note = format!(
            " Span index of the unconverted layer ({}): {:.2} MB ({:.1} % of it), {} spans; their windows apart, fetched a window per miss, {:.1} MB.",
            span.map_or("`imgstream index` defaults".to_string(), |s| format!(
                "tuned: `--span {s}`"
            )),
            index_bytes as f64 / 1e6,
            index_bytes as f64 * 100.0 / plain_bytes as f64,
            report["layers"][0]["spans"],
            windows_bytes as f64 / 1e6,
        );
    }
    let tuned = tuning();
    let mut table = if tuned.is_empty() {
        String::new()
    } else {
        format!(
            "**Tuned run:** every imgstream row runs the agent with `{}`.\n\n",
            tuned.join(" ")
        )
    };
    if let Some(arm) = &arm_b {
        let _ = writeln!(
            table,
            "**Trial with two arms:** each imgstream row runs again right after itself, in every repetition, with the agent's {}.\n",
            arm.describe().trim_start_matches("trial ")
        );
    }

    table += &format!(
        "Image: {:.0} MB unpacked, {files} files; {:.0} MB gzip, {:.0} MB eStargz, {:.0} MB zstd:chunked (`imgstream convert` defaults). \
         Link: {RATE_MBIT} Mbit/s plus the round-trip time. Medians of {reps} cold starts each (min-max).{index_note}{layered_note}\n\n\
         | round trip | setup | PullImage -> first log line | vs full pull | vs stargz-snapshotter | bytes over the link by then | transfer floor (share of the time) | whole image cached |\n\
         |---|---|---|---|---|---|---|---|\n",
        unpacked as f64 / 1e6,
        plain_bytes as f64 / 1e6,
        esgz_bytes as f64 / 1e6,
        zstd_bytes as f64 / 1e6
    );
    // What imgstream learns on a node's first start: once, before the timed starts, which
    // keep the list and nothing else.
    for (tag, learned) in start_setups
        .iter()
        .filter_map(|s| s.learned.map(|l| (s.tag, l)))
    {
        println!(
            "   learning from one start of {:?}, {tag} image (not timed)",
            learned.command.join(" ")
        );
        let first = Setup {
            label: "learning",
            snapshotter: Snapshotter::Imgstream,
            tag,
            command: learned.command,
            image_proxy: false,
            arm_b: false,
            learned: Some(learned),
        };
        measure(
            &scratch,
            (registry.addr, Duration::ZERO),
            &[first],
            1,
            interface,
            (None, None),
        )
        .await?;
        let lists = list(&learned.dir(&scratch)).map(|l| l.count()).unwrap_or(0);
        if lists == 0 {
            bail!("imgstream learned nothing from {:?}", learned.command);
        }
    }
    for &rtt in &rtts {
        println!("3. Cold starts at {rtt} ms round trip, {reps} of each, alternating");
        let results = measure(
            &scratch,
            (registry.addr, Duration::from_millis(rtt)),
            &start_setups,
            reps,
            interface,
            (stargz.as_deref(), arm_b.as_ref()),
        )
        .await?;
        rows(
            &mut table,
            &format!("{rtt} ms"),
            (&start_setups, arm_b.as_ref()),
            &results,
            esgz_bytes,
        );
    }

    // The whole image at the first and the last round trip: far from the registry is where
    // a lazy reader that misses one round trip at a time would lose most.
    let read_all: Vec<Setup> = start_setups
        .iter()
        .filter(|s| s.tag == "esgz" && s.learned.is_none() && !s.image_proxy)
        .map(|s| Setup {
            command: &READ_ALL,
            ..*s
        })
        .collect();
    let _ = writeln!(
        table,
        "\nThe whole image read first (`tar -cf - --one-file-system / | wc -c`, then the line):\n\n\
         | round trip | setup | PullImage -> first log line | vs full pull | vs stargz-snapshotter | bytes over the link by then | transfer floor (share of the time) | whole image cached |\n\
         |---|---|---|---|---|---|---|---|"
    );
    let mut whole_rtts = vec![rtts.first().copied().unwrap_or(0)];
    whole_rtts.extend(rtts.last().copied().filter(|r| !whole_rtts.contains(r)));
    // A trial run may leave these rows out (`IMGSTREAM_BENCH_READ_ALL=0`).
    if std::env::var("IMGSTREAM_BENCH_READ_ALL").is_ok_and(|v| v == "0") {
        whole_rtts.clear();
    }
    for rtt in whole_rtts {
        println!("4. A workload that reads the whole image first, at {rtt} ms round trip");
        let results = measure(
            &scratch,
            (registry.addr, Duration::from_millis(rtt)),
            &read_all,
            reps,
            interface,
            (stargz.as_deref(), arm_b.as_ref()),
        )
        .await?;
        rows(
            &mut table,
            &format!("{rtt} ms"),
            (&read_all, arm_b.as_ref()),
            &results,
            esgz_bytes,
        );
    }

    println!("\n{table}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    mkdir(&out)?;
    let table_file = out.join(if is_trial() { "e2e-trial.md" } else { "e2e.md" });
    std::fs::write(&table_file, &table)
        .with_context(|| format!("writing {}", table_file.display()))?;
    println!("table written to {}", table_file.display());
    drop(registry);
    drop(link);
    if std::env::var_os("IMGSTREAM_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}

/// Whether the environment shortens or tunes this run (fewer round trips, repetitions or
/// rows, agent flags, a second arm), so that its table is not the full run's.
fn is_trial() -> bool {
    [
        "IMGSTREAM_BENCH_RTTS",
        "IMGSTREAM_BENCH_REPS",
        "IMGSTREAM_BENCH_SETUPS",
        "IMGSTREAM_BENCH_READ_ALL",
        "IMGSTREAM_BENCH_AGENT_ARGS",
        "IMGSTREAM_BENCH_B_ARGS",
        "IMGSTREAM_BENCH_B_ENV",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some())
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
