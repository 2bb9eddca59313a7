//! Fetching ahead of reads: the startup files and the libraries a program names, the prefetch
//! plan of an optimized image, and background fill of the rest of the layer, each streamed at
//! its priority through the scheduler's claims.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::task::JoinSet;
use tracing::Instrument;

use crate::estargz::{ChunkInfo, PrefetchPlan};
use crate::metrics::FetchKind;

use super::layer_files::FileRecord;
use super::read::READ_AHEAD_MAX_GAP;
use super::{elf_deps, scheduler};
use super::{ChunkRef, Inner};
use super::{ClaimTable, FillGuard};

/// Largest file (uncompressed) the startup prefetch fetches whole; of a larger one, only the
/// first chunk (a program that big reads a small part of itself at start).
pub const STARTUP_WHOLE_FILE_MAX: u64 = 32 << 20;

impl Inner {
    /// The work of [`LayerReader::prefetch_startup_files`] for file indexes `files`.
    pub(super) async fn prefetch_startup(self: Arc<Self>, files: Vec<usize>) {
        let records: Vec<(usize, FileRecord)> = files
            .iter()
            .filter_map(|&file| Some((file, self.files.record(file)?)))
            .collect();
        let span = tracing::info_span!(
            "startup_prefetch",
            layer = %self.layer,
            files = ?files.iter().map(|&file| self.file_name(file)).collect::<Vec<_>>()
        );
        async {
            // Chunks cached or being fetched already are passed over by the stream.
            let firsts: Vec<ChunkRef> = records
                .iter()
                .filter_map(|(_, record)| {
                    let range = record.chunk_range();
                    (!range.is_empty()).then_some(range.start)
                })
                .collect();
            self.stream_lower(&firsts, FetchKind::Prefetch).await;
            if self.opts.library_prefetch {
                for &(file, _) in &records {
                    let elf = self
                        .files
                        .chunks(file)
                        .and_then(<[ChunkInfo]>::first)
                        .and_then(|first| self.cache.get(&first.digest))
                        .is_some_and(|head| elf_deps::is_elf(&head));
                    if elf {
                        self.prefetch_libraries_once(file);
                    }
                }
            }
            let rest: Vec<ChunkRef> = records
                .iter()
                .filter(|(_, record)| record.size <= STARTUP_WHOLE_FILE_MAX)
                .flat_map(|(_, record)| record.chunk_range().skip(1))
                .collect();
            self.stream_lower(&rest, FetchKind::Prefetch).await;
        }
        .instrument(span)
        .await;
    }

    /// Called with the first bytes of file `index` a read returned: if they start an ELF file
    /// and library prefetch is on, fetches the libraries it names (once per file).
    pub(super) fn note_first_bytes(self: &Arc<Self>, index: usize, first: &[u8]) {
        if self.opts.library_prefetch && elf_deps::is_elf(first) {
            self.prefetch_libraries_once(index);
        }
    }

    /// Starts [`prefetch_libraries_of`](Self::prefetch_libraries_of) for file `index` unless it
    /// was started before.
    pub(super) fn prefetch_libraries_once(self: &Arc<Self>, index: usize) {
        let Ok(file) = u32::try_from(index) else {
            return;
        };
        let first_time = crate::sync::lock(&self.libraries_asked).insert(file);
        if first_time {
            let inner = Arc::clone(self);
            self.runtime
                .spawn(async move { inner.prefetch_libraries_of(index).await });
        }
    }

    /// Fetches, at prefetch priority, the libraries ELF file `index` names that are not cached
    /// yet: each from the nearest layer providing it, this one first, then those below; then,
    /// likewise, the libraries those name (the loader loads the whole closure). A library of a
    /// layer with a prefetch plan is left to that plan.
    pub(super) async fn prefetch_libraries_of(self: Arc<Self>, index: usize) {
        // The whole first chunk (the read that led here may have returned only its start).
        let Some(first) = self.files.chunks(index).and_then(<[ChunkInfo]>::first) else {
            return;
        };
        let Some(head) = self.cache.get(&first.digest) else {
            return;
        };
        // A gzip span holds the file from its stream offset on.
        let start = self.files.record(index).map_or(0, |file| {
            file.stream_offset.saturating_sub(first.file_offset)
        });
        let head = head.slice(usize::try_from(start).unwrap_or(usize::MAX).min(head.len())..);
        let names = elf_deps::needed_libraries(&head);
        drop(head);
        if names.is_empty() {
            return;
        }
        let mut layers = vec![Arc::clone(&self)];
        layers.extend(
            self.lower
                .get()
                .into_iter()
                .flatten()
                .filter_map(Weak::upgrade),
        );
        let mut wanted: Vec<Vec<ChunkRef>> = vec![Vec::new(); layers.len()];
        let mut found = Vec::new();
        for name in &names {
            let provider = layers
                .iter()
                .enumerate()
                .find_map(|(at, layer)| Some((at, layer.library_file(name)?)));
            if let Some((at, file)) = provider {
                let layer = &layers[at];
                if layer.plan.get().is_some() {
                    continue;
                }
                found.push((at, file));
                if let Some(record) = layer.files.record(file) {
                    let all = layer.files.all_chunks();
                    let chunks = record.chunk_range().filter(|&c| {
                        all.get(c)
                            .is_some_and(|chunk| !layer.cache.contains(&chunk.digest))
                    });
                    wanted[at].extend(chunks);
                }
            }
        }
        let span = tracing::info_span!(
            "library_prefetch",
            layer = %self.layer,
            file = %self.file_name(index),
            libraries = ?found.iter().map(|&(at, file)| layers[at].file_name(file)).collect::<Vec<_>>(),
            chunks = wanted.iter().map(Vec::len).sum::<usize>()
        );
        let fetches = layers
            .iter()
            .zip(&wanted)
            .filter(|(_, chunks)| !chunks.is_empty())
            .map(|(layer, chunks)| layer.stream_lower(chunks, FetchKind::Prefetch));
        futures::future::join_all(fetches).instrument(span).await;
        for (at, file) in found {
            layers[at].prefetch_libraries_once(file);
        }
    }

    /// The regular file of this layer that provides library `name` (see
    /// [`elf_deps::provides`]) in a library directory: the exact name before a longer version.
    pub(super) fn library_file(&self, name: &str) -> Option<usize> {
        let by_name = self.library_files.get_or_init(|| {
            let mut files: Vec<u32> = (0..self.files.len())
                .filter(|&file| {
                    self.files.name(file).is_some_and(elf_deps::in_library_dir)
                        && self.file_error(file).is_none()
                })
                .filter_map(|file| u32::try_from(file).ok())
                .collect();
            files.sort_by(|&a, &b| self.base_name(a as usize).cmp(self.base_name(b as usize)));
            files
        });
        let start = by_name.partition_point(|&f| self.base_name(f as usize) < name);
        by_name[start..]
            .iter()
            .map(|&f| f as usize)
            .take_while(|&f| self.base_name(f).starts_with(name))
            .find(|&f| elf_deps::provides(self.base_name(f), name))
    }

    pub(super) fn base_name(&self, file: usize) -> &str {
        let name = self.files.name(file).unwrap_or_default();
        name.rsplit('/').next().unwrap_or(name)
    }

    pub(super) fn claims(&self) -> &Arc<ClaimTable> {
        self.opts.scheduler.claims()
    }

    /// Claims, for a fetch of `kind`, the chunks that are neither cached nor being fetched.
    pub(super) fn claim(&self, chunks: &[ChunkRef], kind: FetchKind) -> Vec<(ChunkRef, FillGuard)> {
        let mut claimed = Vec::new();
        for &at in chunks {
            let digest = &self.chunk(at).digest;
            if self.cache.contains(digest) {
                continue;
            }
            if let Some(guard) = self.claims().try_lead(digest, kind) {
                // A chunk cached between the check and the claim needs no fetch.
                if let Some(data) = self.cache.get(digest) {
                    guard.complete(Ok(data));
                } else {
                    claimed.push((at, guard));
                }
            }
        }
        claimed
    }

    /// The next batch of `chunks` from `*i` for one lower-priority request: consecutive chunks
    /// neither cached nor being fetched, spanning at most `max` compressed bytes (at least one
    /// chunk), each within [`READ_AHEAD_MAX_GAP`] of the batch's end in the blob (a request
    /// spans its batch, so a wider gap, such as the unread part of a file an optimized image's
    /// plan skips, would be sent for nothing). Advances `*i` past it.
    pub(super) fn next_batch(&self, chunks: &[ChunkRef], i: &mut usize, max: u64) -> Vec<ChunkRef> {
        let mut batch: Vec<ChunkRef> = Vec::new();
        // The compressed range the batch spans so far.
        let mut span = 0..0;
        while let Some(&at) = chunks.get(*i) {
            let c = self.chunk(at);
            if self.cache.contains(&c.digest) || self.claims().is_claimed(&c.digest) {
                *i += 1;
                if batch.is_empty() {
                    continue;
                }
                break;
            }
            if batch.is_empty() {
                span = c.compressed.clone();
            } else if c.compressed.end.saturating_sub(span.start) > max
                || c.compressed.start > span.end.saturating_add(READ_AHEAD_MAX_GAP)
            {
                break;
            } else {
                span.end = span.end.max(c.compressed.end);
            }
            batch.push(at);
            *i += 1;
        }
        batch
    }

    /// Streams `chunks` (in order) at priority `kind`: batches sized by the scheduler, each
    /// admitted before its chunks are claimed, several in flight as the window allows.
    pub(super) async fn stream_lower(self: &Arc<Self>, chunks: &[ChunkRef], kind: FetchKind) {
        let scheduler = Arc::clone(&self.opts.scheduler);
        let mut tasks = JoinSet::new();
        let mut i = 0;
        while i < chunks.len() && !self.cancel.is_cancelled() {
            let max = scheduler.lower_request_bytes();
            let batch = self.next_batch(chunks, &mut i, max);
            if batch.is_empty() {
                continue;
            }
            // What the request spans: from the batch's first chunk to its furthest end.
            let first = self.chunk(batch[0]).compressed.start;
            let bytes = batch
                .iter()
                .map(|&at| self.chunk(at).compressed.end)
                .max()
                .unwrap_or(first)
                .saturating_sub(first);
            let reservation = tokio::select! {
                r = scheduler.admit(kind, bytes) => r,
                _ = self.cancel.cancelled() => break,
            };
            let claimed = self.claim(&batch, kind);
            if claimed.is_empty() {
                continue;
            }
            let inner = Arc::clone(self);
            tasks.spawn_on(
                async move {
                    inner
                        .fetch_chunks(claimed, kind, u64::MAX, max, Some(reservation))
                        .await;
                },
                &self.runtime,
            );
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Fetches the chunks `plan` wants, in blob (landmark) order, once the prefetches queued
    /// before it are done.
    pub(super) async fn prefetch(
        self: &Arc<Self>,
        plan: &PrefetchPlan,
        ticket: scheduler::PrefetchTicket,
    ) {
        let wanted: Vec<ChunkRef> = self
            .layer_chunks
            .iter()
            .map(|&at| at as ChunkRef)
            .filter(|&at| plan.wants(self.chunk(at).compressed.start))
            .collect();
        let span = tracing::info_span!("prefetch", layer = %self.layer, start = plan.range.start, end = plan.range.end, chunks = wanted.len());
        async {
            let _turn = tokio::select! {
                turn = ticket.turn() => turn,
                _ = self.cancel.cancelled() => return,
            };
            self.stream_lower(&wanted, FetchKind::Prefetch).await;
            tracing::info!("prefetch finished");
        }
        .instrument(span)
        .await;
        drop(ticket);
    }

    /// Fetches every chunk not yet cached, lowest priority (the scheduler admits each request
    /// only after the node's startup has gone quiet, within the node-wide concurrency and
    /// bandwidth limits).
    pub(super) async fn background_fill(self: &Arc<Self>) {
        let span = tracing::info_span!("background_fill", layer = %self.layer, chunks = self.layer_chunks.len());
        async {
            self.stream_lower(&self.all_chunk_refs(), FetchKind::Background)
                .await;
            if !self.cancel.is_cancelled() {
                self.counters.background_done.store(true, Ordering::SeqCst);
                tracing::info!("background fill finished");
            }
        }
        .instrument(span)
        .await;
    }
}
