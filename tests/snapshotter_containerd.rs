//! End to end with the real containerd 1.6 from the test bed: `lazysnap serve` (the binary) is
//! started first, containerd uses it as the `lazysnap` proxy snapshotter, an OCI archive built
//! from the `orig` fixture image is imported and unpacked through lazysnap, and `ctr run` runs
//! busybox from it. lazysnap is then killed with SIGKILL and restarted: the snapshots are still
//! listed and new containers run. Needs root, containerd and runc: fails loudly without.

mod fixtures_common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lazysnap_testbed::{ContainerdOptions, ContainerdServer};
use sha2::{Digest, Sha256};

/// The fixture image used here, from `../shared/fixtures`.
fn fixture() -> std::path::PathBuf {
    fixtures_common::fixtures_dir().join("orig")
}
const IMAGE: &str = "docker.io/library/lazysnap-fixture:orig";

/// `lazysnap serve` as a child process; SIGKILLed on drop.
struct Lazysnap {
    child: Child,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Lazysnap {
    fn start(root: &Path, socket: &Path, log: &Path) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
            .args(["serve", "--root"])
            .arg(root)
            .arg("--address")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawning lazysnap serve");
        let mut server = Self {
            child,
            root: root.to_path_buf(),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("lazysnap serve exited with {status}:\n{}", self.log());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("lazysnap serve is not listening:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill9();
        let (root, socket, log) = (self.root.clone(), self.socket.clone(), self.log.clone());
        *self = Self::start(&root, &socket, &log);
    }
}

impl Drop for Lazysnap {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes an OCI image-layout tar (oci-layout, index.json naming the image, blobs) of the
/// fixture image: manifest, config and both layer blobs.
fn build_oci_archive(path: &Path) {
    let manifest = std::fs::read(fixture().join("manifest.json")).unwrap();
    let config = std::fs::read(fixture().join("config.json")).unwrap();
    let manifest_json: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let manifest_hex = sha256_hex(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_hex}"),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "orig"
            }
        }]
    });
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.to_string().as_bytes());
    add(&format!("blobs/sha256/{manifest_hex}"), &manifest);
    add(&format!("blobs/sha256/{}", sha256_hex(&config)), &config);
    for layer in manifest_json["layers"].as_array().unwrap() {
        let hex = layer["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap();
        let blob = std::fs::read(fixture().join(format!("{hex}.blob"))).unwrap();
        add(&format!("blobs/sha256/{hex}"), &blob);
    }
    builder.into_inner().unwrap().flush().unwrap();
}

/// The contents of regular file `name` in the tar at `path`.
fn file_from_tar(path: &Path, name: &str) -> Vec<u8> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            == name
        {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            return data;
        }
    }
    panic!("{name} is not in {}", path.display());
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ctr snapshots --snapshotter lazysnap ls`, retried while containerd reconnects to a
/// restarted lazysnap (bounded).
fn list_snapshots(containerd: &ContainerdServer) -> String {
    let mut last_error = String::new();
    for _ in 0..120 {
        match containerd.ctr_ok(&["snapshots", "--snapshotter", "lazysnap", "ls"]) {
            Ok(out) => return stdout(&out),
            Err(err) => last_error = err.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("listing lazysnap snapshots kept failing: {last_error}");
}

fn committed_names(listing: &str) -> Vec<String> {
    let mut names: Vec<String> = listing
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().last() == Some("Committed"))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    names.sort();
    names
}

fn run_container(containerd: &ContainerdServer, id: &str, command: &str) -> String {
    let out = containerd
        .ctr_ok(&[
            "run",
            "--snapshotter",
            "lazysnap",
            "--rm",
            IMAGE,
            id,
            "/bin/sh",
            "-c",
            command,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    stdout(&out)
}

#[test]
fn containerd_imports_and_runs_through_lazysnap_and_survives_kill9() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs containerd and runc and must run as root"
    );
    let dir = tempfile::Builder::new()
        .prefix("lazysnap-e2e-")
        .tempdir()
        .unwrap();
    let root = dir.path().join("root");
    let socket = dir.path().join("lazysnap.sock");
    let log = dir.path().join("lazysnap.log");

    // lazysnap first: containerd connects to its proxy plugins at start.
    let mut lazysnap = Lazysnap::start(&root, &socket, &log);
    let socket_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(socket_mode & 0o777, 0o660, "socket mode");
    let containerd = ContainerdServer::start(&ContainerdOptions {
        snapshotter_socket: Some(socket.clone()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));

    let archive = dir.path().join("image.tar");
    build_oci_archive(&archive);
    containerd
        .ctr_ok(&[
            "images",
            "import",
            "--snapshotter",
            "lazysnap",
            archive.to_str().unwrap(),
        ])
        .unwrap_or_else(|e| panic!("{e}\nlazysnap log:\n{}", lazysnap.log()));
    let images = stdout(&containerd.ctr_ok(&["images", "ls", "-q"]).unwrap());
    assert!(images.lines().any(|l| l == IMAGE), "images: {images}");

    assert_eq!(
        run_container(&containerd, "e2e-1", "cat /data/one-byte.txt"),
        "x"
    );
    let text = run_container(&containerd, "e2e-2", "cat /data/text.txt");
    assert_eq!(text.len(), 102400);
    assert!(
        text.as_bytes() == file_from_tar(&fixture().join("layer-A.tar"), "data/text.txt"),
        "/data/text.txt differs from the fixture's layer A"
    );

    let before = committed_names(&list_snapshots(&containerd));
    assert_eq!(before.len(), 2, "two committed layers: {before:?}");

    // kill -9 and restart: metadata survives and containers still start.
    lazysnap.restart();
    let after = committed_names(&list_snapshots(&containerd));
    assert_eq!(after, before, "snapshots after restart");
    assert_eq!(
        run_container(&containerd, "e2e-3", "cat /data/one-byte.txt"),
        "x"
    );

    // Graceful stop: SIGTERM drains and removes the socket.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(lazysnap.child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = lazysnap.child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM exit: {status}\n{}",
        lazysnap.log()
    );
    assert!(!socket.exists(), "socket removed on graceful stop");
    drop(containerd);
}
