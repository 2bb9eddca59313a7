//! Local snapshots: their directories, created in a temp dir and renamed in place, and the
//! bind or overlay mounts of a chain.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::snapshotter::mounts::snapshot_mounts;
use crate::snapshotter::proto::Mount;
use crate::snapshotter::store::{now_nanos, Kind, SnapshotRecord, SnapshotView};

use super::fs::remove_dir_quietly;
use super::{Service, SnapshotError};

impl Service {
    /// Creates an active or view snapshot: directory made under a temporary name, then renamed
    /// into place inside the metadata transaction. Returns its mounts and the records of its
    /// parent chain, nearest first.
    pub(super) fn create_local(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(Vec<Mount>, Vec<SnapshotRecord>), SnapshotError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let temp = self.inner.snapshots_dir.join(format!("new-{id}"));
        let result = self.create_local_in(kind, key, parent, labels, id, &temp);
        if result.is_err() {
            remove_dir_quietly(&temp).ok();
        }
        result
    }

    pub(super) fn create_local_in(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        id: u64,
        temp: &Path,
    ) -> Result<(Vec<Mount>, Vec<SnapshotRecord>), SnapshotError> {
        let mkdir = |path: &Path, mode: u32| {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(path)
                .map_err(SnapshotError::io(format!("creating {}", path.display())))
        };
        mkdir(temp, 0o700)?;
        mkdir(&temp.join("fs"), 0o755)?;
        if kind == Kind::Active {
            mkdir(&temp.join("work"), 0o711)?;
        }

        let txn = self.inner.store.begin()?;
        if txn.get(key)?.is_some() {
            return Err(SnapshotError::AlreadyExists(format!("snapshot {key:?}")));
        }
        let mut chain = Vec::new();
        if !parent.is_empty() {
            let parent_record = txn
                .get(parent)?
                .ok_or_else(|| SnapshotError::NotFound(format!("parent snapshot {parent:?}")))?;
            if parent_record.kind != Kind::Committed {
                return Err(SnapshotError::InvalidArgument(format!(
                    "parent {parent:?} is not a committed snapshot"
                )));
            }
            chain = txn.chain(parent)?;
            // The new upper dir takes the owner of the parent's root, as containerd's overlay does.
            let parent_fs = self.dir(parent_record.id).join("fs");
            if let Ok(meta) = std::fs::metadata(&parent_fs) {
                std::os::unix::fs::lchown(temp.join("fs"), Some(meta.uid()), Some(meta.gid()))
                    .map_err(SnapshotError::io(format!(
                        "setting the owner of {}",
                        temp.join("fs").display()
                    )))?;
            }
        }
        let now = now_nanos();
        txn.put(
            key,
            &SnapshotRecord {
                id,
                kind,
                parent: parent.to_string(),
                created_nanos: now,
                updated_nanos: now,
                labels,
                remote: false,
                usage: None,
            },
        )?;
        let dir = self.dir(id);
        std::fs::rename(temp, &dir).map_err(SnapshotError::io(format!(
            "renaming {} to {}",
            temp.display(),
            dir.display()
        )))?;
        if let Err(err) = txn.commit() {
            remove_dir_quietly(&dir).ok();
            return Err(err.into());
        }
        let ids: Vec<(u64, bool)> = chain.iter().map(|r| (r.id, r.remote)).collect();
        Ok((self.mounts_for(kind, id, &ids), chain))
    }

    pub(super) fn mounts_for(&self, kind: Kind, id: u64, chain: &[(u64, bool)]) -> Vec<Mount> {
        let parent_dirs: Vec<PathBuf> = chain.iter().map(|&(pid, _)| self.dir(pid)).collect();
        let refs: Vec<&Path> = parent_dirs.iter().map(PathBuf::as_path).collect();
        snapshot_mounts(kind, &self.dir(id), &refs, &self.inner.overlay)
    }
}
