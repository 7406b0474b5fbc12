//! Shared by the integration tests: a real registry (Debian's docker-registry, the CNCF
//! distribution registry) on loopback, test images built from busybox, and a TCP proxy that
//! counts bytes and injects faults between the client and the registry.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use imgstream::{
    image::{
        digest::Digest,
        manifest::{self, Descriptor, Manifest},
    },
    registry::{BlobSink, local::LocalLayout},
};

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("imgstream-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A docker-registry process on 127.0.0.1, killed when dropped.
pub struct Registry {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Registry {
    /// Starts a registry, with htpasswd basic auth when `user` is given.
    pub fn start(name: &str, user: Option<(&str, &str)>) -> Self {
        let dir = scratch(&format!("registry-{name}"));
        let port = free_port();
        let auth = match user {
            Some((u, p)) => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", u, p])
                    .output()
                    .expect("htpasswd (apache2-utils) is needed");
                assert!(out.status.success());
                std::fs::write(dir.join("htpasswd"), out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: imgstream-test\n    path: {}\n",
                    dir.join("htpasswd").display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.join("data").display()
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry is needed: cargo xtask setup installs it");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not start; see {}",
                dir.join("registry.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { addr, child, dir }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Where the registry's filesystem storage keeps a blob's bytes.
    pub fn blob_data_path(&self, hex: &str) -> PathBuf {
        self.dir.join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// Size in bytes of everything the registry stores.
    pub fn stored_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p).map_or(0, |d| {
                d.flatten()
                    .map(|e| {
                        let m = e.metadata().unwrap();
                        if m.is_dir() { walk(&e.path()) } else { m.len() }
                    })
                    .sum()
            })
        }
        walk(&self.dir.join("data"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Tars and gzips `dir` with GNU tar (numeric owner root), as a plain OCI layer.
pub fn gnu_tar_gz(dir: &Path, out: &Path) {
    let status = Command::new("tar")
        .args(["--format=pax", "--sort=name", "--numeric-owner", "-czf"])
        .arg(out)
        .args(["-C", dir.to_str().unwrap(), "."])
        .status()
        .unwrap();
    assert!(status.success());
}

fn gunzip_digest(path: &Path) -> Digest {
    let mut hasher = imgstream::image::digest::Hasher::new();
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
    let sink = LocalLayout::create(layout).unwrap();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut files = Vec::new();
    for (i, dir) in layer_dirs.iter().enumerate() {
        let gz = layout.with_extension(format!("layer{i}.tar.gz"));
        gnu_tar_gz(dir, &gz);
        let bytes = std::fs::read(&gz).unwrap();
        let desc = descriptor(manifest::OCI_LAYER_GZIP, &bytes);
        sink.put_blob(&desc, Bytes::from(bytes)).await.unwrap();
        diff_ids.push(gunzip_digest(&gz).to_string());
        layers.push(desc);
        files.push(gz);
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
    files
}

pub fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: Digest::of(bytes),
        size: bytes.len() as u64,
        annotations: Default::default(),
        platform: None,
        extra: Default::default(),
    }
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
pub fn skopeo_copy(src: &str, dst: &str) {
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--quiet",
            src,
            dst,
        ])
        .output()
        .expect("skopeo is needed");
    assert!(
        out.status.success(),
        "skopeo copy {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the proxy does to connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Close the first `n` connections right after accepting them.
    ResetFirst(usize),
    /// Close every connection right after accepting it.
    ResetAll,
    /// Forward only the first `n` bytes of the first response of each of the first `m`
    /// connections, then close.
    TruncateFirst {
        bytes: u64,
        connections: usize,
    },
}

/// A TCP proxy on loopback that counts the bytes it forwards from the upstream and can
/// inject faults.
pub struct Proxy {
    pub addr: SocketAddr,
    pub downstream_bytes: Arc<AtomicU64>,
    pub connections: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, fault: Fault) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let downstream_bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (bytes, conns) = (downstream_bytes.clone(), connections.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let n = conns.fetch_add(1, Ordering::SeqCst);
                let reset = match fault {
                    Fault::ResetFirst(k) => n < k,
                    Fault::ResetAll => true,
                    _ => false,
                };
                if reset {
                    // SO_LINGER 0 turns the close into a reset.
                    #[expect(deprecated, reason = "a zero linger resets at once; nothing blocks")]
                    let _ = client.set_linger(Some(Duration::ZERO));
                    drop(client);
                    continue;
                }
                let limit = match fault {
                    Fault::TruncateFirst { bytes, connections } if n < connections => Some(bytes),
                    _ => None,
                };
                let bytes = bytes.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut sent = 0u64;
                    loop {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let Ok(n) = sr.read(&mut buf).await else {
                            break;
                        };
                        if n == 0 {
                            break;
                        }
                        let n = match limit {
                            Some(l) if sent + n as u64 >= l => (l - sent) as usize,
                            _ => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        sent += n as u64;
                        bytes.fetch_add(n as u64, Ordering::SeqCst);
                        if limit.is_some_and(|l| sent >= l) {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        Self {
            addr,
            downstream_bytes,
            connections,
            runtime: Some(runtime),
        }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn bytes(&self) -> u64 {
        self.downstream_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
