//! The OCI distribution client (hyper 1, HTTP/1.1, rustls).
//!
//! One [`RegistryClient`] serves one repository. Every request has a deadline; connection
//! errors, timeouts, 5xx and 429 answers are retried a bounded number of times with
//! exponential backoff; a 401 is answered once per request with credentials (Basic) or a
//! token fetched from the challenge's realm (Bearer), and credentials the registry or its
//! realm refuse are renewed once (kubelet's newer ones, or a credential provider plugin's:
//! [`super::provider`]) before the refusal stands. Reads try the configured mirrors in
//! order and fall back to the origin; writes go to the origin only. Every whole blob and every
//! manifest fetched by digest is checked against its digest and size. Clients made from one
//! [`HttpConfig`] share their open connections ([`Connections`]).
//!
//! Rooms: this file (configuration, the client, the endpoint-fallback and retry helpers),
//! `request` (one request: authentication, redirects, deadlines, bodies), `pull`
//! ([`BlobSource`]), `push` ([`BlobSink`]), `url` (locations and headers), `auth`
//! (credentials and challenges).

mod auth;
mod url;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

pub use auth::{Challenge, Credentials, parse_challenge};

use super::{BlobSource as _, RegistryError};

/// Blobs up to this size are uploaded in one PUT; larger ones in PATCH chunks of this size.
const UPLOAD_CHUNK: u64 = 16 << 20;
/// Redirects followed per request (registries send blob GETs to object storage).
const MAX_REDIRECTS: usize = 5;
/// How long a blob's redirected location is used without asking the registry again: object
/// stores sign those URLs for minutes (distribution's S3 and CloudFront middleware: 20), and
/// one that fails before is dropped and asked for again.
const LOCATION_TTL: Duration = Duration::from_secs(60);
/// Blobs whose locations one client remembers at most.
const MAX_LOCATIONS: usize = 256;
/// Refused credentials a client remembers, not to take them from the keyring again.
const REFUSED_KEPT: usize = 4;
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
    /// Credentials kubelet handed over for a repository (the CRI image proxy's), asked
    /// before `auth_file`.
    pub keyring: Option<std::sync::Arc<super::keyring::Keyring>>,
    /// kubelet's credential provider plugins, asked when there are no credentials and again
    /// when the registry refuses the ones in use.
    pub providers: Option<std::sync::Arc<super::provider::CredentialProviders>>,
    /// Deadline of one request, including reading a small body; for large bodies, the longest
    /// wait for the next piece.
    pub timeout: Duration,
    /// Attempts after the first for retryable failures.
    pub retries: u32,
    /// First backoff; doubles per attempt.
    pub backoff: Duration,
    /// Open connections, shared by every client made from this configuration or a clone.
    pub connections: Connections,
}

/// Connections kept open between requests, shared by the clients made from one
/// [`HttpConfig`] and its clones: the snapshotter opens a client per layer, and each of an
/// image's layers, and the next image from the same registry, then goes on an open connection
/// instead of paying a connection (and a TLS handshake) of its own, round trips before its
/// first byte. A new configuration starts with none. Each registry's round trips, as its
/// clients measured them, are shared the same way: a layer's new client knows how far its
/// registry is before its first answer.
#[derive(Clone, Default)]
pub struct Connections {
    http: Arc<OnceLock<(Vec<PathBuf>, HyperClient)>>,
    round_trips: Arc<Mutex<HashMap<String, Arc<super::RoundTrips>>>>,
}

/// Registries whose round trips [`Connections`] keeps at most; more start afresh.
const MAX_REGISTRIES: usize = 64;

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("opened", &self.http.get().is_some())
            .finish()
    }
}

impl Connections {
    /// The HTTP client of `config`: the shared one when it trusts the same certificates,
    /// else one of its own.
    fn client(&self, config: &HttpConfig) -> Result<HyperClient, RegistryError> {
        if let Some((ca_files, http)) = self.http.get()
            && *ca_files == config.ca_files
        {
            return Ok(http.clone());
        }
        let http = build_http(config)?;
        // Two clients made at once: the first one set is shared, the other stays private.
        let _ = self.http.set((config.ca_files.clone(), http.clone()));
        Ok(http)
    }

    /// The round trips measured to `registry` by the clients sharing these connections.
    fn round_trips(&self, registry: &str) -> Arc<super::RoundTrips> {
        let mut all = crate::sync::lock(&self.round_trips);
        if all.len() >= MAX_REGISTRIES && !all.contains_key(registry) {
            all.clear();
        }
        all.entry(registry.to_string()).or_default().clone()
    }
}

impl Default for HttpConfig {
    /// No credentials file: the binary supplies docker's default location, since nothing
    /// below it reads the environment.
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            ca_files: Vec::new(),
            mirrors: BTreeMap::new(),
            auth_file: None,
            keyring: None,
            providers: None,
            timeout: Duration::from_secs(30),
            retries: 3,
            backoff: Duration::from_millis(200),
            connections: Connections::default(),
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
    /// What answers challenges: kept credentials, a plugin's, or the docker config's; renewed
    /// when refused (see [`RegistryClient::renew_credentials`]).
    credentials: Mutex<Option<Credentials>>,
    /// Credentials refused lately (the last [`REFUSED_KEPT`]), never taken from the keyring
    /// again: kubelet's stay there after they expire.
    refused: Mutex<std::collections::VecDeque<Credentials>>,
    /// `Authorization` values learnt from challenges, by endpoint (scheme, host, port) and
    /// then by scope for bearer tokens, under [`ANY_SCOPE`] for Basic.
    auth: Mutex<BTreeMap<String, String>>,
    config: HttpConfig,
    /// Times to first byte of range requests.
    round_trips: Arc<super::RoundTrips>,
    /// Where blob GETs were redirected to lately, by the blob's URL on the registry: the next
    /// range of the blob goes there at once, one round trip instead of two
    /// ([`LOCATION_TTL`]).
    locations: Mutex<HashMap<String, Location>>,
}

/// A blob's redirected location, as a redirect chain ended.
#[derive(Clone, Debug)]
struct Location {
    url: String,
    /// The registry's credentials were still sent at the chain's end (it never left the
    /// registry's origin).
    with_auth: bool,
    learnt: Instant,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("repository", &self.name())
            .finish_non_exhaustive()
    }
}

/// What one try of a request came to.
enum Attempt<T> {
    /// Final: a success, or an answer another try would not change.
    Done(T),
    /// Worth another try after a backoff; returned as it is once no tries are left.
    Again(T),
}

impl<T> Attempt<Result<T, RegistryError>> {
    /// Retry what [`RegistryError::is_retryable`] says may succeed.
    fn of(result: Result<T, RegistryError>) -> Self {
        match &result {
            Err(e) if e.is_retryable() => Self::Again(result),
            _ => Self::Done(result),
        }
    }
}

/// Builds a TLS-capable HTTP client (see [`Connections`] for who shares it).
fn build_http(config: &HttpConfig) -> Result<HyperClient, RegistryError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in &config.ca_files {
        let pem = std::fs::read(path).map_err(|e| RegistryError::io(path, e))?;
        let mut found = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| RegistryError::io(path, e))?;
            roots.add(cert).map_err(|e| RegistryError::Tls {
                what: format!("the CA certificate in {}", path.display()),
                source: e,
            })?;
            found += 1;
        }
        if found == 0 {
            return Err(RegistryError::NoCertificate(path.clone()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Tls {
            what: "the TLS configuration".into(),
            source: e,
        })?
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
        let kept = config
            .keyring
            .as_ref()
            .and_then(|keyring| keyring.get(registry, repository));
        let credentials = match (kept, &config.auth_file) {
            (Some(kept), _) => Some(kept),
            (None, Some(path)) => Credentials::from_docker_config(path, registry)?,
            (None, None) => None,
        };
        let round_trips = config.connections.round_trips(registry);
        Ok(Self {
            http: config.connections.client(&config)?,
            registry: registry.to_string(),
            repository: repository.to_string(),
            endpoints,
            credentials: Mutex::new(credentials),
            refused: Mutex::new(std::collections::VecDeque::new()),
            auth: Mutex::new(BTreeMap::new()),
            config,
            round_trips,
            locations: Mutex::new(HashMap::new()),
        })
    }

    /// Uses these credentials instead of any from the config file.
    pub fn with_credentials(self, credentials: Credentials) -> Self {
        *crate::sync::lock(&self.credentials) = Some(credentials);
        self
    }

    /// The credentials challenges are answered with now.
    fn credentials(&self) -> Option<Credentials> {
        crate::sync::lock(&self.credentials).clone()
    }

    /// Replaces `refused`, the credentials a request just used (or none), with fresher ones:
    /// what kubelet handed over since, else what a credential provider plugin answers.
    /// Returns whether there are other ones to try (a concurrent request may have renewed
    /// them already).
    async fn renew_credentials(&self, refused: Option<&Credentials>) -> bool {
        let current = self.credentials();
        if current.as_ref() != refused {
            return current.is_some();
        }
        if let Some(refused) = refused {
            let mut list = crate::sync::lock(&self.refused);
            if !list.contains(refused) {
                if list.len() == REFUSED_KEPT {
                    list.pop_front();
                }
                list.push_back(refused.clone());
            }
        }
        let kept = self
            .config
            .keyring
            .as_ref()
            .and_then(|keyring| keyring.get(&self.registry, &self.repository))
            .filter(|kept| !crate::sync::lock(&self.refused).contains(kept));
        let fresh = match kept {
            Some(kept) => Some(kept),
            _ => match &self.config.providers {
                Some(providers) => {
                    let image = format!("{}/{}", self.registry, self.repository);
                    match providers.credentials(&image, refused).await {
                        Ok(fresh) => fresh,
                        Err(e) => {
                            let error = crate::error_chain(&e);
                            tracing::warn!(%image, %error, "no fresh credentials from the credential provider plugins");
                            None
                        }
                    }
                }
                None => None,
            },
        };
        let Some(fresh) = fresh else {
            return false;
        };
        *crate::sync::lock(&self.credentials) = Some(fresh);
        true
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

    fn url(&self, endpoint: &str, tail: &str) -> String {
        format!("{endpoint}/v2/{}/{tail}", self.repository)
    }

    /// Waits before try `tries + 1` of a request to `url`: exponential backoff.
    async fn backoff(&self, tries: u32, url: &str) {
        let wait = self.config.backoff * 2u32.saturating_pow(tries);
        tracing::debug!(%url, attempt = tries, ?wait, "retrying registry request");
        tokio::time::sleep(wait).await;
    }
}

/// The endpoints' failures so far, for [`on_endpoints!`].
#[derive(Default)]
struct Fallback {
    last: Option<(String, RegistryError)>,
}

impl Fallback {
    /// Records an endpoint's failure (logged when there are mirrors to fall back on).
    fn failed(&mut self, client: &RegistryClient, endpoint: &str, err: RegistryError) {
        if client.endpoints.len() > 1 {
            let error = crate::error_chain(&err);
            tracing::warn!(%endpoint, %error, "registry endpoint failed; trying the next");
        }
        self.last = Some((endpoint.to_string(), err));
    }

    /// The error once every endpoint failed: the origin's own when there are no mirrors,
    /// else [`RegistryError::AllEndpointsFailed`] with the last one as its source.
    fn into_error(self, client: &RegistryClient) -> RegistryError {
        let Some((last_endpoint, err)) = self.last else {
            return RegistryError::NoEndpoint;
        };
        if client.endpoints.len() == 1 {
            err
        } else {
            RegistryError::AllEndpointsFailed {
                last_endpoint,
                source: Box::new(err),
            }
        }
    }
}

/// `$body` (a `Result`, which may `.await`) for each endpoint `$endpoint` of `$client` in
/// turn, mirrors first and the origin last, until one succeeds: the one fallback rule of
/// every read. A macro rather than a function taking an async closure, because such a
/// closure's future cannot be proven `Send` inside `#[async_trait]` methods (rust#64552).
macro_rules! on_endpoints {
    ($client:expr, |$endpoint:ident| $body:expr) => {{
        let client: &RegistryClient = $client;
        let mut fallback = Fallback::default();
        let mut found = None;
        for $endpoint in client.endpoints.iter().map(String::as_str) {
            match $body {
                Ok(value) => {
                    found = Some(value);
                    break;
                }
                Err(err) => fallback.failed(client, $endpoint, err),
            }
        }
        match found {
            Some(value) => Ok(value),
            None => Err(fallback.into_error(client)),
        }
    }};
}

/// `$attempt` (an [`Attempt`], which may `.await`) until it is done or `$client`'s retries
/// are spent, with exponential backoff between tries: the one retry rule of every request.
/// A macro for the reason [`on_endpoints!`] is one.
macro_rules! retrying {
    ($client:expr, $url:expr, $attempt:expr) => {{
        let client: &RegistryClient = $client;
        let mut tries = 0u32;
        loop {
            match $attempt {
                Attempt::Done(value) => break value,
                Attempt::Again(value) if tries >= client.config.retries => break value,
                Attempt::Again(_) => {
                    client.backoff(tries, $url).await;
                    tries += 1;
                }
            }
        }
    }};
}

// After the macros: textual order makes them visible in these rooms.
mod pull;
mod push;
mod request;
