//! Test images: layers tarred by GNU tar, OCI layouts written with the library, busybox
//! root filesystems, skopeo copies, incompressible data.

use super::*;

/// Tars and gzips `dir` with GNU tar (numeric owner root), as a plain OCI layer.
pub fn gnu_tar_gz(dir: &Path, out: &Path) {
    // gzip -1: test layers are built for their content, not their size.
    let status = Command::new("tar")
        .args([
            "--format=pax",
            "--sort=name",
            "--numeric-owner",
            "--use-compress-program=gzip -1",
            "-cf",
        ])
        .arg(out)
        .args(["-C", dir.to_str().unwrap(), "."])
        .status()
        .unwrap();
    assert!(status.success());
}

fn gunzip_digest(path: &Path) -> Digest {
    let mut hasher = imgstream::oci::digest::Hasher::new();
    std::io::copy(
        &mut flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap()),
        &mut hasher,
    )
    .unwrap();
    hasher.finish()
}

/// Writes an OCI image of `layer_dirs` (bottom first) into the layout at `layout`, tagged
/// `tag`, with `cmd` as its command. Returns the layers' gzip files.
pub async fn build_image(
    layout: &Path,
    tag: &str,
    layer_dirs: &[PathBuf],
    cmd: &[&str],
) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (i, dir) in layer_dirs.iter().enumerate() {
        let gz = layout.with_extension(format!("layer{i}.tar.gz"));
        gnu_tar_gz(dir, &gz);
        files.push(gz);
    }
    build_image_from_tarballs(layout, tag, &files, cmd).await;
    files
}

/// Writes an OCI image of gzip layer files (bottom first) into the layout at `layout`.
pub async fn build_image_from_tarballs(
    layout: &Path,
    tag: &str,
    tarballs: &[PathBuf],
    cmd: &[&str],
) {
    let sink = LocalLayout::create(layout).unwrap();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for gz in tarballs {
        let bytes = std::fs::read(gz).unwrap();
        let desc = descriptor(manifest::OCI_LAYER_GZIP, &bytes);
        sink.put_blob(&desc, Bytes::from(bytes)).await.unwrap();
        diff_ids.push(gunzip_digest(gz).to_string());
        layers.push(desc);
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_desc = descriptor(manifest::OCI_CONFIG, &config);
    sink.put_blob(&config_desc, Bytes::from(config))
        .await
        .unwrap();
    let m = Manifest {
        schema_version: 2,
        media_type: Some(manifest::OCI_MANIFEST.into()),
        config: config_desc,
        layers,
        annotations: Default::default(),
        extra: Default::default(),
    };
    sink.put_manifest(
        Some(tag),
        manifest::OCI_MANIFEST,
        Bytes::from(serde_json::to_vec(&m).unwrap()),
    )
    .await
    .unwrap();
}

pub fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor::of(media_type, bytes)
}

/// A root filesystem with busybox and its applet links, enough for `sh -c`.
pub fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static is needed");
    for applet in ["sh", "echo", "cat", "ls", "sha256sum", "sleep", "mv", "ln"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    for d in ["etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("etc/hostname"), "imgstream\n").unwrap();
}

/// Copies an image with skopeo (an independent client) between `oci:` and `docker://`.
/// The raw manifest (or index) `image` names, as `skopeo inspect --raw` fetches it.
pub fn skopeo_raw(image: &str) -> Vec<u8> {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", image])
        .output()
        .expect("skopeo is needed");
    assert!(
        out.status.success(),
        "skopeo inspect {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn skopeo_copy(src: &str, dst: &str) {
    skopeo_copy_as(src, dst, None);
}

/// [`skopeo_copy`] to a registry that wants `user:password` (`--dest-creds`).
pub fn skopeo_copy_as(src: &str, dst: &str, dest_creds: Option<&str>) {
    let mut skopeo = Command::new("skopeo");
    skopeo.args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--quiet",
    ]);
    if let Some(creds) = dest_creds {
        skopeo.args(["--dest-creds", creds]);
    }
    let out = skopeo.args([src, dst]).output().expect("skopeo is needed");
    assert!(
        out.status.success(),
        "skopeo copy {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Incompressible bytes, quickly (xorshift); different seeds give different bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
