//! `lazysnap mount` with one cache directory shared by several mounts, as a user runs it: one
//! mount daemon hosts them all (real registry on loopback, real FUSE and overlayfs, as root), a
//! chunk another image already fetched is not fetched again, `umount` releases one mount at a
//! time and the last one stops the daemon, and a daemon killed with SIGKILL is replaced.

mod cli_common;
use cli_common::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazysnap::image::OciLayout;
use lazysnap_testbed::images::{self, ImageOptions};
use lazysnap_testbed::RegistryServer;

/// One test's directories: every mount shares `cache` and `state`. On drop, whatever is still
/// mounted below the work dir is detached and the daemons seen are killed, even when the test
/// failed half way.
struct Bed {
    work: tempfile::TempDir,
    pids: std::sync::Mutex<Vec<u32>>,
}

impl Bed {
    fn new() -> Bed {
        Bed {
            work: tempfile::tempdir().unwrap(),
            pids: Default::default(),
        }
    }

    fn cache(&self) -> PathBuf {
        self.work.path().join("cache")
    }

    fn state(&self) -> PathBuf {
        self.work.path().join("state")
    }

    fn dir(&self, name: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn socket(&self) -> PathBuf {
        self.cache().join("mount.sock")
    }

    /// `lazysnap mount` with the shared cache and state dirs.
    fn mount(&self, image: &str, dir: &Path, extra: &[&str]) -> std::process::Output {
        let cache = self.cache();
        let state = self.state();
        let mut args = vec![
            "mount",
            "--no-prefetch",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push(image);
        args.push(dir.to_str().unwrap());
        let output = lazysnap(&args);
        for mount in self.status() {
            self.pids
                .lock()
                .unwrap()
                .push(mount["pid"].as_u64().unwrap() as u32);
        }
        output
    }

    fn mount_ok(&self, image: &str, dir: &Path, extra: &[&str]) -> String {
        let output = self.mount(image, dir, extra);
        assert_ok(&output);
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    fn umount_ok(&self, dir: &Path) {
        lazysnap_ok(&[
            "umount",
            "--state-dir",
            self.state().to_str().unwrap(),
            dir.to_str().unwrap(),
        ]);
    }

    /// `lazysnap status --json`: the mounts, sorted by directory.
    fn status(&self) -> Vec<serde_json::Value> {
        let out = lazysnap_ok(&[
            "status",
            "--json",
            "--state-dir",
            self.state().to_str().unwrap(),
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["mounts"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// The pid of the one daemon every listed mount names.
    fn daemon_pid(&self) -> u32 {
        let status = self.status();
        assert!(!status.is_empty(), "nothing mounted");
        let pid = status[0]["pid"].as_u64().unwrap();
        for mount in &status {
            assert_eq!(mount["pid"].as_u64(), Some(pid), "one daemon: {status:#?}");
        }
        pid as u32
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for &pid in self.pids.lock().unwrap().iter() {
            if running(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        lazysnap_testbed::unmount_under(self.work.path());
    }
}

/// True while `pid` runs (an unreaped zombie has exited).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

fn wait_until_gone(pid: u32) {
    let started = Instant::now();
    while running(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "daemon {pid} still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn file_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, path, *data).unwrap();
    }
    tar.into_inner().unwrap()
}

/// Pushes a one-layer image made of `files`, converts it to eStargz and returns the eStargz
/// reference and its layer digest.
fn push_esgz(
    registry: &RegistryServer,
    work: &Path,
    repo: &str,
    files: &[(&str, &[u8])],
) -> (String, String) {
    let layout = OciLayout::create(&work.join(format!("layout-{repo}"))).unwrap();
    images::write_image(
        &layout,
        &[file_layer(files)],
        &ImageOptions::default(),
        Some("src"),
    )
    .unwrap();
    images::push_layout_image(&layout, Some("src"), &registry.host(), repo, "src").unwrap();
    let source = format!("{}/{repo}:src", registry.host());
    let esgz = format!("{}/{repo}:esgz", registry.host());
    lazysnap_ok(&["convert", &source, &esgz]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&images::fetch_manifest(&registry.host(), repo, "esgz").unwrap())
            .unwrap();
    let digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    (esgz, digest)
}

/// Drops the kernel's page cache so reads reach the FUSE layers again.
fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

#[test]
fn mounts_with_one_cache_dir_share_one_daemon_and_fetch_a_chunk_once() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let bed = Bed::new();
    // Two different images holding one identical file (same chunks, different layer blobs).
    let common = images::pseudo_random_bytes(600 << 10, 7);
    let (one, one_layer) = push_esgz(
        &registry,
        bed.work.path(),
        "one",
        &[
            ("shared/common.bin", &common),
            ("one/only.txt", b"only in one\n"),
        ],
    );
    let (two, two_layer) = push_esgz(
        &registry,
        bed.work.path(),
        "two",
        &[
            ("two/only.txt", b"only in two\n"),
            ("shared/common.bin", &common),
            ("two/more.txt", b"more of two\n"),
        ],
    );
    assert_ne!(one_layer, two_layer);
    let (d1, d2, d3) = (bed.dir("one"), bed.dir("two"), bed.dir("one-again"));

    // Two concurrent first mounts start one daemon between them.
    std::thread::scope(|scope| {
        let first = scope.spawn(|| bed.mount(&one, &d1, &["--cache-size", "256MiB"]));
        let second = scope.spawn(|| bed.mount(&two, &d2, &["--cache-size", "256MiB"]));
        assert_ok(&first.join().unwrap());
        assert_ok(&second.join().unwrap());
    });
    let pid = bed.daemon_pid();
    assert_eq!(bed.status().len(), 2);
    assert!(running(pid));
    let socket_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(bed.socket()).unwrap().permissions(),
    );
    assert_eq!(socket_mode & 0o777, 0o600);

    // The shared file, read first: fetched from image one's blob, then served to image two
    // from the cache (fetching it from two's blob would cost as much as from one's).
    let one_before = registry.blob_bytes_served(&one_layer);
    assert_eq!(std::fs::read(d1.join("shared/common.bin")).unwrap(), common);
    let first_read = registry.blob_bytes_served(&one_layer) - one_before;
    assert!(
        first_read > 200 << 10,
        "the first read came from the registry ({first_read} bytes)"
    );
    let two_before = registry.blob_bytes_served(&two_layer);
    assert_eq!(std::fs::read(d2.join("shared/common.bin")).unwrap(), common);
    assert_eq!(
        registry.blob_bytes_served(&two_layer),
        two_before,
        "image two's copy of the file came from the shared cache"
    );
    assert!(
        two_before < first_read / 2,
        "mounting two read its TOC only ({two_before} bytes)"
    );

    // Both images read right through their own mounts.
    assert_eq!(
        std::fs::read(d1.join("one/only.txt")).unwrap(),
        b"only in one\n"
    );
    assert_eq!(
        std::fs::read(d2.join("two/only.txt")).unwrap(),
        b"only in two\n"
    );
    assert!(!d1.join("two").exists() && !d2.join("one").exists());

    // The same image again at a third dir: the daemon's bound applies, with a warning.
    let stderr = bed.mount_ok(&one, &d3, &["--cache-size", "1GiB"]);
    assert!(
        stderr.contains("warning") && stderr.contains("256.0 MiB"),
        "{stderr}"
    );
    assert_eq!(bed.daemon_pid(), pid);
    let one_before = registry.blob_bytes_served(&one_layer);
    assert_eq!(std::fs::read(d3.join("shared/common.bin")).unwrap(), common);
    assert_eq!(registry.blob_bytes_served(&one_layer), one_before);
    let status = bed.status();
    assert_eq!(status.len(), 3, "{status:#?}");
    for mount in &status {
        assert_eq!(mount["cache_limit"].as_u64(), Some(256 << 20), "{mount:#}");
    }

    // A failing mount reports the daemon's error and leaves the others alone.
    let bad = bed.mount(
        &format!("{}/missing:esgz", registry.host()),
        &bed.dir("bad"),
        &[],
    );
    assert!(!bad.status.success());
    let bad_err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        bad_err.contains("resolving") && bad_err.contains("missing"),
        "{bad_err}"
    );
    // Mounting an already mounted directory is refused.
    let again = bed.mount(&two, &d1, &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already mounted"));

    // Unmounting one leaves the others readable.
    bed.umount_ok(&d1);
    assert!(!lazysnap::layer::is_mountpoint(&d1));
    drop_page_cache();
    assert_eq!(
        std::fs::read(d2.join("two/more.txt")).unwrap(),
        b"more of two\n"
    );
    assert_eq!(
        std::fs::read(d3.join("one/only.txt")).unwrap(),
        b"only in one\n"
    );
    assert_eq!(bed.status().len(), 2);
    assert!(running(pid));

    // The last unmount stops the daemon, removes its socket and releases the cache.
    bed.umount_ok(&d3);
    assert!(running(pid));
    bed.umount_ok(&d2);
    assert!(
        !running(pid),
        "umount of the last mount waits for the daemon to exit"
    );
    assert!(!bed.socket().exists());
    assert!(bed.status().is_empty());
    bed.mount_ok(&two, &d2, &[]);
    let new_pid = bed.daemon_pid();
    assert_ne!(new_pid, pid);
    assert_eq!(
        std::fs::read(d2.join("two/only.txt")).unwrap(),
        b"only in two\n"
    );
    bed.umount_ok(&d2);
    wait_until_gone(new_pid);
}

#[test]
fn a_daemon_killed_with_sigkill_is_replaced_by_the_next_mount() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let bed = Bed::new();
    let (image, _) = push_esgz(
        &registry,
        bed.work.path(),
        "app",
        &[
            ("etc/app.conf", b"setting = 1\n"),
            ("bin/tool", b"#!/bin/sh\n"),
        ],
    );
    let (d1, d2) = (bed.dir("app"), bed.dir("other"));
    bed.mount_ok(&image, &d1, &[]);
    bed.mount_ok(&image, &d2, &[]);
    let pid = bed.daemon_pid();
    assert_eq!(
        std::fs::read(d1.join("etc/app.conf")).unwrap(),
        b"setting = 1\n"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until_gone(pid);
    assert!(bed.socket().exists(), "SIGKILL leaves the socket behind");
    assert!(
        bed.status().is_empty(),
        "status lists no mount of a dead daemon"
    );

    // The same directory again: the stale socket, state and mounts are replaced.
    bed.mount_ok(&image, &d1, &[]);
    let new_pid = bed.daemon_pid();
    assert_ne!(new_pid, pid);
    drop_page_cache();
    assert_eq!(
        std::fs::read(d1.join("etc/app.conf")).unwrap(),
        b"setting = 1\n"
    );
    assert_eq!(std::fs::read(d1.join("bin/tool")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(bed.status().len(), 1);

    // The other directory of the dead daemon: umount cleans up after it.
    bed.umount_ok(&d2);
    assert!(!lazysnap::layer::is_mountpoint(&d2));
    assert!(running(new_pid));

    // Unmounted by someone else: the daemon lets the mount go, and exits with its last one.
    nix::mount::umount2(&d1, nix::mount::MntFlags::MNT_DETACH).unwrap();
    wait_until_gone(new_pid);
    assert!(bed.status().is_empty());
    assert!(!bed.socket().exists());
}

#[test]
fn a_foreground_daemon_hosts_later_mounts_and_sigint_unmounts_them_all() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let bed = Bed::new();
    let (image, _) = push_esgz(
        &registry,
        bed.work.path(),
        "fg",
        &[("etc/fg.conf", b"foreground\n")],
    );
    let (d1, d2) = (bed.dir("first"), bed.dir("second"));
    let bin =
        std::env::var("LAZYSNAP_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lazysnap").into());
    let mut foreground = std::process::Command::new(bin)
        .args(["mount", "--foreground", "--no-prefetch", "--cache-dir"])
        .arg(bed.cache())
        .arg("--state-dir")
        .arg(bed.state())
        .arg(&image)
        .arg(&d1)
        .env("LAZYSNAP_LOG", "warn")
        .spawn()
        .unwrap();
    bed.pids.lock().unwrap().push(foreground.id());
    let started = Instant::now();
    while bed.status().is_empty() {
        assert!(
            foreground.try_wait().unwrap().is_none(),
            "the foreground mount exited"
        );
        assert!(started.elapsed() < Duration::from_secs(60), "not mounted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(bed.daemon_pid(), foreground.id());

    // A later mount joins the foreground daemon; a second --foreground is refused.
    bed.mount_ok(&image, &d2, &[]);
    assert_eq!(bed.daemon_pid(), foreground.id());
    assert_eq!(bed.status().len(), 2);
    assert_eq!(
        std::fs::read(d2.join("etc/fg.conf")).unwrap(),
        b"foreground\n"
    );
    let refused = bed.mount(&image, &bed.dir("third"), &["--foreground"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already serves"));

    // Ctrl-C unmounts everything and exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(foreground.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = foreground.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!lazysnap::layer::is_mountpoint(&d1));
    assert!(!lazysnap::layer::is_mountpoint(&d2));
    assert!(bed.status().is_empty());
    assert!(!bed.socket().exists());
}
