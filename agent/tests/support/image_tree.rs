//! A test image with every kind of file, built on disk, tarred with GNU tar, and the merged
//! tree the OCI image spec says its layers make, built with GNU tar and rm: the expectation
//! the FUSE and virtio-fs tests hold a mounted image to.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::Command,
};

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
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

/// The image: a lower layer with every kind of file, an upper one with a whiteout, an
/// opaque directory, a replaced file and new files.
pub fn layer_dirs(dir: &Path) -> Vec<PathBuf> {
    let lower = dir.join("lower");
    super::busybox_rootfs(&lower);
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
pub fn tar_layer(dir: &Path, out: &Path) {
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

pub fn extract(tarball: &Path, into: &Path, extra: &[&str]) {
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
pub fn expected_merged(layers: &[PathBuf], into: &Path) {
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

/// Each directory tarred (with xattrs) as `dir/layerN.tar.gz`, bottom first.
pub fn tar_layers(dirs: &[PathBuf], dir: &Path) -> Vec<PathBuf> {
    dirs.iter()
        .enumerate()
        .map(|(i, d)| {
            let t = dir.join(format!("layer{i}.tar.gz"));
            tar_layer(d, &t);
            t
        })
        .collect()
}
