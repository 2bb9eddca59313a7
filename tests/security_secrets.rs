//! No credential leaks: an image behind Basic auth is pulled lazily through `lazysnap serve` and
//! containerd and run, with lazysnap logging at debug level; the password, and the
//! `user:password` pair as it travels (base64 in the Authorization header), appear in none of
//! lazysnap's log, its metrics, the pull's output or containerd's log.

mod fixtures_common;
mod pull_common;

use std::process::Command;

use base64::Engine as _;
use lazysnap_testbed::write_docker_config;
use pull_common::*;

const USER: &str = "alice";
const PASSWORD: &str = "pw-4f0b9c1e-never-print";

#[test]
fn credentials_appear_in_no_log_metric_or_output_at_debug_level() {
    require_root_and_containerd();
    let work = tempfile::tempdir().unwrap();
    let (_open, private, image) = private_registry_with_fixture(work.path(), USER, PASSWORD);
    let docker_config = work.path().join("docker");
    write_docker_config(&docker_config, &[(&private.host(), USER, PASSWORD)]).unwrap();

    // Debug logging for the daemon this test starts (it inherits the environment).
    std::env::set_var("LAZYSNAP_LOG", "debug");
    let metrics_port = lazysnap_testbed::free_port().unwrap();
    let lazysnap = TestLazysnap::start_with_config(&format!(
        "metrics_address = \"127.0.0.1:{metrics_port}\"\n[registry]\ndocker_config = \"{}\"\n",
        docker_config.join("config.json").display()
    ));
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let pull = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .env("DOCKER_CONFIG", &docker_config)
        .args(["pull", "--containerd"])
        .arg(containerd.socket())
        .args(["--namespace", "secrets", "--snapshotter", "lazysnap"])
        .arg(&image)
        .output()
        .unwrap();
    let pull_output = format!(
        "{}{}",
        String::from_utf8_lossy(&pull.stdout),
        String::from_utf8_lossy(&pull.stderr)
    );
    assert!(pull.status.success(), "pull failed: {pull_output}");
    assert!(pull_output.contains("lazy"), "{pull_output}");
    // The file is fetched lazily, through the registry that needs the credentials.
    let out = containerd.run(
        "secrets",
        "lazysnap",
        &image,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(out, "x");
    // …by ranged reads of a layer blob, authenticated (the registry refuses anonymous ones).
    let registry_log = private.log();
    assert!(
        registry_log
            .lines()
            .any(|l| l.contains("/blobs/sha256:") && l.contains("\" 206 ")),
        "no ranged blob read reached the private registry:\n{registry_log}"
    );
    assert!(
        registry_log.contains(" 401 "),
        "the registry never asked for credentials"
    );
    let metrics = Command::new("curl")
        .arg("-sSf")
        .arg(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .output()
        .unwrap();
    assert!(metrics.status.success());
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();

    let log = lazysnap.log();
    assert!(
        log.contains("DEBUG"),
        "the daemon did not log at debug level:\n{log}"
    );
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for (what, text) in [
        ("lazysnap serve's log", log.as_str()),
        ("lazysnap's metrics", metrics.as_str()),
        ("lazysnap pull's output", pull_output.as_str()),
        ("containerd's log", containerd.log().as_str()),
        ("the registry's log", private.log().as_str()),
    ] {
        assert!(!text.contains(PASSWORD), "{what} holds the password");
        assert!(!text.contains(&pair), "{what} holds the user:password pair");
    }
}
