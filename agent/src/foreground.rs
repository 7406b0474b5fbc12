//! `imgstream mount` and `imgstream serve-vhost`: one image served from the command line until
//! SIGINT or SIGTERM, with the background download's progress on a terminal (a bar) or in
//! the log (every 10 s), and a clean unmount or socket removal at the end. With a metrics
//! address, `/metrics` serves the image's fetch, cache and virtio-fs figures meanwhile.

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::{
    api::{self, ApiState, Metrics},
    cache::{CacheError, ChunkCache},
    fetch::background::Progress,
    fs::virtiofs::{VirtioFsConfig, VirtioFsError, VirtioFsServer},
    mount::{self, MountError, MountOptions, OpenedImage},
    oci::reference::ImageRef,
    registry::{RegistryError, http::HttpConfig, open_sink, open_source},
    shutdown::Shutdown,
};

/// How often the wait loop looks at the signal flag and the progress.
const TICK: Duration = Duration::from_millis(200);
/// How often progress is logged when standard error is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Errors serving an image from the command line.
#[derive(Debug, thiserror::Error)]
pub enum ForegroundError {
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("opening {image}")]
    Source {
        image: String,
        #[source]
        source: RegistryError,
    },
    #[error("opening the cache at {dir}")]
    Cache {
        dir: PathBuf,
        #[source]
        source: CacheError,
    },
    #[error("reading {image}")]
    Open {
        image: String,
        #[source]
        source: MountError,
    },
    #[error("serving {image}")]
    Serve {
        image: String,
        #[source]
        source: MountError,
    },
    #[error("serving {image} over virtio-fs on {socket}")]
    VirtioFs {
        image: String,
        socket: PathBuf,
        #[source]
        source: VirtioFsError,
    },
    #[error("serving metrics")]
    Metrics(#[source] api::ApiError),
    #[error("writing the recorded reads to {0}")]
    WriteReads(PathBuf, #[source] std::io::Error),
}

/// An image to serve, and how.
#[derive(Clone, Debug)]
pub struct ImageJob {
    pub image: ImageRef,
    pub options: MountOptions,
    pub http: HttpConfig,
    /// Serve `/metrics` (and `/healthz`) on this address while the image is served.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// The runtime, cache and opened layers that serving needs.
struct Opened {
    runtime: tokio::runtime::Runtime,
    cache: Arc<ChunkCache>,
    image: OpenedImage,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    /// `self.options`, with the fetcher counting into `metrics`.
    options: MountOptions,
}

impl ImageJob {
    fn open(&self) -> Result<Opened, ForegroundError> {
        let image = self.image.to_string();
        let runtime = tokio::runtime::Runtime::new().map_err(ForegroundError::Runtime)?;
        let source =
            open_source(&self.image, &self.http).map_err(|source| ForegroundError::Source {
                image: image.clone(),
                source,
            })?;
        let cache =
            ChunkCache::open(&self.options.cache).map_err(|source| ForegroundError::Cache {
                dir: self.options.cache.dir.clone(),
                source,
            })?;
        let cache = Arc::new(cache);
        let reference = self.image.manifest_reference().unwrap_or_default();
        let opened = runtime
            .block_on(mount::open_layers(
                source,
                &reference,
                &self.options.platform,
                &cache,
            ))
            .map_err(|source| ForegroundError::Open {
                image: image.clone(),
                source,
            })?;
        let mut opened = opened;
        if self.options.share_learned == crate::fetch::learn::share::Sharing::Publish {
            let sink = open_sink(&self.image, &self.http)
                .map_err(|source| ForegroundError::Source { image, source })?;
            opened.sink = Some(sink);
        }
        let shutdown = Shutdown::new();
        runtime
            .block_on(async { shutdown.trigger_on_signals() })
            .map_err(ForegroundError::Signals)?;
        let metrics = Arc::new(Metrics::default());
        metrics.watch_cache(cache.clone());
        let options = MountOptions {
            fetch_totals: Some(metrics.fetch_totals()),
            fetch_journal: None,
            image_name: None,
            ..self.options.clone()
        };
        if let Some(addr) = self.metrics_addr {
            let state = Arc::new(ApiState {
                metrics: metrics.clone(),
                store: None,
                health: Default::default(),
            });
            runtime
                .block_on(api::serve(addr, state, shutdown.clone()))
                .map_err(ForegroundError::Metrics)?;
        }
        Ok(Opened {
            runtime,
            cache,
            image: opened,
            shutdown,
            metrics,
            options,
        })
    }

    /// Mounts the image at `mountpoint` until a signal, then unmounts it; with
    /// `record_reads`, writes the reads seen while mounted to that file.
    pub fn mount_until_signal(
        &self,
        mountpoint: &Path,
        record_reads: Option<&Path>,
    ) -> Result<(), ForegroundError> {
        // Before the image is fetched: a mistyped mount point fails at once.
        crate::fs::fusedev::check_mountpoint(mountpoint).map_err(|source| {
            ForegroundError::Serve {
                image: self.image.to_string(),
                source: source.into(),
            }
        })?;
        let opened = self.open()?;
        let mut mounted = mount::mount(
            opened.runtime.handle().clone(),
            opened.image,
            opened.cache,
            mountpoint,
            &opened.options,
        )
        .map_err(|source| ForegroundError::Serve {
            image: self.image.to_string(),
            source,
        })?;
        eprintln!(
            "{} mounted at {}; Ctrl-C unmounts",
            self.image,
            mountpoint.display()
        );
        wait_with_progress(&opened.shutdown, mounted.progress.as_deref(), || {
            mounted.ended()
        });
        if mounted.ended() {
            tracing::info!(mountpoint = %mountpoint.display(), "unmounted from outside: exiting");
        }
        mounted.wait_background_stop();
        let reads = mounted.fs.recorded_reads();
        drop(mounted);
        eprintln!("unmounted {}", mountpoint.display());
        if let Some(file) = record_reads {
            crate::image::reads::write(file, &reads)
                .map_err(|e| ForegroundError::WriteReads(file.to_path_buf(), e))?;
            eprintln!("{} reads recorded in {}", reads.len(), file.display());
        }
        Ok(())
    }

    /// Serves the image as a vhost-user virtio-fs device on `socket` until a signal.
    pub fn serve_vhost_until_signal(
        &self,
        socket: &Path,
        config: VirtioFsConfig,
    ) -> Result<(), ForegroundError> {
        let image = self.image.to_string();
        let opened = self.open()?;
        let mut served = mount::serve(
            opened.runtime.handle().clone(),
            opened.image,
            opened.cache,
            &opened.options,
        )
        .map_err(|source| ForegroundError::Serve {
            image: image.clone(),
            source,
        })?;
        let vhost_err = |source| ForegroundError::VirtioFs {
            image: image.clone(),
            socket: socket.to_path_buf(),
            source,
        };
        let mut server =
            VirtioFsServer::bind(served.fs.clone(), socket, config).map_err(vhost_err)?;
        opened.metrics.watch_virtiofs(server.stats.clone());
        tracing::info!(image = %self.image, socket = %socket.display(), files = served.fs.tree().iter().count(), "serving the image over vhost-user virtio-fs");
        eprintln!(
            "{} served over virtio-fs on {}; Ctrl-C stops",
            self.image,
            socket.display()
        );
        let result = server.run(&opened.shutdown);
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
        result.map_err(vhost_err)?;
        eprintln!("stopped serving on {}", socket.display());
        Ok(())
    }
}

/// Waits for `shutdown`, or for `ended` (the mount gone from outside), showing the
/// background download's progress meanwhile.
fn wait_with_progress(shutdown: &Shutdown, progress: Option<&Progress>, ended: impl Fn() -> bool) {
    let bar = (std::io::stderr().is_terminal() && progress.is_some()).then(|| {
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
    let mut last_log = Instant::now();
    while !shutdown.is_triggered() && !ended() {
        std::thread::sleep(TICK);
        let Some(progress) = progress else {
            continue;
        };
        let (done, total) = (
            progress.bytes_done.load(Ordering::Relaxed),
            progress.bytes_total.load(Ordering::Relaxed),
        );
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        } else if last_log.elapsed() > LOG_EVERY && !progress.finished.load(Ordering::Relaxed) {
            tracing::info!(done, total, "background download");
            last_log = Instant::now();
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
