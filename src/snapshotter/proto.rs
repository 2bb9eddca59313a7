//! The generated containerd snapshots.v1 service, `types.Mount` and the CRI slice, as the
//! snapshotter names them (re-exported from the crate's one generated-code module).

pub use crate::proto::{containerd, runtime, snapshots, Mount};
