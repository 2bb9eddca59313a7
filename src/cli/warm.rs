//! `lazysnap warm IMAGE…`: pre-warms a node without starting a container. Each image is pulled
//! into containerd through lazysnap (namespace `k8s.io` by default, so kubelet sees it), then the
//! running `serve` fetches its layers' prioritized chunks (every chunk with `--all`) into the
//! node's cache; the command exits when that is done.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use lazysnap::containerd::pull::LayerOutcome;

use super::mount_state::LayerState;
use super::pull::{pull_with_progress, ContainerdAddress, RegistryFlags};
use super::serve_control::{self, Reply, Request};

#[derive(clap::Args)]
pub struct WarmArgs {
    /// Images to warm, e.g. registry.example/app:v1.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
    /// Fetch every chunk of the lazy layers, not only their prioritized part.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    containerd: ContainerdAddress,
    /// containerd namespace to pull into (kubelet's is k8s.io).
    #[arg(
        short = 'n',
        long,
        default_value = "k8s.io",
        env = "CONTAINERD_NAMESPACE"
    )]
    namespace: String,
    /// Snapshotter name of lazysnap in containerd's configuration.
    #[arg(long, default_value = "lazysnap")]
    snapshotter: String,
    /// Root directory of the running `lazysnap serve` (its control socket is <root>/control.sock).
    #[arg(long, default_value = "/var/lib/lazysnap")]
    root: PathBuf,
    #[command(flatten)]
    registry: RegistryFlags,
}

pub fn run(args: WarmArgs) -> anyhow::Result<ExitCode> {
    super::require_root(
        "warm",
        "it talks to the root-only sockets of containerd and serve",
    )?;
    // Fail before pulling anything when no serve would do the fetching.
    if serve_control::ask(&args.root, &Request::Status)?.is_none() {
        bail!(
            "no lazysnap serve answers on {}: start it, or pass the --root it runs with",
            serve_control::socket_path(&args.root).display()
        );
    }
    let runtime = super::runtime()?;
    for image in &args.images {
        let lazy_layers = runtime.block_on(pull_lazily(&args, image))?;
        warm_layers(&args, image, lazy_layers)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Pulls `image` into containerd through the snapshotter; returns the layers that may be lazy:
/// mounted lazily now, or present from an earlier pull (serve says which it has mounted).
async fn pull_lazily(args: &WarmArgs, image: &str) -> anyhow::Result<Vec<String>> {
    let report = pull_with_progress(
        image,
        &args.containerd.address,
        &args.namespace,
        &args.snapshotter,
        &args.registry,
    )
    .await?;
    Ok(report
        .layers
        .iter()
        .filter(|l| l.outcome != LayerOutcome::Unpacked)
        .map(|l| l.digest.to_string())
        .collect())
}

/// Has `serve` warm `layers` of `image`, showing the bytes fetched meanwhile; prints a line per
/// layer and one for the image.
fn warm_layers(args: &WarmArgs, image: &str, layers: Vec<String>) -> anyhow::Result<()> {
    if layers.is_empty() {
        out!("{image}: no layer is lazy (all were fetched and unpacked): nothing to warm");
        return Ok(());
    }
    let bar = indicatif::ProgressBar::with_draw_target(None, super::progress_target());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {bytes} fetched ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(format!("warming {image}"));
    let (root, wanted) = (args.root.clone(), layers.clone());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (bar, done) = (bar.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(Some(Reply::Status(status))) = serve_control::ask(&root, &Request::Status)
                {
                    bar.set_position(fetched_bytes(
                        status.layers.iter().filter(|l| wanted.contains(&l.digest)),
                    ));
                }
                bar.tick();
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let reply = serve_control::ask(
        &args.root,
        &Request::Warm {
            layers,
            all: args.all,
        },
    );
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = watcher.join();
    bar.finish_and_clear();
    let (warmed, not_mounted) = match reply? {
        Some(Reply::Warmed {
            layers,
            not_mounted,
        }) => (layers, not_mounted),
        Some(Reply::Error { message }) => bail!("lazysnap serve: {message}"),
        Some(other) => bail!("lazysnap serve answered warm with {other:?}"),
        None => bail!(
            "lazysnap serve stopped answering on {}",
            serve_control::socket_path(&args.root).display()
        ),
    };
    for layer in &warmed {
        out!(
            "{}  fetched {} (prefetch {}, on demand {}, rest {}), {} of {} chunks cached",
            layer.digest,
            indicatif::HumanBytes(fetched_bytes(std::iter::once(layer))),
            indicatif::HumanBytes(layer.prefetch_bytes),
            indicatif::HumanBytes(layer.on_demand_bytes),
            indicatif::HumanBytes(layer.background_bytes),
            layer.fetched_chunks,
            layer.total_chunks
        );
    }
    for digest in &not_mounted {
        out!("{digest}  not mounted lazily by this lazysnap serve (unpacked): nothing to warm");
    }
    let incomplete = warmed
        .iter()
        .filter(|l| args.all && l.fetched_chunks < l.total_chunks)
        .count();
    if incomplete > 0 {
        bail!(
            "{incomplete} of {} lazy layers of {image} are not wholly in the cache: a fetch failed, \
             or the cache evicted chunks (its size bound cache.max_bytes, or its disk above \
             cache.high_watermark_pct); the serve log says which",
            warmed.len()
        );
    }
    out!(
        "warmed {image}: {} lazy layers, {}",
        warmed.len(),
        if args.all {
            "every chunk in the cache"
        } else {
            "prioritized chunks fetched"
        }
    );
    Ok(())
}

fn fetched_bytes<'a>(layers: impl Iterator<Item = &'a LayerState>) -> u64 {
    layers
        .map(|l| l.on_demand_bytes + l.prefetch_bytes + l.background_bytes)
        .sum()
}
