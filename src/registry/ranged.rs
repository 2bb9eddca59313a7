//! [`RemoteBlob`]: ranged reads of one registry blob as a [`BlobSource`]. Adjacent ranges are
//! coalesced, several ranges go in one `multipart/byteranges` request (with a remembered
//! fallback to single ranges for registries that refuse them), redirects to blob storage are
//! remembered and re-resolved on 403 or expiry, and every answer's range and length is checked.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::TryStreamExt as _;
use reqwest::header::HeaderValue;
use tracing::Instrument as _;

use super::client::{pull_scope, Client};
use super::reference::Reference;
use super::RegistryError;
use crate::blob::{check_range, BlobError, BlobFuture, BlobSource, BlobStream};
use crate::digest::Digest;

mod request;
mod sequential;
use request::RememberedRedirect;
use sequential::{Sequential, WindowSlot, SEQUENTIAL_MIN_READ};

/// Blobs up to this size are accepted whole when a server ignores `Range`.
const WHOLE_BODY_FALLBACK_LIMIT: u64 = 4 << 20;

/// A registry blob read by byte ranges. Cheap to clone; clones share the remembered redirect.
#[derive(Clone)]
pub struct RemoteBlob {
    inner: Arc<BlobInner>,
}

struct BlobInner {
    client: Client,
    reference: Reference,
    digest: Digest,
    size: u64,
    scope: String,
    redirect: Mutex<Option<RememberedRedirect>>,
    sequential: Sequential,
}

impl std::fmt::Debug for RemoteBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBlob")
            .field("reference", &self.inner.reference.to_string())
            .field("digest", &self.inner.digest)
            .field("size", &self.inner.size)
            .finish()
    }
}

/// Sorted, merged ranges (overlapping or adjacent ones joined).
pub(crate) fn coalesce(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    sorted.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

fn range_header(ranges: &[Range<u64>]) -> Option<HeaderValue> {
    let spec = ranges
        .iter()
        .map(|r| format!("{}-{}", r.start, r.end - 1))
        .collect::<Vec<_>>()
        .join(",");
    HeaderValue::from_str(&format!("bytes={spec}")).ok()
}

impl Client {
    /// A ranged-read handle on blob `digest` of `size` bytes (no request is made now).
    pub fn blob(&self, reference: &Reference, digest: &Digest, size: u64) -> RemoteBlob {
        RemoteBlob::new(self.clone(), reference.clone(), digest.clone(), size)
    }

    /// The last `len` bytes of blob `digest` (all of it when shorter), in one request
    /// (`Range: bytes=-len`) that also tells the blob's size, and a ranged-read handle on the
    /// blob of that size: what opening a layer needs before its size is known.
    pub async fn blob_tail(
        &self,
        reference: &Reference,
        digest: &Digest,
        len: u64,
    ) -> Result<(RemoteBlob, Bytes), RegistryError> {
        let probe = RemoteBlob::new(self.clone(), reference.clone(), digest.clone(), 0);
        let span = tracing::info_span!(
            "registry.read_tail",
            registry = %reference.registry,
            repository = %reference.repository,
            digest = %digest,
            bytes = len
        );
        let probe = &probe;
        let (size, tail) = self
            .with_endpoints(
                reference,
                |c| c.pull,
                "reading a blob's tail",
                |endpoint| async move { probe.tail_on(&endpoint, len).await },
            )
            .instrument(span)
            .await?;
        Ok((self.blob(reference, digest, size), tail))
    }
}

impl RemoteBlob {
    pub(crate) fn new(client: Client, reference: Reference, digest: Digest, size: u64) -> Self {
        let scope = pull_scope(&reference.repository);
        Self {
            inner: Arc::new(BlobInner {
                client,
                reference,
                digest,
                size,
                scope,
                redirect: Mutex::new(None),
                sequential: Sequential {
                    next_read: AtomicU64::new(u64::MAX),
                    slot: tokio::sync::Mutex::new(WindowSlot::default()),
                },
            }),
        }
    }

    /// The blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.inner.digest
    }

    /// The reference (registry and repository) the blob is read from.
    pub fn reference(&self) -> &Reference {
        &self.inner.reference
    }

    /// Reads exactly `range`.
    pub async fn read(&self, range: Range<u64>) -> Result<Bytes, RegistryError> {
        check_range(&range, self.inner.size).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let max_window = self.inner.client.config().sequential_window;
        if max_window > 0 && range.end - range.start >= SEQUENTIAL_MIN_READ {
            let sequential = &self.inner.sequential;
            let previous_end = sequential.next_read.swap(range.end, Ordering::Relaxed);
            if previous_end == range.start {
                // A reader already streaming keeps the window; a concurrent one reads directly.
                if let Ok(mut slot) = sequential.slot.try_lock() {
                    match self
                        .read_streamed(&mut slot, range.clone(), max_window)
                        .await
                    {
                        Ok(bytes) => return Ok(bytes),
                        Err(e) => {
                            slot.window = None;
                            tracing::debug!(error = %e, "streamed sequential read failed; reading the range directly");
                        }
                    }
                }
            }
        }
        self.read_direct(range).await
    }

    /// Starts a ranged GET of exactly `range` and returns its body as it arrives. Its length is
    /// checked as it streams: an early end or extra bytes end the stream with an error.
    pub async fn read_stream(&self, range: Range<u64>) -> Result<BlobStream, RegistryError> {
        check_range(&range, self.inner.size).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let window = self.open_window(range).await?;
        let digest = self.inner.digest.clone();
        let stream =
            futures::stream::try_unfold((window, digest), |(mut window, digest)| async move {
                match window.next_piece(&digest).await? {
                    Some(bytes) => {
                        window.position += bytes.len() as u64;
                        Ok(Some((bytes, (window, digest))))
                    }
                    None => Ok::<_, RegistryError>(None),
                }
            })
            .map_err(BlobError::from);
        Ok(Box::pin(stream))
    }

    async fn read_direct(&self, range: Range<u64>) -> Result<Bytes, RegistryError> {
        let mut parts = self.fetch(vec![range]).await?;
        parts
            .pop()
            .ok_or_else(|| RegistryError::Corrupt("no data for a single range".into()))
    }

    /// Reads every range in `ranges` (any order, overlaps allowed), one buffer per range.
    pub async fn read_many(&self, ranges: Vec<Range<u64>>) -> Result<Vec<Bytes>, RegistryError> {
        for r in &ranges {
            check_range(r, self.inner.size).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        }
        let merged = coalesce(&ranges);
        let data = if merged.is_empty() {
            Vec::new()
        } else {
            self.fetch(merged.clone()).await?
        };
        ranges
            .iter()
            .map(|r| {
                if r.is_empty() {
                    return Ok(Bytes::new());
                }
                let i = merged.partition_point(|m| m.end < r.end);
                let (m, d) = merged
                    .get(i)
                    .zip(data.get(i))
                    .filter(|(m, _)| m.start <= r.start)
                    .ok_or_else(|| {
                        RegistryError::Corrupt(format!(
                            "range {}..{} missing from the merged reads",
                            r.start, r.end
                        ))
                    })?;
                let from = usize::try_from(r.start - m.start).unwrap_or(usize::MAX);
                let to = usize::try_from(r.end - m.start).unwrap_or(usize::MAX);
                if to > d.len() {
                    return Err(RegistryError::Corrupt(format!(
                        "range {}..{} cut short",
                        r.start, r.end
                    )));
                }
                Ok(d.slice(from..to))
            })
            .collect()
    }

    /// Fetches merged, sorted, non-empty ranges, one buffer each.
    async fn fetch(&self, merged: Vec<Range<u64>>) -> Result<Vec<Bytes>, RegistryError> {
        let total: u64 = merged.iter().map(|r| r.end - r.start).sum();
        let span = tracing::info_span!(
            "registry.read_ranges",
            registry = %self.inner.reference.registry,
            repository = %self.inner.reference.repository,
            digest = %self.inner.digest,
            ranges = merged.len(),
            bytes = total,
            first = merged.first().map_or(0, |r| r.start),
        );
        let merged = &merged;
        self.inner
            .client
            .with_endpoints(
                &self.inner.reference,
                |c| c.pull,
                "reading blob ranges",
                |endpoint| async move { self.fetch_on(&endpoint, merged).await },
            )
            .instrument(span)
            .await
    }
}

impl BlobSource for RemoteBlob {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read_range(&self, range: Range<u64>) -> BlobFuture<'_, Bytes> {
        Box::pin(async move { self.read(range).await.map_err(BlobError::from) })
    }

    fn read_ranges(&self, ranges: Vec<Range<u64>>) -> BlobFuture<'_, Vec<Bytes>> {
        Box::pin(async move { self.read_many(ranges).await.map_err(BlobError::from) })
    }

    fn read_range_stream(&self, range: Range<u64>) -> BlobFuture<'_, BlobStream> {
        Box::pin(async move { self.read_stream(range).await.map_err(BlobError::from) })
    }
}

const _: fn() = || {
    fn is_clone_send_sync<T: Clone + Send + Sync + 'static>() {}
    is_clone_send_sync::<RemoteBlob>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_adjacent_and_overlapping() {
        assert_eq!(
            coalesce(&[10..20, 0..5, 5..10, 30..40, 35..36, 50..50]),
            vec![0..20, 30..40]
        );
        assert_eq!(coalesce(&[]), Vec::<Range<u64>>::new());
    }

    #[test]
    fn range_header_format() {
        assert_eq!(range_header(&[0..10, 20..21]).unwrap(), "bytes=0-9,20-20");
    }
}
