//! The `imgstream` binary: arguments -> configuration -> the library. Argument structs and
//! their conversions live in `args`; this file only dispatches.

mod args;

use std::{io::IsTerminal, process::ExitCode};

use anyhow::Context as _;
use args::{
    Args, Command, ContainerdConfigArgs, FuseKeeperArgs, MountArgs, SelftestArgs, ServeVhostArgs,
};
use clap::Parser;
use imgstream::{
    config::AgentConfig, convert::ConvertJob, fs::View, report::ReportJob, selftest,
    shutdown::Shutdown,
};

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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Agent(args) => {
            if args.print_paths {
                println!("{}", serde_json::to_string_pretty(&args.paths())?);
                return Ok(ExitCode::SUCCESS);
            }
            let config = AgentConfig::try_from(args)?;
            runtime()?.block_on(async {
                let shutdown = Shutdown::new();
                shutdown
                    .trigger_on_signals()
                    .context("installing signal handlers")?;
                imgstream::agent::run(config, shutdown)
                    .await
                    .context("agent")
            })?;
        }
        Command::Selftest(SelftestArgs { workdir, json }) => {
            let helper = std::env::current_exe().context("locating the imgstream binary")?;
            let report =
                selftest::run(&selftest::Options { helper, workdir }).context("selftest")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text());
            }
            if !report.passed() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Convert(args) => {
            let json = args.image_job.json;
            let job = ConvertJob::try_from(args)?;
            let (src, dst) = (job.src.to_string(), job.dst.to_string());
            let report = runtime()?
                .block_on(job.run())
                .with_context(|| format!("converting {src} to {dst}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text(&dst));
            }
        }
        Command::Index(args) => {
            let json = args.image_job.json;
            let job = imgstream::convert::IndexJob::try_from(args)?;
            let image = job.image.to_string();
            let report = runtime()?
                .block_on(job.run())
                .with_context(|| format!("indexing {image}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text());
            }
        }
        Command::Mount(MountArgs {
            image,
            mountpoint,
            view,
            record_reads,
            metrics_addr,
            serving,
        }) => {
            let mut job = serving.job(&image, view, metrics_addr)?;
            if record_reads.is_some() {
                job.options.fs.record_reads = true;
                job.options.readahead_kb.get_or_insert(0);
            }
            job.mount_until_signal(&mountpoint, record_reads.as_deref())?;
        }
        Command::ServeVhost(ServeVhostArgs {
            image,
            socket,
            tag,
            request_queues,
            queue_size,
            metrics_addr,
            serving,
        }) => {
            let mut job = serving.job(&image, View::Merged, metrics_addr)?;
            // Backing files are a /dev/fuse connection's; a guest's kernel has none of ours.
            job.options.fs.passthrough = false;
            let config = imgstream::fs::virtiofs::VirtioFsConfig {
                request_queues: request_queues as usize,
                queue_size,
                request_threads: job.options.threads,
                tag,
            };
            job.serve_vhost_until_signal(&socket, config)?;
        }
        Command::Report(args) => {
            let job = ReportJob::try_from(args)?;
            runtime()?.block_on(job.run())?;
        }
        Command::FuseKeeper(FuseKeeperArgs { socket }) => {
            let shutdown = Shutdown::new();
            // One worker thread drives the signal task while keeper::run blocks this one (a
            // current-thread runtime would never run it again, and SIGTERM would go unheard).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime
                .block_on(async { shutdown.trigger_on_signals() })
                .context("installing signal handlers")?;
            imgstream::fs::keeper::run(&socket, &shutdown)
                .with_context(|| format!("serving {}", socket.display()))?;
        }
        Command::ContainerdConfig(ContainerdConfigArgs { socket, name }) => {
            print!(
                "{}",
                imgstream::snapshotter::containerd_config(&name, &socket)
            );
        }
        Command::SelftestHelper(_) => unreachable!("handled before logging is set up"),
    }
    Ok(ExitCode::SUCCESS)
}
