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
    /// Internal: the processes `selftest` runs.
    #[command(hide = true, subcommand)]
    SelftestHelper(selftest::helper::HelperCommand),
}

fn main() -> ExitCode {
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
        } => {
            let config = AgentConfig {
                detections_out: detections,
                poll_interval: Duration::from_millis(poll_ms),
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
        Command::SelftestHelper(_) => unreachable!("handled before logging is set up"),
    }
}
