//! `lazysnap bench`: container startup latency (pull, create + run until the workload is ready)
//! of lazysnap against containerd's default overlayfs pull, on loopback links emulated in front
//! of a local registry. Starts everything itself on 127.0.0.1 (registry, link emulators,
//! `lazysnap serve` then containerd, runc), every measured run cold, and tears it all down.
//!
//! ```no_run
//! use lazysnap::bench::{run_bench, BenchOptions};
//! let options = BenchOptions::new("/usr/local/bin/lazysnap".into());
//! let report = run_bench(&options, &|line| eprintln!("{line}")).unwrap();
//! print!("{}", lazysnap::bench::render_table(&report));
//! ```

mod debian_image;
mod image;
mod link;
mod named_image;
mod procs;
mod report;
mod soci;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::image::OciLayout;
use crate::rig::images::{push_layout_image, write_image, ImageOptions};
use crate::rig::{
    require_program, ContainerdOptions, ContainerdServer, LinkEmulator, RegistryServer, RigError,
};

pub use image::{READY_MARKER, STARTUP_FILES, WORKLOAD};
pub use link::LinkSpec;
pub use report::{
    compute_ratios, median, render_svg, render_table, BenchReport, ImageReport, Mode, ModeResult,
    RunResult, Summary,
};

use debian_image::Runtime;
pub use named_image::{parse_cmd, NamedImage};
use procs::{run_timed, run_watched, tail, ServeProcess};
use soci::{SociPeer, SociTools};

/// Repository the sample image is pushed to.
const REPOSITORY: &str = "bench/app";
/// containerd namespace the bench pulls into.
const NAMESPACE: &str = "lazysnap-bench";
/// Layer digest annotation that marks a layer as lazily pullable eStargz.
const TOC_ANNOTATION: &str = crate::labels::TOC_DIGEST;

/// Errors of the bench; each names the step and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("lazysnap bench must run as root: it starts containerd and runc and mounts FUSE and overlay filesystems (rerun with sudo)")]
    NotRoot,
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Testbed(#[from] RigError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Step { what: String, detail: String },
    #[error("invalid link {spec:?}: {reason} (write e.g. `unlimited`, `20mbit:50ms` or `500kbit:200ms:20ms:1%`: rate, round-trip time, then optionally jitter and loss)")]
    BadLink { spec: String, reason: String },
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("interrupted; everything the bench started has been stopped")]
    Interrupted,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `lazysnap` binary to run as `serve`, `pull` and `convert`.
    pub lazysnap_bin: PathBuf,
    /// Links to emulate, each measured with every mode.
    pub links: Vec<LinkSpec>,
    /// Cold runs per link and mode (the table shows medians).
    pub runs: usize,
    /// Size of the sample app layer's file content in MB.
    pub layer_mb: u64,
    /// Give the converter the workload's startup files as a prefetch list.
    pub prefetch: bool,
    /// lazysnap's background fill of the rest of each layer (`[fetch] background_fill`).
    pub background_fill: bool,
    /// Deadline for each pull, run or conversion.
    pub step_timeout: Duration,
    /// The image and workload measured.
    pub image: BenchImage,
    /// Where images built from Debian packages are kept between runs.
    pub cache_dir: PathBuf,
    /// Also measure lazysnap with background fill off (mode `lazysnap-nobg`).
    pub compare_no_background: bool,
    /// A stargz-snapshotter daemon (`containerd-stargz-grpc`) to measure beside lazysnap, on the
    /// image stargz's own converter writes (mode `stargz`).
    pub stargz_grpc: Option<PathBuf>,
    /// SOCI's daemon (`soci-snapshotter-grpc`, with the `soci` CLI beside it) to measure beside
    /// lazysnap, on the gzip image with the index `soci create` builds (mode `soci`).
    pub soci_grpc: Option<PathBuf>,
    /// Extra `[fetch]` settings of `lazysnap serve` (`key = value` lines).
    pub fetch_settings: Vec<String>,
    /// Only these modes (`None`: overlayfs and lazysnap, plus those the options above add).
    pub only_modes: Option<Vec<Mode>>,
    /// Also measure the images optimized for the workload: `lazysnap optimize`'s (mode
    /// `lazysnap-opt`) and, with `stargz_grpc`, `ctr-remote image optimize`'s (mode
    /// `stargz-opt`), beside the unoptimized conversions.
    pub optimized: bool,
    /// Optimize for this image's workload instead of the measured one (`None`: the measured).
    pub optimized_for: Option<BenchImage>,
    /// After each cold run, start the workload again on the same node (image, snapshots and
    /// caches kept) and time that create + run too.
    pub warm: bool,
    /// A user's own image instead of `image`.
    pub named: Option<NamedImage>,
    /// `lazysnap convert --chunk-size` (`None`: its default).
    pub chunk_size: Option<u64>,
    /// Keep each run's snapshotter log here as `LINK-MODE-RUN.log` (`None`: logs go with the
    /// run's state).
    pub logs_dir: Option<PathBuf>,
}

/// The image and workload a bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchImage {
    /// busybox + a generated app layer whose workload reads a few small files.
    Sample,
    /// python3 from Debian packages (three layers), running `python3 -c 'print(1)'`.
    Python3Print,
    /// The same image running an app that imports json and hashlib and hashes a 4 MiB file.
    Python3App,
    /// node from Debian packages running a script that loads crypto and zlib.
    NodeApp,
    /// gcc from Debian packages compiling and running hello world.
    GccHello,
    /// A Java runtime (OpenJDK 17) from Debian packages running a class that prints a line.
    JavaHello,
}

/// Every bench image, in the order `--image` lists them.
pub const BENCH_IMAGES: [BenchImage; 6] = [
    BenchImage::Sample,
    BenchImage::Python3Print,
    BenchImage::Python3App,
    BenchImage::NodeApp,
    BenchImage::GccHello,
    BenchImage::JavaHello,
];

impl BenchImage {
    /// Parses an image name (see [`BenchImage::name`]).
    pub fn parse(text: &str) -> Result<Self, BenchError> {
        BENCH_IMAGES
            .into_iter()
            .find(|image| image.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = BENCH_IMAGES.iter().map(|i| i.name()).collect();
                BenchError::Invalid(format!(
                    "--image {text:?}: choose one of {}",
                    names.join(", ")
                ))
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sample => "sample",
            Self::Python3Print => "python3-print",
            Self::Python3App => "python3-app",
            Self::NodeApp => "node-app",
            Self::GccHello => "gcc-hello",
            Self::JavaHello => "java-hello",
        }
    }

    /// The Debian runtime the image is built of (`None`: the generated sample).
    fn runtime(self) -> Option<Runtime> {
        match self {
            Self::Sample => None,
            Self::Python3Print | Self::Python3App => Some(Runtime::Python3),
            Self::NodeApp => Some(Runtime::Node),
            Self::GccHello => Some(Runtime::Gcc),
            Self::JavaHello => Some(Runtime::Java),
        }
    }

    /// The container's command.
    pub fn workload(self) -> Vec<String> {
        let argv: &[&str] = match self {
            Self::Sample => &WORKLOAD,
            Self::Python3Print => &["python3", "-c", "print(1)"],
            Self::Python3App => &["python3", "/app/main.py"],
            Self::NodeApp => &["node", "/app/main.js"],
            Self::GccHello => &["sh", "-c", "gcc -o /tmp/hello /app/hello.c && /tmp/hello"],
            Self::JavaHello => &["java", "-cp", "/app", "Hello"],
        };
        argv.iter().map(|s| s.to_string()).collect()
    }

    /// A line the workload must print, proving it read its files right.
    pub fn expected_line(self) -> Option<String> {
        match self {
            Self::Python3App => Some(debian_image::app_expected_output()),
            _ => None,
        }
    }

    /// The stdout line that says the workload is ready.
    pub fn ready_line(self) -> &'static str {
        match self {
            Self::Python3Print => "1",
            _ => READY_MARKER,
        }
    }
}

impl BenchOptions {
    /// Defaults: links `unlimited` and `20mbit:50ms`, 5 runs, a 40 MB app layer, prefetch list
    /// on, background fill on (lazysnap's default), 10 minutes per step.
    pub fn new(lazysnap_bin: PathBuf) -> Self {
        Self {
            lazysnap_bin,
            links: vec![
                LinkSpec {
                    label: "unlimited".into(),
                    rate_bits_per_sec: None,
                    rtt: Duration::ZERO,
                    jitter: Duration::ZERO,
                    loss: 0.0,
                },
                LinkSpec {
                    label: "20mbit:50ms".into(),
                    rate_bits_per_sec: Some(20_000_000),
                    rtt: Duration::from_millis(50),
                    jitter: Duration::ZERO,
                    loss: 0.0,
                },
            ],
            runs: 5,
            layer_mb: 40,
            prefetch: true,
            background_fill: true,
            step_timeout: Duration::from_secs(600),
            image: BenchImage::Sample,
            cache_dir: PathBuf::from("/var/cache/lazysnap-bench"),
            compare_no_background: false,
            stargz_grpc: None,
            soci_grpc: None,
            fetch_settings: Vec::new(),
            only_modes: None,
            optimized: false,
            optimized_for: None,
            warm: false,
            named: None,
            chunk_size: None,
            logs_dir: None,
        }
    }

    /// The container's command (empty: the image's own entrypoint and cmd).
    pub fn workload(&self) -> Vec<String> {
        match &self.named {
            Some(named) => named.cmd.clone(),
            None => self.image.workload(),
        }
    }

    /// The stdout line that says the workload is ready.
    pub fn ready_line(&self) -> &str {
        match &self.named {
            Some(named) => &named.ready_line,
            None => self.image.ready_line(),
        }
    }

    /// A line the workload must print, proving it read its files right.
    fn expected_line(&self) -> Option<String> {
        match &self.named {
            Some(_) => None,
            None => self.image.expected_line(),
        }
    }

    /// The modes measured, in order.
    pub fn modes(&self) -> Vec<Mode> {
        if let Some(only) = &self.only_modes {
            return only.clone();
        }
        let mut modes = vec![Mode::Overlayfs, Mode::Lazysnap];
        if self.compare_no_background {
            modes.push(Mode::LazysnapNoBackground);
        }
        if self.optimized {
            modes.push(Mode::LazysnapOptimized);
        }
        if self.stargz_grpc.is_some() {
            modes.push(Mode::Stargz);
            if self.optimized {
                modes.push(Mode::StargzOptimized);
            }
        }
        if self.soci_grpc.is_some() {
            modes.push(Mode::Soci);
        }
        modes
    }

    fn validate(&self) -> Result<(), BenchError> {
        if self.links.is_empty() {
            return Err(BenchError::Invalid("give at least one --link".into()));
        }
        if self.runs == 0 || self.runs > 100 {
            return Err(BenchError::Invalid(format!(
                "--runs {} must be between 1 and 100",
                self.runs
            )));
        }
        if let Some(only) = &self.only_modes {
            if only.is_empty() {
                return Err(BenchError::Invalid("--modes names no mode".into()));
            }
            if only.iter().any(|m| m.is_stargz()) && self.stargz_grpc.is_none() {
                return Err(BenchError::Invalid(
                    "--modes stargz and stargz-opt need --stargz-grpc PATH".into(),
                ));
            }
            if only.iter().any(|m| m.is_optimized()) && !self.optimized {
                return Err(BenchError::Invalid(
                    "--modes lazysnap-opt and stargz-opt need --optimized".into(),
                ));
            }
            if only.contains(&Mode::Soci) && self.soci_grpc.is_none() {
                return Err(BenchError::Invalid(
                    "--modes soci needs --soci-grpc PATH".into(),
                ));
            }
        }
        if self.named.is_some() && self.optimized_for.is_some() {
            return Err(BenchError::Invalid(
                "--optimized-for names a built-in image; with --image REF the image is optimized \
                 for its own workload"
                    .into(),
            ));
        }
        if let Some(named) = &self.named {
            if named.ready_line.is_empty() {
                return Err(BenchError::Invalid(format!(
                    "--image {} needs --ready-line TEXT: the line its workload prints once ready",
                    named.reference
                )));
            }
        }
        if let Some(other) = self.optimized_for {
            if other.runtime() != self.image.runtime() {
                return Err(BenchError::Invalid(format!(
                    "--optimized-for {} runs on another image than --image {}: name a workload of \
                     the same image",
                    other.name(),
                    self.image.name()
                )));
            }
        }
        if self.layer_mb == 0 || self.layer_mb > 4096 {
            return Err(BenchError::Invalid(format!(
                "--layer-mb {} must be between 1 and 4096",
                self.layer_mb
            )));
        }
        Ok(())
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM stop the bench between steps (tearing everything down) instead of
/// killing it with containerd, mounts and the registry left behind.
pub fn install_interrupt_handler() -> Result<(), BenchError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(note_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.map_err(|errno| BenchError::Io {
            context: format!("installing the {signal} handler"),
            source: std::io::Error::from(errno),
        })?;
    }
    Ok(())
}

pub(crate) fn check_interrupted() -> Result<(), BenchError> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(BenchError::Interrupted)
    } else {
        Ok(())
    }
}

/// Fails with a message naming what to install when the bench cannot run here.
pub fn check_environment(options: &BenchOptions) -> Result<(), BenchError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BenchError::NotRoot);
    }
    for (program, package) in [
        ("/usr/bin/containerd", "containerd"),
        ("/usr/bin/ctr", "containerd"),
        ("/usr/sbin/runc", "runc"),
        ("/usr/bin/docker-registry", "docker-registry"),
        ("/usr/bin/curl", "curl"),
        ("/bin/busybox", "busybox-static"),
    ] {
        require_program(program, package)?;
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(BenchError::Missing(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) and install fuse3".into(),
        ));
    }
    if !options.lazysnap_bin.is_file() {
        return Err(BenchError::Missing(format!(
            "the lazysnap binary {} does not exist: build it with `cargo build --release`",
            options.lazysnap_bin.display()
        )));
    }
    Ok(())
}

/// Detaches every mount left under the bench's work dir when dropped (declared after the temp
/// dir so it runs before the dir is removed).
struct UnmountGuard(PathBuf);

impl Drop for UnmountGuard {
    fn drop(&mut self) {
        crate::rig::unmount_under(&self.0);
    }
}

/// Runs the whole bench and returns what it measured. `progress` gets one line per step.
pub fn run_bench(
    options: &BenchOptions,
    progress: &dyn Fn(&str),
) -> Result<BenchReport, BenchError> {
    options.validate()?;
    check_environment(options)?;
    let state_parent = std::env::temp_dir();
    let work = tempfile::Builder::new()
        .prefix("lazysnap-bench-")
        .tempdir_in(&state_parent)
        .map_err(procs::io_error(format!(
            "creating a work dir in {}",
            state_parent.display()
        )))?;
    let _unmount = UnmountGuard(work.path().to_path_buf());
    let mut notes = Vec::new();

    progress("starting the registry on 127.0.0.1");
    let registry = RegistryServer::start()?;
    check_interrupted()?;
    let mut named_layers = 0;

    let workload = options.workload();
    let gzip_target = format!("{}/{REPOSITORY}:gzip", registry.host());
    // The image as containerd's default pull sees it, pushed as `gzip`; `None` for a user's own
    // image, copied there unchanged.
    let sample = match (&options.named, options.image.runtime()) {
        (Some(named), _) => {
            progress(&format!(
                "copying {} into the bench's registry",
                named.reference
            ));
            let copied = named_image::copy_image(&named.reference, &gzip_target, progress)?;
            notes.push(format!(
                "the image is {}, copied unchanged (tag gzip) and converted from there",
                named.reference
            ));
            named_layers = copied.layers;
            None
        }
        (None, None) => {
            progress(&format!(
                "generating the sample image (busybox + {} MB app layer)",
                options.layer_mb
            ));
            Some(image::sample_image(options.layer_mb)?)
        }
        (None, Some(runtime)) => Some(debian_image::debian_image(
            &options.cache_dir,
            runtime,
            progress,
        )?),
    };
    if let Some(sample) = &sample {
        let layout_error = |e: crate::image::ImageError| BenchError::Step {
            what: "writing the sample image layout".into(),
            detail: e.to_string(),
        };
        let gzip_layout =
            OciLayout::create(&work.path().join("gzip-layout")).map_err(layout_error)?;
        write_image(
            &gzip_layout,
            &sample.layers,
            &ImageOptions {
                cmd: workload.clone(),
                ..ImageOptions::default()
            },
            Some("gzip"),
        )?;
        push_layout_image(
            &gzip_layout,
            Some("gzip"),
            &registry.host(),
            REPOSITORY,
            "gzip",
        )?;
    }
    check_interrupted()?;

    let prefetch_list: Vec<String> =
        if options.prefetch && options.named.is_none() && options.image == BenchImage::Sample {
            STARTUP_FILES.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        };
    progress("converting the sample image to eStargz with `lazysnap convert`");
    let converter = convert_sample(
        options,
        &registry,
        work.path(),
        sample.as_ref(),
        &prefetch_list,
        &workload,
        &mut notes,
        progress,
    )?;
    let modes = options.modes();
    if modes.contains(&Mode::Stargz) {
        progress("converting the image with `ctr-remote image convert --estargz` for stargz");
        convert_with_ctr_remote(options, &registry, None)?;
        notes.push(format!(
            "stargz runs on the image converted by its own tool (`ctr-remote image convert \
             --estargz --oci`, tag {CTR_REMOTE_TAG}); lazysnap on the one `lazysnap convert` wrote"
        ));
    }
    let mut ideal_bytes = None;
    if options.optimized {
        let target = options.optimized_for.map(BenchImage::workload);
        let target = target.as_deref().unwrap_or(&workload);
        if target != workload.as_slice() {
            notes.push(format!(
                "the optimized images were made for another workload: {}",
                target.join(" ")
            ));
        }
        if modes.contains(&Mode::StargzOptimized) {
            progress("optimizing the image for the workload with `ctr-remote image optimize`");
            convert_with_ctr_remote(options, &registry, Some(target))?;
            notes.push(format!(
                "stargz-opt runs on the image `ctr-remote image optimize` wrote for the workload \
                 (tag {OPTIMIZED_TAG}: the files it opened first, then the prefetch landmark)"
            ));
        }
        if modes.contains(&Mode::LazysnapOptimized) {
            progress("optimizing the image for the workload with `lazysnap optimize`");
            let used = optimize_with_lazysnap(options, &registry, work.path(), target, progress)?;
            // Only the measured workload's reads bound its start.
            if target == workload.as_slice() {
                ideal_bytes = Some(used.prefetch_bytes + used.toc_bytes);
            }
            notes.push(format!(
                "lazysnap-opt runs on the image `lazysnap optimize` wrote for the workload (tag \
                 {LAZYSNAP_OPTIMIZED_TAG}: the chunks it read first, in the order it read them)"
            ));
        }
    }
    let soci = match (&options.soci_grpc, modes.contains(&Mode::Soci)) {
        (Some(daemon), true) => {
            progress("building the SOCI index with `soci create` and pushing it with `soci push`");
            let peer =
                SociPeer::prepare(options, SociTools::beside(daemon)?, work.path(), &registry)?;
            notes.push(format!(
                "soci runs on the gzip image (tag {}) with the index `soci create` built with its \
                 defaults (4 MiB spans; layers under 10 MiB are fetched whole), served over HTTPS \
                 as {} (SOCI 0.4.1 reads indexes over HTTPS only)",
                soci::SOCI_TAG,
                peer.registry_name
            ));
            Some(peer)
        }
        _ => None,
    };
    let gzip_layers = image::registry_layers(&registry.url(), REPOSITORY, "gzip")?;
    let estargz_layers = image::registry_layers(&registry.url(), REPOSITORY, "estargz")?;
    let image_report = ImageReport {
        gzip_reference: format!("{}/{REPOSITORY}:gzip", registry.host()),
        estargz_reference: format!("{}/{REPOSITORY}:estargz", registry.host()),
        layers: sample.as_ref().map_or(named_layers, |s| s.layers.len()),
        app_bytes: sample.as_ref().map_or(0, |s| s.app_bytes),
        app_files: sample.as_ref().map_or(0, |s| s.app_files),
        gzip_bytes: gzip_layers.iter().map(|l| l.size).sum(),
        estargz_bytes: estargz_layers.iter().map(|l| l.size).sum(),
        workload: workload.clone(),
        prefetch_list: prefetch_list.clone(),
        converter,
    };

    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], registry.port()));
    let mut results = Vec::new();
    for link in &options.links {
        let emulator = LinkEmulator::start(upstream, link.profile())?;
        let host = format!("127.0.0.1:{}", emulator.addr().port());
        // SOCI reads through its own emulator of the same link in front of the HTTPS registry;
        // runs are sequential, so the two never share the link.
        let soci_link = match &soci {
            Some(peer) => {
                let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], peer.registry.port()));
                let emulator = LinkEmulator::start(upstream, link.profile())?;
                let reference = peer.reference(emulator.addr().port());
                Some((peer, reference, emulator))
            }
            None => None,
        };
        let mut per_mode: Vec<(Mode, Vec<RunResult>)> = options
            .modes()
            .into_iter()
            .map(|m| (m, Vec::new()))
            .collect();
        for run_index in 0..options.runs {
            for (mode, runs) in per_mode.iter_mut() {
                check_interrupted()?;
                progress(&format!(
                    "link {link}: {} run {}/{}",
                    mode.name(),
                    run_index + 1,
                    options.runs
                ));
                let measured = measure_once(
                    options,
                    work.path(),
                    &registry,
                    &host,
                    soci_link
                        .as_ref()
                        .map(|(peer, reference, _)| (*peer, reference.as_str())),
                    link,
                    *mode,
                    run_index,
                )?;
                progress(&format!(
                    "  pull {:.2} s, create {:.2} s, run {:.2} s, {:.1} MB fetched{}",
                    measured.pull_secs,
                    measured.create_secs,
                    measured.run_secs,
                    measured.fetched_bytes as f64 / 1e6,
                    measured
                        .lazy_layers
                        .map(|lazy| format!(", {lazy}/{} layers lazy", measured.layers))
                        .unwrap_or_default()
                ));
                if mode.is_lazysnap() && measured.lazy_layers == Some(0) {
                    let note = format!(
                        "link {link}: no layer was mounted lazily (lazysnap fell back to fetch + unpack for every layer)"
                    );
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                }
                runs.push(measured);
            }
        }
        drop(soci_link);
        drop(emulator);
        for (mode, runs) in per_mode {
            results.push(ModeResult {
                link: link.label.clone(),
                mode,
                median: Summary::of(&runs),
                runs,
                speedup: None,
                vs_best_peer: None,
                vs_ideal: None,
            });
        }
    }
    compute_ratios(&mut results);
    if let Some(bytes) = ideal_bytes {
        let ideal: Vec<(String, f64)> = options
            .links
            .iter()
            .filter_map(|link| {
                let secs = report::ideal_secs(bytes, link.rate_bits_per_sec, link.rtt)?;
                Some((link.label.clone(), secs))
            })
            .collect();
        report::compute_ideal_ratios(&mut results, &ideal);
    }
    if options.background_fill {
        notes.push(
            "MB fetched counts what the registry sent until the ready line, including lazysnap's \
             background fill of the rest of each layer (and bytes still queued in the link \
             emulator); --no-background-fill shows only what startup needed"
                .to_string(),
        );
    }
    let finished_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(BenchReport {
        lazysnap_version: env!("CARGO_PKG_VERSION").to_string(),
        finished_unix,
        runs_per_mode: options.runs,
        image: image_report,
        state_dir: state_parent.display().to_string(),
        background_fill: options.background_fill,
        ideal_bytes,
        results,
        notes,
    })
}

/// Converts the pushed gzip image to `…:estargz` with `lazysnap convert`; when the binary fails
/// or writes layers without the TOC annotation, converts in-process instead and says so in
/// `notes`. Returns the converter used.
#[allow(clippy::too_many_arguments)]
fn convert_sample(
    options: &BenchOptions,
    registry: &RegistryServer,
    work: &Path,
    sample: Option<&image::SampleImage>,
    prefetch_list: &[String],
    workload: &[String],
    notes: &mut Vec<String>,
    progress: &dyn Fn(&str),
) -> Result<String, BenchError> {
    let source = format!("{}/{REPOSITORY}:gzip", registry.host());
    let target = format!("{}/{REPOSITORY}:estargz", registry.host());
    let mut command = Command::new(&options.lazysnap_bin);
    command.arg("convert");
    if let Some(chunk_size) = options.chunk_size {
        command.arg("--chunk-size").arg(chunk_size.to_string());
    }
    if !prefetch_list.is_empty() {
        let list = work.join("prefetch-list.txt");
        image::write_prefetch_list(&list, prefetch_list)?;
        command.arg("--prefetch-list").arg(list);
    }
    command.arg(&source).arg(&target);
    let by_binary = run_timed(command, "lazysnap convert", options.step_timeout, None)
        .and_then(|finished| finished.success("lazysnap convert"))
        .and_then(|_| {
            let layers = image::registry_layers(&registry.url(), REPOSITORY, "estargz")?;
            if layers
                .iter()
                .all(|layer| layer.annotations.contains_key(TOC_ANNOTATION))
            {
                Ok(())
            } else {
                Err(BenchError::Step {
                    what: "lazysnap convert".into(),
                    detail: format!("the converted layers lack the {TOC_ANNOTATION} annotation"),
                })
            }
        });
    check_interrupted()?;
    match by_binary {
        Ok(()) => Ok("lazysnap convert".into()),
        Err(err) => {
            // A user's image has no layers in hand for the in-process writer.
            let Some(sample) = sample else {
                return Err(err);
            };
            let first_line = err
                .to_string()
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ");
            notes.push(format!(
                "`lazysnap convert` could not convert the sample image ({first_line}); the bench \
                 used the in-process eStargz writer (same format and options) instead"
            ));
            progress("`lazysnap convert` failed; converting with the in-process eStargz writer");
            let layout =
                OciLayout::create(&work.join("estargz-layout")).map_err(|e| BenchError::Step {
                    what: "creating the eStargz layout".into(),
                    detail: e.to_string(),
                })?;
            image::write_estargz_image(&layout, sample, prefetch_list, workload, "estargz")?;
            push_layout_image(
                &layout,
                Some("estargz"),
                &registry.host(),
                REPOSITORY,
                "estargz",
            )?;
            Ok("builtin".into())
        }
    }
}

/// Tag of the image `ctr-remote image convert --estargz` wrote (what the stargz mode pulls).
const CTR_REMOTE_TAG: &str = "ctr-remote";
/// Tag of the image `ctr-remote image optimize` wrote (what the stargz-opt mode pulls).
const OPTIMIZED_TAG: &str = "ctr-remote-opt";

/// `--entrypoint=[argv0]` and `--args=[rest]` (JSON arrays) running `workload`, as both
/// `lazysnap optimize` and `ctr-remote image optimize` take them.
fn workload_flags(workload: &[String]) -> Vec<String> {
    if workload.is_empty() {
        // The image's own entrypoint and cmd.
        return Vec::new();
    }
    let json = |items: &[String]| serde_json::to_string(items).unwrap_or_default();
    let (entrypoint, args) = workload.split_at(1);
    vec![
        format!("--entrypoint={}", json(entrypoint)),
        format!("--args={}", json(args)),
    ]
}

/// Tag of the image `lazysnap optimize` wrote (what the lazysnap-opt mode pulls).
const LAZYSNAP_OPTIMIZED_TAG: &str = "lazysnap-opt";

/// Optimizes the pushed gzip image for `workload` with `lazysnap optimize` (tag
/// [`LAZYSNAP_OPTIMIZED_TAG`]), recording until the workload exits. Returns the total of its
/// report: what the workload read, and what the optimized image prefetches.
fn optimize_with_lazysnap(
    options: &BenchOptions,
    registry: &RegistryServer,
    work: &Path,
    workload: &[String],
    progress: &dyn Fn(&str),
) -> Result<crate::optimize::LayerUse, BenchError> {
    let report_path = work.join("lazysnap-optimize-report.json");
    let mut command = Command::new(&options.lazysnap_bin);
    command.arg("optimize");
    match &options.named {
        // A user's workload may run on once ready: its start is recorded until then.
        Some(named) => command.args(["--wait-on-line", named.ready_line.as_str()]),
        None => command.args(["--period", "120s"]),
    };
    command
        .arg("--report-json")
        .arg(&report_path)
        .args(workload_flags(workload))
        .arg(format!("{}/{REPOSITORY}:gzip", registry.host()))
        .arg(format!(
            "{}/{REPOSITORY}:{LAZYSNAP_OPTIMIZED_TAG}",
            registry.host()
        ));
    if let Some(chunk_size) = options.chunk_size {
        command.arg("--chunk-size").arg(chunk_size.to_string());
    }
    if let Some(logs) = &options.logs_dir {
        std::fs::create_dir_all(logs).map_err(procs::io_error(format!(
            "creating the logs directory {}",
            logs.display()
        )))?;
        command
            .arg("--record-out")
            .arg(logs.join("lazysnap-optimize-record.jsonl"));
    }
    let what = "lazysnap optimize";
    let finished = run_timed(command, what, options.step_timeout, None)?.success(what)?;
    for line in finished.stdout.lines() {
        progress(&format!("  {line}"));
    }
    check_interrupted()?;
    let unreadable = |detail: String| BenchError::Step {
        what: format!("reading {}", report_path.display()),
        detail,
    };
    let text = std::fs::read(&report_path).map_err(|e| unreadable(e.to_string()))?;
    let report: OptimizeJson =
        serde_json::from_slice(&text).map_err(|e| unreadable(e.to_string()))?;
    Ok(report.total)
}

/// The part of `lazysnap optimize --report-json` the bench reads.
#[derive(serde::Deserialize)]
struct OptimizeJson {
    total: crate::optimize::LayerUse,
}

/// Converts the pushed gzip image with stargz's own converter, as a stargz user would: pulled
/// into a scratch containerd, then `ctr-remote image convert --estargz --oci` (tag
/// [`CTR_REMOTE_TAG`]) or, given the workload, `ctr-remote image optimize --oci` running it
/// (tag [`OPTIMIZED_TAG`]), and pushed.
fn convert_with_ctr_remote(
    options: &BenchOptions,
    registry: &RegistryServer,
    optimize_for: Option<&[String]>,
) -> Result<(), BenchError> {
    require_program("/usr/bin/ctr-remote", "stargz-snapshotter")?;
    let containerd = ContainerdServer::start(&ContainerdOptions::default())?;
    let source = format!("{}/{REPOSITORY}:gzip", registry.host());
    let tag = if optimize_for.is_some() {
        OPTIMIZED_TAG
    } else {
        CTR_REMOTE_TAG
    };
    let target = format!("{}/{REPOSITORY}:{tag}", registry.host());
    let convert: Vec<String> = match optimize_for {
        Some(workload) => {
            let mut args: Vec<String> = vec!["image".into(), "optimize".into(), "--oci".into()];
            args.extend(workload_flags(workload));
            args.extend([source.clone(), target.clone()]);
            args
        }
        None => ["image", "convert", "--estargz", "--oci", &source, &target]
            .map(String::from)
            .to_vec(),
    };
    let convert: Vec<&str> = convert.iter().map(String::as_str).collect();
    let steps: [&[&str]; 3] = [
        &["images", "pull", "--plain-http", &source],
        &convert,
        &["images", "push", "--plain-http", &target],
    ];
    for args in steps {
        let mut command = Command::new("/usr/bin/ctr-remote");
        command
            .arg("-a")
            .arg(containerd.address())
            .args(["-n", NAMESPACE])
            .args(args);
        let what = format!("ctr-remote {}", args.join(" "));
        run_timed(command, &what, options.step_timeout, None)?.success(&what)?;
        check_interrupted()?;
    }
    Ok(())
}

/// The `lazysnap serve` config of a measured run.
fn serve_config(options: &BenchOptions, mode: Mode) -> String {
    let mut config = format!(
        "# written by lazysnap bench\n[fetch]\nbackground_fill = {}\n",
        options.background_fill && mode != Mode::LazysnapNoBackground
    );
    for setting in &options.fetch_settings {
        config.push_str(setting);
        config.push('\n');
    }
    config
}

/// The SOCI peer and the reference of its indexed image, which mode soci needs.
fn soci_peer<'a>(
    soci: Option<(&'a SociPeer, &'a str)>,
) -> Result<(&'a SociPeer, &'a str), BenchError> {
    soci.ok_or_else(|| BenchError::Invalid("mode soci needs --soci-grpc PATH".into()))
}

/// One cold measurement: fresh `lazysnap serve` (new root and cache), then a fresh containerd,
/// pull, then `ctr containers create` and `ctr tasks start` until the ready line (with `--warm`
/// once more); everything stopped afterwards. `soci` is the
/// SOCI peer with the reference of its image through this link.
#[allow(clippy::too_many_arguments)]
fn measure_once(
    options: &BenchOptions,
    work: &Path,
    registry: &RegistryServer,
    host: &str,
    soci: Option<(&SociPeer, &str)>,
    link: &LinkSpec,
    mode: Mode,
    run_index: usize,
) -> Result<RunResult, BenchError> {
    let _span = tracing::info_span!(
        "bench_run",
        link = %link,
        mode = mode.name(),
        run = run_index
    )
    .entered();
    let dir = work.join(format!("{}-{}-{}", link.slug(), mode.name(), run_index));
    let peer_plugin = |daemon: ServeProcess, name: &str| {
        let extra = format!(
            "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            daemon.socket().display()
        );
        let options = ContainerdOptions {
            extra_config: Some(extra),
            ..ContainerdOptions::default()
        };
        (daemon, options)
    };
    // SOCI's stores, fresh for this run; dropped after the daemon stops.
    let mut soci_state = None;
    let (mut serve, containerd_options) = match (mode, &options.stargz_grpc, soci) {
        (Mode::Stargz | Mode::StargzOptimized, Some(stargz), _) => peer_plugin(
            ServeProcess::start_stargz(stargz, &dir.join("stargz"))?,
            "stargz",
        ),
        (Mode::Soci, _, Some((peer, _))) => {
            let (daemon, state) = peer.start_daemon(&dir.join("soci"))?;
            soci_state = Some(state);
            peer_plugin(daemon, "soci")
        }
        _ => {
            let daemon = ServeProcess::start(
                &options.lazysnap_bin,
                &dir.join("lazysnap"),
                &serve_config(options, mode),
            )?;
            let options = ContainerdOptions {
                snapshotter_socket: Some(daemon.socket()),
                ..ContainerdOptions::default()
            };
            (daemon, options)
        }
    };
    let containerd = ContainerdServer::start(&containerd_options)?;
    let with_logs = |err: BenchError| match err {
        BenchError::Step { what, detail } => BenchError::Step {
            what,
            detail: format!(
                "{detail}\ncontainerd log (last lines):\n{}\nlazysnap serve log (last lines):\n{}",
                tail(&containerd.log(), 15),
                tail(&serve.log(), 15)
            ),
        },
        other => other,
    };
    let (reference, snapshotter) = match mode {
        Mode::Overlayfs => (format!("{host}/{REPOSITORY}:gzip"), "overlayfs"),
        Mode::LazysnapOptimized => (
            format!("{host}/{REPOSITORY}:{LAZYSNAP_OPTIMIZED_TAG}"),
            "lazysnap",
        ),
        Mode::Lazysnap | Mode::LazysnapNoBackground => {
            (format!("{host}/{REPOSITORY}:estargz"), "lazysnap")
        }
        Mode::StargzOptimized => (format!("{host}/{REPOSITORY}:{OPTIMIZED_TAG}"), "stargz"),
        Mode::Stargz => (format!("{host}/{REPOSITORY}:{CTR_REMOTE_TAG}"), "stargz"),
        Mode::Soci => (soci_peer(soci)?.1.to_string(), "soci"),
    };

    let fetched_so_far = || {
        registry_get_bytes(&registry.log())
            + soci.map_or(0, |(peer, _)| registry_get_bytes(&peer.registry.log()))
    };
    let before = fetched_so_far();
    let pull = match mode {
        Mode::Overlayfs => {
            let mut command = containerd.ctr();
            command.args([
                "-n",
                NAMESPACE,
                "images",
                "pull",
                "--plain-http",
                &reference,
            ]);
            command
        }
        Mode::Stargz | Mode::StargzOptimized => {
            let mut command = Command::new("/usr/bin/ctr-remote");
            command
                .arg("-a")
                .arg(containerd.address())
                .args(["-n", NAMESPACE, "images", "rpull", "--plain-http"])
                .args(["--snapshotter", "stargz"])
                .arg(&reference);
            command
        }
        Mode::Soci => {
            let (peer, _) = soci_peer(soci)?;
            let mut command = peer.cli(&containerd.address());
            command
                .args(["image", "rpull", "--snapshotter", "soci"])
                .arg(&reference);
            command
        }
        Mode::Lazysnap | Mode::LazysnapNoBackground | Mode::LazysnapOptimized => {
            let mut command = Command::new(&options.lazysnap_bin);
            command
                .arg("pull")
                .arg("--containerd")
                .arg(containerd.address())
                .args(["--namespace", NAMESPACE, "--snapshotter", "lazysnap"])
                .arg(&reference);
            command
        }
    };
    let pull_what = format!("pulling {reference} ({})", mode.name());
    let pulled = run_timed(pull, &pull_what, options.step_timeout, None)
        .and_then(|finished| finished.success(&pull_what))
        .map_err(with_logs)?;
    let manifest_layers = |tag: &str| -> Result<usize, BenchError> {
        Ok(image::registry_layers(&registry.url(), REPOSITORY, tag)?.len())
    };
    let (lazy_layers, layers) = match mode {
        Mode::Overlayfs => (None, image_layer_count(&pulled.stdout)),
        // `ctr-remote images rpull` names no layer and `soci image rpull` only those it
        // fetched whole: the manifest counts them.
        Mode::Stargz => (None, manifest_layers(CTR_REMOTE_TAG)?),
        Mode::StargzOptimized => (None, manifest_layers(OPTIMIZED_TAG)?),
        Mode::Soci => (None, manifest_layers(soci::SOCI_TAG)?),
        Mode::Lazysnap | Mode::LazysnapNoBackground | Mode::LazysnapOptimized => {
            let layer_lines: Vec<&str> = pulled
                .stdout
                .lines()
                .filter(|line| line.starts_with("sha256:"))
                .collect();
            let lazy = layer_lines
                .iter()
                .filter(|line| line.contains("  lazy  "))
                .count();
            (Some(lazy), layer_lines.len())
        }
    };
    check_interrupted()?;

    // runc keeps container state under a path shared by every containerd on the node: the id
    // is unique to this bench process so that two benches never share a container.
    let container_id = format!("lazysnap-bench-{}", std::process::id());
    let ready_line = options.ready_line();
    // Runs the workload to its exit; how long it took to print the ready line. Checks that it
    // printed that line and the one proving it read its files right.
    // Creates the container (its snapshot through the snapshotter) and starts it to its exit;
    // how long the create took and how long the start took to print the ready line. Checks that
    // it printed that line and the one proving it read its files right; removes the container.
    let run_workload = |what: &str| -> Result<(Duration, Duration), BenchError> {
        let mut create = containerd.ctr();
        create
            .args([
                "-n",
                NAMESPACE,
                "containers",
                "create",
                "--snapshotter",
                snapshotter,
                &reference,
                &container_id,
                // The workload's own flags (`sh -c`) are not ctr's.
                "--",
            ])
            .args(options.workload());
        let create_what = format!("{what}: ctr containers create");
        let created = run_timed(create, &create_what, options.step_timeout, None)
            .and_then(|finished| finished.success(&create_what))
            .map_err(with_logs)?;
        let remove = || {
            let mut rm = containerd.ctr();
            rm.args(["-n", NAMESPACE, "containers", "rm", &container_id]);
            run_timed(rm, "ctr containers rm", Duration::from_secs(60), None)
                .and_then(|finished| finished.success("ctr containers rm"))
        };
        let mut run = containerd.ctr();
        run.args(["-n", NAMESPACE, "tasks", "start", &container_id]);
        // A user's workload may run on once ready (a server): it is killed then, and its exit
        // status is not its own.
        let stop = || {
            let mut kill = containerd.ctr();
            kill.args([
                "-n",
                NAMESPACE,
                "task",
                "kill",
                "-s",
                "SIGKILL",
                &container_id,
            ]);
            let _ = run_timed(kill, "ctr task kill", Duration::from_secs(30), None);
        };
        let named = options.named.is_some();
        let carry_on = || {};
        let on_ready: &dyn Fn() = if named { &stop } else { &carry_on };
        let ran = run_watched(run, what, options.step_timeout, Some(ready_line), on_ready)
            .and_then(|finished| {
                if named && finished.ready_after.is_some() {
                    Ok(finished)
                } else {
                    finished.success(what)
                }
            });
        let removed = remove();
        let ran = ran
            .and_then(|ran| removed.map(|_| ran))
            .map_err(with_logs)?;
        let ready_after = ran.ready_after.ok_or_else(|| {
            with_logs(BenchError::Step {
                what: what.to_string(),
                detail: format!(
                    "the workload exited 0 without printing {ready_line:?}; stdout: {}",
                    tail(&ran.stdout, 10)
                ),
            })
        })?;
        if let Some(expected) = options.expected_line() {
            if !ran.stdout.lines().any(|line| line == expected) {
                return Err(with_logs(BenchError::Step {
                    what: what.to_string(),
                    detail: format!(
                        "the workload did not print {expected:?} (wrong bytes?); stdout: {}",
                        tail(&ran.stdout, 10)
                    ),
                }));
            }
        }
        Ok((created.elapsed, ready_after))
    };
    let (created, ready_after) = run_workload(&format!("starting {reference} ({})", mode.name()))?;
    let after = fetched_so_far();
    // The same workload again on the same node: image, snapshots and caches kept.
    let warm_run_secs = if options.warm {
        let what = format!("starting {reference} again, warm ({})", mode.name());
        let (created, ready) = run_workload(&what)?;
        Some((created + ready).as_secs_f64())
    } else {
        None
    };
    let in_all = fetched_so_far();
    // overlayfs mode runs a lazysnap serve too, which containerd's default snapshotter never
    // calls: only the daemon that served the snapshots is measured.
    let snapshotter_peak_rss = if mode == Mode::Overlayfs {
        None
    } else {
        serve.peak_rss()
    };
    drop(containerd);
    serve.stop();
    drop(soci_state);
    if let Some(logs) = &options.logs_dir {
        let path = logs.join(format!("{}-{}-{}.log", link.slug(), mode.name(), run_index));
        std::fs::create_dir_all(logs)
            .and_then(|()| std::fs::write(&path, serve.log()))
            .map_err(procs::io_error(format!(
                "keeping the run's log as {}",
                path.display()
            )))?;
    }

    let pull_secs = pulled.elapsed.as_secs_f64();
    let create_secs = created.as_secs_f64();
    let run_secs = ready_after.as_secs_f64();
    Ok(RunResult {
        pull_secs,
        create_secs,
        run_secs,
        total_secs: pull_secs + create_secs + run_secs,
        fetched_bytes: after.saturating_sub(before),
        fetched_all_bytes: Some(in_all.saturating_sub(before)),
        ready: true,
        lazy_layers,
        layers,
        snapshotter_peak_rss,
        warm_run_secs,
    })
}

/// Layers `ctr images pull` reported (its final status lists `layer-sha256:…` lines).
fn image_layer_count(ctr_output: &str) -> usize {
    let mut digests: Vec<&str> = ctr_output
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("layer-sha256:"))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_hexdigit()).next())
        .collect();
    digests.sort_unstable();
    digests.dedup();
    digests.len()
}

/// Sum of the body bytes of every `GET /v2/…` line in the registry's access log.
pub fn registry_get_bytes(log: &str) -> u64 {
    log.lines()
        .filter(|line| line.contains("\"GET /v2/"))
        .filter_map(|line| {
            let after_request = line.split("\" ").nth(1)?;
            let mut fields = after_request.split_whitespace();
            let _status: u16 = fields.next()?.parse().ok()?;
            fields.next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Writes `results.json`, `startup.svg`, `startup.png`, `table.txt` and `table.md` into `dir`
/// (created); returns the paths.
pub fn write_results(report: &BenchReport, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(procs::io_error(format!(
        "creating the output dir {}",
        dir.display()
    )))?;
    let json = serde_json::to_vec_pretty(report).map_err(|e| BenchError::Step {
        what: "serializing results.json".into(),
        detail: e.to_string(),
    })?;
    let svg = render_svg(report);
    let png = report::render_png(&svg).map_err(|detail| BenchError::Step {
        what: "drawing startup.png".into(),
        detail,
    })?;
    let files = [
        (dir.join("results.json"), json),
        (dir.join("startup.png"), png),
        (dir.join("startup.svg"), svg.into_bytes()),
        (dir.join("table.txt"), render_table(report).into_bytes()),
        (
            dir.join("table.md"),
            report::render_markdown(report).into_bytes(),
        ),
    ];
    let mut written = Vec::new();
    for (path, bytes) in files {
        std::fs::write(&path, bytes)
            .map_err(procs::io_error(format!("writing {}", path.display())))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_get_bytes_from_the_access_log() {
        let log = concat!(
            "127.0.0.1 - - [22/Nov/2026:03:00:00 +0000] \"GET /v2/bench/app/blobs/sha256:aa HTTP/1.1\" 200 1000 \"\" \"containerd/1.6\"\n",
            "127.0.0.1 - - [22/Nov/2026:03:00:01 +0000] \"GET /v2/bench/app/blobs/sha256:bb HTTP/1.1\" 206 24 \"\" \"lazysnap\"\n",
            "127.0.0.1 - - [22/Nov/2026:03:00:01 +0000] \"HEAD /v2/bench/app/manifests/gzip HTTP/1.1\" 200 900 \"\" \"ctr\"\n",
            "time=\"x\" level=info msg=\"response completed\" http.request.method=GET\n",
            "127.0.0.1 - - [22/Nov/2026:03:00:02 +0000] \"GET /v2/bench/app/manifests/gzip HTTP/1.1\" 200 500 \"\" \"ctr\"\n",
        );
        assert_eq!(registry_get_bytes(log), 1524);
    }

    #[test]
    fn counts_layers_in_ctr_pull_output() {
        let out = "elapsed: 1.0 s total: 10 MiB\n\
                   layer-sha256:abc123:   done |+++|\n\
                   layer-sha256:def456:   done |+++|\n\
                   config-sha256:0123:    done\n\
                   layer-sha256:abc123:   done |+++|\n";
        assert_eq!(image_layer_count(out), 2);
    }

    #[test]
    fn serve_config_is_a_valid_lazysnap_config() {
        let mut options = BenchOptions::new("/bin/true".into());
        options.background_fill = false;
        let config =
            crate::config::Config::parse(&serve_config(&options, Mode::Lazysnap), "bench").unwrap();
        assert!(!config.fetch.background_fill);
        options.background_fill = true;
        let config = crate::config::Config::parse(
            &serve_config(&options, Mode::LazysnapNoBackground),
            "bench",
        )
        .unwrap();
        assert!(!config.fetch.background_fill);
    }

    #[test]
    fn options_are_validated() {
        let mut options = BenchOptions::new("/bin/true".into());
        options.runs = 0;
        assert!(options
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--runs"));
        options.runs = 1;
        options.links.clear();
        assert!(options
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--link"));
    }
}
