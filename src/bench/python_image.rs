//! The bench's real image: python3 from Debian 12's packages, built with debootstrap into a cache
//! directory (kept between runs) and cut into three layers as an application image would be:
//! the minbase system, what installing python3 adds to it, and an app layer (a script that
//! imports json and hashlib and hashes a 4 MiB random file).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::image::SampleImage;
use super::procs::io_error;
use super::BenchError;
use crate::testbed::images::pseudo_random_bytes;

/// The Debian mirror debootstrap reads (`LAZYSNAP_BENCH_MIRROR` overrides it).
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";
/// Written into a root once debootstrap finished, so a half-built root is built again.
const COMPLETE_MARKER: &str = ".lazysnap-bench-complete";

/// The app's script: imports a few modules, hashes its data file, prints the digest's start,
/// then the ready line.
pub const APP_SCRIPT: &str = "import hashlib\nimport json\n\nwith open('/app/data.bin', 'rb') as f:\n    digest = hashlib.sha256(f.read()).hexdigest()\nprint(json.dumps({'sha256': digest[:16]}))\nprint('ready', flush=True)\n";
/// Size of the app's data file.
const APP_DATA_BYTES: usize = 4 << 20;

/// Paths (relative to the root, no leading slash) whose content is left out of every layer:
/// pseudo filesystems, apt's caches and the build marker.
fn excluded(relative: &Path) -> bool {
    let text = relative.to_string_lossy();
    [
        "dev/",
        "proc/",
        "sys/",
        "run/",
        "var/cache/apt/",
        "var/lib/apt/lists/",
    ]
    .iter()
    .any(|prefix| text.starts_with(prefix))
        || text == COMPLETE_MARKER
}

/// Builds (or reuses from `cache_dir`) the python3 image's three uncompressed layer tars.
pub fn python3_image(cache_dir: &Path, progress: &dyn Fn(&str)) -> Result<SampleImage, BenchError> {
    let base = cache_dir.join("python3/base-root");
    let full = cache_dir.join("python3/python3-root");
    debootstrap(&base, &[], progress)?;
    debootstrap(&full, &["python3"], progress)?;
    progress("cutting the python3 image into layers (system, python3, app)");
    let base_entries = walk(&base)?;
    let base_index: HashMap<&Path, &Entry> = base_entries
        .iter()
        .map(|e| (e.relative.as_path(), e))
        .collect();
    let system = tar_of(&base, base_entries.iter())?;
    let full_entries = walk(&full)?;
    // What installing python3 added or changed, with the parent directories of each (as image
    // builders write layers: tools such as `ctr-remote image optimize` expect them).
    let mut kept: HashSet<&Path> = HashSet::new();
    for entry in &full_entries {
        let changed = base_index
            .get(entry.relative.as_path())
            .is_none_or(|b| b.differs(entry));
        if changed {
            kept.extend(
                entry
                    .relative
                    .ancestors()
                    .filter(|p| !p.as_os_str().is_empty()),
            );
        }
    }
    let python = tar_of(
        &full,
        full_entries
            .iter()
            .filter(|e| kept.contains(e.relative.as_path())),
    )?;
    let (app, app_bytes) = app_layer()?;
    Ok(SampleImage {
        layers: vec![system, python, app],
        app_files: 2,
        app_bytes,
    })
}

/// Runs debootstrap (minbase, plus `include`) into `root` unless a complete root is there.
fn debootstrap(root: &Path, include: &[&str], progress: &dyn Fn(&str)) -> Result<(), BenchError> {
    if root.join(COMPLETE_MARKER).is_file() {
        return Ok(());
    }
    if !Path::new("/usr/sbin/debootstrap").is_file() {
        return Err(BenchError::Missing(
            "/usr/sbin/debootstrap is missing: install the debootstrap package (scripts/install-deps.sh does)".into(),
        ));
    }
    let mirror = std::env::var("LAZYSNAP_BENCH_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
    progress(&format!(
        "building {} with debootstrap from {mirror} (once; cached for later runs)",
        root.display()
    ));
    if root.exists() {
        std::fs::remove_dir_all(root).map_err(io_error(format!("removing {}", root.display())))?;
    }
    let mut command = Command::new("/usr/sbin/debootstrap");
    command.arg("--variant=minbase");
    if !include.is_empty() {
        command.arg(format!("--include={}", include.join(",")));
    }
    let output = command
        .arg(SUITE)
        .arg(root)
        .arg(&mirror)
        .output()
        .map_err(io_error("running debootstrap"))?;
    if !output.status.success() {
        let log = String::from_utf8_lossy(&output.stdout);
        return Err(BenchError::Step {
            what: format!("debootstrap of {}", root.display()),
            detail: format!(
                "{}; last lines:\n{}",
                output.status,
                super::procs::tail(&log, 10)
            ),
        });
    }
    std::fs::write(root.join(COMPLETE_MARKER), b"")
        .map_err(io_error(format!("marking {} complete", root.display())))
}

/// One path of a root: what decides whether a layer above carries it again.
struct Entry {
    relative: PathBuf,
    kind: u32,
    mode: u32,
    size: u64,
    mtime: i64,
    link: Option<PathBuf>,
}

impl Entry {
    fn differs(&self, other: &Entry) -> bool {
        let is_dir = self.kind == libc::S_IFDIR;
        (self.kind, self.mode, self.link.as_ref()) != (other.kind, other.mode, other.link.as_ref())
            || (!is_dir && (self.size, self.mtime) != (other.size, other.mtime))
    }
}

/// Every path under `root` but the excluded ones, parents before children, in name order.
fn walk(root: &Path) -> Result<Vec<Entry>, BenchError> {
    let mut entries = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let absolute = root.join(&dir);
        let mut names: Vec<_> = std::fs::read_dir(&absolute)
            .map_err(io_error(format!("listing {}", absolute.display())))?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let relative = dir.join(&name);
            let path = root.join(&relative);
            let meta = std::fs::symlink_metadata(&path)
                .map_err(io_error(format!("reading {}", path.display())))?;
            let kind = meta.mode() & libc::S_IFMT;
            if !matches!(kind, libc::S_IFDIR | libc::S_IFREG | libc::S_IFLNK) {
                continue;
            }
            let is_dir = kind == libc::S_IFDIR;
            let excluded_content = excluded(&relative) && !is_dir;
            if excluded_content {
                continue;
            }
            let link = (kind == libc::S_IFLNK)
                .then(|| std::fs::read_link(&path).ok())
                .flatten();
            entries.push(Entry {
                relative: relative.clone(),
                kind,
                mode: meta.permissions().mode() & 0o7777,
                size: meta.len(),
                mtime: meta.mtime(),
                link,
            });
            if is_dir {
                subdirs.push(relative);
            }
        }
        // Depth first, in name order.
        pending.extend(subdirs.into_iter().rev());
    }
    Ok(entries)
}

/// A tar of `entries` (paths under `root`), symlinks kept as links.
fn tar_of<'a>(
    root: &Path,
    entries: impl Iterator<Item = &'a Entry>,
) -> Result<Vec<u8>, BenchError> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    for entry in entries {
        let path = root.join(&entry.relative);
        builder
            .append_path_with_name(&path, &entry.relative)
            .map_err(io_error(format!("adding {} to a layer", path.display())))?;
    }
    builder
        .into_inner()
        .map_err(io_error("finishing a python3 image layer"))
}

/// The app layer: `/app/main.py` and its 4 MiB data file.
fn app_layer() -> Result<(Vec<u8>, u64), BenchError> {
    let data = pseudo_random_bytes(APP_DATA_BYTES, 0x5eed);
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, content: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(if content.is_empty() && path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        header.set_size(content.len() as u64);
        header.set_mode(mode);
        header.set_mtime(crate::testbed::images::TEST_MTIME);
        builder
            .append_data(&mut header, path, content)
            .map_err(io_error(format!("adding {path} to the app layer")))
    };
    add("app/", 0o755, b"")?;
    add("app/main.py", 0o644, APP_SCRIPT.as_bytes())?;
    add("app/data.bin", 0o644, &data)?;
    let tar = builder
        .into_inner()
        .map_err(io_error("finishing the app layer"))?;
    Ok((tar, (APP_SCRIPT.len() + data.len()) as u64))
}

/// The digest (first 16 hex digits) the app prints for its data file.
pub fn app_expected_output() -> String {
    use sha2::Digest;
    let data = pseudo_random_bytes(APP_DATA_BYTES, 0x5eed);
    let digest = hex::encode(sha2::Sha256::digest(&data));
    format!("{{\"sha256\": \"{}\"}}", &digest[..16])
}
