//! The OCI distribution client (hyper 1, HTTP/1.1, rustls).
//!
//! One [`RegistryClient`] serves one repository. Every request has a deadline; connection
//! errors, timeouts, 5xx and 429 answers are retried a bounded number of times with
//! exponential backoff; a 401 is answered once per request with credentials (Basic) or a
//! token fetched from the challenge's realm (Bearer). Reads try the configured mirrors in
//! order and fall back to the origin; writes go to the origin only. Every whole blob and every
//! manifest fetched by digest is checked against its digest and size.

mod auth;

use std::{
    collections::BTreeMap,
    ops::Range,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

pub use auth::{Challenge, Credentials, parse_challenge};

use super::{
    BlobSink, BlobSource, FetchedManifest, MAX_IN_MEMORY_BLOB, RegistryError, check_content,
};
use crate::oci::{
    digest::{Digest, Hasher},
    manifest::{ACCEPT, Descriptor, MAX_MANIFEST},
};

/// Blobs up to this size are uploaded in one PUT; larger ones in PATCH chunks of this size.
const UPLOAD_CHUNK: u64 = 16 << 20;
/// Redirects followed per request (registries send blob GETs to object storage).
const MAX_REDIRECTS: usize = 5;
/// Key of a Basic `Authorization` value, which serves every scope.
const ANY_SCOPE: &str = "*";

/// How the client reaches registries.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Registries (host[:port]) spoken to over plain HTTP. Nothing else is.
    pub insecure: Vec<String>,
    /// Extra PEM CA certificates trusted besides the web PKI roots.
    pub ca_files: Vec<PathBuf>,
    /// Mirrors per registry host, tried in order before the origin: base URLs such as
    /// `http://127.0.0.1:5001`.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// A docker `config.json` to read credentials from.
    pub auth_file: Option<PathBuf>,
    /// Deadline of one request, including reading a small body; for large bodies, the longest
    /// wait for the next piece.
    pub timeout: Duration,
    /// Attempts after the first for retryable failures.
    pub retries: u32,
    /// First backoff; doubles per attempt.
    pub backoff: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        let auth_file =
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"));
        Self {
            insecure: Vec::new(),
            ca_files: Vec::new(),
            mirrors: BTreeMap::new(),
            auth_file,
            timeout: Duration::from_secs(30),
            retries: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

type HyperClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for one repository of one registry.
pub struct RegistryClient {
    http: HyperClient,
    registry: String,
    repository: String,
    /// Base URLs: mirrors first, origin last.
    endpoints: Vec<String>,
    credentials: Option<Credentials>,
    /// `Authorization` values learnt from challenges: by scope for bearer tokens, under
    /// [`ANY_SCOPE`] for Basic.
    auth: Mutex<BTreeMap<String, String>>,
    config: HttpConfig,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("repository", &self.name())
            .finish_non_exhaustive()
    }
}

/// Builds the TLS-capable HTTP client shared by every request of a registry client.
fn build_http(config: &HttpConfig) -> Result<HyperClient, RegistryError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in &config.ca_files {
        let pem = std::fs::read(path).map_err(|e| RegistryError::io(path, e))?;
        let mut found = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| RegistryError::io(path, e))?;
            roots
                .add(cert)
                .map_err(|e| RegistryError::Protocol(format!("CA in {}: {e}", path.display())))?;
            found += 1;
        }
        if found == 0 {
            return Err(RegistryError::Protocol(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Protocol(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}

impl RegistryClient {
    /// A client for `registry/repository`.
    pub fn new(
        registry: &str,
        repository: &str,
        config: HttpConfig,
    ) -> Result<Self, RegistryError> {
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let scheme = if config.insecure.iter().any(|r| r == registry) {
            "http"
        } else {
            "https"
        };
        let mut endpoints: Vec<String> = config
            .mirrors
            .get(registry)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.trim_end_matches('/').to_string())
            .collect();
        endpoints.push(format!("{scheme}://{host}"));
        let credentials = match &config.auth_file {
            Some(path) => Credentials::from_docker_config(path, registry)?,
            None => None,
        };
        Ok(Self {
            http: build_http(&config)?,
            registry: registry.to_string(),
            repository: repository.to_string(),
            endpoints,
            credentials,
            auth: Mutex::new(BTreeMap::new()),
            config,
        })
    }

    /// Uses these credentials instead of any from the config file.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    fn origin(&self) -> &str {
        self.endpoints
            .last()
            .expect("the origin is always an endpoint")
    }

    fn scope(&self, push: bool) -> String {
        format!(
            "repository:{}:{}",
            self.repository,
            if push { "pull,push" } else { "pull" }
        )
    }

    /// Sends one request to `url` with retries, authentication and redirects; returns the
    /// first non-retryable answer (whatever its status) or the last error.
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        body: Bytes,
        scope: &str,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut attempt = 0;
        let mut authenticated_once = false;
        loop {
            let result = self
                .send_once(method.clone(), url, headers, body.clone(), scope)
                .await;
            let retry = match &result {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !authenticated_once => {
                    authenticated_once = true;
                    let challenge = resp
                        .headers()
                        .get(header::WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_challenge);
                    self.authenticate(challenge, scope, url).await?;
                    continue;
                }
                Ok(resp) => {
                    let s = resp.status().as_u16();
                    s >= 500 || s == 429 || s == 408
                }
                Err(e) => e.is_retryable(),
            };
            if !retry || attempt >= self.config.retries {
                return result;
            }
            let wait = self.config.backoff * 2u32.saturating_pow(attempt);
            tracing::debug!(%url, attempt, ?wait, "retrying registry request");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One request, following redirects, with the deadline applied to getting the headers.
    async fn send_once(
        &self,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        body: Bytes,
        scope: &str,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut url = url.to_string();
        let mut auth = self.auth_header(scope);
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder().method(method.clone()).uri(&url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(auth) = &auth {
                req = req.header(header::AUTHORIZATION, auth);
            }
            req = req.header(
                header::USER_AGENT,
                concat!("imgstream/", env!("CARGO_PKG_VERSION")),
            );
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| RegistryError::Protocol(format!("bad request URL {url}: {e}")))?;
            let secs = self.config.timeout.as_secs();
            let resp = match tokio::time::timeout(self.config.timeout, self.http.request(req)).await
            {
                Err(_) => return Err(RegistryError::Timeout { url, secs }),
                Ok(Err(e)) => {
                    return Err(RegistryError::Connect {
                        url,
                        source: Box::new(e),
                    });
                }
                Ok(Ok(resp)) => resp,
            };
            if resp.status().is_redirection()
                && let Some(location) = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
            {
                let next = resolve_url(&url, location);
                // Credentials stay with the registry: never send them to another host.
                if host_of(&next) != host_of(&url) {
                    auth = None;
                }
                url = next;
                continue;
            }
            return Ok(resp);
        }
        Err(RegistryError::Protocol(format!(
            "more than {MAX_REDIRECTS} redirects from {url}"
        )))
    }

    fn auth_header(&self, scope: &str) -> Option<String> {
        let auth = crate::sync::lock(&self.auth);
        auth.get(scope).or_else(|| auth.get(ANY_SCOPE)).cloned()
    }

    /// Answers a 401: stores a Basic header or fetches a bearer token for `scope`.
    async fn authenticate(
        &self,
        challenge: Option<Challenge>,
        scope: &str,
        url: &str,
    ) -> Result<(), RegistryError> {
        let unauthorized = |detail: &str| RegistryError::Unauthorized {
            url: url.to_string(),
            status: 401,
            detail: detail.into(),
        };
        match challenge {
            Some(Challenge::Basic) => {
                let creds = self.credentials.as_ref().ok_or_else(|| {
                    unauthorized("the registry wants credentials and none are configured")
                })?;
                crate::sync::lock(&self.auth).insert(ANY_SCOPE.into(), creds.basic_header());
                Ok(())
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                let mut token_url = format!("{realm}?");
                if let Some(service) = service {
                    token_url.push_str(&format!("service={}&", crate::query::encode(&service)));
                }
                for s in scope.split(' ') {
                    token_url.push_str(&format!("scope={}&", crate::query::encode(s)));
                }
                token_url.pop();
                let mut headers = HeaderMap::new();
                if let Some(creds) = &self.credentials {
                    headers.insert(header::AUTHORIZATION, header_value(&creds.basic_header())?);
                }
                let secs = self.config.timeout.as_secs();
                let req = {
                    let mut r = Request::get(&token_url);
                    for (k, v) in &headers {
                        r = r.header(k, v);
                    }
                    r.body(Full::new(Bytes::new())).map_err(|e| {
                        RegistryError::Protocol(format!("token URL {token_url}: {e}"))
                    })?
                };
                let resp =
                    match tokio::time::timeout(self.config.timeout, self.http.request(req)).await {
                        Err(_) => {
                            return Err(RegistryError::Timeout {
                                url: token_url,
                                secs,
                            });
                        }
                        Ok(Err(e)) => {
                            return Err(RegistryError::Connect {
                                url: token_url,
                                source: Box::new(e),
                            });
                        }
                        Ok(Ok(resp)) => resp,
                    };
                let status = resp.status();
                let body = self.read_small(resp, 1 << 20, &token_url).await?;
                if !status.is_success() {
                    return Err(RegistryError::Unauthorized {
                        url: token_url,
                        status: status.as_u16(),
                        detail: snippet(&body),
                    });
                }
                let token = auth::token_from_response(&body)
                    .ok_or_else(|| unauthorized("the token server's answer has no token"))?;
                crate::sync::lock(&self.auth).insert(scope.to_string(), format!("Bearer {token}"));
                Ok(())
            }
            None => Err(unauthorized(
                "401 without a usable WWW-Authenticate challenge",
            )),
        }
    }
}

impl RegistryClient {
    /// Records an endpoint's failure (logged when mirrors are configured).
    fn endpoint_failed(
        &self,
        endpoint: &str,
        err: RegistryError,
        last: &mut Option<(String, RegistryError)>,
    ) {
        if self.endpoints.len() > 1 {
            tracing::warn!(%endpoint, error = %err, "registry endpoint failed; trying the next");
        }
        *last = Some((endpoint.to_string(), err));
    }

    /// The error once every endpoint failed: the origin's own when there are no mirrors.
    fn all_failed(&self, last: Option<(String, RegistryError)>) -> RegistryError {
        let (endpoint, err) = last.expect("at least one endpoint was tried");
        if self.endpoints.len() == 1 {
            err
        } else {
            RegistryError::AllEndpointsFailed {
                last_endpoint: endpoint,
                source: Box::new(err),
            }
        }
    }

    fn url(&self, endpoint: &str, tail: &str) -> String {
        format!("{endpoint}/v2/{}/{tail}", self.repository)
    }

    /// Turns a non-success answer into an error (reading a little of its body).
    async fn error_for(&self, resp: Response<Incoming>, url: &str, what: &str) -> RegistryError {
        let status = resp.status();
        let body = self.read_small(resp, 4096, url).await.unwrap_or_default();
        match status {
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                what: what.to_string(),
                source_name: url.to_string(),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized {
                url: url.to_string(),
                status: status.as_u16(),
                detail: snippet(&body),
            },
            _ => RegistryError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: snippet(&body),
            },
        }
    }

    /// Reads a whole body of at most `limit` bytes within the request deadline.
    async fn read_small(
        &self,
        resp: Response<Incoming>,
        limit: u64,
        url: &str,
    ) -> Result<Bytes, RegistryError> {
        if let Some(len) = content_length(resp.headers())
            && len > limit
        {
            return Err(RegistryError::TooLarge {
                what: url.to_string(),
                limit,
            });
        }
        let mut body = resp.into_body();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    return Err(RegistryError::Timeout {
                        url: url.to_string(),
                        secs: self.config.timeout.as_secs(),
                    });
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(RegistryError::Connect {
                        url: url.to_string(),
                        source: Box::new(e),
                    });
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if out.len() as u64 + data.len() as u64 > limit {
                    return Err(RegistryError::TooLarge {
                        what: url.to_string(),
                        limit,
                    });
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(out.into())
    }

    /// Streams a body into `sink` frame by frame; each frame must come within the timeout.
    /// Returns the bytes delivered (at most `limit`, more is an error).
    async fn stream_body<S>(
        &self,
        resp: Response<Incoming>,
        url: &str,
        limit: u64,
        mut sink: S,
    ) -> Result<u64, RegistryError>
    where
        S: FnMut(&[u8]) -> Result<(), RegistryError>,
    {
        let mut body = resp.into_body();
        let mut total = 0u64;
        loop {
            let frame = match tokio::time::timeout(self.config.timeout, body.frame()).await {
                Err(_) => {
                    return Err(RegistryError::Timeout {
                        url: url.to_string(),
                        secs: self.config.timeout.as_secs(),
                    });
                }
                Ok(None) => return Ok(total),
                // A connection cut mid-body: report it like a short body, which is retryable.
                Ok(Some(Err(_))) => return Ok(total),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                total += data.len() as u64;
                if total > limit {
                    return Err(RegistryError::TooLarge {
                        what: url.to_string(),
                        limit,
                    });
                }
                sink(&data)?;
            }
        }
    }

    /// A whole blob, streamed through `sink` and checked against `desc`; retried from the
    /// start (via `restart`) when the transfer breaks off.
    async fn fetch_blob<S, R>(
        &self,
        desc: &Descriptor,
        mut sink: S,
        mut restart: R,
    ) -> Result<(), RegistryError>
    where
        S: FnMut(&[u8]) -> Result<(), RegistryError> + Send,
        R: FnMut() -> Result<(), RegistryError> + Send,
    {
        let what = format!("blob {}", desc.digest);
        let scope = self.scope(false);
        let mut last = None;
        for endpoint in self.endpoints.clone() {
            let result = async {
                let url = self.url(&endpoint, &format!("blobs/{}", desc.digest));
                let what = what.clone();
                let scope = scope.clone();
                {
                    let mut attempt = 0;
                    loop {
                        restart()?;
                        let resp = self
                            .send(Method::GET, &url, &HeaderMap::new(), Bytes::new(), &scope)
                            .await?;
                        if !resp.status().is_success() {
                            return Err(self.error_for(resp, &url, &what).await);
                        }
                        let mut hasher = Hasher::new();
                        let got = self
                            .stream_body(resp, &url, desc.size, |data| {
                                hasher.update(data);
                                sink(data)
                            })
                            .await;
                        let result: Result<(), RegistryError> = match got {
                            Ok(n) if n != desc.size => Err(RegistryError::SizeMismatch {
                                what: what.clone(),
                                expected: desc.size,
                                actual: n,
                            }),
                            Ok(_) => {
                                let actual = hasher.finish();
                                if actual == desc.digest {
                                    return Ok(());
                                }
                                Err(RegistryError::DigestMismatch {
                                    what: what.clone(),
                                    expected: desc.digest,
                                    actual,
                                })
                            }
                            Err(e) => Err(e),
                        };
                        let err = result.expect_err("success returned above");
                        if !err.is_retryable() || attempt >= self.config.retries {
                            return Err(err);
                        }
                        attempt += 1;
                        tokio::time::sleep(self.config.backoff * 2u32.saturating_pow(attempt))
                            .await;
                    }
                }
            }
            .await;
            match result {
                Ok(value) => return Ok(value),
                Err(err) => self.endpoint_failed(&endpoint, err, &mut last),
            }
        }
        Err(self.all_failed(last))
    }
}

#[async_trait]
impl BlobSource for RegistryClient {
    async fn manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        let by_digest = reference.parse::<Digest>().ok();
        let scope = self.scope(false);
        let mut last = None;
        for endpoint in self.endpoints.clone() {
            let result = async {
                let url = self.url(&endpoint, &format!("manifests/{reference}"));
                let scope = scope.clone();
                {
                    let mut headers = HeaderMap::new();
                    headers.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
                    let resp = self
                        .send(Method::GET, &url, &headers, Bytes::new(), &scope)
                        .await?;
                    if !resp.status().is_success() {
                        return Err(self
                            .error_for(resp, &url, &format!("manifest {reference}"))
                            .await);
                    }
                    let media_type = resp
                        .headers()
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
                        .unwrap_or_default();
                    let claimed = resp
                        .headers()
                        .get("docker-content-digest")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<Digest>().ok());
                    let bytes = self.read_small(resp, MAX_MANIFEST as u64, &url).await?;
                    let digest = Digest::of(&bytes);
                    for expected in [by_digest, claimed].into_iter().flatten() {
                        if expected != digest {
                            return Err(RegistryError::DigestMismatch {
                                what: format!("manifest {reference}"),
                                expected,
                                actual: digest,
                            });
                        }
                    }
                    Ok(FetchedManifest {
                        bytes,
                        media_type,
                        digest,
                    })
                }
            }
            .await;
            match result {
                Ok(value) => return Ok(value),
                Err(err) => self.endpoint_failed(&endpoint, err, &mut last),
            }
        }
        Err(self.all_failed(last))
    }

    async fn blob(&self, desc: &Descriptor) -> Result<Bytes, RegistryError> {
        if desc.size > MAX_IN_MEMORY_BLOB {
            return Err(RegistryError::TooLarge {
                what: format!("blob {}", desc.digest),
                limit: MAX_IN_MEMORY_BLOB,
            });
        }
        let buf = Mutex::new(Vec::with_capacity(desc.size as usize));
        self.fetch_blob(
            desc,
            |data| {
                crate::sync::lock(&buf).extend_from_slice(data);
                Ok(())
            },
            || {
                crate::sync::lock(&buf).clear();
                Ok(())
            },
        )
        .await?;
        let bytes = buf.into_inner().expect("buffer lock");
        check_content(desc, &bytes, &format!("blob {}", desc.digest))?;
        Ok(bytes.into())
    }

    async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError> {
        let file = std::fs::File::create(path).map_err(|e| RegistryError::io(path, e))?;
        let file = Mutex::new(file);
        self.fetch_blob(
            desc,
            |data| {
                use std::io::Write;
                crate::sync::lock(&file)
                    .write_all(data)
                    .map_err(|e| RegistryError::io(path, e))
            },
            || {
                use std::io::Seek;
                let mut f = crate::sync::lock(&file);
                f.set_len(0)
                    .and_then(|()| f.rewind())
                    .map_err(|e| RegistryError::io(path, e))
            },
        )
        .await?;
        file.into_inner()
            .expect("file lock")
            .sync_all()
            .map_err(|e| RegistryError::io(path, e))
    }

    async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes, RegistryError> {
        let len = range
            .end
            .checked_sub(range.start)
            .filter(|&l| l > 0)
            .ok_or_else(|| RegistryError::Protocol(format!("empty range {range:?}")))?;
        if len > MAX_IN_MEMORY_BLOB {
            return Err(RegistryError::TooLarge {
                what: format!("range of {digest}"),
                limit: MAX_IN_MEMORY_BLOB,
            });
        }
        let scope = self.scope(false);
        let what = format!("blob {digest}");
        let mut last = None;
        for endpoint in self.endpoints.clone() {
            let result = async {
                let url = self.url(&endpoint, &format!("blobs/{digest}"));
                let scope = scope.clone();
                let what = what.clone();
                let range = range.clone();
                {
                    let mut headers = HeaderMap::new();
                    headers.insert(
                        header::RANGE,
                        header_value(&format!("bytes={}-{}", range.start, range.end - 1))?,
                    );
                    let mut attempt = 0;
                    loop {
                        let resp = self
                            .send(Method::GET, &url, &headers, Bytes::new(), &scope)
                            .await?;
                        let status = resp.status();
                        let result = match status {
                            StatusCode::PARTIAL_CONTENT => {
                                let start = resp
                                    .headers()
                                    .get(header::CONTENT_RANGE)
                                    .and_then(|v| v.to_str().ok())
                                    .and_then(content_range_start);
                                if start != Some(range.start) {
                                    return Err(RegistryError::Protocol(format!(
                                        "{url} answered a range request with another range"
                                    )));
                                }
                                let mut out = Vec::with_capacity(len as usize);
                                self.stream_body(resp, &url, len, |d| {
                                    out.extend_from_slice(d);
                                    Ok(())
                                })
                                .await
                                .map(|_| out)
                            }
                            StatusCode::OK => {
                                // The server ignored Range: keep just the slice, bounded memory.
                                let mut out = Vec::with_capacity(len as usize);
                                let mut at = 0u64;
                                self.stream_body(resp, &url, u64::MAX, |d| {
                                    let (s, e) = (at, at + d.len() as u64);
                                    let lo = range.start.max(s);
                                    let hi = range.end.min(e);
                                    if lo < hi {
                                        out.extend_from_slice(
                                            &d[(lo - s) as usize..(hi - s) as usize],
                                        );
                                    }
                                    at = e;
                                    Ok(())
                                })
                                .await
                                .map(|_| out)
                            }
                            _ => return Err(self.error_for(resp, &url, &what).await),
                        };
                        let result = result.and_then(|out| {
                            if out.len() as u64 == len {
                                Ok(Bytes::from(out))
                            } else {
                                Err(RegistryError::SizeMismatch {
                                    what: format!("{what} range {range:?}"),
                                    expected: len,
                                    actual: out.len() as u64,
                                })
                            }
                        });
                        match result {
                            Err(err) if err.is_retryable() && attempt < self.config.retries => {
                                attempt += 1;
                                tokio::time::sleep(
                                    self.config.backoff * 2u32.saturating_pow(attempt),
                                )
                                .await;
                            }
                            other => return other,
                        }
                    }
                }
            }
            .await;
            match result {
                Ok(value) => return Ok(value),
                Err(err) => self.endpoint_failed(&endpoint, err, &mut last),
            }
        }
        Err(self.all_failed(last))
    }

    fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

#[async_trait]
impl BlobSink for RegistryClient {
    async fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError> {
        let url = self.url(self.origin(), &format!("blobs/{digest}"));
        let resp = self
            .send(
                Method::HEAD,
                &url,
                &HeaderMap::new(),
                Bytes::new(),
                &self.scope(true),
            )
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.error_for(resp, &url, &format!("blob {digest}")).await),
        }
    }

    async fn put_blob(&self, desc: &Descriptor, bytes: Bytes) -> Result<(), RegistryError> {
        check_content(desc, &bytes, &format!("blob {}", desc.digest))?;
        if self.has_blob(&desc.digest).await? {
            return Ok(());
        }
        let location = self
            .start_upload(None, &desc.digest)
            .await?
            .ok_or_else(|| RegistryError::Protocol("upload not started".into()))?;
        self.finish_upload(&location, &desc.digest, bytes).await
    }

    async fn put_blob_file(&self, desc: &Descriptor, path: &Path) -> Result<(), RegistryError> {
        if self.has_blob(&desc.digest).await? {
            return Ok(());
        }
        let Some(mut location) = self.start_upload(None, &desc.digest).await? else {
            return Err(RegistryError::Protocol("upload not started".into()));
        };
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| RegistryError::io(path, e))?;
        if desc.size <= UPLOAD_CHUNK {
            let mut bytes = Vec::with_capacity(desc.size as usize);
            tokio::io::AsyncReadExt::read_to_end(&mut file, &mut bytes)
                .await
                .map_err(|e| RegistryError::io(path, e))?;
            check_content(desc, &bytes, &path.display().to_string())?;
            return self
                .finish_upload(&location, &desc.digest, bytes.into())
                .await;
        }
        // Chunked: PATCH each piece with its Content-Range, then PUT the digest.
        let mut sent = 0u64;
        let mut hasher = Hasher::new();
        while sent < desc.size {
            let n = UPLOAD_CHUNK.min(desc.size - sent) as usize;
            let mut chunk = vec![0u8; n];
            tokio::io::AsyncReadExt::read_exact(&mut file, &mut chunk)
                .await
                .map_err(|e| RegistryError::io(path, e))?;
            hasher.update(&chunk);
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(
                header::CONTENT_RANGE,
                header_value(&format!("{}-{}", sent, sent + n as u64 - 1))?,
            );
            let url = resolve_url(self.origin(), &location);
            let resp = self
                .send(
                    Method::PATCH,
                    &url,
                    &headers,
                    chunk.into(),
                    &self.scope(true),
                )
                .await?;
            if resp.status() != StatusCode::ACCEPTED {
                return Err(self.error_for(resp, &url, "blob upload chunk").await);
            }
            location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    RegistryError::Protocol(format!("{url}: PATCH answer without Location"))
                })?
                .to_string();
            sent += n as u64;
        }
        let actual = hasher.finish();
        if actual != desc.digest {
            return Err(RegistryError::DigestMismatch {
                what: path.display().to_string(),
                expected: desc.digest,
                actual,
            });
        }
        self.finish_upload(&location, &desc.digest, Bytes::new())
            .await
    }

    async fn mount_blob(&self, desc: &Descriptor, from: &str) -> Result<bool, RegistryError> {
        if self.has_blob(&desc.digest).await? {
            return Ok(true);
        }
        match self.start_upload(Some(from), &desc.digest).await? {
            None => {
                tracing::info!(digest = %desc.digest, %from, "blob mounted from another repository");
                Ok(true)
            }
            Some(location) => {
                // The registry opened an upload instead: cancel it; the caller uploads.
                let url = resolve_url(self.origin(), &location);
                let _ = self
                    .send(
                        Method::DELETE,
                        &url,
                        &HeaderMap::new(),
                        Bytes::new(),
                        &self.scope(true),
                    )
                    .await;
                Ok(false)
            }
        }
    }

    async fn put_manifest(
        &self,
        tag: Option<&str>,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        let reference = tag.map_or_else(|| digest.to_string(), str::to_string);
        let url = self.url(self.origin(), &format!("manifests/{reference}"));
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, header_value(media_type)?);
        let resp = self
            .send(Method::PUT, &url, &headers, bytes, &self.scope(true))
            .await?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            return Err(self.error_for(resp, &url, "manifest upload").await);
        }
        Ok(digest)
    }
}

impl RegistryClient {
    /// POSTs an upload session; with `mount_from`, first asks for a cross-repository mount.
    /// Returns the upload location, or `None` when the blob was mounted.
    async fn start_upload(
        &self,
        mount_from: Option<&str>,
        digest: &Digest,
    ) -> Result<Option<String>, RegistryError> {
        let mut url = self.url(self.origin(), "blobs/uploads/");
        let mut scope = self.scope(true);
        if let Some(from) = mount_from {
            url.push_str(&format!(
                "?mount={digest}&from={}",
                crate::query::encode(from)
            ));
            scope.push_str(&format!(" repository:{from}:pull"));
        }
        let resp = self
            .send(Method::POST, &url, &HeaderMap::new(), Bytes::new(), &scope)
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount_from.is_some() => Ok(None),
            StatusCode::ACCEPTED => resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(|l| Some(l.to_string()))
                .ok_or_else(|| {
                    RegistryError::Protocol(format!("{url}: upload started without a Location"))
                }),
            _ => Err(self.error_for(resp, &url, "blob upload").await),
        }
    }

    async fn finish_upload(
        &self,
        location: &str,
        digest: &Digest,
        body: Bytes,
    ) -> Result<(), RegistryError> {
        let base = resolve_url(self.origin(), location);
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!(
            "{base}{sep}digest={}",
            crate::query::encode(&digest.to_string())
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let resp = self
            .send(Method::PUT, &url, &headers, body, &self.scope(true))
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.error_for(resp, &url, "blob upload").await);
        }
        Ok(())
    }
}

fn header_value(s: &str) -> Result<HeaderValue, RegistryError> {
    HeaderValue::from_str(s)
        .map_err(|_| RegistryError::Protocol(format!("{s:?} is not a valid header value")))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The first byte of `bytes START-END/TOTAL`.
fn content_range_start(v: &str) -> Option<u64> {
    v.strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `location` resolved against `base` (absolute URLs as they are; absolute paths on base's
/// scheme and host).
fn resolve_url(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let origin_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|i| base[i..].find('/').map(|j| i + j))
        .unwrap_or(base.len());
    if location.starts_with('/') {
        format!("{}{location}", &base[..origin_end])
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|&i| i >= origin_end)
            .unwrap_or(base.len());
        format!("{}/{location}", &base[..dir_end])
    }
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            resolve_url(
                "http://r:5000/v2/a/blobs/uploads/",
                "/v2/a/blobs/uploads/u?_state=x"
            ),
            "http://r:5000/v2/a/blobs/uploads/u?_state=x"
        );
        assert_eq!(resolve_url("http://r:5000", "http://s/x"), "http://s/x");
        assert_eq!(
            resolve_url("http://r:5000/v2/a/x", "y"),
            "http://r:5000/v2/a/y"
        );
        assert_eq!(host_of("https://a.b:1/c"), "a.b:1");
        assert_eq!(content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(content_range_start("items 1-2"), None);
    }
}
