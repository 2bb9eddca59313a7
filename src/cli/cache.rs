//! `lazysnap cache du` and `lazysnap cache prune`: the running `serve`'s disk cache by image and
//! layer, and removing chunks from it while containers run (asked over serve's control socket,
//! which owns the cache).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::HumanBytes;
use lazysnap::layer::PruneMode;

use super::serve_control::{self, Reply, Request};

#[derive(clap::Subcommand)]
pub enum CacheCommand {
    /// Show the cache's use by image and layer, the bytes layers share, and what no mounted
    /// layer uses.
    Du(DuArgs),
    /// Remove chunks from the cache; running containers fetch again what they read of them.
    Prune(PruneArgs),
}

#[derive(clap::Args)]
pub struct DuArgs {
    /// Root directory of the running `lazysnap serve`.
    #[arg(long, default_value = "/var/lib/lazysnap")]
    root: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct PruneWhat {
    /// Remove every chunk.
    #[arg(long)]
    all: bool,
    /// Remove the chunks no mounted layer uses.
    #[arg(long)]
    unused: bool,
    /// Remove the chunks not used for this long, e.g. 30m, 12h, 7d.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    older_than: Option<Duration>,
}

#[derive(clap::Args)]
pub struct PruneArgs {
    #[command(flatten)]
    what: PruneWhat,
    /// Also remove chunks of mounted layers whose registry does not answer now (their reads
    /// then fail until it does).
    #[arg(long)]
    force: bool,
    /// Root directory of the running `lazysnap serve`.
    #[arg(long, default_value = "/var/lib/lazysnap")]
    root: PathBuf,
}

/// `90s`, `30m`, `12h`, `7d` (or plain seconds).
fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not an age such as 90s, 30m, 12h or 7d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: unit {unit:?} is not s, m, h or d")),
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

pub fn run(command: CacheCommand) -> anyhow::Result<ExitCode> {
    super::require_root("cache", "serve's control socket is root-only")?;
    match command {
        CacheCommand::Du(args) => du(args),
        CacheCommand::Prune(args) => prune(args),
    }
}

fn ask(root: &std::path::Path, request: &Request) -> anyhow::Result<Reply> {
    match serve_control::ask(root, request)? {
        Some(Reply::Error { message }) => bail!("lazysnap serve: {message}"),
        Some(reply) => Ok(reply),
        None => bail!(
            "no lazysnap serve answers on {}: the cache belongs to a running serve (start it, or \
             pass the --root it runs with)",
            serve_control::socket_path(root).display()
        ),
    }
}

fn du(args: DuArgs) -> anyhow::Result<ExitCode> {
    let Reply::CacheUsage(usage) = ask(&args.root, &Request::CacheUsage)? else {
        bail!("lazysnap serve answered cache du with something else");
    };
    if args.json {
        out!(
            "{}",
            serde_json::to_string_pretty(&usage).context("encoding JSON")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "cache: {} in {} chunk files, bound {}",
        HumanBytes(usage.total_bytes),
        usage.total_chunks,
        HumanBytes(usage.limit)
    );
    let width = usage
        .layers
        .iter()
        .map(|l| l.image.len())
        .max()
        .unwrap_or(5)
        .max(5);
    out!(
        "  {:<width$} {:<14} {:>10} {:>10} {:>8}",
        "IMAGE",
        "LAYER",
        "CACHED",
        "SHARED",
        "CHUNKS"
    );
    for layer in &usage.layers {
        out!(
            "  {:<width$} {:<14} {:>10} {:>10} {:>8}",
            layer.image,
            lazysnap::digest::short_digest(&layer.digest),
            HumanBytes(layer.cached_bytes).to_string(),
            HumanBytes(layer.shared_bytes).to_string(),
            layer.cached_chunks
        );
    }
    out!(
        "  unused by any mounted layer: {} in {} chunk files (`lazysnap cache prune --unused`)",
        HumanBytes(usage.unused_bytes),
        usage.unused_chunks
    );
    Ok(ExitCode::SUCCESS)
}

fn prune(args: PruneArgs) -> anyhow::Result<ExitCode> {
    let mode = match (args.what.all, args.what.unused, args.what.older_than) {
        (true, _, _) => PruneMode::All,
        (_, true, _) => PruneMode::Unused,
        (_, _, Some(age)) => PruneMode::OlderThan(age),
        _ => bail!("say what to prune: --all, --unused or --older-than AGE"),
    };
    let Reply::Pruned(report) = ask(
        &args.root,
        &Request::Prune {
            mode,
            force: args.force,
        },
    )?
    else {
        bail!("lazysnap serve answered cache prune with something else");
    };
    for layer in &report.unreachable {
        out!("{layer}");
    }
    out!(
        "removed {} chunk files, {}",
        report.removed_chunks,
        HumanBytes(report.removed_bytes)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_age;
    use std::time::Duration;

    #[test]
    fn ages_take_units() {
        assert_eq!(parse_age("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_age("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert!(parse_age("3w").unwrap_err().contains("unit"));
        assert!(parse_age("soon").is_err());
    }
}
