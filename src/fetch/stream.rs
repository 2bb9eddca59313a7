//! Streaming fetches: claimed chunks coalesced into runs, each run one range request whose body
//! is decoded and verified chunk by chunk as it arrives, stored, and handed to the reads waiting
//! on it; failures are retried for the chunks still missing.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::blob::{BlobError, BlobSource};
use crate::buffer_pool::POOL;
use crate::cache::LargeChunkFile;
use crate::estargz::{self, ChunkDecoder, Decoded};
use crate::metrics::{self, FetchKind};

use super::{ChunkRef, Inner};
use super::{FillError, FillGuard, Reservation};

/// How a streamed run request ended.
pub(super) enum Streamed {
    /// Every chunk of the run got its verdict (its fill is completed).
    Done,
    /// The request failed before these chunks had all their bytes, or some arrived and failed
    /// verification.
    Unfinished {
        chunks: Vec<(ChunkRef, FillGuard)>,
        failure: StreamFailure,
        /// Some chunks of the run got their verdict before the failure.
        progressed: bool,
    },
    /// The reader is shutting down.
    Cancelled,
}

/// A chunk whose bytes failed verification: not served, not cached, its fill still open so that
/// it is fetched again (the bytes came over the network; the next response may be right).
pub(super) struct Rejected {
    at: ChunkRef,
    guard: FillGuard,
    message: String,
}

impl Rejected {
    /// Ends the chunk's fill with the verification error (for failures no refetch can mend).
    fn fail(self) {
        self.guard.complete(Err(FillError::Verify(self.message)));
    }
}

/// Why a chunk's decoding could not start.
pub(super) enum StartError {
    Format(estargz::FormatError),
    Cache(crate::cache::CacheError),
}

impl From<estargz::FormatError> for StartError {
    fn from(e: estargz::FormatError) -> Self {
        StartError::Format(e)
    }
}

impl From<crate::cache::CacheError> for StartError {
    fn from(e: crate::cache::CacheError) -> Self {
        StartError::Cache(e)
    }
}

/// Why a streamed request failed.
pub(super) struct StreamFailure {
    message: String,
    /// Metric label (see [`metrics::record_fetch_error`]).
    reason: &'static str,
    /// Worth another request (the source is unavailable, slow, or sent bad bytes).
    retryable: bool,
}

impl From<BlobError> for StreamFailure {
    fn from(e: BlobError) -> StreamFailure {
        StreamFailure {
            reason: error_reason(&e),
            retryable: matches!(e, BlobError::Unavailable(_) | BlobError::Corrupt(_)),
            message: e.to_string(),
        }
    }
}

/// Chunks larger than this are decoded straight into their cache file, not into memory.
pub(super) const LARGE_CHUNK: u64 = 16 << 20;

/// Most bytes of chunks being decoded in memory at once, node-wide; past it, chunks are decoded
/// into their cache files as large ones are. With [`LARGE_CHUNK`] this bounds what a layer of
/// small compressed chunks that inflate to a lot (a decompression bomb) can make the daemon hold.
pub(super) const DECODE_MEMORY_MAX: u64 = 256 << 20;

pub(super) static DECODE_MEMORY: AtomicU64 = AtomicU64::new(0);

/// A share of [`DECODE_MEMORY_MAX`] held while a chunk is decoded in memory.
pub(super) struct DecodeMemory(u64);

impl DecodeMemory {
    fn take(len: u64) -> Option<DecodeMemory> {
        DECODE_MEMORY
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(len)
                    .filter(|&total| total <= DECODE_MEMORY_MAX)
            })
            .ok()
            .map(|_| DecodeMemory(len))
    }
}

impl Drop for DecodeMemory {
    fn drop(&mut self) {
        DECODE_MEMORY.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// A chunk being decoded: into memory (holding its share of the node-wide decode memory) or
/// into its cache file.
pub(super) struct Decoding {
    decoder: ChunkDecoder,
    into: DecodeInto,
}

pub(super) enum DecodeInto {
    /// Holds its share of the decode memory until the chunk is decoded.
    Memory {
        _share: DecodeMemory,
    },
    File(LargeChunkFile),
}

/// A coalesced request: its range and the chunks (with their ranges) it carries.
pub(super) type Run<T> = (Range<u64>, Vec<(Range<u64>, T)>);

/// Groups chunks (sorted by compressed start) into runs fetched by one request each: a chunk
/// joins the run if it overlaps it or starts at most `max_gap` bytes after it, and the run stays
/// within `max_bytes` (an overlapping chunk always joins).
pub(super) fn build_runs<T>(
    items: Vec<(Range<u64>, T)>,
    max_bytes: u64,
    max_gap: u64,
) -> Vec<Run<T>> {
    let mut runs: Vec<Run<T>> = Vec::new();
    for (range, item) in items {
        if let Some((run, members)) = runs.last_mut() {
            let overlaps = range.start < run.end;
            let close = range.start.saturating_sub(run.end) <= max_gap;
            let fits = range.end.max(run.end) - run.start <= max_bytes;
            if overlaps || (close && fits) {
                run.end = run.end.max(range.end);
                members.push((range, item));
                continue;
            }
        }
        runs.push((range.clone(), vec![(range, item)]));
    }
    runs
}

pub(super) fn error_reason(e: &BlobError) -> &'static str {
    match e {
        BlobError::NotFound(_) => "not_found",
        BlobError::Auth(_) => "auth",
        BlobError::Unavailable(_) => "unavailable",
        BlobError::Corrupt(_) => "corrupt",
        BlobError::Invalid(_) => "invalid",
    }
}

impl Inner {
    /// Fetches the claimed chunks, coalesced into runs streamed in one request each, and decodes,
    /// verifies and stores each and completes its guard. Failed requests are retried (transient
    /// failures only, `retries` times, with backoff) for the chunks still missing; a retry is
    /// given up once `deadline` passes without any chunk arriving. Returns when every guard is
    /// completed (or dropped, if this reader shuts down: waiters then fetch it themselves).
    pub(super) async fn fetch_chunks(
        self: &Arc<Self>,
        claimed: Vec<(ChunkRef, FillGuard)>,
        kind: FetchKind,
        max_gap: u64,
        max_bytes: u64,
        reservation: Option<Reservation>,
    ) {
        let mut pending = claimed;
        let mut attempt = 0;
        let mut give_up_at = Instant::now() + self.opts.deadline;
        while !pending.is_empty() {
            let streamed = futures::future::join_all(
                self.runs_of(pending, max_bytes, max_gap)
                    .into_iter()
                    .map(|(run, members)| {
                        self.stream_run(run, members, kind, attempt, reservation.as_ref())
                    }),
            )
            .await;
            let mut left = Vec::new();
            let mut last_failure = None;
            let mut retryable = true;
            for outcome in streamed {
                match outcome {
                    Streamed::Done => give_up_at = Instant::now() + self.opts.deadline,
                    Streamed::Cancelled => return,
                    Streamed::Unfinished {
                        chunks,
                        failure,
                        progressed,
                    } => {
                        if progressed {
                            give_up_at = Instant::now() + self.opts.deadline;
                        }
                        retryable &= failure.retryable;
                        left.extend(chunks);
                        last_failure = Some(failure.message);
                    }
                }
            }
            pending = left;
            let Some(message) = last_failure.filter(|_| !pending.is_empty()) else {
                break;
            };
            attempt += 1;
            let backoff = Duration::from_millis(100u64 << attempt.min(6));
            let now = Instant::now();
            if !retryable || attempt > self.opts.retries || now + backoff >= give_up_at {
                tracing::warn!(layer = %self.layer, kind = kind.as_str(), attempts = attempt, chunks = pending.len(), error = %message, "giving up on these chunks");
                for (_, guard) in pending {
                    guard.complete(Err(FillError::Fetch(message.clone())));
                }
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.cancel.cancelled() => return,
            }
        }
    }

    /// The claimed chunks in blob order, coalesced into runs (see [`build_runs`]).
    pub(super) fn runs_of(
        &self,
        mut claimed: Vec<(ChunkRef, FillGuard)>,
        max_bytes: u64,
        max_gap: u64,
    ) -> Vec<Run<(ChunkRef, FillGuard)>> {
        claimed.sort_by_key(|(at, _)| self.chunk(*at).compressed.start);
        let items = claimed
            .into_iter()
            .map(|(at, guard)| (self.chunk(at).compressed.clone(), (at, guard)))
            .collect();
        build_runs(items, max_bytes, max_gap)
    }

    /// Fetches a run of chunks with one request whose body is decoded as it arrives: each chunk
    /// is decoded and verified as soon as its last byte is in, on the blocking pool, so chunks
    /// decode in parallel with the transfer and with each other. The last chunk of an on-demand
    /// run is decoded right here, its reader being the one waiting. A request fails when no byte
    /// arrives for `attempt_timeout` (so a slow link that keeps sending never times out); chunks
    /// still short of bytes then are returned for another attempt.
    pub(super) async fn stream_run(
        self: &Arc<Self>,
        run: Range<u64>,
        members: Vec<(Range<u64>, (ChunkRef, FillGuard))>,
        kind: FetchKind,
        attempt: u32,
        reservation: Option<&Reservation>,
    ) -> Streamed {
        let first_file = members
            .first()
            .map(|(_, (at, _))| self.file_name(self.files.file_of_chunk(*at)));
        let span = tracing::info_span!(
            "fetch",
            layer = %self.layer,
            file = first_file.unwrap_or(""),
            kind = kind.as_str(),
            requests = 1,
            chunks = members.len(),
            bytes = run.end - run.start,
            first = run.start,
            attempt
        );
        let started = Instant::now();
        // Members (sorted by start) not yet begun, those receiving bytes, and, for an on-demand
        // run, the last one complete, decoded after the transfer.
        let mut waiting: std::collections::VecDeque<_> = members.into();
        // (range, chunk, guard, decoding, bytes fed up to): chunks receiving bytes.
        let mut receiving: Vec<(Range<u64>, ChunkRef, FillGuard, Decoding, u64)> = Vec::new();
        let mut last: Option<(ChunkRef, FillGuard, Decoding)> = None;
        let mut decodes = JoinSet::new();
        let mut verdicts = 0usize;
        let mut rejected: Vec<Rejected> = Vec::new();
        let stall = self.opts.attempt_timeout;
        let stalled = || StreamFailure {
            message: format!("no data for {stall:?}"),
            reason: "timeout",
            retryable: true,
        };
        let mut probe = self.opts.scheduler.request(kind);
        let request = async {
            let mut body = tokio::time::timeout(stall, self.blob.read_range_stream(run.clone()))
                .await
                .map_err(|_| stalled())??;
            let mut at = run.start;
            while let Some(piece) = tokio::time::timeout(stall, futures::StreamExt::next(&mut body))
                .await
                .map_err(|_| stalled())?
            {
                let piece: Bytes = piece?;
                let end = at + piece.len() as u64;
                probe.received(piece.len() as u64);
                if let Some(reservation) = reservation {
                    reservation.received(piece.len() as u64);
                }
                // Chunks this piece completes are finished before chunks starting in it begin
                // (which may wait for the cache room the finished ones free), then fed.
                loop {
                    let mut i = 0;
                    while let Some((range, _, _, Decoding { decoder, .. }, fed_to)) =
                        receiving.get_mut(i)
                    {
                        let from = range.start.max(at).max(*fed_to);
                        let to = range.end.min(end);
                        let within = (from - at) as usize..to.saturating_sub(at) as usize;
                        let fed = match piece.get(within) {
                            Some(bytes) if from < to => decoder.feed(bytes),
                            _ => Ok(()),
                        };
                        *fed_to = to.max(*fed_to);
                        let complete = range.end <= end;
                        if fed.is_err() || complete {
                            let (_, chunk_at, guard, decoder, _) = receiving.swap_remove(i);
                            if let Err(e) = fed {
                                rejected.push(self.reject(chunk_at, e, guard));
                                continue;
                            }
                            verdicts += 1;
                            if kind == FetchKind::OnDemand
                                && waiting.is_empty()
                                && receiving.is_empty()
                            {
                                last = Some((chunk_at, guard, decoder));
                            } else {
                                let inner = Arc::clone(self);
                                decodes.spawn_blocking_on(
                                    move || match inner.finish(chunk_at, decoder, guard) {
                                        Ok(Some(data)) => {
                                            inner.persist(chunk_at, data);
                                            None
                                        }
                                        Ok(None) => None,
                                        Err(rejected) => Some(rejected),
                                    },
                                    &self.runtime,
                                );
                            }
                            continue;
                        }
                        i += 1;
                    }
                    if waiting.front().is_none_or(|(range, _)| range.start >= end) {
                        break;
                    }
                    while waiting.front().is_some_and(|(range, _)| range.start < end) {
                        let Some((range, (chunk_at, guard))) = waiting.pop_front() else {
                            break;
                        };
                        match self.start_decoding(chunk_at).await {
                            Ok(decoding) => receiving.push((
                                range.clone(),
                                chunk_at,
                                guard,
                                decoding,
                                range.start,
                            )),
                            Err(StartError::Format(e)) => {
                                verdicts += 1;
                                self.reject(chunk_at, e, guard).fail();
                            }
                            Err(StartError::Cache(e)) => {
                                verdicts += 1;
                                self.fail_uncacheable(chunk_at, e, guard);
                            }
                        }
                    }
                }
                at = end;
            }
            if waiting.is_empty() && receiving.is_empty() {
                Ok(())
            } else {
                Err(StreamFailure::from(BlobError::Corrupt(format!(
                    "range response ended at byte {at} of {}..{}",
                    run.start, run.end
                ))))
            }
        };
        let outcome = tokio::select! {
            r = request.instrument(span) => r,
            _ = self.cancel.cancelled() => return Streamed::Cancelled,
        };
        if let Some((chunk_at, guard, decoder)) = last {
            // Readers are answered here; the disk write goes to the blocking pool.
            match self.finish(chunk_at, decoder, guard) {
                Ok(Some(data)) => {
                    let inner = Arc::clone(self);
                    self.runtime
                        .spawn_blocking(move || inner.persist(chunk_at, data));
                }
                Ok(None) => {}
                Err(chunk) => rejected.push(chunk),
            }
        }
        let failure = match outcome {
            Ok(()) => {
                self.count_fetched(kind, run.end - run.start, started.elapsed());
                None
            }
            Err(failure) => {
                metrics::record_fetch_error(failure.reason);
                Some(failure)
            }
        };
        while let Some(joined) = decodes.join_next().await {
            if let Ok(Some(chunk)) = joined {
                verdicts = verdicts.saturating_sub(1);
                rejected.push(chunk);
            }
        }
        let failure = failure.or_else(|| {
            rejected.first().map(|chunk| StreamFailure {
                message: format!("chunk failed verification: {}", chunk.message),
                reason: "corrupt",
                retryable: true,
            })
        });
        let unfinished: Vec<_> = waiting
            .into_iter()
            .map(|(_, member)| member)
            .chain(
                receiving
                    .into_iter()
                    .map(|(_, at, guard, _, _)| (at, guard)),
            )
            .chain(rejected.into_iter().map(|chunk| (chunk.at, chunk.guard)))
            .collect();
        match failure {
            None => Streamed::Done,
            Some(failure) => {
                tracing::warn!(layer = %self.layer, kind = kind.as_str(), attempt, error = %failure.message, retryable = failure.retryable, chunks = unfinished.len(), "range request failed");
                Streamed::Unfinished {
                    chunks: unfinished,
                    failure,
                    progressed: verdicts > 0,
                }
            }
        }
    }

    /// A decoder for chunk `at`: into memory when it is small and the node-wide decode memory
    /// has room, otherwise into its cache file.
    pub(super) async fn start_decoding(&self, at: ChunkRef) -> Result<Decoding, StartError> {
        let chunk = self.chunk(at);
        let file = self.file_name(self.files.file_of_chunk(at));
        if chunk.len <= LARGE_CHUNK {
            if let Some(memory) = DecodeMemory::take(chunk.len) {
                let decoder = ChunkDecoder::new(self.coding.clone(), file, chunk)?;
                return Ok(Decoding {
                    decoder,
                    into: DecodeInto::Memory { _share: memory },
                });
            }
        }
        let large = self.cache.begin_large(&chunk.digest, chunk.len).await?;
        let writer = large.writer()?;
        let decoder = ChunkDecoder::into_writer(self.coding.clone(), file, chunk, writer)?;
        Ok(Decoding {
            decoder,
            into: DecodeInto::File(large),
        })
    }

    /// Fails a chunk's fill that cannot be decoded because the cache cannot hold it.
    pub(super) fn fail_uncacheable(
        &self,
        at: ChunkRef,
        error: crate::cache::CacheError,
        guard: FillGuard,
    ) {
        let chunk = self.chunk(at);
        tracing::error!(layer = %self.layer, chunk = %chunk.digest, file = %self.file_name(self.files.file_of_chunk(at)), error = %error, "cannot decode a chunk into the cache; its reads fail");
        guard.complete(Err(FillError::Fetch(error.to_string())));
    }

    /// Finishes decoding and verifying a chunk whose bytes are all in (CPU work: a `decode`
    /// span) and completes its fill: with [`store_decoded`](Self::store_decoded), or, for a
    /// chunk decoded into its cache file, by installing that file and serving its mapping. A
    /// chunk that fails verification is handed back, its fill open, to be fetched again.
    pub(super) fn finish(
        &self,
        at: ChunkRef,
        decoding: Decoding,
        guard: FillGuard,
    ) -> Result<Option<Bytes>, Rejected> {
        let chunk = self.chunk(at);
        let decoded = tracing::debug_span!("decode", chunk = %chunk.digest, bytes = chunk.len)
            .in_scope(|| decoding.decoder.finish());
        match (decoded, decoding.into) {
            (Ok(Decoded::Written), DecodeInto::File(large)) => {
                match self.cache.finish_large(&chunk.digest, large) {
                    Ok(mapped) => guard.complete(Ok(mapped)),
                    Err(e) => self.fail_uncacheable(at, e, guard),
                }
                Ok(None)
            }
            (Ok(Decoded::Memory(data)), _) => Ok(self.store_decoded(at, data, guard)),
            (Ok(Decoded::Written), DecodeInto::Memory { .. }) => {
                guard.complete(Err(FillError::Fetch(
                    "a chunk decoded into memory reported it was written to a file".into(),
                )));
                Ok(None)
            }
            (Err(e), _) => Err(self.reject(at, e, guard)),
        }
    }

    /// Completes a chunk's fill with its verified bytes: they go to the memory tier and to the
    /// waiting readers, and are returned to be written to disk after, off the readers' path, by
    /// [`persist`](Self::persist).
    pub(super) fn store_decoded(
        &self,
        at: ChunkRef,
        data: Vec<u8>,
        guard: FillGuard,
    ) -> Option<Bytes> {
        let chunk = self.chunk(at);
        let data = POOL.into_bytes(data);
        if self.cache.remember(&chunk.digest, data.clone()) {
            guard.complete(Ok(data.clone()));
            return Some(data);
        }
        // Not held in memory: on disk before the fill ends, so that no reader arriving between
        // the two fetches it again.
        self.persist(at, data.clone());
        guard.complete(Ok(data));
        None
    }

    /// Counts and logs a chunk whose bytes failed verification and hands it back (its fill
    /// open) to be fetched again or failed.
    pub(super) fn reject(
        &self,
        at: ChunkRef,
        error: estargz::FormatError,
        guard: FillGuard,
    ) -> Rejected {
        let chunk = self.chunk(at);
        self.counters
            .verify_failures
            .fetch_add(1, Ordering::Relaxed);
        metrics::record_verify_failure(&self.layer, error.chunk_failure_reason());
        tracing::error!(
            layer = %self.layer,
            chunk = %chunk.digest,
            file = %self.file_name(self.files.file_of_chunk(at)),
            error = %error,
            "chunk failed verification; not served, not cached"
        );
        Rejected {
            at,
            guard,
            message: error.to_string(),
        }
    }

    /// Writes a verified chunk to the disk cache (blocking I/O).
    pub(super) fn persist(&self, at: ChunkRef, data: Bytes) {
        let chunk = self.chunk(at);
        let stored = if self.reads_gzip_spans() {
            self.cache.insert_named(&chunk.digest, data)
        } else {
            self.cache.insert(&chunk.digest, data)
        };
        if let Err(e) = stored {
            tracing::warn!(layer = %self.layer, chunk = %chunk.digest, error = %e, "cannot store a chunk in the cache; serving it anyway");
        }
    }

    pub(super) fn count_fetched(&self, kind: FetchKind, bytes: u64, latency: Duration) {
        let counter = match kind {
            FetchKind::OnDemand => &self.counters.on_demand_bytes,
            FetchKind::Prefetch => &self.counters.prefetch_bytes,
            FetchKind::Background => &self.counters.background_bytes,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        metrics::record_fetch(kind, bytes, latency);
    }
}

#[cfg(test)]
mod tests;
