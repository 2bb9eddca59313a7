//! Sequential reads of a blob served from one open response: a window that streams ahead of a
//! reader moving forward through the blob, reopened further on when the reader jumps.

use std::ops::Range;
use std::sync::atomic::AtomicU64;

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use tracing::Instrument as _;

use crate::registry::retry::{status_failure, transport_failure, Failure};
use crate::registry::RegistryError;

use super::{range_header, RemoteBlob};

/// Reads at least this long that continue where the previous read ended are served from one
/// streamed response (a "window") instead of a request each.
pub(super) const SEQUENTIAL_MIN_READ: u64 = 64 << 10;

/// Length of a blob's first window; the following ones are `ClientConfig::sequential_window`
/// long (only the bytes read are pulled from a window, so length costs nothing; each new window
/// costs a round trip).
pub(super) const FIRST_WINDOW: u64 = 4 << 20;

/// Sequential-read detection and the open window of a blob.
pub(super) struct Sequential {
    /// Where the last read of the blob ended (`u64::MAX` before the first).
    pub(super) next_read: AtomicU64,
    pub(super) slot: tokio::sync::Mutex<WindowSlot>,
}

#[derive(Default)]
pub(super) struct WindowSlot {
    pub(super) window: Option<Window>,
    /// Whether a window was opened before (the next ones are long).
    pub(super) opened_before: bool,
}

/// A ranged response being read as the reader advances: bytes `position..end` of the blob are
/// still to come, the first of them in `leftover`.
pub(super) struct Window {
    pub(super) response: reqwest::Response,
    pub(super) position: u64,
    pub(super) end: u64,
    pub(super) leftover: Bytes,
}

impl Window {
    /// The next piece of the body (`position` is where it starts; the caller advances it), or
    /// `None` once the whole window has arrived. A body longer than the window, or ending
    /// before it, is an error.
    pub(super) async fn next_piece(
        &mut self,
        digest: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
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

    pub(super) fn ended_early(&self, digest: &str) -> RegistryError {
        RegistryError::Unavailable(format!(
            "blob {digest} streamed at byte {}: response ended early",
            self.position
        ))
    }
}

impl RemoteBlob {
    /// Serves `range` from the open window, opening a new (longer) one where it ends or when
    /// the reader is elsewhere. Any failure leaves the caller to read the range directly.
    pub(super) async fn read_streamed(
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
    pub(super) async fn open_window(&self, range: Range<u64>) -> Result<Window, RegistryError> {
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
}
