//! The snapshotter's metadata: every snapshot by name, in a redb database under the root, so
//! that it survives restarts. Knows nothing of gRPC: the service maps [`MetaError`] to a
//! status.

use std::{collections::BTreeMap, path::Path};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("opening the snapshot metadata")]
    Open(#[source] Box<redb::DatabaseError>),
    #[error("snapshot metadata")]
    Db(#[source] Box<redb::Error>),
    #[error("snapshot {name}'s metadata is not valid")]
    Decode {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

macro_rules! db_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for MetaError {
            fn from(e: $t) -> Self {
                MetaError::Db(Box::new(e.into()))
            }
        }
    )*};
}
db_errors!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Where a lazily mounted layer comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Remote {
    pub(super) image_ref: String,
    pub(super) manifest: Option<String>,
    pub(super) layer: String,
}

/// One snapshot's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Snapshot {
    pub(super) id: u64,
    pub(super) kind: i32,
    pub(super) parent: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) created_ns: u64,
    pub(super) updated_ns: u64,
    pub(super) remote: Option<Remote>,
}

/// The metadata database.
pub(super) struct MetaStore(Database);

impl MetaStore {
    pub(super) fn open(path: &Path) -> Result<Self, MetaError> {
        Database::create(path)
            .map(Self)
            .map_err(|e| MetaError::Open(Box::new(e)))
    }

    fn decode(name: &str, bytes: &[u8]) -> Result<Snapshot, MetaError> {
        serde_json::from_slice(bytes).map_err(|source| MetaError::Decode {
            name: name.into(),
            source,
        })
    }

    pub(super) fn get(&self, name: &str) -> Result<Option<Snapshot>, MetaError> {
        let txn = self.0.begin_read()?;
        let table = match txn.open_table(SNAPSHOTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match table.get(name)? {
            Some(v) => Ok(Some(Self::decode(name, v.value())?)),
            None => Ok(None),
        }
    }

    pub(super) fn all(&self) -> Result<Vec<(String, Snapshot)>, MetaError> {
        let txn = self.0.begin_read()?;
        let table = match txn.open_table(SNAPSHOTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let name = k.value().to_string();
            let snap = Self::decode(&name, v.value())?;
            out.push((name, snap));
        }
        Ok(out)
    }

    /// Writes (`Some`) or deletes (`None`) snapshots in one transaction.
    pub(super) fn apply(&self, changes: &[(&str, Option<&Snapshot>)]) -> Result<(), MetaError> {
        let txn = self.0.begin_write()?;
        {
            let mut table = txn.open_table(SNAPSHOTS)?;
            for (name, snap) in changes {
                match snap {
                    Some(s) => {
                        let bytes = serde_json::to_vec(s).map_err(|source| MetaError::Decode {
                            name: (*name).into(),
                            source,
                        })?;
                        table.insert(*name, bytes.as_slice())?;
                    }
                    None => {
                        table.remove(*name)?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub(super) fn next_id(&self) -> Result<u64, MetaError> {
        let txn = self.0.begin_write()?;
        let id = {
            let mut table = txn.open_table(COUNTERS)?;
            let id = table.get("next_id")?.map_or(1, |v| v.value());
            table.insert("next_id", id + 1)?;
            id
        };
        txn.commit()?;
        Ok(id)
    }
}
