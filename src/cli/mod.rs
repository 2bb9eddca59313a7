//! Command-line edge: one file per subcommand, anyhow errors, logging setup.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// `println!` for a command's output: a closed stdout (`lazysnap status | head -1`) ends the
/// command quietly, as Unix tools do, instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::print_line(format_args!($($arg)*))
    };
}

mod bench;
mod cache;
mod convert;
mod inspect;
mod mount;
mod mount_daemon;
mod mount_socket;
mod mount_state;
mod optimize;
mod pull;
mod serve;
mod serve_control;
mod status;
mod warm;

/// Lazy-pulling snapshotter for containerd: eStargz and zstd:chunked layers mounted through FUSE,
/// fetched on demand into a shared bounded cache.
#[derive(Parser)]
#[command(name = "lazysnap", version = lazysnap::BUILD_VERSION, about)]
struct Cli {
    /// Log format: text or json (default: `log_format` of `serve --config`, else text).
    #[arg(long, global = true, env = "LAZYSNAP_LOG_FORMAT")]
    log_format: Option<String>,
    /// Log level or filter: error, warn, info, debug, trace, or directives such as
    /// "info,lazysnap::fetch=debug" (default: `log_level` of `serve --config`, else info). The
    /// LAZYSNAP_LOG environment variable, in the same syntax, wins over both.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image to eStargz (or zstd:chunked) and push it.
    Convert(convert::ConvertArgs),
    /// Run an image's workload, record what it reads, and write the image as eStargz with that
    /// first (prefetched when pulled lazily).
    Optimize(optimize::OptimizeArgs),
    /// Show and verify the TOC of an eStargz / zstd:chunked layer blob or image.
    Inspect(inspect::InspectArgs),
    /// Run the containerd proxy snapshotter.
    Serve(serve::ServeArgs),
    /// Pull an image lazily into containerd through the lazysnap snapshotter.
    Pull(pull::PullArgs),
    /// Mount an image lazily at a directory, without containerd.
    Mount(mount::MountArgs),
    /// Unmount a directory mounted by `lazysnap mount`.
    Umount(mount::UmountArgs),
    /// Show the layers `serve` and `lazysnap mount` have mounted and what they fetched.
    Status(status::StatusArgs),
    /// See and prune the running serve's chunk cache.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Pre-warm a node: pull images lazily into containerd and fetch their prioritized chunks
    /// (or all of them) into lazysnap's cache, without starting a container.
    Warm(warm::WarmArgs),
    /// Measure container startup latency against containerd's overlayfs pull.
    Bench(bench::BenchArgs),
    /// Print a shell completion script: `lazysnap completion bash > /etc/bash_completion.d/lazysnap`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), generated from this command line: `lazysnap man | man -l -`.
    Man,
    /// The daemon `lazysnap mount` starts for a cache directory (not run by hand).
    #[command(hide = true)]
    MountDaemon(mount_daemon::DaemonArgs),
    /// The process `serve` starts to keep its FUSE connections across restarts (not run by hand).
    #[command(hide = true)]
    FuseHolder {
        /// Unix socket to listen on.
        #[arg(long, value_name = "SOCK")]
        socket: std::path::PathBuf,
        /// Keep running when idle (a DaemonSet's sidecar, which outlives restarts of `serve`).
        #[arg(long)]
        stay: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let configured = match &cli.command {
        Command::Serve(args) => serve::configured_logging(args),
        _ => None,
    };
    let log_format = cli
        .log_format
        .clone()
        .or_else(|| configured.as_ref().map(|(format, _)| format.clone()))
        .unwrap_or_else(|| "text".to_string());
    let log_level = cli
        .log_level
        .clone()
        .or_else(|| configured.map(|(_, level)| level))
        .unwrap_or_else(|| "info".to_string());
    if let Err(message) = init_logging(&log_format, &log_level) {
        eprintln!("lazysnap: error: {message}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Convert(args) => convert::run(args),
        Command::Optimize(args) => optimize::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Pull(args) => pull::run(args),
        Command::Mount(args) => mount::run_mount(args),
        Command::Umount(args) => mount::run_umount(args),
        Command::Status(args) => status::run_status(args),
        Command::Warm(args) => warm::run(args),
        Command::Cache(command) => cache::run(command),
        Command::Bench(args) => bench::run(args),
        Command::Completion { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "lazysnap", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => print_man_page(),
        Command::MountDaemon(args) => mount_daemon::run(args),
        Command::FuseHolder { socket, stay } => lazysnap::fuse_holder::run_holder(&socket, stay)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("lazysnap: error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// The manual page of `lazysnap` and a section per subcommand, in roff.
fn print_man_page() -> anyhow::Result<ExitCode> {
    let command = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("lazysnap-{}", sub.get_name());
        let sub = sub
            .clone()
            .name(name)
            .display_name(format!("lazysnap {}", sub.get_name()));
        let man = clap_mangen::Man::new(sub);
        man.render_name_section(&mut page)?;
        man.render_synopsis_section(&mut page)?;
        man.render_description_section(&mut page)?;
        man.render_options_section(&mut page)?;
    }
    out!("{}", String::from_utf8_lossy(&page).trim_end());
    Ok(ExitCode::SUCCESS)
}

/// The error and its causes joined by `: `, each cause said once: library errors that already
/// print their source (`"{context}: {source}"`) are not followed by that source again, and a
/// context that its cause repeats at its start (`"resolving x"`, then `"resolving x: 404"`) gives
/// way to the cause.
fn error_chain(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let part = cause.to_string();
        let so_far = parts.join(": ");
        if so_far.ends_with(&part) {
            continue;
        }
        if parts
            .last()
            .is_some_and(|last| part.starts_with(last.as_str()))
        {
            parts.pop();
        }
        parts.push(part);
    }
    parts.join(": ")
}

/// Fails with a message that says so when a command that needs root runs as another user (it
/// would fail later on a socket, a mount or a cache path, with an error that hides the cause).
pub fn require_root(command: &str, why: &str) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    anyhow::bail!("lazysnap {command} must run as root ({why}): run it with sudo, or as root")
}

/// Sets up logging: `LAZYSNAP_LOG` when set, else `level` (a level or tracing filter).
fn init_logging(format: &str, level: &str) -> Result<(), String> {
    let filter = match std::env::var("LAZYSNAP_LOG") {
        Ok(text) if !text.is_empty() => {
            lazysnap::config::log_filter(&text).map_err(|e| format!("LAZYSNAP_LOG: {e}"))?
        }
        _ => lazysnap::config::log_filter(level).map_err(|e| format!("--log-level {e}"))?,
    };
    // Colours only on a terminal: the mount daemon's stderr is its log file.
    // LAZYSNAP_LOG_SPANS=1 also logs each span as it closes, with its duration (where the time
    // of a mount, a fetch or a gRPC call went).
    let span_events = match std::env::var("LAZYSNAP_LOG_SPANS").as_deref() {
        Ok("1") | Ok("true") => tracing_subscriber::fmt::format::FmtSpan::CLOSE,
        _ => tracing_subscriber::fmt::format::FmtSpan::NONE,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(span_events)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}

/// containerd's hosts directories, in the order nerdctl and containerd look for them.
const DEFAULT_HOSTS_DIRS: [&str; 2] = ["/etc/containerd/certs.d", "/etc/docker/certs.d"];

/// The hosts.toml directory a command that talks to a registry uses: `--hosts-dir` when given,
/// else the first of [`DEFAULT_HOSTS_DIRS`] that exists (as `serve`'s `config_path` defaults),
/// so every command finds the mirrors `serve` uses.
pub fn hosts_dir_or_default(given: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
    given.or_else(|| {
        DEFAULT_HOSTS_DIRS
            .iter()
            .map(std::path::PathBuf::from)
            .find(|dir| dir.is_dir())
    })
}

/// Parses `10GiB`, `512MiB`, `4096`, `1.5G` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| {
        format!("size {text:?}: expected a number with an optional unit like 10GiB")
    })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "size {text:?}: unknown unit {other:?} (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    Ok((number * multiplier as f64) as u64)
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Builds the multi-threaded tokio runtime every async subcommand runs on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Where progress bars draw: stderr when it is a terminal, nowhere otherwise (logs and CI).
pub fn progress_target() -> indicatif::ProgressDrawTarget {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    }
}

/// Writes one line of command output (see `out!`): exits with status 141, like a tool killed by
/// SIGPIPE, when the reader went away; with 1 and a message on another write error.
pub fn print_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => {
            eprintln!("lazysnap: error: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("converting layer sha256:ab: {source}")]
    struct Wrapping {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_said_once() {
        let err = anyhow::Error::new(Wrapping {
            source: std::io::Error::other("unsafe member name"),
        })
        .context("converting oci:a to oci:b");
        assert_eq!(
            error_chain(&err),
            "converting oci:a to oci:b: converting layer sha256:ab: unsafe member name"
        );
        let plain = anyhow::anyhow!("refused").context("pulling x");
        assert_eq!(error_chain(&plain), "pulling x: refused");
        let repeated = anyhow::anyhow!("resolving x: not found")
            .context("resolving x")
            .context("converting x");
        assert_eq!(
            error_chain(&repeated),
            "converting x: resolving x: not found"
        );
    }
}
