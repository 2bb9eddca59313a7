//! One ranged request on one endpoint: a single range, several ranges in one multipart
//! response, or the blob's tail; Content-Range checked against what was asked, redirects to
//! blob storage remembered.

use std::ops::Range;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::header::{HeaderValue, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::StatusCode;

use crate::registry::client::{
    header_str, identity_headers, read_body_exact, read_body_limited, Endpoint,
};
use crate::registry::multipart::{byteranges_boundary, parse_byteranges, parse_content_range};
use crate::registry::retry::{status_failure, Failure};
use crate::registry::RegistryError;

use super::{range_header, RemoteBlob, WHOLE_BODY_FALLBACK_LIMIT};

#[derive(Clone)]
pub(super) struct RememberedRedirect {
    pub(super) api_base: String,
    pub(super) url: reqwest::Url,
    pub(super) at: Instant,
}

pub(super) enum MultiOutcome {
    Parts(Vec<Bytes>),
    Rejected,
}

impl RemoteBlob {
    pub(super) async fn fetch_on(
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
    pub(super) async fn ranged_get(
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

    pub(super) fn what(&self, endpoint: &Endpoint, detail: &str) -> String {
        format!(
            "blob {} of {} on {}, {detail}",
            self.inner.digest, self.inner.reference.repository, endpoint.host.host
        )
    }

    /// A 206 answer must carry exactly the asked-for single range of a blob of the known size.
    pub(super) fn check_content_range(
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
    pub(super) async fn tail_on(
        &self,
        endpoint: &Endpoint,
        len: u64,
    ) -> Result<(u64, Bytes), Failure> {
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

    pub(super) async fn single(
        &self,
        endpoint: &Endpoint,
        range: Range<u64>,
    ) -> Result<Bytes, Failure> {
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

    pub(super) async fn multi(
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
