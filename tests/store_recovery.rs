//! The snapshot metadata store recovers by itself from a full disk: a write that fails with
//! ENOSPC fails that call only; once space is back the next calls succeed and nothing committed
//! before is lost. Needs root (it mounts a small tmpfs); fails loudly without it.

mod cli_common;
use cli_common::Tmpfs;

use std::collections::BTreeMap;

use lazysnap::snapshotter::store::{Kind, MetadataStore, SnapshotRecord, SnapshotView};

fn record(id: u64, payload: usize) -> SnapshotRecord {
    let mut labels = BTreeMap::new();
    labels.insert("payload".to_string(), "x".repeat(payload));
    SnapshotRecord {
        id,
        kind: Kind::Committed,
        parent: String::new(),
        created_nanos: 0,
        updated_nanos: 0,
        labels,
        remote: false,
        usage: None,
    }
}

#[test]
fn a_full_disk_fails_one_write_and_the_store_recovers_once_space_is_back() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a tmpfs: run it as root (scripts/test.sh)"
    );
    let dir = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(dir.path(), "4m");
    let store = MetadataStore::open(&dir.path().join("metadata.db")).unwrap();
    let txn = store.begin().unwrap();
    txn.put("kept", &record(1, 100)).unwrap();
    txn.commit().unwrap();

    // Fill the filesystem, then write until a commit fails.
    let filler = dir.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 4 << 20]);
    let mut failed = None;
    for i in 0..64u64 {
        let result = store.begin().and_then(|txn| {
            txn.put(&format!("big-{i}"), &record(10 + i, 256 << 10))?;
            txn.commit()
        });
        if let Err(e) = result {
            failed = Some(e.to_string());
            break;
        }
    }
    let failed = failed.expect("a write on a full filesystem failed");
    eprintln!("the failed write: {failed}");

    // Space is back: the store works again without a restart, and kept what was committed.
    std::fs::remove_file(&filler).unwrap();
    let txn = store
        .begin()
        .expect("the store recovers once space is back");
    txn.put("after", &record(99, 100)).unwrap();
    txn.commit().unwrap();
    let read = store.read().unwrap();
    assert_eq!(read.get("kept").unwrap().unwrap().id, 1);
    assert_eq!(read.get("after").unwrap().unwrap().id, 99);
}
