//! The cache's disk watermarks on a real filesystem with a large root reserve: fullness is what df
//! shows, so a mostly empty disk whose reserve is half of it keeps every chunk (counting the
//! reserve as used once emptied the cache on such a CI machine).

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::estargz::ChunkDigest;

/// An ext4 filesystem image with half its blocks reserved for root, loop-mounted for the test.
struct ReservedExt4 {
    dir: PathBuf,
    _work: tempfile::TempDir,
}

impl ReservedExt4 {
    fn mount() -> ReservedExt4 {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test loop-mounts an ext4 image: run it as root"
        );
        let work = tempfile::tempdir().unwrap();
        let image = work.path().join("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "50"])
            .arg(&image));
        let dir = work.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&dir));
        ReservedExt4 { dir, _work: work }
    }
}

impl Drop for ReservedExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?}: {e} (mkfs.ext4 and mount are in e2fsprogs and mount)")
    });
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn used_pct_counting_the_reserve(dir: &Path) -> u64 {
    let vfs = nix::sys::statvfs::statvfs(dir).unwrap();
    100 - vfs.blocks_available() * 100 / vfs.blocks()
}

#[test]
fn a_mostly_empty_disk_with_a_large_root_reserve_keeps_every_chunk() {
    let fs = ReservedExt4::mount();
    // The premise: counted with the reserve as used, the empty disk is past a 45 % watermark.
    assert!(used_pct_counting_the_reserve(&fs.dir) > 45);
    let cache = ChunkCache::open(CacheOptions {
        high_watermark_pct: Some(45),
        low_watermark_pct: Some(40),
        ..CacheOptions::new(fs.dir.join("cache"))
    })
    .unwrap();
    let chunks: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![i; 64 << 10])).collect();
    for data in &chunks {
        cache.insert(&ChunkDigest::of(data), data.clone()).unwrap();
    }
    assert_eq!(cache.stats().evictions, 0);
    for data in &chunks {
        assert!(cache.contains(&ChunkDigest::of(data)));
    }
}
