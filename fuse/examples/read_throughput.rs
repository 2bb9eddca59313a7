//! Sequential read throughput of one large file (default 1 GiB): read directly from local disk,
//! through a lazysnap-fuse mount whose source serves it from that local file (the cache-hit path,
//! reads through the daemon), and through the same mount with FUSE passthrough. The local file is
//! in the page cache for every run; each mount is fresh, so its own page cache starts empty.
//!
//! `cargo run --release -p lazysnap-fuse --example read_throughput -- [SIZE_MIB] [DIR]` (as root);
//! env `DROP_CACHES=1` adds a cold direct read, `FUSE_THREADS` / `FUSE_READ_AHEAD_KB` override
//! the mount options.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use lazysnap_fuse::{
    mount, ContentId, ContentSource, IndexBuilder, MountOptions, NewNode, NodeAttr, NodeKind,
    ReadDone,
};

/// Serves content 0 from one local file (like a fully cached layer file).
struct LocalFileSource {
    path: PathBuf,
    file: File,
}

impl ContentSource for LocalFileSource {
    fn read(&self, _content: ContentId, offset: u64, size: u32, done: ReadDone) {
        let mut buf = BytesMut::zeroed(size as usize);
        let mut filled = 0;
        while filled < buf.len() {
            match self
                .file
                .read_at(&mut buf[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return done(Err(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        }
        buf.truncate(filled);
        done(Ok(buf.freeze()));
    }

    fn local_file(&self, _content: ContentId) -> Option<File> {
        File::open(&self.path).ok()
    }
}

/// Serves content 0 from memory (zero-copy slices), isolating the FUSE round trip cost.
struct MemorySource(bytes::Bytes);

impl ContentSource for MemorySource {
    fn read(&self, _content: ContentId, offset: u64, size: u32, done: ReadDone) {
        let start = (offset as usize).min(self.0.len());
        let end = (start + size as usize).min(self.0.len());
        done(Ok(self.0.slice(start..end)));
    }
}

fn read_all(path: &Path, buf_size: usize) -> (u64, f64) {
    let mut f = File::open(path).expect("open for reading");
    let mut buf = vec![0u8; buf_size];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    (total, start.elapsed().as_secs_f64())
}

fn report(label: &str, bytes: u64, secs: f64, direct: f64) -> f64 {
    let mibs = bytes as f64 / (1024.0 * 1024.0) / secs;
    let ratio = if direct > 0.0 { mibs / direct } else { 1.0 };
    println!("{label:<44} {mibs:>9.0} MiB/s  ({secs:.3} s, {ratio:.2}x direct)");
    mibs
}

fn main() {
    let size_mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let dir = std::env::args()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("lazysnap-throughput-{size_mib}m.bin"));
    let size = size_mib * 1024 * 1024;
    if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) != size {
        println!("writing {} ...", path.display());
        let chunk: Vec<u8> = (0..1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let f = File::create(&path).expect("create test file");
        for i in 0..size_mib {
            f.write_all_at(&chunk, i * chunk.len() as u64)
                .expect("write test file");
        }
    }
    let buf_size = 1024 * 1024;
    if std::env::var_os("DROP_CACHES").is_some() {
        // Cold read from the disk, for reference (drops the whole page cache once).
        std::fs::write("/proc/sys/vm/drop_caches", "1").expect("drop caches (root)");
        let (bytes, secs) = read_all(&path, buf_size);
        report("direct read (cold, from disk)", bytes, secs, 0.0);
    }
    // Warm the page cache, then measure the direct read.
    read_all(&path, buf_size);
    let (bytes, secs) = read_all(&path, buf_size);
    let direct = report("direct read (page cache)", bytes, secs, 0.0);

    let in_memory = bytes::Bytes::from(std::fs::read(&path).expect("load the file in memory"));
    // Warm-up mount (not reported): the first mount of a process reads markedly slower (fresh
    // page-cache allocation), which would penalize whichever variant runs first.
    {
        let mnt = tempfile::tempdir().expect("mountpoint");
        let mut builder = IndexBuilder::new(NodeAttr::new(0o755, 0, 0, 0));
        builder
            .add(
                "big",
                NewNode {
                    kind: NodeKind::File { size, content: 0 },
                    attr: NodeAttr::new(0o644, 0, 0, 0),
                    xattrs: vec![],
                },
            )
            .expect("index");
        let handle = mount(
            builder.build(),
            Arc::new(MemorySource(in_memory.clone())),
            mnt.path(),
            &MountOptions::default(),
        )
        .expect("mount (run as root)");
        read_all(&mnt.path().join("big"), buf_size);
        handle.unmount().expect("unmount");
    }
    for (label, source, passthrough) in [
        (
            "local-file source",
            Arc::new(LocalFileSource {
                path: path.clone(),
                file: File::open(&path).expect("open"),
            }) as Arc<dyn ContentSource>,
            false,
        ),
        (
            "memory source",
            Arc::new(MemorySource(in_memory)) as _,
            false,
        ),
        (
            "local-file source, passthrough",
            Arc::new(LocalFileSource {
                path: path.clone(),
                file: File::open(&path).expect("open"),
            }) as _,
            true,
        ),
    ] {
        let mnt = tempfile::tempdir().expect("mountpoint");
        let mut builder = IndexBuilder::new(NodeAttr::new(0o755, 0, 0, 0));
        builder
            .add(
                "big",
                NewNode {
                    kind: NodeKind::File { size, content: 0 },
                    attr: NodeAttr::new(0o644, 0, 0, 0),
                    xattrs: vec![],
                },
            )
            .expect("index");
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        let mut opts = MountOptions {
            passthrough,
            ..MountOptions::default()
        };
        if let Some(threads) = env("FUSE_THREADS") {
            opts.threads = threads as usize;
        }
        if let Some(kb) = env("FUSE_READ_AHEAD_KB") {
            opts.read_ahead_kb = Some(kb);
        }
        let handle =
            mount(builder.build(), source, mnt.path(), &opts).expect("mount (run as root)");
        let (bytes, secs) = read_all(&mnt.path().join("big"), buf_size);
        assert_eq!(bytes, size, "read the whole file");
        report(&format!("fuse, {label}, first read"), bytes, secs, direct);
        let (bytes, secs) = read_all(&mnt.path().join("big"), buf_size);
        report(&format!("fuse, {label}, second read"), bytes, secs, direct);
        let stats = handle.stats();
        println!(
            "    stats: reads={} read_bytes={} passthrough_opens={}",
            stats.reads, stats.read_bytes, stats.passthrough_opens
        );
        handle.unmount().expect("unmount");
    }
}
