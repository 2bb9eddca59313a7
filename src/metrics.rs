//! Prometheus metrics an operator graphs: bytes fetched (on demand / prefetch / background), cache
//! hits and misses per tier, evictions, fetch and FUSE operation latency, chunk verification
//! failures and snapshotter fallbacks; one process-global registry served on an optional endpoint.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

mod http;
pub use http::{encode, serve, serve_listener, set_serving, MetricsError};

/// Why chunk bytes were fetched; the `kind` label of `lazysnap_fetched_bytes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FetchKind {
    /// A process is waiting for the bytes.
    OnDemand,
    /// The prioritized range fetched at mount.
    Prefetch,
    /// Lowest-priority fill of the rest of the layer.
    Background,
}

impl FetchKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FetchKind::OnDemand => "on_demand",
            FetchKind::Prefetch => "prefetch",
            FetchKind::Background => "background",
        }
    }
}

/// Which cache tier answered; the `tier` label of `lazysnap_cache_hits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheTier {
    /// The in-memory LRU of hot chunks.
    Memory,
    /// The on-disk chunk store.
    Disk,
}

impl CacheTier {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheTier::Memory => "memory",
            CacheTier::Disk => "disk",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerifyFailureLabels {
    layer: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HowLabel {
    how: String,
}

/// How a layer was mounted again after a restart of the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerRestore {
    /// Its FUSE connection was kept and is served again: running containers kept reading.
    Resumed,
    /// It was mounted afresh: containers started before the restart lost it.
    Remounted,
}

impl LayerRestore {
    fn label(self) -> &'static str {
        match self {
            LayerRestore::Resumed => "resumed",
            LayerRestore::Remounted => "remounted",
        }
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~100 s
    Histogram::new(exponential_buckets(0.000_05, 2.5, 16))
}

struct Metrics {
    registry: Registry,
    fetched_bytes: Family<KindLabel, Counter>,
    fetch_requests: Family<KindLabel, Counter>,
    fetch_errors: Family<ReasonLabel, Counter>,
    cache_hits: Family<TierLabel, Counter>,
    cache_misses: Counter,
    cache_evictions: Counter,
    cache_bytes: Gauge,
    fetch_latency: Family<KindLabel, Histogram, fn() -> Histogram>,
    fuse_op_latency: Family<OpLabel, Histogram, fn() -> Histogram>,
    verify_failures: Family<VerifyFailureLabels, Counter>,
    fallbacks: Family<ReasonLabel, Counter>,
    layer_restores: Family<HowLabel, Counter>,
    on_demand_wait: Histogram,
    on_demand_behind: Histogram,
    link_rate: Gauge,
    link_rtt: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Read from /proc/self when the metrics are encoded.
    process: ProcessGauges,
    /// Handles resolved once so hot paths neither allocate labels nor take the family lock.
    hot: HotHandles,
}

struct HotHandles {
    memory_hits: Counter,
    disk_hits: Counter,
    /// Per [`FetchKind`]: bytes, requests, latency.
    fetch: [(Counter, Counter, Histogram); 3],
    /// FUSE operations the filesystem issues most, by name.
    fuse_ops: Vec<(&'static str, Histogram)>,
}

/// FUSE operations whose latency histograms are resolved up front.
const COMMON_FUSE_OPS: &[&str] = &[
    "lookup",
    "getattr",
    "open",
    "read",
    "release",
    "readdir",
    "readdirplus",
    "readlink",
    "getxattr",
    "listxattr",
    "statfs",
    "opendir",
    "releasedir",
    "forget",
];

fn kind_index(kind: FetchKind) -> usize {
    match kind {
        FetchKind::OnDemand => 0,
        FetchKind::Prefetch => 1,
        FetchKind::Background => 2,
    }
}

/// Reasons of `lazysnap_fetch_errors_total` (see `fetch::error_reason` and the stream failures).
const FETCH_ERROR_REASONS: [&str; 6] = [
    "unavailable",
    "timeout",
    "not_found",
    "auth",
    "corrupt",
    "invalid",
];

/// Reasons of `lazysnap_fallbacks_total` (the snapshotter's fallback kinds).
const FALLBACK_REASONS: [&str; 4] = [
    "declined",
    "remote_failed",
    "snapshotter_error",
    "no_labels",
];

/// The standard process metrics, refreshed from /proc/self at each scrape.
#[derive(Default)]
struct ProcessGauges {
    resident_memory_bytes: Gauge,
    open_fds: Gauge,
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl ProcessGauges {
    fn refresh(&self) {
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let rss_kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<i64>().ok());
            if let Some(kib) = rss_kib {
                self.resident_memory_bytes.set(kib * 1024);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks; the command
        // name (field 2) may hold spaces, so count from the closing parenthesis.
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            let ticks: Option<u64> = stat.rsplit_once(')').and_then(|(_, rest)| {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let utime = fields.get(11)?.parse::<u64>().ok()?;
                let stime = fields.get(12)?.parse::<u64>().ok()?;
                Some(utime + stime)
            });
            let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .ok()
                .flatten()
                .filter(|&t| t > 0)
                .unwrap_or(100) as f64;
            if let Some(ticks) = ticks {
                let seconds = ticks as f64 / per_second;
                let counted = self.cpu_seconds.get();
                if seconds > counted {
                    self.cpu_seconds.inc_by(seconds - counted);
                }
            }
        }
    }
}

/// Labels of `lazysnap_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

impl Metrics {
    fn new() -> Self {
        // lazysnap's own families under `lazysnap_`, the process ones under the standard
        // `process_` names.
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("lazysnap");
        let fetched_bytes: Family<KindLabel, Counter> = Family::default();
        let fetch_requests: Family<KindLabel, Counter> = Family::default();
        let fetch_latency: Family<KindLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let cache_hits: Family<TierLabel, Counter> = Family::default();
        let fuse_op_latency: Family<OpLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let tier = |t: CacheTier| {
            cache_hits
                .get_or_create(&TierLabel {
                    tier: t.as_str().to_string(),
                })
                .clone()
        };
        let per_kind = |k: FetchKind| {
            let label = KindLabel {
                kind: k.as_str().to_string(),
            };
            (
                fetched_bytes.get_or_create(&label).clone(),
                fetch_requests.get_or_create(&label).clone(),
                fetch_latency.get_or_create(&label).clone(),
            )
        };
        let hot = HotHandles {
            memory_hits: tier(CacheTier::Memory),
            disk_hits: tier(CacheTier::Disk),
            fetch: [
                per_kind(FetchKind::OnDemand),
                per_kind(FetchKind::Prefetch),
                per_kind(FetchKind::Background),
            ],
            fuse_ops: COMMON_FUSE_OPS
                .iter()
                .map(|&op| {
                    let h = fuse_op_latency
                        .get_or_create(&OpLabel { op: op.to_string() })
                        .clone();
                    (op, h)
                })
                .collect(),
        };
        let metrics = Metrics {
            registry: Registry::default(),
            fetched_bytes,
            fetch_requests,
            fetch_errors: Family::default(),
            cache_hits,
            cache_misses: Counter::default(),
            cache_evictions: Counter::default(),
            cache_bytes: Gauge::default(),
            fetch_latency,
            fuse_op_latency,
            verify_failures: Family::default(),
            fallbacks: Family::default(),
            layer_restores: Family::default(),
            on_demand_wait: latency_histogram(),
            // 4 KiB .. 1 GiB
            on_demand_behind: Histogram::new(exponential_buckets(4096.0, 4.0, 10)),
            link_rate: Gauge::default(),
            link_rtt: Gauge::default(),
            process: ProcessGauges::default(),
            hot,
        };
        registry.register(
            "fetched_bytes",
            "Compressed bytes fetched from blob sources, by kind (on_demand, prefetch, background)",
            metrics.fetched_bytes.clone(),
        );
        registry.register(
            "fetch_requests",
            "Range requests sent to blob sources, by kind",
            metrics.fetch_requests.clone(),
        );
        registry.register(
            "fetch_errors",
            "Failed range requests, by reason (unavailable, timeout, not_found, auth, corrupt, invalid)",
            metrics.fetch_errors.clone(),
        );
        registry.register(
            "cache_hits",
            "Chunk cache hits, by tier (memory, disk)",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Chunk cache misses",
            metrics.cache_misses.clone(),
        );
        registry.register(
            "cache_evictions",
            "Chunks evicted from the disk cache",
            metrics.cache_evictions.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes of chunks stored in the disk cache",
            metrics.cache_bytes.clone(),
        );
        registry.register(
            "fetch_duration_seconds",
            "Latency of range requests to blob sources, by kind",
            metrics.fetch_latency.clone(),
        );
        registry.register(
            "fuse_op_duration_seconds",
            "Latency of FUSE operations, by op",
            metrics.fuse_op_latency.clone(),
        );
        registry.register(
            "chunk_verify_failures",
            "Chunks that failed verification, by layer and reason (digest_mismatch, undecodable); the chunk digest is in the log",
            metrics.verify_failures.clone(),
        );
        registry.register(
            "fallbacks",
            "Layers the snapshotter could not mount lazily and handed to containerd's unpack, by reason",
            metrics.fallbacks.clone(),
        );
        registry.register(
            "layer_restores",
            "Layers mounted again after a restart of the daemon: resumed (their running containers kept reading) or remounted (containers started before the restart lost them)",
            metrics.layer_restores.clone(),
        );
        registry.register(
            "on_demand_wait_seconds",
            "How long reads that missed the cache waited for the network",
            metrics.on_demand_wait.clone(),
        );
        registry.register(
            "on_demand_behind_bytes",
            "Prefetch and background bytes still in flight when an on-demand request was sent (what it may wait behind)",
            metrics.on_demand_behind.clone(),
        );
        registry.register(
            "link_estimate_bytes_per_second",
            "The fetch scheduler's estimate of the registry link's throughput",
            metrics.link_rate.clone(),
        );
        registry.register(
            "link_estimate_rtt_seconds",
            "The fetch scheduler's estimate of the registry link's round-trip time",
            metrics.link_rtt.clone(),
        );
        // Every series of a bounded label set exists from the start, at zero, so that a rate
        // or an alert on it works before the first event.
        for reason in FETCH_ERROR_REASONS {
            drop(metrics.fetch_errors.get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            }));
        }
        for reason in FALLBACK_REASONS {
            drop(metrics.fallbacks.get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            }));
        }
        for how in [LayerRestore::Resumed, LayerRestore::Remounted] {
            drop(metrics.layer_restores.get_or_create(&HowLabel {
                how: how.label().to_string(),
            }));
        }
        let build_info: Family<BuildLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                commit: env!("LAZYSNAP_GIT_COMMIT").to_string(),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; its labels say which version and git commit is running",
            build_info,
        );
        let process_registry = root.sub_registry_with_prefix("process");
        process_registry.register(
            "resident_memory_bytes",
            "Resident memory of the lazysnap process",
            metrics.process.resident_memory_bytes.clone(),
        );
        process_registry.register(
            "open_fds",
            "File descriptors the lazysnap process holds",
            metrics.process.open_fds.clone(),
        );
        process_registry.register(
            "cpu_seconds",
            "CPU time (user and system) the lazysnap process used",
            metrics.process.cpu_seconds.clone(),
        );
        Metrics {
            registry: root,
            ..metrics
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Counts `bytes` of compressed chunk data fetched for `kind`, and one request.
pub fn record_fetch(kind: FetchKind, bytes: u64, latency: Duration) {
    let (bytes_counter, requests, histogram) = &METRICS.hot.fetch[kind_index(kind)];
    bytes_counter.inc_by(bytes);
    requests.inc();
    histogram.observe(latency.as_secs_f64());
}

/// Records how long a read that missed the cache waited for the network.
pub fn record_on_demand_wait(latency: Duration) {
    METRICS.on_demand_wait.observe(latency.as_secs_f64());
}

/// Records the lower-priority bytes in flight when an on-demand request was sent.
pub fn record_on_demand_behind(bytes: u64) {
    METRICS.on_demand_behind.observe(bytes as f64);
}

/// Publishes the fetch scheduler's link estimate.
pub fn set_link_estimate(bytes_per_second: f64, rtt: Duration) {
    METRICS.link_rate.set(bytes_per_second as i64);
    METRICS.link_rtt.set(rtt.as_secs_f64());
}

/// Counts one failed range request; `reason` is a short stable word (e.g. `timeout`).
pub fn record_fetch_error(reason: &str) {
    METRICS
        .fetch_errors
        .get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        })
        .inc();
}

/// Counts one cache hit in `tier`.
pub fn record_cache_hit(tier: CacheTier) {
    match tier {
        CacheTier::Memory => METRICS.hot.memory_hits.inc(),
        CacheTier::Disk => METRICS.hot.disk_hits.inc(),
    };
}

/// Counts one cache miss.
pub fn record_cache_miss() {
    METRICS.cache_misses.inc();
}

/// Counts `count` evicted chunks.
pub fn record_evictions(count: u64) {
    METRICS.cache_evictions.inc_by(count);
}

/// Sets the bytes currently stored in the disk cache.
pub fn set_cache_bytes(bytes: u64) {
    METRICS
        .cache_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
}

/// Records how long one FUSE operation (`op` such as `read`, `lookup`) took. The FUSE crate does
/// not depend on this crate; the layer module calls this from its recorder.
pub fn observe_fuse_op(op: &str, latency: Duration) {
    let seconds = latency.as_secs_f64();
    match METRICS.hot.fuse_ops.iter().find(|(name, _)| *name == op) {
        Some((_, histogram)) => histogram.observe(seconds),
        None => METRICS
            .fuse_op_latency
            .get_or_create(&OpLabel { op: op.to_string() })
            .observe(seconds),
    }
}

/// Counts a chunk of `layer` that failed verification; `reason` is
/// [`FormatError::chunk_failure_reason`](crate::estargz::FormatError::chunk_failure_reason), so
/// a registry serving bad bytes adds no series per chunk.
pub fn record_verify_failure(layer: &str, reason: &'static str) {
    METRICS
        .verify_failures
        .get_or_create(&VerifyFailureLabels {
            layer: layer.to_string(),
            reason,
        })
        .inc();
}

/// Counts a layer mounted again after a restart of the daemon.
pub fn record_layer_restore(how: LayerRestore) {
    METRICS
        .layer_restores
        .get_or_create(&HowLabel {
            how: how.label().to_string(),
        })
        .inc();
}

/// Counts a layer the snapshotter handed back to containerd's normal unpack.
pub fn record_fallback(reason: &str) {
    METRICS
        .fallbacks
        .get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        })
        .inc();
}

#[cfg(test)]
mod tests;
