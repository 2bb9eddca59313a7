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
pub use soci::StateMount;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::image::OciLayout;
use crate::rig::images::{push_layout_image, write_image, ImageOptions};
use crate::rig::{require_program, LinkEmulator, RegistryServer, RigError};

pub use image::{READY_MARKER, STARTUP_FILES, WORKLOAD};
pub use link::LinkSpec;
pub use report::{
    compute_ratios, median, render_svg, render_table, BenchReport, ImageReport, Mode, ModeResult,
    RunResult, Summary,
};

pub use named_image::{parse_cmd, NamedImage};
use soci::{SociPeer, SociTools};

mod measure;
mod options;
mod prepare;
use measure::measure_once;
pub use measure::registry_get_bytes;
pub use options::{BenchImage, BenchOptions, BENCH_IMAGES};
use prepare::{
    convert_sample, convert_with_ctr_remote, optimize_with_lazysnap, CTR_REMOTE_TAG,
    LAZYSNAP_OPTIMIZED_TAG, OPTIMIZED_TAG,
};

/// Repository the sample image is pushed to.
const REPOSITORY: &str = "bench/app";
/// containerd namespace the bench pulls into.
const NAMESPACE: &str = "lazysnap-bench";

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
    let needs_soci_index = modes.contains(&Mode::Soci) || modes.contains(&Mode::LazysnapSoci);
    let soci = match (&options.soci_grpc, needs_soci_index) {
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
    use super::measure::{image_layer_count, serve_config};
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
