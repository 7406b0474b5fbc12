//! Builds agent-ebpf's kernel programs for `bpfel-unknown-none` with the nightly toolchain and
//! `-Z build-std=core` (aya-build), into `OUT_DIR/imgstream-probes`, which `probes` embeds.
//! Needs what `cargo xtask setup` installs: the nightly's `rust-src` and `bpf-linker`.
//! Also generates the containerd snapshot service's gRPC server from `proto/snapshots.proto`
//! (tonic; needs `protoc`, which setup installs).

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/snapshots.proto"], &["proto"])
        .context("generating the snapshot service from proto/snapshots.proto (needs protoc: `cargo xtask setup`)")?;
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../agent-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("agent-ebpf path is not UTF-8")?;

    if std::process::Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!(
            "bpf-linker not found on PATH: run `cargo xtask setup` first (it builds bpf-linker against the nightly's LLVM)"
        );
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: "imgstream-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs (agent-ebpf) failed; `cargo xtask setup` installs the toolchain they need")
}
