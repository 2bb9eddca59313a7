//! Snapshot metadata in redb: one record per snapshot name (id, kind, parent, times, labels,
//! remote flag, usage). Callers open exactly one transaction per snapshotter call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// name → JSON-encoded [`SnapshotRecord`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");

/// The kind of a snapshot, as containerd defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only, created by View.
    View,
    /// Writable, created by Prepare.
    Active,
    /// Immutable, created by Commit (or by a remote layer mount).
    Committed,
}

impl Kind {
    /// containerd's filter / display name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// One snapshot's metadata as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Directory id: the snapshot lives in `<root>/snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    /// Parent snapshot name ("" for none).
    pub parent: String,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_nanos: u128,
    /// Last update time, nanoseconds since the Unix epoch.
    pub updated_nanos: u128,
    pub labels: BTreeMap<String, String>,
    /// True when `fs/` is a remote layer mounted through the [`super::RemoteLayers`] hook.
    #[serde(default)]
    pub remote: bool,
    /// Disk use measured at commit (bytes, inodes); `None` for snapshots still changing.
    #[serde(default)]
    pub usage: Option<(u64, u64)>,
}

/// Public view of a snapshot (what Stat / List return).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub parent: String,
    pub kind: Kind,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub labels: BTreeMap<String, String>,
}

impl SnapshotRecord {
    /// The public info of this record stored under `name`.
    pub fn info(&self, name: &str) -> SnapshotInfo {
        SnapshotInfo {
            name: name.to_string(),
            parent: self.parent.clone(),
            kind: self.kind,
            created: time_from_nanos(self.created_nanos),
            updated: time_from_nanos(self.updated_nanos),
            labels: self.labels.clone(),
        }
    }
}

/// Current time in nanoseconds since the epoch (0 if the clock is before 1970).
pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn time_from_nanos(nanos: u128) -> SystemTime {
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    let sub = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    UNIX_EPOCH
        .checked_add(Duration::new(secs, sub))
        .unwrap_or(UNIX_EPOCH)
}

/// A metadata store failure (I/O, corruption, bad record); names the database file.
#[derive(Debug, thiserror::Error)]
#[error("snapshot metadata store {path}: {detail}")]
pub struct StoreError {
    pub path: String,
    pub detail: String,
}

/// The redb database holding every snapshot record.
pub struct MetadataStore {
    /// `None` once closed after an I/O error, until reopened.
    db: RwLock<Option<redb::Database>>,
    file: PathBuf,
    path: String,
}

/// A write transaction over the snapshots table; dropped without [`WriteTxn::commit`] it aborts.
pub struct WriteTxn<'a> {
    txn: redb::WriteTransaction,
    store: &'a MetadataStore,
}

impl MetadataStore {
    /// Opens (or creates) the database at `path` and makes sure the table exists.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let store = Self {
            db: RwLock::new(Some(Self::create(path)?)),
            file: path.to_path_buf(),
            path: path.display().to_string(),
        };
        let txn = store.begin()?;
        txn.commit()?;
        Ok(store)
    }

    fn create(path: &Path) -> Result<redb::Database, StoreError> {
        redb::Database::create(path).map_err(|e| StoreError {
            path: path.display().to_string(),
            detail: format!("{e} (is another lazysnap using this root?)"),
        })
    }

    /// Starts a transaction with `begin` on the database. After an I/O error (a full disk) redb
    /// refuses every later transaction until the database is reopened: that is done here, once
    /// per call, and logged, so the store recovers by itself once the cause is gone.
    fn transaction<T>(
        &self,
        begin: impl Fn(&redb::Database) -> Result<T, redb::TransactionError>,
    ) -> Result<T, StoreError> {
        for attempt in 0..2 {
            {
                let guard = crate::sync::read(&self.db);
                if let Some(db) = guard.as_ref() {
                    match begin(db) {
                        Ok(txn) => return Ok(txn),
                        Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo))
                            if attempt == 0 => {}
                        Err(e) => return Err(self.err(e)),
                    }
                }
            }
            self.reopen()?;
        }
        Err(self.err("the database failed again right after it was reopened"))
    }

    /// Closes the database (redb poisons it after an I/O error) and opens it again.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut guard = crate::sync::write(&self.db);
        if let Some(db) = guard.take() {
            drop(db);
            tracing::warn!(path = %self.path, "snapshot metadata store failed an earlier write (disk full?): reopening it");
        }
        let db = Self::create(&self.file)?;
        *guard = Some(db);
        tracing::info!(path = %self.path, "snapshot metadata store reopened");
        Ok(())
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    /// Starts the one write transaction of a call.
    pub fn begin(&self) -> Result<WriteTxn<'_>, StoreError> {
        let txn = self.transaction(|db| db.begin_write())?;
        {
            txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
        }
        Ok(WriteTxn { txn, store: self })
    }

    /// Reads every record in one read transaction (name order).
    pub fn all(&self) -> Result<Vec<(String, SnapshotRecord)>, StoreError> {
        let txn = self.transaction(|db| db.begin_read())?;
        let table = txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let name = k.value().to_string();
            let record = decode(&self.path, &name, v.value())?;
            out.push((name, record));
        }
        Ok(out)
    }

    /// Reads one record in its own read transaction.
    pub fn get(&self, name: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let txn = self.transaction(|db| db.begin_read())?;
        let table = txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
        let value = table.get(name).map_err(|e| self.err(e))?;
        value
            .map(|v| decode(&self.path, name, v.value()))
            .transpose()
    }
}

fn decode(path: &str, name: &str, bytes: &[u8]) -> Result<SnapshotRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError {
        path: path.to_string(),
        detail: format!("record of snapshot {name:?} is corrupt: {e}"),
    })
}

impl WriteTxn<'_> {
    /// The record stored under `name`, if any.
    pub fn get(&self, name: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(|e| self.store.err(e))?;
        let value = table.get(name).map_err(|e| self.store.err(e))?;
        value
            .map(|v| decode(&self.store.path, name, v.value()))
            .transpose()
    }

    /// Stores `record` under `name`, replacing any previous one.
    pub fn put(&self, name: &str, record: &SnapshotRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| self.store.err(e))?;
        let mut table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(|e| self.store.err(e))?;
        table
            .insert(name, bytes.as_slice())
            .map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// Deletes the record under `name`.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let mut table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(|e| self.store.err(e))?;
        table.remove(name).map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// Every record (name order), seen from inside this transaction.
    pub fn all(&self) -> Result<Vec<(String, SnapshotRecord)>, StoreError> {
        let table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(|e| self.store.err(e))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.store.err(e))? {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            let name = k.value().to_string();
            let record = decode(&self.store.path, &name, v.value())?;
            out.push((name, record));
        }
        Ok(out)
    }

    /// True when some snapshot names `name` as its parent.
    pub fn has_children(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.all()?.iter().any(|(_, r)| r.parent == name))
    }

    /// The directory ids of `name` and its ancestors, nearest first, with their remote flag.
    pub fn chain_ids(&self, name: &str) -> Result<Vec<(u64, bool)>, StoreError> {
        Ok(self
            .chain(name)?
            .into_iter()
            .map(|r| (r.id, r.remote))
            .collect())
    }

    /// The records of `name` and its ancestors, nearest first.
    pub fn chain(&self, name: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut records = Vec::new();
        let mut next = name.to_string();
        while !next.is_empty() {
            let record = self.get(&next)?.ok_or_else(|| StoreError {
                path: self.store.path.clone(),
                detail: format!("snapshot {next:?} is named as a parent but has no record"),
            })?;
            next = record.parent.clone();
            records.push(record);
            // A cycle can only come from a corrupt store; stop rather than loop forever.
            if records.len() > 100_000 {
                return Err(self
                    .store
                    .err("parent chain longer than 100000: corrupt store"));
            }
        }
        Ok(records)
    }

    /// Makes every change of this transaction durable.
    pub fn commit(self) -> Result<(), StoreError> {
        let store = self.store;
        self.txn.commit().map_err(|e| store.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, parent: &str) -> SnapshotRecord {
        SnapshotRecord {
            id,
            kind: Kind::Committed,
            parent: parent.into(),
            created_nanos: now_nanos(),
            updated_nanos: now_nanos(),
            labels: BTreeMap::new(),
            remote: false,
            usage: None,
        }
    }

    #[test]
    fn records_survive_reopen_and_aborted_txns_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.db");
        {
            let store = MetadataStore::open(&path).unwrap();
            let txn = store.begin().unwrap();
            txn.put("a", &record(1, "")).unwrap();
            txn.put("b", &record(2, "a")).unwrap();
            txn.commit().unwrap();
            let txn = store.begin().unwrap();
            txn.put("c", &record(3, "b")).unwrap();
            drop(txn);
        }
        let store = MetadataStore::open(&path).unwrap();
        let names: Vec<String> = store.all().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
        let txn = store.begin().unwrap();
        assert_eq!(txn.chain_ids("b").unwrap(), [(2, false), (1, false)]);
        assert!(txn.has_children("a").unwrap());
        assert!(!txn.has_children("b").unwrap());
    }
}
