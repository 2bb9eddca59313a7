//! Shared harness of the `pull_*` tests: a real containerd 1.6 started on a temp socket with its
//! own root and state (optionally with lazysnap as a proxy snapshotter), `ctr` helpers, a push of
//! the fixture image to the test-bed registry, and cleanup of everything started.

#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazysnap_testbed::{ContainerdOptions, ContainerdServer};

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";
/// The fixtures directory, `../shared/fixtures` beside the repository.
pub fn fixtures() -> PathBuf {
    crate::fixtures_common::fixtures_dir()
}

/// Fails loudly (never skips) when the test cannot run here.
pub fn require_root_and_containerd() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the pull tests start containerd and run containers: run them as root"
    );
    for program in [CONTAINERD, CTR, "/usr/bin/runc", "/usr/bin/docker-registry"] {
        assert!(
            Path::new(program).is_file(),
            "{program} is missing: run scripts/install-deps.sh (Debian packages containerd, runc, \
             docker-registry)"
        );
    }
}

/// The fixture image directory (`orig`, `esgz`, ...).
pub fn fixture_dir(variant: &str) -> PathBuf {
    let dir = fixtures().join(variant);
    assert!(
        dir.join("manifest.json").is_file(),
        "fixture {} is missing (expected ../shared/fixtures)",
        dir.display()
    );
    dir
}

/// containerd from the test bed (own root, state and socket in a temp dir), with `ctr` helpers.
pub struct TestContainerd {
    pub server: ContainerdServer,
}

impl TestContainerd {
    /// Starts containerd; with `proxy_socket`, registers it as snapshotter `lazysnap` (start
    /// lazysnap first: containerd backs off when the proxy is missing).
    pub fn start(proxy_socket: Option<&Path>) -> TestContainerd {
        Self::start_with(ContainerdOptions {
            snapshotter_socket: proxy_socket.map(Path::to_path_buf),
            ..ContainerdOptions::default()
        })
    }

    /// Starts containerd with `options`.
    pub fn start_with(options: ContainerdOptions) -> TestContainerd {
        let server = ContainerdServer::start(&options).unwrap_or_else(|e| panic!("{e}"));
        TestContainerd { server }
    }

    pub fn socket(&self) -> PathBuf {
        self.server.address()
    }

    pub fn log(&self) -> String {
        self.server.log()
    }

    /// Runs `ctr -a SOCK -n NS ARGS...` and returns (success, stdout, stderr).
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> (bool, String, String) {
        let output = self
            .server
            .ctr()
            .arg("-n")
            .arg(namespace)
            .args(args)
            .output()
            .expect("run ctr");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// `ctr run --rm` of `image` with `snapshotter`, returning its stdout; panics with ctr's and
    /// containerd's output on failure.
    pub fn run(&self, namespace: &str, snapshotter: &str, image: &str, cmd: &[&str]) -> String {
        // runc keeps container state in a directory every containerd on the node shares, and
        // this binary's tests run at once: each run gets an id of its own.
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("pulltest-{}-{run}", std::process::id());
        // The container's stdout goes to a file the shim hands the process as its stdout: ctr's
        // FIFO copy can lose what a process prints just before it exits (containerd#770).
        let log_dir = tempfile::tempdir().expect("a temp dir for the container's output");
        let log = log_dir.path().join("stdout");
        let log_uri = format!("file://{}", log.display());
        let mut args = vec![
            "run",
            "--rm",
            "--log-uri",
            log_uri.as_str(),
            "--snapshotter",
            snapshotter,
            image,
            id.as_str(),
        ];
        args.extend_from_slice(cmd);
        let (ok, out, err) = self.ctr(namespace, &args);
        assert!(
            ok,
            "ctr run failed: {err}\nstdout: {out}\ncontainerd log:\n{}",
            self.log()
        );
        std::fs::read_to_string(&log)
            .unwrap_or_else(|e| panic!("the container's output {}: {e}", log.display()))
    }
}

/// `lazysnap serve` (the binary) on a socket in a temp dir; killed on drop, its mounts removed.
pub struct TestLazysnap {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// The executable `serve` runs from (a copy stands for an upgraded binary).
    binary: PathBuf,
    /// Flags given to `serve` besides its paths.
    flags: Vec<String>,
}

impl TestLazysnap {
    pub fn start() -> TestLazysnap {
        Self::start_with_config("")
    }

    /// Starts `lazysnap serve` with `config_toml` as its configuration file.
    pub fn start_with_config(config_toml: &str) -> TestLazysnap {
        let dir = tempfile::Builder::new()
            .prefix("ls-serve-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        std::fs::write(dir.path().join("config.toml"), config_toml).expect("config");
        let mut started = TestLazysnap {
            dir,
            child: None,
            binary: PathBuf::from(env!("CARGO_BIN_EXE_lazysnap")),
            flags: Vec::new(),
        };
        started.spawn();
        started
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("lazysnap.log"))
            .expect("log");
        let child = Command::new(&self.binary)
            .arg("serve")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--address")
            .arg(dir.join("lazysnap.sock"))
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn lazysnap serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("lazysnap serve exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "lazysnap serve is not listening after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills `lazysnap serve` with SIGKILL (its FUSE mounts go stale) and starts it again on the
    /// same root, socket and configuration.
    pub fn kill9_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn();
    }

    /// Stops `lazysnap serve` with SIGTERM, waits for it to exit and starts it again.
    pub fn terminate_and_restart(&mut self) {
        self.terminate();
        self.spawn();
    }

    /// Stops `lazysnap serve` with SIGTERM and starts `binary` (another executable, as in an
    /// upgrade) as the daemon on the same root, socket and configuration.
    pub fn restart_as(&mut self, binary: &Path) {
        self.terminate();
        self.binary = binary.to_path_buf();
        self.spawn();
    }

    /// Stops `lazysnap serve` with SIGTERM and starts it again with `flags` added.
    pub fn terminate_and_restart_with(&mut self, flags: &[&str]) {
        self.terminate();
        self.flags = flags.iter().map(|f| f.to_string()).collect();
        self.spawn();
    }

    /// Stops `lazysnap serve` with SIGTERM and waits for it to exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let status = child.wait().expect("waiting for lazysnap serve");
            assert!(
                status.success(),
                "serve exited with {status} on SIGTERM:\n{}",
                self.log()
            );
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("lazysnap.sock")
    }

    /// The state directory it runs with (`--root`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lazysnap.log")).unwrap_or_default()
    }
}

impl Drop for TestLazysnap {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        lazysnap_testbed::unmount_under(self.dir.path());
    }
}

/// Pushes a fixture image (`manifest.json`, `config.json`, `<hex>.blob`) to the registry at
/// `host` (`127.0.0.1:PORT`) as `host/repo:tag` with lazysnap's registry client; returns the
/// image reference.
pub async fn push_fixture(host: &str, variant: &str, repo: &str, tag: &str) -> String {
    use lazysnap::registry::{Client, ClientConfig, Reference};
    let dir = fixture_dir(variant);
    let image = format!("{host}/{repo}:{tag}");
    let reference = Reference::parse(&image).expect("reference");
    let client = Client::new(ClientConfig::default()).expect("registry client");
    let manifest = std::fs::read(dir.join("manifest.json")).expect("manifest");
    let config = std::fs::read(dir.join("config.json")).expect("config");
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest json");
    let mut blobs = vec![(
        parsed["config"]["digest"]
            .as_str()
            .expect("config digest")
            .to_string(),
        config,
    )];
    for layer in parsed["layers"].as_array().expect("layers") {
        let digest = layer["digest"].as_str().expect("layer digest").to_string();
        let hex = digest.trim_start_matches("sha256:");
        let bytes = std::fs::read(dir.join(format!("{hex}.blob"))).expect("layer blob");
        blobs.push((digest, bytes));
    }
    for (digest, bytes) in blobs {
        let digest = lazysnap::digest::Digest::parse(&digest).expect("blob digest");
        client
            .push_blob_bytes(&reference, &digest, bytes.into())
            .await
            .unwrap_or_else(|e| panic!("pushing {digest}: {e}"));
    }
    let media_type = parsed["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_string();
    client
        .put_manifest(&reference, &media_type, manifest.into())
        .await
        .expect("pushing the manifest");
    image
}

/// Runs `lazysnap pull` (the binary) of `image` into `containerd` with `snapshotter`; returns its
/// stdout, panicking with its stderr and containerd's log on failure.
pub fn lazysnap_pull(
    containerd: &TestContainerd,
    namespace: &str,
    snapshotter: &str,
    image: &str,
) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .arg("pull")
        .arg("--containerd")
        .arg(containerd.socket())
        .arg("--namespace")
        .arg(namespace)
        .arg("--snapshotter")
        .arg(snapshotter)
        .arg(image)
        .output()
        .expect("run lazysnap pull");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "lazysnap pull failed:\n{}\nstdout: {stdout}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        containerd.log()
    );
    stdout
}

/// Starts a test-bed registry and pushes fixture `variant` to it as `repo:tag`; returns the
/// registry and the image reference.
pub fn registry_with_fixture(
    variant: &str,
    repo: &str,
    tag: &str,
) -> (lazysnap_testbed::RegistryServer, String) {
    let registry = lazysnap_testbed::RegistryServer::start().expect("start registry");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let image = runtime.block_on(push_fixture(&registry.host(), variant, repo, tag));
    (registry, image)
}

/// The layers of fixture `variant` as (digest, size), in manifest order.
pub fn layer_digests(variant: &str) -> Vec<(String, u64)> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_dir(variant).join("manifest.json")).unwrap())
            .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A registry behind Basic auth (`user`, `password`) serving the fixture `esgz` as
/// `HOST/private:esgz`, pushed through an open registry over the same storage (kept alive
/// beside it). Returns (open, private, image reference).
pub fn private_registry_with_fixture(
    work: &Path,
    user: &str,
    password: &str,
) -> (
    lazysnap_testbed::RegistryServer,
    lazysnap_testbed::RegistryServer,
    String,
) {
    let open = lazysnap_testbed::RegistryServer::start().expect("start registry");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(push_fixture(&open.host(), "esgz", "private", "esgz"));
    let htpasswd = work.join("htpasswd");
    lazysnap_testbed::write_htpasswd(&htpasswd, &[(user, password)]).expect("htpasswd");
    let private =
        lazysnap_testbed::RegistryServer::start_with(&lazysnap_testbed::RegistryOptions {
            htpasswd: Some(htpasswd),
            storage_root: Some(open.storage_root().to_path_buf()),
            ..lazysnap_testbed::RegistryOptions::default()
        })
        .expect("start the registry behind Basic auth");
    let image = format!("{}/private:esgz", private.host());
    (open, private, image)
}
