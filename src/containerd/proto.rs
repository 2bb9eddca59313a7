//! The generated containerd client services `lazysnap pull` calls, as this module names them
//! (re-exported from the crate's one generated-code module).

pub use crate::proto::{
    containerd, content, diff, images, leases, runtime, snapshots, Descriptor, Mount,
};
