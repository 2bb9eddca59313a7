//! A containerd gRPC client over its unix socket: every request carries the namespace (and the
//! lease, when one is held) as containerd's metadata headers. Thin typed wrappers for the calls
//! `lazysnap pull` makes on the content, images, leases, diff and snapshots services.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};
use tracing::Instrument;

use super::proto::content::content_client::ContentClient;
use super::proto::content::{
    InfoRequest, UpdateRequest, WriteAction, WriteContentRequest, WriteContentResponse,
};
use super::proto::diff::diff_client::DiffClient;
use super::proto::diff::ApplyRequest;
use super::proto::images::images_client::ImagesClient;
use super::proto::images::{CreateImageRequest, GetImageRequest, Image, UpdateImageRequest};
use super::proto::leases::leases_client::LeasesClient;
use super::proto::leases::{CreateRequest, DeleteRequest};
use super::proto::snapshots::snapshots_client::SnapshotsClient;
use super::proto::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use super::proto::{Descriptor, Mount};
use super::ContainerdError;
use crate::labels;

/// gRPC metadata header naming the containerd namespace of a request.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// gRPC metadata header naming the lease that protects what a request creates.
pub const LEASE_HEADER: &str = "containerd-lease";

/// Bytes sent per content Write message (containerd accepts up to 16 MiB per message).
const WRITE_CHUNK: usize = 1024 * 1024;

/// A connection to one containerd, bound to a namespace and optionally a lease. Cloning is cheap
/// (the channel is shared).
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    lease: Option<String>,
}

/// What happened to a content write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The bytes were written and committed under the expected digest.
    Written,
    /// containerd already had the digest; only its labels were updated.
    AlreadyPresent,
}

/// The answer to a Prepare.
#[derive(Debug)]
pub enum Prepared {
    /// A new active snapshot to unpack into, with its mounts.
    Active(Vec<Mount>),
    /// The snapshotter already has the target (a remote layer it mounted lazily).
    AlreadyExists,
}

impl Containerd {
    /// Connects to containerd's gRPC socket and binds requests to `namespace`.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self, ContainerdError> {
        if namespace.is_empty()
            || MetadataValue::try_from(namespace).is_err()
            || namespace.len() > 76
        {
            return Err(ContainerdError::Invalid {
                what: "namespace".to_string(),
                detail: format!(
                    "{namespace:?} is not a containerd namespace (letters, digits, '.', '_', '-'; \
                     at most 76 characters)"
                ),
            });
        }
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector always dials the unix socket.
        let channel = Endpoint::from_static("http://containerd.sock")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|err| ContainerdError::Connect {
                socket: socket.display().to_string(),
                detail: error_chain(&err),
            })?;
        Ok(Self {
            channel,
            socket: socket.to_path_buf(),
            namespace: namespace.to_string(),
            lease: None,
        })
    }

    /// The gRPC channel, for services this client has no wrapper for (e.g. CRI's
    /// `runtime.v1.ImageService`, which needs no namespace header).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The namespace requests are bound to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A client whose requests also carry `lease`, so everything they create is protected from
    /// garbage collection until the lease is deleted.
    pub fn with_lease(&self, lease: &str) -> Self {
        Self {
            lease: Some(lease.to_string()),
            ..self.clone()
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        // Both values were validated as header values when set (namespace in connect, lease ids
        // come from containerd).
        if let Ok(value) = MetadataValue::try_from(self.namespace.as_str()) {
            metadata.insert(NAMESPACE_HEADER, value);
        }
        if let Some(lease) = &self.lease {
            if let Ok(value) = MetadataValue::try_from(lease.as_str()) {
                metadata.insert(LEASE_HEADER, value);
            }
        }
        request
    }

    /// Creates a lease that expires by itself after `expire` (in case this process dies) and
    /// returns its id.
    pub async fn create_lease(&self, expire: Duration) -> Result<String, ContainerdError> {
        let expire_at = SystemTime::now() + expire;
        let mut lease_labels = HashMap::new();
        lease_labels.insert(labels::GC_EXPIRE.to_string(), rfc3339(expire_at));
        let response = LeasesClient::new(self.channel.clone())
            .create(self.request(CreateRequest {
                id: String::new(),
                labels: lease_labels,
            }))
            .instrument(tracing::debug_span!("containerd.leases.create"))
            .await
            .map_err(rpc_error("Leases.Create", "new lease"))?
            .into_inner();
        let id = response.lease.map(|lease| lease.id).unwrap_or_default();
        if id.is_empty() || MetadataValue::try_from(id.as_str()).is_err() {
            return Err(ContainerdError::Protocol(format!(
                "Leases.Create returned an unusable lease id {id:?}"
            )));
        }
        Ok(id)
    }

    /// Deletes a lease; what it protected becomes collectable unless something else references it.
    pub async fn delete_lease(&self, id: &str) -> Result<(), ContainerdError> {
        LeasesClient::new(self.channel.clone())
            .delete(self.request(DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .instrument(tracing::debug_span!("containerd.leases.delete", lease = id))
            .await
            .map_err(rpc_error("Leases.Delete", id))?;
        Ok(())
    }

    /// Labels of a blob in the content store, or `None` if containerd does not have it.
    pub async fn content_labels(
        &self,
        digest: &str,
    ) -> Result<Option<HashMap<String, String>>, ContainerdError> {
        let result = ContentClient::new(self.channel.clone())
            .info(self.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .instrument(tracing::debug_span!("containerd.content.info", digest))
            .await;
        match result {
            Ok(response) => Ok(Some(
                response
                    .into_inner()
                    .info
                    .map(|info| info.labels)
                    .unwrap_or_default(),
            )),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(rpc_error("Content.Info", digest)(status)),
        }
    }

    /// Sets (adds or replaces) `new_labels` on a blob in the content store, keeping its others.
    pub async fn update_content_labels(
        &self,
        digest: &str,
        new_labels: &HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        if new_labels.is_empty() {
            return Ok(());
        }
        let paths = new_labels
            .keys()
            .map(|key| format!("labels.{key}"))
            .collect();
        ContentClient::new(self.channel.clone())
            .update(self.request(UpdateRequest {
                info: Some(super::proto::content::Info {
                    digest: digest.to_string(),
                    labels: new_labels.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .instrument(tracing::debug_span!("containerd.content.update", digest))
            .await
            .map_err(rpc_error("Content.Update", digest))?;
        Ok(())
    }

    /// Streams `data` into the content store under `digest` (size `size`), verified by containerd
    /// against both, and commits it with `content_labels`. If containerd already has the digest,
    /// nothing is written (the stream is not polled) and the labels are added to the existing blob.
    /// `on_bytes` is told how many bytes each written message carried.
    pub async fn write_content<S, E>(
        &self,
        digest: &str,
        size: u64,
        content_labels: HashMap<String, String>,
        data: S,
        mut on_bytes: impl FnMut(u64) + Send,
    ) -> Result<WriteOutcome, ContainerdError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let span = tracing::debug_span!("containerd.content.write", digest, size);
        async move {
            let total = i64::try_from(size).map_err(|_| ContainerdError::Invalid {
                what: format!("blob {digest}"),
                detail: format!("size {size} does not fit containerd's int64"),
            })?;
            let reference = format!("lazysnap-{digest}");
            let (sender, receiver) = tokio::sync::mpsc::channel::<WriteContentRequest>(2);
            // The first message opens (or resumes) the ingest and sets what it must end up as;
            // containerd answers AlreadyExists right away if it has the digest.
            let opening = WriteContentRequest {
                action: WriteAction::Stat as i32,
                r#ref: reference.clone(),
                total,
                expected: digest.to_string(),
                ..Default::default()
            };
            sender
                .send(opening)
                .await
                .map_err(|_| ContainerdError::Protocol("content write stream closed".into()))?;
            let call = ContentClient::new(self.channel.clone())
                .write(self.request(tokio_stream::wrappers::ReceiverStream::new(receiver)))
                .await;
            let mut responses = match call {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == Code::AlreadyExists => {
                    self.update_content_labels(digest, &content_labels).await?;
                    return Ok(WriteOutcome::AlreadyPresent);
                }
                Err(status) => return Err(rpc_error("Content.Write", digest)(status)),
            };
            let mut exchange = WriteExchange {
                sender,
                responses: &mut responses,
                digest,
            };
            match exchange.next_response().await {
                Ok(_) => {}
                Err(Ok(status)) if status.code() == Code::AlreadyExists => {
                    self.update_content_labels(digest, &content_labels).await?;
                    return Ok(WriteOutcome::AlreadyPresent);
                }
                Err(err) => return Err(flatten(err, digest)),
            }
            // Always start at offset 0: containerd drops any bytes a previous, interrupted
            // write of the same ref left behind.
            let mut offset: u64 = 0;
            let mut pending = BytesMut::new();
            let data = data.fuse();
            futures::pin_mut!(data);
            loop {
                let next = data.next().await;
                let finished = next.is_none();
                if let Some(item) = next {
                    let bytes = item.map_err(|err| {
                        ContainerdError::Source(format!("reading blob {digest}: {err}"))
                    })?;
                    pending.extend_from_slice(&bytes);
                }
                while pending.len() >= WRITE_CHUNK || (finished && !pending.is_empty()) {
                    let take = pending.len().min(WRITE_CHUNK);
                    let chunk = pending.split_to(take).freeze();
                    let chunk_len = chunk.len() as u64;
                    let end = offset.saturating_add(chunk_len);
                    if end > size {
                        return Err(ContainerdError::Source(format!(
                            "blob {digest} is longer than the {size} bytes its descriptor says"
                        )));
                    }
                    exchange
                        .send(WriteContentRequest {
                            action: WriteAction::Write as i32,
                            offset: offset as i64,
                            data: chunk.to_vec(),
                            ..Default::default()
                        })
                        .await?;
                    let answer = exchange
                        .next_response()
                        .await
                        .map_err(|err| flatten(err, digest))?;
                    if u64::try_from(answer.offset).ok() != Some(end) {
                        return Err(ContainerdError::Protocol(format!(
                            "containerd acknowledged blob {digest} up to offset {} after a write \
                             ending at {end}",
                            answer.offset
                        )));
                    }
                    offset = end;
                    on_bytes(chunk_len);
                }
                if finished {
                    break;
                }
            }
            if offset != size {
                return Err(ContainerdError::Source(format!(
                    "blob {digest} ended after {offset} bytes, its descriptor says {size}"
                )));
            }
            exchange
                .send(WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    total,
                    expected: digest.to_string(),
                    offset: offset as i64,
                    labels: content_labels.clone(),
                    ..Default::default()
                })
                .await?;
            match exchange.next_response().await {
                Ok(answer) => {
                    if !answer.digest.is_empty() && answer.digest != digest {
                        return Err(ContainerdError::Protocol(format!(
                            "containerd committed {} while {digest} was expected",
                            answer.digest
                        )));
                    }
                    Ok(WriteOutcome::Written)
                }
                // Someone else committed the same digest meanwhile.
                Err(Ok(status)) if status.code() == Code::AlreadyExists => {
                    self.update_content_labels(digest, &content_labels).await?;
                    Ok(WriteOutcome::AlreadyPresent)
                }
                Err(err) => Err(flatten(err, digest)),
            }
        }
        .instrument(span)
        .await
    }

    /// Stat of a snapshot: `Ok(true)` if `key` exists in `snapshotter`.
    pub async fn snapshot_exists(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<bool, ContainerdError> {
        let result = SnapshotsClient::new(self.channel.clone())
            .stat(self.request(StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .instrument(tracing::debug_span!(
                "containerd.snapshots.stat",
                snapshotter,
                key
            ))
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(rpc_error("Snapshots.Stat", key)(status)),
        }
    }

    /// Prepares an active snapshot `key` on `parent` (empty for none) in `snapshotter`.
    pub async fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        snapshot_labels: HashMap<String, String>,
    ) -> Result<Prepared, ContainerdError> {
        let result = SnapshotsClient::new(self.channel.clone())
            .prepare(self.request(PrepareSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: snapshot_labels,
            }))
            .instrument(tracing::info_span!(
                "containerd.snapshots.prepare",
                snapshotter,
                key,
                parent
            ))
            .await;
        match result {
            Ok(response) => Ok(Prepared::Active(response.into_inner().mounts)),
            Err(status) if status.code() == Code::AlreadyExists => Ok(Prepared::AlreadyExists),
            Err(status) => Err(rpc_error("Snapshots.Prepare", key)(status)),
        }
    }

    /// Commits active snapshot `key` as `name`. `Ok(false)` if `name` already exists (another
    /// pull committed the same layer first).
    pub async fn commit_snapshot(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        snapshot_labels: HashMap<String, String>,
    ) -> Result<bool, ContainerdError> {
        let result = SnapshotsClient::new(self.channel.clone())
            .commit(self.request(CommitSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                name: name.to_string(),
                key: key.to_string(),
                labels: snapshot_labels,
            }))
            .instrument(tracing::debug_span!(
                "containerd.snapshots.commit",
                snapshotter,
                name,
                key
            ))
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::AlreadyExists => Ok(false),
            Err(status) => Err(rpc_error("Snapshots.Commit", name)(status)),
        }
    }

    /// Removes snapshot `key` (ignores NotFound).
    pub async fn remove_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<(), ContainerdError> {
        let result = SnapshotsClient::new(self.channel.clone())
            .remove(self.request(RemoveSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .instrument(tracing::debug_span!(
                "containerd.snapshots.remove",
                snapshotter,
                key
            ))
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(rpc_error("Snapshots.Remove", key)(status)),
        }
    }

    /// Extracts the layer blob `layer` (already in the content store) onto `mounts` with
    /// containerd's differ; returns the digest of the uncompressed layer (its diff ID).
    pub async fn apply_layer(
        &self,
        layer: Descriptor,
        mounts: Vec<Mount>,
    ) -> Result<String, ContainerdError> {
        let digest = layer.digest.clone();
        let response = DiffClient::new(self.channel.clone())
            .apply(self.request(ApplyRequest {
                diff: Some(layer),
                mounts,
                payloads: HashMap::new(),
            }))
            .instrument(tracing::info_span!("containerd.diff.apply", layer = %digest))
            .await
            .map_err(rpc_error("Diff.Apply", &digest))?
            .into_inner();
        response
            .applied
            .map(|applied| applied.digest)
            .filter(|applied| !applied.is_empty())
            .ok_or_else(|| {
                ContainerdError::Protocol(format!(
                    "Diff.Apply of {digest} returned no applied descriptor"
                ))
            })
    }

    /// Creates image record `name` pointing at `target`, or updates it if it exists.
    pub async fn create_or_update_image(
        &self,
        name: &str,
        target: Descriptor,
        image_labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let image = Image {
            name: name.to_string(),
            labels: image_labels,
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let mut images = ImagesClient::new(self.channel.clone());
        let created = images
            .create(self.request(CreateImageRequest {
                image: Some(image.clone()),
            }))
            .instrument(tracing::debug_span!("containerd.images.create", name))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => {
                images
                    .update(self.request(UpdateImageRequest {
                        image: Some(image),
                        // Empty mask: replace target and labels.
                        update_mask: None,
                    }))
                    .instrument(tracing::debug_span!("containerd.images.update", name))
                    .await
                    .map_err(rpc_error("Images.Update", name))?;
                Ok(())
            }
            Err(status) => Err(rpc_error("Images.Create", name)(status)),
        }
    }

    /// The image record `name`, or `None` if containerd has no such image.
    pub async fn get_image(&self, name: &str) -> Result<Option<Image>, ContainerdError> {
        let result = ImagesClient::new(self.channel.clone())
            .get(self.request(GetImageRequest {
                name: name.to_string(),
            }))
            .instrument(tracing::debug_span!("containerd.images.get", name))
            .await;
        match result {
            Ok(response) => Ok(response.into_inner().image),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(rpc_error("Images.Get", name)(status)),
        }
    }
}

/// One bidirectional content Write stream: requests out, one response back per request.
struct WriteExchange<'a> {
    sender: tokio::sync::mpsc::Sender<WriteContentRequest>,
    responses: &'a mut tonic::Streaming<WriteContentResponse>,
    digest: &'a str,
}

impl WriteExchange<'_> {
    async fn send(&mut self, request: WriteContentRequest) -> Result<(), ContainerdError> {
        if self.sender.send(request).await.is_ok() {
            return Ok(());
        }
        // The request stream is gone: containerd ended the call; its status says why.
        match self.responses.message().await {
            Err(status) => Err(rpc_error("Content.Write", self.digest)(status)),
            Ok(_) => Err(ContainerdError::Protocol(format!(
                "containerd closed the content write of {} early",
                self.digest
            ))),
        }
    }

    /// The next response; `Err(Ok(status))` carries containerd's error status so callers can
    /// react to AlreadyExists.
    async fn next_response(
        &mut self,
    ) -> Result<WriteContentResponse, Result<Status, ContainerdError>> {
        match self.responses.message().await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(Err(ContainerdError::Protocol(format!(
                "containerd ended the content write of {} without an answer",
                self.digest
            )))),
            Err(status) => Err(Ok(status)),
        }
    }
}

fn flatten(err: Result<Status, ContainerdError>, digest: &str) -> ContainerdError {
    match err {
        Ok(status) => rpc_error("Content.Write", digest)(status),
        Err(err) => err,
    }
}

/// Maps a gRPC status into an error naming the call and what it was about.
pub(crate) fn rpc_error(call: &'static str, what: &str) -> impl FnOnce(Status) -> ContainerdError {
    let what = what.to_string();
    move |status| ContainerdError::Rpc {
        call,
        what,
        code: status.code(),
        message: status.message().to_string(),
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `time` as RFC 3339 UTC with whole seconds (`2024-01-02T03:04:05Z`), the form containerd's
/// `containerd.io/gc.expire` label takes.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Gregorian (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's
/// days-to-civil algorithm, restricted to dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }
}
