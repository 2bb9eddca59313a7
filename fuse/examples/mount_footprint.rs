//! Process RSS of mounted layers: one layer of N entries (default 100k) walked completely with
//! stat (every inode looked up), then per-mount overhead of 20 more small mounts.
//!
//! `cargo run --release -p lazysnap-fuse --example mount_footprint -- [ENTRIES]` (as root)

use std::sync::Arc;

use lazysnap_fuse::{
    mount, ContentId, ContentSource, IndexBuilder, MountOptions, NewNode, NodeAttr, NodeKind,
    ReadDone,
};

struct Empty;

impl ContentSource for Empty {
    fn read(&self, _content: ContentId, _offset: u64, _size: u32, done: ReadDone) {
        done(Err(libc::EIO));
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn walk(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let entry = entry.expect("entry");
        let meta = std::fs::symlink_metadata(entry.path()).expect("stat");
        n += 1;
        if meta.is_dir() {
            n += walk(&entry.path());
        }
    }
    n
}

fn main() {
    let entries: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let start = rss_kib();
    let mut builder = IndexBuilder::new(NodeAttr::new(0o755, 0, 0, 0));
    for i in 0..entries {
        let path = format!(
            "usr/lib/python3/dist-packages/package_{:04}/module_{:06}.py",
            i / 20,
            i
        );
        let node = NewNode {
            kind: NodeKind::File {
                size: 1000,
                content: i as u64,
            },
            attr: NodeAttr::new(0o644, 0, 0, 1_700_000_000),
            xattrs: vec![],
        };
        builder.add(&path, node).expect("add");
    }
    let index = builder.build();
    let after_build = rss_kib();
    let dir = tempfile::tempdir().expect("mountpoint");
    let handle = mount(index, Arc::new(Empty), dir.path(), &MountOptions::default())
        .expect("mount (run as root)");
    let walked = walk(dir.path());
    let after_walk = rss_kib();
    println!("entries walked through the mount:   {walked}");
    println!(
        "RSS after building the index:       +{:.1} MiB",
        (after_build - start) as f64 / 1024.0
    );
    println!(
        "RSS after mount + full stat walk:   +{:.1} MiB",
        (after_walk - start) as f64 / 1024.0
    );

    let mut small = Vec::new();
    let before_small = rss_kib();
    for _ in 0..20 {
        let mut b = IndexBuilder::new(NodeAttr::new(0o755, 0, 0, 0));
        b.add(
            "f",
            NewNode {
                kind: NodeKind::File {
                    size: 1,
                    content: 0,
                },
                attr: NodeAttr::new(0o644, 0, 0, 0),
                xattrs: vec![],
            },
        )
        .expect("add");
        let d = tempfile::tempdir().expect("mountpoint");
        let h = mount(
            b.build(),
            Arc::new(Empty),
            d.path(),
            &MountOptions::default(),
        )
        .expect("mount");
        let _ = std::fs::metadata(d.path().join("f"));
        small.push((h, d));
    }
    let after_small = rss_kib();
    println!(
        "RSS per extra small mount:          {:.0} KiB",
        (after_small - before_small) as f64 / 20.0
    );
    for (h, _d) in small.drain(..) {
        h.unmount().expect("unmount");
    }
    handle.unmount().expect("unmount");
}
