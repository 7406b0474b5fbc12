//! `cargo xtask build-ebpf`: builds agent-ebpf's programs on their own, the way
//! `agent/build.rs` does through aya-build, and shows what the object holds. For looking at
//! the object (`readelf`, `bpftool prog load`); building the agent needs no such step.

use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::cmd;

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    let target_dir = root.join("target/ebpf");
    cmd::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["+nightly", "build", "-Z", "build-std=core", "--release"])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-p",
                "imgstream-ebpf",
                "--bins",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            // The same flags aya-build passes: target arch cfg, debug info, BTF.
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
            ),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask setup` installs rust-src and bpf-linker",
    )?;
    let object = target_dir.join("bpfel-unknown-none/release/imgstream-probes");
    let size = std::fs::metadata(&object)
        .with_context(|| format!("no object at {}", object.display()))?
        .len();
    println!("{} ({size} bytes)", object.display());
    let sections = cmd::output(Command::new("readelf").args(["-SW"]).arg(&object))?;
    for line in String::from_utf8_lossy(&sections.stdout).lines() {
        if ["tracepoint", "maps", "license", ".BTF"]
            .iter()
            .any(|s| line.contains(s))
        {
            println!("  {}", line.trim());
        }
    }
    Ok(())
}
