//! `lazysnap optimize` end to end, as a user runs it: a real registry on loopback, the workload
//! run by runc over lazysnap's recording FUSE mounts and overlayfs, the optimized image read back
//! (TOC order, chunk marks), started lazily with `lazysnap mount`, and checked by `inspect
//! --verify`. Needs root, FUSE and runc; fails loudly without them.

mod cli_common;
mod fixtures_common;
mod pull_common;
use cli_common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use lazysnap::blob::FileBlob;
use lazysnap::estargz::{self, LayerToc};
use lazysnap::image::{self, Manifest, OciLayout};
use lazysnap_testbed::images::{
    busybox_layer, fetch_blob, fetch_manifest, push_layout_image, unread_layer, workload_layer,
    write_image, ImageOptions, WORKLOAD_BIG_FILE_SIZE, WORKLOAD_OUTPUT,
};

use lazysnap_testbed::{ContainerdOptions, ContainerdServer, RegistryServer};

fn require_runc() {
    require_root_and_fuse();
    assert!(
        Path::new("/usr/sbin/runc").is_file() || Path::new("/usr/bin/runc").is_file(),
        "optimize runs the workload with runc: run scripts/install-deps.sh"
    );
}

/// A registry holding `src/app:v1`: busybox, the workload layer, a layer nobody reads; Cmd runs
/// the workload script.
fn registry_with_workload_image() -> (RegistryServer, tempfile::TempDir) {
    let registry = RegistryServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&dir.path().join("src")).unwrap();
    let options = ImageOptions {
        cmd: vec!["/bin/sh".into(), "/app/run.sh".into()],
        ..ImageOptions::default()
    };
    write_image(
        &layout,
        &[
            busybox_layer().unwrap(),
            workload_layer().unwrap(),
            unread_layer().unwrap(),
        ],
        &options,
        Some("v1"),
    )
    .unwrap();
    push_layout_image(&layout, Some("v1"), &registry.host(), "src/app", "v1").unwrap();
    (registry, dir)
}

/// The manifest and the TOC of every layer of `repository:tag`.
fn tocs(
    registry: &RegistryServer,
    work: &Path,
    repository: &str,
    tag: &str,
) -> (Manifest, Vec<LayerToc>) {
    let manifest: Manifest = image::parse_json(
        "manifest",
        &fetch_manifest(&registry.url(), repository, tag).unwrap(),
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tocs = manifest
        .layers
        .iter()
        .map(|layer| {
            let path = work.join(layer.digest.replace(':', "-"));
            fetch_blob(&registry.url(), repository, &layer.digest, &path).unwrap();
            let blob = FileBlob::open(&path).unwrap();
            runtime.block_on(estargz::open_layer(&blob, None)).unwrap()
        })
        .collect();
    (manifest, tocs)
}

/// Names of the regular files before the prefetch landmark, in TOC order (None: no
/// `.prefetch.landmark`).
fn prioritized_files(toc: &LayerToc) -> Option<Vec<String>> {
    let landmark = toc
        .toc()
        .expect("raw TOC")
        .entries
        .iter()
        .position(|e| e.name == estargz::PREFETCH_LANDMARK)?;
    Some(
        toc.toc().expect("raw TOC").entries[..landmark]
            .iter()
            .filter(|e| e.kind == "reg")
            .map(|e| e.name.clone())
            .collect(),
    )
}

fn has_no_prefetch_landmark(toc: &LayerToc) -> bool {
    toc.toc()
        .expect("raw TOC")
        .entries
        .iter()
        .any(|e| e.name == estargz::NO_PREFETCH_LANDMARK)
}

fn optimize(args: &[&str]) -> std::process::Output {
    let mut all = vec!["optimize"];
    all.extend_from_slice(args);
    lazysnap(&all)
}

#[test]
fn optimize_puts_what_the_workload_read_first_in_order_and_only_the_read_chunks_of_a_big_file() {
    require_runc();
    let (registry, _src) = registry_with_workload_image();
    let work = tempfile::tempdir().unwrap();
    let host = registry.host();
    let record = work.path().join("record.jsonl");
    let output = optimize(&[
        "--record-out",
        record.to_str().unwrap(),
        &format!("{host}/src/app:v1"),
        &format!("{host}/opt/app:v1"),
    ]);
    assert_ok(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("exited with code 0"), "{stdout}");
    assert!(
        stdout.contains("total"),
        "the report has a total line: {stdout}"
    );

    let (manifest, tocs) = tocs(&registry, work.path(), "opt/app", "v1");
    assert_eq!(tocs.len(), 3);
    // The base layer: busybox is all the workload used of it.
    assert_eq!(
        prioritized_files(&tocs[0]).unwrap(),
        vec!["bin/busybox".to_string()]
    );
    // The workload layer: its files in the order they were first read.
    assert_eq!(
        prioritized_files(&tocs[1]).unwrap(),
        vec!["app/run.sh", "app/b.txt", "app/a.txt", "app/big.bin"]
    );
    // The layer nobody read prefetches nothing.
    assert!(prioritized_files(&tocs[2]).is_none());
    assert!(has_no_prefetch_landmark(&tocs[2]));

    // big.bin was read in two places: only those chunks are prefetched by lazysnap.
    let big = tocs[1]
        .entries()
        .iter()
        .find(|e| e.path == "app/big.bin")
        .unwrap();
    let skipped = tocs[1].prefetch_skipped();
    let prefetched: u64 = big
        .chunks
        .iter()
        .filter(|c| skipped.binary_search(&c.compressed.start).is_err())
        .map(|c| c.len)
        .sum();
    assert!(
        big.chunks.len() >= 3,
        "big.bin is cut around what was read: {:?}",
        big.chunks
    );
    assert!(
        prefetched > 0 && prefetched < WORKLOAD_BIG_FILE_SIZE as u64 / 4,
        "{prefetched} of big.bin's {WORKLOAD_BIG_FILE_SIZE} bytes are prefetched"
    );
    let read_at_6m = big
        .chunks
        .iter()
        .find(|c| c.file_offset <= 6 << 20 && (6 << 20) < c.file_offset + c.len)
        .unwrap();
    assert!(
        skipped.binary_search(&read_at_6m.compressed.start).is_err(),
        "the chunk read at 6 MiB is prefetched"
    );

    // The record names what was read, per layer, in order.
    let lines = std::fs::read_to_string(&record).unwrap();
    let paths: Vec<(u64, String)> = lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["layer"].as_u64().unwrap(),
                v["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(paths.contains(&(1, "app/big.bin".to_string())), "{paths:?}");
    assert!(
        !paths
            .iter()
            .any(|(_, p)| p == "app/c.txt" || p == "app/unused.bin"),
        "{paths:?}"
    );

    // Every layer verifies, and inspect says what lazysnap prefetches of a cut file's layer.
    let inspected = lazysnap(&["inspect", "--verify", &format!("{host}/opt/app:v1")]);
    assert_ok(&inspected);
    let text = String::from_utf8_lossy(&inspected.stdout);
    assert!(text.contains("lazysnap prefetch:"), "{text}");

    // A lazy start: the same output, and the workload layer costs its TOC, the prefetch and at
    // most a few reads; far less than the layer.
    let app_layer = &manifest.layers[1];
    let fetched_before = registry.blob_gets(&app_layer.digest).len();
    let mount_dir = work.path().join("root");
    std::fs::create_dir_all(&mount_dir).unwrap();
    let cache = work.path().join("cache");
    let state = work.path().join("state");
    lazysnap_ok(&[
        "mount",
        "--no-background",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        &format!("{host}/opt/app:v1"),
        mount_dir.to_str().unwrap(),
    ]);
    let _unmount = Unmount {
        dir: mount_dir.clone(),
        state: state.clone(),
    };
    let run = Command::new("chroot")
        .arg(&mount_dir)
        .args(["/bin/sh", "/app/run.sh"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        WORKLOAD_OUTPUT,
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let gets = registry.blob_gets(&app_layer.digest)[fetched_before..].to_vec();
    let served: u64 = gets.iter().map(|(_, b)| b).sum();
    assert!(gets.len() <= 5, "requests for the workload layer: {gets:?}");
    assert!(
        served < app_layer.size / 4,
        "{served} of the layer's {} bytes were fetched",
        app_layer.size
    );
}

struct Unmount {
    dir: PathBuf,
    state: PathBuf,
}

impl Drop for Unmount {
    fn drop(&mut self) {
        lazysnap(&[
            "umount",
            "--state-dir",
            self.state.to_str().unwrap(),
            self.dir.to_str().unwrap(),
        ]);
    }
}

#[test]
fn a_failed_workload_is_reported_and_writes_nothing_unless_accepted() {
    require_runc();
    let (registry, _src) = registry_with_workload_image();
    let host = registry.host();
    let src = format!("{host}/src/app:v1");
    let dst = format!("{host}/opt/app:failed");
    let args = r#"["-c","echo about-to-fail; cat /app/c.txt; exit 3"]"#;
    let output = optimize(&["--entrypoint", "/bin/sh", "--args", args, &src, &dst]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("exited with code 3"), "{stderr}");
    assert!(
        stderr.contains("about-to-fail"),
        "the last lines are shown: {stderr}"
    );
    assert!(stderr.contains("--accept-failed-run"), "{stderr}");
    assert!(
        fetch_manifest(&registry.url(), "opt/app", "failed").is_err(),
        "no image was written"
    );

    // The awaited line never printed, by a workload that exits or one that keeps running.
    let output = optimize(&["--wait-on-line", "never-printed", &src, &dst]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("exited with code 0")
            && stderr.contains("without printing the awaited line"),
        "{stderr}"
    );
    let output = optimize(&[
        "--wait-on-line",
        "never-printed",
        "--timeout",
        "2s",
        "--entrypoint",
        "/bin/sh",
        "--args",
        r#"["-c","while :; do cat /app/a.txt >/dev/null; done"]"#,
        &src,
        &dst,
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("was never printed"), "{stderr}");

    // Accepted anyway: the image is written with what was read.
    let work = tempfile::tempdir().unwrap();
    assert_ok(&optimize(&[
        "--accept-failed-run",
        "--entrypoint",
        "/bin/sh",
        "--args",
        args,
        &src,
        &dst,
    ]));
    let (_, tocs) = tocs(&registry, work.path(), "opt/app", "failed");
    assert_eq!(
        prioritized_files(&tocs[1]).unwrap(),
        vec!["app/c.txt"],
        "sh runs -c: only c.txt of the workload layer was read"
    );
}

#[test]
fn a_record_reproduces_the_image_and_reoptimizing_replaces_the_old_order() {
    require_runc();
    let (registry, _src) = registry_with_workload_image();
    let work = tempfile::tempdir().unwrap();
    let host = registry.host();
    let record = work.path().join("record.jsonl");
    let first = format!("{host}/opt/app:first");
    assert_ok(&optimize(&[
        "--wait-on-line",
        "workload-done",
        "--record-out",
        record.to_str().unwrap(),
        &format!("{host}/src/app:v1"),
        &first,
    ]));
    // The same record, without running anything, writes the same image.
    let again = format!("{host}/opt/app:again");
    let report = work.path().join("report.json");
    assert_ok(&optimize(&[
        "--record-in",
        record.to_str().unwrap(),
        "--report-json",
        report.to_str().unwrap(),
        &format!("{host}/src/app:v1"),
        &again,
    ]));
    // The report as JSON: per layer and in total, what was read and what is prefetched.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["image"], again.as_str(), "{report}");
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{report}");
    let total = &report["total"];
    for field in ["files_used", "bytes_read", "prefetch_bytes", "toc_bytes"] {
        let sum: u64 = layers.iter().map(|l| l[field].as_u64().unwrap()).sum();
        assert_eq!(total[field].as_u64().unwrap(), sum, "{field} in {report}");
    }
    for layer in layers {
        let toc = layer["toc_bytes"].as_u64().unwrap();
        let blob = layer["blob_size"].as_u64().unwrap();
        assert!(
            toc > 0 && toc + layer["prefetch_bytes"].as_u64().unwrap() <= blob,
            "{report}"
        );
    }
    assert!(total["prefetch_bytes"].as_u64().unwrap() > 0, "{report}");
    let digest = |tag: &str| {
        let bytes = fetch_manifest(&registry.url(), "opt/app", tag).unwrap();
        lazysnap::digest::sha256_digest(&bytes)
    };
    let (first_manifest, _) = tocs(&registry, work.path(), "opt/app", "first");
    let (again_manifest, _) = tocs(&registry, work.path(), "opt/app", "again");
    assert_eq!(
        first_manifest.layers, again_manifest.layers,
        "same record, same layers"
    );
    assert_ne!(digest("first"), "");

    // Optimizing the optimized image for another workload replaces its order.
    assert_ok(&optimize(&[
        "--entrypoint",
        r#"["/bin/sh","-c"]"#,
        "--args",
        r#"["cat /app/c.txt /app/a.txt"]"#,
        &first,
        &format!("{host}/opt/app:other"),
    ]));
    let (_, tocs) = tocs(&registry, work.path(), "opt/app", "other");
    assert_eq!(
        prioritized_files(&tocs[1]).unwrap(),
        vec!["app/c.txt", "app/a.txt"]
    );
    let landmarks = tocs[1]
        .toc()
        .expect("raw TOC")
        .entries
        .iter()
        .filter(|e| e.name.ends_with("prefetch.landmark"))
        .count();
    assert_eq!(landmarks, 1);

    // A record for another image is refused with the line and the reason.
    std::fs::write(
        &record,
        "{\"layer\":7,\"path\":\"x\",\"size\":1,\"read\":[]}\n",
    )
    .unwrap();
    let output = optimize(&[
        "--record-in",
        record.to_str().unwrap(),
        &format!("{host}/src/app:v1"),
        &format!("{host}/opt/app:bad"),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("layer 7 does not exist"),
        "{stderr}"
    );
}

/// The optimized image is a valid OCI image for anyone: containerd's own pull and overlayfs run
/// it with the original's output, and ctr-remote reads every layer's TOC digest.
#[test]
fn the_optimized_image_runs_under_plain_containerd_and_ctr_remote_reads_its_tocs() {
    require_runc();
    assert!(
        Path::new("/usr/bin/ctr-remote").is_file(),
        "ctr-remote is required: run scripts/install-deps.sh (Debian stargz-snapshotter)"
    );
    let (registry, _src) = registry_with_workload_image();
    let host = registry.host();
    let dst = format!("{host}/opt/app:v1");
    assert_ok(&optimize(&[&format!("{host}/src/app:v1"), &dst]));
    let containerd = ContainerdServer::start(&ContainerdOptions::default()).unwrap();
    containerd
        .ctr_ok(&["images", "pull", "--plain-http", &dst])
        .unwrap();
    let run = containerd
        .ctr_ok(&["run", "--rm", &dst, "optimized-on-overlayfs"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), WORKLOAD_OUTPUT);

    let manifest: Manifest = image::parse_json(
        "m",
        &fetch_manifest(&registry.url(), "opt/app", "v1").unwrap(),
    )
    .unwrap();
    for layer in &manifest.layers {
        let output = Command::new("/usr/bin/ctr-remote")
            .arg("--address")
            .arg(containerd.address())
            .args(["images", "get-toc-digest", &layer.digest])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            layer.annotations["containerd.io/snapshot/stargz/toc.digest"]
        );
    }
}

/// The workload's environment, working directory and user come from the flags; zstd:chunked
/// images are optimized the same way.
#[test]
fn workload_overrides_apply_and_zstd_chunked_is_optimized_too() {
    require_runc();
    let (registry, _src) = registry_with_workload_image();
    let work = tempfile::tempdir().unwrap();
    let host = registry.host();
    let output = optimize(&[
        "--zstdchunked",
        "--env",
        "GREETING=hello-from-env",
        "--cwd",
        "/app",
        "--user",
        "1234:5678",
        "--entrypoint",
        r#"["/bin/sh","-c"]"#,
        "--args",
        r#"["echo $GREETING; pwd; echo uid=$(busybox id -u) gid=$(busybox id -g); cat a.txt"]"#,
        &format!("{host}/src/app:v1"),
        &format!("{host}/opt/app:zstd"),
    ]);
    assert_ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in ["| hello-from-env", "| /app", "| uid=1234 gid=5678", "| ay"] {
        assert!(
            stderr.contains(line),
            "the workload printed {line:?}: {stderr}"
        );
    }
    let (manifest, tocs) = tocs(&registry, work.path(), "opt/app", "zstd");
    assert!(manifest.layers[1].media_type.contains("zstd"));
    assert_eq!(prioritized_files(&tocs[1]).unwrap(), vec!["app/a.txt"]);
}

/// A lazy start through containerd: `lazysnap serve`, `lazysnap pull`, `ctr run` of the image's
/// own command. The output is the original's, and the workload layer costs its TOC, the
/// prefetch and at most a few reads (background fill off, so every byte counted was asked for).
#[test]
fn the_optimized_image_starts_lazily_through_containerd_with_the_prefetch_and_few_reads() {
    require_runc();
    pull_common::require_root_and_containerd();
    let (registry, _src) = registry_with_workload_image();
    let work = tempfile::tempdir().unwrap();
    let host = registry.host();
    let image = format!("{host}/opt/app:v1");
    assert_ok(&optimize(&[&format!("{host}/src/app:v1"), &image]));
    let (manifest, _) = tocs(&registry, work.path(), "opt/app", "v1");
    let app_layer = &manifest.layers[1];
    let fetched_before = registry.blob_gets(&app_layer.digest).len();

    let lazysnap =
        pull_common::TestLazysnap::start_with_config("[fetch]\nbackground_fill = false\n");
    let containerd = pull_common::TestContainerd::start(Some(&lazysnap.socket()));
    let pulled = pull_common::lazysnap_pull(&containerd, "opt", "lazysnap", &image);
    assert!(
        pulled.lines().filter(|l| l.contains("  lazy  ")).count() == 3,
        "every layer is mounted lazily: {pulled}"
    );
    let out = containerd.run("opt", "lazysnap", &image, &[]);
    assert_eq!(out, WORKLOAD_OUTPUT, "lazysnap log:\n{}", lazysnap.log());
    // The snapshotter's one-byte reachability checks (at each container's Prepare) aside.
    let gets: Vec<(u16, u64)> = registry.blob_gets(&app_layer.digest)[fetched_before..]
        .iter()
        .copied()
        .filter(|&(_, bytes)| bytes > 1)
        .collect();
    let served: u64 = gets.iter().map(|(_, b)| b).sum();
    assert!(gets.len() <= 5, "requests for the workload layer: {gets:?}");
    assert!(
        served < app_layer.size / 4,
        "{served} of the layer's {} bytes were fetched",
        app_layer.size
    );
}
