//! `cargo xtask`: imgstream's build and test orchestration. Never a runtime dependency.
//!
//! - `setup`      install what this machine needs (idempotent; quick when done)
//! - `build-ebpf` build the eBPF object alone and list its programs and maps
//! - `vm-test`    boot each guest kernel under QEMU with the guest tests in an initramfs
//! - `ci`         setup, then every check and test CI runs (the README's test command)
//! - `demo`       setup, then the main job on its built-in default
//! - `fuzz`       the cargo-fuzz targets of agent/fuzz, for a while each
//! - `bench fs`   the lazy filesystem's benchmarks, as ratios against baselines
//! - `bench fuse` cached reads through FUSE vs local disk, each FUSE option on its own
//! - `bench virtiofs` a guest's virtio-fs reads against the host's FUSE reads, as a ratio
//! - `bench probes` the eBPF probes' overhead on write- and exec-heavy workloads
//! - `bench e2e`  PullImage -> first log line of a ~340 MB image at 0/20/50 ms round trip:
//!   full pull, imgstream (defaults, learned and recorded lists), stargz-snapshotter

mod build_ebpf;
mod ci;
mod cmd;
mod demo;
mod fuzz;
mod kernels;
mod setup;
mod vm_test;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "imgstream build and test orchestration")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install Debian packages, the nightly's rust-src, bpf-linker and the guest kernels.
    Setup,
    /// Build the eBPF programs alone (the agent's build does this itself) and list them.
    BuildEbpf,
    /// Run the guest tests under QEMU on each guest kernel.
    VmTest {
        /// Only kernels whose series starts with this (e.g. `6.1`, `6.12`).
        #[arg(long)]
        kernel: Option<String>,
        /// Seconds one guest may run before it counts as hung.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Set up, then run everything CI runs: fmt, clippy, unit tests, root-only host tests,
    /// VM tests.
    Ci,
    /// Set up, then show the rename-ENXIO detector catching a container's failing `mv`.
    Demo,
    /// Run a benchmark: `fs` (the lazy filesystem against its baselines), `fuse` (cached
    /// reads through FUSE against local disk, each FUSE option on its own), `virtiofs` (a
    /// guest's reads through virtio-fs against the host's through FUSE), `probes` (the eBPF
    /// probes' overhead on write- and exec-heavy work), `e2e` (PullImage to first log line,
    /// streamed against pulled, behind a 100 Mbit/s link). Needs root.
    Bench {
        #[arg(value_parser = ["fs", "fuse", "virtiofs", "probes", "e2e"])]
        suite: String,
    },
    /// Run the fuzz targets (eStargz footer+TOC and blobs, tar streams, manifests, gzip and
    /// zstd:chunked layers, ELF headers).
    Fuzz {
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = workspace_root();
    match args.command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => build_ebpf::run(&root),
        Command::VmTest { kernel, timeout } => vm_test::run(
            &root,
            vm_test::Options {
                kernel: kernel.as_deref(),
                timeout: Some(std::time::Duration::from_secs(timeout)),
                bench: false,
            },
        ),
        Command::Ci => ci::run(&root),
        Command::Demo => demo::run(&root),
        Command::Bench { suite } if suite == "virtiofs" => vm_test::run(
            &root,
            vm_test::Options {
                kernel: Some("6.12"),
                timeout: None,
                bench: true,
            },
        ),
        Command::Bench { suite } if suite == "e2e" => {
            // Optimised like a deployed agent: FUSE and decompression in a debug build would
            // measure the build, not the design.
            cmd::run(
                std::process::Command::new("cargo")
                    .current_dir(&root)
                    .args([
                        "build",
                        "--release",
                        "-p",
                        "imgstream-agent",
                        "--bin",
                        "imgstream",
                        "--example",
                        "bench_e2e",
                    ]),
            )?;
            cmd::run(&mut std::process::Command::new(
                root.join("target/release/examples/bench_e2e"),
            ))
        }
        Command::Bench { suite } => cmd::run(
            std::process::Command::new("cargo")
                .current_dir(&root)
                .args(["bench", "-p", "imgstream-agent", "--bench", &suite]),
        ),
        Command::Fuzz { target, seconds } => fuzz::run(&root, target.as_deref(), seconds),
    }
}

fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Where setup keeps what it downloads and builds: `$IMGSTREAM_CACHE`, else
/// `~/.cache/imgstream`.
pub(crate) use imgstream_vm_tests::kernels::cache_dir;
