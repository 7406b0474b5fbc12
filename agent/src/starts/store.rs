//! The agent's local store of start records and rename-ENXIO flags: a redb database (one
//! file, copy-on-write B-trees with checksummed commits, so a crash mid-write leaves the last
//! committed state), bounded by record count with the oldest pruned first.
//!
//! Records are JSON values in two tables keyed by (time in ns, id), so iteration is in time
//! order and pruning pops the first keys. The database is locked by the process that opens it:
//! `imgstream report --store` reads it while no agent runs; with the agent running, ask its
//! HTTP API.

use std::path::Path;

use redb::{Database, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{PodRecord, PullRecord, StartRecord};
use crate::attribution::PodRef;

const STARTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("starts");
const FLAGS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("flags");
/// Pod records, keyed by their first time and a hash of the pod UID.
const PODS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("pods");
/// Pulls seen by the CRI image proxy, keyed by their start and a sequence number.
const PULLS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("pulls");

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "opening the store {0} (another imgstream agent may have it open; ask its HTTP API \
         instead, e.g. `imgstream report --api http://127.0.0.1:9464`)"
    )]
    Open(std::path::PathBuf, #[source] Box<redb::Error>),
    #[error("the store's database")]
    Db(#[source] Box<redb::Error>),
    #[error("store record: {0}")]
    Encode(#[from] serde_json::Error),
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

/// A rename-ENXIO detection attributed to a pod: a flag on it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlagRecord {
    /// Time of the failing rename, ns since the epoch.
    pub time_ns: u64,
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(flatten)]
    pub pod: PodRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The symlink that could not be renamed, and where to.
    pub path: String,
    pub new_path: String,
    pub syscall: String,
    pub confirmed: bool,
}

/// Which records to return.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only records at or after this time (ns since the epoch).
    pub since_ns: Option<u64>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// Substring of the image reference.
    pub image: Option<String>,
}

impl Filter {
    fn keeps(
        &self,
        namespace: &Option<String>,
        pod: &Option<String>,
        image: &Option<String>,
    ) -> bool {
        let eq = |want: &Option<String>, got: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| got.as_deref() == Some(w.as_str()))
        };
        eq(&self.namespace, namespace)
            && eq(&self.pod, pod)
            && self
                .image
                .as_ref()
                .is_none_or(|w| image.as_deref().is_some_and(|i| i.contains(w.as_str())))
    }
}

/// The store, open.
pub struct Store {
    db: Database,
    max_records: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("max_records", &self.max_records)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store at `path`, keeping at most `max_records` of each kind.
    pub fn open(path: &Path, max_records: u64) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent() {
            crate::private::create_dir(parent)
                .map_err(|e| StoreError::Open(path.to_path_buf(), Box::new(e.into())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Open(path.to_path_buf(), Box::new(e.into())))?;
        crate::private::restrict(path, crate::private::FILE_MODE)
            .map_err(|e| StoreError::Open(path.to_path_buf(), Box::new(e.into())))?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(STARTS).map_err(db_err)?;
        txn.open_table(FLAGS).map_err(db_err)?;
        txn.open_table(PODS).map_err(db_err)?;
        txn.open_table(PULLS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Self {
            db,
            max_records: max_records.max(1),
        })
    }

    /// Inserts or replaces a start record (keyed by creation time and cgroup id).
    pub fn put_start(&self, record: &StartRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record)?;
        self.put(STARTS, (record.created_ns, record.cgroup_id), &value)
    }

    /// Removes a start record (one that turned out to be a pod sandbox).
    pub fn remove_start(&self, record: &StartRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut t = txn.open_table(STARTS).map_err(db)?;
            t.remove((record.created_ns, record.cgroup_id))
                .map_err(db)?;
        }
        txn.commit().map_err(db)
    }

    /// Inserts or replaces a pod record.
    pub fn put_pod(&self, pod: &PodRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(pod)?;
        self.put(PODS, (pod.first_ns, uid_key(&pod.uid)), &value)
    }

    /// Inserts a pull, or replaces what was stored of it.
    pub fn put_pull(&self, pull: &PullRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(pull)?;
        // One key per pull: a snapshotter span that grew replaces what was stored of it.
        let id = uid_key(&format!(
            "{}\0{}",
            pull.source.as_deref().unwrap_or(""),
            pull.image
        ));
        self.put(PULLS, (pull.start_ns, id), &value)
    }

    /// Pod records that began at or after `since_ns`, oldest first.
    pub fn pods(&self, since_ns: Option<u64>) -> Result<Vec<PodRecord>, StoreError> {
        self.scan(PODS, since_ns, |_: &PodRecord| true)
    }

    /// Pulls that began at or after `since_ns`, oldest first.
    pub fn pulls(&self, since_ns: Option<u64>) -> Result<Vec<PullRecord>, StoreError> {
        self.scan(PULLS, since_ns, |_: &PullRecord| true)
    }

    /// The timelines of the pods that began at or after the filter's `since`, with the
    /// filter's namespace, pod and image (a container's) applied to them.
    pub fn timelines(&self, filter: &Filter) -> Result<Vec<super::pods::PodTimeline>, StoreError> {
        let pods = self.pods(filter.since_ns)?;
        let Some(first) = pods.iter().map(|p| p.first_ns).min() else {
            return Ok(Vec::new());
        };
        let starts = self.starts(&Filter {
            since_ns: Some(first),
            ..Default::default()
        })?;
        let pulls = self.pulls(Some(first))?;
        // By pod and by image, so that each pod is joined with its own records only.
        let mut starts_of: std::collections::HashMap<&str, Vec<StartRecord>> = Default::default();
        for start in &starts {
            if let Some(uid) = start.pod.uid.as_deref() {
                starts_of.entry(uid).or_default().push(start.clone());
            }
        }
        let mut pulls_of: std::collections::HashMap<&str, Vec<&PullRecord>> = Default::default();
        let mut spans_of: std::collections::HashMap<&str, Vec<&PullRecord>> = Default::default();
        for pull in &pulls {
            match pull.pod.uid.as_deref() {
                Some(uid) => pulls_of.entry(uid).or_default().push(pull),
                None => spans_of.entry(pull.image.as_str()).or_default().push(pull),
            }
        }
        Ok(pods
            .iter()
            .map(|pod| {
                let starts = starts_of
                    .get(pod.uid.as_str())
                    .map_or(&[][..], Vec::as_slice);
                let mut images: Vec<&str> =
                    starts.iter().filter_map(|s| s.image.as_deref()).collect();
                images.sort_unstable();
                images.dedup();
                let pulls: Vec<PullRecord> = pulls_of
                    .get(pod.uid.as_str())
                    .into_iter()
                    .flatten()
                    .chain(images.iter().filter_map(|i| spans_of.get(i)).flatten())
                    .map(|p| (*p).clone())
                    .collect();
                super::pods::assemble(pod, starts, &pulls)
            })
            .filter(|t| {
                if t.containers.is_empty() {
                    filter.image.is_none() && filter.keeps(&t.namespace, &t.pod, &None)
                } else {
                    t.containers
                        .iter()
                        .any(|c| filter.keeps(&t.namespace, &t.pod, &c.image))
                }
            })
            .collect())
    }

    /// Appends a flag.
    pub fn put_flag(&self, flag: &FlagRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(flag)?;
        // Several detections can share a nanosecond only in theory; the id keeps them apart.
        let id = self.len(FLAGS)?;
        self.put(FLAGS, (flag.time_ns, id), &value)
    }

    fn put(
        &self,
        table: TableDefinition<(u64, u64), &[u8]>,
        key: (u64, u64),
        value: &[u8],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut t = txn.open_table(table).map_err(db)?;
            t.insert(key, value).map_err(db)?;
            while t.len().map_err(db)? > self.max_records {
                t.pop_first().map_err(db)?;
            }
        }
        txn.commit().map_err(db)
    }

    fn len(&self, table: TableDefinition<(u64, u64), &[u8]>) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(table).map_err(db)?;
        t.len().map_err(db)
    }

    /// Start records matching `filter`, oldest first.
    pub fn starts(&self, filter: &Filter) -> Result<Vec<StartRecord>, StoreError> {
        self.scan(STARTS, filter.since_ns, |r: &StartRecord| {
            filter.keeps(&r.pod.namespace, &r.pod.name, &r.image)
        })
    }

    /// Flags matching `filter`, oldest first.
    pub fn flags(&self, filter: &Filter) -> Result<Vec<FlagRecord>, StoreError> {
        self.scan(FLAGS, filter.since_ns, |f: &FlagRecord| {
            filter.keeps(&f.pod.namespace, &f.pod.name, &f.image)
        })
    }

    fn scan<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<(u64, u64), &[u8]>,
        since_ns: Option<u64>,
        keep: impl Fn(&T) -> bool,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(table).map_err(db)?;
        let mut out = Vec::new();
        for entry in t.range((since_ns.unwrap_or(0), 0)..).map_err(db)? {
            let (_, value) = entry.map_err(db)?;
            match serde_json::from_slice::<T>(value.value()) {
                Ok(record) if keep(&record) => out.push(record),
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, "unreadable record in the store skipped"),
            }
        }
        Ok(out)
    }
}

/// A pod UID's half of its record's key (FNV-1a: stable across builds and machines).
fn uid_key(uid: &str) -> u64 {
    uid.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    db(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(created_ns: u64, cgroup_id: u64, namespace: &str) -> StartRecord {
        StartRecord {
            created_ns,
            cgroup_id,
            container_id: format!("c{cgroup_id}"),
            pod: PodRef {
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            image: Some(format!("registry/app:{cgroup_id}")),
            ..Default::default()
        }
    }

    #[test]
    fn records_survive_a_reopen_are_bounded_oldest_first_and_filter() {
        let dir = std::env::temp_dir().join(format!("imgstream-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("agent.redb");
        {
            let store = Store::open(&path, 3).unwrap();
            for i in 1..=5 {
                store
                    .put_start(&record(i * 10, i, if i % 2 == 0 { "a" } else { "b" }))
                    .unwrap();
            }
            // An update replaces, it does not add.
            let mut r = record(50, 5, "b");
            r.first_log_ns = Some(60);
            store.put_start(&r).unwrap();
        }
        let store = Store::open(&path, 3).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o600, "the records are root's alone");
        }
        let all = store.starts(&Filter::default()).unwrap();
        let ids: Vec<u64> = all.iter().map(|r| r.cgroup_id).collect();
        assert_eq!(ids, [3, 4, 5], "the oldest two were pruned");
        assert_eq!(all[2].first_log_ns, Some(60));
        let b = Filter {
            namespace: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(store.starts(&b).unwrap().len(), 2);
        let since = Filter {
            since_ns: Some(40),
            image: Some("app:5".into()),
            ..Default::default()
        };
        assert_eq!(store.starts(&since).unwrap().len(), 1);

        let flag = FlagRecord {
            time_ns: 7,
            pod: PodRef {
                name: Some("web".into()),
                ..Default::default()
            },
            path: "/etc/link".into(),
            ..Default::default()
        };
        store.put_flag(&flag).unwrap();
        store.put_flag(&flag).unwrap();
        assert_eq!(store.flags(&Filter::default()).unwrap().len(), 2);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pods_timelines_join_their_own_records_and_filter_by_any_containers_image() {
        let dir = std::env::temp_dir().join(format!("imgstream-store3-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("agent.redb"), 100).expect("the test's own setup");
        for (i, uid) in ["u-1", "u-2"].into_iter().enumerate() {
            let at = (i as u64 + 1) * 1000;
            store
                .put_pod(&PodRecord {
                    uid: uid.into(),
                    first_ns: at,
                    created_ns: Some(at),
                    ..Default::default()
                })
                .expect("the test's own setup");
            let mut r = record(at + 100, at, "shop");
            r.pod.uid = Some(uid.into());
            store.put_start(&r).expect("the test's own setup");
            let pull = PullRecord {
                start_ns: at + 10,
                end_ns: at + 90,
                image: r.image.clone().expect("the test's own setup"),
                pod: PodRef {
                    uid: Some(uid.into()),
                    ..Default::default()
                },
                ok: true,
                ..Default::default()
            };
            store.put_pull(&pull).expect("the test's own setup");
        }
        // A snapshotter span that grew replaces what was stored of it.
        let mut span = PullRecord {
            start_ns: 1500,
            end_ns: 1600,
            image: "registry/app:1000".into(),
            source: Some("snapshotter".into()),
            ..Default::default()
        };
        store.put_pull(&span).expect("the test's own setup");
        span.end_ns = 1700;
        store.put_pull(&span).expect("the test's own setup");
        assert_eq!(store.pulls(None).expect("the test's own setup").len(), 3);
        let all = store
            .timelines(&Filter::default())
            .expect("the test's own setup");
        assert_eq!(all.len(), 2);
        for t in &all {
            let [c] = &t.containers[..] else {
                panic!("{t:?}")
            };
            assert_eq!(
                c.pull.as_ref().expect("the test's own setup").start_ns,
                t.created_ns.expect("the test's own setup") + 10
            );
        }
        let only = Filter {
            image: Some("app:2000".into()),
            ..Default::default()
        };
        let found = store.timelines(&only).expect("the test's own setup");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].uid, "u-2");
        drop(store);
        std::fs::remove_dir_all(&dir).expect("the test's own setup");
    }

    #[test]
    fn a_second_opener_gets_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("imgstream-store2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("agent.redb");
        let _first = Store::open(&path, 10).unwrap();
        let err = Store::open(&path, 10).unwrap_err().to_string();
        assert!(err.contains("another imgstream agent"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
