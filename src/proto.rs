//! Code generated at build time from proto/ (containerd's snapshots, content, images, leases and
//! diff services, their shared types, and the CRI ImageService slice) by build.rs with protox and
//! tonic-prost-build. The one place generated types live; modules nest like the protobuf packages
//! so generated cross-package paths resolve.

#![allow(clippy::all, missing_docs)]

/// `containerd.*` protobuf packages.
pub mod containerd {
    /// `containerd.types`: Descriptor and Mount.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.content`.
        pub mod content {
            /// `containerd.services.content.v1`: the content store.
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        /// `containerd.services.images`.
        pub mod images {
            /// `containerd.services.images.v1`: image records.
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        /// `containerd.services.leases`.
        pub mod leases {
            /// `containerd.services.leases.v1`: GC leases.
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
        /// `containerd.services.diff`.
        pub mod diff {
            /// `containerd.services.diff.v1`: layer apply.
            pub mod v1 {
                tonic::include_proto!("containerd.services.diff.v1");
            }
        }
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: containerd's snapshots service.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

/// `runtime.*`: the Kubernetes CRI packages.
pub mod runtime {
    /// `runtime.v1`: the CRI image service (PullImage only).
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

pub use containerd::services::content::v1 as content;
pub use containerd::services::diff::v1 as diff;
pub use containerd::services::images::v1 as images;
pub use containerd::services::leases::v1 as leases;
pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::{Descriptor, Mount};
