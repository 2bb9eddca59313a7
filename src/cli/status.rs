//! `lazysnap status`: the layers the running `serve` has mounted (asked on its control socket)
//! and the images `lazysnap mount` has mounted (from their state files), with what they fetched.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;

use super::human_bytes;
use super::mount_state::{process_alive, read_state, LayerState};
use super::serve_control;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Where the mount state files are.
    #[arg(long, default_value = "/run/lazysnap/mounts")]
    state_dir: PathBuf,
    /// Root directory of the `lazysnap serve` to ask (its control socket is <root>/control.sock).
    #[arg(long, default_value = "/var/lib/lazysnap")]
    root: PathBuf,
    /// Print JSON instead of a table: {"serve": {...} or null, "mounts": [...]}.
    #[arg(long)]
    json: bool,
}

pub fn run_status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut states = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&args.state_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(state) = read_state(&path) {
                    if process_alive(state.pid) {
                        states.push(state);
                    }
                }
            }
        }
    }
    states.sort_by(|a, b| a.dir.cmp(&b.dir));
    let serve = match serve_control::ask(&args.root, &serve_control::Request::Status)? {
        Some(serve_control::Reply::Status(status)) => Some(status),
        Some(serve_control::Reply::Error { message }) => {
            bail!("lazysnap serve (root {}): {message}", args.root.display())
        }
        Some(other) => bail!("lazysnap serve answered status with {other:?}"),
        None => None,
    };
    if args.json {
        let both = serde_json::json!({ "serve": serve, "mounts": states });
        out!("{}", serde_json::to_string_pretty(&both)?);
        return Ok(ExitCode::SUCCESS);
    }
    match &serve {
        Some(serve) => {
            out!(
                "lazysnap serve (pid {}, root {}, cache {} of {}): {} lazy layers",
                serve.pid,
                serve.root.display(),
                human_bytes(serve.cache_bytes),
                human_bytes(serve.cache_limit),
                serve.layers.len()
            );
            print_layers(&serve.layers);
        }
        None => out!(
            "no lazysnap serve answers on {}",
            serve_control::socket_path(&args.root).display()
        ),
    }
    if states.is_empty() {
        out!("no images mounted by `lazysnap mount`");
        return Ok(ExitCode::SUCCESS);
    }
    for state in &states {
        out!(
            "{}  {}  (pid {}, cache {} of {})",
            state.dir.display(),
            state.image,
            state.pid,
            human_bytes(state.cache_bytes),
            human_bytes(state.cache_limit)
        );
        print_layers(&state.layers);
    }
    Ok(ExitCode::SUCCESS)
}

/// The layer table of `lazysnap status` (with the image column when layers carry one).
fn print_layers(layers: &[LayerState]) {
    let image_width = layers
        .iter()
        .filter_map(|l| l.image.as_ref().map(String::len))
        .max();
    let image_header = |text: &str| match image_width {
        Some(width) => format!("{text:<width$} "),
        None => String::new(),
    };
    out!(
        "  {}{:<14} {:<9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>11}",
        image_header("IMAGE"),
        "LAYER",
        "MODE",
        "SIZE",
        "ON-DEMAND",
        "PREFETCH",
        "BACKGROUND",
        "FETCHED",
        "CACHE-HITS",
        "PASSTHROUGH"
    );
    for layer in layers {
        let fetched = if layer.total_chunks == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.0}%",
                100.0 * layer.fetched_chunks as f64 / layer.total_chunks as f64
            )
        };
        out!(
            "  {}{:<14} {:<9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>11}",
            image_header(layer.image.as_deref().unwrap_or("")),
            lazysnap::digest::short_digest(&layer.digest),
            layer.mode,
            human_bytes(layer.size),
            human_bytes(layer.on_demand_bytes),
            human_bytes(layer.prefetch_bytes),
            human_bytes(layer.background_bytes),
            fetched,
            layer.cache_hits,
            layer.passthrough_opens
        );
    }
}
