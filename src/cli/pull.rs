//! `lazysnap pull IMAGE`: pulls an image into containerd through a snapshotter (lazily through
//! lazysnap), with a progress line per layer; prints one summary line per layer at the end.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use lazysnap::containerd::pull::{pull, LayerOutcome, PullOptions, PullProgress, PullReport};
use lazysnap::containerd::registry_source::RegistrySource;
use lazysnap::containerd::Containerd;
use lazysnap::image::{Descriptor, Platform};
use lazysnap::registry::{Client, ClientConfig, Reference};

#[derive(clap::Args)]
pub struct PullArgs {
    /// Image reference, e.g. 127.0.0.1:5000/app:latest or docker.io/library/busybox:latest.
    image: String,
    #[command(flatten)]
    containerd: ContainerdAddress,
    /// containerd namespace to pull into.
    #[arg(
        short = 'n',
        long,
        default_value = "default",
        env = "CONTAINERD_NAMESPACE"
    )]
    namespace: String,
    /// Snapshotter that prepares the layers (a containerd proxy plugin name, or a builtin one
    /// such as overlayfs for an ordinary pull).
    #[arg(long, default_value = "lazysnap")]
    snapshotter: String,
    #[command(flatten)]
    registry: RegistryFlags,
}

/// containerd's socket, as ctr and ctr-remote take it (`pull`, `warm`).
#[derive(clap::Args)]
pub(super) struct ContainerdAddress {
    /// containerd's gRPC socket.
    #[arg(
        short = 'a',
        long = "address",
        visible_alias = "containerd",
        default_value = "/run/containerd/containerd.sock",
        env = "CONTAINERD_ADDRESS",
        value_name = "SOCK"
    )]
    pub address: PathBuf,
}

/// How `pull` and `warm` reach the registry.
#[derive(clap::Args)]
pub(super) struct RegistryFlags {
    /// Use plain HTTP for a non-localhost registry.
    #[arg(long)]
    plain_http: bool,
    /// Platform to pull from a multi-platform image (os/arch[/variant]); default: this host's.
    #[arg(long)]
    platform: Option<String>,
    /// containerd certs.d-style directory with <host>/hosts.toml (mirrors, TLS settings;
    /// default: /etc/containerd/certs.d, else /etc/docker/certs.d, when they exist).
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
}

/// Pulls `image` into containerd at `address` (`namespace`) through `snapshotter`, with a
/// progress bar per layer.
pub(super) async fn pull_with_progress(
    image: &str,
    address: &Path,
    namespace: &str,
    snapshotter: &str,
    registry: &RegistryFlags,
) -> anyhow::Result<PullReport> {
    let reference =
        Reference::parse(image).with_context(|| format!("parsing image reference {image:?}"))?;
    let platform = match &registry.platform {
        Some(text) => Platform::parse(text).context("parsing --platform")?,
        None => Platform::host(),
    };
    let client = Client::new(ClientConfig {
        hosts_dir: super::hosts_dir_or_default(registry.hosts_dir.clone()),
        plain_http: registry.plain_http,
        ..ClientConfig::default()
    })
    .context("setting up the registry client")?;
    let containerd = Containerd::connect(address, namespace).await?;
    let options = PullOptions {
        image_name: reference.to_string(),
        snapshotter: snapshotter.to_string(),
        platform,
        lease_expiry: Duration::from_secs(24 * 3600),
    };
    let progress = Arc::new(BarProgress::new());
    let source = RegistrySource::new(client, reference.clone());
    let report = pull(&containerd, &source, &options, progress.clone())
        .await
        .with_context(|| {
            format!(
                "pulling {reference} into containerd at {} (namespace {namespace}, snapshotter \
                 {snapshotter})",
                address.display()
            )
        })?;
    progress.finish();
    Ok(report)
}

pub fn run(args: PullArgs) -> anyhow::Result<ExitCode> {
    super::require_root("pull", "it talks to containerd's root-only socket")?;
    super::runtime()?.block_on(run_async(args))
}

async fn run_async(args: PullArgs) -> anyhow::Result<ExitCode> {
    let report = pull_with_progress(
        &args.image,
        &args.containerd.address,
        &args.namespace,
        &args.snapshotter,
        &args.registry,
    )
    .await?;
    for layer in &report.layers {
        out!(
            "{}  {}  {}",
            layer.digest,
            layer.outcome.describe(),
            fetched_label(layer.fetched_bytes)
        );
    }
    let lazy = report
        .layers
        .iter()
        .filter(|l| l.outcome == LayerOutcome::Lazy)
        .count();
    let unpacked = report
        .layers
        .iter()
        .filter(|l| l.outcome == LayerOutcome::Unpacked)
        .count();
    out!(
        "pulled {} ({}): {} layers, {lazy} lazy, {unpacked} fetched+unpacked, \
         snapshotter {}",
        args.image,
        report.target_digest,
        report.layers.len(),
        args.snapshotter
    );
    Ok(ExitCode::SUCCESS)
}

/// One indicatif bar per layer on stderr; hidden when stderr is not a terminal.
pub(super) struct BarProgress {
    multi: MultiProgress,
    bars: Mutex<Vec<ProgressBar>>,
}

impl BarProgress {
    pub(super) fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(super::progress_target()),
            bars: Mutex::new(Vec::new()),
        }
    }

    fn bar(&self, index: usize) -> Option<ProgressBar> {
        self.bars
            .lock()
            .ok()
            .and_then(|bars| bars.get(index).cloned())
    }

    pub(super) fn finish(&self) {
        if let Ok(bars) = self.bars.lock() {
            for bar in bars.iter().filter(|b| !b.is_finished()) {
                bar.finish();
            }
        }
    }
}

impl PullProgress for BarProgress {
    fn layers(&self, layers: &[Descriptor]) {
        let style =
            ProgressStyle::with_template("{prefix} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        if let Ok(mut bars) = self.bars.lock() {
            for layer in layers {
                let bar = self.multi.add(ProgressBar::new(layer.size));
                bar.set_style(style.clone());
                let short = layer
                    .digest
                    .strip_prefix("sha256:")
                    .unwrap_or(&layer.digest);
                bar.set_prefix(short.chars().take(12).collect::<String>());
                bar.set_message("waiting");
                bars.push(bar);
            }
        }
    }

    fn layer_bytes(&self, index: usize, bytes: u64) {
        if let Some(bar) = self.bar(index) {
            bar.set_message("fetching");
            bar.inc(bytes);
        }
    }

    fn layer_done(&self, index: usize, outcome: LayerOutcome) {
        if let Some(bar) = self.bar(index) {
            bar.finish_with_message(outcome.describe());
        }
    }
}

fn fetched_label(bytes: u64) -> String {
    if bytes == 0 {
        "0 B fetched".to_string()
    } else {
        format!("{} fetched", indicatif::HumanBytes(bytes))
    }
}
