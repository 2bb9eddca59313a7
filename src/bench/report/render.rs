//! The report as people read it: the text table, the same in Markdown, the stacked bar chart as
//! SVG and PNG.

use super::{BenchReport, Mode, ModeResult};

pub(super) fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

/// `lazy/total` layers of the runs of a lazysnap result (`-` for overlayfs; the fewest lazy
/// layers of any run, so a run that fell back shows).
pub(super) fn lazy_layers(result: &ModeResult) -> String {
    let lazy = result.runs.iter().filter_map(|r| r.lazy_layers).min();
    let layers = result.runs.iter().map(|r| r.layers).max().unwrap_or(0);
    match lazy {
        Some(lazy) => format!("{lazy}/{layers}"),
        None => "-".to_string(),
    }
}

/// The table's header and one row per result, as both table renderings show them.
pub(super) fn table_cells(report: &BenchReport) -> ([&'static str; 15], Vec<[String; 15]>) {
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

pub(super) fn xml_escape(text: &str) -> String {
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
                Mode::LazysnapSoci => ("#117a65", "#a3e4d7"),
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
pub(super) fn grid_steps(scale_max: f64) -> u32 {
    let leading = scale_max / 10f64.powf(scale_max.log10().floor());
    if (leading - 2.0).abs() < 1e-9 {
        4
    } else {
        5
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `value`.
pub(super) fn nice_ceiling(value: f64) -> f64 {
    let exponent = value.log10().floor();
    let base = 10f64.powf(exponent);
    for factor in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if base * factor >= value {
            return base * factor;
        }
    }
    base * 10.0
}

pub(super) fn format_seconds(secs: f64) -> String {
    let text = format!("{secs:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}
