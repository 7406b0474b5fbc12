//! The `imgstream` binary: arguments -> configuration -> subcommand.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use imgstream::{config::AgentConfig, selftest, shutdown::Shutdown};

#[derive(Debug, Parser)]
#[command(
    name = "imgstream",
    version,
    about = "Image-streaming node agent for Kubernetes"
)]
struct Args {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `imgstream=debug`.
    #[arg(
        long,
        global = true,
        default_value = "info,fuse_backend_rs=warn",
        env = "IMGSTREAM_LOG"
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: attach the probes and report rename-ENXIO detections.
    Agent {
        /// Append detections as JSON lines to this file instead of standard output.
        #[arg(long)]
        detections: Option<PathBuf>,
        /// Longest wait on the probes between shutdown checks, in milliseconds.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        poll_ms: u64,
        /// Do not run the container start-latency probes.
        #[arg(long)]
        no_start_latency: bool,
        /// Seconds after its creation that a container's first log line is waited for;
        /// a container silent for longer counts as never logged.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        first_log_window_secs: u64,
        /// The local store of start records and flags.
        #[arg(long, default_value = "/var/lib/imgstream/agent.redb")]
        store: PathBuf,
        /// Keep no store (records then live in the metrics only).
        #[arg(long, conflicts_with = "store")]
        no_store: bool,
        /// Most records of each kind the store keeps; the oldest go first.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
        store_max_records: u64,
        /// Address of the HTTP API (/healthz, /metrics, /v1/starts, /v1/flags).
        #[arg(long, default_value = "127.0.0.1:9464")]
        api_addr: std::net::SocketAddr,
        /// Serve no HTTP API.
        #[arg(long, conflicts_with = "api_addr")]
        no_api: bool,
        /// The container runtime's CRI socket, for pod names, namespaces and images
        /// (containerd: /run/containerd/containerd.sock); repeat for several runtimes.
        #[arg(long = "cri-socket", value_name = "PATH")]
        cri_sockets: Vec<PathBuf>,
        /// Flag pods that hit rename-ENXIO in the Kubernetes API (Event, annotation, node
        /// condition), as this node; uses the in-cluster service account.
        #[arg(long, value_name = "NODE_NAME", env = "IMGSTREAM_NODE_NAME")]
        flag_pods_as: Option<String>,
        /// The API server to flag pods in, instead of the in-cluster one.
        #[arg(long, value_name = "URL", requires = "flag_pods_as")]
        kube_api: Option<String>,
        /// Least seconds between two Events for one pod.
        #[arg(long, default_value_t = 600)]
        flag_interval_secs: u64,
        /// Serve containerd's snapshot API on this socket (the remote snapshotter; name it in
        /// containerd's `[proxy_plugins]`, see `imgstream containerd-config`).
        #[arg(long, value_name = "PATH")]
        snapshotter_socket: Option<PathBuf>,
        /// The snapshotter's metadata and layer directories.
        #[arg(long, default_value = "/var/lib/imgstream/snapshotter")]
        snapshotter_root: PathBuf,
        /// An `imgstream fuse-keeper` socket: lazy layers' FUSE connections are handed to it,
        /// so running containers keep reading them while the agent restarts or is upgraded.
        #[arg(long, value_name = "PATH")]
        fuse_keeper: Option<PathBuf>,
        /// Print the files and sockets this configuration uses, as JSON, and exit (for
        /// checking a deployment's mounts against its arguments).
        #[arg(long, hide = true)]
        print_paths: bool,
        #[command(flatten)]
        serving: ServingArgs,
    },
    /// Check on this kernel that the rename-ENXIO detector works, against an emulated
    /// regression (a FUSE mount whose rename fails with ENXIO). Needs root.
    Selftest {
        /// Directory for the scratch mount point.
        #[arg(long, default_value = "/tmp")]
        workdir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert an image to eStargz so it can be streamed. SRC and DST are registry
    /// references (`host:port/repo:tag`) or OCI layouts (`oci:DIR[:TAG]`).
    Convert {
        src: String,
        dst: String,
        /// Chunk size for large files (bytes, or with a K/M/G suffix).
        #[arg(long, default_value = "4M", value_parser = parse_size)]
        chunk_size: u64,
        /// A file to put first (prefetched by streaming runtimes); repeat in access order.
        #[arg(long = "prioritize", value_name = "PATH")]
        prioritize: Vec<String>,
        /// A file listing paths to prioritise, one per line.
        #[arg(long, value_name = "FILE")]
        prioritize_file: Option<PathBuf>,
        /// Reads recorded while the workload started (`imgstream mount --record-reads`): the
        /// files they touch go first, and the chunks they touch become the layer's prefetch
        /// list, fetched as soon as a node mounts the layer. Use the same --chunk-size as the
        /// image the reads were recorded on, or a smaller one.
        #[arg(long, value_name = "FILE")]
        prefetch_from: Option<PathBuf>,
        /// Platform to pick from an image index.
        #[arg(long, default_value = "linux/amd64", value_parser = parse_platform)]
        platform: imgstream::oci::manifest::Platform,
        /// Directory for staging layers.
        #[arg(long, default_value = "/var/tmp")]
        scratch: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Mount an image lazily (FUSE): files are fetched as they are read, the whole image is
    /// cached in the background. IMAGE is a registry reference or `oci:DIR[:TAG]`. Unmounts on
    /// Ctrl-C or SIGTERM; after a crash, `umount -l MOUNTPOINT` removes the stale mount.
    Mount {
        image: String,
        mountpoint: PathBuf,
        /// `merged` (all layers, whiteouts applied) or `layer:N` (one layer, overlayfs lower form).
        #[arg(long, default_value = "merged", value_parser = parse_view)]
        view: imgstream::fs::View,
        /// Record every file read while mounted (layer, path, offset, size; JSON lines) and
        /// write them to FILE at unmount: run a workload's start on the mount, then give FILE
        /// to `imgstream convert --prefetch-from`. Readahead is off while recording (unless
        /// --fuse-readahead-kb says otherwise), so what is recorded is what was read.
        #[arg(long, value_name = "FILE")]
        record_reads: Option<PathBuf>,
        #[command(flatten)]
        serving: ServingArgs,
    },
    /// Serve an image to a virtual machine as a vhost-user virtio-fs device: the VMM connects
    /// to SOCKET (QEMU: `-chardev socket,id=fs0,path=SOCKET -device
    /// vhost-user-fs-pci,chardev=fs0,tag=TAG` with shared guest memory) and the guest mounts
    /// the merged image with `mount -t virtiofs TAG DIR`. Same filesystem, cache and
    /// background download as `mount`; one VM at a time, any number one after another.
    /// Stops on Ctrl-C or SIGTERM.
    ServeVhost {
        image: String,
        /// The vhost-user socket to listen on (a stale socket file is replaced).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The tag offered to VMMs that read it from the backend (at most 36 bytes); QEMU's
        /// vhost-user-fs-pci takes its own `tag=` instead, which must match.
        #[arg(long)]
        tag: Option<String>,
        /// Request queues offered to the guest.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
        request_queues: u64,
        /// Largest virtqueue size the guest may use.
        #[arg(long, default_value_t = 1024, value_parser = parse_queue_size)]
        queue_size: u16,
        #[command(flatten)]
        serving: ServingArgs,
    },
    /// Report container start latencies (per image and namespace: p50/p90/p99/max of create
    /// -> start, start -> first log line and the total), containers that never logged, and
    /// pods flagged for rename-ENXIO; from a running agent's API or from its store.
    Report {
        /// The agent's HTTP API.
        #[arg(
            long,
            default_value = "http://127.0.0.1:9464",
            conflicts_with = "store"
        )]
        api: String,
        /// Read the agent's store directly (only while no agent has it open).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Only starts since: Unix seconds, or an age like 15m, 2h, 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        pod: Option<String>,
        /// Only images whose reference contains this.
        #[arg(long)]
        image: Option<String>,
        /// Compare groups: `namespace`, `image`, `label:KEY`, or `image:PATTERN` (images
        /// matching PATTERN against the rest, e.g. streamed against fully pulled).
        #[arg(long, value_name = "BY")]
        compare: Option<imgstream::report::GroupBy>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Also write a CDF chart of start -> first log line latencies (one line per compared
        /// group, else per namespace) to FILE.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Print the containerd configuration drop-in that makes imgstream containerd's
    /// snapshotter: the proxy plugin on the agent's socket, and CRI told to use it and to pass
    /// the layer labels remote snapshots need. Import it from containerd's config
    /// (`imports = ["/etc/containerd/conf.d/*.toml"]`) and restart containerd.
    ContainerdConfig {
        /// The agent's snapshotter socket (`imgstream agent --snapshotter-socket`).
        #[arg(long, default_value = "/run/imgstream/snapshotter.sock")]
        socket: PathBuf,
        /// The name containerd knows the snapshotter by.
        #[arg(long, default_value = "imgstream")]
        name: String,
    },
    /// Hold lazy layers' FUSE connections for `imgstream agent --fuse-keeper`, so that they
    /// outlive an agent restart. Run it apart from the agent (its own DaemonSet or service)
    /// and restart it only while the agent runs: connections it holds end with it.
    FuseKeeper {
        #[arg(long, default_value = "/run/imgstream/fuse-keeper.sock")]
        socket: PathBuf,
    },
    /// Internal: the processes `selftest` runs.
    #[command(hide = true, subcommand)]
    SelftestHelper(selftest::helper::HelperCommand),
}

/// How an image is served: cache, background download, deadlines (`mount`, `serve-vhost`).
#[derive(Debug, clap::Args)]
struct ServingArgs {
    /// The chunk cache directory, shared by every image and every transport.
    #[arg(long, default_value = "/var/lib/imgstream/cache")]
    cache_dir: PathBuf,
    /// Most bytes the cache may hold (K/M/G suffixes); no limit by default.
    #[arg(long, value_parser = parse_bytes)]
    cache_limit: Option<u64>,
    /// Write the cache with plain syscalls instead of io_uring.
    #[arg(long)]
    no_io_uring: bool,
    /// Do not download the whole image in the background.
    #[arg(long)]
    no_background: bool,
    /// Parallel requests of the background download.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    background_concurrency: u64,
    /// Bandwidth cap of the background download, bytes per second (K/M/G suffixes).
    #[arg(long, value_parser = parse_bytes)]
    background_bandwidth: Option<u64>,
    /// Seconds after a mount before the background download starts (the snapshotter mounts
    /// layers at pull time, moments before the container's first reads).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    background_delay_secs: u64,
    /// The background download starts a request only when on-demand reads have been quiet
    /// this many milliseconds, so that a starting container has the link to itself.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    background_quiet_ms: u64,
    /// A read waiting on the network fails with EIO after this many seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    read_deadline_secs: u64,
    /// Do not fetch the chunks a layer's TOC lists as read at start (`imgstream convert
    /// --prefetch-from`, or eStargz's prioritised files) as soon as it is mounted.
    #[arg(long)]
    no_prefetch: bool,
    /// The kernel's readahead on FUSE mounts, KiB, until the whole image is cached (then the
    /// kernel's default comes back). By default 0 for images with a prefetch list (the list
    /// brings what the start reads; readahead would fetch pages it does not), and the
    /// kernel's default for the others (fewer, larger requests).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=16384))]
    fuse_readahead_kb: Option<u32>,
    /// Threads serving requests.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Platform to pick from an image index.
    #[arg(long, default_value = "linux/amd64", value_parser = parse_platform)]
    platform: imgstream::oci::manifest::Platform,
    #[command(flatten)]
    registry: RegistryArgs,
}

impl ServingArgs {
    fn options(
        self,
        view: imgstream::fs::View,
    ) -> anyhow::Result<(
        imgstream::mount::MountOptions,
        imgstream::registry::http::HttpConfig,
    )> {
        let options = imgstream::mount::MountOptions {
            view,
            cache: imgstream::cache::CacheConfig {
                dir: self.cache_dir,
                limit_bytes: self.cache_limit,
                prefer_uring: !self.no_io_uring,
            },
            fs: imgstream::fs::FsConfig {
                read_deadline: Duration::from_secs(self.read_deadline_secs),
                record_reads: false,
            },
            background: (!self.no_background).then_some(
                imgstream::fetch::background::BackgroundConfig {
                    concurrency: self.background_concurrency as usize,
                    bandwidth: self.background_bandwidth,
                    start_delay: Duration::from_secs(self.background_delay_secs),
                    quiet: Duration::from_millis(self.background_quiet_ms),
                },
            ),
            prefetch: !self.no_prefetch,
            threads: self.threads as usize,
            readahead_kb: self.fuse_readahead_kb,
            platform: self.platform,
        };
        let http = imgstream::registry::http::HttpConfig::try_from(self.registry)?;
        Ok((options, http))
    }
}

/// How registries are reached (shared by every subcommand that talks to one).
#[derive(Debug, clap::Args)]
struct RegistryArgs {
    /// A registry (host:port) to reach over plain HTTP; repeat for several.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure: Vec<String>,
    /// A PEM file of extra CA certificates to trust.
    #[arg(long = "ca-file", value_name = "PEM")]
    ca_files: Vec<PathBuf>,
    /// A mirror for a registry, tried before it: HOST=URL (repeat for several, in order).
    #[arg(long = "mirror", value_name = "HOST=URL")]
    mirrors: Vec<String>,
    /// Docker config.json with credentials [default: ~/.docker/config.json].
    #[arg(long)]
    auth_file: Option<PathBuf>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout_secs: u64,
    /// Retries for failed requests (connection errors, timeouts, 5xx).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=20))]
    retries: u32,
}

impl TryFrom<RegistryArgs> for imgstream::registry::http::HttpConfig {
    type Error = anyhow::Error;

    fn try_from(args: RegistryArgs) -> anyhow::Result<Self> {
        let mut config = Self {
            insecure: args.insecure,
            ca_files: args.ca_files,
            ..Self::default()
        };
        for mirror in args.mirrors {
            let (host, url) = mirror
                .split_once('=')
                .with_context(|| format!("--mirror {mirror:?} is not HOST=URL"))?;
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "--mirror {mirror:?}: the URL must start with http:// or https://"
            );
            config
                .mirrors
                .entry(host.to_string())
                .or_default()
                .push(url.to_string());
        }
        if args.auth_file.is_some() {
            config.auth_file = args.auth_file;
        }
        config.timeout = Duration::from_secs(args.timeout_secs);
        config.retries = args.retries;
        Ok(config)
    }
}

fn parse_view(s: &str) -> Result<imgstream::fs::View, String> {
    match s {
        "merged" => Ok(imgstream::fs::View::Merged),
        _ => s
            .strip_prefix("layer:")
            .and_then(|n| n.parse().ok())
            .map(imgstream::fs::View::Layer)
            .ok_or_else(|| format!("{s:?} is neither `merged` nor `layer:N`")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let size = parse_bytes(s)?;
    if !(4096..=1 << 30).contains(&size) {
        return Err(format!("{s:?}: the chunk size must be between 4K and 1G"));
    }
    Ok(size)
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.trim().len()),
    );
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n.is_power_of_two() && n >= 2 => Ok(n),
        _ => Err(format!(
            "{s:?}: a queue size is a power of two from 2 to 32768"
        )),
    }
}

fn parse_platform(s: &str) -> Result<imgstream::oci::manifest::Platform, String> {
    let parts: Vec<&str> = s.split('/').collect();
    let (os, architecture, variant) = match parts.as_slice() {
        [os, arch] => (os, arch, None),
        [os, arch, variant] => (os, arch, Some(variant.to_string())),
        _ => return Err(format!("{s:?} is not OS/ARCH[/VARIANT]")),
    };
    Ok(imgstream::oci::manifest::Platform {
        os: os.to_string(),
        architecture: architecture.to_string(),
        variant,
        extra: Default::default(),
    })
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and each keeps
/// what it frees. The agent runs many threads (FUSE workers, background workers, the async
/// runtime) that allocate briefly: two arenas keep its memory close to what it uses.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator tunable; called first thing, before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let args = Args::parse();
    if let Command::SelftestHelper(helper) = args.command {
        return ExitCode::from(selftest::helper::run(helper) as u8);
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("imgstream: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Agent {
            detections,
            poll_ms,
            no_start_latency,
            first_log_window_secs,
            store,
            no_store,
            store_max_records,
            api_addr,
            no_api,
            cri_sockets,
            flag_pods_as,
            kube_api,
            flag_interval_secs,
            snapshotter_socket,
            snapshotter_root,
            fuse_keeper,
            print_paths,
            serving,
        } => {
            if print_paths {
                let paths = serde_json::json!({
                    "detections": detections,
                    "store": (!no_store).then_some(&store),
                    "api_addr": (!no_api).then_some(api_addr.to_string()),
                    "cri_socket": cri_sockets.first(),
                    "snapshotter_socket": snapshotter_socket,
                    "snapshotter_root": snapshotter_socket.as_ref().map(|_| &snapshotter_root),
                    "fuse_keeper": fuse_keeper,
                    "cache_dir": &serving.cache_dir,
                    "flag_pods_as": flag_pods_as,
                });
                println!("{}", serde_json::to_string_pretty(&paths)?);
                return Ok(ExitCode::SUCCESS);
            }
            let (mount, http) = serving.options(imgstream::fs::View::Merged)?;
            let snapshotter =
                snapshotter_socket.map(|socket| imgstream::snapshotter::SnapshotterConfig {
                    root: snapshotter_root,
                    socket,
                    http,
                    mount,
                    keeper: fuse_keeper,
                });
            let config = AgentConfig {
                detections_out: detections,
                poll_interval: Duration::from_millis(poll_ms),
                start_latency: !no_start_latency,
                first_log_window: Duration::from_secs(first_log_window_secs),
                store: (!no_store).then_some(store),
                store_max_records,
                api_addr: (!no_api).then_some(api_addr),
                cri_sockets,
                kubernetes: flag_pods_as.map(|node_name| imgstream::flag::KubeConfig {
                    node_name,
                    api_url: kube_api,
                    min_interval: Duration::from_secs(flag_interval_secs),
                }),
                snapshotter,
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = Shutdown::new();
                shutdown
                    .trigger_on_signals()
                    .context("installing signal handlers")?;
                imgstream::agent::run(config, shutdown)
                    .await
                    .context("agent")
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest { workdir, json } => {
            let helper = std::env::current_exe().context("locating the imgstream binary")?;
            let report =
                selftest::run(&selftest::Options { helper, workdir }).context("selftest")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for case in &report.cases {
                    let mark = if case.passed { "ok  " } else { "FAIL" };
                    println!("{mark} {}: {}", case.name, case.detail);
                }
                let failed = report.cases.iter().filter(|c| !c.passed).count();
                println!(
                    "selftest on {}: {} cases passed, {failed} failed",
                    report.kernel,
                    report.cases.len() - failed
                );
            }
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Convert {
            src,
            dst,
            chunk_size,
            mut prioritize,
            prioritize_file,
            prefetch_from,
            platform,
            scratch,
            json,
            registry,
        } => {
            let reads = match prefetch_from {
                Some(file) => imgstream::image::reads::read(&file)?,
                None => Vec::new(),
            };
            if let Some(file) = prioritize_file {
                let list = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                prioritize.extend(
                    list.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
            let http = imgstream::registry::http::HttpConfig::try_from(registry)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let report = runtime.block_on(convert(
                &src,
                &dst,
                chunk_size,
                (prioritize, reads),
                platform,
                scratch,
                http,
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for (i, l) in report.layers.iter().enumerate() {
                    let how = if l.reused {
                        "already eStargz, copied"
                    } else {
                        "converted"
                    };
                    println!(
                        "layer {i}: {} ({} B) -> {} ({} B), TOC {}, {how}",
                        l.source_digest, l.source_size, l.digest, l.size, l.toc_digest
                    );
                }
                println!("{dst}: manifest {}", report.manifest_digest);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Mount {
            image,
            mountpoint,
            view,
            record_reads,
            serving,
        } => {
            let (mut options, http) = serving.options(view)?;
            if record_reads.is_some() {
                options.fs.record_reads = true;
                options.readahead_kb.get_or_insert(0);
            }
            mount(&image, &mountpoint, &options, http, record_reads.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ServeVhost {
            image,
            socket,
            tag,
            request_queues,
            queue_size,
            serving,
        } => {
            let (options, http) = serving.options(imgstream::fs::View::Merged)?;
            let config = imgstream::fs::virtiofs::VirtioFsConfig {
                request_queues: request_queues as usize,
                queue_size,
                request_threads: options.threads,
                tag,
            };
            serve_vhost(&image, &socket, config, &options, http)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            api,
            store,
            since,
            namespace,
            pod,
            image,
            compare,
            json,
            svg,
        } => {
            report(api, store, since, namespace, pod, image, compare, json, svg)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::FuseKeeper { socket } => {
            let shutdown = Shutdown::new();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime
                .block_on(async { shutdown.trigger_on_signals() })
                .context("installing signal handlers")?;
            imgstream::fs::keeper::run(&socket, &shutdown)
                .with_context(|| format!("serving {}", socket.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ContainerdConfig { socket, name } => {
            print!(
                "{}",
                imgstream::snapshotter::containerd_config(&name, &socket)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::SelftestHelper(_) => unreachable!("handled before logging is set up"),
    }
}

async fn convert(
    src: &str,
    dst: &str,
    chunk_size: u64,
    (prioritized, reads): (Vec<String>, Vec<imgstream::image::reads::RecordedRead>),
    platform: imgstream::oci::manifest::Platform,
    scratch: PathBuf,
    http: imgstream::registry::http::HttpConfig,
) -> anyhow::Result<imgstream::convert::ConvertReport> {
    use imgstream::{
        oci::reference::ImageRef,
        registry::{open_sink, open_source},
    };
    let src_ref = ImageRef::parse(src).context("SRC")?;
    let dst_ref = ImageRef::parse(dst).context("DST")?;
    let source = open_source(&src_ref, &http).with_context(|| format!("opening {src_ref}"))?;
    let sink = open_sink(&dst_ref, &http).with_context(|| format!("opening {dst_ref}"))?;
    let tag = match &dst_ref {
        ImageRef::Registry { tag, .. } | ImageRef::Layout { tag, .. } => tag.clone(),
    };
    let bars = progress_bars();
    let options = imgstream::convert::ConvertOptions {
        writer: imgstream::image::estargz::WriterOptions {
            chunk_size,
            ..Default::default()
        },
        prioritized,
        reads,
        platform,
        scratch: scratch.join(format!("imgstream-convert-{}", std::process::id())),
        progress: bars,
        mount_from: match (&src_ref, &dst_ref) {
            (
                ImageRef::Registry {
                    registry: a,
                    repository,
                    ..
                },
                ImageRef::Registry { registry: b, .. },
            ) if a == b => Some(repository.clone()),
            _ => None,
        },
    };
    let result = imgstream::convert::convert(
        source,
        src_ref.manifest_reference().as_deref(),
        sink,
        tag.as_deref(),
        &options,
    )
    .await;
    let _ = std::fs::remove_dir_all(&options.scratch);
    result.with_context(|| format!("converting {src_ref} to {dst_ref}"))
}

/// One progress bar per layer, only when stderr is a terminal.
fn progress_bars() -> Option<imgstream::convert::ProgressFn> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let multi = indicatif::MultiProgress::new();
    let bars =
        std::sync::Mutex::new(std::collections::BTreeMap::<usize, indicatif::ProgressBar>::new());
    let style = indicatif::ProgressStyle::with_template(
        "layer {prefix:>2} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    Some(std::sync::Arc::new(move |layer, read, total| {
        let mut bars = imgstream::sync::lock(&bars);
        let bar = bars.entry(layer).or_insert_with(|| {
            let bar = multi.add(indicatif::ProgressBar::new(total));
            bar.set_style(style.clone());
            bar.set_prefix(layer.to_string());
            bar
        });
        bar.set_position(read);
        if read >= total {
            bar.finish();
        }
    }))
}

#[expect(clippy::too_many_arguments, reason = "one per command-line option")]
fn report(
    api: String,
    store: Option<PathBuf>,
    since: Option<String>,
    namespace: Option<String>,
    pod: Option<String>,
    image: Option<String>,
    compare: Option<imgstream::report::GroupBy>,
    json: bool,
    svg: Option<PathBuf>,
) -> anyhow::Result<()> {
    use imgstream::{
        report::{GroupBy, Report, svg::Series},
        starts::store::{Filter, Store},
    };
    let since_ns = since
        .as_deref()
        .map(imgstream::api::parse_since)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let (starts, flags) = match store {
        Some(path) => {
            let store = Store::open(&path, u64::MAX)?;
            let filter = Filter {
                since_ns,
                namespace,
                pod,
                image,
            };
            (store.starts(&filter)?, store.flags(&filter)?)
        }
        None => {
            let mut query = Vec::new();
            if let Some(ns) = since_ns {
                query.push(format!("since={}", ns as f64 / 1e9));
            }
            for (key, value) in [("namespace", namespace), ("pod", pod), ("image", image)] {
                if let Some(value) = value {
                    let encoded: String = value
                        .bytes()
                        .map(|b| {
                            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                                (b as char).to_string()
                            } else {
                                format!("%{b:02X}")
                            }
                        })
                        .collect();
                    query.push(format!("{key}={encoded}"));
                }
            }
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(imgstream::report::from_api(&api, &query.join("&")))?
        }
    };
    let report = Report::build(&starts, flags, compare.as_ref());
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    if let Some(path) = svg {
        let by = compare.unwrap_or(GroupBy::Namespace);
        let mut groups: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for r in &starts {
            if let Some(v) = r.start_to_first_log() {
                groups.entry(by.key(r)).or_default().push(v);
            }
        }
        let series: Vec<Series> = groups
            .into_iter()
            .map(|(name, values)| Series { name, values })
            .collect();
        let chart = imgstream::report::svg::cdf("container start -> first log line", &series);
        std::fs::write(&path, chart).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Opens IMAGE's layers for serving: the runtime, the cache and the opened image.
fn open_image(
    image: &str,
    options: &imgstream::mount::MountOptions,
    http: imgstream::registry::http::HttpConfig,
) -> anyhow::Result<(
    tokio::runtime::Runtime,
    std::sync::Arc<imgstream::cache::ChunkCache>,
    imgstream::mount::OpenedImage,
    imgstream::oci::reference::ImageRef,
)> {
    use imgstream::{oci::reference::ImageRef, registry::open_source};
    let image_ref = ImageRef::parse(image).context("IMAGE")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let source = open_source(&image_ref, &http).with_context(|| format!("opening {image_ref}"))?;
    let reference = image_ref.manifest_reference().unwrap_or_default();
    let cache = std::sync::Arc::new(
        imgstream::cache::ChunkCache::open(&options.cache)
            .with_context(|| format!("opening the cache at {}", options.cache.dir.display()))?,
    );
    let opened = runtime
        .block_on(imgstream::mount::open_layers(
            source,
            &reference,
            &options.platform,
            &cache,
        ))
        .with_context(|| format!("reading {image_ref}"))?;
    Ok((runtime, cache, opened, image_ref))
}

fn serve_vhost(
    image: &str,
    socket: &std::path::Path,
    config: imgstream::fs::virtiofs::VirtioFsConfig,
    options: &imgstream::mount::MountOptions,
    http: imgstream::registry::http::HttpConfig,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;

    let (runtime, cache, opened, image_ref) = open_image(image, options, http)?;
    let mut served = imgstream::mount::serve(runtime.handle().clone(), opened, cache, options)
        .with_context(|| format!("preparing {image_ref}"))?;
    let mut server =
        imgstream::fs::virtiofs::VirtioFsServer::bind(served.fs.clone(), socket, config)
            .with_context(|| format!("serving {image_ref} on {}", socket.display()))?;
    let shutdown = Shutdown::new();
    runtime
        .block_on(async { shutdown.trigger_on_signals() })
        .context("installing signal handlers")?;
    tracing::info!(image = %image_ref, socket = %socket.display(), files = served.fs.tree().iter().count(), "serving the image over vhost-user virtio-fs");
    eprintln!(
        "{image_ref} served over virtio-fs on {}; Ctrl-C stops",
        socket.display()
    );
    let result = server.run(&shutdown);
    served.wait_background_stop();
    let stats = &server.stats;
    tracing::info!(
        sessions = stats.sessions.load(Ordering::Relaxed),
        requests = stats.requests.load(Ordering::Relaxed),
        bad_requests = stats.bad_requests.load(Ordering::Relaxed),
        fetched_bytes = served.fetcher.stats.bytes.load(Ordering::Relaxed),
        "virtio-fs backend stopped"
    );
    drop(server);
    result.with_context(|| format!("serving on {}", socket.display()))?;
    eprintln!("stopped serving on {}", socket.display());
    Ok(())
}

fn mount(
    image: &str,
    mountpoint: &std::path::Path,
    options: &imgstream::mount::MountOptions,
    http: imgstream::registry::http::HttpConfig,
    record_reads: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;

    let (runtime, cache, opened, image_ref) = open_image(image, options, http)?;
    let mut mounted =
        imgstream::mount::mount(runtime.handle().clone(), opened, cache, mountpoint, options)
            .with_context(|| format!("mounting {image_ref} at {}", mountpoint.display()))?;
    eprintln!(
        "{image_ref} mounted at {}; Ctrl-C unmounts",
        mountpoint.display()
    );
    let shutdown = Shutdown::new();
    runtime
        .block_on(async { shutdown.trigger_on_signals() })
        .context("installing signal handlers")?;
    let bar = (std::io::stderr().is_terminal() && mounted.progress.is_some()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "background [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    let mut last_log = std::time::Instant::now();
    while !shutdown.is_triggered() {
        std::thread::sleep(Duration::from_millis(200));
        let Some(progress) = &mounted.progress else {
            continue;
        };
        let (done, total) = (
            progress.bytes_done.load(Ordering::Relaxed),
            progress.bytes_total.load(Ordering::Relaxed),
        );
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        } else if last_log.elapsed() > Duration::from_secs(10)
            && !progress.finished.load(Ordering::Relaxed)
        {
            tracing::info!(done, total, "background download");
            last_log = std::time::Instant::now();
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    mounted.wait_background_stop();
    let reads = mounted.fs.recorded_reads();
    drop(mounted);
    eprintln!("unmounted {}", mountpoint.display());
    if let Some(file) = record_reads {
        imgstream::image::reads::write(file, &reads)
            .with_context(|| format!("writing the recorded reads to {}", file.display()))?;
        eprintln!("{} reads recorded in {}", reads.len(), file.display());
    }
    Ok(())
}
