//! Byte-range access to a blob: the one seam between formats (which say which bytes they need)
//! and transports (a registry, a local file) that deliver them.

use std::fs::File;
use std::future::Future;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

/// A boxed future returned by [`BlobSource`] methods.
pub type BlobFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BlobError>> + Send + 'a>>;

/// A range's bytes as they arrive ([`BlobSource::read_range_stream`]).
pub type BlobStream = futures::stream::BoxStream<'static, Result<Bytes, BlobError>>;

/// Why a blob read failed, classified so callers can decide whether to retry, fall back or fail.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob (or the repository) does not exist.
    #[error("blob not found: {0}")]
    NotFound(String),
    /// Credentials are missing or were refused.
    #[error("not authorized: {0}")]
    Auth(String),
    /// The source cannot be reached now (network, 5xx, deadline); a later read may succeed.
    #[error("blob source unavailable: {0}")]
    Unavailable(String),
    /// The source answered with bytes that cannot be right (short read, wrong range, bad digest).
    #[error("corrupt response: {0}")]
    Corrupt(String),
    /// The request itself is invalid (range outside the blob, bad reference).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// A blob readable by byte range. Implementations return exactly the bytes asked for; a short
/// read is a [`BlobError::Corrupt`], never a silently shorter buffer.
pub trait BlobSource: Send + Sync {
    /// Total size of the blob in bytes.
    fn size(&self) -> u64;

    /// Reads exactly `range` (end exclusive).
    fn read_range(&self, range: Range<u64>) -> BlobFuture<'_, Bytes>;

    /// Reads exactly `range` as a stream of pieces in order, so a caller can work on the first
    /// bytes while the rest arrive. The pieces add up to the range or the stream ends with an
    /// error. The default yields the whole range as one piece.
    fn read_range_stream(&self, range: Range<u64>) -> BlobFuture<'_, BlobStream> {
        Box::pin(async move {
            let bytes = self.read_range(range).await?;
            Ok(Box::pin(futures::stream::once(async move { Ok(bytes) })) as BlobStream)
        })
    }

    /// Reads several ranges, returning one buffer per range in the same order. The default reads
    /// them one after another; remote implementations coalesce or use multi-range requests.
    fn read_ranges(&self, ranges: Vec<Range<u64>>) -> BlobFuture<'_, Vec<Bytes>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(ranges.len());
            for range in ranges {
                out.push(self.read_range(range).await?);
            }
            Ok(out)
        })
    }
}

impl<T: BlobSource + ?Sized> BlobSource for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_range(&self, range: Range<u64>) -> BlobFuture<'_, Bytes> {
        (**self).read_range(range)
    }
    fn read_range_stream(&self, range: Range<u64>) -> BlobFuture<'_, BlobStream> {
        (**self).read_range_stream(range)
    }
    fn read_ranges(&self, ranges: Vec<Range<u64>>) -> BlobFuture<'_, Vec<Bytes>> {
        (**self).read_ranges(ranges)
    }
}

/// Checks that `range` is well formed and lies inside a blob of `size` bytes.
pub fn check_range(range: &Range<u64>, size: u64) -> Result<(), BlobError> {
    if range.start > range.end || range.end > size {
        return Err(BlobError::Invalid(format!(
            "byte range {}..{} is outside the blob of {} bytes",
            range.start, range.end, size
        )));
    }
    Ok(())
}

/// A blob stored in a local file (layer blobs given to `lazysnap inspect`, tests, the cache).
pub struct FileBlob {
    path: PathBuf,
    file: File,
    size: u64,
}

impl FileBlob {
    /// Opens `path` for ranged reads.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    /// Reads exactly `range` synchronously.
    pub fn read_range_sync(&self, range: Range<u64>) -> Result<Bytes, BlobError> {
        check_range(&range, self.size)?;
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| BlobError::Invalid("range too large for this platform".into()))?;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, range.start)
            .map_err(|e| {
                BlobError::Corrupt(format!(
                    "reading {}..{} of {}: {e}",
                    range.start,
                    range.end,
                    self.path.display()
                ))
            })?;
        Ok(Bytes::from(buf))
    }
}

impl BlobSource for FileBlob {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_range(&self, range: Range<u64>) -> BlobFuture<'_, Bytes> {
        let result = self.read_range_sync(range);
        Box::pin(async move { result })
    }
}

/// A blob held in memory (unit tests, small TOCs).
pub struct MemoryBlob(pub Bytes);

impl BlobSource for MemoryBlob {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_range(&self, range: Range<u64>) -> BlobFuture<'_, Bytes> {
        let result = check_range(&range, self.size())
            .map(|()| self.0.slice(range.start as usize..range.end as usize));
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_blob_reads_exact_ranges_and_rejects_outside() {
        let blob = MemoryBlob(Bytes::from_static(b"0123456789"));
        assert_eq!(&blob.read_range(2..5).await.unwrap()[..], b"234");
        let parts = blob.read_ranges(vec![0..1, 9..10]).await.unwrap();
        assert_eq!(
            parts,
            vec![Bytes::from_static(b"0"), Bytes::from_static(b"9")]
        );
        assert!(matches!(
            blob.read_range(8..11).await,
            Err(BlobError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn file_blob_reads_exact_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        std::fs::write(&path, b"hello world").unwrap();
        let blob = FileBlob::open(&path).unwrap();
        assert_eq!(blob.size(), 11);
        assert_eq!(&blob.read_range(6..11).await.unwrap()[..], b"world");
        assert!(blob.read_range(6..12).await.is_err());
    }
}
