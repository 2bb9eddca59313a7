//! Running containers through restarts of the daemon: 10 containers run from a lazily pulled
//! image (real registry, `lazysnap serve`, containerd, runc), each looping over a file it read
//! before; `serve` is then killed with SIGKILL and started, stopped with SIGTERM and started, and
//! replaced by another copy of the binary. After each, every container still runs, its loop saw
//! no error, and it reads files it had read (cached) and files nobody had read (fetched by the
//! new daemon) with the right bytes.

mod fixtures_common;
mod pull_common;

use std::time::Duration;

use pull_common::*;

/// Nothing fetched but what containers read, so that unread files are fetched after a restart.
const ON_DEMAND_ONLY: &str =
    "[fetch]\nprefetch = false\nbackground_fill = false\nreadahead = false\n";
const CONTAINERS: usize = 10;
const NAMESPACE: &str = "restarts";

/// Name of container `i` (unique per run: runc's state outlives a test's containerd).
fn container(i: usize) -> String {
    format!("c{i}-{}", std::process::id())
}

/// What container `i` runs: reads its file again and again, noting every failure.
fn reader_loop(i: usize) -> String {
    format!(
        "while true; do cat /data/small/file-{i:03} > /dev/null 2>> /tmp/errors \
         || echo 'read failed' >> /tmp/errors; sleep 0.1; done"
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
                         cat /tmp/errors 2>/dev/null; true"
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
    let (_registry, image) = registry_with_fixture("esgz", "fixture", "esgz");
    let mut lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    lazysnap_pull(&containerd, NAMESPACE, "lazysnap", &image);
    for i in 0..CONTAINERS {
        let name = container(i);
        let script = reader_loop(i);
        let (ok, _, err) = containerd.ctr(
            NAMESPACE,
            &[
                "run",
                "-d",
                "--snapshotter",
                "lazysnap",
                &image,
                &name,
                "/bin/sh",
                "-c",
                &script,
            ],
        );
        assert!(
            ok,
            "starting {name}: {err}\nlazysnap log:\n{}",
            lazysnap.log()
        );
    }
    // Let every loop read its file (cached from now on) a few times.
    std::thread::sleep(Duration::from_secs(2));
    check_containers(&containerd, &lazysnap, "start", |i| 100 + i);

    lazysnap.kill9_and_restart();
    std::thread::sleep(Duration::from_secs(1));
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
    let mut lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
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

    lazysnap.terminate();
    let left = fuse_mounts_under(&lazysnap.root());
    assert!(left.is_empty(), "{left:?}\n{}", lazysnap.log());
}
