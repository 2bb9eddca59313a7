//! `lazysnap optimize SRC DST`: runs the image's workload over recording lazy mounts and writes
//! the image as eStargz with what the workload used first; prints how much of the image it uses.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use lazysnap::image::{ConvertProgress, ImageLocation, LayerReport};
use lazysnap::optimize::{
    optimize_image, LayerUse, OptimizeOptions, OptimizeProgress, OptimizeReport, StopWhen,
    WorkloadOverrides,
};

use super::convert::{Bars, ConvertFlags};

#[derive(clap::Args)]
pub struct OptimizeArgs {
    /// Source image: a registry reference, or `oci:DIR[:TAG]`; plain gzip, eStargz (its old
    /// prioritized order is replaced) or zstd:chunked.
    pub src: String,
    /// Destination: a registry reference, or `oci:DIR[:TAG]`.
    pub dst: String,
    /// Record for this long, e.g. 10s or 2m (the recording also ends when the workload exits).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub period: Duration,
    /// Record until a line of the workload's output contains TEXT (at most --timeout).
    #[arg(long, value_name = "TEXT", conflicts_with = "wait_on_signal")]
    pub wait_on_line: Option<String>,
    /// Longest wait for --wait-on-line.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Record until lazysnap gets SIGINT (Ctrl-C).
    #[arg(long)]
    pub wait_on_signal: bool,
    /// Entrypoint instead of the image's: a JSON array (`'["/bin/sh","-c"]'`) or one word; the
    /// image's Cmd is then dropped unless --args is given.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Arguments instead of the image's Cmd: a JSON array (`'["-c","print(1)"]'`) or one word.
    #[arg(long, allow_hyphen_values = true)]
    pub args: Option<String>,
    /// Environment variable KEY=VALUE for the workload (repeatable).
    #[arg(long)]
    pub env: Vec<String>,
    /// Working directory instead of the image's.
    #[arg(long)]
    pub cwd: Option<String>,
    /// User (name or uid, optionally :group) instead of the image's.
    #[arg(long)]
    pub user: Option<String>,
    /// Bind mount SRC:DST into the workload's container (repeatable).
    #[arg(long)]
    pub mount: Vec<String>,
    /// Give the workload the host's network (it has none otherwise).
    #[arg(long)]
    pub net_host: bool,
    /// Write the record (JSON lines: layer, path, size, byte ranges read) to FILE.
    #[arg(long, value_name = "FILE")]
    pub record_out: Option<PathBuf>,
    /// Use a record written by --record-out instead of running the workload.
    #[arg(long, value_name = "FILE")]
    pub record_in: Option<PathBuf>,
    /// Write the image even when the workload failed (non-zero exit, awaited line never seen).
    #[arg(long)]
    pub accept_failed_run: bool,
    /// Also write the report as JSON to FILE: per layer and in total, files and bytes used,
    /// compressed bytes prefetched, TOC bytes and layer size.
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,
    #[command(flatten)]
    pub flags: ConvertFlags,
}

pub fn run(args: OptimizeArgs) -> anyhow::Result<ExitCode> {
    let src = ImageLocation::parse(&args.src).context("source image")?;
    let dst = ImageLocation::parse(&args.dst).context("destination image")?;
    let stop = match (&args.wait_on_line, args.wait_on_signal) {
        (Some(text), _) => StopWhen::Line {
            text: text.clone(),
            timeout: args.timeout,
        },
        (None, true) => StopWhen::Signal,
        (None, false) => StopWhen::Period(args.period),
    };
    let opts = OptimizeOptions {
        convert: args.flags.options()?,
        stop,
        overrides: WorkloadOverrides {
            entrypoint: args
                .entrypoint
                .as_deref()
                .map(|t| parse_words(t, "--entrypoint"))
                .transpose()?,
            args: args
                .args
                .as_deref()
                .map(|t| parse_words(t, "--args"))
                .transpose()?,
            env: args.env.clone(),
            cwd: args.cwd.clone(),
            user: args.user.clone(),
            mounts: args.mount.clone(),
            net_host: args.net_host,
        },
        record_in: args.record_in.clone(),
        record_out: args.record_out.clone(),
        accept_failed_run: args.accept_failed_run,
    };
    if opts.record_in.is_none() {
        super::require_root(
            "optimize",
            "recording a workload mounts FUSE and overlayfs and runs runc; with --record-in it does not",
        )?;
    }
    let client = args.flags.client()?;
    let progress = Progress(Bars::new());
    let report = super::runtime()?
        .block_on(optimize_image(&client, &src, &dst, &opts, &progress))
        .with_context(|| format!("optimizing {src} into {dst}"))?;
    progress.0.clear();
    print_report(&report, &opts.stop, &dst);
    if let Some(path) = &args.report_json {
        write_report_json(&report, &dst, path)
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON array of strings, or one word.
fn parse_words(text: &str, flag: &str) -> anyhow::Result<Vec<String>> {
    if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
            .with_context(|| format!("{flag} {text:?}: not a JSON array of strings"))
    } else {
        Ok(vec![text.to_string()])
    }
}

/// `10`, `10s`, `500ms`, `2m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|at| text.split_at(at))
        .unwrap_or((text, "s"));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 10s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

fn print_report(report: &OptimizeReport, stop: &StopWhen, dst: &ImageLocation) {
    if let Some(run) = &report.run {
        out!("workload: {}", run.describe(stop));
    }
    out!(
        "{:<20} {:>14} {:>22} {:>16} {:>16}",
        "layer",
        "files used",
        "bytes read",
        "prefetch",
        "layer size"
    );
    let total = total_use(report);
    for layer in &report.layers {
        out!(
            "{:<20} {:>14} {:>22} {:>16} {:>16}",
            lazysnap::digest::short_digest(&layer.source_digest),
            format!("{}/{}", layer.files_used, layer.files),
            format!("{} / {}", mb(layer.bytes_read), mb(layer.file_bytes)),
            mb(layer.prefetch_bytes),
            mb(layer.blob_size)
        );
    }
    let share = if total.file_bytes > 0 {
        total.bytes_read as f64 * 100.0 / total.file_bytes as f64
    } else {
        0.0
    };
    out!(
        "{:<20} {:>14} {:>22} {:>16} {:>16}",
        "total",
        format!("{}/{}", total.files_used, total.files),
        format!("{} / {}", mb(total.bytes_read), mb(total.file_bytes)),
        mb(total.prefetch_bytes),
        mb(total.blob_size)
    );
    out!(
        "the workload read {share:.1}% of the image's file bytes; {} (compressed) will be prefetched",
        mb(total.prefetch_bytes)
    );
    out!(
        "wrote {dst}: {} ({} files recorded)",
        report.converted.descriptor.digest,
        report.record.accesses.len()
    );
}

/// The layers' uses added up.
fn total_use(report: &OptimizeReport) -> LayerUse {
    let mut total = LayerUse::default();
    for layer in &report.layers {
        total.add(layer);
    }
    total
}

/// The `--report-json` file: `{"image", "digest", "layers": [..], "total": {..}}`.
fn write_report_json(
    report: &OptimizeReport,
    dst: &ImageLocation,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let json = serde_json::json!({
        "image": dst.to_string(),
        "digest": report.converted.descriptor.digest,
        "layers": report.layers,
        "total": total_use(report),
    });
    std::fs::write(path, serde_json::to_vec_pretty(&json)?)?;
    Ok(())
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

struct Progress(Bars);

impl ConvertProgress for Progress {
    fn layer_started(&self, layer: &str, size: u64) {
        self.0.layer_started(layer, size)
    }
    fn layer_phase(&self, layer: &str, phase: &str) {
        self.0.layer_phase(layer, phase)
    }
    fn layer_position(&self, layer: &str, bytes: u64) {
        self.0.layer_position(layer, bytes)
    }
    fn layer_finished(&self, layer: &str, report: &LayerReport) {
        self.0.layer_finished(layer, report)
    }
}

impl OptimizeProgress for Progress {
    fn phase(&self, text: &str) {
        self.0.println(&format!("lazysnap optimize: {text}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_words_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("3d").is_err());
        assert_eq!(
            parse_words(r#"["-c","print(1)"]"#, "--args").unwrap(),
            vec!["-c", "print(1)"]
        );
        assert_eq!(
            parse_words("/bin/sh", "--entrypoint").unwrap(),
            vec!["/bin/sh"]
        );
        assert!(parse_words("[1]", "--args").is_err());
    }
}
