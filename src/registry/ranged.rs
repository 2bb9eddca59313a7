//! [`RemoteBlob`]: ranged reads of one registry blob as a [`BlobSource`]. Adjacent ranges are
//! coalesced, several ranges go in one `multipart/byteranges` request (with a remembered
//! fallback to single ranges for registries that refuse them), redirects to blob storage are
//! remembered and re-resolved on 403 or expiry, and every answer's range and length is checked.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::header::{HeaderValue, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::StatusCode;
use tracing::Instrument as _;

use super::client::{
    header_str, identity_headers, pull_scope, read_body_exact, read_body_limited, Client, Endpoint,
};
use super::multipart::{byteranges_boundary, parse_byteranges, parse_content_range};
use super::reference::Reference;
use super::retry::{status_failure, Failure};
use super::RegistryError;
use crate::blob::{check_range, BlobError, BlobFuture, BlobSource};

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
    digest: String,
    size: u64,
    scope: String,
    redirect: Mutex<Option<RememberedRedirect>>,
    readahead: Mutex<Readahead>,
}

/// Smallest piece that counts as a sequential read for read-ahead.
const READAHEAD_MIN_PIECE: u64 = 64 << 10;

/// A background fetch of one read-ahead piece.
type PieceTask = tokio::task::JoinHandle<Result<Bytes, RegistryError>>;

/// Pieces fetched ahead of a sequential reader, in order.
#[derive(Default)]
struct Readahead {
    expected_next: u64,
    pending: std::collections::VecDeque<(Range<u64>, PieceTask)>,
}

impl Readahead {
    fn clear(&mut self) {
        for (_, task) in self.pending.drain(..) {
            task.abort();
        }
    }
}

impl Drop for BlobInner {
    fn drop(&mut self) {
        self.readahead
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[derive(Clone)]
struct RememberedRedirect {
    api_base: String,
    url: reqwest::Url,
    at: Instant,
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

enum MultiOutcome {
    Parts(Vec<Bytes>),
    Rejected,
}

impl RemoteBlob {
    pub(crate) fn new(client: Client, reference: Reference, digest: String, size: u64) -> Self {
        let scope = pull_scope(&reference.repository);
        Self {
            inner: Arc::new(BlobInner {
                client,
                reference,
                digest,
                size,
                scope,
                redirect: Mutex::new(None),
                readahead: Mutex::new(Readahead::default()),
            }),
        }
    }

    /// The blob's digest.
    pub fn digest(&self) -> &str {
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
        let depth = self.inner.client.config().sequential_readahead;
        if depth > 0 && range.end - range.start >= READAHEAD_MIN_PIECE {
            if let Some(task) = self.readahead(range.clone(), depth) {
                match task.await {
                    Ok(Ok(bytes)) => return Ok(bytes),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "read-ahead piece failed; reading directly")
                    }
                    Err(_) => {}
                }
            }
        }
        self.read_direct(range).await
    }

    /// Takes the read-ahead piece for `range` if one is pending, and schedules the following
    /// pieces when the reads are sequential.
    fn readahead(&self, range: Range<u64>, depth: usize) -> Option<PieceTask> {
        let mut ahead = self
            .inner
            .readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let hit = if ahead.pending.front().is_some_and(|(r, _)| *r == range) {
            ahead.pending.pop_front().map(|(_, task)| task)
        } else {
            ahead.clear();
            None
        };
        let sequential = hit.is_some() || range.start == ahead.expected_next;
        ahead.expected_next = range.end;
        if sequential {
            let len = range.end - range.start;
            let mut next = ahead.pending.back().map_or(range.end, |(r, _)| r.end);
            while ahead.pending.len() < depth && next < self.inner.size {
                let piece = next..(next + len).min(self.inner.size);
                next = piece.end;
                let this = self.clone();
                let target = piece.clone();
                let task = tokio::spawn(async move { this.read_direct(target).await });
                ahead.pending.push_back((piece, task));
            }
        }
        hit
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

    async fn fetch_on(
        &self,
        endpoint: &Endpoint,
        merged: &[Range<u64>],
    ) -> Result<Vec<Bytes>, Failure> {
        if let [single] = merged {
            return Ok(vec![self.single(endpoint, single.clone()).await?]);
        }
        let batch = self.inner.client.config().max_ranges_per_request.max(1);
        if !self.inner.client.multi_range_known_unsupported(endpoint) {
            let mut out = Vec::with_capacity(merged.len());
            let mut rejected = false;
            for chunk in merged.chunks(batch) {
                match self.multi(endpoint, chunk).await? {
                    MultiOutcome::Parts(parts) => out.extend(parts),
                    MultiOutcome::Rejected => {
                        self.inner.client.remember_no_multi_range(endpoint);
                        rejected = true;
                        break;
                    }
                }
            }
            if !rejected {
                return Ok(out);
            }
        }
        let concurrency = self.inner.client.config().range_concurrency.max(1);
        futures::stream::iter(merged.iter().cloned())
            .map(|r| self.single(endpoint, r))
            .buffered(concurrency)
            .try_collect()
            .await
    }

    /// GET with `Range`, through the remembered redirect target when fresh.
    async fn ranged_get(
        &self,
        endpoint: &Endpoint,
        range: HeaderValue,
    ) -> Result<reqwest::Response, Failure> {
        let mut headers = identity_headers();
        headers.insert(RANGE, range);
        let config = self.inner.client.config();
        let remembered = {
            let mut slot = self
                .inner
                .redirect
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some(r)
                    if r.api_base == endpoint.host.api_base
                        && r.at.elapsed() < config.redirect_ttl =>
                {
                    Some(r.clone())
                }
                Some(_) => {
                    *slot = None;
                    None
                }
                None => None,
            }
        };
        if let Some(r) = remembered {
            match self
                .inner
                .client
                .get_redirected(endpoint, &r.url, headers.clone(), config.request_timeout)
                .await
            {
                Ok(response)
                    if !matches!(
                        response.status().as_u16(),
                        300..=399 | 401 | 403 | 404 | 410
                    ) =>
                {
                    return Ok(response)
                }
                Ok(response) => {
                    tracing::debug!(status = %response.status(), "remembered blob redirect refused; re-resolving through the registry");
                }
                Err(failure) => {
                    tracing::debug!(error = %failure.error, "remembered blob redirect failed; re-resolving");
                }
            }
            *self
                .inner
                .redirect
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None;
        }
        let (response, redirected) = self
            .inner
            .client
            .get_blob_response(
                endpoint,
                &self.inner.reference.repository,
                &self.inner.digest,
                headers,
                &self.inner.scope,
                config.request_timeout,
            )
            .await?;
        if let Some(url) = redirected {
            *self
                .inner
                .redirect
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(RememberedRedirect {
                api_base: endpoint.host.api_base.clone(),
                url,
                at: Instant::now(),
            });
        }
        Ok(response)
    }

    fn what(&self, endpoint: &Endpoint, detail: &str) -> String {
        format!(
            "blob {} of {} on {}, {detail}",
            self.inner.digest, self.inner.reference.repository, endpoint.host.host
        )
    }

    async fn single(&self, endpoint: &Endpoint, range: Range<u64>) -> Result<Bytes, Failure> {
        let what = self.what(endpoint, &format!("bytes {}..{}", range.start, range.end));
        let header = range_header(std::slice::from_ref(&range))
            .ok_or_else(|| Failure::fatal(RegistryError::Invalid(what.clone())))?;
        let response = self.ranged_get(endpoint, header).await?;
        let len = range.end - range.start;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let content_range = header_str(response.headers(), CONTENT_RANGE.as_str());
                let parsed = content_range.as_deref().and_then(parse_content_range);
                let expected = (range.start, range.end - 1);
                match parsed {
                    Some((s, e, total))
                        if (s, e) == expected && total.is_none_or(|t| t == self.inner.size) => {}
                    _ => {
                        return Err(Failure::transient(RegistryError::Corrupt(format!(
                        "{what}: answered Content-Range {content_range:?}, expected bytes {}-{}/{}",
                        expected.0, expected.1, self.inner.size
                    ))))
                    }
                }
                read_body_exact(response, len, &what).await
            }
            StatusCode::OK
                if self.inner.size <= WHOLE_BODY_FALLBACK_LIMIT || len == self.inner.size =>
            {
                // The server ignored Range: take the whole (small) blob and cut.
                let whole = read_body_exact(response, self.inner.size, &what).await?;
                let from = usize::try_from(range.start).unwrap_or(usize::MAX);
                let to = usize::try_from(range.end).unwrap_or(usize::MAX);
                whole
                    .get(from..to)
                    .map(|_| whole.slice(from..to))
                    .ok_or_else(|| {
                        Failure::transient(RegistryError::Corrupt(format!(
                            "{what}: whole body too short"
                        )))
                    })
            }
            StatusCode::OK => Err(Failure::fatal(RegistryError::Invalid(format!(
                "{what}: the server ignores Range requests (answered 200 with the whole blob)"
            )))),
            StatusCode::RANGE_NOT_SATISFIABLE => {
                Err(Failure::fatal(RegistryError::Invalid(format!(
                    "{what}: 416 Range Not Satisfiable (is the blob size {} right?)",
                    self.inner.size
                ))))
            }
            status => Err(status_failure(&what, status, response.headers())),
        }
    }

    async fn multi(
        &self,
        endpoint: &Endpoint,
        ranges: &[Range<u64>],
    ) -> Result<MultiOutcome, Failure> {
        let what = self.what(endpoint, &format!("{} ranges", ranges.len()));
        let header = range_header(ranges)
            .ok_or_else(|| Failure::fatal(RegistryError::Invalid(what.clone())))?;
        let response = self.ranged_get(endpoint, header).await?;
        let wanted: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK
            | StatusCode::RANGE_NOT_SATISFIABLE
            | StatusCode::BAD_REQUEST
            | StatusCode::NOT_IMPLEMENTED => return Ok(MultiOutcome::Rejected),
            status => return Err(status_failure(&what, status, response.headers())),
        }
        let content_type =
            header_str(response.headers(), CONTENT_TYPE.as_str()).unwrap_or_default();
        let Some(boundary) = byteranges_boundary(&content_type) else {
            // A single part: acceptable only if it covers every range (server coalesced).
            let cr = header_str(response.headers(), CONTENT_RANGE.as_str());
            let (first, last) = match (ranges.first(), ranges.last()) {
                (Some(f), Some(l)) => (f.start, l.end),
                _ => return Ok(MultiOutcome::Parts(Vec::new())),
            };
            return match cr.as_deref().and_then(parse_content_range) {
                Some((s, e, _))
                    if s <= first
                        && e + 1 >= last
                        && e - s < wanted.saturating_mul(2) + (1 << 20) =>
                {
                    let body = read_body_exact(response, e - s + 1, &what).await?;
                    let parts = ranges
                        .iter()
                        .map(|r| {
                            let from = usize::try_from(r.start - s).unwrap_or(usize::MAX);
                            let to = usize::try_from(r.end - s).unwrap_or(usize::MAX);
                            body.get(from..to).map(|_| body.slice(from..to))
                        })
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            Failure::transient(RegistryError::Corrupt(format!(
                                "{what}: coalesced part too short"
                            )))
                        })?;
                    Ok(MultiOutcome::Parts(parts))
                }
                _ => Ok(MultiOutcome::Rejected),
            };
        };
        let limit = wanted + 1024 * ranges.len() as u64 + 4096;
        let body = read_body_limited(response, limit, &what)
            .await
            .map_err(|f| match f.error {
                RegistryError::Invalid(m) => Failure::transient(RegistryError::Corrupt(m)),
                _ => f,
            })?;
        let parts = parse_byteranges(&body, &boundary)
            .map_err(|e| Failure::transient(RegistryError::Corrupt(format!("{what}: {e}"))))?;
        let mut out: Vec<Option<Bytes>> = vec![None; ranges.len()];
        for (start, end, total, data) in parts {
            if total.is_some_and(|t| t != self.inner.size) {
                return Err(Failure::transient(RegistryError::Corrupt(format!(
                    "{what}: part says the blob has {total:?} bytes, expected {}",
                    self.inner.size
                ))));
            }
            let i = ranges
                .iter()
                .position(|r| r.start == start && r.end == end + 1)
                .ok_or_else(|| {
                    Failure::transient(RegistryError::Corrupt(format!(
                        "{what}: part {start}-{end} was not asked for"
                    )))
                })?;
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(data);
            }
        }
        out.into_iter()
            .zip(ranges)
            .map(|(d, r)| {
                d.ok_or_else(|| {
                    Failure::transient(RegistryError::Corrupt(format!(
                        "{what}: range {}-{} missing from the multipart answer",
                        r.start,
                        r.end - 1
                    )))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(MultiOutcome::Parts)
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
