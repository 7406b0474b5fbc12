//! The guest kernels of the VM tests: Debian's cloud kernels of two series, downloaded with
//! `apt-get download` and unpacked (not installed) into the cache by `setup`.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd;

/// A kernel series of the test matrix.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Series {
    pub(crate) name: &'static str,
    /// Package name = prefix + number + suffix; the highest number available is used.
    prefix: &'static str,
    suffix: &'static str,
}

pub(crate) const SERIES: [Series; 2] = [
    Series {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64-unsigned",
    },
    Series {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-cloud-amd64-unsigned",
    },
];

/// Kernel modules the guest tests need, by name: (config symbol, path under lib/modules/REL).
/// A module whose symbol is `=y` in a kernel's config is built in and skipped there.
const MODULES: [(&str, &str, &str); 1] = [("fuse", "CONFIG_FUSE_FS", "kernel/fs/fuse/fuse.ko")];

/// Modules the guest loads, in order.
pub(crate) const GUEST_MODULES: [&str; 1] = ["fuse"];

/// An unpacked guest kernel.
#[derive(Clone, Debug)]
pub(crate) struct GuestKernel {
    pub(crate) series: &'static str,
    pub(crate) package: String,
    pub(crate) root: PathBuf,
    pub(crate) release: String,
}

impl GuestKernel {
    pub(crate) fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    fn config(&self) -> anyhow::Result<String> {
        let path = self
            .root
            .join("boot")
            .join(format!("config-{}", self.release));
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Module files to load for `wanted`, skipping built-ins; `.ko`, `.ko.xz` or `.ko.zst`.
    pub(crate) fn modules(&self, wanted: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
        let config = self.config()?;
        let mut files = Vec::new();
        for name in wanted {
            let (_, symbol, rel) = MODULES
                .iter()
                .find(|(n, ..)| n == name)
                .with_context(|| format!("no module table entry for {name}"))?;
            match config
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{symbol}=")))
            {
                Some("y") => continue,
                Some("m") => {}
                other => bail!(
                    "{} has {symbol}={other:?}: the guest tests need it",
                    self.package
                ),
            }
            let base = self.root.join("lib/modules").join(&self.release).join(rel);
            let found = ["", ".xz", ".zst"]
                .iter()
                .map(|ext| PathBuf::from(format!("{}{ext}", base.display())))
                .find(|p| p.exists())
                .with_context(|| format!("{} has no {}", self.package, base.display()))?;
            files.push(found);
        }
        Ok(files)
    }
}

fn kernels_dir() -> PathBuf {
    crate::cache_dir().join("kernels")
}

/// The newest unpacked kernel of `series` in the cache, if any.
pub(crate) fn installed(series: &Series) -> Option<GuestKernel> {
    let entries = std::fs::read_dir(kernels_dir()).ok()?;
    entries
        .flatten()
        .filter_map(|e| {
            let package = e.file_name().to_string_lossy().into_owned();
            let number = series.number_of(&package)?;
            e.path()
                .join(".complete")
                .exists()
                .then_some((number, package, e.path()))
        })
        .max_by_key(|(number, ..)| *number)
        .and_then(|(_, package, root)| unpacked(series, package, root).ok())
}

fn unpacked(series: &Series, package: String, root: PathBuf) -> anyhow::Result<GuestKernel> {
    let boot = root.join("boot");
    let release = std::fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(String::from)
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    Ok(GuestKernel {
        series: series.name,
        package,
        root,
        release,
    })
}

impl Series {
    fn number_of(&self, package: &str) -> Option<u64> {
        package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?
            .parse()
            .ok()
    }

    /// The newest package of this series that apt knows.
    pub(crate) fn newest_package(&self) -> anyhow::Result<String> {
        let out = cmd::output(Command::new("apt-cache").args(["pkgnames", self.prefix]))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|p| self.number_of(p).map(|n| (n, p.to_string())))
            .max()
            .map(|(_, p)| p)
            .with_context(|| {
                format!(
                    "apt knows no {}N{} package: run `apt-get update`, and check that \
                     bookworm and bookworm-updates are in the apt sources",
                    self.prefix, self.suffix
                )
            })
    }
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

/// Every series' newest cached kernel, or an error naming the fix.
pub(crate) fn all_installed(filter: Option<&str>) -> anyhow::Result<Vec<GuestKernel>> {
    let mut kernels = Vec::new();
    for series in SERIES.iter().filter(|s| filter.is_none_or(|f| s.name == f)) {
        match installed(series) {
            Some(kernel) => kernels.push(kernel),
            None => bail!(
                "no {} guest kernel in {}: run `cargo xtask setup`",
                series.name,
                kernels_dir().display()
            ),
        }
    }
    if kernels.is_empty() {
        bail!("no kernel series matches {filter:?}; known: 6.1, 6.12");
    }
    Ok(kernels)
}
