//! Snapshot metadata in redb: one record per snapshot name (id, kind, parent, times, labels,
//! remote flag, usage), and the indexes of the lookups containerd makes: the children of a
//! snapshot, and the snapshots with a given parent and `containerd.io/snapshot.ref` target.
//! Each snapshotter call opens one transaction: [`MetadataStore::read`] or
//! [`MetadataStore::begin`]; both read through [`SnapshotView`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{
    MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::labels;

/// name → JSON-encoded [`SnapshotRecord`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// parent name ("" for none) → the names of the snapshots on it.
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
/// (parent name, `containerd.io/snapshot.ref` label) → the names of the snapshots with both.
const TARGETS: MultimapTableDefinition<(&str, &str), &str> =
    MultimapTableDefinition::new("targets");

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
    /// Transactions begun since open (the one-per-call rule is tested on it).
    transactions: AtomicU64,
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
            transactions: AtomicU64::new(0),
        };
        // The indexes are derived data: rebuilt at every open, so a database written by a
        // version without them (or with other ones) is read right.
        let txn = store.begin()?;
        txn.rebuild_indexes()?;
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
                        Ok(txn) => {
                            self.transactions.fetch_add(1, Ordering::Relaxed);
                            return Ok(txn);
                        }
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
        store_err(&self.path, e)
    }

    /// How many transactions were begun since the store was opened.
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// Starts the one write transaction of a call.
    pub fn begin(&self) -> Result<WriteTxn<'_>, StoreError> {
        let txn = self.transaction(|db| db.begin_write())?;
        {
            txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
            txn.open_multimap_table(CHILDREN).map_err(|e| self.err(e))?;
            txn.open_multimap_table(TARGETS).map_err(|e| self.err(e))?;
        }
        Ok(WriteTxn { txn, store: self })
    }

    /// Starts the one read transaction of a call that changes nothing: it never waits for a
    /// writer, and sees the store as it was when it began.
    pub fn read(&self) -> Result<ReadTxn<'_>, StoreError> {
        let txn = self.transaction(|db| db.begin_read())?;
        Ok(ReadTxn { txn, store: self })
    }
}

/// A read transaction over the snapshots and their indexes.
pub struct ReadTxn<'a> {
    txn: redb::ReadTransaction,
    store: &'a MetadataStore,
}

/// What a transaction reads: records by name, every record, and the two indexes.
pub trait SnapshotView {
    /// The record stored under `name`, if any.
    fn get(&self, name: &str) -> Result<Option<SnapshotRecord>, StoreError>;

    /// Every record (name order).
    fn all(&self) -> Result<Vec<(String, SnapshotRecord)>, StoreError>;

    /// The names of the snapshots whose parent is `name`.
    fn children(&self, name: &str) -> Result<Vec<String>, StoreError>;

    /// The names of the snapshots on `parent` labelled `containerd.io/snapshot.ref` = `target`.
    fn with_target(&self, parent: &str, target: &str) -> Result<Vec<String>, StoreError>;

    /// The database file, for errors.
    fn path(&self) -> &str;

    /// True when some snapshot names `name` as its parent.
    fn has_children(&self, name: &str) -> Result<bool, StoreError> {
        Ok(!self.children(name)?.is_empty())
    }

    /// The name of a committed snapshot on `parent` labelled `containerd.io/snapshot.ref` =
    /// `target`, if any: what containerd looks a layer up by.
    fn committed_target(&self, parent: &str, target: &str) -> Result<Option<String>, StoreError> {
        for name in self.with_target(parent, target)? {
            if self.get(&name)?.is_some_and(|r| r.kind == Kind::Committed) {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// The records of `name` and its ancestors, nearest first.
    fn chain(&self, name: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut records = Vec::new();
        let mut next = name.to_string();
        while !next.is_empty() {
            let record = self.get(&next)?.ok_or_else(|| StoreError {
                path: self.path().to_string(),
                detail: format!("snapshot {next:?} is named as a parent but has no record"),
            })?;
            next = record.parent.clone();
            records.push(record);
            // A cycle can only come from a corrupt store; stop rather than loop forever.
            if records.len() > 100_000 {
                return Err(StoreError {
                    path: self.path().to_string(),
                    detail: "parent chain longer than 100000: corrupt store".to_string(),
                });
            }
        }
        Ok(records)
    }

    /// The directory ids of `name` and its ancestors, nearest first, with their remote flag.
    fn chain_ids(&self, name: &str) -> Result<Vec<(u64, bool)>, StoreError> {
        Ok(self
            .chain(name)?
            .into_iter()
            .map(|r| (r.id, r.remote))
            .collect())
    }
}

fn get_record(
    path: &str,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<SnapshotRecord>, StoreError> {
    let value = table.get(name).map_err(|e| store_err(path, e))?;
    value.map(|v| decode(path, name, v.value())).transpose()
}

fn all_records(
    path: &str,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, SnapshotRecord)>, StoreError> {
    let mut out = Vec::new();
    for item in table.iter().map_err(|e| store_err(path, e))? {
        let (k, v) = item.map_err(|e| store_err(path, e))?;
        let name = k.value().to_string();
        let record = decode(path, &name, v.value())?;
        out.push((name, record));
    }
    Ok(out)
}

fn names(
    path: &str,
    values: Result<redb::MultimapValue<'_, &'static str>, redb::StorageError>,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for value in values.map_err(|e| store_err(path, e))? {
        out.push(value.map_err(|e| store_err(path, e))?.value().to_string());
    }
    Ok(out)
}

fn store_err(path: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError {
        path: path.to_string(),
        detail: e.to_string(),
    }
}

/// The tables of a transaction, opened for reading: what read and write transactions share, so
/// [`SnapshotView`] is written once for both.
trait ReadTables {
    fn store(&self) -> &MetadataStore;
    fn records_table(&self) -> Result<impl ReadableTable<&'static str, &'static [u8]>, StoreError>;
    fn children_table(
        &self,
    ) -> Result<impl ReadableMultimapTable<&'static str, &'static str>, StoreError>;
    fn targets_table(
        &self,
    ) -> Result<impl ReadableMultimapTable<(&'static str, &'static str), &'static str>, StoreError>;
}

impl<T: ReadTables> SnapshotView for T {
    fn get(&self, name: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        get_record(self.path(), &self.records_table()?, name)
    }

    fn all(&self) -> Result<Vec<(String, SnapshotRecord)>, StoreError> {
        all_records(self.path(), &self.records_table()?)
    }

    fn children(&self, name: &str) -> Result<Vec<String>, StoreError> {
        names(self.path(), self.children_table()?.get(name))
    }

    fn with_target(&self, parent: &str, target: &str) -> Result<Vec<String>, StoreError> {
        names(self.path(), self.targets_table()?.get((parent, target)))
    }

    fn path(&self) -> &str {
        &self.store().path
    }
}

/// Implements [`ReadTables`] for a transaction type whose `txn` is a redb transaction: read and
/// write transactions open tables with the same calls, returning different table types.
macro_rules! read_tables {
    ($txn:ty) => {
        impl ReadTables for $txn {
            fn store(&self) -> &MetadataStore {
                self.store
            }

            fn records_table(
                &self,
            ) -> Result<impl ReadableTable<&'static str, &'static [u8]>, StoreError> {
                self.txn
                    .open_table(SNAPSHOTS)
                    .map_err(|e| self.store.err(e))
            }

            fn children_table(
                &self,
            ) -> Result<impl ReadableMultimapTable<&'static str, &'static str>, StoreError> {
                self.txn
                    .open_multimap_table(CHILDREN)
                    .map_err(|e| self.store.err(e))
            }

            fn targets_table(
                &self,
            ) -> Result<
                impl ReadableMultimapTable<(&'static str, &'static str), &'static str>,
                StoreError,
            > {
                self.txn
                    .open_multimap_table(TARGETS)
                    .map_err(|e| self.store.err(e))
            }
        }
    };
}

read_tables!(ReadTxn<'_>);
read_tables!(WriteTxn<'_>);

fn decode(path: &str, name: &str, bytes: &[u8]) -> Result<SnapshotRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError {
        path: path.to_string(),
        detail: format!("record of snapshot {name:?} is corrupt: {e}"),
    })
}

impl WriteTxn<'_> {
    fn records(&self) -> Result<redb::Table<'_, &'static str, &'static [u8]>, StoreError> {
        self.txn
            .open_table(SNAPSHOTS)
            .map_err(|e| self.store.err(e))
    }

    /// Stores `record` under `name`, replacing any previous one.
    pub fn put(&self, name: &str, record: &SnapshotRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| self.store.err(e))?;
        self.unindex(name)?;
        self.records()?
            .insert(name, bytes.as_slice())
            .map_err(|e| self.store.err(e))?;
        self.index(name, record)
    }

    /// Deletes the record under `name`.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.unindex(name)?;
        self.records()?
            .remove(name)
            .map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// Adds `record`, stored under `name`, to the indexes.
    fn index(&self, name: &str, record: &SnapshotRecord) -> Result<(), StoreError> {
        let err = |e| self.store.err(e);
        let mut children = self.txn.open_multimap_table(CHILDREN).map_err(err)?;
        children
            .insert(record.parent.as_str(), name)
            .map_err(|e| self.store.err(e))?;
        if let Some(target) = record.labels.get(labels::SNAPSHOT_REF) {
            let mut targets = self.txn.open_multimap_table(TARGETS).map_err(err)?;
            targets
                .insert((record.parent.as_str(), target.as_str()), name)
                .map_err(|e| self.store.err(e))?;
        }
        Ok(())
    }

    /// Takes the record stored under `name` (if any) out of the indexes.
    fn unindex(&self, name: &str) -> Result<(), StoreError> {
        let Some(old) = self.get(name)? else {
            return Ok(());
        };
        let err = |e| self.store.err(e);
        let mut children = self.txn.open_multimap_table(CHILDREN).map_err(err)?;
        children
            .remove(old.parent.as_str(), name)
            .map_err(|e| self.store.err(e))?;
        if let Some(target) = old.labels.get(labels::SNAPSHOT_REF) {
            let mut targets = self.txn.open_multimap_table(TARGETS).map_err(err)?;
            targets
                .remove((old.parent.as_str(), target.as_str()), name)
                .map_err(|e| self.store.err(e))?;
        }
        Ok(())
    }

    /// Builds both indexes again from the records.
    fn rebuild_indexes(&self) -> Result<(), StoreError> {
        let err = |e| self.store.err(e);
        self.txn.delete_multimap_table(CHILDREN).map_err(err)?;
        self.txn.delete_multimap_table(TARGETS).map_err(err)?;
        self.txn.open_multimap_table(CHILDREN).map_err(err)?;
        self.txn.open_multimap_table(TARGETS).map_err(err)?;
        for (name, record) in self.all()? {
            self.index(&name, &record)?;
        }
        Ok(())
    }

    /// Makes every change of this transaction durable.
    pub fn commit(self) -> Result<(), StoreError> {
        let store = self.store;
        self.txn.commit().map_err(|e| store.err(e))
    }
}

#[cfg(test)]
mod tests;
