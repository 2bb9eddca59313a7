//! Bench results: per-run measurements, medians and speedups (serialized as results.json), the
//! text table printed to stdout, and a hand-written SVG bar chart (no fonts or plotting crates).

use serde::{Deserialize, Serialize};

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
        ]
        .into_iter()
        .find(|mode| mode.name() == text)
    }

    /// Runs through lazysnap.
    pub fn is_lazysnap(self) -> bool {
        matches!(
            self,
            Mode::Lazysnap | Mode::LazysnapNoBackground | Mode::LazysnapOptimized
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

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

/// `lazy/total` layers of the runs of a lazysnap result (`-` for overlayfs; the fewest lazy
/// layers of any run, so a run that fell back shows).
fn lazy_layers(result: &ModeResult) -> String {
    let lazy = result.runs.iter().filter_map(|r| r.lazy_layers).min();
    let layers = result.runs.iter().map(|r| r.layers).max().unwrap_or(0);
    match lazy {
        Some(lazy) => format!("{lazy}/{layers}"),
        None => "-".to_string(),
    }
}

/// The table's header and one row per result, as both table renderings show them.
fn table_cells(report: &BenchReport) -> ([&'static str; 15], Vec<[String; 15]>) {
    let headers = [
        "link",
        "mode",
        "pull s",
        "create s",
        "run s",
        "total s",
        "min-max s",
        "warm s",
        "MB to ready",
        "MB in all",
        "lazy layers",
        "peak RSS MB",
        "speedup",
        "vs best peer",
        "vs ideal",
    ];
    let rows = report
        .results
        .iter()
        .map(|r| {
            [
                r.link.clone(),
                r.mode.name().to_string(),
                format!("{:.2}", r.median.pull_secs),
                format!("{:.2}", r.median.create_secs),
                format!("{:.2}", r.median.run_secs),
                format!("{:.2}", r.median.total_secs),
                // Results saved before the spread was recorded have none.
                if r.runs.len() > 1 && r.median.total_max_secs > 0.0 {
                    format!(
                        "{:.2}-{:.2}",
                        r.median.total_min_secs, r.median.total_max_secs
                    )
                } else {
                    "-".to_string()
                },
                r.median
                    .warm_run_secs
                    .map_or("-".to_string(), |secs| format!("{secs:.2}")),
                format!("{:.1}", megabytes(r.median.fetched_bytes)),
                r.median
                    .fetched_all_bytes
                    .map_or("-".to_string(), |bytes| format!("{:.1}", megabytes(bytes))),
                lazy_layers(r),
                r.median
                    .snapshotter_peak_rss
                    .map_or("-".to_string(), |rss| format!("{:.0}", megabytes(rss))),
                match (r.mode, r.speedup) {
                    (Mode::Overlayfs, _) => "1.00x".to_string(),
                    (_, Some(s)) => format!("{s:.2}x"),
                    (_, None) => "-".to_string(),
                },
                r.vs_best_peer
                    .map_or("-".to_string(), |ratio| format!("{ratio:.2}")),
                r.vs_ideal
                    .map_or("-".to_string(), |ratio| format!("{ratio:.2}")),
            ]
        })
        .collect();
    (headers, rows)
}

/// The results as a Markdown table, for a README or an issue.
pub fn render_markdown(report: &BenchReport) -> String {
    let (headers, rows) = table_cells(report);
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    let mut out = line(&headers.map(String::from));
    out.push_str(&line(&headers.map(|h| {
        if matches!(h, "link" | "mode") {
            "---".to_string()
        } else {
            "---:".to_string()
        }
    })));
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

/// The results as an aligned text table, one row per link and mode.
pub fn render_table(report: &BenchReport) -> String {
    let (headers, rows) = table_cells(report);
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row.iter()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths.iter()).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            if i < 2 {
                text.push_str(&format!("{cell:<width$}"));
            } else {
                text.push_str(&format!("{cell:>width$}"));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&headers.map(String::from), &mut out);
    line(&widths.map(|w| "-".repeat(w)), &mut out);
    for row in &rows {
        line(row, &mut out);
    }
    out
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A grouped, stacked bar chart: per link one bar per mode, pull (dark) under create (outlined)
/// under run to ready (light),
/// the median total written above each bar.
pub fn render_svg(report: &BenchReport) -> String {
    const WIDTH: f64 = 760.0;
    const HEIGHT: f64 = 420.0;
    const LEFT: f64 = 64.0;
    const RIGHT: f64 = 24.0;
    const TOP: f64 = 56.0;
    const BOTTOM: f64 = 72.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;

    let mut links: Vec<&str> = Vec::new();
    for result in &report.results {
        if !links.contains(&result.link.as_str()) {
            links.push(&result.link);
        }
    }
    let max_total = report
        .results
        .iter()
        .map(|r| r.median.total_secs)
        .fold(0.0f64, f64::max);
    let scale_max = nice_ceiling(max_total.max(0.1));
    let y_of = |secs: f64| TOP + plot_h - (secs / scale_max) * plot_h;

    let mut svg = String::new();
    svg.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    ));
    svg.push_str(&format!(
        "<rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">\
         Container startup: pull + create/run to ready (median of {} run{})</text>\n",
        WIDTH / 2.0,
        report.runs_per_mode,
        if report.runs_per_mode == 1 { "" } else { "s" }
    ));
    // Axis and grid.
    let steps = grid_steps(scale_max);
    for step in 0..=steps {
        let secs = scale_max * f64::from(step) / f64::from(steps);
        let y = y_of(secs);
        svg.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            format_seconds(secs)
        ));
    }
    svg.push_str(&format!(
        "<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">seconds</text>\n",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    ));
    let group_w = plot_w / links.len().max(1) as f64;
    let bar_w = (group_w / 4.0).min(90.0);
    for (group, link) in links.iter().enumerate() {
        let center = LEFT + group_w * (group as f64 + 0.5);
        let modes: Vec<&ModeResult> = report.results.iter().filter(|r| r.link == *link).collect();
        let count = modes.len().max(1) as f64;
        for (i, result) in modes.iter().enumerate() {
            let x =
                center - bar_w * count / 2.0 - 4.0 * (count - 1.0) / 2.0 + i as f64 * (bar_w + 4.0);
            let (dark, light) = match result.mode {
                Mode::Overlayfs => ("#7f8c8d", "#bdc3c7"),
                Mode::Lazysnap => ("#1f6fb2", "#8cc0ea"),
                Mode::LazysnapNoBackground => ("#2e8b57", "#98d8b4"),
                Mode::LazysnapOptimized => ("#6a3d9a", "#cab2d6"),
                Mode::Stargz => ("#c0392b", "#f1a9a0"),
                Mode::StargzOptimized => ("#8e1b10", "#e57f73"),
                Mode::Soci => ("#d35400", "#f5cba7"),
            };
            let median = &result.median;
            let pull_top = y_of(median.pull_secs);
            let create_top = y_of(median.pull_secs + median.create_secs);
            let total_top = y_of(median.pull_secs + median.create_secs + median.run_secs);
            let base = y_of(0.0);
            // The create, between pull and run, in the run's colour with the pull's outline.
            svg.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{create_top:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\" fill=\"{light}\" stroke=\"{dark}\" stroke-width=\"1.5\"><title>{} create {:.2} s</title></rect>\n",
                (pull_top - create_top).max(0.0),
                result.mode.name(),
                median.create_secs,
            ));
            svg.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{pull_top:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\" fill=\"{dark}\"><title>{} pull {:.2} s</title></rect>\n\
                 <rect x=\"{x:.1}\" y=\"{total_top:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\" fill=\"{light}\"><title>{} run {:.2} s</title></rect>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.2} s</text>\n{}\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{}</text>\n",
                (base - pull_top).max(0.0),
                result.mode.name(),
                result.median.pull_secs,
                (create_top - total_top).max(0.0),
                result.mode.name(),
                result.median.run_secs,
                x + bar_w / 2.0,
                total_top - 5.0,
                result.median.total_secs,
                match (result.mode, result.speedup) {
                    (
                        Mode::Lazysnap
                        | Mode::LazysnapNoBackground
                        | Mode::LazysnapOptimized
                        | Mode::Stargz
                        | Mode::StargzOptimized
                        | Mode::Soci,
                        Some(speedup),
                    ) => format!(
                        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"bold\" fill=\"#1f6fb2\">{speedup:.1}x</text>\n",
                        x + bar_w / 2.0,
                        total_top - 20.0
                    ),
                    _ => String::new(),
                },
                x + bar_w / 2.0,
                base + 14.0,
                result.mode.name(),
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{center:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>\n",
            TOP + plot_h + 32.0,
            xml_escape(link)
        ));
        // The ideal start on this link, as a dashed line across its bars.
        let ideal = modes.iter().find_map(|r| {
            let ratio = r.vs_ideal.filter(|&v| v > 0.0)?;
            Some(r.median.total_secs / ratio)
        });
        if let Some(ideal) = ideal {
            let y = y_of(ideal);
            let half = group_w / 2.0 - 8.0;
            svg.push_str(&format!(
                "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#222\" stroke-dasharray=\"5,4\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">ideal {:.2} s</text>\n",
                center - half,
                center + half,
                center - half,
                y - 4.0,
                ideal
            ));
        }
    }
    // Legend.
    let legend_y = HEIGHT - 16.0;
    for (i, (color, label)) in [
        ("#1f6fb2", "pull (dark)"),
        ("#8cc0ea", "create (outlined), run to ready (light)"),
    ]
    .iter()
    .enumerate()
    {
        let x = LEFT + i as f64 * 200.0;
        svg.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{legend_y:.1}\">{label}</text>\n",
            legend_y - 10.0,
            x + 16.0
        ));
    }
    svg.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n</svg>\n",
        y_of(0.0),
        WIDTH - RIGHT,
        y_of(0.0)
    ));
    svg
}

/// The chart [`render_svg`] drew, as a PNG at twice its size. Its text is set in DejaVu Sans
/// where the system has it (Debian's `fonts-dejavu-core`), else in any font found; with no font
/// at all only the bars and lines are drawn.
pub fn render_png(svg: &str) -> Result<Vec<u8>, String> {
    use resvg::{tiny_skia, usvg};
    const SCALE: f32 = 2.0;
    let mut options = usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_system_fonts();
    fonts.set_sans_serif_family("DejaVu Sans");
    fonts.set_serif_family("DejaVu Sans");
    let tree =
        usvg::Tree::from_str(svg, &options).map_err(|e| format!("reading the chart: {e}"))?;
    let size = tree.size();
    let (width, height) = (
        (size.width() * SCALE).ceil() as u32,
        (size.height() * SCALE).ceil() as u32,
    );
    let mut pixmap = tiny_skia::Pixmap::new(width, height)
        .ok_or_else(|| format!("a {width}x{height} image cannot be drawn"))?;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(SCALE, SCALE),
        &mut pixmap.as_mut(),
    );
    pixmap
        .encode_png()
        .map_err(|e| format!("encoding the PNG: {e}"))
}

/// Grid intervals for a [`nice_ceiling`] value, so every tick is a round number.
fn grid_steps(scale_max: f64) -> u32 {
    let leading = scale_max / 10f64.powf(scale_max.log10().floor());
    if (leading - 2.0).abs() < 1e-9 {
        4
    } else {
        5
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    let exponent = value.log10().floor();
    let base = 10f64.powf(exponent);
    for factor in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if base * factor >= value {
            return base * factor;
        }
    }
    base * 10.0
}

fn format_seconds(secs: f64) -> String {
    let text = format!("{secs:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests;
