//! The lazy image filesystem through a real FUSE mount: the tree `imgstream mount` shows must
//! equal a GNU tar extraction of the same image (merged view with OCI whiteouts applied, and
//! one layer in overlayfs form), down to modes, owners, times, link targets, device numbers,
//! xattrs, hard links and every byte of every file.

mod support;

use std::{
    collections::BTreeMap,
    ffi::CString,
    os::unix::{
        ffi::OsStrExt,
        fs::{FileTypeExt, MetadataExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use imgstream::image::digest::Digest;
use support::Registry;

const IMGSTREAM: &str = env!("CARGO_BIN_EXE_imgstream");

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings and a buffer that outlive the call.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: the buffer is writable for its length.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 4096];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len >= 0 {
            value.truncate(len as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), value);
        }
    }
    out
}

/// The image: a lower layer with every kind of file, an upper one with a whiteout, an
/// opaque directory, a replaced file and new files.
fn layer_dirs(dir: &Path) -> Vec<PathBuf> {
    let lower = dir.join("lower");
    support::busybox_rootfs(&lower);
    std::fs::create_dir_all(lower.join("opt/app/lib")).unwrap();
    std::fs::write(lower.join("opt/app/lib/old.so"), b"old library").unwrap();
    std::fs::write(lower.join("opt/app/config"), b"v1").unwrap();
    std::fs::write(lower.join("etc/remove-me"), b"gone in the upper layer").unwrap();
    let big: Vec<u8> = (0..2_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
        .collect();
    std::fs::create_dir_all(lower.join("usr/lib")).unwrap();
    std::fs::write(lower.join("usr/lib/big.bin"), &big).unwrap();
    std::fs::hard_link(
        lower.join("usr/lib/big.bin"),
        lower.join("usr/lib/big-hardlink.bin"),
    )
    .unwrap();
    std::fs::write(lower.join("usr/lib/empty"), b"").unwrap();
    std::os::unix::fs::symlink("../lib/big.bin", lower.join("usr/big-symlink")).unwrap();
    set_xattr(
        &lower.join("bin/busybox"),
        "security.capability",
        &[
            1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    set_xattr(&lower.join("etc/hostname"), "user.imgstream", b"hello");
    for (cmd, args) in [
        ("mknod", vec!["dev/null", "c", "1", "3"]),
        ("mknod", vec!["dev/loop0", "b", "7", "0"]),
        ("mkfifo", vec!["tmp/fifo"]),
        ("chmod", vec!["1777", "tmp"]),
        ("chmod", vec!["4755", "usr/lib/empty"]),
        ("chown", vec!["1000:1001", "opt/app/config"]),
    ] {
        let status = Command::new(cmd)
            .args(&args)
            .current_dir(&lower)
            .status()
            .unwrap();
        assert!(status.success(), "{cmd} {args:?}");
    }
    let upper = dir.join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::create_dir_all(upper.join("opt/app/lib")).unwrap();
    std::fs::write(upper.join("etc/.wh.remove-me"), b"").unwrap();
    std::fs::write(upper.join("opt/app/lib/.wh..wh..opq"), b"").unwrap();
    std::fs::write(upper.join("opt/app/lib/new.so"), b"new library").unwrap();
    std::fs::write(upper.join("opt/app/config"), b"v2").unwrap();
    std::fs::write(upper.join("etc/motd"), b"streamed\n").unwrap();
    vec![lower, upper]
}

/// Tars a layer with its xattrs.
fn tar_layer(dir: &Path, out: &Path) {
    let status = Command::new("tar")
        .args([
            "--format=pax",
            "--sort=name",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
        ])
        .args(["--use-compress-program=gzip -1", "-cf"])
        .arg(out)
        .args(["-C", dir.to_str().unwrap(), "."])
        .status()
        .unwrap();
    assert!(status.success());
}

fn extract(tarball: &Path, into: &Path, extra: &[&str]) {
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("tar")
        .args(["-xzf"])
        .arg(tarball)
        .args(["--numeric-owner", "-p", "--xattrs", "--xattrs-include=*"])
        .args(extra)
        .arg("-C")
        .arg(into)
        .status()
        .unwrap();
    assert!(status.success());
}

/// The merged view as the OCI image spec defines it, built with GNU tar and rm.
fn expected_merged(layers: &[PathBuf], into: &Path) {
    extract(&layers[0], into, &[]);
    for layer in &layers[1..] {
        let listing = Command::new("tar").arg("-tzf").arg(layer).output().unwrap();
        for name in String::from_utf8(listing.stdout).unwrap().lines() {
            let name = name.trim_start_matches("./");
            let (dir, base) = name.rsplit_once('/').unwrap_or(("", name));
            if base == ".wh..wh..opq" {
                for entry in std::fs::read_dir(into.join(dir)).unwrap().flatten() {
                    let _ = std::fs::remove_dir_all(entry.path())
                        .or_else(|_| std::fs::remove_file(entry.path()));
                }
            } else if let Some(hidden) = base.strip_prefix(".wh.") {
                let target = into.join(dir).join(hidden);
                let _ = std::fs::remove_dir_all(&target).or_else(|_| std::fs::remove_file(&target));
            }
        }
        extract(layer, into, &["--exclude=.wh.*"]);
    }
}

/// One layer as an overlayfs lower directory: whiteouts as 0:0 char devices, opaque markers
/// as the trusted.overlay.opaque xattr.
fn expected_layer(layer: &Path, into: &Path) {
    extract(layer, into, &["--exclude=.wh.*"]);
    let listing = Command::new("tar").arg("-tzf").arg(layer).output().unwrap();
    for name in String::from_utf8(listing.stdout).unwrap().lines() {
        let name = name.trim_start_matches("./");
        let (dir, base) = name.rsplit_once('/').unwrap_or(("", name));
        if base == ".wh..wh..opq" {
            set_xattr(&into.join(dir), "trusted.overlay.opaque", b"y");
        } else if let Some(hidden) = base.strip_prefix(".wh.") {
            // The device takes the whiteout entry's time.
            let raw = into.with_extension("raw");
            extract(layer, &raw, &[]);
            let device = into.join(dir).join(hidden);
            let status = Command::new("mknod")
                .arg(&device)
                .args(["c", "0", "0"])
                .status()
                .unwrap();
            assert!(status.success());
            let status = Command::new("chmod")
                .arg("000")
                .arg(&device)
                .status()
                .unwrap();
            assert!(status.success());
            let reference = raw.join(dir).join(base);
            let status = Command::new("touch")
                .arg("-h")
                .arg("-r")
                .arg(reference)
                .arg(&device)
                .status()
                .unwrap();
            assert!(status.success());
        }
    }
    // Creating the whiteouts touched their directories: extract once more to restore the
    // directories' times from the layer.
    extract(layer, into, &["--exclude=.wh.*"]);
}

/// Every path's type, mode, owner, size, mtime, link target, device, xattrs and content.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            let what = if ft.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!(
                    "symlink -> {}",
                    std::fs::read_link(&path).unwrap().display()
                )
            } else if ft.is_file() {
                inodes.entry(meta.ino()).or_default().push(rel.clone());
                format!("file {}", Digest::of(&std::fs::read(&path).unwrap()))
            } else if ft.is_char_device() {
                format!(
                    "char {}:{}",
                    libc::major(meta.rdev()),
                    libc::minor(meta.rdev())
                )
            } else if ft.is_block_device() {
                format!(
                    "block {}:{}",
                    libc::major(meta.rdev()),
                    libc::minor(meta.rdev())
                )
            } else if ft.is_fifo() {
                "fifo".to_string()
            } else {
                "other".to_string()
            };
            let size = if ft.is_dir() { 0 } else { meta.size() };
            let line = format!(
                "{what} mode={:o} owner={}:{} size={size} mtime={} xattrs={:?}",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                meta.mtime(),
                xattrs(&path)
            );
            out.insert(rel, line);
        }
    }
    // Hard links: the names sharing an inode, as one record.
    for names in inodes.into_values().filter(|n| n.len() > 1) {
        let mut names = names;
        names.sort();
        out.insert(format!("hardlinks:{}", names[0]), names.join(" = "));
    }
    out
}

fn assert_same_tree(mounted: &Path, expected: &Path, at_least: usize) {
    let (got, want) = (describe(mounted), describe(expected));
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (path, line) in &want {
        assert_eq!(&got[path], line, "{path}");
    }
    assert!(
        want.len() >= at_least,
        "the comparison covered only {} paths",
        want.len()
    );
}

/// `imgstream mount` as a child process; SIGTERM and wait on drop.
struct Mounted {
    child: Child,
    mountpoint: PathBuf,
}

impl Mounted {
    fn start(image: &str, mountpoint: &Path, cache: &Path, reg: &str, extra: &[&str]) -> Self {
        std::fs::create_dir_all(mountpoint).unwrap();
        let child = Command::new(IMGSTREAM)
            .args(["mount", image])
            .arg(mountpoint)
            .arg("--cache-dir")
            .arg(cache)
            .args(["--insecure-registry", reg])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mounts = || std::fs::read_to_string("/proc/self/mounts").unwrap();
        while !mounts().contains(mountpoint.to_str().unwrap()) {
            assert!(Instant::now() < deadline, "the mount did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            mountpoint: mountpoint.to_path_buf(),
        }
    }

    fn stop(mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "imgstream mount exited with {status}");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(
            !mounts.contains(self.mountpoint.to_str().unwrap()),
            "unmounted on SIGTERM"
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // After a failed assertion: no orphan process, no stale mount.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_image_equals_a_gnu_tar_extraction_in_both_views() {
    support::require_root();
    let scratch = support::scratch("fuse-tree");
    let registry = Registry::start("fuse-tree", None);
    let reg = registry.host();
    let dirs = layer_dirs(&scratch);
    let tarballs: Vec<PathBuf> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let t = scratch.join(format!("layer{i}.tar.gz"));
            tar_layer(d, &t);
            t
        })
        .collect();
    let layout = scratch.join("layout");
    support::build_image_from_tarballs(&layout, "v1", &tarballs, &["/bin/sh"]).await;
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reg}/src/app:v1"),
    );
    support::imgstream(&[
        "convert",
        &format!("{reg}/src/app:v1"),
        &format!("{reg}/esgz/app:v1"),
        "--insecure-registry",
        &reg,
        "--chunk-size",
        "1M",
        "--scratch",
        scratch.to_str().unwrap(),
    ]);

    let image = format!("{reg}/esgz/app:v1");
    let cache = scratch.join("cache");
    let merged = Mounted::start(
        &image,
        &scratch.join("mnt-merged"),
        &cache,
        &reg,
        &["--no-background"],
    );
    let expected = scratch.join("expected-merged");
    expected_merged(&tarballs, &expected);
    assert_same_tree(&merged.mountpoint, &expected, 25);
    merged.stop();

    let upper = Mounted::start(
        &image,
        &scratch.join("mnt-layer1"),
        &cache,
        &reg,
        &["--no-background", "--view", "layer:1"],
    );
    let expected = scratch.join("expected-layer1");
    expected_layer(&tarballs[1], &expected);
    assert_same_tree(&upper.mountpoint, &expected, 8);
    upper.stop();

    // The original, plain gzip image: its layers are downloaded whole before the mount is
    // ready, and the tree is the same.
    let plain = Mounted::start(
        &format!("{reg}/src/app:v1"),
        &scratch.join("mnt-plain"),
        &cache,
        &reg,
        &["--no-background"],
    );
    assert_same_tree(&plain.mountpoint, &scratch.join("expected-merged"), 25);
    plain.stop();
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}
