//! `cargo xtask fuzz`: runs the cargo-fuzz targets of agent/fuzz (footer+TOC, whole eStargz
//! blobs, tar streams, manifests, plain gzip layers and their span indexes, zstd:chunked blobs, ELF headers) for a while each, starting from the committed seeds; each
//! check runs on a 2 MiB stack, as in a tokio worker (`imgstream::fuzzing`). A failing input
//! is copied to `agent/fuzz/regressions/<target>`, which `tests/fuzz_seeds.rs` runs with the
//! seeds on every `cargo test`. Installs cargo-fuzz on first use. Not part of `ci`: fuzzing
//! is open-ended by nature.

use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::cmd;

pub(crate) const TARGETS: [&str; 8] = [
    "estargz_toc",
    "estargz_blob",
    "tar_reader",
    "manifest",
    "gzip_layer",
    "gzip_index",
    "zstd_chunked",
    "elf",
];

pub(crate) fn run(root: &Path, only: Option<&str>, seconds: u64) -> anyhow::Result<()> {
    if !cmd::available("cargo-fuzz", "--version") {
        cmd::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
            .context("installing cargo-fuzz failed")?;
    }
    let fuzz_dir = root.join("agent/fuzz");
    for target in TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        eprintln!("fuzz: {target} for {seconds} s");
        cmd::run(
            Command::new("cargo")
                .current_dir(&fuzz_dir)
                .args(["+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .args(["-rss_limit_mb=2048", "-max_len=262144", "-print_final_stats=1"]),
        )
        .with_context(|| {
            let kept = keep_findings(&fuzz_dir, target);
            format!(
                "fuzz target {target} found a failure; the input is under agent/fuzz/artifacts/{target}, \
                 copied to agent/fuzz/regressions/{target} ({kept} file(s)): commit it once fixed, \
                 and tests/fuzz_seeds.rs runs it from then on"
            )
        })?;
    }
    Ok(())
}

/// Copies what libFuzzer left in `artifacts/<target>` to `regressions/<target>`; how many.
fn keep_findings(fuzz_dir: &Path, target: &str) -> usize {
    let into = fuzz_dir.join("regressions").join(target);
    let Ok(entries) = std::fs::read_dir(fuzz_dir.join("artifacts").join(target)) else {
        return 0;
    };
    if std::fs::create_dir_all(&into).is_err() {
        return 0;
    }
    entries
        .flatten()
        .filter(|e| std::fs::copy(e.path(), into.join(e.file_name())).is_ok())
        .count()
}
