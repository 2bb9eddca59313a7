//! Bench results: per-run measurements, medians and speedups (serialized as results.json), the
//! text table printed to stdout, and a hand-written SVG bar chart (no fonts or plotting crates).

use serde::{Deserialize, Serialize};

mod render;
pub use render::{render_markdown, render_png, render_svg, render_table};

/// How the image was pulled and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// containerd's default: `ctr images pull` of the gzip image (fetch all, unpack to overlayfs).
    Overlayfs,
    /// `lazysnap pull --snapshotter lazysnap` of the eStargz image, then run through lazysnap.
    Lazysnap,
    /// The same with lazysnap's background fill off.
    #[serde(rename = "lazysnap-nobg")]
    LazysnapNoBackground,
    /// lazysnap on the image `lazysnap optimize` wrote for the workload.
    #[serde(rename = "lazysnap-opt")]
    LazysnapOptimized,
    /// `ctr-remote images rpull` through stargz-snapshotter's daemon of the image stargz's own
    /// converter (`ctr-remote image convert --estargz`) wrote.
    Stargz,
    /// stargz-snapshotter on the image `ctr-remote image optimize` wrote for the workload (its
    /// files first, then the prefetch landmark).
    #[serde(rename = "stargz-opt")]
    StargzOptimized,
    /// `soci image rpull` through SOCI's daemon of the gzip image, with the index `soci create`
    /// built.
    Soci,
    /// `lazysnap pull` of the same gzip image, read through the same SOCI index.
    #[serde(rename = "lazysnap-soci")]
    LazysnapSoci,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Overlayfs => "overlayfs",
            Mode::Lazysnap => "lazysnap",
            Mode::LazysnapNoBackground => "lazysnap-nobg",
            Mode::LazysnapOptimized => "lazysnap-opt",
            Mode::Stargz => "stargz",
            Mode::StargzOptimized => "stargz-opt",
            Mode::Soci => "soci",
            Mode::LazysnapSoci => "lazysnap-soci",
        }
    }

    /// Parses a mode name (see [`Mode::name`]).
    pub fn parse(text: &str) -> Option<Mode> {
        [
            Mode::Overlayfs,
            Mode::Lazysnap,
            Mode::LazysnapNoBackground,
            Mode::LazysnapOptimized,
            Mode::Stargz,
            Mode::StargzOptimized,
            Mode::Soci,
            Mode::LazysnapSoci,
        ]
        .into_iter()
        .find(|mode| mode.name() == text)
    }

    /// Runs through lazysnap.
    pub fn is_lazysnap(self) -> bool {
        matches!(
            self,
            Mode::Lazysnap
                | Mode::LazysnapNoBackground
                | Mode::LazysnapOptimized
                | Mode::LazysnapSoci
        )
    }

    /// Runs through stargz-snapshotter's daemon.
    pub fn is_stargz(self) -> bool {
        matches!(self, Mode::Stargz | Mode::StargzOptimized)
    }

    /// A peer lazysnap is compared with.
    pub fn is_peer(self) -> bool {
        matches!(self, Mode::Stargz | Mode::StargzOptimized | Mode::Soci)
    }

    /// Runs on an image optimized for the workload.
    pub fn is_optimized(self) -> bool {
        matches!(self, Mode::LazysnapOptimized | Mode::StargzOptimized)
    }
}

/// One cold measurement (fresh containerd, fresh lazysnap root and cache).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The pull command, from spawn to exit (overlayfs: fetch and unpack everything).
    pub pull_secs: f64,
    /// `ctr containers create`: the container and its writable snapshot (0 in results saved
    /// before it was timed apart, where `run_secs` includes it).
    #[serde(default)]
    pub create_secs: f64,
    /// `ctr tasks start` from spawn until the workload's ready line appeared (the start and the
    /// workload's reads).
    pub run_secs: f64,
    /// `pull_secs + create_secs + run_secs`.
    pub total_secs: f64,
    /// Body bytes the registry served (GETs) from the start of the pull until the ready line.
    pub fetched_bytes: u64,
    /// Body bytes the registry served from the start of the pull until the snapshotter was
    /// stopped (the workload exited; after the warm start too with `--warm`).
    #[serde(default)]
    pub fetched_all_bytes: Option<u64>,
    /// The container printed the ready line and exited 0.
    pub ready: bool,
    /// Layers `lazysnap pull` reported as lazy (mounted remotely); `None` for overlayfs.
    pub lazy_layers: Option<usize>,
    /// Layers in the image.
    pub layers: usize,
    /// Peak resident memory of the snapshotter daemon over the run (its VmHWM), in bytes;
    /// `None` for overlayfs (containerd's own) or where it could not be read.
    #[serde(default)]
    pub snapshotter_peak_rss: Option<u64>,
    /// With `--warm`: create + run to ready of the same workload started again after this run,
    /// on the same node (image, snapshots and caches kept).
    #[serde(default)]
    pub warm_run_secs: Option<f64>,
}

/// Medians over the runs of one mode on one link, and the spread of the total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub pull_secs: f64,
    #[serde(default)]
    pub create_secs: f64,
    pub run_secs: f64,
    pub total_secs: f64,
    pub fetched_bytes: u64,
    /// The fastest and the slowest run's total.
    #[serde(default)]
    pub total_min_secs: f64,
    #[serde(default)]
    pub total_max_secs: f64,
    /// The highest peak RSS of the snapshotter daemon over the runs, where measured.
    #[serde(default)]
    pub snapshotter_peak_rss: Option<u64>,
    /// Median of the warm runs' create + run, where measured.
    #[serde(default)]
    pub warm_run_secs: Option<f64>,
    /// Median of the runs' bytes in all, where measured.
    #[serde(default)]
    pub fetched_all_bytes: Option<u64>,
}

impl Summary {
    /// Per-field medians of `runs` (zeros when empty).
    pub fn of(runs: &[RunResult]) -> Self {
        let totals = || runs.iter().map(|r| r.total_secs).filter(|t| t.is_finite());
        Self {
            pull_secs: median(runs.iter().map(|r| r.pull_secs).collect()),
            create_secs: median(runs.iter().map(|r| r.create_secs).collect()),
            run_secs: median(runs.iter().map(|r| r.run_secs).collect()),
            total_secs: median(runs.iter().map(|r| r.total_secs).collect()),
            fetched_bytes: median(runs.iter().map(|r| r.fetched_bytes as f64).collect()).round()
                as u64,
            total_min_secs: totals().reduce(f64::min).unwrap_or(0.0),
            total_max_secs: totals().reduce(f64::max).unwrap_or(0.0),
            snapshotter_peak_rss: runs.iter().filter_map(|r| r.snapshotter_peak_rss).max(),
            warm_run_secs: {
                let warm: Vec<f64> = runs.iter().filter_map(|r| r.warm_run_secs).collect();
                (!warm.is_empty()).then(|| median(warm))
            },
            fetched_all_bytes: {
                let all: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.fetched_all_bytes)
                    .map(|b| b as f64)
                    .collect();
                (!all.is_empty()).then(|| median(all).round() as u64)
            },
        }
    }
}

/// One mode on one link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeResult {
    pub link: String,
    pub mode: Mode,
    pub runs: Vec<RunResult>,
    pub median: Summary,
    /// overlayfs median total divided by this mode's median total, on the same link.
    pub speedup: Option<f64>,
    /// For a lazysnap mode: its median total divided by that of the fastest peer (stargz, soci)
    /// on the same link, below 1 when lazysnap is faster; `None` for peers or without one.
    #[serde(default)]
    pub vs_best_peer: Option<f64>,
    /// Its median total divided by the ideal start on the same link (see
    /// [`BenchReport::ideal_bytes`]); `None` on an unshaped link or without a record.
    #[serde(default)]
    pub vs_ideal: Option<f64>,
}

/// The image the bench ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageReport {
    /// gzip image as containerd's default pull sees it.
    pub gzip_reference: String,
    /// eStargz image pulled lazily.
    pub estargz_reference: String,
    pub layers: usize,
    /// Bytes of file content in the app layer and how many files.
    pub app_bytes: u64,
    pub app_files: usize,
    /// Sum of compressed layer sizes.
    pub gzip_bytes: u64,
    pub estargz_bytes: u64,
    /// The container's command.
    pub workload: Vec<String>,
    /// Paths given to the converter as the prefetch list (empty: none).
    pub prefetch_list: Vec<String>,
    /// `lazysnap convert` (the binary) or `builtin` (the in-process eStargz writer, used when the
    /// binary could not convert; see `notes`).
    pub converter: String,
}

/// Everything one `lazysnap bench` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub lazysnap_version: String,
    /// Unix seconds when the bench finished.
    pub finished_unix: u64,
    pub runs_per_mode: usize,
    pub image: ImageReport,
    /// Where containerd and lazysnap kept their state (a disk path makes unpacking slower).
    pub state_dir: String,
    /// lazysnap's background fill setting during the runs.
    pub background_fill: bool,
    /// What an ideal lazy start fetches: the compressed bytes of the chunks the workload reads
    /// plus every layer's footer and TOC, from `lazysnap optimize`'s record (with
    /// `--optimized`). On a link of rate R and round trip T the ideal start takes these bytes
    /// ÷ R + 3 T (the manifest, then the TOCs, then the data: three dependent requests).
    #[serde(default)]
    pub ideal_bytes: Option<u64>,
    pub results: Vec<ModeResult>,
    /// Anything the reader should know (fallbacks, warnings).
    pub notes: Vec<String>,
}

/// The median of `values` (mean of the middle two for an even count; 0 when empty).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Fills in each result's speedup against the overlayfs result on the same link, and each
/// lazysnap result's ratio to the fastest peer there.
pub fn compute_ratios(results: &mut [ModeResult]) {
    compute_speedups(results);
    compute_peer_ratios(results);
}

/// Seconds an ideal lazy start of `bytes` takes on a link of `rate_bits_per_sec` and `rtt` (see
/// [`BenchReport::ideal_bytes`]); `None` for an unshaped link, where it is no bound.
pub fn ideal_secs(
    bytes: u64,
    rate_bits_per_sec: Option<u64>,
    rtt: std::time::Duration,
) -> Option<f64> {
    let rate = rate_bits_per_sec.filter(|&r| r > 0)? as f64 / 8.0;
    Some(bytes as f64 / rate + 3.0 * rtt.as_secs_f64())
}

/// Sets each result's ratio to the ideal start of its link, given as `(link label, seconds)`.
pub fn compute_ideal_ratios(results: &mut [ModeResult], ideal: &[(String, f64)]) {
    for result in results.iter_mut() {
        result.vs_ideal = ideal
            .iter()
            .find(|(link, secs)| *link == result.link && *secs > 0.0)
            .map(|(_, secs)| result.median.total_secs / secs);
    }
}

fn compute_speedups(results: &mut [ModeResult]) {
    let baselines: Vec<(String, f64)> = results
        .iter()
        .filter(|r| r.mode == Mode::Overlayfs)
        .map(|r| (r.link.clone(), r.median.total_secs))
        .collect();
    for result in results.iter_mut() {
        result.speedup = baselines
            .iter()
            .find(|(link, _)| *link == result.link)
            .and_then(|(_, base)| {
                (result.median.total_secs > 0.0).then(|| base / result.median.total_secs)
            });
    }
}

/// Each lazysnap mode's median against the fastest peer on its link: an optimized image's
/// against every peer, an unoptimized one's against the peers on unoptimized images only (an
/// optimized peer is not the same contest).
fn compute_peer_ratios(results: &mut [ModeResult]) {
    let peers: Vec<(String, bool, f64)> = results
        .iter()
        .filter(|r| r.mode.is_peer() && r.median.total_secs > 0.0)
        .map(|r| (r.link.clone(), r.mode.is_optimized(), r.median.total_secs))
        .collect();
    for result in results.iter_mut() {
        result.vs_best_peer = if result.mode.is_lazysnap() {
            peers
                .iter()
                .filter(|(link, optimized, _)| {
                    *link == result.link && (result.mode.is_optimized() || !optimized)
                })
                .map(|(_, _, total)| *total)
                .reduce(f64::min)
                .map(|best| result.median.total_secs / best)
        } else {
            None
        };
    }
}

#[cfg(test)]
mod tests;
