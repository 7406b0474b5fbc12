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

pub mod cri;
pub mod image_tree;

use bytes::Bytes;
use imgstream::{
    oci::{
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
        Self::start_with(name, user, None)
    }

    /// Starts a registry whose `auth:` section is `auth` (e.g. [`TokenServer::registry_auth`]).
    pub fn start_with_auth(name: &str, auth: String) -> Self {
        Self::start_with(name, None, Some(auth))
    }

    /// Starts a registry serving HTTPS with this certificate and key (PEM).
    pub fn start_tls(name: &str, cert: &Path, key: &Path) -> Self {
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
        Self::start_with(name, None, Some(format!("__TLS__{tls}")))
    }

    /// Starts a registry inside network namespace `netns`, listening on `ip` (an address of
    /// that namespace, reachable from here).
    pub fn start_in_netns(name: &str, netns: &str, ip: &str) -> Self {
        Self::start_at(name, None, None, Some((netns.to_string(), ip.to_string())))
    }

    fn start_with(name: &str, user: Option<(&str, &str)>, custom: Option<String>) -> Self {
        Self::start_at(name, user, custom, None)
    }

    fn start_at(
        name: &str,
        user: Option<(&str, &str)>,
        custom: Option<String>,
        netns: Option<(String, String)>,
    ) -> Self {
        let (tls, custom_auth) = match custom {
            Some(t) if t.starts_with("__TLS__") => {
                (t.trim_start_matches("__TLS__").to_string(), None)
            }
            other => (String::new(), other),
        };
        let dir = scratch(&format!("registry-{name}"));
        let port = free_port();
        let host_ip = netns
            .as_ref()
            .map_or("127.0.0.1".to_string(), |(_, ip)| ip.clone());
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
            None => custom_auth.unwrap_or_default(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host_ip}:{port}\n{tls}{auth}",
            dir.join("data").display()
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let mut command = match &netns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "docker-registry"]);
                c
            }
            None => Command::new("docker-registry"),
        };
        let child = command
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry is needed: cargo xtask setup installs it");
        let addr: SocketAddr = format!("{host_ip}:{port}").parse().unwrap();
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

    /// Stops the registry process (SIGSTOP): connections are still accepted by the kernel,
    /// and nothing is ever answered, as with a registry that hangs.
    pub fn pause(&self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// Lets a paused registry run again.
    pub fn resume(&self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
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
    /// Accept connections and never answer.
    Stall,
}

/// A one-thread runtime and a non-blocking listener on a free loopback port, for the test
/// servers (proxy, token server) that run beside the test.
fn loopback_server() -> (tokio::runtime::Runtime, std::net::TcpListener, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    (runtime, listener, addr)
}

/// A TCP proxy on loopback that counts the bytes it forwards from the upstream and can
/// inject faults.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Once set, every connection, open or new, is dropped: the registry is gone, while the
    /// port stays ours (no other test's proxy can take it).
    cut: Arc<std::sync::atomic::AtomicBool>,
    pub downstream_bytes: Arc<AtomicU64>,
    pub connections: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, fault: Fault) -> Self {
        let (runtime, listener, addr) = loopback_server();
        let downstream_bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (bytes, conns) = (downstream_bytes.clone(), connections.clone());
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut_flag = cut.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if cut_flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let n = conns.fetch_add(1, Ordering::SeqCst);
                let reset = match fault {
                    Fault::ResetFirst(k) => n < k,
                    Fault::ResetAll => true,
                    _ => false,
                };
                if fault == Fault::Stall {
                    // Hold the connection open, silent, until the proxy goes away.
                    tokio::spawn(async move {
                        let _client = client;
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    });
                    continue;
                }
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
                let cut_flag = cut_flag.clone();
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
                        if n == 0 || cut_flag.load(Ordering::SeqCst) {
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
            cut,
            downstream_bytes,
            connections,
            runtime: Some(runtime),
        }
    }

    /// Takes the registry away: connections are dropped from now on.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
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

/// Panics with a clear message unless running as root (mknod, chown, containerd, mounts).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (mknod, chown, containerd): run it as root, as `cargo xtask ci` does"
    );
}

/// A private containerd (Debian's package) with its own root, state and socket; stopped and
/// cleaned up when dropped.
pub struct Containerd {
    pub socket: PathBuf,
    child: Child,
    dir: PathBuf,
}

impl Containerd {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n")
    }

    /// A containerd with its CRI plugin: pods get `sandbox_image`, and `registry` is
    /// reached over plain HTTP. The settings this machine needs: no CAP_SYS_RESOURCE, so
    /// `restrict_oom_score_adj`.
    pub fn start_cri(name: &str, registry: &str, sandbox_image: &str) -> Self {
        Self::start_cri_with(name, registry, sandbox_image, "")
    }

    /// [`Containerd::start_cri`] with more configuration appended (TOML).
    pub fn start_cri_with(name: &str, registry: &str, sandbox_image: &str, extra: &str) -> Self {
        Self::start_with(
            name,
            &format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{sandbox_image}\"\n  restrict_oom_score_adj = true\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{registry}\"]\n  endpoint = [\"http://{registry}\"]\n{extra}"
            ),
        )
    }

    fn start_with(name: &str, extra: &str) -> Self {
        let dir = scratch(&format!("containerd-{name}"));
        let socket = dir.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n{extra}",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .expect("containerd is needed: cargo xtask setup installs it");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = Command::new("ctr")
                .arg("-a")
                .arg(&socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start; see {}",
                dir.join("containerd.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { socket, child, dir }
    }

    /// Runs `ctr -a SOCK -n imgstream-test ARGS`, returning (success, stdout, stderr).
    pub fn ctr(&self, args: &[&str]) -> (bool, String, String) {
        self.ctr_ns("imgstream-test", args)
    }

    /// Runs `ctr -a SOCK -n NAMESPACE ARGS` (CRI's namespace is `k8s.io`).
    pub fn ctr_ns(&self, namespace: &str, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", namespace])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers outlive containerd (their shims keep them): kill them first.
        for ns in ["imgstream-test", "k8s.io"] {
            let (_, tasks, _) = self.ctr_ns(ns, &["tasks", "ls", "-q"]);
            let tasks: Vec<&str> = tasks
                .lines()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .collect();
            for task in &tasks {
                self.ctr_ns(ns, &["tasks", "kill", "--signal", "SIGKILL", task]);
            }
            if !tasks.is_empty() {
                std::thread::sleep(Duration::from_millis(500));
            }
            for task in &tasks {
                self.ctr_ns(ns, &["tasks", "delete", "--force", task]);
            }
        }
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Overlay mounts of snapshots may linger: detach them before removing the tree.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let root = self.dir.display().to_string();
            for target in mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|t| t.starts_with(&root))
            {
                let _ = Command::new("umount").args(["-l", target]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A bearer-token server for a docker-registry configured with `auth: token`: it signs ES256
/// JWTs with a key whose self-signed certificate the registry trusts (`rootcertbundle`), so
/// the real registry verifies every token. The first token it issues can be made to expire
/// soon, to exercise refresh on 401.
pub struct TokenServer {
    pub addr: SocketAddr,
    pub issued: Arc<AtomicUsize>,
    pub cert_pem: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

pub const TOKEN_ISSUER: &str = "imgstream-test-issuer";
pub const TOKEN_SERVICE: &str = "imgstream-test-registry";

impl TokenServer {
    /// `first_lifetime_secs`: seconds the first token stays acceptable to the registry
    /// (which allows 60 s of leeway past `exp`); later tokens last an hour.
    pub fn start(dir: &Path, user: (&str, &str), first_lifetime_secs: i64) -> Self {
        let (key, cert) = (dir.join("token.key"), dir.join("token.crt"));
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
            ])
            .args(["-subj", "/CN=imgstream-token", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl is needed");
        assert!(status.success());
        let pkcs8 = Command::new("openssl")
            .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(pkcs8.status.success());
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        assert!(der.status.success());
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8.stdout,
            &rng,
        )
        .unwrap();
        use base64::Engine as _;
        let x5c = base64::engine::general_purpose::STANDARD.encode(&der.stdout);
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", user.0, user.1))
        );

        let (runtime, listener, addr) = loopback_server();
        let issued = Arc::new(AtomicUsize::new(0));
        let counter = issued.clone();
        let state = Arc::new((signer, rng, x5c, basic));
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((mut conn, _)) = listener.accept().await else { continue };
                let state = state.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        let Ok(n) = conn.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                    }
                    let text = String::from_utf8_lossy(&req).to_string();
                    let (signer, rng, x5c, basic) = &*state;
                    let authorized = text.lines().any(|l| l.to_ascii_lowercase().starts_with("authorization:") && l.trim_end().ends_with(basic.trim_start_matches("Basic ")));
                    let target = text.split_whitespace().nth(1).unwrap_or("").to_string();
                    let scopes: Vec<String> = target
                        .split(['?', '&'])
                        .filter_map(|kv| kv.strip_prefix("scope="))
                        .map(percent_decode)
                        .collect();
                    let (status, body) = if !authorized {
                        ("401 Unauthorized", r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.to_string())
                    } else {
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
                        let exp = if n == 0 { now - 60 + first_lifetime_secs } else { now + 3600 };
                        let access: Vec<serde_json::Value> = scopes
                            .iter()
                            .filter_map(|s| {
                                let mut parts = s.splitn(3, ':');
                                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                                Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
                            })
                            .collect();
                        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "x5c": [x5c]});
                        let claims = serde_json::json!({
                            "iss": TOKEN_ISSUER, "sub": "tester", "aud": TOKEN_SERVICE,
                            "exp": exp, "nbf": now - 10, "iat": now - 10, "jti": format!("t{n}"), "access": access,
                        });
                        let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
                        let signing_input = format!("{}.{}", b64(&header), b64(&claims));
                        let sig = signer.sign(rng, signing_input.as_bytes()).unwrap();
                        let jwt = format!("{signing_input}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref()));
                        ("200 OK", serde_json::json!({"token": jwt}).to_string())
                    };
                    let resp = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        Self {
            addr,
            issued,
            cert_pem: cert,
            runtime: Some(runtime),
        }
    }

    /// The `auth:` section of a registry config that trusts this server.
    pub fn registry_auth(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.addr,
            self.cert_pem.display()
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A test CA and a certificate it signed for 127.0.0.1 and localhost: (ca.crt, reg.crt, reg.key).
pub fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-days",
            "1",
            "-subj",
            "/CN=imgstream-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-subj",
            "/CN=localhost",
            "-keyout",
            "reg.key",
            "-out",
            "reg.csr",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "reg.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "reg.crt",
    ]);
    (dir.join("ca.crt"), dir.join("reg.crt"), dir.join("reg.key"))
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

/// A network namespace joined to this one by a veth pair whose namespace side is shaped to
/// `rate` (tc tbf), so traffic from a server inside it crosses a slow link. Removed on drop.
pub struct SlowLink {
    pub netns: String,
    /// The namespace side's address.
    pub ip: String,
}

impl SlowLink {
    pub fn new(name: &str, rate: &str) -> Self {
        let netns = format!("isb-{name}");
        let (host_if, ns_if) = (format!("isbh-{name}"), format!("isbn-{name}"));
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        run(&["netns", "add", &netns]);
        run(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        run(&["link", "set", &ns_if, "netns", &netns]);
        run(&["addr", "add", "10.213.0.1/30", "dev", &host_if]);
        run(&["link", "set", &host_if, "up"]);
        run(&[
            "netns",
            "exec",
            &netns,
            "ip",
            "addr",
            "add",
            "10.213.0.2/30",
            "dev",
            &ns_if,
        ]);
        run(&["netns", "exec", &netns, "ip", "link", "set", &ns_if, "up"]);
        run(&["netns", "exec", &netns, "ip", "link", "set", "lo", "up"]);
        let out = Command::new("ip")
            .args([
                "netns", "exec", &netns, "tc", "qdisc", "add", "dev", &ns_if, "root", "tbf",
            ])
            .args(["rate", rate, "burst", "256kb", "latency", "100ms"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            netns,
            ip: "10.213.0.2".into(),
        }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// Runs the `imgstream` binary with `args`, asserting it succeeds; returns its output.
pub fn imgstream(args: &[&str]) -> std::process::Output {
    let out = Command::new(imgstream_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "imgstream {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `imgstream mount` as a child process; SIGTERM and wait on drop.
pub struct Mounted {
    child: Child,
    pub mountpoint: PathBuf,
    log: Option<PathBuf>,
}

impl Mounted {
    pub fn start(image: &str, mountpoint: &Path, cache: &Path, reg: &str, extra: &[&str]) -> Self {
        Self::start_logged(image, mountpoint, cache, reg, extra, None)
    }

    /// As `start`, with the mount's log written to `log` (see `log_text`).
    pub fn start_logged(
        image: &str,
        mountpoint: &Path,
        cache: &Path,
        reg: &str,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Self {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut cmd = Command::new(imgstream_bin());
        cmd.args(["mount", image])
            .arg(mountpoint)
            .arg("--cache-dir")
            .arg(cache)
            .args(["--insecure-registry", reg])
            .args(extra)
            .stdin(Stdio::null());
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).unwrap());
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mounts = || std::fs::read_to_string("/proc/self/mounts").unwrap();
        while !mounts().contains(mountpoint.to_str().unwrap()) {
            assert!(Instant::now() < deadline, "the mount did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            mountpoint: mountpoint.to_path_buf(),
            log: log.map(Path::to_path_buf),
        }
    }

    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }

    pub fn stop(mut self) {
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

/// The start-latency tests' container entrypoint (`support/clockprobe.rs`), compiled once
/// per test process with plain rustc for the static musl target.
pub fn clockprobe() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out =
                std::env::temp_dir().join(format!("imgstream-clockprobe-{}", std::process::id()));
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/clockprobe.rs");
            let status = Command::new("rustc")
                .args(["--edition", "2024", "-O", "-C", "strip=symbols"])
                .args(["--target", "x86_64-unknown-linux-musl", "-o"])
                .arg(&out)
                .arg(&source)
                .status()
                .expect("rustc is needed");
            assert!(
                status.success(),
                "compiling clockprobe (needs the musl target: cargo xtask setup)"
            );
            out
        })
        .clone()
}

/// A root filesystem at `dir` holding the clockprobe entrypoint and the directories a
/// container needs (`/truth` for the bind-mounted truth files), plus `extra` directories.
pub fn clockprobe_rootfs(dir: &Path, extra: &[&str]) -> PathBuf {
    for sub in ["tmp", "truth", "proc", "sys", "dev", "etc"]
        .iter()
        .chain(extra)
    {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::copy(clockprobe(), dir.join("clockprobe")).unwrap();
    dir.to_path_buf()
}

/// The value of the sample `series` (name and labels, as exposed) in a `/metrics` page.
pub fn metric(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .parse()
        .unwrap()
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    // Chunked bodies do not occur: the API answers with Content-Length.
    (status, body)
}

/// `imgstream agent` as a child process, with a store and an API on a free loopback port.
pub struct Agent {
    child: Child,
    pub api: SocketAddr,
    pub store: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let store = dir.join("agent.redb");
        let log = dir.join(format!("agent-{}.log", api.port()));
        let child = Command::new(imgstream_bin())
            .args(["agent", "--api-addr", &api.to_string(), "--store"])
            .arg(&store)
            .arg("--detections")
            .arg(dir.join("detections.jsonl"))
            .args(extra)
            .env(
                "IMGSTREAM_LOG",
                std::env::var("IMGSTREAM_AGENT_LOG")
                    .unwrap_or_else(|_| "info,imgstream::agent=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut agent = Self {
            child,
            api,
            store,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                matches!(agent.child.try_wait(), Ok(None)),
                "the agent exited: {}",
                agent.log_text()
            );
            let attached = agent.log_text().contains("watching container starts");
            if attached && std::net::TcpStream::connect(api).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not start: {}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.api, path)
    }

    /// SIGTERM; the agent exits 0.
    pub fn stop(mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "the agent exited with {status}: {}",
            self.log_text()
        );
    }
}

impl Agent {
    /// Kills the agent (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `imgstream fuse-keeper` as a child process; killed on drop.
pub struct FuseKeeper {
    child: Child,
    pub socket: PathBuf,
}

impl FuseKeeper {
    pub fn start(socket: &Path) -> Self {
        // One left by a killed keeper would look like this one being up.
        let _ = std::fs::remove_file(socket);
        let child = Command::new(imgstream_bin())
            .args(["fuse-keeper", "--socket"])
            .arg(socket)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the FUSE keeper did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket: socket.to_path_buf(),
        }
    }
}

impl Drop for FuseKeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lazily unmounts every mount under `dir` (deepest first): what a keeper left mounted.
pub fn unmount_all_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| p.starts_with(dir.to_str().unwrap()))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `imgstream` binary: cargo's path for tests and benches; next to the examples'
/// directory for the demo (an example, built together with the binary by `cargo xtask demo`).
pub fn imgstream_bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_imgstream") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("imgstream")))
            .unwrap_or_else(|| PathBuf::from("imgstream")),
    }
}
