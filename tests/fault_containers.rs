//! Fault matrix against live containers: real `lazysnap serve`, containerd 1.6 and runc, the
//! registry behind a fault-injecting proxy, and a hosts.toml whose first endpoint is a mirror
//! that cannot be resolved. Each case starts a container that waits, injects its faults once the
//! container runs, then lets it hash files it has not read before: resets mid-body, 5xx bursts,
//! 429 with Retry-After, stalls past the request timeout, truncated, corrupted and wrong-blob
//! bodies, wrong Content-Range, an expired redirect, and the registry down for 30 s then back.
//! Never a wrong hash; transient faults are retried into right answers; no read outlives its
//! deadline; after the faults every file reads right from a dropped page cache (nothing
//! unverified was cached).

mod cli_common;
mod fixtures_common;
mod pull_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cli_common::{lazysnap_ok, push_generated, tar_of};
use lazysnap_testbed::images;
use lazysnap_testbed::{Fault, FaultProxy, RegistryServer};
use pull_common::*;
use sha2::{Digest, Sha256};

const FILES: usize = 32;
const FILE_BYTES: usize = 256 << 10;
const READ_DEADLINE_SECS: u64 = 12;
const REQUEST_TIMEOUT_SECS: u64 = 4;
const DOWN_FOR: Duration = Duration::from_secs(30);
/// Slack on top of its reads' deadlines before a container's run counts as hung: starting and
/// stopping the container, and a deadline that restarts when a chunk arrives.
const HANG_SLACK: Duration = Duration::from_secs(20);
/// Reads of a file one failure may cost: the kernel asks again, with a read of its own, for
/// pages whose read-ahead failed.
const READS_PER_FAILURE: u32 = 2;

/// One container of the matrix: its command runs once `go` appears in its control directory.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    /// From `go` to the container's exit.
    elapsed: Duration,
}

struct Bed {
    containerd: TestContainerd,
    lazysnap: TestLazysnap,
    proxy: FaultProxy,
    image: String,
    expected: Vec<String>,
    control: tempfile::TempDir,
    runs: usize,
}

impl Bed {
    /// Starts a container hashing `files`, waits until it runs, calls `before_go` (inject faults
    /// here), then lets it read.
    fn run(&mut self, files: &[usize], before_go: impl FnOnce(&FaultProxy)) -> Run {
        self.runs += 1;
        let dir = self.control.path().join(format!("run{}", self.runs));
        std::fs::create_dir_all(&dir).unwrap();
        let hashes = files
            .iter()
            .map(|i| format!("sha256sum /app/{i}.bin"))
            .collect::<Vec<_>>()
            .join("; ");
        let script =
            format!("touch /ctl/ready; while [ ! -e /ctl/go ]; do sleep 0.05; done; {hashes}");
        let id = format!("faults-{}-{}", std::process::id(), self.runs);
        let mount = format!("type=bind,src={},dst=/ctl,options=rbind:rw", dir.display());
        std::thread::scope(|scope| {
            let containerd = &self.containerd;
            let image = &self.image;
            let running = scope.spawn(move || {
                let args = [
                    "run",
                    "--rm",
                    "--snapshotter",
                    "lazysnap",
                    "--mount",
                    &mount,
                    image,
                    &id,
                    "sh",
                    "-c",
                    &script,
                ];
                let (ok, stdout, stderr) = containerd.ctr("faults", &args);
                (ok, stdout, stderr, Instant::now())
            });
            wait_for(&dir.join("ready"), &running);
            // The container's Prepare starts a background check of the remote layers: let it
            // finish so the faults land on the reads.
            std::thread::sleep(Duration::from_millis(300));
            before_go(&self.proxy);
            let go = Instant::now();
            std::fs::write(dir.join("go"), b"").unwrap();
            let (ok, stdout, stderr, ended) = running.join().unwrap();
            Run {
                ok,
                stdout,
                stderr,
                elapsed: ended.duration_since(go),
            }
        })
    }

    /// Asserts no hash `run` printed is wrong and it ended within its deadline; returns the
    /// files it hashed right.
    fn check(&self, case: &str, files: &[usize], run: &Run) -> usize {
        let mut right = 0;
        for line in run.stdout.lines() {
            let mut fields = line.split_whitespace();
            let (Some(hash), Some(path)) = (fields.next(), fields.next()) else {
                continue;
            };
            let index: usize = path
                .trim_start_matches("/app/")
                .trim_end_matches(".bin")
                .parse()
                .unwrap_or_else(|_| panic!("{case}: unexpected output line {line:?}"));
            assert_eq!(
                hash,
                self.expected[index],
                "{case}: WRONG BYTES served for /app/{index}.bin\n{}",
                self.lazysnap.log()
            );
            right += 1;
        }
        let bound =
            Duration::from_secs(READ_DEADLINE_SECS) * READS_PER_FAILURE * files.len() as u32
                + HANG_SLACK;
        assert!(
            run.elapsed < bound,
            "{case}: the container ran {:?} after its reads began (bound {bound:?}): a read hung\n{}",
            run.elapsed,
            self.lazysnap.log()
        );
        right
    }

    /// Runs one case whose faults are all transient: every file must hash right, and every
    /// injected fault must have landed on these reads.
    fn transient_case(&mut self, case: &str, files: &[usize], faults: Vec<Fault>) {
        let run = self.run(files, |proxy| {
            for fault in faults {
                proxy.inject("/blobs/", fault);
            }
        });
        let right = self.check(case, files, &run);
        assert!(
            run.ok && right == files.len(),
            "{case}: a transient fault was not retried into the right bytes: ok={} stdout={:?} \
             stderr={:?}\n{}",
            run.ok,
            run.stdout,
            run.stderr,
            self.lazysnap.log()
        );
        assert_eq!(
            self.proxy.pending_faults(),
            0,
            "{case}: faults left over: the reads did not reach the registry"
        );
        eprintln!("{case}: {} files right in {:?}", files.len(), run.elapsed);
    }
}

/// Waits for the container to create `ready`, failing with its output if it exits first.
fn wait_for(
    ready: &Path,
    running: &std::thread::ScopedJoinHandle<'_, (bool, String, String, Instant)>,
) {
    let started = Instant::now();
    while !ready.exists() {
        assert!(
            !running.is_finished(),
            "the container exited before it was ready"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the container did not start in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").expect("dropping the page cache");
}

fn hosts_with_unresolvable_mirror(dir: &Path, registry_host: &str) -> PathBuf {
    let host_dir = dir.join(registry_host);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{registry_host}\"\n\n\
             [host.\"http://mirror.invalid:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    dir.to_path_buf()
}

#[test]
fn live_containers_survive_the_fault_matrix_with_no_wrong_byte() {
    require_root_and_containerd();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| {
            let data = images::pseudo_random_bytes(FILE_BYTES, 9100 + i as u64);
            (format!("app/{i}.bin"), data)
        })
        .collect();
    let expected = files
        .iter()
        .map(|(_, data)| hex::encode(Sha256::digest(data)))
        .collect();
    let base = images::busybox_layer().unwrap();
    let source = push_generated(&registry, work.path(), &[base, tar_of(files)], "matrix");
    let esgz = format!("{}/matrix:esgz", registry.host());
    lazysnap_ok(&["convert", "--chunk-size", "65536", &source, &esgz]);

    let proxy = FaultProxy::start(&registry.host()).unwrap();
    let hosts = tempfile::tempdir().unwrap();
    let hosts_dir = hosts_with_unresolvable_mirror(hosts.path(), &proxy.host());
    let config = format!(
        "[fetch]\nbackground_fill = false\nreadahead = false\nread_deadline_secs = \
         {READ_DEADLINE_SECS}\nrequest_timeout_secs = {REQUEST_TIMEOUT_SECS}\n\n[registry]\n\
         config_path = \"{}\"\n",
        hosts_dir.display()
    );
    let lazysnap = TestLazysnap::start_with_config(&config);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let image = format!("{}/matrix:esgz", proxy.host());
    let pulled = lazysnap_pull(&containerd, "faults", "lazysnap", &image);
    assert!(pulled.contains("lazy"), "{pulled}");
    let mut bed = Bed {
        containerd,
        lazysnap,
        proxy,
        image,
        expected,
        control: tempfile::tempdir().unwrap(),
        runs: 0,
    };

    // A first container reads the base layer's busybox, so the cases' faults land on /app.
    let warm = bed.run(&[0], |_| {});
    assert!(bed.check("warm-up", &[0], &warm) == 1, "{:?}", warm.stderr);

    let mut next = 1..FILES;
    let mut take = |n: usize| -> Vec<usize> { next.by_ref().take(n).collect() };
    let cases: Vec<(&str, Vec<Fault>)> = vec![
        ("reset mid-body", vec![Fault::ResetMidBody]),
        (
            "5xx burst",
            vec![Fault::Status(503), Fault::Status(500), Fault::Status(502)],
        ),
        (
            "429 with Retry-After",
            vec![Fault::TooManyRequests {
                retry_after_secs: 1,
            }],
        ),
        (
            "stall past the request timeout",
            vec![Fault::Stall(Duration::from_secs(REQUEST_TIMEOUT_SECS + 2))],
        ),
        ("truncated body", vec![Fault::TruncateBody]),
        ("flipped byte", vec![Fault::CorruptBody]),
        ("a different blob's bytes", vec![Fault::OtherContent]),
        ("wrong Content-Range", vec![Fault::WrongContentRange]),
        (
            "every fault at once",
            vec![
                Fault::ResetMidBody,
                Fault::CorruptBody,
                Fault::Status(503),
                Fault::OtherContent,
                Fault::TruncateBody,
            ],
        ),
    ];
    for (case, faults) in cases {
        let files = take(2);
        bed.transient_case(case, &files, faults);
    }

    // An expired redirect: blobs answer 307 to URLs that later answer 403.
    bed.proxy.redirect_blobs(true);
    let files = take(1);
    bed.transient_case("redirected blob", &files, vec![]);
    bed.proxy.expire_redirects();
    let files = take(1);
    bed.transient_case("expired redirect (403)", &files, vec![]);
    assert!(
        bed.proxy.redirects_refused() >= 1,
        "the expired redirect was never tried"
    );
    bed.proxy.redirect_blobs(false);

    // The registry down for 30 s, then back. A read while it is down fails within its deadline
    // (EIO, never a hang or a wrong byte); a read that begins before it is back and is still
    // within its deadline when it is back succeeds; after it, the failed files read right.
    let down_files = take(1);
    let back_at = Instant::now() + DOWN_FOR;
    let during = bed.run(&down_files, |proxy| proxy.go_down_for(DOWN_FOR));
    let right = bed.check("registry down", &down_files, &during);
    assert!(
        !during.ok && right == 0,
        "registry down: the read should have failed: {:?} {:?} after {:?}\n{}",
        during.stdout,
        during.stderr,
        during.elapsed,
        bed.lazysnap.log()
    );
    assert!(
        during.stderr.contains("Input/output error"),
        "registry down: expected an I/O error: {:?}",
        during.stderr
    );
    eprintln!(
        "registry down: reads failed with EIO after {:?}",
        during.elapsed
    );
    let straddle_files = take(1);
    let straddle = bed.run(&straddle_files, |_| {
        // Begin the read half a deadline before the registry is back.
        let begin = back_at - Duration::from_secs(READ_DEADLINE_SECS / 2);
        std::thread::sleep(begin.saturating_duration_since(Instant::now()));
    });
    let right = bed.check("registry back during a read", &straddle_files, &straddle);
    assert!(
        straddle.ok && right == straddle_files.len(),
        "a read that began while the registry was down and was within its deadline when it \
         came back failed: {:?}\n{}",
        straddle.stderr,
        bed.lazysnap.log()
    );
    eprintln!(
        "registry back during a read: right after {:?}",
        straddle.elapsed
    );
    std::thread::sleep(back_at.saturating_duration_since(Instant::now()));
    let after = bed.run(&down_files, |_| {});
    let right = bed.check("after the outage", &down_files, &after);
    assert!(
        after.ok && right == down_files.len(),
        "after the outage the files that failed must read right: {:?}",
        after.stderr
    );

    // Nothing unverified was cached: every file read so far reads right again, from lazysnap's
    // cache rather than the kernel's.
    let read: Vec<usize> = (0..FILES).collect();
    drop_page_cache();
    let all = bed.run(&read, |_| {});
    let right = bed.check("final read of every file", &read, &all);
    assert!(
        all.ok && right == FILES,
        "final read: {right} of {FILES} right: {:?}",
        all.stderr
    );

    // The unresolvable mirror was tried, skipped, and never failed a read.
    let log = bed.lazysnap.log();
    assert!(
        log.contains("mirror.invalid"),
        "the unresolvable mirror never appears in the log:\n{log}"
    );
}
