//! containerd snapshots.v1 service: metadata store, overlay mounts, remote-layer labels and
//! restart recovery.
//!
//! `serve(listener, service, shutdown)` runs the gRPC server on a unix socket until `shutdown`
//! resolves. [`Service`] implements containerd's snapshotter contract over a redb metadata store
//! (one transaction per call) and a directory per snapshot under `<root>/snapshots/<id>/`
//! (`fs/` is the layer contents or, for a remote layer, a FUSE mountpoint; `work/` is overlay's
//! workdir). Remote layers are asked for through the [`RemoteLayers`] hook.
//!
//! Starting it in a program or a test (the layer module passes its FUSE-backed hook instead of
//! [`NoRemoteLayers`]):
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use lazysnap::snapshotter::{serve, NoRemoteLayers, Service, ServiceOptions};
//!
//! let service = Service::open(ServiceOptions::new("/var/lib/lazysnap"), Arc::new(NoRemoteLayers))?;
//! service.restore_remote_layers().await?; // remount remote layers after a restart
//! let listener = tokio::net::UnixListener::bind("/run/lazysnap/lazysnap.sock")?;
//! serve(listener, service.clone(), async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! service.shutdown().await;
//! # Ok(()) }
//! ```

pub mod filter;
pub mod mounts;
pub mod proto;
pub mod remote;
pub mod service;
pub mod store;

pub use remote::{
    LayerLocator, LocatorSource, NoRemoteLayers, RemoteLayerError, RemoteLayerRequest, RemoteLayers,
};
pub use service::{Service, ServiceOptions, ServiceStats, SnapshotError};
pub use store::{Kind, SnapshotInfo};

use std::future::Future;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// Errors of the gRPC server itself (not of single calls).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// tonic's transport failed.
    #[error("snapshotter gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `service` as containerd's `containerd.services.snapshots.v1.Snapshots` on `listener`
/// until `shutdown` resolves; in-flight calls are drained before returning.
pub async fn serve(
    listener: UnixListener,
    service: Service,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let incoming = UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(proto::snapshots::snapshots_server::SnapshotsServer::new(
            service,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
