//! [`BlobReader`]: a whole blob as a tokio `AsyncRead`, for conversion input of any size.
//! A broken connection resumes with `Range: bytes=<offset>-`; length and digest are verified
//! when the stream ends, so a reader never ends cleanly on wrong bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::BoxStream;
use reqwest::header::{HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::io::StreamReader;
use tracing::Instrument as _;

use crate::digest::Digest;

use super::client::{header_str, identity_headers, pull_scope, Client};
use super::multipart::parse_content_range;
use super::reference::Reference;
use super::retry::{status_failure, Backoff, Failure};
use super::{DigestVerifier, RegistryError};

/// A streamed, verified blob. Read errors are `io::Error`s wrapping a [`RegistryError`]
/// (`err.get_ref()` downcasts to it).
pub struct BlobReader {
    size: Option<u64>,
    inner: StreamReader<BoxStream<'static, io::Result<Bytes>>, Bytes>,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("size", &self.size)
            .finish()
    }
}

struct State {
    client: Client,
    reference: Reference,
    digest: Digest,
    response: Option<reqwest::Response>,
    offset: u64,
    size: Option<u64>,
    verifier: Option<DigestVerifier>,
    backoff: Backoff,
    /// Offset at the last failure: progress since then resets the retry budget.
    failed_at: Option<u64>,
    done: bool,
}

fn io_error(error: RegistryError) -> io::Error {
    io::Error::other(error)
}

impl Client {
    /// Streams a whole blob (any size). Reads resume with a Range request after a broken
    /// connection; the digest and length are verified at the end (a mismatch is an
    /// `io::Error` wrapping [`RegistryError::Corrupt`]).
    pub async fn blob_reader(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<BlobReader, RegistryError> {
        BlobReader::open(self.clone(), reference.clone(), digest.clone()).await
    }
}

impl BlobReader {
    pub(crate) async fn open(
        client: Client,
        reference: Reference,
        digest: Digest,
    ) -> Result<BlobReader, RegistryError> {
        let verifier = DigestVerifier::new(&digest);
        let response = open_at(&client, &reference, &digest, 0).await?;
        let size = response.content_length();
        let backoff = Backoff::new(client.config());
        let state = State {
            client,
            reference,
            digest,
            response: Some(response),
            offset: 0,
            size,
            verifier: Some(verifier),
            backoff,
            failed_at: None,
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let item = next_chunk(&mut st).await;
            match item {
                Ok(Some(bytes)) => Some((Ok(bytes), st)),
                Ok(None) => None,
                Err(e) => {
                    st.done = true;
                    Some((Err(io_error(e)), st))
                }
            }
        });
        Ok(BlobReader {
            size,
            inner: StreamReader::new(Box::pin(stream) as BoxStream<'static, io::Result<Bytes>>),
        })
    }

    /// The blob's size as announced by the registry, if it did.
    pub fn size(&self) -> Option<u64> {
        self.size
    }
}

impl AsyncRead for BlobReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

/// Opens the blob at `offset` (200 for 0, 206 with a matching Content-Range otherwise).
async fn open_at(
    client: &Client,
    reference: &Reference,
    digest: &Digest,
    offset: u64,
) -> Result<reqwest::Response, RegistryError> {
    let scope = pull_scope(&reference.repository);
    let span = tracing::info_span!("registry.blob_stream", registry = %reference.registry, repository = %reference.repository, digest = %digest, offset);
    client
        .with_endpoints(
            reference,
            |c| c.pull,
            "streaming blob",
            |endpoint| {
                let scope = scope.as_str();
                async move {
                    let mut headers = identity_headers();
                    if offset > 0 {
                        if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                            headers.insert(RANGE, v);
                        }
                    }
                    let what = format!(
                        "blob {digest} of {} on {} from byte {offset}",
                        reference.repository, endpoint.host.host
                    );
                    // Streams may run for a long time: only the connect and headers are bounded here,
                    // the body is bounded per chunk by the read deadline below.
                    let (response, _) = client
                        .get_blob_response(
                            &endpoint,
                            &reference.repository,
                            digest,
                            headers,
                            scope,
                            client.config().read_deadline * 1000,
                        )
                        .await?;
                    match (offset, response.status()) {
                        (0, StatusCode::OK) => Ok(response),
                        (_, StatusCode::PARTIAL_CONTENT) => {
                            let cr = header_str(response.headers(), CONTENT_RANGE.as_str());
                            match cr.as_deref().and_then(parse_content_range) {
                                Some((s, _, _)) if s == offset => Ok(response),
                                _ => Err(Failure::transient(RegistryError::Corrupt(format!(
                                    "{what}: resumed at Content-Range {cr:?}"
                                )))),
                            }
                        }
                        (_, status) => Err(status_failure(&what, status, response.headers())),
                    }
                }
            },
        )
        .instrument(span)
        .await
}

async fn next_chunk(st: &mut State) -> Result<Option<Bytes>, RegistryError> {
    let chunk_deadline = st.client.config().read_deadline;
    loop {
        if st.response.is_none() {
            st.response = Some(open_at(&st.client, &st.reference, &st.digest, st.offset).await?);
        }
        let Some(response) = st.response.as_mut() else {
            continue;
        };
        let failure = match tokio::time::timeout(chunk_deadline, response.chunk()).await {
            Ok(Ok(Some(bytes))) => {
                st.offset += bytes.len() as u64;
                if st.size.is_some_and(|s| st.offset > s) {
                    return Err(RegistryError::Corrupt(format!(
                        "blob {}: more bytes than the announced {:?}",
                        st.digest, st.size
                    )));
                }
                if let Some(v) = st.verifier.as_mut() {
                    v.update(&bytes);
                }
                return Ok(Some(bytes));
            }
            Ok(Ok(None)) => {
                if let Some(size) = st.size {
                    if st.offset != size {
                        // Connection closed early without an error: resume.
                        Failure::transient(RegistryError::Unavailable(format!(
                            "blob {}: body ended at {} of {size} bytes",
                            st.digest, st.offset
                        )))
                    } else {
                        return finish(st).map(|()| None);
                    }
                } else {
                    return finish(st).map(|()| None);
                }
            }
            Ok(Err(e)) => {
                super::retry::transport_failure(&format!("streaming blob {}", st.digest), &e)
            }
            Err(_) => Failure::transient(RegistryError::Unavailable(format!(
                "blob {}: no data for {chunk_deadline:?}",
                st.digest
            ))),
        };
        st.response = None;
        if st.failed_at != Some(st.offset) {
            // Progress since the last failure: a fresh retry budget and deadline.
            st.backoff = Backoff::new(st.client.config());
            st.failed_at = Some(st.offset);
        }
        tracing::warn!(digest = %st.digest, offset = st.offset, error = %failure.error, "blob stream broken; resuming");
        st.backoff.wait(failure).await?;
    }
}

fn finish(st: &mut State) -> Result<(), RegistryError> {
    st.done = true;
    match st.verifier.take() {
        Some(v) => v.finish(&format!(
            "blob {} streamed from {}",
            st.digest, st.reference
        )),
        None => Ok(()),
    }
}
