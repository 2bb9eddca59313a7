//! lazysnap-fuse: a read-only FUSE filesystem over an immutable index of entries and an
//! asynchronous content source. It knows nothing of registries, formats or gRPC.

use bytes::Bytes;

/// Identifies the content of a regular file for a [`ContentSource`]; chosen by whoever builds the
/// index (e.g. the position of the file in the layer's TOC). Hard links share one id.
pub type ContentId = u64;

/// Completion of a read: called exactly once with the bytes (possibly fewer than asked at end of
/// file) or an errno such as `libc::EIO`.
pub type ReadDone = Box<dyn FnOnce(Result<Bytes, i32>) + Send + 'static>;

/// Where file contents come from. `read` must not block on the network: it either answers at
/// once (cached data) or hands `done` to an asynchronous task that calls it later.
pub trait ContentSource: Send + Sync + 'static {
    /// Reads up to `size` bytes of `content` at `offset` and calls `done` with the result.
    fn read(&self, content: ContentId, offset: u64, size: u32, done: ReadDone);

    /// A local file holding all of `content`, if it is entirely on disk; lets the filesystem use
    /// FUSE passthrough for it. The default never offers one.
    fn local_file(&self, _content: ContentId) -> Option<std::fs::File> {
        None
    }
}
