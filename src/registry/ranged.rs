//! [`RemoteBlob`]: ranged reads of one registry blob as a [`BlobSource`]. Adjacent ranges are
//! coalesced, several ranges go in one `multipart/byteranges` request (with a remembered
//! fallback to single ranges for registries that refuse them), redirects to blob storage are
//! remembered and re-resolved on 403 or expiry, and every answer's range and length is checked.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::header::{HeaderValue, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::StatusCode;
use tracing::Instrument as _;

use super::client::{
    header_str, identity_headers, pull_scope, read_body_exact, read_body_limited, Client, Endpoint,
};
use super::multipart::{byteranges_boundary, parse_byteranges, parse_content_range};
use super::reference::Reference;
use super::retry::{status_failure, transport_failure, Failure};
use super::RegistryError;
use crate::blob::{check_range, BlobError, BlobFuture, BlobSource, BlobStream};

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
    sequential: Sequential,
}

/// Reads at least this long that continue where the previous read ended are served from one
/// streamed response (a "window") instead of a request each.
const SEQUENTIAL_MIN_READ: u64 = 64 << 10;
/// Length of a blob's first window; the following ones are `ClientConfig::sequential_window`
/// long (only the bytes read are pulled from a window, so length costs nothing; each new window
/// costs a round trip).
const FIRST_WINDOW: u64 = 4 << 20;

/// Sequential-read detection and the open window of a blob.
struct Sequential {
    /// Where the last read of the blob ended (`u64::MAX` before the first).
    next_read: AtomicU64,
    slot: tokio::sync::Mutex<WindowSlot>,
}

#[derive(Default)]
struct WindowSlot {
    window: Option<Window>,
    /// Whether a window was opened before (the next ones are long).
    opened_before: bool,
}

/// A ranged response being read as the reader advances: bytes `position..end` of the blob are
/// still to come, the first of them in `leftover`.
struct Window {
    response: reqwest::Response,
    position: u64,
    end: u64,
    leftover: Bytes,
}

impl Window {
    /// The next piece of the body (`position` is where it starts; the caller advances it), or
    /// `None` once the whole window has arrived. A body longer than the window, or ending
    /// before it, is an error.
    async fn next_piece(&mut self, digest: &str) -> Result<Option<Bytes>, RegistryError> {
        match self.response.chunk().await {
            Ok(Some(bytes)) if bytes.len() as u64 <= self.end - self.position => Ok(Some(bytes)),
            Ok(Some(_)) => Err(RegistryError::Corrupt(format!(
                "blob {digest} streamed at byte {}: more bytes than asked for",
                self.position
            ))),
            Ok(None) if self.position == self.end => Ok(None),
            Ok(None) => Err(self.ended_early(digest)),
            Err(e) => Err(transport_failure(
                &format!("blob {digest} streamed at byte {}", self.position),
                &e,
            )
            .error),
        }
    }

    fn ended_early(&self, digest: &str) -> RegistryError {
        RegistryError::Unavailable(format!(
            "blob {digest} streamed at byte {}: response ended early",
            self.position
        ))
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

impl Client {
    /// A ranged-read handle on blob `digest` of `size` bytes (no request is made now).
    pub fn blob(&self, reference: &Reference, digest: &str, size: u64) -> RemoteBlob {
        RemoteBlob::new(self.clone(), reference.clone(), digest.to_string(), size)
    }

    /// The last `len` bytes of blob `digest` (all of it when shorter), in one request
    /// (`Range: bytes=-len`) that also tells the blob's size, and a ranged-read handle on the
    /// blob of that size: what opening a layer needs before its size is known.
    pub async fn blob_tail(
        &self,
        reference: &Reference,
        digest: &str,
        len: u64,
    ) -> Result<(RemoteBlob, Bytes), RegistryError> {
        let probe = RemoteBlob::new(self.clone(), reference.clone(), digest.to_string(), 0);
        let span = tracing::info_span!(
            "registry.read_tail",
            registry = %reference.registry,
            repository = %reference.repository,
            digest,
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
                sequential: Sequential {
                    next_read: AtomicU64::new(u64::MAX),
                    slot: tokio::sync::Mutex::new(WindowSlot::default()),
                },
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

    /// Serves `range` from the open window, opening a new (longer) one where it ends or when
    /// the reader is elsewhere. Any failure leaves the caller to read the range directly.
    async fn read_streamed(
        &self,
        slot: &mut WindowSlot,
        range: Range<u64>,
        max_window: u64,
    ) -> Result<Bytes, RegistryError> {
        let chunk_deadline = self.inner.client.config().request_timeout;
        let mut out = BytesMut::new();
        let mut at = range.start;
        while at < range.end {
            let usable = slot
                .window
                .as_ref()
                .is_some_and(|w| w.position == at && w.position < w.end);
            if !usable {
                slot.window = None;
                let len = if slot.opened_before {
                    max_window.max(FIRST_WINDOW)
                } else {
                    FIRST_WINDOW
                }
                .max(range.end - at);
                let window_range = at..(at + len).min(self.inner.size);
                slot.opened_before = true;
                slot.window = Some(self.open_window(window_range).await?);
            }
            let Some(window) = slot.window.as_mut() else {
                continue;
            };
            if window.leftover.is_empty() {
                let digest = &self.inner.digest;
                window.leftover =
                    match tokio::time::timeout(chunk_deadline, window.next_piece(digest)).await {
                        Ok(Ok(Some(bytes))) => bytes,
                        // Not reached: a window is only read while bytes remain in it.
                        Ok(Ok(None)) => return Err(window.ended_early(digest)),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            return Err(RegistryError::Unavailable(format!(
                                "blob {digest} streamed at byte {}: no data for {chunk_deadline:?}",
                                window.position
                            )))
                        }
                    };
            }
            let wanted = usize::try_from(range.end - at).unwrap_or(usize::MAX);
            let piece = window.leftover.split_to(wanted.min(window.leftover.len()));
            window.position += piece.len() as u64;
            at += piece.len() as u64;
            if out.is_empty() && at == range.end {
                return Ok(piece);
            }
            if out.is_empty() {
                out.reserve(usize::try_from(range.end - range.start).unwrap_or(0));
            }
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }

    /// Starts a ranged GET of `range` whose body is read as the reader advances: only the
    /// headers are awaited here, the body has no overall deadline (each piece has one).
    async fn open_window(&self, range: Range<u64>) -> Result<Window, RegistryError> {
        let span = tracing::info_span!(
            "registry.open_window",
            registry = %self.inner.reference.registry,
            repository = %self.inner.reference.repository,
            digest = %self.inner.digest,
            first = range.start,
            bytes = range.end - range.start,
        );
        let range = &range;
        let config = self.inner.client.config();
        let long_body = config.read_deadline.saturating_mul(1000);
        self.inner
            .client
            .with_endpoints(
                &self.inner.reference,
                |c| c.pull,
                "streaming blob ranges",
                |endpoint| async move {
                    let what =
                        self.what(&endpoint, &format!("window {}..{}", range.start, range.end));
                    let header = range_header(std::slice::from_ref(range))
                        .ok_or_else(|| Failure::fatal(RegistryError::Invalid(what.clone())))?;
                    let response = self.ranged_get(&endpoint, header, long_body).await?;
                    if response.status() != StatusCode::PARTIAL_CONTENT {
                        return Err(status_failure(&what, response.status(), response.headers()));
                    }
                    self.check_content_range(&response, range, &what)?;
                    Ok(Window {
                        response,
                        position: range.start,
                        end: range.end,
                        leftover: Bytes::new(),
                    })
                },
            )
            .instrument(span)
            .await
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
        timeout: Duration,
    ) -> Result<reqwest::Response, Failure> {
        let mut headers = identity_headers();
        headers.insert(RANGE, range);
        let config = self.inner.client.config();
        let remembered = {
            let mut slot = crate::sync::lock(&self.inner.redirect);
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
                .get_redirected(endpoint, &r.url, headers.clone(), timeout)
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
            *crate::sync::lock(&self.inner.redirect) = None;
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
                timeout,
            )
            .await?;
        if let Some(url) = redirected {
            *crate::sync::lock(&self.inner.redirect) = Some(RememberedRedirect {
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

    /// A 206 answer must carry exactly the asked-for single range of a blob of the known size.
    fn check_content_range(
        &self,
        response: &reqwest::Response,
        range: &Range<u64>,
        what: &str,
    ) -> Result<(), Failure> {
        let content_range = header_str(response.headers(), CONTENT_RANGE.as_str());
        let expected = (range.start, range.end - 1);
        match content_range.as_deref().and_then(parse_content_range) {
            Some((s, e, total))
                if (s, e) == expected && total.is_none_or(|t| t == self.inner.size) =>
            {
                Ok(())
            }
            _ => Err(Failure::transient(RegistryError::Corrupt(format!(
                "{what}: answered Content-Range {content_range:?}, expected bytes {}-{}/{}",
                expected.0, expected.1, self.inner.size
            )))),
        }
    }

    /// The blob's size and its last `len` bytes (fewer for a shorter blob), by a suffix range.
    async fn tail_on(&self, endpoint: &Endpoint, len: u64) -> Result<(u64, Bytes), Failure> {
        let what = self.what(endpoint, &format!("its last {len} bytes"));
        if len == 0 {
            return Err(Failure::fatal(RegistryError::Invalid(what)));
        }
        let header = HeaderValue::from_str(&format!("bytes=-{len}"))
            .map_err(|_| Failure::fatal(RegistryError::Invalid(what.clone())))?;
        let response = self
            .ranged_get(endpoint, header, self.inner.client.config().request_timeout)
            .await?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let content_range = header_str(response.headers(), CONTENT_RANGE.as_str());
                match content_range.as_deref().and_then(parse_content_range) {
                    Some((start, end, Some(size)))
                        if start <= end && end + 1 == size && end - start + 1 == len.min(size) =>
                    {
                        let tail = read_body_exact(response, end - start + 1, &what).await?;
                        Ok((size, tail))
                    }
                    _ => Err(Failure::transient(RegistryError::Corrupt(format!(
                        "{what}: answered Content-Range {content_range:?}, expected the last \
                         {len} bytes and the blob's size"
                    )))),
                }
            }
            StatusCode::OK => match response.content_length() {
                // The server ignored Range: a small blob is taken whole and cut.
                Some(size) if size <= WHOLE_BODY_FALLBACK_LIMIT => {
                    let whole = read_body_exact(response, size, &what).await?;
                    let from = usize::try_from(size.saturating_sub(len)).unwrap_or(0);
                    Ok((size, whole.slice(from..)))
                }
                _ => Err(Failure::fatal(RegistryError::Invalid(format!(
                    "{what}: the server ignores Range requests (answered 200 with the whole blob)"
                )))),
            },
            status => Err(status_failure(&what, status, response.headers())),
        }
    }

    async fn single(&self, endpoint: &Endpoint, range: Range<u64>) -> Result<Bytes, Failure> {
        let what = self.what(endpoint, &format!("bytes {}..{}", range.start, range.end));
        let header = range_header(std::slice::from_ref(&range))
            .ok_or_else(|| Failure::fatal(RegistryError::Invalid(what.clone())))?;
        let response = self
            .ranged_get(endpoint, header, self.inner.client.config().request_timeout)
            .await?;
        let len = range.end - range.start;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                self.check_content_range(&response, &range, &what)?;
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
        let response = self
            .ranged_get(endpoint, header, self.inner.client.config().request_timeout)
            .await?;
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
