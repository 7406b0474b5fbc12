//! A real registry (Debian's docker-registry, the CNCF distribution registry) on loopback,
//! and a test PKI for its TLS.

use super::*;

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

    /// Starts a registry that answers blob GETs with a redirect to `base` followed by the
    /// blob's path in its storage ([`Registry::storage_root`]), as registries backed by
    /// object storage do (distribution's `redirect` storage middleware), and writes an access
    /// log ([`Registry::access_log`]).
    pub fn start_redirecting(name: &str, base: &str) -> Self {
        let middleware = format!(
            "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {base}\n"
        );
        Self::start_at(name, None, Some(format!("__ACCESS__{middleware}")), None)
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
        let (access_log, custom) = match custom {
            Some(c) if c.starts_with("__ACCESS__") => {
                (true, Some(c.trim_start_matches("__ACCESS__").to_string()))
            }
            other => (false, other),
        };
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
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: {}\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host_ip}:{port}\n{tls}{auth}",
            !access_log,
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
            .stdout(if access_log {
                Stdio::from(std::fs::File::create(dir.join("access.log")).unwrap())
            } else {
                Stdio::null()
            })
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

    /// The directory the registry's filesystem storage is rooted at.
    pub fn storage_root(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The registry's access log so far (a request a line), when it keeps one.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
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
