//! The node-wide fetch scheduler: one per daemon, shared by every layer of every image. It owns
//! the claims on chunks being fetched, the strict priority on-demand > prefetch > background,
//! and the link estimate (round-trip time, throughput) that bounds lower-priority traffic.
//!
//! Priority on a shared narrow link is a matter of what is already in flight: a read the kernel
//! waits for shares the link with every byte requested before it. So prefetch and background
//! requests are admitted only while the bytes they have in flight stay within a window of about
//! two round trips of data at the estimated rate ([`FetchScheduler::window`]), and are sized to
//! half of it; an on-demand request never waits for admission, and a chunk it needs that a lower
//! stream has claimed but not delivered in time ([`FetchScheduler::overtake_patience`]) is
//! fetched again by its own request ([`ClaimTable`]). Background fill in
//! addition waits until no on-demand read has missed the cache for `quiet_period` and every
//! queued prefetch has finished, runs at most `background_concurrency` requests node-wide, and
//! keeps to `background_bandwidth`. Layer prefetches take turns in the order they were queued
//! (mount order, base layer first), each streaming its prioritized range in landmark order.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::claims::ClaimTable;
use crate::metrics::{self, FetchKind};

/// Settings of a [`FetchScheduler`].
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Background fill starts only after no on-demand read has missed the cache (and no layer
    /// was mounted) for this long.
    pub quiet_period: Duration,
    /// Background requests in flight at once, across all layers.
    pub background_concurrency: usize,
    /// Background bytes per second across all layers (`None`: unlimited).
    pub background_bandwidth: Option<u64>,
    /// Smallest window of lower-priority bytes in flight (also the window before any estimate);
    /// lower-priority requests carry half the window.
    pub min_window: u64,
    /// Largest window of lower-priority bytes in flight.
    pub max_window: u64,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            quiet_period: Duration::from_secs(5),
            background_concurrency: 2,
            background_bandwidth: None,
            min_window: 256 << 10,
            max_window: 32 << 20,
        }
    }
}

/// [`FetchScheduler::overtake_patience`] before any estimate (plus the chunk's bytes at
/// [`ASSUMED_SLOW_RATE`]), and at most.
const DEFAULT_OVERTAKE_PATIENCE: Duration = Duration::from_secs(1);
/// Bytes/s a link is taken to carry before the scheduler has estimated it (about 8 Mbit/s).
const ASSUMED_SLOW_RATE: f64 = 1_000_000.0;
const MAX_OVERTAKE_PATIENCE: Duration = Duration::from_secs(10);

/// Bounds of [`FetchScheduler::readahead_bytes`].
const MIN_READ_AHEAD: u64 = 32 << 10;
const MAX_READ_AHEAD: u64 = 512 << 10;

/// See the module documentation.
pub struct FetchScheduler {
    opts: SchedulerOptions,
    claims: Arc<ClaimTable>,
    /// On-demand reads waiting for the network now.
    on_demand: AtomicUsize,
    state: Mutex<State>,
    /// Woken whenever something lower-priority admission depends on changes.
    changed: Notify,
    background_slots: Arc<Semaphore>,
    /// Layer prefetches take turns through this (tokio's mutex is fair: first queued, first in).
    prefetch_turns: Arc<tokio::sync::Mutex<()>>,
    /// Compressed bytes received by every request so far (aggregate throughput samples).
    received: AtomicU64,
}

struct State {
    /// When an on-demand read last missed the cache or a layer was last mounted.
    last_activity: Instant,
    /// Prefetch and background bytes requested and not yet received.
    lower_in_flight: u64,
    /// Layer prefetches queued or running.
    prefetches: usize,
    /// When the background bandwidth budget next allows a request.
    bandwidth_next: Option<Instant>,
    link: LinkEstimate,
}

/// Round-trip time and throughput of the path to the registry, from the requests themselves.
#[derive(Debug, Clone, Copy, Default)]
struct LinkEstimate {
    /// Seconds; a low-biased average of times to first byte (queueing behind other traffic
    /// inflates single samples).
    rtt: Option<f64>,
    /// Bytes per second delivered to all requests together while a request was receiving.
    rate: Option<f64>,
}

impl std::fmt::Debug for FetchScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchScheduler")
            .field("opts", &self.opts)
            .field("on_demand", &self.on_demand_in_flight())
            .field("lower_in_flight", &self.lower_in_flight())
            .finish_non_exhaustive()
    }
}

static GLOBAL: LazyLock<Arc<FetchScheduler>> =
    LazyLock::new(|| FetchScheduler::new(SchedulerOptions::default()));

impl FetchScheduler {
    pub fn new(opts: SchedulerOptions) -> Arc<Self> {
        Arc::new(Self {
            background_slots: Arc::new(Semaphore::new(opts.background_concurrency.max(1))),
            opts,
            claims: Arc::default(),
            on_demand: AtomicUsize::new(0),
            state: Mutex::new(State {
                last_activity: Instant::now(),
                lower_in_flight: 0,
                prefetches: 0,
                bandwidth_next: None,
                link: LinkEstimate::default(),
            }),
            changed: Notify::new(),
            prefetch_turns: Arc::default(),
            received: AtomicU64::new(0),
        })
    }

    /// The process-wide scheduler with default settings (tools and tests that do not build one).
    pub fn global() -> Arc<Self> {
        Arc::clone(&GLOBAL)
    }

    pub fn options(&self) -> &SchedulerOptions {
        &self.opts
    }

    /// The claims on chunks being fetched.
    pub fn claims(&self) -> &Arc<ClaimTable> {
        &self.claims
    }

    fn state(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// Marks one on-demand read as waiting for the network until the guard drops; restarts the
    /// quiet period.
    pub fn on_demand(self: &Arc<Self>) -> OnDemandGuard {
        self.on_demand.fetch_add(1, Ordering::SeqCst);
        self.note_activity();
        OnDemandGuard {
            scheduler: Arc::clone(self),
            started: Instant::now(),
        }
    }

    /// On-demand reads waiting for the network now.
    pub fn on_demand_in_flight(&self) -> usize {
        self.on_demand.load(Ordering::SeqCst)
    }

    /// Restarts the quiet period that background fill waits for (a layer was mounted, a read
    /// missed the cache).
    pub fn note_activity(&self) {
        self.state().last_activity = Instant::now();
    }

    /// Prefetch and background bytes requested and not yet received.
    pub fn lower_in_flight(&self) -> u64 {
        self.state().lower_in_flight
    }

    /// The lower-priority bytes allowed in flight: about two round trips of data at the
    /// estimated rate, within the configured bounds.
    pub fn window(&self) -> u64 {
        let link = self.state().link;
        self.window_of(&link)
    }

    fn window_of(&self, link: &LinkEstimate) -> u64 {
        let min = self.opts.min_window.max(1);
        match (link.rtt, link.rate) {
            (Some(rtt), Some(rate)) => {
                ((2.0 * rtt * rate) as u64).clamp(min, self.opts.max_window.max(min))
            }
            _ => min,
        }
    }

    /// How many bytes one prefetch or background request should carry (at least one chunk is
    /// always sent): half the window, so two requests keep the link busy.
    pub fn lower_request_bytes(&self) -> u64 {
        (self.window() / 2).max(1)
    }

    /// How many compressed bytes a miss may fetch beyond what was asked for: about one
    /// bandwidth-delay product (what one round trip saved is worth), within 32..512 KiB.
    pub fn readahead_bytes(&self) -> u64 {
        let link = self.state().link;
        let bdp = match (link.rtt, link.rate) {
            (Some(rtt), Some(rate)) => (rtt * rate) as u64,
            _ => 0,
        };
        bdp.clamp(MIN_READ_AHEAD, MAX_READ_AHEAD)
    }

    /// How long an on-demand read follows a lower-priority stream that holds its chunk (of
    /// `bytes` compressed) before fetching it itself: twice what its own request would take.
    /// The stream is usually about to deliver it (a prefetch streams files in the order the
    /// workload reads them), and a second copy would share the link with the first; only a
    /// stalled stream is worth overtaking.
    pub fn overtake_patience(&self, bytes: u64) -> Duration {
        let link = self.state().link;
        let secs = match (link.rtt, link.rate) {
            (Some(rtt), Some(rate)) if rate > 0.0 => 2.0 * (rtt + bytes as f64 / rate),
            // No estimate yet (the first fetches after a mount): assume a slow link, or a
            // stream that is delivering a large chunk would be overtaken and the chunk sent
            // twice over the link both share.
            _ => DEFAULT_OVERTAKE_PATIENCE.as_secs_f64() + bytes as f64 / ASSUMED_SLOW_RATE,
        };
        Duration::from_secs_f64(secs.clamp(0.05, MAX_OVERTAKE_PATIENCE.as_secs_f64()))
    }

    /// Queues a layer's prefetch; background fill waits while any is queued or running.
    pub fn queue_prefetch(self: &Arc<Self>) -> PrefetchTicket {
        self.state().prefetches += 1;
        PrefetchTicket {
            scheduler: Arc::clone(self),
        }
    }

    /// Waits for room in the window for a request of `bytes` of kind `kind`, and reserves it
    /// until the bytes are received or the reservation drops. On-demand requests are admitted at
    /// once and reserve nothing. Background requests also wait for a node-wide slot, for the
    /// quiet period, for every queued prefetch to finish and for the bandwidth budget.
    pub async fn admit(self: &Arc<Self>, kind: FetchKind, bytes: u64) -> Reservation {
        let permit = match kind {
            FetchKind::OnDemand => return self.reservation(0, None),
            FetchKind::Prefetch => None,
            FetchKind::Background => {
                let Ok(permit) = Arc::clone(&self.background_slots).acquire_owned().await else {
                    return self.reservation(0, None);
                };
                self.throttle(bytes).await;
                Some(permit)
            }
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut state = self.state();
                let wake_at = match kind {
                    FetchKind::Background => self.background_blocked(&state),
                    _ => None,
                };
                let fits = state.lower_in_flight == 0
                    || state.lower_in_flight.saturating_add(bytes) <= self.window_of(&state.link);
                match wake_at {
                    None if fits => {
                        state.lower_in_flight += bytes;
                        return self.reservation(bytes, permit);
                    }
                    other => other,
                }
            };
            match wake_at {
                Some(Some(at)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = &mut notified => {}
                    }
                }
                _ => notified.await,
            }
        }
    }

    /// Why background fill may not send now: `Some(Some(t))` wait until `t` (the quiet period),
    /// `Some(None)` wait for a change, `None` it may.
    fn background_blocked(&self, state: &State) -> Option<Option<Instant>> {
        if self.on_demand_in_flight() > 0 || state.prefetches > 0 {
            return Some(None);
        }
        let quiet_until = state.last_activity + self.opts.quiet_period;
        (Instant::now() < quiet_until).then_some(Some(quiet_until))
    }

    fn reservation(
        self: &Arc<Self>,
        bytes: u64,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Reservation {
        Reservation {
            scheduler: Arc::clone(self),
            remaining: AtomicU64::new(bytes),
            _permit: permit,
        }
    }

    /// Waits out the background bandwidth budget for `bytes`.
    async fn throttle(&self, bytes: u64) {
        let Some(rate) = self.opts.background_bandwidth.filter(|&r| r > 0) else {
            return;
        };
        let start = {
            let mut state = self.state();
            let now = Instant::now();
            let start = state.bandwidth_next.map_or(now, |n| n.max(now));
            state.bandwidth_next =
                Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
            start
        };
        tokio::time::sleep_until(start).await;
    }

    fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        {
            let mut state = self.state();
            state.lower_in_flight = state.lower_in_flight.saturating_sub(bytes);
        }
        self.changed.notify_waiters();
    }

    /// Starts measuring one range request of `kind` (for the link estimate and the metrics).
    pub fn request(self: &Arc<Self>, kind: FetchKind) -> RequestProbe {
        if kind == FetchKind::OnDemand {
            metrics::record_on_demand_behind(self.lower_in_flight());
        }
        RequestProbe {
            scheduler: Arc::clone(self),
            sent: Instant::now(),
            first_byte: None,
            bytes: 0,
        }
    }

    fn observe(&self, rtt: Option<Duration>, rate: Option<f64>) {
        let link = {
            let mut state = self.state();
            let link = &mut state.link;
            if let Some(sample) = rtt.map(|d| d.as_secs_f64()) {
                link.rtt = Some(match link.rtt {
                    Some(old) if sample >= old => old + (sample - old) / 16.0,
                    Some(old) => old + (sample - old) / 2.0,
                    None => sample,
                });
            }
            if let Some(sample) = rate {
                link.rate = Some(link.rate.map_or(sample, |old| old + (sample - old) / 4.0));
            }
            *link
        };
        if let (Some(rtt), Some(rate)) = (link.rtt, link.rate) {
            metrics::set_link_estimate(rate, Duration::from_secs_f64(rtt));
        }
        self.changed.notify_waiters();
    }
}

/// See [`FetchScheduler::on_demand`].
pub struct OnDemandGuard {
    scheduler: Arc<FetchScheduler>,
    started: Instant,
}

impl Drop for OnDemandGuard {
    fn drop(&mut self) {
        metrics::record_on_demand_wait(self.started.elapsed());
        self.scheduler.note_activity();
        if self.scheduler.on_demand.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.scheduler.changed.notify_waiters();
        }
    }
}

/// A layer's place in the prefetch queue; see [`FetchScheduler::queue_prefetch`].
pub struct PrefetchTicket {
    scheduler: Arc<FetchScheduler>,
}

impl PrefetchTicket {
    /// Waits until the prefetches queued before this one are done; the turn lasts until the
    /// returned guard drops.
    pub async fn turn(&self) -> tokio::sync::OwnedMutexGuard<()> {
        Arc::clone(&self.scheduler.prefetch_turns)
            .lock_owned()
            .await
    }
}

impl Drop for PrefetchTicket {
    fn drop(&mut self) {
        {
            let mut state = self.scheduler.state();
            state.prefetches = state.prefetches.saturating_sub(1);
        }
        self.scheduler.changed.notify_waiters();
    }
}

/// Window bytes reserved for one admitted request; released as its bytes arrive.
pub struct Reservation {
    scheduler: Arc<FetchScheduler>,
    remaining: AtomicU64,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Reservation {
    /// `bytes` of the request arrived.
    pub fn received(&self, bytes: u64) {
        let mut released = 0;
        let _ = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                released = left.min(bytes);
                Some(left - released)
            });
        self.scheduler.release(released);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.scheduler
            .release(self.remaining.swap(0, Ordering::SeqCst));
    }
}

/// Measures one range request: time to first byte and the aggregate rate while it received.
pub struct RequestProbe {
    scheduler: Arc<FetchScheduler>,
    sent: Instant,
    /// When the first byte came and the node-wide received count then.
    first_byte: Option<(Instant, u64)>,
    bytes: u64,
}

/// Transfers shorter than this or smaller than [`MIN_RATE_SAMPLE_BYTES`] say little about
/// throughput.
const MIN_RATE_SAMPLE_TIME: Duration = Duration::from_millis(20);
const MIN_RATE_SAMPLE_BYTES: u64 = 32 << 10;

impl RequestProbe {
    /// `bytes` arrived.
    pub fn received(&mut self, bytes: u64) {
        if self.first_byte.is_none() {
            let rtt = self.sent.elapsed();
            self.first_byte = Some((
                Instant::now(),
                self.scheduler.received.load(Ordering::Relaxed),
            ));
            self.scheduler.observe(Some(rtt), None);
        }
        self.bytes += bytes;
        self.scheduler.received.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Time since the request was sent.
    pub fn elapsed(&self) -> Duration {
        self.sent.elapsed()
    }
}

impl Drop for RequestProbe {
    fn drop(&mut self) {
        let Some((first, received_then)) = self.first_byte else {
            return;
        };
        let transfer = first.elapsed();
        if transfer < MIN_RATE_SAMPLE_TIME || self.bytes < MIN_RATE_SAMPLE_BYTES {
            return;
        }
        let delivered = self.scheduler.received.load(Ordering::Relaxed) - received_then;
        self.scheduler
            .observe(None, Some(delivered as f64 / transfer.as_secs_f64()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(quiet: Duration) -> Arc<FetchScheduler> {
        FetchScheduler::new(SchedulerOptions {
            quiet_period: quiet,
            background_concurrency: 1,
            ..SchedulerOptions::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn prefetch_waits_for_room_in_the_window() {
        let s = scheduler(Duration::ZERO);
        let window = s.window();
        let first = s.admit(FetchKind::Prefetch, window).await;
        let second = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.admit(FetchKind::Prefetch, 1024).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!second.is_finished(), "the window is full");
        first.received(window - 512);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(second.is_finished());
        // A request larger than the window still goes when nothing else is in flight.
        drop(first);
        drop(second.await.unwrap());
        let big = s.admit(FetchKind::Prefetch, window * 10).await;
        assert_eq!(s.lower_in_flight(), window * 10);
        drop(big);
        assert_eq!(s.lower_in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn background_waits_for_quiet_prefetch_and_on_demand() {
        let s = scheduler(Duration::from_secs(5));
        let ticket = s.queue_prefetch();
        let background = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.admit(FetchKind::Background, 1024).await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!background.is_finished(), "a prefetch is queued");
        drop(ticket);
        let reading = s.on_demand();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!background.is_finished(), "an on-demand read is waiting");
        drop(reading);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!background.is_finished(), "within the quiet period");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(background.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn background_concurrency_is_node_wide() {
        let s = scheduler(Duration::ZERO);
        let first = s.admit(FetchKind::Background, 1).await;
        let second = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.admit(FetchKind::Background, 1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!second.is_finished(), "one slot");
        drop(first);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(second.is_finished());
    }

    #[test]
    fn the_window_follows_the_link_estimate() {
        let s = scheduler(Duration::ZERO);
        assert_eq!(s.window(), s.opts.min_window);
        // 10 Mbit/s, 100 ms: two round trips of data is 250 kB, under the minimum.
        s.observe(Some(Duration::from_millis(100)), Some(1_250_000.0));
        assert_eq!(s.window(), s.opts.min_window);
        // 100 Mbit/s, 20 ms: 500 kB.
        let s = scheduler(Duration::ZERO);
        s.observe(Some(Duration::from_millis(20)), Some(12_500_000.0));
        assert_eq!(s.window(), 500_000);
        assert_eq!(s.lower_request_bytes(), 250_000);
    }
}
