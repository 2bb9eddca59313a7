//! Shared harness of the `pull_*` tests: a real containerd 1.6 started on a temp socket with its
//! own root and state (optionally with lazysnap as a proxy snapshotter), `ctr` helpers, a push of
//! the fixture image to the test-bed registry, and cleanup of everything started.

#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";
pub const FIXTURES: &str = "/work/shared/fixtures";

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
    let dir = Path::new(FIXTURES).join(variant);
    assert!(
        dir.join("manifest.json").is_file(),
        "fixture {} is missing (expected ../shared/fixtures)",
        dir.display()
    );
    dir
}

/// A containerd process with its own root, state and socket under a temp dir.
pub struct TestContainerd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TestContainerd {
    /// Starts containerd; with `proxy_socket`, registers it as snapshotter `lazysnap` (start
    /// lazysnap first: containerd backs off when the proxy is missing).
    pub fn start(proxy_socket: Option<&Path>) -> TestContainerd {
        // A short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ls-ctrd-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let root = dir.path();
        let mut config = format!(
            "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{r}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{r}/containerd.sock.ttrpc\"\n\
             [debug]\n  level = \"info\"\n",
            r = root.display()
        );
        if let Some(socket) = proxy_socket {
            config.push_str(&format!(
                "[proxy_plugins.lazysnap]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                socket.display()
            ));
        }
        std::fs::write(root.join("config.toml"), config).expect("write containerd config");
        let log = std::fs::File::create(root.join("containerd.log")).expect("containerd log");
        let child = Command::new(CONTAINERD)
            .arg("--config")
            .arg(root.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let mut started = TestContainerd {
            dir,
            child: Some(child),
        };
        started.wait_ready();
        started
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket().exists() {
                let ok = Command::new(CTR)
                    .arg("-a")
                    .arg(self.socket())
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("containerd exited ({status}) at start:\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr -a SOCK -n NS ARGS...` and returns (success, stdout, stderr).
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(CTR)
            .arg("-a")
            .arg(self.socket())
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
        let id = format!("pulltest-{}", std::process::id());
        let mut args = vec![
            "run",
            "--rm",
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
        out
    }

    /// Stops containerd and unmounts anything left under its directory.
    pub fn stop(&mut self) {
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
        unmount_under(self.dir.path());
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Pushes a fixture image (`manifest.json`, `config.json`, `<hex>.blob`) to `registry_url`
/// (`http://127.0.0.1:PORT`) as `repo:tag` with plain HTTP uploads (the Distribution API).
pub async fn push_fixture(registry_url: &str, variant: &str, repo: &str, tag: &str) {
    let dir = fixture_dir(variant);
    let http = reqwest::Client::new();
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
        let start = http
            .post(format!("{registry_url}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .expect("start upload");
        assert_eq!(start.status().as_u16(), 202, "upload start for {digest}");
        let location = start
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("upload location")
            .to_string();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{registry_url}{location}")
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = http
            .put(format!("{location}{separator}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .expect("finish upload");
        assert_eq!(put.status().as_u16(), 201, "upload of {digest}");
    }
    let media_type = parsed["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_string();
    let put = http
        .put(format!("{registry_url}/v2/{repo}/manifests/{tag}"))
        .header("content-type", media_type)
        .body(manifest)
        .send()
        .await
        .expect("put manifest");
    assert_eq!(put.status().as_u16(), 201, "manifest put");
}
