//! What a bench run is asked to do: its options, the built-in images, and the checks that turn a
//! wrong combination into an error naming the fix.

use std::path::PathBuf;
use std::time::Duration;

use super::debian_image;
use super::debian_image::Runtime;
use super::image::{READY_MARKER, WORKLOAD};
use super::link::LinkSpec;
use super::named_image::NamedImage;
use super::report::Mode;
use super::BenchError;

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
    pub(super) fn runtime(self) -> Option<Runtime> {
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
    pub(super) fn expected_line(&self) -> Option<String> {
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
            modes.push(Mode::LazysnapSoci);
        }
        modes
    }

    pub(super) fn validate(&self) -> Result<(), BenchError> {
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
            if (only.contains(&Mode::Soci) || only.contains(&Mode::LazysnapSoci))
                && self.soci_grpc.is_none()
            {
                return Err(BenchError::Invalid(
                    "--modes soci and lazysnap-soci need --soci-grpc PATH (the soci CLI beside \
                     it builds the index)"
                        .into(),
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
