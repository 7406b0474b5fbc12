//! The guest kernels of the VM tests: Debian's cloud kernels of two series, downloaded with
//! `apt-get download` and unpacked (not installed) into the cache by `setup`.

use std::process::Command;

use anyhow::Context as _;

use crate::cmd;

pub(crate) use imgstream_vm_tests::kernels::{GuestKernel, SERIES, Series, installed};
use imgstream_vm_tests::kernels::{kernels_dir, unpacked};

/// The newest package of `series` that apt knows.
pub(crate) fn newest_package(series: &Series) -> anyhow::Result<String> {
    let out = cmd::output(Command::new("apt-cache").args(["pkgnames", series.prefix]))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|p| series.number_of(p).map(|n| (n, p.to_string())))
        .max()
        .map(|(_, p)| p)
        .with_context(|| {
            format!(
                "apt knows no {}N{} package: run `apt-get update`, and check that \
                 bookworm and bookworm-updates are in the apt sources",
                series.prefix, series.suffix
            )
        })
}

/// Downloads and unpacks `package` into the cache.
pub(crate) fn download(series: &Series, package: &str) -> anyhow::Result<GuestKernel> {
    let root = kernels_dir().join(package);
    let staging = kernels_dir().join(format!(".download-{package}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    cmd::output(
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(&staging),
    )
    .with_context(|| format!("downloading {package}: check the network path to Debian's mirror"))?;
    let deb = std::fs::read_dir(&staging)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", staging.display()))?;
    let _ = std::fs::remove_dir_all(&root);
    cmd::output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::remove_dir_all(&staging)?;
    std::fs::write(root.join(".complete"), package)?;
    unpacked(series, package.to_string(), root)
}
