//! containerd's snapshot filters (`List` requests): the selectors containerd's metadata store
//! and `ctr snapshots ls` use, parsed strictly.

use tonic::Status;

use super::proto::{Info, Kind};

/// A containerd filter as snapshot walks use it: comma-separated selectors that must all hold
/// (`name==X`, `parent==X`, `kind==active|view|committed`, `labels."K"==V`, `labels."K"`).
/// containerd's metadata store finds a remote snapshot with
/// `labels."containerd.io/snapshot.ref"==TARGET,parent==PARENT`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Filter(Vec<Selector>);

#[derive(Debug, PartialEq, Eq)]
enum Selector {
    Name(String),
    Parent(String),
    Kind(i32),
    Label(String, Option<String>),
}

/// Splits on commas outside double quotes.
fn split_selectors(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

impl Filter {
    pub(super) fn parse(s: &str) -> Result<Self, Status> {
        split_selectors(s)
            .into_iter()
            .map(|part| Selector::parse(part, s))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub(super) fn matches(&self, info: &Info) -> bool {
        self.0.iter().all(|s| s.matches(info))
    }
}

impl Selector {
    fn parse(part: &str, whole: &str) -> Result<Self, Status> {
        let bad = || Status::invalid_argument(format!("unsupported filter {whole:?}"));
        let unquote = |v: &str| v.trim().trim_matches('"').to_string();
        let (field, value) = match part.split_once("==") {
            Some((f, v)) => (f.trim(), Some(unquote(v))),
            None => (part.trim(), None),
        };
        if let Some(label) = field.strip_prefix("labels.") {
            return Ok(Self::Label(unquote(label), value));
        }
        let value = value.ok_or_else(bad)?;
        Ok(match field {
            "name" => Self::Name(value),
            "parent" => Self::Parent(value),
            "kind" => Self::Kind(match value.as_str() {
                "view" => Kind::View as i32,
                "active" => Kind::Active as i32,
                "committed" => Kind::Committed as i32,
                _ => return Err(bad()),
            }),
            _ => return Err(bad()),
        })
    }

    fn matches(&self, info: &Info) -> bool {
        match self {
            Self::Name(n) => &info.name == n,
            Self::Parent(p) => &info.parent == p,
            Self::Kind(k) => info.kind == *k,
            Self::Label(k, None) => info.labels.contains_key(k),
            Self::Label(k, Some(v)) => info.labels.get(k) == Some(v),
        }
    }
}
