//! Generated gRPC types for containerd's `snapshots.v1` service and `types.Mount`, plus the CRI
//! `ImageService.PullImage` client (from proto/, compiled by build.rs). Modules nest like the
//! protobuf packages so generated paths resolve.

#![allow(clippy::all, missing_docs)]

/// `containerd.*` protobuf packages.
pub mod containerd {
    /// `containerd.types`: the Mount message.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: the Snapshots service.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

/// `runtime.*`: the Kubernetes CRI.
pub mod runtime {
    /// `runtime.v1`: the ImageService.PullImage slice (a CRI client for tests and tools).
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
