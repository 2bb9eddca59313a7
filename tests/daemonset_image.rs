//! The DaemonSet's image as shipped: `scripts/build-image.sh` builds it without Docker (the
//! binary and the libraries it links, pushed as eStargz under the crate's version, the tag the
//! DaemonSet pins) to a real registry; containerd pulls it and runs it as the DaemonSet does
//! (privileged, host network, the state and socket directories and the config bound from the
//! host); its readiness probe `/healthz` answers 200, the snapshotter socket answers on the host,
//! and the FUSE holder it started listens in the shared state directory.

mod fixtures_common;
mod pull_common;

use std::process::Command;
use std::time::{Duration, Instant};

use lazysnap_testbed::RegistryServer;
use pull_common::*;

#[test]
fn the_image_build_image_sh_makes_runs_serve_as_the_daemonset_does() {
    require_root_and_containerd();
    let registry = RegistryServer::start().unwrap();
    let repository = format!("{}/lazysnap", registry.host());
    let built = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/build-image.sh"
        ))
        .args(["--binary", env!("CARGO_BIN_EXE_lazysnap"), &repository])
        .output()
        .expect("run scripts/build-image.sh");
    assert!(
        built.status.success(),
        "build-image.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let image = String::from_utf8_lossy(&built.stdout).trim().to_string();
    assert_eq!(image, format!("{repository}:{}", env!("CARGO_PKG_VERSION")));
    let daemonset = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/kubernetes/lazysnap-daemonset.yaml"
    ))
    .unwrap();
    assert!(
        daemonset.contains(&format!("lazysnap:{}", env!("CARGO_PKG_VERSION"))),
        "the DaemonSet pins the version the script tags"
    );

    let host = tempfile::Builder::new()
        .prefix("ls-ds-")
        .tempdir_in("/tmp")
        .unwrap();
    let (state, run, config) = (
        host.path().join("state"),
        host.path().join("run"),
        host.path().join("config"),
    );
    for dir in [&state, &run, &config] {
        std::fs::create_dir(dir).unwrap();
    }
    let metrics_port = lazysnap_testbed::free_port().unwrap();
    std::fs::write(
        config.join("config.toml"),
        format!(
            "root = \"/var/lib/lazysnap\"\naddress = \"/run/lazysnap/lazysnap.sock\"\n\
             metrics_address = \"127.0.0.1:{metrics_port}\"\n"
        ),
    )
    .unwrap();

    let containerd = TestContainerd::start(None);
    let (ok, _, err) = containerd.ctr("ds", &["images", "pull", "--plain-http", &image]);
    assert!(ok, "pulling the image: {err}");
    let name = format!("lazysnap-ds-{}", std::process::id());
    let bind = |src: &std::path::Path, dst: &str, mode: &str| {
        format!(
            "type=bind,src={},dst={dst},options=rbind:{mode}",
            src.display()
        )
    };
    let mounts = [
        bind(&state, "/var/lib/lazysnap", "rw"),
        bind(&run, "/run/lazysnap", "rw"),
        bind(&config, "/etc/lazysnap", "ro"),
    ];
    let log = host.path().join("container.log");
    let log_uri = format!("file://{}", log.display());
    let mut args = vec![
        "run",
        "-d",
        "--privileged",
        "--net-host",
        "--log-uri",
        &log_uri,
    ];
    for mount in &mounts {
        args.extend(["--mount", mount.as_str()]);
    }
    args.extend([image.as_str(), name.as_str()]);
    let (ok, _, err) = containerd.ctr("ds", &args);
    assert!(ok, "running the image: {err}\n{}", containerd.log());

    let deadline = Instant::now() + Duration::from_secs(30);
    let healthz = format!("http://127.0.0.1:{metrics_port}/healthz");
    loop {
        let answer = Command::new("curl")
            .args(["-sSf", &healthz])
            .output()
            .unwrap();
        if answer.status.success() {
            assert_eq!(String::from_utf8_lossy(&answer.stdout), "ok\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz never answered 200: {}\nthe container's output:\n{}",
            String::from_utf8_lossy(&answer.stderr),
            std::fs::read_to_string(&log).unwrap_or_default(),
        );

        std::thread::sleep(Duration::from_millis(200));
    }
    std::os::unix::net::UnixStream::connect(run.join("lazysnap.sock"))
        .expect("the snapshotter socket answers on the host");
    assert!(state.join("metadata.db").is_file());
    assert!(
        state.join("fuse-holder.sock").exists(),
        "the FUSE holder listens"
    );

    containerd.ctr("ds", &["tasks", "kill", "-s", "SIGKILL", &name]);
    std::thread::sleep(Duration::from_millis(500));
    containerd.ctr("ds", &["tasks", "delete", "-f", &name]);
    containerd.ctr("ds", &["containers", "delete", &name]);
}
