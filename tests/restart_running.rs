//! Running containers through restarts of the daemon: 10 containers run from a lazily pulled
//! image (real registry behind a 0.5 Mbit/s link, `lazysnap serve`, containerd, runc), each
//! looping over a file it read before; `serve` is then killed with SIGKILL while every container
//! is reading a file nobody had fetched (the reads are in flight), started again, stopped with
//! SIGTERM and started, and replaced by another copy of the binary. After each, every container
//! still runs, its loop saw no error, the reads in flight completed with the right bytes, and it
//! reads files it had read (cached) and files nobody had read (fetched by the new daemon).

mod fixtures_common;
mod pull_common;

use std::time::Duration;

use pull_common::*;

/// Nothing fetched but what containers read, so that unread files are fetched after a restart.
const ON_DEMAND_ONLY: &str =
    "[fetch]\nprefetch = false\nbackground_fill = false\nreadahead = false\n";
const CONTAINERS: usize = 10;
const NAMESPACE: &str = "restarts";
/// sha256 of the fixture's /data/big-9m.bin.
const BIG_FILE_SHA256: &str = "4796a41b7612494638025e4c6565450c444ba1cd7bd45217eb09817a8d86c1d1";

/// Name of container `i` (unique per run: runc's state outlives a test's containerd).
fn container(i: usize) -> String {
    format!("c{i}-{}", std::process::id())
}

/// What container `i` runs: reads its file again and again, noting every failure.
fn reader_loop(i: usize) -> String {
    format!(
        "while true; do cat /data/small/file-{i:03} > /dev/null 2>> /errors \
         || echo 'read failed' >> /errors; sleep 0.1; done"
    )
}

/// Runs `script` in container `name` (a new process in its running task) and returns stdout.
fn exec(
    containerd: &TestContainerd,
    lazysnap: &TestLazysnap,
    name: &str,
    id: &str,
    script: &str,
) -> String {
    let (ok, out, err) = containerd.ctr(
        NAMESPACE,
        &[
            "tasks",
            "exec",
            "--exec-id",
            id,
            name,
            "/bin/sh",
            "-c",
            script,
        ],
    );
    assert!(
        ok,
        "exec in {name}: {err}\nlazysnap log:\n{}",
        lazysnap.log()
    );
    out
}

/// Every container is running, saw no error, and reads a file it read before and one nobody
/// read (`fresh(i)`) with the right bytes.
fn check_containers(
    containerd: &TestContainerd,
    lazysnap: &TestLazysnap,
    round: &str,
    fresh: impl Fn(usize) -> usize,
) {
    // containerd redials its proxy plugin with backoff; the tasks do not depend on it.
    let (ok, tasks, err) = containerd.ctr(NAMESPACE, &["tasks", "ls"]);
    assert!(ok, "{err}");
    assert_eq!(
        tasks.lines().filter(|l| l.contains("RUNNING")).count(),
        CONTAINERS,
        "after {round}: {tasks}\nlazysnap log:\n{}",
        lazysnap.log()
    );
    std::thread::scope(|scope| {
        for i in 0..CONTAINERS {
            let fresh = fresh(i);
            scope.spawn(move || {
                let name = container(i);
                let out = exec(
                    containerd,
                    lazysnap,
                    &name,
                    &format!("{round}-{i}"),
                    &format!(
                        "cat /data/small/file-{i:03} /data/small/file-{fresh:03} /data/one-byte.txt; \
                         cat /errors 2>/dev/null; true"
                    ),
                );
                assert_eq!(
                    out,
                    format!("small file {i:03}\nsmall file {fresh:03}\nx"),
                    "container {name} after {round}\nlazysnap log:\n{}",
                    lazysnap.log()
                );
            });
        }
    });
}

#[test]
fn running_containers_keep_reading_through_kill_sigterm_and_a_new_binary() {
    require_root_and_containerd();
    let (registry, _) = registry_with_fixture("esgz", "fixture", "esgz");
    // A slow link (the data layer takes seconds), so that reads are in flight when `serve` dies.
    let link = lazysnap_testbed::LinkEmulator::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], registry.port())),
        lazysnap_testbed::LinkProfile::new(0.5, Duration::from_millis(20)),
    )
    .expect("link emulator");
    let image = format!("{}/fixture:esgz", link.addr());
    let mut lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    lazysnap_pull(&containerd, NAMESPACE, "lazysnap", &image);
    for i in 0..CONTAINERS {
        let name = container(i);
        let script = reader_loop(i);
        let (ok, _, err) = run_detached(&containerd, &image, &name, &script);
        assert!(
            ok,
            "starting {name}: {err}\nlazysnap log:\n{}",
            lazysnap.log()
        );
    }
    // Let every loop read its file (cached from now on) a few times.
    std::thread::sleep(Duration::from_secs(2));
    // The loops' error log is writable (an unwritable one would hide every failure).
    exec(
        &containerd,
        &lazysnap,
        &container(0),
        "probe",
        "touch /errors.probe && rm /errors.probe",
    );
    check_containers(&containerd, &lazysnap, "start", |i| 100 + i);

    // Reads in flight when the daemon dies: every container hashes the 9 MiB file nobody read
    // yet while `serve` is killed; the kernel hands what the dead daemon left unanswered to the
    // next one, and each hash comes out right.
    std::thread::scope(|scope| {
        let hashing: Vec<_> = (0..CONTAINERS)
            .map(|i| {
                let containerd = &containerd;
                scope.spawn(move || {
                    containerd.ctr(
                        NAMESPACE,
                        &[
                            "tasks",
                            "exec",
                            "--exec-id",
                            &format!("big-{i}"),
                            &container(i),
                            "/bin/sh",
                            "-c",
                            "sha256sum /data/big-9m.bin > /big.sum 2>&1",
                        ],
                    )
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        lazysnap.kill9_and_restart();
        for (i, hashed) in hashing.into_iter().enumerate() {
            let (ok, _, err) = hashed.join().expect("exec thread");
            assert!(
                ok,
                "hashing in container {i}: {err}\nlazysnap log:\n{}",
                lazysnap.log()
            );
        }
    });
    for i in 0..CONTAINERS {
        let name = container(i);
        let sum = exec(
            &containerd,
            &lazysnap,
            &name,
            &format!("sum-{i}"),
            "cat /big.sum",
        );
        assert_eq!(
            sum.split_whitespace().next(),
            Some(BIG_FILE_SHA256),
            "container {name}: the read in flight across kill -9\nlazysnap log:\n{}",
            lazysnap.log()
        );
    }
    check_containers(&containerd, &lazysnap, "kill-9", |i| 200 + i);

    lazysnap.terminate_and_restart();
    std::thread::sleep(Duration::from_secs(1));
    check_containers(&containerd, &lazysnap, "sigterm", |i| 250 + i);

    let upgrade = tempfile::tempdir().expect("temp dir");
    let new_binary = upgrade.path().join("lazysnap-new");
    std::fs::copy(env!("CARGO_BIN_EXE_lazysnap"), &new_binary).expect("copying the binary");
    lazysnap.restart_as(&new_binary);
    std::thread::sleep(Duration::from_secs(1));
    check_containers(&containerd, &lazysnap, "upgrade", |i| 280 + i);
    assert!(
        lazysnap.log().contains("resuming FUSE connections"),
        "{}",
        lazysnap.log()
    );

    for i in 0..CONTAINERS {
        let name = container(i);
        containerd.ctr(NAMESPACE, &["tasks", "kill", "-s", "SIGKILL", &name]);
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..CONTAINERS {
        let name = container(i);
        containerd.ctr(NAMESPACE, &["tasks", "delete", "-f", &name]);
        containerd.ctr(NAMESPACE, &["containers", "delete", &name]);
    }
}

/// FUSE mounts under `root` (the layers `serve` mounted there).
fn fuse_mounts_under(root: &std::path::Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(" - fuse") && l.contains(&root))
        .map(str::to_string)
        .collect()
}

#[test]
fn sigterm_leaves_layers_mounted_and_unmount_on_exit_removes_them() {
    require_root_and_containerd();
    let (_registry, image) = registry_with_fixture("esgz", "fixture", "esgz");
    let metrics_port = lazysnap_testbed::free_port().unwrap();
    let mut lazysnap = TestLazysnap::start_with_config(&format!(
        "metrics_address = \"127.0.0.1:{metrics_port}\"\n{ON_DEMAND_ONLY}"
    ));
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    lazysnap_pull(&containerd, "unmount-on-exit", "lazysnap", &image);
    let mounted = fuse_mounts_under(&lazysnap.root());
    assert_eq!(mounted.len(), 2, "{mounted:?}\n{}", lazysnap.log());

    // By default a stop leaves them for the next daemon, which takes them over.
    lazysnap.terminate_and_restart_with(&["--unmount-on-exit"]);
    assert_eq!(
        fuse_mounts_under(&lazysnap.root()),
        mounted,
        "{}",
        lazysnap.log()
    );
    // What an operator graphs: both layers resumed, none remounted.
    let metrics = std::process::Command::new("curl")
        .arg("-sSf")
        .arg(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    for series in [
        "lazysnap_layer_restores_total{how=\"resumed\"} 2",
        "lazysnap_layer_restores_total{how=\"remounted\"} 0",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }

    lazysnap.terminate();
    let left = fuse_mounts_under(&lazysnap.root());
    assert!(left.is_empty(), "{left:?}\n{}", lazysnap.log());
}

/// A kept connection that cannot be served again (the registry is gone when `serve` restarts,
/// so the layer's TOC cannot be read) is detached: its container's reads fail at once, as
/// without the holder, instead of waiting for ever.
#[test]
fn a_connection_that_cannot_be_resumed_fails_reads_instead_of_blocking_them() {
    require_root_and_containerd();
    let (registry, image) = registry_with_fixture("esgz", "fixture", "esgz");
    let mut lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    lazysnap_pull(&containerd, NAMESPACE, "lazysnap", &image);
    let name = format!("gone-{}", std::process::id());
    let (ok, _, err) = run_detached(&containerd, &image, &name, "while true; do sleep 1; done");
    assert!(ok, "{err}");
    drop(registry);
    lazysnap.kill9_and_restart();

    // A thread of its own, not joined: a blocked read must fail this test, not hang it.
    let mut read = containerd.server.ctr();
    read.args(["-n", NAMESPACE, "tasks", "exec", "--exec-id", "read", &name])
        .args(["/bin/sh", "-c", "cat /data/small/file-077"]);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(read.output());
    });
    let answer = finished
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "a read on a connection nothing serves blocked for a minute\nlazysnap log:\n{}",
                lazysnap.log()
            )
        });
    let output = answer.expect("run ctr");
    assert!(
        !output.status.success(),
        "the read cannot succeed without the layer: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    containerd.ctr(NAMESPACE, &["tasks", "kill", "-s", "SIGKILL", &name]);
    std::thread::sleep(Duration::from_millis(500));
    containerd.ctr(NAMESPACE, &["tasks", "delete", "-f", &name]);
    containerd.ctr(NAMESPACE, &["containers", "delete", &name]);
}

/// `ctr run -d` of `image` through lazysnap as container `name`, running `/bin/sh -c script`.
fn run_detached(
    containerd: &TestContainerd,
    image: &str,
    name: &str,
    script: &str,
) -> (bool, String, String) {
    containerd.ctr(
        NAMESPACE,
        &[
            "run",
            "-d",
            "--snapshotter",
            "lazysnap",
            image,
            name,
            "/bin/sh",
            "-c",
            script,
        ],
    )
}
