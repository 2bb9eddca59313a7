//! `lazysnap convert SRC DST`: converts an image to eStargz (or zstd:chunked) and stores it in a
//! registry or an OCI layout, with a progress bar per layer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lazysnap::estargz::Compression;
use lazysnap::image::{
    convert_image, ConvertOptions, ConvertProgress, ConvertReport, ImageLocation, LayerAction,
    LayerReport, Platform,
};
use lazysnap::registry::{Client, ClientConfig};

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Source image: a registry reference, or `oci:DIR[:TAG]` (an OCI image layout).
    pub src: String,
    /// Destination: a registry reference, or `oci:DIR[:TAG]`.
    pub dst: String,
    /// File listing paths or globs (one per line, `#` comments) to put first, in order: these
    /// files are prefetched when the image is pulled lazily.
    #[arg(long)]
    pub prefetch_list: Option<PathBuf>,
    #[command(flatten)]
    pub flags: ConvertFlags,
}

/// The options `convert` and `optimize` share.
#[derive(clap::Args)]
pub struct ConvertFlags {
    /// Platform to convert from an index (os/arch[/variant]); default: this host's.
    #[arg(long)]
    pub platform: Option<String>,
    /// Convert every platform of an index and write a new index.
    #[arg(long, conflicts_with = "platform")]
    pub all_platforms: bool,
    /// Write zstd:chunked layers instead of eStargz (gzip).
    #[arg(long)]
    pub zstdchunked: bool,
    /// Largest chunk of a regular file, in bytes.
    #[arg(long, default_value_t = lazysnap::estargz::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
    /// Compression level (default 9 for gzip, 3 for zstd).
    #[arg(long)]
    pub level: Option<u32>,
    /// Keep layers that are already eStargz / zstd:chunked.
    #[arg(long)]
    pub reuse: bool,
    /// Use plain HTTP for registries other than localhost / 127.0.0.1.
    #[arg(long, alias = "insecure")]
    pub plain_http: bool,
    /// containerd hosts directory (`certs.d` layout with hosts.toml files; default:
    /// /etc/containerd/certs.d, else /etc/docker/certs.d, when they exist).
    #[arg(long)]
    pub hosts_dir: Option<PathBuf>,
    /// Directory for temp files (downloaded and converted layers).
    #[arg(long)]
    pub temp_dir: Option<PathBuf>,
    /// Layers converted at the same time.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
}

impl ConvertFlags {
    /// The conversion these flags ask for (nothing prioritized).
    pub fn options(&self) -> anyhow::Result<ConvertOptions> {
        let platform = match &self.platform {
            Some(p) => Platform::parse(p)?,
            None => Platform::host(),
        };
        Ok(ConvertOptions {
            compression: if self.zstdchunked {
                Compression::Zstd
            } else {
                Compression::Gzip
            },
            chunk_size: self.chunk_size,
            level: self.level,
            prioritized: Vec::new(),
            recorded: Vec::new(),
            platform,
            all_platforms: self.all_platforms,
            reuse: self.reuse,
            temp_dir: self.temp_dir.clone(),
            concurrency: self.concurrency.max(1),
        })
    }

    /// The registry client these flags ask for.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(ClientConfig {
            plain_http: self.plain_http,
            hosts_dir: super::hosts_dir_or_default(self.hosts_dir.clone()),
            ..ClientConfig::default()
        })
        .context("setting up the registry client")
    }
}

pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let src = ImageLocation::parse(&args.src).context("source image")?;
    let dst = ImageLocation::parse(&args.dst).context("destination image")?;
    let mut opts = args.flags.options()?;
    if let Some(path) = &args.prefetch_list {
        opts.prioritized = read_prefetch_list(path)?;
    }
    let client = args.flags.client()?;
    convert_with_progress(&client, &src, &dst, &opts)?;
    Ok(ExitCode::SUCCESS)
}

/// Converts with a progress bar per layer and prints what was written and how fast.
pub fn convert_with_progress(
    client: &Client,
    src: &ImageLocation,
    dst: &ImageLocation,
    opts: &ConvertOptions,
) -> anyhow::Result<ConvertReport> {
    let progress = Bars::new();
    let started = Instant::now();
    let report = super::runtime()?
        .block_on(convert_image(client, src, dst, opts, &progress))
        .with_context(|| format!("converting {src} to {dst}"))?;
    let elapsed = started.elapsed().as_secs_f64();
    progress.clear();

    let mut uncompressed = 0u64;
    for image in &report.images {
        let platform = image
            .platform
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        out!("image {} ({platform})", image.manifest.digest);
        for layer in &image.layers {
            uncompressed += layer.uncompressed_size;
            out!("  {}", describe_layer(layer));
        }
    }
    out!(
        "converted {src} -> {}: {} {}",
        report.target,
        report.descriptor.media_type,
        report.descriptor.digest
    );
    if uncompressed > 0 && elapsed > 0.0 {
        out!(
            "{:.1} MB uncompressed in {elapsed:.2} s: {:.1} MB/s",
            uncompressed as f64 / 1e6,
            uncompressed as f64 / 1e6 / elapsed
        );
    }
    Ok(report)
}

fn describe_layer(layer: &LayerReport) -> String {
    let action = match layer.action {
        LayerAction::Converted => "converted",
        LayerAction::Reused => "reused",
        LayerAction::Copied => "copied",
    };
    let pushed = if layer.uploaded {
        "pushed"
    } else {
        "already there"
    };
    format!(
        "{} -> {} {action}, {} bytes, {pushed}",
        layer.source_digest, layer.target.digest, layer.target.size
    )
}

/// Reads a prefetch list: one path or glob per line; blank lines and `#` comments skipped.
fn read_prefetch_list(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the prefetch list {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// One indicatif bar per layer, drawn on stderr only when it is a terminal.
pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(super::progress_target()),
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn with_bar(&self, layer: &str, f: impl FnOnce(&ProgressBar)) {
        if let Ok(bars) = self.bars.lock() {
            if let Some(bar) = bars.get(layer) {
                f(bar);
            }
        }
    }

    pub fn clear(&self) {
        let _ = self.multi.clear();
    }

    /// Prints a line above the bars.
    pub fn println(&self, text: &str) {
        if self.multi.is_hidden() || self.multi.println(text).is_err() {
            eprintln!("{text}");
        }
    }
}

impl ConvertProgress for Bars {
    fn layer_started(&self, layer: &str, size: u64) {
        let bar = self.multi.add(ProgressBar::new(size));
        let style = ProgressStyle::with_template(
            "{prefix} {msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        let short = layer.strip_prefix("sha256:").unwrap_or(layer);
        bar.set_prefix(short.chars().take(12).collect::<String>());
        bar.set_message("starting");
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(layer.to_string(), bar);
        }
    }

    fn layer_phase(&self, layer: &str, phase: &str) {
        let phase = phase.to_string();
        self.with_bar(layer, |bar| {
            bar.set_position(0);
            bar.set_message(phase);
        });
    }

    fn layer_position(&self, layer: &str, bytes: u64) {
        self.with_bar(layer, |bar| bar.set_position(bytes));
    }

    fn layer_finished(&self, layer: &str, report: &LayerReport) {
        let text = describe_layer(report);
        self.with_bar(layer, |bar| {
            bar.set_position(bar.length().unwrap_or(0));
            bar.finish_with_message(match report.action {
                LayerAction::Converted => "converted",
                LayerAction::Reused => "reused",
                LayerAction::Copied => "copied",
            });
        });
        tracing::debug!("{text}");
    }
}
