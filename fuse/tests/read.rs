//! Real FUSE mounts (root required): reads at odd offsets and sizes, reads answered later from
//! other threads, EIO from the source, concurrent readers, exec of a static binary (mmap), FUSE
//! passthrough, and unmounting a busy mount.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{is_mounted, pattern, test_options, MemorySource, TestMount};
use lazysnap_fuse::{mount, IndexBuilder, MountOptions, NewNode, NodeAttr, NodeKind};

fn file(size: usize, content: u64, mode: u32) -> NewNode {
    NewNode {
        kind: NodeKind::File {
            size: size as u64,
            content,
        },
        attr: NodeAttr::new(mode, 0, 0, 0),
        xattrs: vec![],
    }
}

fn root() -> NodeAttr {
    NodeAttr::new(0o755, 0, 0, 0)
}

#[test]
fn reads_at_odd_offsets_and_sizes_match() {
    let data = pattern(3 * 1024 * 1024 + 4097, 11);
    let mut source = MemorySource::default();
    source.insert(1, data.clone());
    let mut b = IndexBuilder::new(root());
    b.add("f", file(data.len(), 1, 0o644)).unwrap();
    let source = Arc::new(source);
    let observed: Arc<std::sync::Mutex<Vec<&'static str>>> = Arc::default();
    let sink = Arc::clone(&observed);
    let observer =
        lazysnap_fuse::OpObserver(Arc::new(move |op, _latency| sink.lock().unwrap().push(op)));
    let mnt = TestMount::new(
        b.build(),
        source.clone(),
        &MountOptions {
            observer: Some(observer),
            ..test_options()
        },
    );

    let f = File::open(mnt.path("f")).unwrap();
    let cases: &[(u64, usize)] = &[
        (0, 1),
        (1, 4095),
        (4095, 2),
        (4096, 4096),
        (12_345, 131_073),
        (1_048_575, 3),
        (data.len() as u64 - 5, 5),
        (data.len() as u64 - 5, 100),
        (data.len() as u64, 10),
        (data.len() as u64 + 1000, 10),
        (777_777, 1_000_001),
    ];
    for &(offset, len) in cases {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = f.read_at(&mut buf[got..], offset + got as u64).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        let start = (offset as usize).min(data.len());
        let end = (offset as usize + len).min(data.len());
        assert_eq!(got, end - start, "bytes read at {offset}+{len}");
        assert!(buf[..got] == data[start..end], "content at {offset}+{len}");
    }
    let whole = std::fs::read(mnt.path("f")).unwrap();
    assert!(whole == data, "whole-file read matches");
    assert!(
        source.delayed_reads.load(Ordering::Relaxed) > 0,
        "some reads were answered later from another thread"
    );
    assert!(mnt.handle.stats().reads > 0);
    // fsync and close succeed; the filesystem answers the first FLUSH and FSYNC itself (fuser's
    // defaults log a warning), with ENOSYS, after which the kernel sends neither again.
    f.sync_all().unwrap();
    f.sync_all().unwrap();
    for _ in 0..2 {
        let fd = std::os::fd::IntoRawFd::into_raw_fd(std::fs::File::open(mnt.path("f")).unwrap());
        // SAFETY: fd was just opened and is owned here.
        assert_eq!(unsafe { libc::close(fd) }, 0, "close succeeds");
    }
    drop(f);
    let ops = observed.lock().unwrap().clone();
    for op in ["lookup", "open", "read"] {
        assert!(ops.contains(&op), "observer saw {op}: {ops:?}");
    }
    for op in ["flush", "fsync"] {
        let seen = ops.iter().filter(|o| **o == op).count();
        assert_eq!(seen, 1, "{op} reaches the filesystem once: {ops:?}");
    }
    assert_eq!(
        ops.iter().filter(|o| **o == "read").count() as u64,
        mnt.handle.stats().reads
    );
}

#[test]
fn source_errors_reach_the_reader_as_eio() {
    let mut source = MemorySource::default();
    source.insert(1, b"fine".to_vec());
    source.failing.insert(2);
    source.insert(3, vec![7u8; 5_000]);
    let mut b = IndexBuilder::new(root());
    b.add("ok", file(4, 1, 0o644)).unwrap();
    b.add("broken", file(100_000, 2, 0o644)).unwrap();
    b.add("unknown", file(10, 99, 0o644)).unwrap();
    // The source holds fewer bytes than the index says: never zero-filled, always EIO.
    b.add("truncated", file(10_000, 3, 0o644)).unwrap();
    let mnt = TestMount::new(b.build(), Arc::new(source), &test_options());

    assert_eq!(std::fs::read(mnt.path("ok")).unwrap(), b"fine");
    let err = std::fs::read(mnt.path("broken")).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "read of a failing file: {err}"
    );
    let err = std::fs::read(mnt.path("unknown")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let err = std::fs::read(mnt.path("truncated")).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "short answer from the source"
    );
    assert_eq!(
        std::fs::metadata(mnt.path("truncated")).unwrap().len(),
        10_000,
        "size unchanged by the failed read"
    );
    // Metadata stays available and the mount keeps working.
    assert_eq!(
        std::fs::metadata(mnt.path("broken")).unwrap().len(),
        100_000
    );
    assert_eq!(std::fs::read(mnt.path("ok")).unwrap(), b"fine");
    assert!(mnt.handle.stats().read_errors >= 2);
}

#[test]
fn concurrent_readers_get_correct_bytes() {
    let mut source = MemorySource::default();
    let mut b = IndexBuilder::new(root());
    let mut expected = Vec::new();
    for i in 0..8u64 {
        let data = pattern(700_000 + i as usize * 4099, 100 + i);
        source.insert(i, data.clone());
        b.add(&format!("f{i}"), file(data.len(), i, 0o644)).unwrap();
        expected.push(data);
    }
    let mnt = TestMount::new(
        b.build(),
        Arc::new(source),
        &MountOptions {
            threads: 4,
            ..test_options()
        },
    );
    let expected = Arc::new(expected);

    let threads: Vec<_> = (0..32)
        .map(|t| {
            let expected = Arc::clone(&expected);
            let dir = mnt.path("");
            std::thread::spawn(move || {
                for round in 0..3 {
                    let i = (t + round) % 8;
                    let mut f = File::open(dir.join(format!("f{i}"))).unwrap();
                    let mut got = Vec::new();
                    f.read_to_end(&mut got).unwrap();
                    assert!(got == expected[i], "reader {t} round {round} file f{i}");
                    // Also small random-ish preads.
                    let mut buf = [0u8; 333];
                    let off = (t * 7919 + round * 104_729) % (expected[i].len() - 333);
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert!(buf[..] == expected[i][off..off + 333]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }
    assert_eq!(mnt.handle.stats().reads_in_flight, 0);
}

#[test]
fn busybox_executes_from_the_mount() {
    let busybox =
        std::fs::read("/bin/busybox").expect("/bin/busybox (package busybox-static) is required");
    // Daemon-served reads, with passthrough negotiated or not (no local file is offered).
    for passthrough in [false, true] {
        let mut source = MemorySource::default();
        source.insert(1, busybox.clone());
        let mut b = IndexBuilder::new(root());
        b.add("bin/busybox", file(busybox.len(), 1, 0o755)).unwrap();
        b.add(
            "bin/sh",
            NewNode {
                kind: NodeKind::Symlink {
                    target: "busybox".into(),
                },
                attr: NodeAttr::new(0o777, 0, 0, 0),
                xattrs: vec![],
            },
        )
        .unwrap();
        let mnt = TestMount::new(
            b.build(),
            Arc::new(source),
            &MountOptions {
                passthrough,
                ..test_options()
            },
        );

        let out = Command::new(mnt.path("bin/busybox"))
            .args(["echo", "hello from the layer"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "busybox failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from the layer\n"
        );
        // Through the symlink, as a shell.
        let out = Command::new(mnt.path("bin/sh"))
            .args(["-c", "echo $((6*7))"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
        assert_eq!(mnt.handle.stats().passthrough_opens, 0);
    }
}

#[test]
fn passthrough_serves_local_files_and_falls_back_otherwise() {
    let data = pattern(2 * 1024 * 1024 + 3, 5);
    let local_dir = tempfile::tempdir().unwrap();
    let local = local_dir.path().join("content-1");
    std::fs::write(&local, &data).unwrap();
    let mut source = MemorySource::default();
    source.insert(1, data.clone());
    source.insert(2, b"remote only".to_vec());
    source.local_files.insert(1, local.clone());
    source.insert(3, data[..1000].to_vec());
    source.local_files.insert(3, local);
    let mut b = IndexBuilder::new(root());
    b.add("local", file(data.len(), 1, 0o644)).unwrap();
    b.add("remote", file(11, 2, 0o644)).unwrap();
    b.add("wrong-size", file(1000, 3, 0o644)).unwrap();
    let source = Arc::new(source);
    let mnt = TestMount::new(
        b.build(),
        source.clone(),
        &MountOptions {
            passthrough: true,
            ..test_options()
        },
    );
    assert!(
        mnt.handle.stats().passthrough_active,
        "kernel 6.9+ offers FUSE passthrough; it was not negotiated"
    );

    let reads_before = source.reads.load(Ordering::Relaxed);
    let f1 = File::open(mnt.path("local")).unwrap();
    let f2 = File::open(mnt.path("local")).unwrap();
    let mut got = Vec::new();
    (&f1).read_to_end(&mut got).unwrap();
    assert!(got == data, "passthrough content");
    let mut buf = [0u8; 10];
    f2.read_exact_at(&mut buf, 1_000_001).unwrap();
    assert_eq!(buf[..], data[1_000_001..1_000_011]);
    drop((f1, f2));
    let stats = mnt.handle.stats();
    assert_eq!(
        stats.passthrough_opens, 2,
        "both opens used passthrough: {stats:?}"
    );
    assert_eq!(
        source.reads.load(Ordering::Relaxed),
        reads_before,
        "passthrough reads bypass the daemon"
    );

    assert_eq!(std::fs::read(mnt.path("remote")).unwrap(), b"remote only");
    assert!(source.reads.load(Ordering::Relaxed) > reads_before);

    // A local file of the wrong size is never used as the backing file.
    let reads_before = source.reads.load(Ordering::Relaxed);
    let passthrough_before = mnt.handle.stats().passthrough_opens;
    assert!(std::fs::read(mnt.path("wrong-size")).unwrap() == data[..1000]);
    assert_eq!(mnt.handle.stats().passthrough_opens, passthrough_before);
    assert!(source.reads.load(Ordering::Relaxed) > reads_before);

    // Exec/mmap through passthrough too.
    let busybox_dir = tempfile::tempdir().unwrap();
    let bb = busybox_dir.path().join("busybox");
    std::fs::copy("/bin/busybox", &bb).unwrap();
    let mut source = MemorySource::default();
    source.local_files.insert(1, bb.clone());
    let mut b = IndexBuilder::new(root());
    b.add(
        "busybox",
        file(std::fs::metadata(&bb).unwrap().len() as usize, 1, 0o755),
    )
    .unwrap();
    let mnt2 = TestMount::new(
        b.build(),
        Arc::new(source),
        &MountOptions {
            passthrough: true,
            ..test_options()
        },
    );
    let out = Command::new(mnt2.path("busybox"))
        .args(["echo", "passthrough exec"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "passthrough exec\n");
    assert!(mnt2.handle.stats().passthrough_opens >= 1);
}

#[test]
fn unmount_detaches_a_busy_mount() {
    common::require_fuse_root();
    let mut source = MemorySource::default();
    source.insert(1, b"still readable".to_vec());
    let mut b = IndexBuilder::new(root());
    b.add("f", file(14, 1, 0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let handle = mount(b.build(), Arc::new(source), dir.path(), &test_options()).unwrap();
    assert!(is_mounted(&dir.path().canonicalize().unwrap()));

    let busy = File::open(dir.path().join("f")).unwrap();
    handle
        .unmount()
        .expect("unmount of a busy mount detaches it");
    assert!(
        !is_mounted(&dir.path().canonicalize().unwrap()),
        "mount point is gone after detach"
    );
    let mut buf = [0u8; 14];
    busy.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        &buf, b"still readable",
        "open files keep working after a lazy unmount"
    );
    drop(busy);

    // Idle mount: plain unmount, by drop.
    let mut source = MemorySource::default();
    source.insert(1, b"x".to_vec());
    let mut b = IndexBuilder::new(root());
    b.add("f", file(1, 1, 0o644)).unwrap();
    let handle = mount(b.build(), Arc::new(source), dir.path(), &test_options()).unwrap();
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"x");
    drop(handle);
    assert!(!is_mounted(&dir.path().canonicalize().unwrap()));
}

/// Parks every read of content 1 until released; content 2 answers at once.
struct GatedSource {
    parked: std::sync::Mutex<Vec<(u64, u32, lazysnap_fuse::ReadDone)>>,
    slow: bytes::Bytes,
}

impl lazysnap_fuse::ContentSource for GatedSource {
    fn read(&self, content: u64, offset: u64, size: u32, done: lazysnap_fuse::ReadDone) {
        if content == 1 {
            self.parked.lock().unwrap().push((offset, size, done));
        } else {
            done(Ok(bytes::Bytes::from_static(b"fast")));
        }
    }
}

#[test]
fn a_pending_read_does_not_block_the_single_fuse_thread() {
    let slow = bytes::Bytes::from(pattern(300_000, 3));
    let source = Arc::new(GatedSource {
        parked: std::sync::Mutex::new(Vec::new()),
        slow: slow.clone(),
    });
    let mut b = IndexBuilder::new(root());
    b.add("slow", file(slow.len(), 1, 0o644)).unwrap();
    b.add("fast", file(4, 2, 0o644)).unwrap();
    // One FUSE thread only: if a read blocked it, everything below would hang.
    let mnt = TestMount::new(
        b.build(),
        source.clone(),
        &MountOptions {
            threads: 1,
            ..test_options()
        },
    );

    let slow_path = mnt.path("slow");
    let reader = std::thread::spawn(move || std::fs::read(slow_path).unwrap());
    let mut waited = 0;
    while source.parked.lock().unwrap().is_empty() {
        assert!(waited < 30_000, "the slow read never reached the source");
        std::thread::sleep(std::time::Duration::from_millis(1));
        waited += 1;
    }
    // While that read is pending, the filesystem keeps answering.
    assert_eq!(std::fs::read(mnt.path("fast")).unwrap(), b"fast");
    assert_eq!(std::fs::read_dir(mnt.path("")).unwrap().count(), 2);
    assert_eq!(
        std::fs::metadata(mnt.path("slow")).unwrap().len(),
        slow.len() as u64
    );
    assert!(mnt.handle.stats().reads_in_flight >= 1);

    // Release parked reads (and any that arrive meanwhile) until the reader is done.
    while !reader.is_finished() {
        let parked: Vec<_> = source.parked.lock().unwrap().drain(..).collect();
        for (offset, size, done) in parked {
            let start = offset as usize;
            let end = (start + size as usize).min(source.slow.len());
            done(Ok(source.slow.slice(start..end)));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(
        reader.join().unwrap() == slow[..],
        "the late answers carry the right bytes"
    );
}

#[test]
fn mmap_reads_match() {
    let data = pattern(1_000_003, 21);
    let mut source = MemorySource::default();
    source.insert(1, data.clone());
    let mut b = IndexBuilder::new(root());
    b.add("m", file(data.len(), 1, 0o644)).unwrap();
    let mnt = TestMount::new(b.build(), Arc::new(source), &test_options());
    let f = File::open(mnt.path("m")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: read-only private mapping of an open file, unmapped below; length is the file size.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            data.len(),
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the mapping is data.len() bytes long and lives until munmap.
    let mapped = unsafe { std::slice::from_raw_parts(ptr as *const u8, data.len()) };
    let equal = mapped == &data[..];
    // SAFETY: unmapping what was mapped above.
    unsafe { libc::munmap(ptr, data.len()) };
    assert!(equal, "mmap'ed bytes match");
}

#[test]
fn open_observer_records_access_order() {
    let mut source = MemorySource::default();
    let mut b = IndexBuilder::new(root());
    for id in 0..3u64 {
        source.insert(id, vec![id as u8; 10]);
        b.add(&format!("dir/f{id}"), file(10, id, 0o644)).unwrap();
    }
    let seen: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let opts = MountOptions {
        open_observer: Some(lazysnap_fuse::OpenObserver(Arc::new(move |id| {
            sink.lock().unwrap().push(id)
        }))),
        ..test_options()
    };
    let mnt = TestMount::new(b.build(), Arc::new(source), &opts);
    for id in [2, 0, 2] {
        assert_eq!(
            std::fs::read(mnt.path(&format!("dir/f{id}"))).unwrap(),
            vec![id as u8; 10]
        );
    }
    let _ = std::fs::metadata(mnt.path("dir/f1")).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![2, 0, 2],
        "opens in order; a stat is not an access"
    );
}

#[test]
fn detach_stale_mount_clears_a_leftover_mount() {
    common::require_fuse_root();
    let mut source = MemorySource::default();
    source.insert(1, b"x".to_vec());
    let mut b = IndexBuilder::new(root());
    b.add("f", file(1, 1, 0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().canonicalize().unwrap();
    assert!(
        !lazysnap_fuse::detach_stale_mount(&path).unwrap(),
        "nothing mounted yet"
    );
    let handle = mount(b.build(), Arc::new(source), &path, &test_options()).unwrap();
    assert!(is_mounted(&path));
    assert!(lazysnap_fuse::detach_stale_mount(&path).unwrap());
    assert!(!is_mounted(&path));
    // A new mount takes the path; dropping the old handle must leave it alone.
    let mut source = MemorySource::default();
    source.insert(1, b"new".to_vec());
    let mut b = IndexBuilder::new(root());
    b.add("g", file(3, 1, 0o644)).unwrap();
    let newer = mount(b.build(), Arc::new(source), &path, &test_options()).unwrap();
    handle.unmount().unwrap();
    assert!(
        is_mounted(&path),
        "the old handle did not unmount the newer mount"
    );
    assert_eq!(std::fs::read(path.join("g")).unwrap(), b"new");
    newer.unmount().unwrap();
    assert!(!is_mounted(&path));
}

#[test]
fn ioctls_are_not_a_terminal() {
    let mut source = MemorySource::default();
    source.insert(1, b"text".to_vec());
    let mut b = IndexBuilder::new(root());
    b.add("t", file(4, 1, 0o644)).unwrap();
    let mnt = TestMount::new(b.build(), Arc::new(source), &test_options());
    let f = File::open(mnt.path("t")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: isatty only queries the open descriptor.
    let tty = unsafe { libc::isatty(f.as_raw_fd()) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert_eq!(tty, 0);
    assert_eq!(errno, Some(libc::ENOTTY));
}
