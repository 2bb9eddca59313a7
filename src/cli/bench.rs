//! `lazysnap bench`: measures container startup (pull, create, run to ready) through lazysnap
//! against containerd's default overlayfs pull and the peers over emulated links; prints a table
//! and writes results.json, startup.svg, startup.png, table.txt and table.md with `--out`.
//! `--demo` is one quick explained run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use lazysnap::bench::{self, BenchOptions, BenchReport, LinkSpec, Mode};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Emulated link, repeatable: a profile `lan` (unshaped), `dc` (100mbit:20ms) or `edge`
    /// (10mbit:100ms), `unlimited`, or RATE[:RTT[:JITTER][:LOSS%]] such as `20mbit:50ms`,
    /// `1gbit` or `10mbit:100ms:20ms:1%` (RTT is the round-trip time; JITTER up to that much
    /// more one-way delay at random; LOSS the share of data lost, resent a retransmission
    /// timeout late). Default: unlimited and 20mbit:50ms.
    #[arg(long = "link", value_name = "LINK")]
    links: Vec<String>,
    /// Cold runs per link and mode; the table shows medians, with the fastest and slowest total.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Size of the sample image's app layer in MB (file content; compresses about 2:1).
    #[arg(long, default_value_t = 40)]
    layer_mb: u64,
    /// Convert without a prefetch list (by default the workload's startup files are
    /// prioritized).
    #[arg(long)]
    no_prefetch_list: bool,
    /// Turn off lazysnap's background fill of the rest of each layer during the runs.
    #[arg(long)]
    no_background_fill: bool,
    /// Directory for results.json, startup.svg, startup.png, table.txt and table.md.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Where registry, containerd and lazysnap keep their state (default $TMPDIR or /tmp); a
    /// tmpfs such as /dev/shm takes disk speed out of the unpack times.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Deadline in seconds for each pull, run and conversion.
    #[arg(long, default_value_t = 600)]
    step_timeout: u64,
    /// One quick run (unlimited and 20mbit:50ms, 1 run each) with an explanation of the table.
    #[arg(long)]
    demo: bool,
    /// Image and workload: `sample` (busybox + generated app layer), or one built once from
    /// Debian 12's packages with debootstrap into --cache-dir: `python3-print` (`print(1)`),
    /// `python3-app` (imports json and hashlib, hashes a 4 MiB file), `node-app` (loads crypto
    /// and zlib), `gcc-hello` (compiles and runs hello world), `java-hello` (OpenJDK 17 runs a
    /// class that prints a line).
    /// Or any image in a registry, REF such as `docker.io/library/python:3.12-slim`, with
    /// --ready-line (and --cmd to run something else than its entrypoint and cmd): the bench
    /// copies it as it is, converts and optimizes it itself.
    #[arg(long, default_value = "sample", value_name = "IMAGE")]
    image: String,
    /// With --image REF: the line of output that says the workload is ready.
    #[arg(long, value_name = "TEXT")]
    ready_line: Option<String>,
    /// With --image REF: the command to run instead of the image's entrypoint and cmd, a JSON
    /// array (`'["python3","-c","print(1)"]'`) or one word.
    #[arg(long, value_name = "CMD")]
    cmd: Option<String>,
    /// Where images built from Debian packages are kept between runs.
    #[arg(long, value_name = "DIR", default_value = "/var/cache/lazysnap-bench")]
    cache_dir: PathBuf,
    /// Also measure lazysnap with background fill off (mode `lazysnap-nobg`).
    #[arg(long)]
    compare_no_background: bool,
    /// Measure stargz-snapshotter beside lazysnap with this `containerd-stargz-grpc` binary
    /// (mode `stargz`): on the image `ctr-remote image convert --estargz` writes, pulled with
    /// `ctr-remote images rpull`.
    #[arg(long, value_name = "PATH")]
    stargz_grpc: Option<PathBuf>,
    /// Measure the SOCI snapshotter beside lazysnap with this `soci-snapshotter-grpc` binary and
    /// the `soci` CLI beside it (mode `soci`): on the gzip image with the index `soci create`
    /// builds, pulled with `soci image rpull` (scripts/get-soci.sh fetches both).
    #[arg(long, value_name = "PATH")]
    soci_grpc: Option<PathBuf>,
    /// Only these modes, comma separated (overlayfs, lazysnap, lazysnap-nobg, lazysnap-opt,
    /// stargz, stargz-opt, soci); without overlayfs the table shows no speedups.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    modes: Vec<String>,
    /// Also measure images optimized for the workload, beside the unoptimized ones: the one
    /// `lazysnap optimize` writes (mode `lazysnap-opt`) and, with --stargz-grpc, the one
    /// `ctr-remote image optimize` writes (mode `stargz-opt`)
    #[arg(long)]
    optimized: bool,
    /// With --optimized: optimize for this image's workload (another workload of the same
    /// image, e.g. python3-print for python3-app) instead of the measured one, to see what a list
    /// made for one workload costs another.
    #[arg(long, value_name = "IMAGE", requires = "optimized")]
    optimized_for: Option<String>,
    /// After each cold run, start the workload again on the same node (image, snapshots and
    /// caches kept) and report that create + run as `warm s`.
    #[arg(long)]
    warm: bool,
    /// `lazysnap convert --chunk-size` for the lazysnap image (default: convert's).
    #[arg(long, value_name = "BYTES")]
    chunk_size: Option<u64>,
    /// Keep each run's snapshotter log in DIR as LINK-MODE-RUN.log (with LAZYSNAP_LOG=debug
    /// and LAZYSNAP_LOG_SPANS=1 in the environment, lazysnap's logs show every fetch), and
    /// `lazysnap optimize`'s record as lazysnap-optimize-record.jsonl.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
    /// A `[fetch]` setting for lazysnap's runs, repeatable, e.g. `readahead=false`.
    #[arg(long = "fetch-setting", value_name = "KEY=VALUE")]
    fetch_settings: Vec<String>,
    /// Measure nothing: print the table of a saved results.json (and with --out, render the
    /// plot again).
    #[arg(long, value_name = "FILE", conflicts_with = "demo")]
    from_results: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    super::require_root("bench", "it starts containerd, snapshotters and containers")?;
    if let Some(path) = &args.from_results {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let report: BenchReport = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a lazysnap bench results.json", path.display()))?;
        return print_and_write(&report, args.out.as_deref(), false);
    }
    let lazysnap_bin =
        std::env::current_exe().context("finding the lazysnap binary to run as serve/pull")?;
    let mut options = BenchOptions::new(lazysnap_bin);
    if !args.links.is_empty() {
        options.links = args
            .links
            .iter()
            .map(|text| LinkSpec::parse(text))
            .collect::<Result<_, _>>()?;
    }
    options.runs = if args.demo { 1 } else { args.runs };
    options.layer_mb = args.layer_mb;
    options.prefetch = !args.no_prefetch_list;
    options.background_fill = !args.no_background_fill;
    options.step_timeout = std::time::Duration::from_secs(args.step_timeout.max(1));
    // A name of the bench's own images, or a registry reference of the user's.
    match lazysnap::bench::BenchImage::parse(&args.image) {
        Ok(image) => {
            if args.ready_line.is_some() || args.cmd.is_some() {
                anyhow::bail!(
                    "--ready-line and --cmd are for an image of your own (--image REF); {} has its own",
                    args.image
                );
            }
            options.image = image;
        }
        Err(_) if args.image.contains('/') => {
            options.named = Some(lazysnap::bench::NamedImage {
                reference: args.image.clone(),
                ready_line: args.ready_line.clone().unwrap_or_default(),
                cmd: args
                    .cmd
                    .as_deref()
                    .map(lazysnap::bench::parse_cmd)
                    .transpose()?
                    .unwrap_or_default(),
            });
        }
        Err(e) => return Err(e.into()),
    }
    options.cache_dir = args.cache_dir.clone();
    options.compare_no_background = args.compare_no_background;
    options.optimized = args.optimized;
    options.warm = args.warm;
    options.optimized_for = args
        .optimized_for
        .as_deref()
        .map(lazysnap::bench::BenchImage::parse)
        .transpose()?;
    options.chunk_size = args.chunk_size;
    options.logs_dir = args.keep_logs.clone();
    if !args.modes.is_empty() {
        let modes = args
            .modes
            .iter()
            .map(|name| {
                Mode::parse(name).with_context(|| {
                    format!(
                        "--modes {name:?}: choose overlayfs, lazysnap, lazysnap-nobg, \
                         lazysnap-opt, stargz or soci"
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        options.only_modes = Some(modes);
    }
    for setting in &args.fetch_settings {
        let (key, value) = setting
            .split_once('=')
            .with_context(|| format!("--fetch-setting {setting:?}: write KEY=VALUE"))?;
        options
            .fetch_settings
            .push(format!("{} = {}", key.trim(), value.trim()));
    }
    let probe = format!("[fetch]\n{}\n", options.fetch_settings.join("\n"));
    lazysnap::config::Config::parse(&probe, "--fetch-setting")?;
    if let Some(path) = &args.stargz_grpc {
        anyhow::ensure!(
            path.is_file(),
            "--stargz-grpc {}: no such file (build one with ../shared/peers/stargz/build.sh OUT)",
            path.display()
        );
        options.stargz_grpc = Some(path.clone());
    }
    if let Some(path) = &args.soci_grpc {
        anyhow::ensure!(
            path.is_file(),
            "--soci-grpc {}: no such file (scripts/get-soci.sh extracts soci-snapshotter-grpc \
             from Debian's package)",
            path.display()
        );
        options.soci_grpc = Some(path.clone());
    }
    if let Some(dir) = &args.state_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating --state-dir {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving --state-dir {}", dir.display()))?;
        // Everything the bench and the test bed create goes under TMPDIR; nothing else runs yet.
        std::env::set_var("TMPDIR", dir);
    }
    bench::install_interrupt_handler()?;
    if args.demo {
        eprintln!("{}", demo_intro(&options));
    }
    let report = bench::run_bench(&options, &|line| eprintln!("bench: {line}"))?;
    out!("");
    print_and_write(&report, args.out.as_deref(), args.demo)
}

fn print_and_write(
    report: &BenchReport,
    out: Option<&std::path::Path>,
    explain: bool,
) -> anyhow::Result<ExitCode> {
    print!("{}", bench::render_table(report));
    for note in &report.notes {
        out!("note: {note}");
    }
    if explain {
        out!("\n{}", demo_explanation(report));
    }
    if let Some(dir) = out {
        let written = bench::write_results(report, dir)?;
        for path in written {
            eprintln!("bench: wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn demo_intro(options: &BenchOptions) -> String {
    let links: Vec<String> = options.links.iter().map(|l| l.label.clone()).collect();
    format!(
        "lazysnap demo: a local registry, lazysnap and containerd on 127.0.0.1.\n\
         A sample image (busybox + a {} MB app layer) is pushed as plain gzip and converted to \
         eStargz.\nFor each link ({}) it is pulled and started twice, cold: once the way \
         containerd does by default\n(download + unpack every layer to overlayfs) and once \
         lazily through lazysnap. This takes a minute or two.\n",
        options.layer_mb,
        links.join(", ")
    )
}

fn demo_explanation(report: &BenchReport) -> String {
    let mut text = String::from(
        "How to read this: `pull s` is the pull command (overlayfs fetches and unpacks every \
         layer;\nlazysnap fetches only each layer's table of contents and mounts it). \
         `create s` makes the container\nand its writable snapshot; `run s` starts it until it \
         prints `ready` (lazysnap fetches the files the\ncommand reads on demand). `MB to ready` \
         is what the registry served until then.",
    );
    let lazily_pulled = |r: &&lazysnap::bench::ModeResult| {
        r.mode == Mode::Lazysnap && r.runs.iter().all(|run| run.lazy_layers.unwrap_or(0) > 0)
    };
    let best = report
        .results
        .iter()
        .filter(lazily_pulled)
        .filter_map(|r| r.speedup.map(|s| (r.link.clone(), s)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    match best {
        Some((link, speedup)) => text.push_str(&format!(
            "\nOn the {link} link, lazysnap started the container {speedup:.1}x as fast as the \
             overlayfs pull."
        )),
        None => text.push_str(
            "\nThis build mounted no layer lazily (see the notes): both modes downloaded and \
             unpacked the whole image,\nso the table shows lazysnap's fallback path, not lazy \
             pulling.",
        ),
    }
    text.push_str(&format!(
        "\nImage: {:.1} MB as gzip, {:.1} MB as eStargz ({} layers, converted by {}); state in {}.",
        report.image.gzip_bytes as f64 / 1e6,
        report.image.estargz_bytes as f64 / 1e6,
        report.image.layers,
        report.image.converter,
        report.state_dir
    ));
    text
}
