//! The guest kernels of the VM tests: Debian's cloud kernels of two series, unpacked (not
//! installed) into `~/.cache/imgstream/kernels` by `cargo xtask setup`, and the modules each
//! needs loaded for the tests (a module built into a kernel is skipped there).

use std::path::PathBuf;

use anyhow::{Context as _, bail};

/// A kernel series of the test matrix.
#[derive(Clone, Copy, Debug)]
pub struct Series {
    pub name: &'static str,
    /// Package name = prefix + number + suffix; the highest number available is used.
    pub prefix: &'static str,
    pub suffix: &'static str,
}

pub const SERIES: [Series; 2] = [
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

/// Kernel modules the guest tests may need: (name, config symbol, path under
/// lib/modules/REL). A module whose symbol is `=y` in a kernel's config is built in there.
const MODULES: [(&str, &str, &str); 8] = [
    (
        "virtio_ring",
        "CONFIG_VIRTIO",
        "kernel/drivers/virtio/virtio_ring.ko",
    ),
    ("virtio", "CONFIG_VIRTIO", "kernel/drivers/virtio/virtio.ko"),
    (
        "virtio_pci_modern_dev",
        "CONFIG_VIRTIO_PCI_LIB",
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    ),
    (
        "virtio_pci_legacy_dev",
        "CONFIG_VIRTIO_PCI_LIB_LEGACY",
        "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    ),
    (
        "virtio_pci",
        "CONFIG_VIRTIO_PCI",
        "kernel/drivers/virtio/virtio_pci.ko",
    ),
    ("fuse", "CONFIG_FUSE_FS", "kernel/fs/fuse/fuse.ko"),
    ("virtiofs", "CONFIG_VIRTIO_FS", "kernel/fs/fuse/virtiofs.ko"),
    (
        "overlay",
        "CONFIG_OVERLAY_FS",
        "kernel/fs/overlayfs/overlay.ko",
    ),
];

/// The modules every guest loads, in dependency order.
pub const GUEST_MODULES: [&str; 8] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "fuse",
    "virtiofs",
    "overlay",
];

/// An unpacked guest kernel.
#[derive(Clone, Debug)]
pub struct GuestKernel {
    pub series: &'static str,
    pub package: String,
    pub root: PathBuf,
    pub release: String,
}

impl GuestKernel {
    pub fn vmlinuz(&self) -> PathBuf {
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

    /// Whether the kernel was built with FUSE passthrough (`CONFIG_FUSE_PASSTHROUGH=y`, Linux
    /// 6.9 and later).
    pub fn has_fuse_passthrough(&self) -> anyhow::Result<bool> {
        Ok(self
            .config()?
            .lines()
            .any(|l| l == "CONFIG_FUSE_PASSTHROUGH=y"))
    }

    /// Module files to load for `wanted`, skipping built-ins; `.ko`, `.ko.xz` or `.ko.zst`.
    pub fn modules(&self, wanted: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
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

/// imgstream's cache of downloaded tools and kernels: `$IMGSTREAM_CACHE` or
/// `~/.cache/imgstream`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMGSTREAM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/imgstream")
}

pub fn kernels_dir() -> PathBuf {
    cache_dir().join("kernels")
}

impl Series {
    pub fn number_of(&self, package: &str) -> Option<u64> {
        package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?
            .parse()
            .ok()
    }
}

/// The newest unpacked kernel of `series` in the cache, if any.
pub fn installed(series: &Series) -> Option<GuestKernel> {
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

/// The kernel unpacked at `root` from `package`.
pub fn unpacked(series: &Series, package: String, root: PathBuf) -> anyhow::Result<GuestKernel> {
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

/// Every series' newest cached kernel, or an error naming the fix.
pub fn all_installed(filter: Option<&str>) -> anyhow::Result<Vec<GuestKernel>> {
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
