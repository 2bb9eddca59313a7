//! containerd client side of lazysnap: a gRPC client for containerd's own services over its unix
//! socket, and the pull that stores an image's metadata, prepares each layer through a
//! snapshotter (lazily when the snapshotter mounts it remotely), unpacks only the layers that
//! fall back, and registers the image.

pub mod client;
pub mod proto;
pub mod pull;
pub mod registry_source;

pub use client::{Containerd, Prepared, WriteOutcome};

/// Errors talking to containerd or pulling an image into it; each names the call, the blob or
/// the layer concerned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ContainerdError {
    /// The socket could not be dialed.
    #[error(
        "cannot connect to containerd at {socket}: {detail} (is containerd running? pass its \
         socket with --containerd)"
    )]
    Connect { socket: String, detail: String },
    /// containerd answered a call with an error status.
    #[error("containerd {call} for {what} failed ({code:?}): {message}")]
    Rpc {
        call: &'static str,
        what: String,
        code: tonic::Code,
        message: String,
    },
    /// containerd answered something the protocol does not allow.
    #[error("unexpected answer from containerd: {0}")]
    Protocol(String),
    /// Reading the image from its source (the registry) failed.
    #[error("image source: {0}")]
    Source(String),
    /// The image or an argument is malformed.
    #[error("invalid {what}: {detail}")]
    Invalid { what: String, detail: String },
    /// A layer unpacked to different bytes than the image config promises.
    #[error(
        "layer {layer} unpacked to {actual}, but the image config lists diff ID {expected}: \
         the image is corrupt or its config does not match its layers"
    )]
    DiffIdMismatch {
        layer: String,
        expected: String,
        actual: String,
    },
}
