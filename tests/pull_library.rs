//! The pull library against a real containerd with its builtin overlayfs snapshotter, reading the
//! fixture image from its directory: content, GC labels, unpack through containerd's differ, image
//! record, and `ctr run` of the result.

mod fixtures_common;
mod pull_common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

use lazysnap::containerd::pull::{
    pull, FetchedManifest, ImageSource, LayerOutcome, PullOptions, PullProgress,
};
use lazysnap::containerd::{Containerd, ContainerdError};
use lazysnap::image::{Descriptor, Platform};
use pull_common::*;

/// Reads an image from a fixture directory (`manifest.json`, `config.json`, `<hex>.blob`).
struct DirSource {
    dir: PathBuf,
    manifest: Bytes,
}

impl DirSource {
    fn new(variant: &str) -> Self {
        let dir = fixture_dir(variant);
        let manifest = Bytes::from(std::fs::read(dir.join("manifest.json")).unwrap());
        Self { dir, manifest }
    }

    fn read(&self, digest: &str) -> Result<Bytes, ContainerdError> {
        let hex = digest.trim_start_matches("sha256:");
        let blob = self.dir.join(format!("{hex}.blob"));
        let path = if blob.exists() {
            blob
        } else {
            self.dir.join("config.json")
        };
        std::fs::read(&path)
            .map(Bytes::from)
            .map_err(|e| ContainerdError::Source(format!("{}: {e}", path.display())))
    }
}

impl ImageSource for DirSource {
    fn resolve(&self) -> BoxFuture<'_, Result<FetchedManifest, ContainerdError>> {
        let fetched = FetchedManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".to_string(),
            digest: lazysnap::digest::sha256_digest(&self.manifest),
            bytes: self.manifest.clone(),
        };
        async move { Ok(fetched) }.boxed()
    }

    fn manifest<'a>(
        &'a self,
        digest: &'a lazysnap::digest::Digest,
    ) -> BoxFuture<'a, Result<FetchedManifest, ContainerdError>> {
        async move {
            Err(ContainerdError::Source(format!(
                "no manifest {digest} in a single-manifest directory"
            )))
        }
        .boxed()
    }

    fn blob<'a>(
        &'a self,
        digest: &'a lazysnap::digest::Digest,
    ) -> BoxFuture<'a, Result<Bytes, ContainerdError>> {
        async move { self.read(digest) }.boxed()
    }

    fn blob_stream<'a>(
        &'a self,
        digest: &'a lazysnap::digest::Digest,
        _size: u64,
    ) -> BoxFuture<'a, Result<BoxStream<'static, Result<Bytes, ContainerdError>>, ContainerdError>>
    {
        async move {
            let bytes = self.read(digest)?;
            // Several small pieces, as a network stream would deliver them.
            let pieces: Vec<Result<Bytes, ContainerdError>> = bytes
                .chunks(300_000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Ok(futures::stream::iter(pieces).boxed())
        }
        .boxed()
    }

    fn distribution_source(&self) -> Option<(String, String)> {
        Some(("127.0.0.1:5999".to_string(), "fixture".to_string()))
    }
}

#[derive(Default)]
struct Recorder {
    bytes: Mutex<HashMap<usize, u64>>,
    done: Mutex<Vec<(usize, LayerOutcome)>>,
}

impl PullProgress for Recorder {
    fn layers(&self, _layers: &[Descriptor]) {}
    fn layer_bytes(&self, index: usize, bytes: u64) {
        *self.bytes.lock().unwrap().entry(index).or_default() += bytes;
    }
    fn layer_done(&self, index: usize, outcome: LayerOutcome) {
        self.done.lock().unwrap().push((index, outcome));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_library_overlayfs_unpacks_labels_and_runs() {
    require_root_and_containerd();
    let containerd = TestContainerd::start(None);
    let namespace = "pulltest";
    let image = "127.0.0.1:5999/fixture:orig";
    let client = Containerd::connect(&containerd.socket(), namespace)
        .await
        .expect("connect");
    let source = DirSource::new("orig");
    let options = PullOptions {
        image_name: image.to_string(),
        snapshotter: "overlayfs".to_string(),
        platform: Platform::parse("linux/amd64").unwrap(),
        lease_expiry: Duration::from_secs(3600),
    };
    let recorder = Arc::new(Recorder::default());
    let report = pull(&client, &source, &options, recorder.clone())
        .await
        .unwrap_or_else(|e| panic!("pull failed: {e}\ncontainerd log:\n{}", containerd.log()));

    assert_eq!(report.layers.len(), 2);
    for (i, layer) in report.layers.iter().enumerate() {
        assert_eq!(layer.outcome, LayerOutcome::Unpacked, "layer {i}");
        assert_eq!(layer.fetched_bytes, layer.size, "layer {i} written whole");
        assert_eq!(recorder.bytes.lock().unwrap()[&i], layer.size);
    }
    assert_eq!(
        *recorder.done.lock().unwrap(),
        vec![(0, LayerOutcome::Unpacked), (1, LayerOutcome::Unpacked)]
    );

    // The GC labels containerd relies on.
    let manifest_labels = client
        .content_labels(&report.manifest_digest)
        .await
        .unwrap()
        .expect("manifest in the content store");
    assert_eq!(
        manifest_labels["containerd.io/gc.ref.content.config"],
        report.config_digest
    );
    assert_eq!(
        manifest_labels["containerd.io/gc.ref.content.l.0"],
        report.layers[0].digest
    );
    assert_eq!(
        manifest_labels["containerd.io/distribution.source.127.0.0.1:5999"],
        "fixture"
    );
    let config_labels = client
        .content_labels(&report.config_digest)
        .await
        .unwrap()
        .expect("config in the content store");
    assert_eq!(
        config_labels["containerd.io/gc.ref.snapshot.overlayfs"],
        report.top_chain_id
    );
    let layer_labels = client
        .content_labels(&report.layers[1].digest)
        .await
        .unwrap()
        .expect("layer in the content store");
    assert_eq!(
        layer_labels["containerd.io/uncompressed"],
        "sha256:1ceb7f2c42da5e6e11e0ddf9e0cbc9e3ad594365d428bde11f39605d907f9c2c"
    );
    assert!(client
        .snapshot_exists("overlayfs", &report.top_chain_id)
        .await
        .unwrap());
    let record = client
        .get_image(image)
        .await
        .unwrap()
        .expect("image record");
    assert_eq!(record.target.unwrap().digest, report.target_digest);

    // ctr sees an unpacked image and runs it.
    let out = containerd.run(
        namespace,
        "overlayfs",
        image,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(out, "x");

    // A second pull finds every layer present and fetches nothing.
    let again = pull(&client, &source, &options, Arc::new(Recorder::default()))
        .await
        .expect("second pull");
    assert!(again
        .layers
        .iter()
        .all(|l| l.outcome == LayerOutcome::Present && l.fetched_bytes == 0));

    // Nothing is left leased: after a GC the image still runs.
    let (ok, leases, err) = containerd.ctr(namespace, &["leases", "ls", "-q"]);
    assert!(ok, "{err}");
    assert_eq!(leases.trim(), "", "pull leases are deleted");
    let out = containerd.run(
        namespace,
        "overlayfs",
        image,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(out, "x");
}

/// A source whose layer bytes are altered in transit.
struct CorruptingSource(DirSource);

impl ImageSource for CorruptingSource {
    fn resolve(&self) -> BoxFuture<'_, Result<FetchedManifest, ContainerdError>> {
        self.0.resolve()
    }
    fn manifest<'a>(
        &'a self,
        digest: &'a lazysnap::digest::Digest,
    ) -> BoxFuture<'a, Result<FetchedManifest, ContainerdError>> {
        self.0.manifest(digest)
    }
    fn blob<'a>(
        &'a self,
        digest: &'a lazysnap::digest::Digest,
    ) -> BoxFuture<'a, Result<Bytes, ContainerdError>> {
        self.0.blob(digest)
    }
    fn blob_stream<'a>(
        &'a self,
        digest: &'a lazysnap::digest::Digest,
        _size: u64,
    ) -> BoxFuture<'a, Result<BoxStream<'static, Result<Bytes, ContainerdError>>, ContainerdError>>
    {
        async move {
            let mut bytes = self.0.read(digest)?.to_vec();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            Ok(futures::stream::iter([Ok(Bytes::from(bytes))]).boxed())
        }
        .boxed()
    }
    fn distribution_source(&self) -> Option<(String, String)> {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_library_refuses_a_corrupted_layer_and_registers_nothing() {
    require_root_and_containerd();
    let containerd = TestContainerd::start(None);
    let namespace = "pullcorrupt";
    let image = "127.0.0.1:5999/fixture:corrupt";
    let client = Containerd::connect(&containerd.socket(), namespace)
        .await
        .expect("connect");
    let options = PullOptions {
        image_name: image.to_string(),
        snapshotter: "overlayfs".to_string(),
        platform: Platform::parse("linux/amd64").unwrap(),
        lease_expiry: Duration::from_secs(3600),
    };
    let err = pull(
        &client,
        &CorruptingSource(DirSource::new("orig")),
        &options,
        Arc::new(Recorder::default()),
    )
    .await
    .expect_err("a layer that does not match its digest must fail the pull");
    let text = err.to_string();
    assert!(
        text.contains("sha256:0f32956b158d4de6aca00cabf2f6577c61f09b4a71af8a8e32e01116e65d72e2"),
        "the error names the layer: {text}"
    );
    assert!(client.get_image(image).await.unwrap().is_none());
    let layer = "sha256:0f32956b158d4de6aca00cabf2f6577c61f09b4a71af8a8e32e01116e65d72e2";
    assert!(client.content_labels(layer).await.unwrap().is_none());
    // The failed unpack left no active snapshot behind.
    let (ok, listing, err) = containerd.ctr(namespace, &["snapshots", "ls"]);
    assert!(ok, "{err}");
    assert_eq!(listing.lines().count(), 1, "only the header: {listing}");
}
