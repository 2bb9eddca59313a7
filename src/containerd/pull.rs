//! `lazysnap pull` as a library: resolve an image from its source, store its index, manifest and
//! config in containerd's content store with the GC labels containerd itself writes, prepare each
//! layer through the chosen snapshotter (with the CRI labels a remote snapshotter needs to mount it
//! lazily), unpack with containerd's differ only the layers that fall back, and register the
//! image. Everything happens under one containerd lease, deleted at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tracing::Instrument;

use super::client::Containerd;
use super::proto::Descriptor as ProtoDescriptor;
use super::ContainerdError;
use crate::digest::Digest;
use crate::image::{self, Descriptor, ImageConfig, Index, Manifest, Platform};
use crate::labels;

mod layer;
use layer::{BlobFetch, LayerContext, SharedFetch, PREFETCH_CONCURRENCY};

/// A manifest or index as fetched, with its verified digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Bytes,
}

/// Where a pull reads the image from: the registry in production (see
/// [`super::registry_source`]). Every answer's digest is verified by the source.
pub trait ImageSource: Send + Sync {
    /// The top-level manifest or index the reference names (by tag or digest).
    fn resolve(&self) -> BoxFuture<'_, Result<FetchedManifest, ContainerdError>>;
    /// A manifest of the same repository by digest (a platform's manifest from an index).
    fn manifest<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<FetchedManifest, ContainerdError>>;
    /// A small blob (the config) whole.
    fn blob<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<Bytes, ContainerdError>>;
    /// A layer blob as a stream of byte chunks.
    fn blob_stream<'a>(
        &'a self,
        digest: &'a Digest,
        size: u64,
    ) -> BoxFuture<'a, Result<BoxStream<'static, Result<Bytes, ContainerdError>>, ContainerdError>>;
    /// `(registry host, repository)` for containerd's `distribution.source` labels, if known.
    fn distribution_source(&self) -> Option<(String, String)>;
}

/// What to pull and where.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Image name registered in containerd (and passed to the snapshotter as the image ref).
    pub image_name: String,
    /// Snapshotter that prepares the layers (`lazysnap`, or `overlayfs` for a plain pull).
    pub snapshotter: String,
    /// Platform chosen from an index.
    pub platform: Platform,
    /// How long the lease protecting a pull in progress lives if this process dies.
    pub lease_expiry: Duration,
}

/// How a layer ended up in the snapshotter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// The snapshot already existed before this pull.
    Present,
    /// The snapshotter mounted the layer remotely: nothing was downloaded.
    Lazy,
    /// The layer fell back: its blob was fetched and unpacked by containerd's differ.
    Unpacked,
}

impl LayerOutcome {
    /// Short human word for progress output.
    pub fn describe(self) -> &'static str {
        match self {
            LayerOutcome::Present => "already present",
            LayerOutcome::Lazy => "lazy",
            LayerOutcome::Unpacked => "fetched+unpacked",
        }
    }
}

/// One layer of the pulled image.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub digest: Digest,
    pub size: u64,
    pub chain_id: String,
    pub outcome: LayerOutcome,
    /// Blob bytes written to the content store for this layer (0 unless unpacked here).
    pub fetched_bytes: u64,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// Digest of the image target (the index, or the manifest when there is none).
    pub target_digest: Digest,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    /// Chain ID of the top layer: the snapshot containers of this image start from.
    pub top_chain_id: String,
    pub layers: Vec<LayerReport>,
}

/// Receives progress events (the CLI draws bars; tests may record them).
pub trait PullProgress: Send + Sync {
    /// The image's layers are known.
    fn layers(&self, _layers: &[Descriptor]) {}
    /// Bytes of layer `index` were written to the content store.
    fn layer_bytes(&self, _index: usize, _bytes: u64) {}
    /// Layer `index` is done.
    fn layer_done(&self, _index: usize, _outcome: LayerOutcome) {}
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl PullProgress for NoProgress {}

/// Pulls the image `source` resolves into containerd (see the module docs).
pub async fn pull(
    containerd: &Containerd,
    source: &dyn ImageSource,
    options: &PullOptions,
    progress: Arc<dyn PullProgress>,
) -> Result<PullReport, ContainerdError> {
    let span = tracing::info_span!("pull", image = %options.image_name, snapshotter = %options.snapshotter);
    let lease = containerd
        .create_lease(options.lease_expiry)
        .instrument(span.clone())
        .await?;
    let leased = containerd.with_lease(&lease);
    let result = pull_under_lease(&leased, source, options, progress)
        .instrument(span)
        .await;
    // The image record and the GC labels now keep everything; the lease only mattered while
    // pulling. On failure its deletion lets containerd collect the partial pull.
    if let Err(err) = containerd.delete_lease(&lease).await {
        tracing::warn!(lease, error = %err, "could not delete the pull lease; it expires by itself");
    }
    result
}

async fn pull_under_lease(
    containerd: &Containerd,
    source: &dyn ImageSource,
    options: &PullOptions,
    progress: Arc<dyn PullProgress>,
) -> Result<PullReport, ContainerdError> {
    let distribution = source
        .distribution_source()
        .map(|(host, repo)| (format!("{}.{host}", labels::DISTRIBUTION_SOURCE), repo))
        .filter(|(key, repo)| labels::fits(key, repo));
    let with_source = |mut map: HashMap<String, String>| {
        if let Some((key, repo)) = &distribution {
            map.insert(key.clone(), repo.clone());
        }
        map
    };

    let top = source.resolve().await?;
    let (index, manifest_fetched) = if image::is_index(&top.media_type) {
        let index: Index = image::parse_json(&format!("index {}", top.digest), &top.bytes)
            .map_err(invalid("index"))?;
        let chosen = image::select_platform(&index, &options.platform).map_err(invalid("index"))?;
        let fetched = source.manifest(&chosen.digest).await?;
        (Some((top.clone(), index)), fetched)
    } else if image::is_manifest(&top.media_type) {
        (None, top.clone())
    } else {
        return Err(ContainerdError::Invalid {
            what: format!("image {}", options.image_name),
            detail: format!(
                "its reference resolves to media type {:?}, neither a manifest nor an index",
                top.media_type
            ),
        });
    };
    let manifest: Manifest = image::parse_json(
        &format!("manifest {}", manifest_fetched.digest),
        &manifest_fetched.bytes,
    )
    .map_err(invalid("manifest"))?;
    let config_bytes = source.blob(&manifest.config.digest).await?;
    let config: ImageConfig =
        image::parse_json(&format!("config {}", manifest.config.digest), &config_bytes)
            .map_err(invalid("config"))?;
    let layers = &manifest.layers;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != layers.len() {
        return Err(ContainerdError::Invalid {
            what: format!("image {}", options.image_name),
            detail: format!(
                "manifest {} lists {} layers but config {} lists {} diff IDs",
                manifest_fetched.digest,
                layers.len(),
                manifest.config.digest,
                diff_ids.len()
            ),
        });
    }
    let chain = labels::chain_ids(diff_ids);
    let top_chain_id = chain.last().cloned().unwrap_or_default();
    progress.layers(layers);

    // Config first (children before parents, as containerd writes them), labelled with the top
    // snapshot so GC keeps the unpacked image while the config is referenced.
    let mut config_labels = HashMap::new();
    if !top_chain_id.is_empty() {
        config_labels.insert(
            format!("{}.{}", labels::GC_REF_SNAPSHOT, options.snapshotter),
            top_chain_id.clone(),
        );
    }
    containerd
        .write_content(
            &manifest.config.digest,
            config_bytes.len() as u64,
            with_source(config_labels),
            futures::stream::iter([Ok::<_, ContainerdError>(config_bytes.clone())]),
            |_| {},
        )
        .await?;

    let mut manifest_labels = HashMap::new();
    manifest_labels.insert(
        format!("{}.config", labels::GC_REF_CONTENT),
        manifest.config.digest.to_string(),
    );
    for (i, layer) in layers.iter().enumerate() {
        manifest_labels.insert(
            format!("{}.l.{i}", labels::GC_REF_CONTENT),
            layer.digest.to_string(),
        );
    }
    write_whole(
        containerd,
        &manifest_fetched.digest,
        &manifest_fetched.bytes,
        with_source(manifest_labels),
    )
    .await?;
    if let Some((index_fetched, index)) = &index {
        let mut index_labels = HashMap::new();
        for (i, entry) in index.manifests.iter().enumerate() {
            index_labels.insert(
                format!("{}.m.{i}", labels::GC_REF_CONTENT),
                entry.digest.to_string(),
            );
        }
        write_whole(
            containerd,
            &index_fetched.digest,
            &index_fetched.bytes,
            with_source(index_labels),
        )
        .await?;
    }

    let layer_digests: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
    let content_labels = with_source(HashMap::new());
    // Layers without a TOC annotation are fetched into the content store a few at a time while
    // earlier layers are prepared and unpacked (containerd's own pull overlaps fetch and unpack
    // the same way), from the moment the snapshotter declines one of them, that one and those
    // after it: until then they may be mounted lazily through a SOCI index, and fetching them
    // whole would take the link from the lazy mounts.
    let (first_fallback, first_fallback_rx) = tokio::sync::watch::channel(None::<usize>);
    let already_unpacked = match chain.last() {
        Some(top_chain) => {
            containerd
                .snapshot_exists(&options.snapshotter, top_chain)
                .await?
        }
        None => true,
    };
    let limiter = tokio::sync::Semaphore::new(PREFETCH_CONCURRENCY);
    let prefetches: Vec<Option<SharedFetch<'_>>> = layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            if already_unpacked || layer.annotations.contains_key(labels::TOC_DIGEST) {
                return None;
            }
            let request = BlobFetch {
                containerd,
                source,
                index: i,
                layer,
                diff_id: &diff_ids[i],
                content_labels: content_labels.clone(),
                progress: progress.as_ref(),
            };
            let limiter = &limiter;
            let mut first_fallback = first_fallback_rx.clone();
            let fetch: BoxFuture<'_, Result<u64, ContainerdError>> = async move {
                // A closed channel means the pull is over: the fetch is dropped soon after.
                let _ = first_fallback
                    .wait_for(|first| first.is_some_and(|first| first <= i))
                    .await;
                let _permit = limiter.acquire().await.map_err(|_| {
                    ContainerdError::Protocol("blob prefetch limiter closed".to_string())
                })?;
                request.run().await
            }
            .boxed();
            Some(fetch.shared())
        })
        .collect();
    let driver = futures::future::join_all(prefetches.iter().flatten().cloned());

    let prepare_in_order = async {
        let mut reports = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let ctx = LayerContext {
                containerd,
                source,
                options,
                index: i,
                layer,
                diff_id: &diff_ids[i],
                chain_id: &chain[i],
                parent: if i == 0 { "" } else { &chain[i - 1] },
                layer_digests: &layer_digests,
                manifest_digest: &manifest_fetched.digest,
                progress: progress.as_ref(),
                content_labels: content_labels.clone(),
                prefetch: prefetches.get(i).cloned().flatten(),
                first_fallback: &first_fallback,
            };
            let (outcome, fetched_bytes) = ctx.pull_layer().await?;
            progress.layer_done(i, outcome);
            reports.push(LayerReport {
                digest: layer.digest.clone(),
                size: layer.size,
                chain_id: chain[i].clone(),
                outcome,
                fetched_bytes,
            });
        }
        Ok::<_, ContainerdError>(reports)
    };
    // Drive the prefetches while preparing; a failed prepare drops the prefetches still running.
    let reports = {
        futures::pin_mut!(prepare_in_order);
        futures::pin_mut!(driver);
        match futures::future::select(prepare_in_order, driver).await {
            futures::future::Either::Left((reports, _)) => reports?,
            futures::future::Either::Right((_, prepare_in_order)) => prepare_in_order.await?,
        }
    };

    let target = ProtoDescriptor {
        media_type: top.media_type.clone(),
        digest: top.digest.to_string(),
        size: top.bytes.len() as i64,
        annotations: HashMap::new(),
    };
    containerd
        .create_or_update_image(&options.image_name, target, HashMap::new())
        .await?;
    Ok(PullReport {
        target_digest: top.digest,
        manifest_digest: manifest_fetched.digest.clone(),
        config_digest: manifest.config.digest.clone(),
        top_chain_id,
        layers: reports,
    })
}

async fn write_whole(
    containerd: &Containerd,
    digest: &str,
    bytes: &Bytes,
    content_labels: HashMap<String, String>,
) -> Result<(), ContainerdError> {
    containerd
        .write_content(
            digest,
            bytes.len() as u64,
            content_labels,
            futures::stream::iter([Ok::<_, ContainerdError>(bytes.clone())]),
            |_| {},
        )
        .await
        .map(|_| ())
}

fn invalid(what: &'static str) -> impl FnOnce(image::ImageError) -> ContainerdError {
    move |err| ContainerdError::Invalid {
        what: what.to_string(),
        detail: err.to_string(),
    }
}

/// Converts a byte stream error type into the pull's error.
pub fn source_stream<E: std::fmt::Display + Send + 'static>(
    stream: impl futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
    digest: &str,
) -> BoxStream<'static, Result<Bytes, ContainerdError>> {
    let digest = digest.to_string();
    stream
        .map(move |item| {
            item.map_err(|err| ContainerdError::Source(format!("reading blob {digest}: {err}")))
        })
        .boxed()
}
