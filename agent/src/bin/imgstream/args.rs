//! The command line: one argument struct per subcommand, each turned into the library's
//! configuration with `TryFrom` (checked once here, so nothing below reads arguments or the
//! environment).

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use imgstream::{
    config::{AgentConfig, ByteSize, ImageProxyConfig},
    convert::ConvertJob,
    foreground::ImageJob,
    fs::View,
    oci::reference::ImageRef,
    registry::{http::HttpConfig, keyring::Keyring},
    report::{RecordSource, ReportJob},
    selftest,
    starts::store::Filter,
};

#[derive(Debug, Parser)]
#[command(
    name = "imgstream",
    version,
    about = "Image-streaming node agent for Kubernetes"
)]
pub(crate) struct Args {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `imgstream=debug`.
    #[arg(
        long,
        global = true,
        default_value = "info,fuse_backend_rs=warn",
        env = "IMGSTREAM_LOG"
    )]
    pub(crate) log: String,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the node agent: attach the probes and report rename-ENXIO detections.
    Agent(AgentArgs),
    /// Check on this kernel that the rename-ENXIO detector works, against an emulated
    /// regression (a FUSE mount whose rename fails with ENXIO). Needs root.
    Selftest(SelftestArgs),
    /// Convert an image to eStargz so it can be streamed. SRC and DST are registry
    /// references (`host:port/repo:tag`) or OCI layouts (`oci:DIR[:TAG]`).
    Convert(ConvertArgs),
    /// Build a span index for every plain gzip layer of IMAGE (a registry reference or
    /// `oci:DIR[:TAG]`), so that the image streams as it is, with no conversion, and publish
    /// each beside the image (an OCI artifact whose subject is the image manifest: referrers
    /// API, or the `sha256-<digest>` tag fallback), or keep it in --cache-dir with --local.
    /// `mount`, `serve-vhost` and the snapshotter find either. The image is not changed.
    Index(IndexArgs),
    /// Mount an image lazily (FUSE): files are fetched as they are read, the whole image is
    /// cached in the background. IMAGE is a registry reference or `oci:DIR[:TAG]`. Unmounts on
    /// Ctrl-C or SIGTERM, exits when MOUNTPOINT is unmounted from outside; after a crash,
    /// `umount -l MOUNTPOINT` removes the stale mount.
    Mount(MountArgs),
    /// Serve an image to a virtual machine as a vhost-user virtio-fs device: the VMM connects
    /// to SOCKET (QEMU: `-chardev socket,id=fs0,path=SOCKET -device
    /// vhost-user-fs-pci,chardev=fs0,tag=TAG` with shared guest memory) and the guest mounts
    /// the merged image with `mount -t virtiofs TAG DIR`. Same filesystem, cache and
    /// background download as `mount`; one VM at a time, any number one after another.
    /// Stops on Ctrl-C or SIGTERM.
    ServeVhost(ServeVhostArgs),
    /// Report container start latencies (per image and namespace: p50/p90/p99/max of create
    /// -> start, start -> first log line and the total), containers that never logged, and
    /// pods flagged for rename-ENXIO; from a running agent's API or from its store.
    Report(ReportArgs),
    /// Print the containerd configuration drop-in that makes imgstream containerd's
    /// snapshotter: the proxy plugin on the agent's socket, and CRI told to use it and to pass
    /// the layer labels remote snapshots need. Import it from containerd's config
    /// (`imports = ["/etc/containerd/conf.d/*.toml"]`) and restart containerd.
    ContainerdConfig(ContainerdConfigArgs),
    /// Hold lazy layers' FUSE connections for `imgstream agent --fuse-keeper`, so that they
    /// outlive an agent restart. Run it apart from the agent (its own DaemonSet or service)
    /// and restart it only while the agent runs: connections it holds end with it.
    FuseKeeper(FuseKeeperArgs),
    /// Internal: the processes `selftest` runs.
    #[command(hide = true, subcommand)]
    SelftestHelper(selftest::helper::HelperCommand),
}

#[derive(Debug, clap::Args)]
pub(crate) struct AgentArgs {
    /// Append detections as JSON lines to this file instead of standard output.
    #[arg(long)]
    pub(crate) detections: Option<PathBuf>,
    /// Longest wait on the probes between shutdown checks, in milliseconds.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) poll_ms: u64,
    /// Do not run the container start-latency probes.
    #[arg(long)]
    pub(crate) no_start_latency: bool,
    /// Seconds after its creation that a container's first log line is waited for;
    /// a container silent for longer counts as never logged.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) first_log_window_secs: u64,
    /// The local store of start records and flags.
    #[arg(long, default_value = "/var/lib/imgstream/agent.redb")]
    pub(crate) store: PathBuf,
    /// Keep no store (records then live in the metrics only).
    #[arg(long, conflicts_with = "store")]
    pub(crate) no_store: bool,
    /// Most records of each kind the store keeps; the oldest go first.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) store_max_records: u64,
    /// Address of the HTTP API (/healthz, /metrics, /v1/starts, /v1/flags).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub(crate) api_addr: std::net::SocketAddr,
    /// Serve no HTTP API.
    #[arg(long, conflicts_with = "api_addr")]
    pub(crate) no_api: bool,
    /// The container runtime's CRI socket, for pod names, namespaces and images
    /// (containerd: /run/containerd/containerd.sock); repeat for several runtimes.
    #[arg(long = "cri-socket", value_name = "PATH")]
    pub(crate) cri_sockets: Vec<PathBuf>,
    /// Flag pods that hit rename-ENXIO in the Kubernetes API (Event, annotation, node
    /// condition), as this node; uses the in-cluster service account.
    #[arg(long, value_name = "NODE_NAME", env = "IMGSTREAM_NODE_NAME")]
    pub(crate) flag_pods_as: Option<String>,
    /// The API server to flag pods in, instead of the in-cluster one.
    #[arg(long, value_name = "URL", requires = "flag_pods_as")]
    pub(crate) kube_api: Option<String>,
    /// Least seconds between two Events for one pod.
    #[arg(long, default_value_t = 600)]
    pub(crate) flag_interval_secs: u64,
    /// Serve containerd's snapshot API on this socket (the remote snapshotter; name it in
    /// containerd's `[proxy_plugins]`, see `imgstream containerd-config`).
    #[arg(long, value_name = "PATH")]
    pub(crate) snapshotter_socket: Option<PathBuf>,
    /// The snapshotter's metadata and layer directories.
    #[arg(long, default_value = "/var/lib/imgstream/snapshotter")]
    pub(crate) snapshotter_root: PathBuf,
    /// An `imgstream fuse-keeper` socket: lazy layers' FUSE connections are handed to it,
    /// so running containers keep reading them while the agent restarts or is upgraded.
    #[arg(long, value_name = "PATH")]
    pub(crate) fuse_keeper: Option<PathBuf>,
    /// Serve kubelet's image service on this socket (kubelet's `--image-service-endpoint`),
    /// passing every call on to --cri-upstream: the credentials of each PullImage are kept in
    /// memory, never on disk, for the snapshotter's lazy layers of that image's repository.
    #[arg(long, value_name = "PATH", requires = "cri_upstream")]
    pub(crate) cri_image_proxy: Option<PathBuf>,
    /// The runtime's CRI socket the image proxy passes calls on to
    /// (containerd: /run/containerd/containerd.sock).
    #[arg(long, value_name = "PATH", requires = "cri_image_proxy")]
    pub(crate) cri_upstream: Option<PathBuf>,
    /// Hours the image proxy keeps a pull's credentials (they also go when no image of the
    /// repository is left).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=720))]
    pub(crate) credential_hours: u64,
    /// Print the files and sockets this configuration uses, as JSON, and exit (for
    /// checking a deployment's mounts against its arguments).
    #[arg(long, hide = true)]
    pub(crate) print_paths: bool,
    #[command(flatten)]
    pub(crate) serving: ServingArgs,
}

#[derive(Debug, clap::Args)]
pub(crate) struct SelftestArgs {
    /// Directory for the scratch mount point.
    #[arg(long, default_value = "/tmp")]
    pub(crate) workdir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ConvertArgs {
    pub(crate) src: String,
    pub(crate) dst: String,
    /// Chunk size for large files (bytes, or with a K/M/G suffix). A miss fetches whole
    /// chunks: 256K measured best across 0, 20 and 50 ms round trips once the agent fetched
    /// a program's libraries ahead of the loader (`cargo xtask bench e2e`, 2026-12-01:
    /// against 1M, 19 % sooner at 0 ms, level at 20 and 50 ms; before that 1M, which was
    /// sooner than 256K at 50 ms).
    #[arg(long, default_value = "256K")]
    pub(crate) chunk_size: ByteSize,
    /// Layer format: `estargz` (gzip members: every runtime pulls it) or `zstd:chunked`
    /// (containers/storage's format: podman and CRI-O pull it lazily too; an image with it
    /// is an OCI image).
    #[arg(long, default_value = "estargz")]
    pub(crate) format: imgstream::convert::LayerFormat,
    /// A file to put first (prefetched by streaming runtimes); repeat in access order.
    #[arg(long = "prioritize", value_name = "PATH")]
    pub(crate) prioritize: Vec<String>,
    /// A file listing paths to prioritise, one per line.
    #[arg(long, value_name = "FILE")]
    pub(crate) prioritize_file: Option<PathBuf>,
    /// Reads recorded while the workload started (`imgstream mount --record-reads`): the
    /// files they touch go first, and the chunks they touch become the layer's prefetch
    /// list, fetched as soon as a node mounts the layer. Use the same --chunk-size as the
    /// image the reads were recorded on, or a smaller one.
    #[arg(long, value_name = "FILE")]
    pub(crate) prefetch_from: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) image_job: ImageJobArgs,
}

/// What every command that reads an image and stages its layers takes.
#[derive(Debug, clap::Args)]
pub(crate) struct ImageJobArgs {
    /// Platform to pick from an image index.
    #[arg(long, default_value = "linux/amd64")]
    pub(crate) platform: imgstream::oci::manifest::Platform,
    /// Directory for staging layers.
    #[arg(long, default_value = "/var/tmp")]
    pub(crate) scratch: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

#[derive(Debug, clap::Args)]
pub(crate) struct IndexArgs {
    pub(crate) image: String,
    /// Keep the indexes in the local cache (--cache-dir) instead of publishing them beside
    /// the image (air-gapped nodes, or an image one cannot push to).
    #[arg(long)]
    pub(crate) local: bool,
    /// With --local: the cache directory of the agent or mount that will serve the image.
    #[arg(long, default_value = "/var/lib/imgstream/cache")]
    pub(crate) cache_dir: PathBuf,
    /// Uncompressed bytes between checkpoints (placed inside deflate blocks, so spans are
    /// this long whatever the blocks): a miss fetches and inflates a whole span, and needs
    /// the bytes of its checkpoint's 32 KiB window that the span refers to. Published, the
    /// windows go in a blob of their own beside the index and each miss fetches its span's
    /// window with it: default 128K (on the e2e bench's image, 64K spans fetched fewer bytes
    /// but started later). With --local the windows stay in the index, which a mount holds
    /// in memory: default 1M (1.5 % of the bench's layer; 2.7 % at 512K).
    #[arg(long)]
    pub(crate) span: Option<ByteSize>,
    /// Layers smaller than this (compressed) get no index: a mount downloads them whole.
    /// Through an index, a read of one would fetch the index and then spans that are much
    /// of the layer: one request more.
    #[arg(long, default_value = "1M")]
    pub(crate) min_layer: ByteSize,
    /// Index every platform of a multi-platform image (each platform's manifest gets its
    /// own indexes), not only --platform.
    #[arg(long)]
    pub(crate) all_platforms: bool,
    #[command(flatten)]
    pub(crate) image_job: ImageJobArgs,
}

impl TryFrom<IndexArgs> for imgstream::convert::IndexJob {
    type Error = anyhow::Error;

    fn try_from(args: IndexArgs) -> anyhow::Result<Self> {
        use imgstream::image::gzip::{BuildOptions, MAX_SPAN, MIN_SPAN};
        let build = match args.span {
            Some(span) => {
                anyhow::ensure!(
                    (MIN_SPAN..=MAX_SPAN).contains(&span.0),
                    "--span {span}: between 64K and 64M"
                );
                BuildOptions { span: span.0 }
            }
            None if args.local => BuildOptions::held(),
            None => BuildOptions::published(),
        };
        Ok(Self {
            image: ImageRef::parse(&args.image).context("IMAGE")?,
            platform: args.image_job.platform,
            all_platforms: args.all_platforms,
            build,
            min_layer: args.min_layer.0,
            local: args.local,
            cache_dir: args.cache_dir,
            scratch_parent: args.image_job.scratch,
            http: HttpConfig::try_from(args.image_job.registry)?,
        })
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct MountArgs {
    pub(crate) image: String,
    pub(crate) mountpoint: PathBuf,
    /// `merged` (all layers, whiteouts applied) or `layer:N` (one layer, overlayfs lower form).
    #[arg(long, default_value = "merged")]
    pub(crate) view: imgstream::fs::View,
    /// Record every file read while mounted (layer, path, offset, size; JSON lines) and
    /// write them to FILE at unmount: run a workload's start on the mount, then give FILE
    /// to `imgstream convert --prefetch-from`. Readahead is off while recording (unless
    /// --fuse-readahead-kb says otherwise), so what is recorded is what was read.
    #[arg(long, value_name = "FILE")]
    pub(crate) record_reads: Option<PathBuf>,
    /// Serve `/metrics` and `/healthz` on this address (e.g. 127.0.0.1:9465) while the
    /// image is served: fetches, cache and (serve-vhost) virtio-fs figures.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub(crate) serving: ServingArgs,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ServeVhostArgs {
    pub(crate) image: String,
    /// The vhost-user socket to listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub(crate) socket: PathBuf,
    /// The tag offered to VMMs that read it from the backend (at most 36 bytes); QEMU's
    /// vhost-user-fs-pci takes its own `tag=` instead, which must match.
    #[arg(long)]
    pub(crate) tag: Option<String>,
    /// Request queues offered to the guest.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub(crate) request_queues: u64,
    /// Largest virtqueue size the guest may use.
    #[arg(long, default_value_t = 1024, value_parser = parse_queue_size)]
    pub(crate) queue_size: u16,
    /// Serve `/metrics` and `/healthz` on this address (e.g. 127.0.0.1:9465) while the
    /// image is served: fetches, cache and (serve-vhost) virtio-fs figures.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub(crate) serving: ServingArgs,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReportArgs {
    /// The agent's HTTP API.
    #[arg(
        long,
        default_value = "http://127.0.0.1:9464",
        conflicts_with = "store"
    )]
    pub(crate) api: String,
    /// Read the agent's store directly (only while no agent has it open).
    #[arg(long)]
    pub(crate) store: Option<PathBuf>,
    /// Only starts since: Unix seconds, or an age like 15m, 2h, 7d.
    #[arg(long)]
    pub(crate) since: Option<String>,
    #[arg(long)]
    pub(crate) namespace: Option<String>,
    #[arg(long)]
    pub(crate) pod: Option<String>,
    /// Only images whose reference contains this.
    #[arg(long)]
    pub(crate) image: Option<String>,
    /// Compare groups: `namespace`, `image`, `label:KEY`, `image:PATTERN` (images
    /// matching PATTERN against the rest, e.g. streamed against fully pulled), or, with
    /// --pods, `served` (how each pull was served: streamed against unpacked).
    #[arg(long, value_name = "BY")]
    pub(crate) compare: Option<imgstream::report::GroupBy>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write a CDF chart of start -> first log line latencies (one line per compared
    /// group, else per namespace) to FILE; with --pods, each pod's waterfall and a CDF of
    /// its phases.
    #[arg(long, value_name = "FILE")]
    pub(crate) svg: Option<PathBuf>,
    /// Pods' whole startup instead of container starts: the pod cgroup, the sandbox, each
    /// container's pull (from the CRI image proxy), create, start and first log line.
    #[arg(long)]
    pub(crate) pods: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ContainerdConfigArgs {
    /// The agent's snapshotter socket (`imgstream agent --snapshotter-socket`).
    #[arg(long, default_value = "/run/imgstream/snapshotter.sock")]
    pub(crate) socket: PathBuf,
    /// The name containerd knows the snapshotter by.
    #[arg(long, default_value = "imgstream")]
    pub(crate) name: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct FuseKeeperArgs {
    /// The socket, in a directory of the keeper's own (created 0700 if missing): nothing
    /// but the agent has business with it. The keeper needs no capabilities.
    #[arg(long, default_value = "/run/imgstream-keeper/fuse-keeper.sock")]
    pub(crate) socket: PathBuf,
}

/// How an image is served: cache, background download, deadlines (`mount`, `serve-vhost`).
#[derive(Debug, clap::Args)]
pub(crate) struct ServingArgs {
    /// The chunk cache directory, shared by every image and every transport.
    #[arg(long, default_value = "/var/lib/imgstream/cache")]
    pub(crate) cache_dir: PathBuf,
    /// Most bytes the cache directory may take on disk, as `du` counts them (K/M/G
    /// suffixes); no limit by default.
    #[arg(long)]
    pub(crate) cache_limit: Option<ByteSize>,
    /// Write the cache with plain syscalls instead of io_uring.
    #[arg(long)]
    pub(crate) no_io_uring: bool,
    /// Most bytes of chunk data the whole process holds in memory, however many images it
    /// serves: fetches in flight, recently read chunks, writes queued for the cache (K/M/G
    /// suffixes). Fetches wait for room; the background download uses at most 3/4 of it.
    #[arg(long, default_value = "256M", value_parser = memory_budget)]
    pub(crate) memory_budget: ByteSize,
    /// Do not download the whole image in the background.
    #[arg(long)]
    pub(crate) no_background: bool,
    /// Parallel requests of the background download.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub(crate) background_concurrency: u64,
    /// Bandwidth cap of the background download, bytes per second (K/M/G suffixes).
    #[arg(long)]
    pub(crate) background_bandwidth: Option<ByteSize>,
    /// Seconds after a mount before the background download starts (the snapshotter mounts
    /// layers at pull time, moments before the container's first reads; `bench e2e`: 3 s
    /// against none made a cold start 22 % sooner at 0 ms and 7 % at 50 ms). Readers that
    /// fetched most of the image end the wait early.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub(crate) background_delay_secs: u64,
    /// The background download starts a request only when on-demand reads have been quiet
    /// this many milliseconds, so that a starting container has the link to itself.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub(crate) background_quiet_ms: u64,
    /// A read waiting on the network fails with EIO after this many seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) read_deadline_secs: u64,
    /// On a miss, also fetch what follows it in the layer: this many bandwidth-delay
    /// products of the link, as measured from the agent's own requests (0: off).
    #[arg(long, default_value_t = 0.5, value_parser = read_around_bdps)]
    pub(crate) read_around_bdps: f64,
    /// The largest read-around window, which readers that read the layer in order grow to
    /// (K/M suffixes; at most 64M).
    #[arg(long, default_value = "16M", value_parser = read_around_max)]
    pub(crate) read_around_max: ByteSize,
    /// Do not fetch the libraries a program needs (its ELF `DT_NEEDED`, found in the mount)
    /// when a reader reads the program's first bytes; leave them to the loader's reads.
    #[arg(long)]
    pub(crate) no_loader_prefetch: bool,
    /// Do not fetch, while the link idles, the code the loader prefetch finds too large to
    /// fetch whole once a program runs in it (in 64 KiB pieces, one at a time, on a link whose
    /// round trip carries 128 KiB or more, until the background download starts); leave it
    /// to the program's page faults.
    #[arg(long)]
    pub(crate) no_idle_fill: bool,
    /// Do not learn what a layer's first start on this node reads, nor prefetch what was
    /// learned, for layers whose TOC has no prefetch list.
    #[arg(long)]
    pub(crate) no_learn: bool,
    /// Where learned prefetch lists are kept (one small file per layer; default: `learned`
    /// in the cache directory).
    #[arg(long, value_name = "DIR")]
    pub(crate) learned_dir: Option<PathBuf>,
    /// Learned lists and the image's registry: `use` prefetches lists other nodes
    /// published for layers with none on this node; `publish` also publishes what this node
    /// learns, as an OCI artifact attached to the image manifest (referrers API, or the
    /// `sha256-<digest>` tag fallback; needs push access); `off` keeps lists on the node.
    #[arg(long, default_value = "off", value_name = "off|use|publish")]
    pub(crate) share_learned: imgstream::fetch::learn::share::Sharing,
    /// Do not fetch the chunks a layer's TOC lists as read at start (`imgstream convert
    /// --prefetch-from`, or eStargz's prioritised files) as soon as it is mounted.
    #[arg(long)]
    pub(crate) no_prefetch: bool,
    /// The kernel's readahead on FUSE mounts, KiB, until the whole image is cached (then
    /// 4096, what cached reads want). By default 0 for images with a prefetch list (the list
    /// brings what the start reads; readahead would fetch pages it does not) and for
    /// registries far enough that the agent's own guesses are sized for the link (a
    /// bandwidth-delay product of 64 KiB, 5 ms at 100 Mbit/s), the kernel's default back
    /// once a reader reads most of the image; the kernel's default for the others (fewer,
    /// larger requests).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=16384))]
    pub(crate) fuse_readahead_kb: Option<u32>,
    /// Threads serving requests.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub(crate) threads: u64,
    /// What the kernel is asked for at FUSE INIT: all, none, or some of no-open,
    /// no-opendir, readdirplus, max-pages, async-read, cache-symlinks, parallel-dirops.
    #[arg(long, default_value = "all", value_name = "LIST")]
    pub(crate) fuse_options: imgstream::fs::options::FuseOptions,
    /// Do not ask for FUSE passthrough (Linux 6.9+): by default, once a file's chunks are
    /// all cached, the kernel reads it from a backing file in the cache (`files/`) without
    /// asking the agent. Passthrough needs OPEN, so it replaces the no-open option.
    #[arg(long)]
    pub(crate) no_passthrough: bool,
    /// Do not read cached files ahead of a reader going through a directory in listing
    /// order (by default the next 16 files of at most 1 MiB are asked into the page cache).
    #[arg(long)]
    pub(crate) no_dir_readahead: bool,
    /// Platform to pick from an image index.
    #[arg(long, default_value = "linux/amd64")]
    pub(crate) platform: imgstream::oci::manifest::Platform,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

impl ServingArgs {
    pub(crate) fn options(
        self,
        view: imgstream::fs::View,
    ) -> anyhow::Result<(
        imgstream::mount::MountOptions,
        imgstream::registry::http::HttpConfig,
    )> {
        // One budget for the process: set before any fetcher exists.
        imgstream::cache::budget::set_global(self.memory_budget.0);
        let learned = (!self.no_learn).then(|| {
            self.learned_dir
                .clone()
                .unwrap_or_else(|| self.cache_dir.join("learned"))
        });
        let options = imgstream::mount::MountOptions {
            view,
            cache: imgstream::cache::CacheConfig {
                dir: self.cache_dir,
                limit_bytes: self.cache_limit.map(|s| s.0),
                prefer_uring: !self.no_io_uring,
            },
            fs: imgstream::fs::FsConfig {
                read_deadline: Duration::from_secs(self.read_deadline_secs),
                record_reads: false,
                read_around: imgstream::fetch::readaround::ReadAroundConfig {
                    bdp_multiple: self.read_around_bdps,
                    max_window: self.read_around_max.0,
                },
                loader_prefetch: !self.no_loader_prefetch,
                idle_fill: !self.no_idle_fill,
                fuse_options: self.fuse_options,
                passthrough: !self.no_passthrough,
                dir_readahead: !self.no_dir_readahead,
            },
            background: (!self.no_background).then_some(
                imgstream::fetch::background::BackgroundConfig {
                    concurrency: self.background_concurrency as usize,
                    bandwidth: self.background_bandwidth.map(|s| s.0),
                    start_delay: Duration::from_secs(self.background_delay_secs),
                    quiet: Duration::from_millis(self.background_quiet_ms),
                },
            ),
            prefetch: !self.no_prefetch,
            learned,
            share_learned: self.share_learned,
            threads: self.threads as usize,
            readahead_kb: self.fuse_readahead_kb,
            platform: self.platform,
            fetch_totals: None,
            fetch_journal: None,
            image_name: None,
        };
        let http = imgstream::registry::http::HttpConfig::try_from(self.registry)?;
        Ok((options, http))
    }
}

/// How registries are reached (shared by every subcommand that talks to one).
#[derive(Debug, clap::Args)]
pub(crate) struct RegistryArgs {
    /// A registry (host:port) to reach over plain HTTP; repeat for several.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub(crate) insecure: Vec<String>,
    /// A PEM file of extra CA certificates to trust.
    #[arg(long = "ca-file", value_name = "PEM")]
    pub(crate) ca_files: Vec<PathBuf>,
    /// A mirror for a registry, tried before it: HOST=URL (repeat for several, in order).
    #[arg(long = "mirror", value_name = "HOST=URL")]
    pub(crate) mirrors: Vec<String>,
    /// Docker config.json with credentials [default: ~/.docker/config.json].
    #[arg(long)]
    pub(crate) auth_file: Option<PathBuf>,
    /// kubelet's CredentialProviderConfig: its plugins are run for credentials the agent
    /// lacks and to renew ones a registry refuses (needs --image-credential-provider-bin-dir).
    #[arg(
        long = "image-credential-provider-config",
        value_name = "FILE",
        requires = "provider_bin_dir"
    )]
    pub(crate) provider_config: Option<PathBuf>,
    /// Where the credential provider plugins are (kubelet's flag of the same name).
    #[arg(
        long = "image-credential-provider-bin-dir",
        value_name = "DIR",
        requires = "provider_config"
    )]
    pub(crate) provider_bin_dir: Option<PathBuf>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) timeout_secs: u64,
    /// Retries for failed requests (connection errors, timeouts, 5xx).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub(crate) retries: u32,
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
        // The binary, not the library, reads the environment: docker's default location.
        config.auth_file = args.auth_file.or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
        });
        config.timeout = Duration::from_secs(args.timeout_secs);
        config.retries = args.retries;
        if let (Some(file), Some(bin_dir)) = (args.provider_config, args.provider_bin_dir) {
            let providers = imgstream::registry::provider::CredentialProviders::load(
                &file,
                &bin_dir,
                config.timeout,
            )?;
            config.providers = Some(std::sync::Arc::new(providers));
        }
        Ok(config)
    }
}

/// Smallest and largest `--chunk-size`: the largest is what readers accept.
const CHUNK_SIZES: std::ops::RangeInclusive<u64> = 4096..=imgstream::image::estargz::MAX_CHUNK;

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n.is_power_of_two() && n >= 2 => Ok(n),
        _ => Err(format!(
            "{s:?}: a queue size is a power of two from 2 to 32768"
        )),
    }
}

impl TryFrom<AgentArgs> for AgentConfig {
    type Error = anyhow::Error;

    fn try_from(args: AgentArgs) -> anyhow::Result<Self> {
        let (mount, mut http) = args.serving.options(View::Merged)?;
        let image_proxy = match (args.cri_image_proxy, args.cri_upstream) {
            (Some(socket), Some(upstream)) => Some(ImageProxyConfig {
                socket,
                upstream,
                keyring: std::sync::Arc::new(Keyring::new(Duration::from_secs(
                    args.credential_hours * 3600,
                ))),
            }),
            _ => None,
        };
        http.keyring = image_proxy.as_ref().map(|proxy| proxy.keyring.clone());
        let snapshotter =
            args.snapshotter_socket
                .map(|socket| imgstream::snapshotter::SnapshotterConfig {
                    root: args.snapshotter_root,
                    socket,
                    http,
                    mount,
                    keeper: args.fuse_keeper,
                    pull_log: None,
                });
        Ok(AgentConfig {
            detections_out: args.detections,
            poll_interval: Duration::from_millis(args.poll_ms),
            start_latency: !args.no_start_latency,
            first_log_window: Duration::from_secs(args.first_log_window_secs),
            store: (!args.no_store).then_some(args.store),
            store_max_records: args.store_max_records,
            api_addr: (!args.no_api).then_some(args.api_addr),
            cri_sockets: args.cri_sockets,
            kubernetes: args
                .flag_pods_as
                .map(|node_name| imgstream::flag::KubeConfig {
                    node_name,
                    api_url: args.kube_api,
                    min_interval: Duration::from_secs(args.flag_interval_secs),
                }),
            snapshotter,
            image_proxy,
        })
    }
}

impl AgentArgs {
    /// The files and sockets this configuration uses, as JSON (for checking a deployment's
    /// mounts against its arguments).
    pub(crate) fn paths(&self) -> serde_json::Value {
        serde_json::json!({
            "detections": self.detections,
            "store": (!self.no_store).then_some(&self.store),
            "api_addr": (!self.no_api).then_some(self.api_addr.to_string()),
            "cri_socket": self.cri_sockets.first(),
            "snapshotter_socket": self.snapshotter_socket,
            "snapshotter_root": self.snapshotter_socket.as_ref().map(|_| &self.snapshotter_root),
            "fuse_keeper": self.fuse_keeper,
            "cri_image_proxy": self.cri_image_proxy,
            "cri_upstream": self.cri_upstream,
            "cache_dir": &self.serving.cache_dir,
            "flag_pods_as": self.flag_pods_as,
        })
    }
}

impl TryFrom<ConvertArgs> for ConvertJob {
    type Error = anyhow::Error;

    fn try_from(args: ConvertArgs) -> anyhow::Result<Self> {
        anyhow::ensure!(
            CHUNK_SIZES.contains(&args.chunk_size.0),
            "--chunk-size {}: between 4K and 64M",
            args.chunk_size
        );
        let mut prioritized = args.prioritize;
        if let Some(file) = args.prioritize_file {
            let list = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            prioritized.extend(
                list.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        }
        let reads = match args.prefetch_from {
            Some(file) => imgstream::image::reads::read(&file)?,
            None => Vec::new(),
        };
        Ok(ConvertJob {
            src: ImageRef::parse(&args.src).context("SRC")?,
            dst: ImageRef::parse(&args.dst).context("DST")?,
            format: args.format,
            writer: imgstream::image::estargz::WriterOptions {
                chunk_size: args.chunk_size.0,
                ..Default::default()
            },
            prioritized,
            reads,
            platform: args.image_job.platform,
            scratch_parent: args.image_job.scratch,
            http: HttpConfig::try_from(args.image_job.registry)?,
        })
    }
}

impl ServingArgs {
    /// The image job for IMAGE served in `view`.
    pub(crate) fn job(
        self,
        image: &str,
        view: View,
        metrics_addr: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<ImageJob> {
        let (options, http) = self.options(view)?;
        Ok(ImageJob {
            image: ImageRef::parse(image).context("IMAGE")?,
            options,
            http,
            metrics_addr,
        })
    }
}

impl TryFrom<ReportArgs> for ReportJob {
    type Error = anyhow::Error;

    fn try_from(args: ReportArgs) -> anyhow::Result<Self> {
        let since_ns = args
            .since
            .as_deref()
            .map(imgstream::api::parse_since)
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(ReportJob {
            source: match args.store {
                Some(path) => RecordSource::Store(path),
                None => RecordSource::Api(args.api),
            },
            filter: Filter {
                since_ns,
                namespace: args.namespace,
                pod: args.pod,
                image: args.image,
            },
            compare: args.compare,
            json: args.json,
            svg: args.svg,
            pods: args.pods,
        })
    }
}

fn read_around_bdps(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=64.0).contains(&f) => Ok(f),
        _ => Err(format!("{text:?} is not a number from 0 to 64")),
    }
}

fn read_around_max(text: &str) -> Result<ByteSize, String> {
    let size: ByteSize = text.parse().map_err(|e| format!("{e}"))?;
    if size.0 > 64 << 20 {
        return Err(format!("{text} is more than 64M"));
    }
    Ok(size)
}

/// A memory budget: at least 16M (room for a fetch of the largest default chunks and its
/// neighbours), at most 64G.
fn memory_budget(text: &str) -> Result<ByteSize, String> {
    let size: ByteSize = text.parse().map_err(|e| format!("{e}"))?;
    if !(16 << 20..=64 << 30).contains(&size.0) {
        return Err(format!("{text}: a memory budget is from 16M to 64G"));
    }
    Ok(size)
}
