//! Claims on chunks being fetched, node-wide (singleflight): one fetch per chunk however many
//! layers and readers want it, each claim marked with the priority it is fetched at, so that an
//! on-demand reader can overtake a chunk a prefetch or background stream has claimed but not yet
//! delivered by fetching it with a request of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::estargz::ChunkDigest;
use crate::metrics::FetchKind;

/// Why a claim ended without data; shared by every reader that waited for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillError {
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("chunk failed verification: {0}")]
    Verify(String),
    #[error("the fetching task went away before finishing")]
    Abandoned,
}

type FillSender = oneshot::Sender<Result<Bytes, FillError>>;

struct Claim {
    /// Tells guards of an ended claim apart from those of a newer claim on the same chunk.
    id: u64,
    /// The most urgent kind of reader waiting for it.
    kind: FetchKind,
    /// Guards still fetching it; the claim fails only when the last one gives up.
    fetchers: u32,
    waiters: Vec<FillSender>,
}

/// The chunks being fetched now, by digest.
#[derive(Default)]
pub struct ClaimTable {
    claims: Mutex<(u64, HashMap<ChunkDigest, Claim>)>,
}

/// Result of [`ClaimTable::claim`].
pub enum Claimed {
    /// Nobody was fetching it: this caller fetches it and completes the guard.
    Leader(FillGuard, FillWaiter),
    /// A fetch at this priority or a more urgent one is under way: wait for it.
    Follower(FillWaiter),
    /// A lower-priority fetch holds it: this caller may fetch it too, at its own priority (the
    /// first good copy ends the claim for every waiter), or drop the guard and wait.
    Overtake(FillGuard, FillWaiter),
}

/// Priority order of fetch kinds: a larger rank is more urgent.
pub fn rank(kind: FetchKind) -> u8 {
    match kind {
        FetchKind::Background => 0,
        FetchKind::Prefetch => 1,
        FetchKind::OnDemand => 2,
    }
}

impl ClaimTable {
    fn lock(&self) -> MutexGuard<'_, (u64, HashMap<ChunkDigest, Claim>)> {
        crate::sync::lock(&self.claims)
    }

    /// Joins or starts the fetch of `digest` for a reader of priority `kind`.
    pub fn claim(self: &Arc<Self>, digest: &ChunkDigest, kind: FetchKind) -> Claimed {
        let (tx, rx) = oneshot::channel();
        let waiter = FillWaiter(rx);
        let mut guard = self.lock();
        let (next_id, claims) = &mut *guard;
        match claims.get_mut(digest) {
            Some(claim) if rank(kind) > rank(claim.kind) => {
                claim.kind = kind;
                claim.fetchers += 1;
                claim.waiters.push(tx);
                let id = claim.id;
                Claimed::Overtake(self.guard(digest, id), waiter)
            }
            Some(claim) => {
                claim.waiters.push(tx);
                Claimed::Follower(waiter)
            }
            None => {
                let guard = self.start(next_id, claims, digest, kind, vec![tx]);
                Claimed::Leader(guard, waiter)
            }
        }
    }

    /// Claims `digest` for a fetch of priority `kind` only if nobody holds it (no waiter).
    pub fn try_lead(self: &Arc<Self>, digest: &ChunkDigest, kind: FetchKind) -> Option<FillGuard> {
        let mut guard = self.lock();
        let (next_id, claims) = &mut *guard;
        if claims.contains_key(digest) {
            return None;
        }
        Some(self.start(next_id, claims, digest, kind, Vec::new()))
    }

    /// Records a new claim on `digest` (under the table's lock) and returns its one fetcher.
    fn start(
        self: &Arc<Self>,
        next_id: &mut u64,
        claims: &mut HashMap<ChunkDigest, Claim>,
        digest: &ChunkDigest,
        kind: FetchKind,
        waiters: Vec<FillSender>,
    ) -> FillGuard {
        *next_id += 1;
        let id = *next_id;
        claims.insert(
            *digest,
            Claim {
                id,
                kind,
                fetchers: 1,
                waiters,
            },
        );
        self.guard(digest, id)
    }

    /// Whether a fetch of the chunk is under way.
    pub fn is_claimed(&self, digest: &ChunkDigest) -> bool {
        self.lock().1.contains_key(digest)
    }

    fn guard(self: &Arc<Self>, digest: &ChunkDigest, id: u64) -> FillGuard {
        FillGuard {
            table: Arc::clone(self),
            digest: *digest,
            id,
            finished: false,
        }
    }

    /// A fetcher of claim `id` is done: good data ends the claim for everyone; a failure ends it
    /// only when no other fetcher is left.
    fn finish(&self, digest: &ChunkDigest, id: u64, result: Result<Bytes, FillError>) {
        let waiters = {
            let mut guard = self.lock();
            let claims = &mut guard.1;
            match claims.get_mut(digest) {
                Some(claim) if claim.id == id => {
                    claim.fetchers = claim.fetchers.saturating_sub(1);
                    if result.is_ok() || claim.fetchers == 0 {
                        claims.remove(digest).map(|c| c.waiters).unwrap_or_default()
                    } else {
                        Vec::new()
                    }
                }
                _ => Vec::new(),
            }
        };
        for tx in waiters {
            let _ = tx.send(result.clone());
        }
    }
}

/// Held by a caller fetching a claimed chunk. Dropping it without [`FillGuard::complete`] counts
/// as [`FillError::Abandoned`].
pub struct FillGuard {
    table: Arc<ClaimTable>,
    digest: ChunkDigest,
    id: u64,
    finished: bool,
}

impl FillGuard {
    /// Hands the verified chunk (or why there is none) to the waiters. The caller stores the
    /// chunk in the cache before completing, so that later readers hit it.
    pub fn complete(mut self, result: Result<Bytes, FillError>) {
        self.finished = true;
        self.table.finish(&self.digest, self.id, result);
    }

    /// The chunk this guard fetches.
    pub fn digest(&self) -> ChunkDigest {
        self.digest
    }

    /// Whether the claim is still waiting for data (no fetcher delivered it yet).
    pub fn is_pending(&self) -> bool {
        self.table
            .lock()
            .1
            .get(&self.digest)
            .is_some_and(|claim| claim.id == self.id)
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.table
                .finish(&self.digest, self.id, Err(FillError::Abandoned));
        }
    }
}

/// Receives the result of a claim.
pub struct FillWaiter(oneshot::Receiver<Result<Bytes, FillError>>);

impl FillWaiter {
    /// Waits for the claim's result.
    pub async fn wait(self) -> Result<Bytes, FillError> {
        self.0.await.unwrap_or(Err(FillError::Abandoned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> ChunkDigest {
        ChunkDigest::of(&[n])
    }

    #[tokio::test]
    async fn leader_and_followers_share_one_result() {
        let table = Arc::new(ClaimTable::default());
        let Claimed::Leader(guard, first) = table.claim(&digest(1), FetchKind::OnDemand) else {
            panic!("first claim leads");
        };
        let Claimed::Follower(second) = table.claim(&digest(1), FetchKind::Prefetch) else {
            panic!("a less urgent reader follows");
        };
        assert!(table.is_claimed(&digest(1)));
        guard.complete(Ok(Bytes::from_static(b"data")));
        assert_eq!(first.wait().await.unwrap(), "data");
        assert_eq!(second.wait().await.unwrap(), "data");
        assert!(!table.is_claimed(&digest(1)));
    }

    #[tokio::test]
    async fn an_on_demand_reader_overtakes_a_background_claim_and_the_first_copy_wins() {
        let table = Arc::new(ClaimTable::default());
        let background = table.try_lead(&digest(2), FetchKind::Background).unwrap();
        let Claimed::Overtake(own, waiter) = table.claim(&digest(2), FetchKind::OnDemand) else {
            panic!("on-demand overtakes background");
        };
        // Once overtaken, later readers follow the on-demand fetch.
        assert!(matches!(
            table.claim(&digest(2), FetchKind::OnDemand),
            Claimed::Follower(_)
        ));
        // The slow stream failing does not fail the reader while its own fetch is alive.
        background.complete(Err(FillError::Fetch("reset".into())));
        assert!(table.is_claimed(&digest(2)));
        own.complete(Ok(Bytes::from_static(b"mine")));
        assert_eq!(waiter.wait().await.unwrap(), "mine");
        assert!(!table.is_claimed(&digest(2)));
    }

    #[tokio::test]
    async fn a_late_guard_of_an_ended_claim_leaves_a_newer_claim_alone() {
        let table = Arc::new(ClaimTable::default());
        let old = table.try_lead(&digest(3), FetchKind::Prefetch).unwrap();
        let Claimed::Overtake(own, _) = table.claim(&digest(3), FetchKind::OnDemand) else {
            panic!("overtake");
        };
        own.complete(Ok(Bytes::from_static(b"x")));
        let Claimed::Leader(_new, waiter) = table.claim(&digest(3), FetchKind::OnDemand) else {
            panic!("a new claim");
        };
        drop(old);
        assert!(
            table.is_claimed(&digest(3)),
            "the old guard must not end the new claim"
        );
        drop(_new);
        assert_eq!(waiter.wait().await, Err(FillError::Abandoned));
    }
}
