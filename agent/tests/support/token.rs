//! A bearer-token server whose ES256 tokens the real registry verifies.

use super::*;

/// A bearer-token server for a docker-registry configured with `auth: token`: it signs ES256
/// JWTs with a key whose self-signed certificate the registry trusts (`rootcertbundle`), so
/// the real registry verifies every token. The first token it issues can be made to expire
/// soon, to exercise refresh on 401. Besides its user's fixed password it accepts the
/// short-lived ones `GET /password` hands out, for as long as each lasts.
pub struct TokenServer {
    pub addr: SocketAddr,
    /// Tokens issued.
    pub issued: Arc<AtomicUsize>,
    /// Short-lived passwords handed out by `GET /password` (what a cloud's credential
    /// helper would give a node).
    pub passwords: Arc<Passwords>,
    /// Once set: (token lifetime, password lifetime), seconds.
    lifetimes: Arc<std::sync::Mutex<Option<(i64, u64)>>>,
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

        let (runtime, listener, addr) = loopback_server();
        let issued = Arc::new(AtomicUsize::new(0));
        let passwords = Arc::new(Passwords::default());
        let lifetimes = Arc::new(std::sync::Mutex::new(None));
        let state = Arc::new(Signer {
            key: signer,
            rng,
            x5c,
            user: (user.0.to_string(), user.1.to_string()),
            first_lifetime_secs,
            issued: issued.clone(),
            passwords: passwords.clone(),
            lifetimes: Arc::clone(&lifetimes),
        });
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(state.clone().answer(conn));
            }
        });
        Self {
            addr,
            issued,
            passwords,
            lifetimes,
            cert_pem: cert,
            runtime: Some(runtime),
        }
    }

    /// From now on every token lasts `token_secs` and every password `/password` hands out
    /// `password_secs`: credentials that expire while a layer is still downloading.
    pub fn expire_quickly(&self, token_secs: i64, password_secs: u64) {
        *self.lifetimes.lock().unwrap() = Some((token_secs, password_secs));
    }

    /// A password for the token server's user, as `GET /password` hands one out.
    pub fn issue_password(&self) -> String {
        let secs = self.lifetimes.lock().unwrap().map_or(3600, |(_, p)| p);
        self.passwords.issue(Duration::from_secs(secs))
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

/// Passwords handed out, each with when it stops being accepted.
#[derive(Default)]
pub struct Passwords {
    valid_until: std::sync::Mutex<Vec<(String, Instant)>>,
    pub handed_out: AtomicUsize,
}

impl Passwords {
    fn issue(&self, lifetime: Duration) -> String {
        let n = self.handed_out.fetch_add(1, Ordering::SeqCst);
        let password = format!("pw{n}-{:x}", rand_u64());
        self.valid_until
            .lock()
            .unwrap()
            .push((password.clone(), Instant::now() + lifetime));
        password
    }

    /// Every password handed out so far.
    pub fn handed(&self) -> Vec<String> {
        self.valid_until
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn accepts(&self, password: &str) -> bool {
        self.valid_until
            .lock()
            .unwrap()
            .iter()
            .any(|(p, until)| p == password && Instant::now() < *until)
    }
}

/// A random number from the kernel, so that passwords differ between runs.
fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}

/// What answers requests: the signing key and the accepted credentials.
struct Signer {
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    x5c: String,
    user: (String, String),
    first_lifetime_secs: i64,
    issued: Arc<AtomicUsize>,
    passwords: Arc<Passwords>,
    lifetimes: Arc<std::sync::Mutex<Option<(i64, u64)>>>,
}

impl Signer {
    /// Answers one connection: `GET /password`, or a token request.
    async fn answer(self: Arc<Self>, mut conn: tokio::net::TcpStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let Ok(n) = conn.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            req.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&req).to_string();
        let target = text.split_whitespace().nth(1).unwrap_or("").to_string();
        let (status, body) = if target == "/password" {
            let secs = self.lifetimes.lock().unwrap().map_or(3600, |(_, p)| p);
            ("200 OK", self.passwords.issue(Duration::from_secs(secs)))
        } else if self.authorized(&text) {
            ("200 OK", self.token(&target))
        } else {
            (
                "401 Unauthorized",
                r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.to_string(),
            )
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(resp.as_bytes()).await;
    }

    /// Whether the request's Basic credentials are the user's fixed password or a handed-out
    /// one still valid.
    fn authorized(&self, request: &str) -> bool {
        use base64::Engine as _;
        let Some(encoded) = request.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("authorization")
                .then(|| value.trim().strip_prefix("Basic "))
                .flatten()
        }) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let decoded = String::from_utf8_lossy(&decoded).to_string();
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        user == self.user.0 && (password == self.user.1 || self.passwords.accepts(password))
    }

    /// A signed token for the scopes `target` asks for.
    fn token(&self, target: &str) -> String {
        use base64::Engine as _;
        let scopes: Vec<String> = target
            .split(['?', '&'])
            .filter_map(|kv| kv.strip_prefix("scope="))
            .filter_map(imgstream::query::decode)
            .collect();
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        // The registry accepts a token for 60 s past its `exp`.
        let exp = match *self.lifetimes.lock().unwrap() {
            Some((token_secs, _)) => now - 60 + token_secs,
            None if n == 0 => now - 60 + self.first_lifetime_secs,
            None => now + 3600,
        };
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": "tester", "aud": TOKEN_SERVICE,
            "exp": exp, "nbf": now - 10, "iat": now - 10, "jti": format!("t{n}"), "access": access,
        });
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
        };
        let signing_input = format!("{}.{}", b64(&header), b64(&claims));
        let sig = self.key.sign(&self.rng, signing_input.as_bytes()).unwrap();
        let jwt = format!(
            "{signing_input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref())
        );
        serde_json::json!({ "token": jwt }).to_string()
    }
}
