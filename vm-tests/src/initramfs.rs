//! A writer for initramfs images: the "newc" cpio format the kernel unpacks into its rootfs
//! (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst).
//! Uncompressed: QEMU loads it straight into guest memory, so compression only costs time.

use std::io::{self, Write};

/// Builds an archive in memory, entry by entry.
#[derive(Debug, Default)]
pub struct Initramfs {
    out: Vec<u8>,
    next_ino: u32,
}

impl Initramfs {
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    /// A directory (parents must be added first).
    pub fn dir(&mut self, path: &str) {
        self.entry(path, 0o040_755, 0, &[]);
    }

    /// A regular file with `mode`'s permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, 0o100_000 | (mode & 0o7777), 0, data);
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020_600, (major << 8) | minor, &[]);
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) {
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170_000 == 0o040_000 { 2 } else { 1 },
            0, // mtime: reproducible images
            data.len() as u32,
            0,
            0, // dev major/minor
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0, // checksum (unused by "070701")
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// Appends the trailer and writes the archive.
    pub fn finish(mut self, to: &mut impl Write) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, 0, &[]);
        to.write_all(&self.out)
    }
}

/// The guest programs of the VM tests, static musl binaries built by `cargo xtask vm-test`.
#[derive(Clone, Debug)]
pub struct GuestBinaries {
    /// `imgstream-guest-init`: /init, and the checks test lines run as `/init CHECK ...`.
    pub init: std::path::PathBuf,
    /// The agent, as `/bin/imgstream`.
    pub imgstream: std::path::PathBuf,
}

impl GuestBinaries {
    /// The binaries in `dir` (`target/x86_64-unknown-linux-musl/guest`).
    pub fn in_dir(dir: &std::path::Path) -> Self {
        Self {
            init: dir.join("imgstream-guest-init"),
            imgstream: dir.join("imgstream"),
        }
    }
}

/// A test initramfs for `kernel`: `/init`, `/bin/imgstream`, that kernel's modules the tests
/// need (in load order, listed in /etc/imgstream/modules), the test list (`name: argv` lines,
/// in /etc/imgstream/tests) and any `extra` files (absolute paths; their parent directories
/// are made).
pub fn test_image(
    kernel: &crate::kernels::GuestKernel,
    bins: &GuestBinaries,
    tests: &str,
    extra: &[(&str, &[u8])],
) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let read = |p: &std::path::Path| {
        std::fs::read(p).with_context(|| {
            format!(
                "reading {}: build it with `cargo xtask vm-test`",
                p.display()
            )
        })
    };
    let mut image = Initramfs::new();
    let mut made = std::collections::HashSet::new();
    for dir in [
        "/bin",
        "/dev",
        "/etc",
        "/etc/imgstream",
        "/lib",
        "/lib/modules",
        "/mnt",
        "/proc",
        "/sys",
        "/tmp",
    ] {
        image.dir(dir);
        made.insert(dir.to_string());
    }
    // The kernel opens /dev/console as init's stdin, stdout and stderr.
    image.char_dev("/dev/console", 5, 1);
    image.file("/init", 0o755, &read(&bins.init)?);
    image.file("/bin/imgstream", 0o755, &read(&bins.imgstream)?);
    let mut load_order = String::new();
    for module in kernel.modules(&crate::kernels::GUEST_MODULES)? {
        let name = module
            .file_name()
            .context("module path")?
            .to_string_lossy()
            .into_owned();
        let guest_path = format!("/lib/modules/{name}");
        image.file(&guest_path, 0o644, &read(&module)?);
        load_order.push_str(&guest_path);
        load_order.push('\n');
    }
    image.file("/etc/imgstream/modules", 0o644, load_order.as_bytes());
    image.file("/etc/imgstream/tests", 0o644, tests.as_bytes());
    for (path, data) in extra {
        let mut parents: Vec<&str> = std::path::Path::new(path)
            .ancestors()
            .skip(1)
            .filter_map(|p| p.to_str())
            .filter(|p| p.len() > 1)
            .collect();
        parents.reverse();
        for parent in parents {
            if made.insert(parent.to_string()) {
                image.dir(parent);
            }
        }
        image.file(path, 0o644, data);
    }
    let mut out = Vec::new();
    image.finish(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GNU cpio reads back what the writer produced, names, modes and contents intact.
    #[test]
    fn gnu_cpio_lists_the_archive() {
        let mut image = Initramfs::new();
        image.dir("/etc");
        image.file("/etc/hello", 0o644, b"hello\n");
        image.file("/init", 0o755, b"#!/bin/sh\n");
        image.char_dev("/console", 5, 1);
        let mut bytes = Vec::new();
        image.finish(&mut bytes).unwrap();
        assert_eq!(bytes.len() % 4, 0);

        let Ok(mut cpio) = std::process::Command::new("cpio")
            .args(["-itv", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            panic!("cpio is needed for this test: cargo xtask setup installs it");
        };
        cpio.stdin.take().unwrap().write_all(&bytes).unwrap();
        let listing = String::from_utf8(cpio.wait_with_output().unwrap().stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 4, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" etc"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("-rw-r--r--")
                && lines[1].contains(" 6 ")
                && lines[1].ends_with(" etc/hello"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"),
            "{listing}"
        );
        assert!(
            lines[3].starts_with("crw-------")
                && lines[3].contains("5,")
                && lines[3].ends_with(" console"),
            "{listing}"
        );
    }
}
