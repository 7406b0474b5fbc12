//! One request to a registry: credentials (a Basic header, or a bearer token fetched from the
//! challenge's realm), redirects (credentials never follow to another host), the deadline,
//! and reading bodies within bounds.

use bytes::Bytes;
use std::time::Instant;

use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::{
    ANY_SCOPE, Attempt, LOCATION_TTL, Location, MAX_LOCATIONS, MAX_REDIRECTS, RegistryClient, auth,
    url,
};
use crate::registry::{
    RegistryError,
    http::{Challenge, parse_challenge},
};

/// The most of a version check's answer [`RegistryClient::preconnect_to_first_endpoint`]
/// reads; a longer one ends its connection.
const PRECONNECT_BODY: u64 = 64 << 10;
/// Connections one preconnect opens at most.
const MAX_PRECONNECT: usize = 64;

/// Statuses that another try may change: server errors, throttling, a request timeout.
fn retryable_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

impl RegistryClient {
    /// Sends one request to `url` with retries, authentication and redirects; returns the
    /// first answer another try would not change (whatever its status) or the last error. A
    /// 401 is answered with credentials once per request, within the same try.
    pub(super) async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        body: Bytes,
        scope: &str,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut authenticated = false;
        retrying!(self, url, {
            let result = self
                .send_authenticated(&method, url, headers, &body, scope, &mut authenticated)
                .await;
            match &result {
                Ok(resp) if retryable_status(resp.status()) => Attempt::Again(result),
                Ok(_) => Attempt::Done(result),
                Err(e) if e.is_retryable() => Attempt::Again(result),
                Err(_) => Attempt::Done(result),
            }
        })
    }

    /// One try of a request: on its first 401 (per `authenticated`), the challenge is
    /// answered and the request sent again.
    async fn send_authenticated(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        body: &Bytes,
        scope: &str,
        authenticated: &mut bool,
    ) -> Result<Response<Incoming>, RegistryError> {
        let resp = self
            .send_once(method.clone(), url, headers, body.clone(), scope)
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED || *authenticated {
            return Ok(resp);
        }
        *authenticated = true;
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        if self.credentials().is_none() {
            // First use: what kubelet handed over since, or a plugin's.
            self.renew_credentials(None).await;
        }
        let used = self.credentials();
        match self.authenticate(challenge.clone(), scope, url).await {
            // The token realm refused the credentials: expired, most likely.
            Err(RegistryError::Unauthorized { .. })
                if self.renew_credentials(used.as_ref()).await =>
            {
                self.authenticate(challenge.clone(), scope, url).await?
            }
            other => other?,
        }
        let used = self.credentials();
        let resp = self
            .send_once(method.clone(), url, headers, body.clone(), scope)
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED || !self.renew_credentials(used.as_ref()).await
        {
            return Ok(resp);
        }
        // The registry itself refused them (Basic): once more with the renewed ones.
        self.authenticate(challenge, scope, url).await?;
        self.send_once(method.clone(), url, headers, body.clone(), scope)
            .await
    }

    /// One request, following redirects, with the deadline applied to getting the headers. A
    /// blob GET goes straight to where the registry redirected the blob's last GET, while
    /// that is fresh ([`LOCATION_TTL`]); a location that fails is forgotten and the
    /// registry asked again, in this same call.
    pub(super) async fn send_once(
        &self,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        body: Bytes,
        scope: &str,
    ) -> Result<Response<Incoming>, RegistryError> {
        let blob = method == Method::GET && self.is_blob_url(url);
        if let Some(location) = blob.then(|| self.location(url)).flatten() {
            let auth = location
                .with_auth
                .then(|| self.auth_header(url, scope))
                .flatten();
            let tried = self
                .follow(method.clone(), &location.url, headers, &body, auth)
                .await;
            match tried {
                Ok((resp, _, _)) if resp.status().is_success() => return Ok(resp),
                Ok((resp, ..)) => {
                    tracing::debug!(
                        url,
                        status = resp.status().as_u16(),
                        "a blob's redirected location failed: asking the registry again"
                    );
                }
                Err(err) => {
                    tracing::debug!(url, %err, "a blob's redirected location failed: asking the registry again");
                }
            }
            crate::sync::lock(&self.locations).remove(url);
        }
        let auth = self.auth_header(url, scope);
        let (resp, last, with_auth) = self.follow(method, url, headers, &body, auth).await?;
        if blob && last != url && resp.status().is_success() {
            self.remember_location(url, last, with_auth);
        }
        Ok(resp)
    }

    /// [`BlobSource::preconnect`]: `n` requests for the API's version check (`GET /v2/`,
    /// answered 200, or 401 where it wants credentials, which are not sent) side by side at
    /// the first endpoint, where blobs are asked for first, each answer read through so that
    /// its connection goes back to the shared pool. Where connections are idle already, the
    /// requests take them and open no new one.
    pub(super) async fn preconnect_to_first_endpoint(&self, n: usize) {
        let Some(endpoint) = self.endpoints.first() else {
            return;
        };
        let url = format!("{endpoint}/v2/");
        let one = || async {
            if let Ok((resp, ..)) = self
                .follow(Method::GET, &url, &HeaderMap::new(), &Bytes::new(), None)
                .await
            {
                let _ = self.read_small(resp, PRECONNECT_BODY, &url).await;
            }
        };
        let mut pending: Vec<_> = (0..n.min(MAX_PRECONNECT))
            .map(|_| Box::pin(one()))
            .collect();
        std::future::poll_fn(|cx| {
            pending.retain_mut(|request| request.as_mut().poll(cx).is_pending());
            if pending.is_empty() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }

    /// Whether `url` names one of this repository's blobs (a GET of it may be redirected to
    /// object storage), not an upload session.
    fn is_blob_url(&self, url: &str) -> bool {
        let blobs = format!("/v2/{}/blobs/", self.repository);
        url.contains(&blobs) && !url.contains(&format!("{blobs}uploads/"))
    }

    /// The fresh location a GET of the blob at `url` was redirected to, if any.
    fn location(&self, url: &str) -> Option<Location> {
        let locations = crate::sync::lock(&self.locations);
        locations
            .get(url)
            .filter(|l| l.learnt.elapsed() < LOCATION_TTL)
            .cloned()
    }

    fn remember_location(&self, url: &str, last: String, with_auth: bool) {
        let mut locations = crate::sync::lock(&self.locations);
        if locations.len() >= MAX_LOCATIONS {
            locations.retain(|_, l| l.learnt.elapsed() < LOCATION_TTL);
            if locations.len() >= MAX_LOCATIONS {
                locations.clear();
            }
        }
        locations.insert(
            url.to_string(),
            Location {
                url: last,
                with_auth,
                learnt: Instant::now(),
            },
        );
    }

    /// `url` asked, its redirects followed: the answer, the URL that gave it, and whether
    /// `auth` was still sent there (the chain never left `url`'s origin).
    async fn follow(
        &self,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        body: &Bytes,
        mut auth: Option<String>,
    ) -> Result<(Response<Incoming>, String, bool), RegistryError> {
        let mut url = url.to_string();
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
            let req =
                req.body(Full::new(body.clone()))
                    .map_err(|source| RegistryError::BadRequest {
                        url: url.clone(),
                        source,
                    })?;
            let secs = self.config.timeout.as_secs();
            let asked = std::time::Instant::now();
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
            tracing::trace!(
                target: "imgstream::http",
                %method,
                url,
                range = ?headers.get(header::RANGE),
                status = resp.status().as_u16(),
                secs = asked.elapsed().as_secs_f64(),
                "registry answered"
            );
            if resp.status().is_redirection()
                && let Some(location) = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
            {
                let next = url::resolve_or_err(&url, location)?;
                // Credentials stay with the endpoint: never sent to another host, nor in the
                // clear after an https -> http redirect.
                if url::origin_of(&next) != url::origin_of(&url) {
                    auth = None;
                }
                url = next;
                continue;
            }
            let with_auth = auth.is_some();
            return Ok((resp, url, with_auth));
        }
        Err(RegistryError::TooManyRedirects {
            url,
            limit: MAX_REDIRECTS,
        })
    }

    /// What to authorise a request to `url` with: what that endpoint's challenge got for
    /// `scope`, else for any scope. A token a mirror's realm gave is the mirror's, the origin's
    /// is the origin's.
    fn auth_header(&self, url: &str, scope: &str) -> Option<String> {
        let auth = crate::sync::lock(&self.auth);
        auth.get(&auth_key(url, scope))
            .or_else(|| auth.get(&auth_key(url, ANY_SCOPE)))
            .cloned()
    }

    /// Whether `url` is on the origin (the registry the configured credentials are for), not
    /// a mirror.
    fn is_origin(&self, url: &str) -> bool {
        url::origin_of(url) == url::origin_of(self.origin())
    }

    /// Whether the configured credentials may go to token realm `realm`: over https, or to a
    /// host the operator allowed plain HTTP for (`--insecure-registry`, port aside).
    fn realm_trusted(&self, realm: &str) -> bool {
        url::is_https(realm)
            || self
                .config
                .insecure
                .iter()
                .any(|allowed| url::host(&format!("http://{allowed}")) == url::host(realm))
    }

    /// Answers a 401: stores a Basic header or fetches a bearer token for `scope`.
    pub(super) async fn authenticate(
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
                if !self.is_origin(url) {
                    return Err(unauthorized(
                        "a mirror asks for credentials: the configured ones are the origin's and go nowhere else",
                    ));
                }
                let creds = self.credentials().ok_or_else(|| {
                    unauthorized("the registry wants credentials and none are configured")
                })?;
                crate::sync::lock(&self.auth)
                    .insert(auth_key(url, ANY_SCOPE), creds.basic_header());
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
                if let Some(creds) = self.credentials() {
                    if !self.is_origin(url) {
                        tracing::debug!(%url, "a mirror's token realm gets no credentials: an anonymous token is asked for");
                    } else if !self.realm_trusted(&realm) {
                        tracing::warn!(%realm, "token realm is plain HTTP on a host not allowed insecure: credentials withheld, an anonymous token is asked for");
                    } else {
                        headers.insert(
                            header::AUTHORIZATION,
                            url::header_value(&creds.basic_header())?,
                        );
                    }
                }
                let secs = self.config.timeout.as_secs();
                let req = {
                    let mut r = Request::get(&token_url);
                    for (k, v) in &headers {
                        r = r.header(k, v);
                    }
                    r.body(Full::new(Bytes::new()))
                        .map_err(|source| RegistryError::BadRequest {
                            url: token_url.clone(),
                            source,
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
                        detail: url::snippet(&body),
                    });
                }
                let token = auth::token_from_response(&body)
                    .ok_or_else(|| unauthorized("the token server's answer has no token"))?;
                crate::sync::lock(&self.auth)
                    .insert(auth_key(url, scope), format!("Bearer {token}"));
                Ok(())
            }
            None => Err(unauthorized(
                "401 without a usable WWW-Authenticate challenge",
            )),
        }
    }

    /// Turns a non-success answer into an error (reading a little of its body).
    pub(super) async fn error_for(
        &self,
        resp: Response<Incoming>,
        url: &str,
        what: &str,
    ) -> RegistryError {
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
                detail: url::snippet(&body),
            },
            _ => RegistryError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: url::snippet(&body),
            },
        }
    }

    /// Reads a whole body of at most `limit` bytes within the request deadline.
    pub(super) async fn read_small(
        &self,
        resp: Response<Incoming>,
        limit: u64,
        url: &str,
    ) -> Result<Bytes, RegistryError> {
        if let Some(len) = url::content_length(resp.headers())
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
    pub(super) async fn stream_body<S>(
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
}

/// Stored authorisation is per endpoint (scheme, host and port) and scope.
fn auth_key(url: &str, scope: &str) -> String {
    format!("{} {scope}", url::origin_of(url))
}
