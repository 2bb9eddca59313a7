//! `lazysnap bench` end to end: the real binary starts a registry, a link emulator, `lazysnap
//! serve` (or a peer's daemon: stargz-snapshotter's, SOCI's) and containerd on loopback, runs
//! the workload of a small image once per mode, and writes results.json, startup.svg,
//! startup.png, table.txt and table.md. Checks shape, success, lazy mounts and registry bytes,
//! never timings.

use std::path::Path;
use std::process::Command;

fn require_root_and_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the bench test starts containerd and runc and mounts filesystems: run it as root"
    );
    for program in [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/sbin/runc",
        "/usr/bin/docker-registry",
        "/bin/busybox",
    ] {
        assert!(
            Path::new(program).is_file(),
            "{program} is missing: run scripts/install-deps.sh"
        );
    }
}

/// Mounts under `state_dir` (each test's bench keeps its state in a directory of its own: the
/// tests of this file run at once).
fn mounts_under(state_dir: &Path) -> usize {
    let dir = state_dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(&dir))
        .count()
}

/// `lazysnap bench ARGS --out OUT`, which must succeed; its stdout.
fn bench_ok(args: &[&std::ffi::OsStr], out: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run lazysnap bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "lazysnap bench failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn bench_runs_both_modes_and_writes_results() {
    require_root_and_tools();
    let out = tempfile::tempdir().unwrap();
    // Two cold runs on the unshaped and the datacenter profile.
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let args = [
        "--state-dir",
        state_dir,
        "--runs",
        "2",
        "--link",
        "lan",
        "--link",
        "dc",
        "--layer-mb",
        "4",
        "--no-background-fill",
    ];
    let stdout = bench_ok(&args.map(std::ffi::OsStr::new), out.path());

    // The table: header, rule, one row per mode.
    let header = stdout
        .lines()
        .find(|l| l.starts_with("link"))
        .unwrap_or_else(|| panic!("no table in:\n{stdout}"));
    for column in [
        "mode",
        "pull s",
        "create s",
        "run s",
        "total s",
        "min-max s",
        "MB to ready",
        "MB in all",
        "peak RSS MB",
        "speedup",
        "vs best peer",
        "vs ideal",
    ] {
        assert!(header.contains(column), "{header}");
    }
    for link in ["unlimited", "100mbit:20ms"] {
        for mode in ["overlayfs", "lazysnap"] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with(link) && l.contains(mode)),
                "no {link} {mode} row in:\n{stdout}"
            );
        }
    }

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(json["runs_per_mode"], 2);
    let image = &json["image"];
    assert_eq!(image["layers"], 2);
    assert!(image["app_bytes"].as_u64().unwrap() >= 4_000_000, "{image}");
    assert!(image["gzip_bytes"].as_u64().unwrap() > 1_000_000, "{image}");
    assert!(
        image["estargz_bytes"].as_u64().unwrap() > 1_000_000,
        "{image}"
    );
    assert!(image["workload"][2]
        .as_str()
        .unwrap()
        .contains("echo ready"));

    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "{json}");
    let rows: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r["link"].as_str().unwrap(), r["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rows,
        [
            ("unlimited", "overlayfs"),
            ("unlimited", "lazysnap"),
            ("100mbit:20ms", "overlayfs"),
            ("100mbit:20ms", "lazysnap")
        ]
    );
    for result in results {
        let runs = result["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        for run in runs {
            assert_eq!(run["ready"], true, "{result}");
            assert_eq!(run["layers"], 2, "{result}");
            for field in ["pull_secs", "run_secs", "total_secs"] {
                let value = run[field].as_f64().unwrap();
                assert!(value > 0.0 && value.is_finite(), "{field} in {result}");
            }
            let total = run["total_secs"].as_f64().unwrap();
            let parts = run["pull_secs"].as_f64().unwrap()
                + run["create_secs"].as_f64().unwrap()
                + run["run_secs"].as_f64().unwrap();
            assert!((total - parts).abs() < 1e-9, "{result}");
            // Bytes in all include those until ready.
            let all = run["fetched_all_bytes"].as_u64().unwrap();
            assert!(all >= run["fetched_bytes"].as_u64().unwrap(), "{result}");
        }
        // Medians of two runs lie between them; the spread is the fastest and slowest total.
        let totals: Vec<f64> = runs
            .iter()
            .map(|r| r["total_secs"].as_f64().unwrap())
            .collect();
        let (low, high) = (totals[0].min(totals[1]), totals[0].max(totals[1]));
        let median = &result["median"];
        assert_eq!(median["total_min_secs"].as_f64().unwrap(), low, "{result}");
        assert_eq!(median["total_max_secs"].as_f64().unwrap(), high, "{result}");
        let mid = median["total_secs"].as_f64().unwrap();
        assert!(low <= mid && mid <= high, "{result}");
        assert!(result["speedup"].as_f64().unwrap() > 0.0, "{result}");
        // No peer ran, so there is no ratio to one.
        assert!(result["vs_best_peer"].is_null(), "{result}");
        // The snapshotter's peak memory is measured for lazysnap, not for overlayfs.
        let rss = &median["snapshotter_peak_rss"];
        if result["mode"] == "lazysnap" {
            assert!(rss.as_u64().unwrap() > 1 << 20, "{result}");
        } else {
            assert!(rss.is_null(), "{result}");
        }
    }
    for link in [0, 2] {
        // The overlayfs pull downloads every layer in full.
        let overlay = &results[link]["runs"][0];
        let overlay_bytes = overlay["fetched_bytes"].as_u64().unwrap();
        assert!(
            overlay_bytes >= image["gzip_bytes"].as_u64().unwrap(),
            "{json}"
        );
        assert!(overlay["lazy_layers"].is_null());
        // lazysnap mounted both eStargz layers lazily and fetched less than the whole image.
        for run in results[link + 1]["runs"].as_array().unwrap() {
            assert_eq!(run["lazy_layers"], 2, "{json}");
            let lazy_bytes = run["fetched_bytes"].as_u64().unwrap();
            assert!(lazy_bytes > 0 && lazy_bytes < overlay_bytes, "{json}");
        }
    }
    assert_eq!(image["converter"], "lazysnap convert", "{json}");

    let svg = std::fs::read_to_string(out.path().join("startup.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("overlayfs") && svg.contains("lazysnap") && svg.contains("unlimited"));
    assert_png(&out.path().join("startup.png"));
    let table = std::fs::read_to_string(out.path().join("table.txt")).unwrap();
    assert!(table.starts_with("link"));
    // The Markdown table: header, alignment row, one row per result.
    let markdown = std::fs::read_to_string(out.path().join("table.md")).unwrap();
    let lines: Vec<&str> = markdown.lines().collect();
    assert_eq!(lines.len(), 2 + results.len(), "{markdown}");
    assert!(
        lines[0].starts_with("| link | mode | pull s | create s |"),
        "{markdown}"
    );
    assert!(lines.iter().all(|l| l.starts_with('|') && l.ends_with('|')));

    // Torn down: nothing of the bench stays mounted.
    assert_eq!(mounts_under(state.path()), 0);
}

/// `path` is a PNG image of a plausible chart size.
fn assert_png(path: &Path) {
    let png = std::fs::read(path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(width >= 640 && height >= 320, "{width}x{height}");
}

#[test]
fn bench_optimized_and_warm_runs_rate_every_mode_against_the_ideal() {
    require_root_and_tools();
    let out = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let args = [
        "--state-dir",
        state.path().to_str().unwrap(),
        "--runs",
        "1",
        "--link",
        "lan",
        "--link",
        "dc",
        "--layer-mb",
        "4",
        "--no-background-fill",
        "--optimized",
        "--warm",
    ];
    let stdout = bench_ok(&args.map(std::ffi::OsStr::new), out.path());
    assert!(stdout.contains("lazysnap optimize"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    // The ideal start's bytes: what the workload read plus the TOCs, from optimize's report;
    // below the compressed image.
    let ideal = json["ideal_bytes"].as_u64().unwrap();
    let image_bytes = json["image"]["estargz_bytes"].as_u64().unwrap();
    assert!(ideal > 0 && ideal < image_bytes, "{json}");
    let results = json["results"].as_array().unwrap();
    let rows: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r["link"].as_str().unwrap(), r["mode"].as_str().unwrap()))
        .collect();
    let mut expected = Vec::new();
    for link in ["unlimited", "100mbit:20ms"] {
        for mode in ["overlayfs", "lazysnap", "lazysnap-opt"] {
            expected.push((link, mode));
        }
    }
    assert_eq!(rows, expected, "{json}");
    for result in results {
        assert_eq!(result["runs"][0]["ready"], true, "{result}");
        // The second start on the same node was timed too.
        let warm = result["runs"][0]["warm_run_secs"].as_f64().unwrap();
        assert!(warm > 0.0 && warm.is_finite(), "{result}");
        assert_eq!(result["median"]["warm_run_secs"].as_f64(), Some(warm));
        let vs_ideal = &result["vs_ideal"];
        if result["link"] == "unlimited" {
            // No rate, no bound.
            assert!(vs_ideal.is_null(), "{result}");
        } else {
            // Nothing starts faster than the ideal start.
            assert!(vs_ideal.as_f64().unwrap() > 1.0, "{result}");
        }
    }
    // The optimized image mounted lazily too.
    let opt = &results[5]["runs"][0];
    assert_eq!(opt["lazy_layers"], 2, "{json}");
    let svg = std::fs::read_to_string(out.path().join("startup.svg")).unwrap();
    assert!(
        svg.contains("lazysnap-opt") && svg.contains("ideal "),
        "{svg}"
    );
    assert_png(&out.path().join("startup.png"));
    assert_eq!(mounts_under(state.path()), 0);
}

/// A peer's daemon the peer test measures: the environment variable `var`, or where `script`
/// (run by scripts/test.sh) puts it.
fn peer_daemon(var: &str, default: &str, script: &str) -> std::path::PathBuf {
    let path: std::path::PathBuf = std::env::var_os(var)
        .map(Into::into)
        .unwrap_or_else(|| default.into());
    assert!(
        path.is_file(),
        "{} is missing: run {script} (scripts/test.sh does) or set {var}",
        path.display()
    );
    path
}

/// The acceptance run of the bench: one small image, the unshaped and a shaped link, two cold
/// runs of every mode, lazysnap's and both peers' (SOCI from Debian unstable's package,
/// stargz-snapshotter's daemon built from Debian 12's), unoptimized and optimized.
#[test]
fn bench_runs_every_mode_beside_stargz_and_soci() {
    require_root_and_tools();
    let soci = peer_daemon(
        "LAZYSNAP_SOCI_GRPC",
        "/var/cache/lazysnap-bench/soci/root/usr/bin/soci-snapshotter-grpc",
        "scripts/get-soci.sh",
    );
    let stargz = peer_daemon(
        "LAZYSNAP_STARGZ_GRPC",
        "/var/cache/lazysnap-bench/stargz/bin/containerd-stargz-grpc",
        "scripts/get-stargz.sh",
    );
    let soci_state_dir = Path::new("/var/lib/soci-snapshotter-grpc");
    let soci_state_dir_existed = soci_state_dir.exists();
    let out = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    const MODES: [&str; 7] = [
        "overlayfs",
        "lazysnap",
        "lazysnap-nobg",
        "lazysnap-opt",
        "stargz",
        "stargz-opt",
        "soci",
    ];
    let modes = MODES.join(",");
    // 30 MB of app files compress to about 15 MB: above SOCI's 10 MiB minimum for a zTOC.
    let mut args = [
        "--state-dir",
        state.path().to_str().unwrap(),
        "--runs",
        "2",
        "--link",
        "lan",
        "--link",
        "dc",
        "--layer-mb",
        "30",
        "--optimized",
        "--modes",
        &modes,
    ]
    .map(std::ffi::OsStr::new)
    .to_vec();
    args.extend([
        "--soci-grpc".as_ref(),
        soci.as_os_str(),
        "--stargz-grpc".as_ref(),
        stargz.as_os_str(),
    ]);
    let stdout = bench_ok(&args, out.path());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let results = json["results"].as_array().unwrap();
    let rows: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r["link"].as_str().unwrap(), r["mode"].as_str().unwrap()))
        .collect();
    let expected: Vec<(&str, &str)> = ["unlimited", "100mbit:20ms"]
        .into_iter()
        .flat_map(|link| MODES.map(|mode| (link, mode)))
        .collect();
    assert_eq!(rows, expected, "{json}");

    for (link, by_mode) in results.chunks(MODES.len()).enumerate() {
        let row = |mode: &str| &by_mode[MODES.iter().position(|m| *m == mode).unwrap()];
        let median_total = |mode: &str| row(mode)["median"]["total_secs"].as_f64().unwrap();
        // Every mode started the workload, both times, on both layers.
        for result in by_mode {
            let runs = result["runs"].as_array().unwrap();
            assert_eq!(runs.len(), 2, "{result}");
            for run in runs {
                assert_eq!(run["ready"], true, "{result}");
                assert_eq!(run["layers"], 2, "{result}");
            }
            let rss = &result["median"]["snapshotter_peak_rss"];
            if result["mode"] == "overlayfs" {
                assert!(rss.is_null(), "{result}");
            } else {
                assert!(rss.as_u64().unwrap() > 1 << 20, "{result}");
            }
            // No rate on the unshaped link, so no ideal start; on the shaped one nothing beats it.
            let vs_ideal = &result["vs_ideal"];
            if link == 0 {
                assert!(vs_ideal.is_null(), "{result}");
            } else {
                assert!(vs_ideal.as_f64().unwrap() > 1.0, "{result}");
            }
        }
        // Every lazy mode fetched less before ready than the overlayfs pull of the whole image;
        // the optimized lazysnap image no more than the unoptimized one.
        let bytes = |mode: &str| row(mode)["runs"][0]["fetched_bytes"].as_u64().unwrap();
        let overlay_bytes = bytes("overlayfs");
        for mode in &MODES[1..] {
            assert!(
                bytes(mode) > 0 && bytes(mode) < overlay_bytes / 2,
                "{mode}: {json}"
            );
        }
        assert!(bytes("lazysnap-opt") <= bytes("lazysnap"), "{json}");
        for mode in ["lazysnap", "lazysnap-nobg", "lazysnap-opt"] {
            assert_eq!(row(mode)["runs"][0]["lazy_layers"], 2, "{mode}: {json}");
        }
        // Unoptimized lazysnap is set beside the peers on unoptimized images, the optimized one
        // beside the fastest of all; peers and overlayfs have no such ratio.
        let unoptimized_peers = median_total("stargz").min(median_total("soci"));
        let all_peers = unoptimized_peers.min(median_total("stargz-opt"));
        for (mode, best) in [
            ("lazysnap", unoptimized_peers),
            ("lazysnap-nobg", unoptimized_peers),
            ("lazysnap-opt", all_peers),
        ] {
            let ratio = row(mode)["vs_best_peer"].as_f64().unwrap();
            assert!(
                (ratio - median_total(mode) / best).abs() < 1e-9,
                "{mode}: {json}"
            );
        }
        for mode in ["overlayfs", "stargz", "stargz-opt", "soci"] {
            assert!(row(mode)["vs_best_peer"].is_null(), "{mode}: {json}");
        }
    }
    let notes = json["notes"].to_string();
    for tool in [
        "soci create",
        "ctr-remote image convert",
        "ctr-remote image optimize",
    ] {
        assert!(notes.contains(tool), "{tool} not in {notes}");
    }

    // The table printed, in Markdown too, and both charts name every mode.
    for mode in MODES {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("100mbit:20ms") && l.contains(mode)),
            "no {mode} row in:\n{stdout}"
        );
    }
    let markdown = std::fs::read_to_string(out.path().join("table.md")).unwrap();
    assert_eq!(markdown.lines().count(), 2 + results.len(), "{markdown}");
    let svg = std::fs::read_to_string(out.path().join("startup.svg")).unwrap();
    for mode in MODES {
        assert!(
            svg.contains(&format!(">{mode}<")),
            "{mode} not in the chart"
        );
    }
    assert_png(&out.path().join("startup.png"));

    // Torn down: nothing mounted, and SOCI's fixed state directory is as it was.
    assert_eq!(mounts_under(state.path()), 0);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains("soci") || l.contains("stargz")),
        "left mounted:\n{mounts}"
    );
    assert_eq!(soci_state_dir.exists(), soci_state_dir_existed);
}

#[test]
fn bench_measures_an_image_the_user_names_and_stops_its_workload_once_ready() {
    use lazysnap::image::OciLayout;
    use lazysnap_testbed::images::{
        busybox_layer, push_layout_image, workload_layer, write_image, ImageOptions,
    };
    require_root_and_tools();
    // The user's image: Docker media types, as most registries serve them.
    let users = lazysnap_testbed::RegistryServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&dir.path().join("user")).unwrap();
    let options = ImageOptions {
        cmd: vec!["/bin/sh".into(), "/app/run.sh".into()],
        docker_media_types: true,
        ..ImageOptions::default()
    };
    let layers = [busybox_layer().unwrap(), workload_layer().unwrap()];
    write_image(&layout, &layers, &options, Some("v1")).unwrap();
    push_layout_image(&layout, Some("v1"), &users.host(), "user/app", "v1").unwrap();
    let reference = format!("{}/user/app:v1", users.host());

    let out = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let args = [
        "--state-dir",
        state.path().to_str().unwrap(),
        "--runs",
        "1",
        "--link",
        "lan",
        "--no-background-fill",
        "--optimized",
        "--image",
        &reference,
        "--ready-line",
        "workload-done",
        // A workload that runs on once ready, as a server does: stopped at the line.
        "--cmd",
        r#"["/bin/sh","-c","/app/run.sh; exec sleep 600"]"#,
    ];
    let stdout = bench_ok(&args.map(std::ffi::OsStr::new), out.path());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(json["image"]["layers"], 2, "{json}");
    assert!(
        json["notes"].to_string().contains(&reference),
        "{json}\n{stdout}"
    );
    let modes: Vec<&str> = json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["overlayfs", "lazysnap", "lazysnap-opt"], "{json}");
    for result in json["results"].as_array().unwrap() {
        let run = &result["runs"][0];
        assert_eq!(run["ready"], true, "{result}");
        if result["mode"] != "overlayfs" {
            assert_eq!(run["lazy_layers"], 2, "{result}");
        }
    }
    assert!(json["ideal_bytes"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(mounts_under(state.path()), 0);

    // An image of the user's needs the line that says it is ready.
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(["bench", "--image", &reference])
        .output()
        .expect("run lazysnap bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--ready-line"), "{stderr}");
}

#[test]
fn bench_rejects_a_bad_link_naming_the_expected_form() {
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(["bench", "--link", "fast"])
        .output()
        .expect("run lazysnap bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"fast\"") && stderr.contains("20mbit:50ms"),
        "{stderr}"
    );
}
