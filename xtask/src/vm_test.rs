//! `cargo xtask vm-test`: the guest tests, on real guest kernels under QEMU.
//!
//! 1. Builds the guest programs as static musl binaries: `imgstream` (the agent, with its eBPF
//!    object) and `imgstream-guest-init` (vm-tests/: PID 1 in the guest, and its checks).
//! 2. Runs the VM scenarios (agent/tests/virtiofs_vm.rs), an ignored cargo test that finds
//!    those binaries through `IMGSTREAM_GUEST_BIN_DIR`: a registry, `imgstream serve-vhost`
//!    backends and a host FUSE mount on this side; on the other, each guest kernel booted
//!    with `-accel tcg` (KVM hangs on this machine), mounting the image over
//!    vhost-user-fs-pci, checking it, using it as an overlayfs lower layer, running the
//!    rename-ENXIO detector's selftest, mounting the image with the agent's own FUSE
//!    filesystem on that kernel, and printing a verdict line the host reads.
//!
//! A FAIL verdict, a kernel panic, a guest that exits without a verdict and one that outlives
//! the timeout all fail the run. Console logs stay in `target/vm-tests/`.

use std::{path::Path, process::Command, time::Duration};

use anyhow::Context as _;
use imgstream_vm_tests::{initramfs::GuestBinaries, kernels};

use crate::cmd;

pub(crate) const MUSL: &str = "x86_64-unknown-linux-musl";

/// What to run.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Options<'a> {
    /// Only kernels of this series (`6.1`, `6.12`).
    pub(crate) kernel: Option<&'a str>,
    /// Seconds one guest may run before it counts as hung.
    pub(crate) timeout: Option<Duration>,
    /// Also measure the guest's read throughput against the host's, with a larger file.
    pub(crate) bench: bool,
}

pub(crate) fn run(root: &Path, options: Options<'_>) -> anyhow::Result<()> {
    // Fail early, with the fix, when a kernel is missing.
    kernels::all_installed(options.kernel)?;
    let bins = build_guest_binaries(root)?;
    let dir = bins.init.parent().context("guest binary directory")?;
    let mut test = Command::new("cargo");
    test.current_dir(root)
        .args(["test", "-p", "imgstream-agent", "--test", "virtiofs_vm"])
        .args(["--", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("IMGSTREAM_GUEST_BIN_DIR", dir)
        .env("IMGSTREAM_VM_LOG_DIR", root.join("target/vm-tests"));
    if let Some(kernel) = options.kernel {
        test.env("IMGSTREAM_GUEST_KERNEL", kernel);
    }
    if let Some(timeout) = options.timeout {
        test.env(
            "IMGSTREAM_GUEST_TIMEOUT_SECS",
            timeout.as_secs().to_string(),
        );
    }
    if options.bench {
        test.env("IMGSTREAM_VIRTIOFS_BENCH", "1");
    }
    cmd::run(&mut test).context("the VM tests failed (console logs in target/vm-tests/)")
}

fn build_guest_binaries(root: &Path) -> anyhow::Result<GuestBinaries> {
    cmd::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--profile", "guest", "--target", MUSL])
            .args(["-p", "imgstream-agent", "--bin", "imgstream"])
            .args(["-p", "imgstream-vm-tests", "--bin", "imgstream-guest-init"]),
    )
    .context("building the static guest binaries (needs the musl target: `cargo xtask setup`)")?;
    Ok(GuestBinaries::in_dir(
        &root.join("target").join(MUSL).join("guest"),
    ))
}
