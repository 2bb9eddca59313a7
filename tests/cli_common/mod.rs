//! Running the real `lazysnap` binary from integration tests, as a user runs it.

#![allow(dead_code)] // each test file uses a different part

use std::process::{Command, Output};

/// Runs `lazysnap ARGS` (quiet logs) and echoes what it printed into the test's output.
/// `LAZYSNAP_BIN` pins another copy of the binary.
pub fn lazysnap(args: &[&str]) -> Output {
    let bin =
        std::env::var("LAZYSNAP_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lazysnap").into());
    let output = Command::new(bin)
        .args(args)
        .env("LAZYSNAP_LOG", "warn")
        .output()
        .expect("running lazysnap");
    eprintln!(
        "$ lazysnap {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Panics with everything lazysnap printed unless it succeeded.
pub fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "lazysnap failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Runs `lazysnap ARGS`, requires success and returns its stdout.
pub fn lazysnap_ok(args: &[&str]) -> String {
    let output = lazysnap(args);
    assert_ok(&output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Fails loudly unless the test can mount FUSE and overlayfs (root, /dev/fuse).
pub fn require_root_and_fuse() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests mount FUSE and overlayfs: run them as root (sudo scripts/test.sh)"
    );
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: install fuse3 and load the fuse module"
    );
}

/// Pushes an image of `layers` (uncompressed tars, bottom first) to `registry` as `repo:src`
/// (its OCI layout written under `work`); returns the reference.
pub fn push_generated(
    registry: &lazysnap_testbed::RegistryServer,
    work: &std::path::Path,
    layers: &[Vec<u8>],
    repo: &str,
) -> String {
    use lazysnap_testbed::images;
    let layout = lazysnap::image::OciLayout::create(&work.join(format!("layout-{repo}"))).unwrap();
    images::write_image(
        &layout,
        layers,
        &images::ImageOptions::default(),
        Some("src"),
    )
    .unwrap();
    images::push_layout_image(&layout, Some("src"), &registry.host(), repo, "src").unwrap();
    format!("{}/{repo}:src", registry.host())
}

/// An uncompressed tar of regular files (mode 0644), in order.
pub fn tar_of(files: impl IntoIterator<Item = (String, Vec<u8>)>) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, path, data.as_slice()).unwrap();
    }
    tar.into_inner().unwrap()
}

/// A `lazysnap mount` of an image at `work/NAME`, with a cache (so a mount daemon) of its own at
/// `work/cache-NAME`; undone when dropped, even when the test fails.
pub struct MountedImage {
    pub dir: std::path::PathBuf,
    pub state_dir: std::path::PathBuf,
    pub cache_dir: std::path::PathBuf,
}

impl MountedImage {
    /// Mounts `image` with the extra `lazysnap mount` flags `extra`.
    pub fn new(image: &str, work: &std::path::Path, name: &str, extra: &[&str]) -> MountedImage {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let state_dir = work.join("state");
        // Per mount, so what a mount fetches does not depend on what the others read
        // (tests/mount_shared.rs shares one).
        let cache_dir = work.join(format!("cache-{name}"));
        let mut args = vec![
            "mount",
            "--cache-dir",
            cache_dir.to_str().unwrap(),
            "--state-dir",
            state_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push(image);
        args.push(dir.to_str().unwrap());
        lazysnap_ok(&args);
        MountedImage {
            dir,
            state_dir,
            cache_dir,
        }
    }

    /// The mounts of this state directory in `lazysnap status --json`.
    pub fn status_json(&self) -> serde_json::Value {
        let out = lazysnap_ok(&[
            "status",
            "--json",
            "--state-dir",
            self.state_dir.to_str().unwrap(),
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["mounts"].clone()
    }

    /// Memory and descriptors of the mount daemon serving it.
    pub fn daemon_resources(&self) -> Resources {
        process_resources(&["lazysnap", " mount", self.cache_dir.to_str().unwrap()])
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        let output = lazysnap(&[
            "umount",
            "--state-dir",
            self.state_dir.to_str().unwrap(),
            self.dir.to_str().unwrap(),
        ]);
        if !output.status.success() && !std::thread::panicking() {
            panic!("umount failed: {}", String::from_utf8_lossy(&output.stderr));
        }
    }
}

/// A tmpfs of `size` (as mount(8) writes it, e.g. `40m`) mounted at `dir`; unmounted on drop.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .unwrap();
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A small deterministic generator (xorshift) for seeded tests.
pub struct Rng(pub u64);

impl Rng {
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Memory and descriptors of a process.
#[derive(Debug, Clone, Copy)]
pub struct Resources {
    /// Peak resident memory (VmHWM), bytes.
    pub peak_rss: u64,
    /// Resident memory now (VmRSS), bytes.
    pub rss: u64,
    /// Open file descriptors.
    pub fds: usize,
}

/// [`Resources`] of the one process whose command line holds every one of `needles`.
pub fn process_resources(needles: &[&str]) -> Resources {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if needles.iter().all(|needle| cmdline.contains(needle)) {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap();
            let kib = |key: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap()
            };
            return Resources {
                peak_rss: kib("VmHWM:") * 1024,
                rss: kib("VmRSS:") * 1024,
                fds: std::fs::read_dir(entry.path().join("fd")).unwrap().count(),
            };
        }
    }
    panic!("no process with {needles:?} in its command line");
}
