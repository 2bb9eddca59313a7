//! lazysnap-fuse: a read-only FUSE filesystem over an immutable index of entries and an
//! asynchronous content source. It knows nothing of registries, formats or gRPC.
//!
//! Build an [`Index`] with [`IndexBuilder`] (whiteouts become what overlayfs expects), then
//! [`mount`] it with a [`ContentSource`]; the returned [`MountHandle`] unmounts on drop.
//!
//! ```no_run
//! use std::sync::Arc;
//! use lazysnap_fuse::{mount, ContentId, ContentSource, IndexBuilder, MountOptions, NewNode, NodeAttr, NodeKind, ReadDone};
//!
//! struct Hello;
//! impl ContentSource for Hello {
//!     fn read(&self, _content: ContentId, offset: u64, size: u32, done: ReadDone) {
//!         let data = b"hello\n";
//!         let start = (offset as usize).min(data.len());
//!         let end = (start + size as usize).min(data.len());
//!         done(Ok(bytes::Bytes::copy_from_slice(&data[start..end])));
//!     }
//! }
//!
//! let mut builder = IndexBuilder::new(NodeAttr::new(0o755, 0, 0, 0));
//! builder.add("greeting", NewNode {
//!     kind: NodeKind::File { size: 6, content: 0 },
//!     attr: NodeAttr::new(0o644, 0, 0, 0),
//!     xattrs: vec![],
//! })?;
//! let handle = mount(builder.build(), Arc::new(Hello), "/mnt/layer".as_ref(), &MountOptions::default())?;
//! // ... cat /mnt/layer/greeting ...
//! handle.unmount()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use bytes::Bytes;

mod fs;
mod handles;
mod index;
mod mount;
mod resume;

pub use fs::{FsStats, OpObserver, OpenObserver};
pub use index::{
    release_freed_memory, Index, IndexBuilder, IndexError, NewNode, NodeAttr, NodeInfo, NodeKind,
    NodeKindInfo, OPAQUE_MARKER, ROOT_INO, WHITEOUT_PREFIX,
};
pub use mount::{detach_stale_mount, mount, FuseError, MountHandle, MountOptions};
pub use resume::{check_resumable, resume};

/// Identifies the content of a regular file for a [`ContentSource`]; chosen by whoever builds the
/// index (e.g. the position of the file in the layer's TOC). Hard links share one id.
pub type ContentId = u64;

/// Completion of a read: called exactly once with the bytes or an errno such as `libc::EIO`.
/// Dropping it without calling answers EIO.
pub type ReadDone = Box<dyn FnOnce(Result<Bytes, i32>) + Send + 'static>;

/// Where file contents come from. `read` must not block on the network: it either answers at
/// once (cached data) or hands `done` to an asynchronous task that calls it later.
pub trait ContentSource: Send + Sync + 'static {
    /// Reads `size` bytes of `content` at `offset` and calls `done` with the result. The
    /// filesystem never asks beyond the file's size (it clamps), so the answer must hold exactly
    /// `size` bytes: a shorter one is turned into EIO (never served), a longer one is cut.
    fn read(&self, content: ContentId, offset: u64, size: u32, done: ReadDone);

    /// A local file holding all of `content`, if it is entirely on disk; lets the filesystem use
    /// FUSE passthrough for it. The default never offers one.
    fn local_file(&self, _content: ContentId) -> Option<std::fs::File> {
        None
    }
}
