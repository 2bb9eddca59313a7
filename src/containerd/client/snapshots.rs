//! containerd's snapshotter and diff services through its API: snapshots checked, prepared,
//! committed and removed, and layers applied onto them.

use std::collections::HashMap;

use tonic::Code;
use tracing::Instrument;

use crate::containerd::proto::diff::diff_client::DiffClient;
use crate::containerd::proto::diff::ApplyRequest;
use crate::containerd::proto::snapshots::snapshots_client::SnapshotsClient;
use crate::containerd::proto::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use crate::containerd::proto::{Descriptor, Mount};
use crate::containerd::ContainerdError;

use super::{rpc_error, Containerd};

/// The answer to a Prepare.
#[derive(Debug)]
pub enum Prepared {
    /// A new active snapshot to unpack into, with its mounts.
    Active(Vec<Mount>),
    /// The snapshotter already has the target (a remote layer it mounted lazily).
    AlreadyExists,
}

impl Containerd {
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
}
