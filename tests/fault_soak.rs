//! Seeded fault soak: files of a lazily mounted image (`lazysnap mount`, real FUSE) are read and
//! checked over and over through a fault-injecting proxy that always has the next faults queued
//! (resets mid-body, 5xx, 429, stalls, truncated and corrupted bodies, wrong Content-Range,
//! delays). The cache is kept small so reads keep going to the registry. No read may return a
//! wrong byte (an error is allowed while faults last), and once the faults stop every file reads
//! right again. `SOAK_FAULTS` sets how many faults to inject (default 150; scripts/soak.sh runs
//! 1,000); `SOAK_SECONDS` bounds the time (default 120).

mod cli_common;
use cli_common::*;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lazysnap_testbed::images;
use lazysnap_testbed::{Fault, FaultProxy, RegistryServer};

const FILES: usize = 48;
const FILE_BYTES: usize = 192 << 10;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads `path` whole, then drops it from the page cache so the next read asks the daemon again.
fn read_uncached(path: &Path) -> std::io::Result<Vec<u8>> {
    let data = std::fs::read(path)?;
    if let Ok(file) = std::fs::File::open(path) {
        // SAFETY: advisory call on an open descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    Ok(data)
}

fn random_fault(rng: &mut Rng) -> Fault {
    match rng.below(9) {
        0 => Fault::ResetMidBody,
        1 => Fault::Status(500),
        2 => Fault::Status(503),
        3 => Fault::TooManyRequests {
            retry_after_secs: 0,
        },
        4 => Fault::Stall(Duration::from_millis(200)),
        5 => Fault::TruncateBody,
        6 => Fault::WrongContentRange,
        7 => Fault::CorruptBody,
        _ => Fault::Delay(Duration::from_millis(50)),
    }
}

#[test]
fn a_fault_soak_serves_no_wrong_byte_and_recovers() {
    require_root_and_fuse();
    let target_faults = env_number("SOAK_FAULTS", 150);
    let time_bound = Duration::from_secs(env_number("SOAK_SECONDS", 120));
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..FILES)
        .map(|i| images::pseudo_random_bytes(FILE_BYTES, 7000 + i as u64))
        .collect();
    let tar = tar_of(
        files
            .iter()
            .enumerate()
            .map(|(i, data)| (format!("soak/{i}.bin"), data.clone())),
    );
    let source = push_generated(&registry, work.path(), &[tar], "soak");
    let esgz = format!("{}/soak:esgz", registry.host());
    lazysnap_ok(&["convert", "--chunk-size", "65536", &source, &esgz]);

    let proxy = FaultProxy::start(&registry.host()).unwrap();
    // A cache of about a fifth of the image: reads keep fetching, so faults keep landing.
    let soak_image = format!("{}/soak:esgz", proxy.host());
    let mounted = MountedImage::new(
        &soak_image,
        work.path(),
        "mnt",
        &[
            "--cache-size",
            "2MiB",
            "--no-background",
            "--no-passthrough",
            "--read-deadline",
            "20",
        ],
    );
    let dir = mounted.dir.clone();

    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let wrong = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut rng = Rng(0x50a6);
            while !stop.load(Ordering::Relaxed) {
                if proxy.pending_faults() < 3 {
                    proxy.inject("/blobs/", random_fault(&mut rng));
                }
                if proxy.faults_injected() as u64 >= target_faults || started.elapsed() > time_bound
                {
                    stop.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        for reader in 0..4u64 {
            let (files, mounted, stop) = (&files, &mounted, &stop);
            let (reads, errors, wrong) = (&reads, &errors, &wrong);
            scope.spawn(move || {
                let mut rng = Rng(0xbeef + reader);
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.below(FILES as u64) as usize;
                    match read_uncached(&mounted.dir.join(format!("soak/{i}.bin"))) {
                        Ok(data) if data == files[i] => reads.fetch_add(1, Ordering::Relaxed),
                        Ok(_) => wrong.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    let injected = proxy.faults_injected();
    eprintln!(
        "fault soak: {injected} faults injected in {:.0} s; {} reads right, {} failed, {} wrong",
        started.elapsed().as_secs_f64(),
        reads.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        wrong.load(Ordering::Relaxed)
    );
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "a read returned wrong bytes"
    );
    assert!(
        injected as u64 >= target_faults.min(50),
        "only {injected} faults were injected: the soak did not exercise the fetch path"
    );
    assert!(
        reads.load(Ordering::Relaxed) > 0,
        "no read succeeded under faults"
    );
    // Faults over (the queued ones drained): every file reads right.
    while proxy.pending_faults() > 0 {
        let _ = read_uncached(&dir.join("soak/0.bin"));
    }
    for (i, data) in files.iter().enumerate() {
        let read = read_uncached(&dir.join(format!("soak/{i}.bin")))
            .unwrap_or_else(|e| panic!("soak/{i}.bin after the faults: {e}"));
        assert!(
            read == *data,
            "soak/{i}.bin read back wrong after the faults"
        );
    }
}
