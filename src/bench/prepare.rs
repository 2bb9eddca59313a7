//! The images each mode pulls, made once per bench: the eStargz conversion by `lazysnap convert`,
//! stargz's own by `ctr-remote image convert`, and the images optimized for the workload by
//! `lazysnap optimize` and `ctr-remote image optimize`.

use std::path::Path;
use std::process::Command;

use crate::image::OciLayout;
use crate::labels;
use crate::rig::images::push_layout_image;
use crate::rig::{require_program, ContainerdOptions, ContainerdServer, RegistryServer};

use super::options::BenchOptions;
use super::procs::run_timed;
use super::{check_interrupted, BenchError, NAMESPACE, REPOSITORY};
use super::{image, procs};

/// Converts the pushed gzip image to `…:estargz` with `lazysnap convert`; when the binary fails
/// or writes layers without the TOC annotation, converts in-process instead and says so in
/// `notes`. Returns the converter used.
#[allow(clippy::too_many_arguments)]
pub(super) fn convert_sample(
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
                .all(|layer| layer.annotations.contains_key(labels::TOC_DIGEST))
            {
                Ok(())
            } else {
                Err(BenchError::Step {
                    what: "lazysnap convert".into(),
                    detail: format!(
                        "the converted layers lack the {} annotation",
                        labels::TOC_DIGEST
                    ),
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
pub(super) const CTR_REMOTE_TAG: &str = "ctr-remote";

/// Tag of the image `ctr-remote image optimize` wrote (what the stargz-opt mode pulls).
pub(super) const OPTIMIZED_TAG: &str = "ctr-remote-opt";

/// `--entrypoint=[argv0]` and `--args=[rest]` (JSON arrays) running `workload`, as both
/// `lazysnap optimize` and `ctr-remote image optimize` take them.
pub(super) fn workload_flags(workload: &[String]) -> Vec<String> {
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
pub(super) const LAZYSNAP_OPTIMIZED_TAG: &str = "lazysnap-opt";

/// Optimizes the pushed gzip image for `workload` with `lazysnap optimize` (tag
/// [`LAZYSNAP_OPTIMIZED_TAG`]), recording until the workload exits. Returns the total of its
/// report: what the workload read, and what the optimized image prefetches.
pub(super) fn optimize_with_lazysnap(
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
pub(super) struct OptimizeJson {
    pub(super) total: crate::optimize::LayerUse,
}

/// Converts the pushed gzip image with stargz's own converter, as a stargz user would: pulled
/// into a scratch containerd, then `ctr-remote image convert --estargz --oci` (tag
/// [`CTR_REMOTE_TAG`]) or, given the workload, `ctr-remote image optimize --oci` running it
/// (tag [`OPTIMIZED_TAG`]), and pushed.
pub(super) fn convert_with_ctr_remote(
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
