//! A bearer-token server whose ES256 tokens the real registry verifies.

use super::*;

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
                        .filter_map(imgstream::query::decode)
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
