//! Unit tests of the metadata store: records across reopen and aborts, the indexes.

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
    let names: Vec<String> = store
        .read()
        .unwrap()
        .all()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["a", "b"]);
    let txn = store.begin().unwrap();
    assert_eq!(txn.chain_ids("b").unwrap(), [(2, false), (1, false)]);
    assert!(txn.has_children("a").unwrap());
    assert!(!txn.has_children("b").unwrap());
}

#[test]
fn the_indexes_follow_puts_updates_and_deletes_and_are_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.db");
    let targeted = |id, parent: &str, target: &str, kind| SnapshotRecord {
        kind,
        labels: BTreeMap::from([(labels::SNAPSHOT_REF.to_string(), target.to_string())]),
        ..record(id, parent)
    };
    {
        let store = MetadataStore::open(&path).unwrap();
        let txn = store.begin().unwrap();
        txn.put("base", &record(1, "")).unwrap();
        txn.put("extract-1", &targeted(2, "base", "sha256:l2", Kind::Active))
            .unwrap();
        txn.put("l2", &targeted(3, "base", "sha256:l2", Kind::Committed))
            .unwrap();
        txn.commit().unwrap();

        let read = store.read().unwrap();
        assert_eq!(read.children("base").unwrap(), ["extract-1", "l2"]);
        assert_eq!(
            read.with_target("base", "sha256:l2").unwrap(),
            ["extract-1", "l2"]
        );
        assert_eq!(
            read.committed_target("base", "sha256:l2")
                .unwrap()
                .as_deref(),
            Some("l2")
        );
        assert_eq!(read.committed_target("", "sha256:l2").unwrap(), None);
        drop(read);

        // Relabelled, reparented and deleted records leave the indexes.
        let txn = store.begin().unwrap();
        txn.delete("extract-1").unwrap();
        txn.put("l2", &targeted(3, "", "sha256:other", Kind::Committed))
            .unwrap();
        txn.commit().unwrap();
        let read = store.read().unwrap();
        assert!(!read.has_children("base").unwrap());
        assert!(read.with_target("base", "sha256:l2").unwrap().is_empty());
        assert_eq!(read.with_target("", "sha256:other").unwrap(), ["l2"]);
    }
    // A database from before the indexes: only the records table.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_multimap_table(CHILDREN).unwrap();
        txn.delete_multimap_table(TARGETS).unwrap();
        txn.commit().unwrap();
    }
    let store = MetadataStore::open(&path).unwrap();
    let read = store.read().unwrap();
    assert_eq!(read.children("").unwrap(), ["base", "l2"]);
    assert_eq!(read.with_target("", "sha256:other").unwrap(), ["l2"]);
}
