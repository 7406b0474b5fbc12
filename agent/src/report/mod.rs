//! `imgstream report`: start latencies per image and per namespace (p50, p90, p99, max of
//! create -> start, start -> first log line, and create -> first log line), containers that
//! never logged, pods flagged for rename-ENXIO, and a comparison of groups (streamed against
//! fully pulled images, say), as a table, as JSON, or as a CDF chart in SVG.

pub mod pods;
pub mod svg;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::starts::{StartRecord, store::FlagRecord};

/// How to split records into the groups compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Namespace,
    Image,
    /// The value of a container label.
    Label(String),
    /// Images whose reference contains the pattern, against the rest.
    ImageMatch(String),
    /// How the pull before the container was served (`streamed`, `partly-streamed`,
    /// `unpacked`), from the CRI image proxy: for pods' timelines.
    Served,
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "namespace" => Ok(Self::Namespace),
            None if s == "image" => Ok(Self::Image),
            None if s == "served" => Ok(Self::Served),
            Some(("label", key)) if !key.is_empty() => Ok(Self::Label(key.into())),
            Some(("image", pattern)) if !pattern.is_empty() => Ok(Self::ImageMatch(pattern.into())),
            _ => Err(format!(
                "{s:?}: one of namespace, image, served, label:KEY, image:PATTERN"
            )),
        }
    }
}

impl std::fmt::Display for GroupBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Namespace => write!(f, "namespace"),
            Self::Image => write!(f, "image"),
            Self::Label(key) => write!(f, "label {key}"),
            Self::ImageMatch(pattern) => write!(f, "images matching {pattern:?} or not"),
            Self::Served => write!(f, "how the pull was served"),
        }
    }
}

impl GroupBy {
    /// The group of a record.
    pub fn key(&self, r: &StartRecord) -> String {
        let or_none = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(none)".into());
        match self {
            Self::Namespace => or_none(r.pod.namespace.as_ref()),
            Self::Image => or_none(r.image.as_ref()),
            Self::Label(key) => or_none(r.labels.get(key)),
            Self::ImageMatch(pattern) => {
                if r.image
                    .as_deref()
                    .is_some_and(|i| i.contains(pattern.as_str()))
                {
                    format!("image ~ {pattern}")
                } else {
                    format!("image !~ {pattern}")
                }
            }
            // A start record does not know its pull: see `report --pods`.
            Self::Served => "(unknown)".into(),
        }
    }
}

/// p50, p90, p99 and max of one measure, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Quantiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Quantiles {
    /// Nearest-rank quantiles of `values` (empty gives zeros with count 0).
    pub fn of(mut values: Vec<f64>) -> Self {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
            values[i - 1]
        };
        Self {
            count: values.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// Latencies of one group.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GroupStats {
    pub group: String,
    pub containers: usize,
    pub never_logged: usize,
    pub create_to_start: Quantiles,
    pub start_to_first_log: Quantiles,
    pub total: Quantiles,
}

fn stats(group: String, records: &[&StartRecord]) -> GroupStats {
    let measure = |f: fn(&StartRecord) -> Option<f64>| {
        Quantiles::of(records.iter().filter_map(|r| f(r)).collect())
    };
    GroupStats {
        group,
        containers: records.len(),
        never_logged: records.iter().filter(|r| r.never_logged()).count(),
        create_to_start: measure(StartRecord::create_to_start),
        start_to_first_log: measure(StartRecord::start_to_first_log),
        total: measure(StartRecord::total),
    }
}

/// Stats per group, groups in name order.
pub fn grouped(records: &[StartRecord], by: &GroupBy) -> Vec<GroupStats> {
    let mut groups: BTreeMap<String, Vec<&StartRecord>> = BTreeMap::new();
    for r in records {
        groups.entry(by.key(r)).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|(group, rs)| stats(group, &rs))
        .collect()
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub containers: usize,
    pub never_logged: usize,
    pub by_image: Vec<GroupStats>,
    pub by_namespace: Vec<GroupStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
    pub flags: Vec<FlagRecord>,
}

/// Groups side by side, each against the first.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub by: String,
    pub groups: Vec<GroupStats>,
    /// Each group's median create -> first log line over the first group's.
    pub total_p50_ratio: Vec<Option<f64>>,
}

impl Report {
    pub fn build(
        records: &[StartRecord],
        flags: Vec<FlagRecord>,
        compare: Option<&GroupBy>,
    ) -> Self {
        let comparison = compare.map(|by| {
            let groups = grouped(records, by);
            let base = groups.first().map(|g| g.total.p50).unwrap_or(0.0);
            let total_p50_ratio = groups
                .iter()
                .map(|g| (base > 0.0 && g.total.count > 0).then(|| g.total.p50 / base))
                .collect();
            Comparison {
                by: by.to_string(),
                groups,
                total_p50_ratio,
            }
        });
        Self {
            containers: records.len(),
            never_logged: records.iter().filter(|r| r.never_logged()).count(),
            by_image: grouped(records, &GroupBy::Image),
            by_namespace: grouped(records, &GroupBy::Namespace),
            comparison,
            flags,
        }
    }

    /// The report as aligned text tables.
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "{} container starts, {} never wrote a log line\n",
            self.containers, self.never_logged
        );
        for (title, groups) in [("image", &self.by_image), ("namespace", &self.by_namespace)] {
            out.push_str(&format!("\nby {title}\n"));
            out.push_str(&table(title, groups));
        }
        if let Some(c) = &self.comparison {
            out.push_str(&format!("\ncomparison ({})\n", c.by));
            out.push_str(&table("group", &c.groups));
            for (g, ratio) in c.groups.iter().zip(&c.total_p50_ratio) {
                if let Some(ratio) = ratio {
                    out.push_str(&format!(
                        "  {}: median create->first log is {ratio:.2}x that of {}\n",
                        g.group, c.groups[0].group
                    ));
                }
            }
        }
        out.push_str(&format!(
            "\npods flagged for rename-ENXIO: {}\n",
            self.flags.len()
        ));
        for f in &self.flags {
            out.push_str(&format!(
                "  {}  {}/{}  container {}  {} -> {} ({}{})\n",
                f.time,
                f.pod.namespace.as_deref().unwrap_or("-"),
                f.pod.name.as_deref().unwrap_or("-"),
                f.pod
                    .container
                    .as_deref()
                    .or(f.container_id.as_deref())
                    .unwrap_or("-"),
                f.path,
                f.new_path,
                f.syscall,
                if f.confirmed { "" } else { ", unconfirmed" }
            ));
        }
        out
    }
}

pub(crate) fn ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.1}s")
    } else {
        format!("{:.1}ms", v * 1e3)
    }
}

fn table(title: &str, groups: &[GroupStats]) -> String {
    let head = [
        title,
        "n",
        "no log",
        "create->start p50/p90/p99/max",
        "start->first log p50/p90/p99/max",
        "total p50/p90/p99/max",
    ]
    .map(String::from)
    .to_vec();
    let rows = groups.iter().map(|g| {
        vec![
            g.group.clone(),
            g.containers.to_string(),
            g.never_logged.to_string(),
            g.create_to_start.cell(),
            g.start_to_first_log.cell(),
            g.total.cell(),
        ]
    });
    aligned(std::iter::once(head).chain(rows))
}

impl Quantiles {
    /// `p50 p90 p99 max` as a table cell, `-` when nothing was measured.
    pub(crate) fn cell(&self) -> String {
        if self.count == 0 {
            "-".to_string()
        } else {
            format!(
                "{} {} {} {}",
                ms(self.p50),
                ms(self.p90),
                ms(self.p99),
                ms(self.max)
            )
        }
    }
}

/// Rows (the head first) as left-aligned columns.
pub(crate) fn aligned(rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    let mut widths: Vec<usize> = Vec::new();
    for row in &rows {
        widths.resize(widths.len().max(row.len()), 0);
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::from(" ");
        for (cell, w) in row.iter().zip(&widths) {
            line.push_str(&format!(" {cell:<w$} "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Errors getting the records.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "asking the agent at {url}: {why} (is `imgstream agent` running with its API there? Or read its store with --store while it is stopped)"
    )]
    Api { url: String, why: String },
    #[error(transparent)]
    Store(#[from] crate::starts::store::StoreError),
}

/// Where `imgstream report` reads records.
#[derive(Clone, Debug)]
pub enum RecordSource {
    /// A running agent's HTTP API (`http://HOST:PORT`).
    Api(String),
    /// The agent's store, read directly (only while no agent has it open).
    Store(std::path::PathBuf),
}

/// `imgstream report`: which records, how to group them, and what to write.
#[derive(Clone, Debug)]
pub struct ReportJob {
    pub source: RecordSource,
    pub filter: crate::starts::store::Filter,
    pub compare: Option<GroupBy>,
    /// JSON on standard output instead of tables.
    pub json: bool,
    /// Also write a CDF chart of start -> first log line to this file (with `pods`, each
    /// pod's waterfall and a CDF of its phases).
    pub svg: Option<std::path::PathBuf>,
    /// Pods' whole startup timelines instead of container starts.
    pub pods: bool,
}

/// Errors of `imgstream report`.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("encoding the report as JSON")]
    Json(#[from] serde_json::Error),
    #[error("writing {0}")]
    Write(std::path::PathBuf, #[source] std::io::Error),
}

impl ReportJob {
    /// Loads the records, prints the report, and writes the chart if asked.
    pub async fn run(self) -> Result<(), ReportError> {
        if self.pods {
            return self.run_pods().await;
        }
        let (starts, flags) = load(&self.source, &self.filter).await?;
        let report = Report::build(&starts, flags, self.compare.as_ref());
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.render_text());
        }
        if let Some(path) = &self.svg {
            let by = self.compare.unwrap_or(GroupBy::Namespace);
            let chart = svg::cdf(
                "container start -> first log line",
                &latency_series(&starts, &by),
            );
            std::fs::write(path, chart).map_err(|e| ReportError::Write(path.clone(), e))?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }
}

impl ReportJob {
    async fn run_pods(self) -> Result<(), ReportError> {
        let timelines = load_pods(&self.source, &self.filter).await?;
        let report = pods::PodReport::build(timelines, self.compare.as_ref());
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.render_text());
        }
        if let Some(path) = &self.svg {
            let chart = report.render_svg(self.compare.as_ref());
            std::fs::write(path, chart).map_err(|e| ReportError::Write(path.clone(), e))?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }
}

/// The pods' timelines that `filter` selects, from `source`.
pub async fn load_pods(
    source: &RecordSource,
    filter: &crate::starts::store::Filter,
) -> Result<Vec<crate::starts::pods::PodTimeline>, SourceError> {
    match source {
        RecordSource::Store(path) => {
            let store = crate::starts::store::Store::open(path, u64::MAX)?;
            Ok(store.timelines(filter)?)
        }
        RecordSource::Api(base) => {
            let (body, url) = api_get(base, "/v1/pods", &crate::api::filter_query(filter)).await?;
            serde_json::from_slice(&body).map_err(|e| SourceError::Api {
                url,
                why: e.to_string(),
            })
        }
    }
}

/// The start records and flags that `filter` selects, from `source`.
pub async fn load(
    source: &RecordSource,
    filter: &crate::starts::store::Filter,
) -> Result<(Vec<StartRecord>, Vec<FlagRecord>), SourceError> {
    match source {
        RecordSource::Store(path) => {
            let store = crate::starts::store::Store::open(path, u64::MAX)?;
            Ok((store.starts(filter)?, store.flags(filter)?))
        }
        RecordSource::Api(base) => from_api(base, &crate::api::filter_query(filter)).await,
    }
}

/// One chart series per group of `by` (start -> first log line, seconds), for
/// [`svg::cdf`]; containers that never logged are left out.
pub fn latency_series(records: &[StartRecord], by: &GroupBy) -> Vec<svg::Series> {
    let mut groups: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for r in records {
        if let Some(v) = r.start_to_first_log() {
            groups.entry(by.key(r)).or_default().push(v);
        }
    }
    groups
        .into_iter()
        .map(|(name, values)| svg::Series { name, values })
        .collect()
}

/// Start records and flags from an agent's HTTP API at `base` (`http://HOST:PORT`).
pub async fn from_api(
    base: &str,
    query: &str,
) -> Result<(Vec<StartRecord>, Vec<FlagRecord>), SourceError> {
    let (starts, url) = api_get(base, "/v1/starts", query).await?;
    let starts = serde_json::from_slice(&starts).map_err(|e| SourceError::Api {
        url,
        why: e.to_string(),
    })?;
    let (flags, url) = api_get(base, "/v1/flags", query).await?;
    let flags = serde_json::from_slice(&flags).map_err(|e| SourceError::Api {
        url,
        why: e.to_string(),
    })?;
    Ok((starts, flags))
}

/// GET `path?query` from an agent's HTTP API at `base`: the body and the URL asked.
async fn api_get(
    base: &str,
    path: &str,
    query: &str,
) -> Result<(bytes::Bytes, String), SourceError> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let sep = if query.is_empty() { "" } else { "?" };
    let url = format!("{}{path}{sep}{query}", base.trim_end_matches('/'));
    let err = |why: String| SourceError::Api {
        url: url.clone(),
        why,
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| err(e.to_string()))?;
    let response = tokio::time::timeout(std::time::Duration::from_secs(30), client.get(uri))
        .await
        .map_err(|_| err("no answer within 30 s".into()))?
        .map_err(|e| err(e.to_string()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| err(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    Ok((body, url))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ns: &str, image: &str, start_ms: u64, log_ms: Option<u64>) -> StartRecord {
        StartRecord {
            pod: crate::attribution::PodRef {
                namespace: Some(ns.into()),
                ..Default::default()
            },
            image: Some(image.into()),
            created_ns: 1_000_000_000,
            started_ns: Some(1_000_000_000 + start_ms * 1_000_000),
            first_log_ns: log_ms.map(|l| 1_000_000_000 + l * 1_000_000),
            ..Default::default()
        }
    }

    #[test]
    fn nearest_rank_quantiles() {
        let q = Quantiles::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (q.p50, q.p90, q.p99, q.max, q.count),
            (50.0, 90.0, 99.0, 100.0, 100)
        );
        let one = Quantiles::of(vec![3.0]);
        assert_eq!((one.p50, one.p99), (3.0, 3.0));
        assert_eq!(Quantiles::of(vec![f64::NAN]).count, 0);
    }

    #[test]
    fn groups_compare_and_render() {
        let records = vec![
            record("web", "reg/app:esgz", 10, Some(110)),
            record("web", "reg/app:esgz", 10, Some(130)),
            record("web", "reg/app:plain", 10, Some(1010)),
            record("batch", "reg/job:plain", 5, None),
        ];
        let by: GroupBy = "image:esgz".parse().unwrap();
        let report = Report::build(&records, Vec::new(), Some(&by));
        assert_eq!((report.containers, report.never_logged), (4, 1));
        assert_eq!(report.by_namespace.len(), 2);
        let c = report.comparison.as_ref().unwrap();
        assert_eq!(c.groups[0].group, "image !~ esgz");
        assert_eq!(c.groups[1].group, "image ~ esgz");
        let ratio = c.total_p50_ratio[1].unwrap();
        assert!((ratio - 0.11 / 1.01).abs() < 1e-9, "{ratio}");
        let text = report.render_text();
        assert!(
            text.contains("4 container starts, 1 never wrote a log line"),
            "{text}"
        );
        assert!(text.contains("reg/app:esgz"), "{text}");
        assert!(text.contains("110.0ms"), "{text}");
        for bad in ["", "label:", "image:", "pods"] {
            assert!(bad.parse::<GroupBy>().is_err(), "{bad}");
        }
    }
}
