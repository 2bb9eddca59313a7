//! The read path: what the kernel asks of a layer's files, answered from the cache on the FUSE
//! thread or, on a miss, on a task that claims the missing chunks (with read-ahead of the
//! neighbouring files in the same directory), fetches them and replies.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use lazysnap_fuse::{ContentId, ContentSource, ReadDone};

use crate::buffer_pool::POOL;
use crate::estargz::ChunkInfo;
use crate::metrics::FetchKind;

use super::layer_files::FileRecord;
use super::{ChunkRef, Inner, LayerReader};
use super::{Claimed, FillError, FillGuard};

/// Calls a [`ReadDone`] exactly once: with the result, or with EIO if dropped unanswered (a task
/// cancelled at shutdown must still answer the kernel).
pub(super) struct Reply(Option<ReadDone>);

impl Reply {
    fn send(mut self, result: Result<Bytes, i32>) {
        if let Some(done) = self.0.take() {
            done(result);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(libc::EIO));
        }
    }
}

/// Bytes between two chunks that read-ahead still takes as adjacent (tar headers of entries
/// without content).
pub(super) const READ_AHEAD_MAX_GAP: u64 = 4096;

/// The directory part of a layer path (`""` for a file at the root).
pub(super) fn parent_dir(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

impl ContentSource for LayerReader {
    fn read(&self, content: ContentId, offset: u64, size: u32, done: ReadDone) {
        let reply = Reply(Some(done));
        let inner = &self.inner;
        let Some((index, file)) = usize::try_from(content)
            .ok()
            .and_then(|i| Some((i, inner.files.record(i)?)))
        else {
            tracing::error!(layer = %inner.layer, content, "read of an unknown content id");
            inner.counters.read_errors.fetch_add(1, Ordering::Relaxed);
            reply.send(Err(libc::EIO));
            return;
        };
        if let Some(e) = inner.file_error(index) {
            tracing::error!(layer = %inner.layer, file = %inner.file_name(index), error = %e, "read of a file with an unusable chunk list");
            inner.counters.read_errors.fetch_add(1, Ordering::Relaxed);
            reply.send(Err(libc::EIO));
            return;
        }
        let end = offset.saturating_add(u64::from(size)).min(file.size);
        if offset >= end {
            reply.send(Ok(Bytes::new()));
            return;
        }
        let first_bytes = offset == 0;
        // From here on, offsets in the byte sequence the file's chunks make.
        let (offset, end) = (offset + file.stream_offset, end + file.stream_offset);
        let found = match inner.read_cached(&file, offset, end) {
            Ok(data) => {
                if first_bytes {
                    inner.note_first_bytes(index, &data);
                }
                reply.send(Ok(data));
                return;
            }
            Err(found) => found,
        };
        let activity = inner.opts.scheduler.on_demand();
        let task_inner = Arc::clone(inner);
        inner.runtime.spawn(async move {
            let deadline = task_inner.opts.deadline;
            let result = match tokio::time::timeout(
                deadline,
                task_inner.read_slow(index, file, offset, end, found),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(
                        layer = %task_inner.layer,
                        file = %task_inner.file_name(index),
                        offset,
                        ?deadline,
                        "read missed its deadline"
                    );
                    Err(libc::EIO)
                }
            };
            match &result {
                Ok(data) if first_bytes => task_inner.note_first_bytes(index, data),
                Ok(_) => {}
                Err(_) => {
                    task_inner
                        .counters
                        .read_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(activity);
            reply.send(result);
        });
    }

    fn local_file(&self, content: ContentId) -> Option<std::fs::File> {
        let index = usize::try_from(content).ok()?;
        let file = self.inner.files.record(index)?;
        if file.stream_offset != 0 {
            // Its chunks are gzip spans shared with other files: read through FUSE.
            return None;
        }
        match self.inner.files.chunks_of(&file) {
            [only] if only.file_offset == 0 && only.len == file.size && file.size > 0 => {
                self.inner.cache.open_file(&only.digest)
            }
            [] | [_] => None,
            chunks => {
                let whole = self.inner.files.file_digest(index)?;
                if self.inner.assembled(index) {
                    if let Some(backing) = self.inner.cache.open_file(&whole) {
                        return Some(backing);
                    }
                }
                // Once every chunk is here, assemble the file (or check the assembled file
                // another layer left) so that later opens pass through.
                if chunks.iter().all(|c| self.inner.cache.contains(&c.digest)) {
                    self.inner.start_assembly(index, whole);
                }
                None
            }
        }
    }
}

/// The byte range of chunk `c` that a read of `[offset, end)` needs, relative to the chunk.
pub(super) fn part_of(c: &ChunkInfo, offset: u64, end: u64) -> (u64, usize) {
    let start = offset.max(c.file_offset) - c.file_offset;
    let stop = end.min(c.file_offset + c.len) - c.file_offset;
    (start, usize::try_from(stop - start).unwrap_or(usize::MAX))
}

pub(super) fn concat(parts: Vec<Bytes>) -> Bytes {
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    // Pooled: a fresh buffer of a read's size costs page faults on every read.
    let mut out = POOL.take(parts.iter().map(Bytes::len).sum());
    for p in parts {
        out.extend_from_slice(&p);
    }
    POOL.into_bytes(out)
}

impl Inner {
    /// The chunks of `file` that `[offset, end)` touches, as positions in the layer's chunk array.
    pub(super) fn span(&self, file: &FileRecord, offset: u64, end: u64) -> Range<ChunkRef> {
        let chunks = self.files.chunks_of(file);
        let first = chunks.partition_point(|c| c.file_offset + c.len <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        let base = file.chunk_range().start;
        base + first..base + last.max(first)
    }

    /// Answers from the cache alone; when a chunk is missing, the parts found before it (for
    /// [`read_slow`](Self::read_slow), which goes on from there).
    pub(super) fn read_cached(
        &self,
        file: &FileRecord,
        offset: u64,
        end: u64,
    ) -> Result<Bytes, Vec<Bytes>> {
        let span = self.span(file, offset, end);
        let mut parts = Vec::with_capacity(span.len());
        for c in self.files.all_chunks().get(span).unwrap_or_default() {
            let (start, len) = part_of(c, offset, end);
            match self.cache.read_at(&c.digest, start, len) {
                Some(b) if b.len() == len => {
                    self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                    parts.push(b);
                }
                _ => return Err(parts),
            }
        }
        Ok(concat(parts))
    }

    /// Fetches what is missing (coalesced, singleflight) and assembles the answer. `found`: the
    /// first parts, already read from the cache by [`read_cached`](Self::read_cached), which
    /// missed the chunk right after them.
    pub(super) async fn read_slow(
        self: &Arc<Self>,
        index: usize,
        file: FileRecord,
        offset: u64,
        end: u64,
        found: Vec<Bytes>,
    ) -> Result<Bytes, i32> {
        let span = self.span(&file, offset, end);
        let known_missing = found.len();
        let mut parts: Vec<Option<Bytes>> = found.into_iter().map(Some).collect();
        parts.resize(span.len(), None);
        let mut waits = Vec::new();
        let mut leaders = Vec::new();
        for (slot, at) in span.enumerate().skip(known_missing) {
            let c = self.chunk(at);
            let (start, len) = part_of(c, offset, end);
            // The chunk read_cached just missed is not looked up again: the claim below rechecks.
            let cached = if slot == known_missing {
                None
            } else {
                self.cache
                    .read_at(&c.digest, start, len)
                    .filter(|b| b.len() == len)
            };
            if let Some(b) = cached {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                parts[slot] = Some(b);
                continue;
            }
            self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
            match self.claims().claim(&c.digest, FetchKind::OnDemand) {
                Claimed::Leader(guard, waiter) => {
                    // Another reader may have stored it between the lookup and the claim.
                    match self.cache.get(&c.digest) {
                        Some(data) => guard.complete(Ok(data)),
                        None => leaders.push((at, guard)),
                    }
                    waits.push((slot, at, waiter));
                }
                // A prefetch or background stream has it but has not delivered it yet: follow
                // it, and fetch the chunk itself if the stream does not deliver in time.
                Claimed::Overtake(guard, waiter) => {
                    self.overtake_if_late(at, guard);
                    waits.push((slot, at, waiter));
                }
                Claimed::Follower(waiter) => waits.push((slot, at, waiter)),
            }
        }
        if !leaders.is_empty() {
            // Read-ahead chunks may sit a tar header apart: they still share the request.
            // A gzip span already holds megabytes around the read: no more is taken.
            let max_gap = if self.opts.readahead && !self.reads_gzip_spans() {
                self.read_ahead(&mut leaders);
                READ_AHEAD_MAX_GAP
            } else {
                0
            };
            // Detached: the fetch completes (and fills the cache) even if this read gives up.
            let inner = Arc::clone(self);
            self.runtime
                .spawn(async move { inner.fetch_on_demand(leaders, max_gap).await });
        }
        for (slot, at, waiter) in waits {
            let c = self.chunk(at);
            let data = match waiter.wait().await {
                Ok(data) => data,
                // The fetching task went away (another layer shut down): fetch it ourselves.
                Err(FillError::Abandoned) => self.obtain_chunk(at).await?,
                Err(e) => {
                    tracing::error!(layer = %self.layer, file = %self.file_name(index), chunk = %c.digest, error = %e, "read failed");
                    return Err(libc::EIO);
                }
            };
            let (start, len) = part_of(c, offset, end);
            let start = usize::try_from(start).unwrap_or(usize::MAX);
            match data.get(start..start.saturating_add(len)) {
                Some(_) => parts[slot] = Some(data.slice(start..start + len)),
                None => {
                    tracing::error!(layer = %self.layer, chunk = %c.digest, "chunk shorter than its TOC length");
                    return Err(libc::EIO);
                }
            }
        }
        Ok(concat(parts.into_iter().flatten().collect()))
    }

    /// Fetches chunk `at`, which a lower-priority stream holds, with an on-demand request of its
    /// own unless that stream delivers it within the scheduler's patience.
    pub(super) fn overtake_if_late(self: &Arc<Self>, at: ChunkRef, guard: FillGuard) {
        let c = &self.chunk(at).compressed;
        let patience = self.opts.scheduler.overtake_patience(c.end - c.start);
        let inner = Arc::clone(self);
        self.runtime.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(patience) => {}
                _ = inner.cancel.cancelled() => return,
            }
            if guard.is_pending() {
                tracing::debug!(layer = %inner.layer, chunk = %guard.digest(), ?patience, "a lower-priority stream is late with a chunk a read waits for; fetching it on demand");
                inner.fetch_on_demand(vec![(at, guard)], 0).await;
            }
        });
    }

    /// [`fetch_chunks`](Self::fetch_chunks) for reads a process waits on.
    pub(super) async fn fetch_on_demand(
        self: &Arc<Self>,
        claimed: Vec<(ChunkRef, FillGuard)>,
        max_gap: u64,
    ) {
        self.fetch_chunks(
            claimed,
            FetchKind::OnDemand,
            max_gap,
            self.opts.max_request_bytes,
            None,
        )
        .await;
    }

    /// Extends a miss's request with the chunks that follow it in the blob (the next files of
    /// its directory in TOC order, which were packed together and are often opened together: a
    /// package's modules, a locale's files), up to about one bandwidth-delay product of
    /// compressed bytes: on a slow link a round trip saved is worth that many bytes. Stops at the
    /// first chunk cached, claimed, not adjacent, or of a file in another directory (the next
    /// directory's files are seldom wanted: on the python3 app at 10 Mbit/s crossing into them
    /// sent 0.7 MB more for no fewer misses).
    pub(super) fn read_ahead(&self, leaders: &mut Vec<(ChunkRef, FillGuard)>) {
        let Some(mut end) = leaders
            .iter()
            .map(|(at, _)| self.chunk(*at).compressed.end)
            .max()
        else {
            return;
        };
        let budget = self.opts.scheduler.readahead_bytes();
        let directory_of_chunk =
            |at: ChunkRef| parent_dir(self.file_name(self.files.file_of_chunk(at)));
        let directory = leaders.first().map(|&(at, _)| directory_of_chunk(at));
        let chunks = self.files.all_chunks();
        let start = self.layer_chunks.partition_point(|&at| {
            chunks
                .get(at as usize)
                .is_some_and(|c| c.compressed.start < end)
        });
        let mut added = 0u64;
        for &at in &self.layer_chunks[start..] {
            let at = at as ChunkRef;
            let c = self.chunk(at);
            let len = c.compressed.end - c.compressed.start;
            if c.compressed.start > end.saturating_add(READ_AHEAD_MAX_GAP)
                || added + len > budget
                || self.cache.contains(&c.digest)
                || directory != Some(directory_of_chunk(at))
            {
                break;
            }
            let Some(guard) = self.claims().try_lead(&c.digest, FetchKind::OnDemand) else {
                break;
            };
            leaders.push((at, guard));
            added += len;
            end = c.compressed.end;
        }
    }

    /// One chunk, whoever fetches it; retries leadership if a fetch is abandoned.
    pub(super) async fn obtain_chunk(self: &Arc<Self>, at: ChunkRef) -> Result<Bytes, i32> {
        self.obtain_chunk_as(at, FetchKind::OnDemand).await
    }

    /// [`obtain_chunk`](Self::obtain_chunk) at priority `kind`: a fetch of the same or higher
    /// priority that holds the chunk is followed, a lower one overtaken.
    pub(super) async fn obtain_chunk_as(
        self: &Arc<Self>,
        at: ChunkRef,
        kind: FetchKind,
    ) -> Result<Bytes, i32> {
        let digest = &self.chunk(at).digest;
        loop {
            if let Some(data) = self.cache.get(digest) {
                return Ok(data);
            }
            let waiter = match self.claims().claim(digest, kind) {
                Claimed::Leader(guard, waiter) | Claimed::Overtake(guard, waiter) => {
                    let inner = Arc::clone(self);
                    let max = self.opts.max_request_bytes;
                    self.runtime.spawn(async move {
                        inner
                            .fetch_chunks(vec![(at, guard)], kind, 0, max, None)
                            .await
                    });
                    waiter
                }
                Claimed::Follower(waiter) => waiter,
            };
            match waiter.wait().await {
                Ok(data) => return Ok(data),
                Err(FillError::Abandoned) if !self.cancel.is_cancelled() => continue,
                Err(e) => {
                    tracing::error!(layer = %self.layer, chunk = %digest, error = %e, "read failed");
                    return Err(libc::EIO);
                }
            }
        }
    }
}
