//! The agent's HTTP API (hyper, HTTP/1.1, GET only):
//!
//! - `/healthz`: each part of the agent and how it is doing, as JSON; 503 when one the node
//!   cannot do without (the snapshotter) has failed, else 200 ([`Health`]);
//! - `/metrics`: Prometheus text format ([`metrics`]);
//! - `/v1/starts`, `/v1/flags`, `/v1/pods`: start records, rename-ENXIO flags and pods'
//!   startup timelines (`starts::pods`) from the store, as JSON arrays, filtered by `since`
//!   (Unix seconds, or an age such as `90s`, `15m`, `2h`, `7d`), `namespace`, `pod` and
//!   `image` (a substring of the reference; for pods, of any of their containers').
//!
//! It listens on loopback by default: the records name pods and images.

pub mod metrics;
mod serving_metrics;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;

pub use metrics::Metrics;

use crate::{
    shutdown::Shutdown,
    starts::store::{Filter, Store},
    time::unix_ns,
};

/// What the API serves.
#[derive(Debug)]
pub struct ApiState {
    pub metrics: Arc<Metrics>,
    pub store: Option<Arc<Store>>,
    /// How each part of the agent is doing.
    pub health: Health,
}

/// The agent's parts and how each is doing. `/healthz` answers 503 only when a part the
/// node cannot do without (the snapshotter containerd waits on) has failed: a failed probe
/// or store is reported, per part, while the rest runs, since a liveness probe that
/// restarted the agent for it would take the snapshotter down with it.
#[derive(Debug, Default)]
pub struct Health(std::sync::Mutex<BTreeMap<&'static str, Part>>);

/// How one part is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Running,
    Failed { why: String, critical: bool },
}

impl Health {
    pub fn running(&self, part: &'static str) {
        crate::sync::lock(&self.0).insert(part, Part::Running);
    }

    /// Marks `part` failed, with the error chain of `why`.
    pub fn failed(
        &self,
        part: &'static str,
        why: &(dyn std::error::Error + 'static),
        critical: bool,
    ) {
        let why = crate::error_chain(why);
        tracing::error!(part, error = %why, critical, "an agent part failed; the others go on");
        crate::sync::lock(&self.0).insert(part, Part::Failed { why, critical });
    }

    /// Whether every critical part is up.
    pub fn ok(&self) -> bool {
        !crate::sync::lock(&self.0)
            .values()
            .any(|p| matches!(p, Part::Failed { critical: true, .. }))
    }

    /// Each part as `{"part": "running"}` or `{"part": "failed: why"}`.
    fn report(&self) -> String {
        let parts: BTreeMap<&str, String> = crate::sync::lock(&self.0)
            .iter()
            .map(|(name, part)| {
                let state = match part {
                    Part::Running => "running".to_string(),
                    Part::Failed { why, .. } => format!("failed: {why}"),
                };
                (*name, state)
            })
            .collect();
        serde_json::to_string_pretty(&parts).unwrap_or_default() + "\n"
    }
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("listening on {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// Binds `addr` and serves until `shutdown`; returns the bound address once listening.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<ApiState>,
    shutdown: Shutdown,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ApiError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ApiError::Bind(addr, e))?;
    let bound = listener.local_addr().map_err(|e| ApiError::Bind(addr, e))?;
    tracing::info!(addr = %bound, "HTTP API listening");
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.triggered() => break,
            };
            let Ok((stream, _)) = accepted else { continue };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                let _ = conn.await;
            });
        }
    });
    Ok((bound, task))
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn route(state: &ApiState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    let json = "application/json";
    match req.uri().path() {
        "/healthz" => {
            let status = if state.health.ok() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(status, "application/json", state.health.report())
        }
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
        path @ ("/v1/starts" | "/v1/flags" | "/v1/pods") => {
            let filter = match parse_filter(req.uri().query().unwrap_or("")) {
                Ok(filter) => filter,
                Err(why) => {
                    return respond(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n"));
                }
            };
            let Some(store) = &state.store else {
                return respond(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "this agent keeps no store\n",
                );
            };
            let body = match path {
                "/v1/starts" => store.starts(&filter).map(|r| serde_json::to_vec(&r)),
                "/v1/pods" => store.timelines(&filter).map(|r| serde_json::to_vec(&r)),
                _ => store.flags(&filter).map(|r| serde_json::to_vec(&r)),
            };
            match body {
                Ok(Ok(bytes)) => respond(StatusCode::OK, json, bytes),
                Ok(Err(err)) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{err}\n"),
                ),
                Err(err) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{err}\n"),
                ),
            }
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The query string that [`parse_filter`] reads back as `filter` (what the report client
/// asks the API for).
pub fn filter_query(filter: &Filter) -> String {
    let since = filter.since_ns.map(|ns| (ns as f64 / 1e9).to_string());
    let pairs = [
        ("since", since.as_deref()),
        ("namespace", filter.namespace.as_deref()),
        ("pod", filter.pod.as_deref()),
        ("image", filter.image.as_deref()),
    ];
    crate::query::build(
        pairs
            .into_iter()
            .filter_map(|(key, value)| Some((key, value?))),
    )
}

/// Parses `since`, `namespace`, `pod` and `image` from a query string.
pub fn parse_filter(query: &str) -> Result<Filter, String> {
    let mut filter = Filter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = crate::query::decode(value).ok_or_else(|| format!("bad escape in {key}"))?;
        match key {
            "since" => filter.since_ns = Some(parse_since(&value)?),
            "namespace" => filter.namespace = Some(value),
            "pod" => filter.pod = Some(value),
            "image" => filter.image = Some(value),
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(filter)
}

/// Unix seconds (`1700000000`, `1700000000.5`), or an age (`90s`, `15m`, `2h`, `7d`).
pub fn parse_since(value: &str) -> Result<u64, String> {
    let bad = || format!("since={value:?}: Unix seconds, or an age like 15m, 2h, 7d");
    let unit = value.chars().last().ok_or_else(bad)?;
    let scale = match unit {
        's' => Some(1.0),
        'm' => Some(60.0),
        'h' => Some(3600.0),
        'd' => Some(86400.0),
        _ => None,
    };
    match scale {
        Some(scale) => {
            let n: f64 = value[..value.len() - 1].parse().map_err(|_| bad())?;
            if !n.is_finite() || n < 0.0 {
                return Err(bad());
            }
            let age = Duration::from_secs_f64((n * scale).min(1e10));
            let at = SystemTime::now()
                .checked_sub(age)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            Ok(unix_ns(at))
        }
        None => {
            let secs: f64 = value.parse().map_err(|_| bad())?;
            if !secs.is_finite() || secs < 0.0 {
                return Err(bad());
            }
            Ok((secs.min(1e10) * 1e9) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_clients_query_reads_back_as_its_filter() {
        let filter = Filter {
            since_ns: Some(1_700_000_000_500_000_000),
            namespace: Some("shop & co".into()),
            pod: Some("web-1".into()),
            image: Some("r:5000/a/b:1".into()),
        };
        let query = filter_query(&filter);
        assert_eq!(
            query,
            "since=1700000000.5&namespace=shop%20%26%20co&pod=web-1&image=r%3A5000%2Fa%2Fb%3A1"
        );
        assert_eq!(parse_filter(&query).unwrap(), filter);
        assert_eq!(filter_query(&Filter::default()), "");
    }

    #[test]
    fn filters_parse_and_bad_ones_are_refused() {
        let f =
            parse_filter("namespace=kube-system&pod=web%2D1&image=nginx&since=1700000000").unwrap();
        assert_eq!(f.namespace.as_deref(), Some("kube-system"));
        assert_eq!(f.pod.as_deref(), Some("web-1"));
        assert_eq!(f.since_ns, Some(1_700_000_000_000_000_000));
        let age = parse_filter("since=2h").unwrap().since_ns.unwrap();
        let two_hours_ago = unix_ns(SystemTime::now()) - 7200 * 1_000_000_000;
        assert!(age.abs_diff(two_hours_ago) < 5_000_000_000);
        for bad in [
            "since=",
            "since=x",
            "since=-1h",
            "since=NaN",
            "bogus=1",
            "pod=%zz",
            "pod=%e2%28",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }
}
