//! The tonic adapter: containerd's snapshots.v1 gRPC calls mapped onto [`Service`], each in a
//! tracing span, with errors as gRPC statuses.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use tracing::{info, info_span, Instrument};

use crate::snapshotter::proto::snapshots as pb;
use crate::snapshotter::store::{Kind, SnapshotInfo};

use super::Service;

pub(super) fn to_map(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

pub(super) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a snapshot info to its protobuf form.
pub fn info_to_proto(info: SnapshotInfo) -> pb::Info {
    let kind = match info.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: kind as i32,
        created_at: Some(timestamp(info.created)),
        updated_at: Some(timestamp(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

pub(super) type ListStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

/// How many infos one List response message carries.
pub(super) const LIST_BATCH: usize = 100;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Prepare", key = %r.key, parent = %r.parent);
        let mounts = Service::prepare(self, &r.key, &r.parent, to_map(r.labels))
            .instrument(span)
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.View", key = %r.key, parent = %r.parent);
        let mounts = Service::view(self, &r.key, &r.parent, to_map(r.labels))
            .instrument(span)
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Mounts", key = %r.key);
        let mounts = Service::mounts(self, &r.key).instrument(span).await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Commit", name = %r.name, key = %r.key);
        Service::commit(self, &r.name, &r.key, to_map(r.labels))
            .instrument(span)
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Remove", key = %r.key);
        Service::remove(self, &r.key).instrument(span).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Stat", key = %r.key);
        let info = Service::stat(self, &r.key).instrument(span).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_to_proto(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("Update needs info with a snapshot name"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let span = info_span!("snapshots.Update", name = %info.name);
        let updated = Service::update(self, &info.name, to_map(info.labels), paths)
            .instrument(span)
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_to_proto(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.List", filters = ?r.filters);
        let infos = Service::list(self, &r.filters).instrument(span).await?;
        let mut batches = Vec::new();
        let mut infos = infos.into_iter().map(info_to_proto).peekable();
        while infos.peek().is_some() {
            let info: Vec<pb::Info> = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Usage", key = %r.key);
        let (size, inodes) = Service::usage(self, &r.key).instrument(span).await?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(size).unwrap_or(i64::MAX),
            inodes: i64::try_from(inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let span = info_span!("snapshots.Cleanup");
        let removed = Service::cleanup(self).instrument(span).await?;
        info!(removed, "cleanup removed orphan snapshot directories");
        Ok(Response::new(()))
    }
}
