//! lazysnap: a lazy-pulling snapshotter for containerd.
//!
//! Layers in eStargz or zstd:chunked format are mounted through FUSE and their files are fetched
//! chunk by chunk with HTTP range requests, prioritized files first, into a bounded LRU disk cache
//! shared by every image on the node. See `ARCHITECTURE.md` at the repository root for the data
//! flow and the module map; each module's header says what it owns.

/// The version, the git commit this binary was built from (`unknown` outside a checkout) and the
/// build date (UTC).
pub const BUILD_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LAZYSNAP_GIT_COMMIT"),
    ", built ",
    env!("LAZYSNAP_BUILD_DATE"),
    ")"
);

pub mod bench;
pub mod blob;
pub mod buffer_pool;
pub mod cache;
pub mod config;
pub mod containerd;
pub mod cri_keychain;
pub mod daemon;
pub mod digest;
pub mod estargz;
pub mod fetch;
pub mod fuse_holder;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod labels;
pub mod layer;
pub mod le;
pub mod metrics;
pub mod optimize;
pub mod proto;
pub mod registry;
pub mod rig;
pub mod snapshotter;
pub mod soci;
pub mod sync;
