//! The bench's real images, HelloBench-style: a language runtime or toolchain from Debian 12's
//! packages (python3, node, gcc, a Java runtime), built with debootstrap into a cache directory
//! (kept between runs) and cut into three layers as an application image would be: the minbase
//! system, what installing the packages adds to it, and an app layer with the workload's files.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::image::SampleImage;
use super::procs::io_error;
use super::BenchError;
use crate::rig::images::pseudo_random_bytes;

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

/// A runtime the bench builds an image of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Python3,
    Node,
    Gcc,
    Java,
}

impl Runtime {
    /// Its name, as the image's root directory in the cache is called.
    fn name(self) -> &'static str {
        match self {
            Runtime::Python3 => "python3",
            Runtime::Node => "node",
            Runtime::Gcc => "gcc",
            Runtime::Java => "java",
        }
    }

    /// The Debian packages installed over minbase.
    fn packages(self) -> &'static [&'static str] {
        match self {
            Runtime::Python3 => &["python3"],
            Runtime::Node => &["nodejs"],
            Runtime::Gcc => &["gcc", "libc6-dev"],
            Runtime::Java => &["openjdk-17-jre-headless"],
        }
    }

    /// The app layer's files: path, mode, content.
    fn app_files(self) -> Vec<(&'static str, u32, Vec<u8>)> {
        match self {
            Runtime::Python3 => vec![
                ("app/main.py", 0o644, APP_SCRIPT.as_bytes().to_vec()),
                (
                    "app/data.bin",
                    0o644,
                    pseudo_random_bytes(APP_DATA_BYTES, 0x5eed),
                ),
            ],
            Runtime::Node => vec![("app/main.js", 0o644, NODE_SCRIPT.as_bytes().to_vec())],
            Runtime::Gcc => vec![("app/hello.c", 0o644, HELLO_C.as_bytes().to_vec())],
            Runtime::Java => vec![("app/Hello.class", 0o644, hello_class())],
        }
    }
}

/// The node app: loads a few built-in modules, prints a digest, then the ready line.
pub const NODE_SCRIPT: &str = r#"const crypto = require('crypto');
const zlib = require('zlib');
const packed = zlib.gzipSync(Buffer.alloc(4096, 1));
console.log(crypto.createHash('sha256').update(packed).digest('hex').slice(0, 8));
console.log('ready');
"#;

/// The C program gcc compiles and runs.
pub const HELLO_C: &str = r#"#include <stdio.h>

int main(void) {
    puts("ready");
    return 0;
}
"#;

/// `Hello.class`: a class whose `main` prints `ready` (class file version 52, Java 8, which
/// every later JVM runs; one straight-line method needs no stack map). Assembled here, as no
/// compiler is in a runtime image.
pub fn hello_class() -> Vec<u8> {
    fn utf8(pool: &mut Vec<u8>, text: &str) {
        pool.push(1);
        pool.extend_from_slice(&(text.len() as u16).to_be_bytes());
        pool.extend_from_slice(text.as_bytes());
    }
    fn refs(pool: &mut Vec<u8>, tag: u8, indexes: &[u16]) {
        pool.push(tag);
        for index in indexes {
            pool.extend_from_slice(&index.to_be_bytes());
        }
    }
    const CLASS: u8 = 7;
    const STRING: u8 = 8;
    const FIELD_REF: u8 = 9;
    const METHOD_REF: u8 = 10;
    const NAME_AND_TYPE: u8 = 12;
    let mut pool = Vec::new();
    refs(&mut pool, CLASS, &[2]); // #1 this class
    utf8(&mut pool, "Hello"); // #2
    refs(&mut pool, CLASS, &[4]); // #3 super class
    utf8(&mut pool, "java/lang/Object"); // #4
    refs(&mut pool, FIELD_REF, &[6, 8]); // #5 System.out
    refs(&mut pool, CLASS, &[7]); // #6
    utf8(&mut pool, "java/lang/System"); // #7
    refs(&mut pool, NAME_AND_TYPE, &[9, 10]); // #8
    utf8(&mut pool, "out"); // #9
    utf8(&mut pool, "Ljava/io/PrintStream;"); // #10
    refs(&mut pool, STRING, &[12]); // #11
    utf8(&mut pool, "ready"); // #12
    refs(&mut pool, METHOD_REF, &[14, 16]); // #13 PrintStream.println
    refs(&mut pool, CLASS, &[15]); // #14
    utf8(&mut pool, "java/io/PrintStream"); // #15
    refs(&mut pool, NAME_AND_TYPE, &[17, 18]); // #16
    utf8(&mut pool, "println"); // #17
    utf8(&mut pool, "(Ljava/lang/String;)V"); // #18
    utf8(&mut pool, "main"); // #19
    utf8(&mut pool, "([Ljava/lang/String;)V"); // #20
    utf8(&mut pool, "Code"); // #21
    const POOL_COUNT: u16 = 22;
    // getstatic #5; ldc #11; invokevirtual #13; return
    let code: [u8; 9] = [0xb2, 0, 5, 0x12, 11, 0xb6, 0, 13, 0xb1];
    let mut class = vec![0xca, 0xfe, 0xba, 0xbe, 0, 0, 0, 52];
    class.extend_from_slice(&POOL_COUNT.to_be_bytes());
    class.extend_from_slice(&pool);
    let u16s = |class: &mut Vec<u8>, values: &[u16]| {
        for value in values {
            class.extend_from_slice(&value.to_be_bytes());
        }
    };
    // public super class Hello extends Object, no interfaces or fields, one method.
    u16s(&mut class, &[0x0021, 1, 3, 0, 0, 1]);
    // public static main(String[]), with one attribute: Code.
    u16s(&mut class, &[0x0009, 19, 20, 1, 21]);
    let code_attribute_len = 2 + 2 + 4 + code.len() as u32 + 2 + 2;
    class.extend_from_slice(&code_attribute_len.to_be_bytes());
    u16s(&mut class, &[2, 1]); // max stack, max locals
    class.extend_from_slice(&(code.len() as u32).to_be_bytes());
    class.extend_from_slice(&code);
    u16s(&mut class, &[0, 0]); // no exception table, no attributes
    u16s(&mut class, &[0]); // no class attributes
    class
}

/// Builds (or reuses from `cache_dir`) the three uncompressed layer tars of `runtime`'s image.
pub fn debian_image(
    cache_dir: &Path,
    runtime: Runtime,
    progress: &dyn Fn(&str),
) -> Result<SampleImage, BenchError> {
    let base = cache_dir.join("debian/base-root");
    let full = cache_dir.join(format!("debian/{}-root", runtime.name()));
    debootstrap(&base, &[], progress)?;
    debootstrap(&full, runtime.packages(), progress)?;
    progress(&format!(
        "cutting the {} image into layers (system, {}, app)",
        runtime.name(),
        runtime.packages().join(" ")
    ));
    let base_entries = walk(&base)?;
    let base_index: HashMap<&Path, &Entry> = base_entries
        .iter()
        .map(|e| (e.relative.as_path(), e))
        .collect();
    let system = tar_of(&base, base_entries.iter())?;
    let full_entries = walk(&full)?;
    // What installing the packages added or changed, with the parent directories of each (as
    // image builders write layers: tools such as `ctr-remote image optimize` expect them).
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
    let packages = tar_of(
        &full,
        full_entries
            .iter()
            .filter(|e| kept.contains(e.relative.as_path())),
    )?;
    let files = runtime.app_files();
    let app_files = files.len();
    let (app, app_bytes) = app_layer(files)?;
    Ok(SampleImage {
        layers: vec![system, packages, app],
        app_files,
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
        .map_err(io_error("finishing a bench image layer"))
}

/// The app layer: `/app/` and `files`; also the bytes of their content.
fn app_layer(files: Vec<(&str, u32, Vec<u8>)>) -> Result<(Vec<u8>, u64), BenchError> {
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
        header.set_mtime(crate::rig::images::TEST_MTIME);
        builder
            .append_data(&mut header, path, content)
            .map_err(io_error(format!("adding {path} to the app layer")))
    };
    add("app/", 0o755, b"")?;
    let mut bytes = 0;
    for (path, mode, content) in &files {
        add(path, *mode, content)?;
        bytes += content.len() as u64;
    }
    let tar = builder
        .into_inner()
        .map_err(io_error("finishing the app layer"))?;
    Ok((tar, bytes))
}

/// The digest (first 16 hex digits) the app prints for its data file.
pub fn app_expected_output() -> String {
    use sha2::Digest;
    let data = pseudo_random_bytes(APP_DATA_BYTES, 0x5eed);
    let digest = hex::encode(sha2::Sha256::digest(&data));
    format!("{{\"sha256\": \"{}\"}}", &digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_java_class_is_well_formed() {
        let class = hello_class();
        assert_eq!(&class[..4], &[0xca, 0xfe, 0xba, 0xbe]);
        assert_eq!(u16::from_be_bytes([class[6], class[7]]), 52);
        // The code attribute ends the method; the class has no attributes after it.
        assert!(class.ends_with(&[0xb1, 0, 0, 0, 0, 0, 0]));
        for needle in ["Hello", "java/io/PrintStream", "println", "ready", "Code"] {
            assert!(
                class.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle}"
            );
        }
    }

    #[test]
    fn every_runtime_has_packages_and_app_files() {
        for runtime in [Runtime::Python3, Runtime::Node, Runtime::Gcc, Runtime::Java] {
            assert!(!runtime.packages().is_empty());
            let files = runtime.app_files();
            assert!(files
                .iter()
                .all(|(path, _, content)| path.starts_with("app/") && !content.is_empty()));
        }
        let (tar, bytes) = app_layer(Runtime::Gcc.app_files()).unwrap();
        assert_eq!(bytes, HELLO_C.len() as u64);
        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["app/", "app/hello.c"]);
    }
}
