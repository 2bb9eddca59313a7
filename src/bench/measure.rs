//! One cold run of one mode: a fresh snapshotter and containerd, the pull, the create and the
//! run to the ready line, timed apart, with the registry's bytes and the daemon's peak memory.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::rig::{ContainerdOptions, ContainerdServer, RegistryServer};

use super::link::LinkSpec;
use super::options::BenchOptions;
use super::prepare::{CTR_REMOTE_TAG, LAZYSNAP_OPTIMIZED_TAG, OPTIMIZED_TAG};
use super::procs::{run_timed, run_watched, tail, ServeProcess};
use super::report::{Mode, RunResult};
use super::soci::SociPeer;
use super::{check_interrupted, BenchError, NAMESPACE, REPOSITORY};
use super::{image, procs, soci};

/// The `lazysnap serve` config of a measured run.
pub(super) fn serve_config(options: &BenchOptions, mode: Mode) -> String {
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
pub(super) fn soci_peer<'a>(
    soci: Option<(&'a SociPeer, &'a str)>,
) -> Result<(&'a SociPeer, &'a str), BenchError> {
    soci.ok_or_else(|| BenchError::Invalid("mode soci needs --soci-grpc PATH".into()))
}

/// One cold measurement: fresh `lazysnap serve` (new root and cache), then a fresh containerd,
/// pull, then `ctr containers create` and `ctr tasks start` until the ready line (with `--warm`
/// once more); everything stopped afterwards. `soci` is the
/// SOCI peer with the reference of its image through this link.
#[allow(clippy::too_many_arguments)]
pub(super) fn measure_once(
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
        Mode::LazysnapSoci => (
            format!("{host}/{REPOSITORY}:{}", soci::SOCI_TAG),
            "lazysnap",
        ),
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
        Mode::Lazysnap
        | Mode::LazysnapNoBackground
        | Mode::LazysnapOptimized
        | Mode::LazysnapSoci => {
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
        Mode::Lazysnap
        | Mode::LazysnapNoBackground
        | Mode::LazysnapOptimized
        | Mode::LazysnapSoci => {
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
pub(super) fn image_layer_count(ctr_output: &str) -> usize {
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
