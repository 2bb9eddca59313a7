//! Measures the memory an [`Index`] of N entries holds (default 100k), with a counting allocator:
//! heap held by the built index, peak heap while building, and the process RSS.
//!
//! `cargo run --release -p lazysnap-fuse --example index_memory -- [ENTRIES]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use lazysnap_fuse::{IndexBuilder, NewNode, NodeAttr, NodeKind};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let entries: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    // A realistic shape: 1 file in 20 is in a new directory; names like a Python/Node tree.
    let paths: Vec<String> = (0..entries)
        .map(|i| {
            format!(
                "usr/lib/python3/dist-packages/package_{:04}/module_{:06}.py",
                i / 20,
                i
            )
        })
        .collect();
    let paths_bytes: usize =
        paths.iter().map(|p| p.capacity()).sum::<usize>() + paths.capacity() * 24;

    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let rss_before = rss_kib("VmRSS:");
    let mut builder = IndexBuilder::new(NodeAttr::new(0o755, 0, 0, 0));
    for (i, path) in paths.iter().enumerate() {
        let xattrs = if i % 100 == 0 {
            vec![("user.tag".to_string(), b"v".to_vec())]
        } else {
            vec![]
        };
        let node = NewNode {
            kind: NodeKind::File {
                size: 1000 + i as u64,
                content: i as u64,
            },
            attr: NodeAttr::new(0o644, 0, 0, 1_700_000_000),
            xattrs,
        };
        builder.add(path, node).expect("add entry");
    }
    let index = builder.build();
    let held = CURRENT.load(Ordering::Relaxed) - base;
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let rss_after = rss_kib("VmRSS:");

    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!(
        "entries:                    {entries} (+ {} directories)",
        index.inode_count() - entries
    );
    println!(
        "index heap (allocator):     {:.2} MiB ({:.1} bytes/entry)",
        mib(held),
        held as f64 / entries as f64
    );
    println!(
        "index heap (own estimate):  {:.2} MiB",
        mib(index.memory_usage())
    );
    println!("peak heap while building:   {:.2} MiB", mib(peak));
    println!(
        "input path strings:         {:.2} MiB (not part of the index)",
        mib(paths_bytes)
    );
    println!(
        "process RSS growth:         {:.2} MiB",
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0
    );
    drop(index);
}
