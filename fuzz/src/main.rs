//! A small coverage-guided fuzzer for the targets in `lazysnap::fuzzing`, for the stable
//! toolchain: the binary is compiled with SanitizerCoverage's trace-pc-guard (scripts/fuzz.sh sets
//! the flags), this file implements the two callbacks as an edge-hit map, and the loop keeps every
//! mutated input that reaches a new edge or hit-count class (as AFL and libFuzzer do). Panics are
//! crashes, saved under the artifacts directory; an input running longer than the timeout, or the
//! process growing past the memory limit, is saved and ends the run.
//!
//! Usage: lazysnap-fuzz TARGET SECONDS CORPUS_DIR ARTIFACTS_DIR

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lazysnap::fuzzing::{mutate, Rng, MAX_INPUT};

/// Most edges tracked; guards past it share the last slot.
const MAX_EDGES: usize = 1 << 21;
const TIMEOUT: Duration = Duration::from_secs(20);
const RSS_LIMIT_BYTES: u64 = 2 << 30;

static HITS: [AtomicU8; MAX_EDGES] = [const { AtomicU8::new(0) }; MAX_EDGES];
static EDGES: AtomicU32 = AtomicU32::new(0);

/// Called once per instrumented module: numbers its guards 1, 2, … across modules.
///
/// # Safety
/// Called by the instrumentation with the module's guard array bounds.
#[no_mangle]
pub unsafe extern "C" fn __sanitizer_cov_trace_pc_guard_init(start: *mut u32, stop: *mut u32) {
    if start == stop || *start != 0 {
        return;
    }
    let mut guard = start;
    while guard < stop {
        let id = EDGES.fetch_add(1, Ordering::Relaxed) + 1;
        *guard = id.min(MAX_EDGES as u32 - 1);
        guard = guard.add(1);
    }
}

/// Called on every instrumented edge.
///
/// # Safety
/// `guard` points into a guard array numbered by the init callback.
#[no_mangle]
pub unsafe extern "C" fn __sanitizer_cov_trace_pc_guard(guard: *mut u32) {
    let slot = &HITS[*guard as usize];
    slot.store(
        slot.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Relaxed,
    );
}

/// AFL's hit-count classes: 1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128+.
fn class(hits: u8) -> u8 {
    match hits {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => 4,
        4..=7 => 8,
        8..=15 => 16,
        16..=31 => 32,
        32..=127 => 64,
        _ => 128,
    }
}

fn name_of(data: &[u8]) -> String {
    let mut hasher = DefaultHasher::new();
    data.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// The input being run, and since when, for the watchdog.
static CURRENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static STARTED_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64 + 1
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn save(dir: &Path, prefix: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(format!("{prefix}-{}", name_of(data)));
    if let Err(e) = std::fs::write(&path, data) {
        eprintln!("lazysnap-fuzz: cannot write {}: {e}", path.display());
    }
    path
}

/// Runs `target` on `data`; true when it reached an edge or hit-count class not seen before.
fn execute(
    target: fn(&[u8]),
    data: &[u8],
    virgin: &mut [u8],
    crashes: &mut u64,
    artifacts: &Path,
    epoch: Instant,
) -> bool {
    let edges = (EDGES.load(Ordering::Relaxed) as usize + 1).min(MAX_EDGES);
    for slot in &HITS[..edges] {
        slot.store(0, Ordering::Relaxed);
    }
    if let Ok(mut current) = CURRENT.lock() {
        current.clear();
        current.extend_from_slice(data);
    }
    STARTED_MS.store(now_ms(epoch), Ordering::Relaxed);
    let outcome = std::panic::catch_unwind(|| target(data));
    STARTED_MS.store(0, Ordering::Relaxed);
    if let Err(panic) = outcome {
        *crashes += 1;
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let path = save(artifacts, "crash", data);
        eprintln!(
            "lazysnap-fuzz: crash ({message}) saved as {}",
            path.display()
        );
    }
    let mut new = false;
    for (slot, seen) in HITS[..edges].iter().zip(virgin.iter_mut()) {
        let c = class(slot.load(Ordering::Relaxed));
        if c & !*seen != 0 {
            *seen |= c;
            new = true;
        }
    }
    new
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, target_name, seconds, corpus_dir, artifacts_dir] = args.as_slice() else {
        eprintln!("usage: lazysnap-fuzz TARGET SECONDS CORPUS_DIR ARTIFACTS_DIR");
        std::process::exit(2);
    };
    let Some(&(_, target)) = lazysnap::fuzzing::TARGETS
        .iter()
        .find(|(name, _)| name == target_name)
    else {
        let names: Vec<_> = lazysnap::fuzzing::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("lazysnap-fuzz: unknown target {target_name:?}; targets: {names:?}");
        std::process::exit(2);
    };
    if EDGES.load(Ordering::Relaxed) == 0 {
        eprintln!(
            "lazysnap-fuzz: the binary has no coverage instrumentation; build it with \
             scripts/fuzz.sh (SanitizerCoverage flags)"
        );
        std::process::exit(2);
    }
    let seconds: u64 = seconds.parse().unwrap_or(60);
    let corpus_dir = PathBuf::from(corpus_dir);
    let artifacts = PathBuf::from(artifacts_dir);
    for dir in [&corpus_dir, &artifacts] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("lazysnap-fuzz: cannot create {}: {e}", dir.display());
            std::process::exit(2);
        }
    }

    let epoch = Instant::now();
    std::thread::spawn({
        let artifacts = artifacts.clone();
        let target_name = target_name.clone();
        move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let started = STARTED_MS.load(Ordering::Relaxed);
            let over_time = started != 0 && now_ms(epoch) - started > TIMEOUT.as_millis() as u64;
            let over_memory = rss_bytes() > RSS_LIMIT_BYTES;
            if over_time || over_memory {
                let input = CURRENT.lock().map(|c| c.clone()).unwrap_or_default();
                let kind = if over_time { "timeout" } else { "oom" };
                let path = save(&artifacts, kind, &input);
                eprintln!("lazysnap-fuzz: {target_name}: {kind} on {}", path.display());
                std::process::exit(1);
            }
        }
    });
    std::panic::set_hook(Box::new(|_| {}));

    let mut virgin = vec![0u8; MAX_EDGES];
    let mut crashes = 0u64;
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&corpus_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .map(|mut d| {
                    d.truncate(MAX_INPUT);
                    d
                })
                .collect()
        })
        .unwrap_or_default();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let seeds = corpus.len();
    for input in &corpus {
        execute(target, input, &mut virgin, &mut crashes, &artifacts, epoch);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ epoch.elapsed().as_nanos() as u64);
    let deadline = Duration::from_secs(seconds);
    let mut execs = seeds as u64;
    let mut last_report = Instant::now();
    while epoch.elapsed() < deadline {
        let input = &corpus[rng.below(corpus.len())];
        let other = &corpus[rng.below(corpus.len())];
        let mutated = mutate(&mut rng, input, other);
        execs += 1;
        if execute(
            target,
            &mutated,
            &mut virgin,
            &mut crashes,
            &artifacts,
            epoch,
        ) {
            save(&corpus_dir, "cov", &mutated);
            corpus.push(mutated);
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "lazysnap-fuzz: {target_name}: {execs} execs, corpus {}, edges {}",
                corpus.len(),
                virgin.iter().filter(|&&v| v != 0).count()
            );
        }
    }
    let secs = epoch.elapsed().as_secs_f64();
    println!(
        "{target_name}: {execs} execs in {secs:.0} s ({:.0}/s), corpus {} ({seeds} seeds), {} edges of {} instrumented, {crashes} crashes",
        execs as f64 / secs,
        corpus.len(),
        virgin.iter().filter(|&&v| v != 0).count(),
        EDGES.load(Ordering::Relaxed)
    );
    std::process::exit(i32::from(crashes > 0));
}
