//! Conformance suite for the snapshotter, in the spirit of containerd's snapshotter testsuite:
//! every test starts the real service on a temp unix socket and drives it with a tonic client,
//! mounting what it returns with real bind / overlay mounts (needs root: fails loudly without).
//! The remote-layer path of Prepare is `snapshotter_remote_layers.rs`.

mod snapshotter_common;
use snapshotter_common::*;

use std::collections::HashMap;
use std::sync::Arc;

use lazysnap::labels;
use lazysnap::snapshotter::proto::snapshots as pb;
use lazysnap::snapshotter::NoRemoteLayers;
use tonic::Code;

#[tokio::test]
async fn basic_prepare_commit_view_with_real_mounts() {
    let mut h = Harness::start().await;
    let snaps = h.snapshots_dir();

    let mounts = h.prepare("active-base", "").await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(mounts[0].options, ["rw", "rbind"]);
    {
        let target = h.mount_dir("base");
        let _m = mount_all(&mounts, &target, &snaps);
        std::fs::write(target.join("foo"), "foo\n").unwrap();
        std::fs::create_dir(target.join("dir")).unwrap();
        std::fs::write(target.join("dir/bar"), "bar\n").unwrap();
    }
    h.commit("base", "active-base").await.unwrap();
    assert_eq!(
        h.stat("active-base").await.unwrap_err().code(),
        Code::NotFound
    );
    let base = h.stat("base").await.unwrap();
    assert_eq!(base.kind, pb::Kind::Committed as i32);
    assert_eq!(base.parent, "");
    assert_eq!(
        base.labels.get("origin").map(String::as_str),
        Some("active-base")
    );
    let usage = h.usage("base").await.unwrap();
    assert!(usage.inodes >= 4 && usage.size > 0, "{usage:?}");

    let mounts = h.prepare("active-top", "base").await.unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    assert!(mounts[0].options.iter().any(|o| o.starts_with("upperdir=")));
    assert_eq!(h.mounts("active-top").await.unwrap(), mounts);
    {
        let target = h.mount_dir("top");
        let _m = mount_all(&mounts, &target, &snaps);
        assert_eq!(read(target.join("foo")), "foo\n");
        std::fs::write(target.join("baz"), "baz\n").unwrap();
        std::fs::remove_file(target.join("foo")).unwrap();
    }
    h.commit("top", "active-top").await.unwrap();
    let top = h.stat("top").await.unwrap();
    assert_eq!(top.parent, "base");

    // A view of two layers is a read-only overlay; of one layer a read-only bind.
    let mounts = h.view("view-top", "top").await.unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    assert!(mounts[0]
        .options
        .iter()
        .all(|o| !o.starts_with("upperdir=")));
    {
        let target = h.mount_dir("view");
        let _m = mount_all(&mounts, &target, &snaps);
        assert_eq!(read(target.join("baz")), "baz\n");
        assert_eq!(read(target.join("dir/bar")), "bar\n");
        assert!(
            !target.join("foo").exists(),
            "deleted file must stay deleted"
        );
        assert!(
            std::fs::write(target.join("new"), "x").is_err(),
            "a view is read-only"
        );
    }
    let view = h.stat("view-top").await.unwrap();
    assert_eq!(view.kind, pb::Kind::View as i32);
    let mounts = h.view("view-base", "base").await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(mounts[0].options, ["ro", "rbind"]);
    assert!(mounts[0].source.ends_with("/fs"));
    h.stop().await;
}

#[tokio::test]
async fn error_codes_match_containerd() {
    let mut h = Harness::start().await;
    h.prepare("a", "").await.unwrap();
    assert_eq!(
        h.prepare("a", "").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        h.prepare("b", "missing").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        h.prepare("b", "a").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        h.prepare("", "").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        h.commit("x", "missing").await.unwrap_err().code(),
        Code::NotFound
    );
    h.commit("c", "a").await.unwrap();
    assert_eq!(
        h.mounts("c").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(h.mounts("nope").await.unwrap_err().code(), Code::NotFound);
    h.prepare("d", "c").await.unwrap();
    assert_eq!(
        h.commit("c", "d").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    h.view("v", "c").await.unwrap();
    assert_eq!(
        h.commit("cv", "v").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        h.remove("c").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(h.remove("nope").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(h.stat("nope").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        h.list(&["name~=x"]).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let long_label = HashMap::from([("k".to_string(), "v".repeat(5000))]);
    assert_eq!(
        h.prepare_labeled("e", "", long_label)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    h.stop().await;
}

#[tokio::test]
async fn remove_and_cleanup_free_directories() {
    let mut h = Harness::start().await;
    let snaps = h.snapshots_dir();
    h.prepare("a", "").await.unwrap();
    h.commit("base", "a").await.unwrap();
    h.prepare("b", "base").await.unwrap();
    let dirs_before = std::fs::read_dir(&snaps).unwrap().count();
    assert_eq!(dirs_before, 2);
    h.remove("b").await.unwrap();
    h.remove("base").await.unwrap();
    assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 0);
    assert!(h.names(&[]).await.is_empty());

    // Orphans: a directory no record owns and an interrupted temp dir.
    std::fs::create_dir_all(snaps.join("9999/fs/sub")).unwrap();
    std::fs::write(snaps.join("9999/fs/sub/file"), "x").unwrap();
    std::fs::create_dir_all(snaps.join("new-77/fs")).unwrap();
    h.prepare("kept", "").await.unwrap();
    h.cleanup().await;
    let left: Vec<String> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 1, "only the live snapshot stays: {left:?}");
    assert!(h.mounts("kept").await.is_ok());
    h.stop().await;
}

#[tokio::test]
async fn walk_with_filters_and_update_labels() {
    let mut h = Harness::start().await;
    let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    h.prepare_labeled("a", "", labels(&[(labels::SNAPSHOT_REF, "sha256:one")]))
        .await
        .unwrap();
    h.commit("one", "a").await.unwrap();
    h.client
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "lazysnap".into(),
            info: Some(pb::Info {
                name: "one".into(),
                labels: labels(&[(labels::SNAPSHOT_REF, "sha256:one"), ("keep", "1")]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![
                    format!("labels.{}", labels::SNAPSHOT_REF),
                    "labels.keep".into(),
                ],
            }),
        })
        .await
        .unwrap();
    h.prepare("b", "one").await.unwrap();
    h.commit("two", "b").await.unwrap();
    h.prepare("c", "two").await.unwrap();
    h.view("v", "one").await.unwrap();

    assert_eq!(h.names(&[]).await, ["c", "one", "two", "v"]);
    assert_eq!(
        h.names(&[r#"labels."containerd.io/snapshot.ref"==sha256:one"#])
            .await,
        ["one"]
    );
    assert_eq!(
        h.names(&[r#"labels."containerd.io/snapshot.ref"=="sha256:one",parent=="""#])
            .await,
        ["one"]
    );
    assert_eq!(h.names(&["parent==one"]).await, ["two", "v"]);
    assert_eq!(h.names(&["parent==one,kind==view"]).await, ["v"]);
    assert_eq!(
        h.names(&["parent==one", "name==c"]).await,
        ["c", "two", "v"]
    );
    assert_eq!(h.names(&["labels.keep==1"]).await, ["one"]);

    // Deleting one label through its field path, then replacing all labels.
    let updated = h
        .client
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "lazysnap".into(),
            info: Some(pb::Info {
                name: "one".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.keep".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert!(!updated.labels.contains_key("keep"));
    assert!(updated.labels.contains_key(labels::SNAPSHOT_REF));
    let before = h.stat("one").await.unwrap();
    let (created, updated) = (before.created_at.unwrap(), before.updated_at.unwrap());
    assert!((updated.seconds, updated.nanos) >= (created.seconds, created.nanos));
    let err = h
        .client
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "lazysnap".into(),
            info: Some(pb::Info {
                name: "one".into(),
                parent: "x".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    h.stop().await;
}

#[tokio::test]
async fn chain_of_128_layers_mounts_every_layer() {
    let mut h = Harness::start().await;
    let snaps = h.snapshots_dir();
    let mut parent = String::new();
    for n in 0..128 {
        let key = format!("active-{n}");
        let mounts = h.prepare(&key, &parent).await.unwrap();
        {
            let target = h.mount_dir(&key);
            let _m = mount_all(&mounts, &target, &snaps);
            std::fs::write(target.join(format!("layer-{n}")), n.to_string()).unwrap();
            std::fs::write(target.join("top"), n.to_string()).unwrap();
        }
        let name = format!("layer-{n}");
        h.commit(&name, &key).await.unwrap();
        parent = name;
    }
    let mounts = h.view("view", &parent).await.unwrap();
    let lower = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lower.split(':').count(), 128);
    let target = h.mount_dir("view");
    let _m = mount_all(&mounts, &target, &snaps);
    for n in 0..128 {
        assert_eq!(read(target.join(format!("layer-{n}"))), n.to_string());
    }
    assert_eq!(read(target.join("top")), "127");
    drop(_m);
    h.stop().await;
}

#[tokio::test]
async fn concurrent_prepares() {
    let mut h = Harness::start().await;
    h.prepare("a", "").await.unwrap();
    h.commit("base", "a").await.unwrap();

    let mut tasks = Vec::new();
    for n in 0..32 {
        let mut client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .prepare(pb::PrepareSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: format!("c-{n}"),
                    parent: "base".into(),
                    labels: HashMap::new(),
                })
                .await
                .map(|r| r.into_inner().mounts)
        }));
    }
    let mut uppers = std::collections::HashSet::new();
    for task in tasks {
        let mounts = task.await.unwrap().unwrap();
        let upper = mounts[0]
            .options
            .iter()
            .find(|o| o.starts_with("upperdir="))
            .unwrap()
            .clone();
        assert!(
            uppers.insert(upper),
            "every snapshot gets its own upper dir"
        );
    }

    // The same key prepared concurrently: exactly one wins, the others get AlreadyExists.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .prepare(pb::PrepareSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: "same".into(),
                    parent: "base".into(),
                    labels: HashMap::new(),
                })
                .await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(h.names(&["parent==base"]).await.len(), 33);
    // Losers left no directories behind.
    assert_eq!(std::fs::read_dir(h.snapshots_dir()).unwrap().count(), 34);
    h.stop().await;
}

#[tokio::test]
async fn metadata_survives_restart() {
    let mut h = Harness::start().await;
    h.prepare("a", "").await.unwrap();
    h.commit("base", "a").await.unwrap();
    h.prepare("b", "base").await.unwrap();
    let dir = h.stop().await;

    let mut h = Harness::start_in(dir, Arc::new(NoRemoteLayers)).await;
    assert_eq!(h.names(&[]).await, ["b", "base"]);
    let mounts = h.mounts("b").await.unwrap();
    assert!(mounts[0].options.iter().any(|o| o.starts_with("lowerdir=")));
    // New ids never collide with existing directories.
    h.prepare("c", "base").await.unwrap();
    assert_eq!(std::fs::read_dir(h.snapshots_dir()).unwrap().count(), 3);
    h.stop().await;
}

/// How many metadata transactions `call` began.
macro_rules! transactions_of {
    ($h:expr, $call:expr) => {{
        let before = $h.service.metadata_transactions();
        let _ = $call;
        $h.service.metadata_transactions() - before
    }};
}

#[tokio::test]
async fn every_call_is_one_metadata_transaction() {
    let mut h = Harness::start().await;
    assert_eq!(
        transactions_of!(h, h.prepare("a", "").await.unwrap()),
        1,
        "Prepare"
    );
    assert_eq!(
        transactions_of!(h, h.mounts("a").await.unwrap()),
        1,
        "Mounts"
    );
    assert_eq!(transactions_of!(h, h.usage("a").await.unwrap()), 1, "Usage");
    assert_eq!(
        transactions_of!(h, h.commit("base", "a").await.unwrap()),
        1,
        "Commit"
    );
    assert_eq!(
        transactions_of!(h, h.prepare("b", "base").await.unwrap()),
        1,
        "Prepare on a parent"
    );
    assert_eq!(
        transactions_of!(h, h.view("v", "base").await.unwrap()),
        1,
        "View"
    );
    assert_eq!(
        transactions_of!(h, h.stat("base").await.unwrap()),
        1,
        "Stat"
    );
    assert_eq!(
        transactions_of!(h, h.list(&["parent==base"]).await.unwrap()),
        1,
        "List"
    );
    let update = pb::UpdateSnapshotRequest {
        snapshotter: "lazysnap".into(),
        info: Some(pb::Info {
            name: "base".into(),
            labels: HashMap::from([("k".to_string(), "v".to_string())]),
            ..Default::default()
        }),
        update_mask: None,
    };
    assert_eq!(
        transactions_of!(h, h.client.update(update).await.unwrap()),
        1,
        "Update"
    );
    assert_eq!(
        transactions_of!(h, h.remove("base").await.unwrap_err()),
        1,
        "Remove refused"
    );
    assert_eq!(
        transactions_of!(h, h.remove("v").await.unwrap()),
        1,
        "Remove"
    );
    assert_eq!(transactions_of!(h, h.cleanup().await), 1, "Cleanup");
    // A layer with its target label but not the image's labels is prepared locally: one.
    let labelled = HashMap::from([(labels::SNAPSHOT_REF.to_string(), "sha256:c".to_string())]);
    assert_eq!(
        transactions_of!(h, h.prepare_labeled("c", "base", labelled).await.unwrap()),
        1,
        "Prepare of a labelled layer"
    );
    h.stop().await;
}
