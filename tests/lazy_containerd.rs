//! Lazy pulling end to end: registry + `lazysnap serve` (started first) + containerd + runc on
//! loopback. eStargz / zstd:chunked images made by ctr-remote (the fixtures) are pulled with
//! `lazysnap pull` and with `ctr-remote images rpull`, run with `ctr run`, and the registry's
//! access log shows that only the chunks the container read were fetched. Also: kill -9 and
//! restart of lazysnap, and 20 containers started at once from one image.

mod fixtures_common;
mod pull_common;

use std::process::Command;

use lazysnap_testbed::RegistryServer;
use pull_common::*;

/// No prefetch or background fill: every byte fetched is one a container asked for.
const ON_DEMAND_ONLY: &str =
    "[fetch]\nprefetch = false\nbackground_fill = false\nreadahead = false\n";

fn assert_pulled_lazily(stdout: &str, lazysnap: &TestLazysnap) {
    let layer_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("sha256:"))
        .collect();
    assert_eq!(layer_lines.len(), 2, "{stdout}");
    assert!(
        layer_lines.iter().all(|l| l.contains("lazy")),
        "every layer should be mounted lazily:\n{stdout}\nlazysnap log:\n{}",
        lazysnap.log()
    );
}

#[test]
fn esgz_fixture_runs_lazily_and_fetches_only_what_it_reads() {
    require_root_and_containerd();
    let (registry, image) = registry_with_fixture("esgz", "fixture", "esgz");
    let lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let namespace = "lazy";

    let stdout = lazysnap_pull(&containerd, namespace, "lazysnap", &image);
    assert_pulled_lazily(&stdout, &lazysnap);
    let out = containerd.run(
        namespace,
        "lazysnap",
        &image,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(out, "x", "lazysnap log:\n{}", lazysnap.log());

    // Layer A (the data layer, 168 KB compressed of 14 MB) gave only its TOC and the chunk of
    // one-byte.txt; layer B (busybox) was read for the exec.
    let (data_layer, data_size) = layer_digests("esgz")[1].clone();
    let served = registry.blob_bytes_served(&data_layer);
    assert!(served > 0, "the TOC at least was read from the registry");
    assert!(
        served < data_size / 2,
        "reading one byte fetched {served} of {data_size} bytes of the data layer"
    );

    // The big file reads back intact through the lazy layer (chunks verified on the way).
    let out = containerd.run(
        namespace,
        "lazysnap",
        &image,
        &["/bin/sh", "-c", "cat /data/big-9m.bin | wc -c"],
    );
    assert_eq!(out.trim(), "9437184");
}

#[test]
fn a_containers_listing_shows_no_whiteout_of_a_lazy_layer() {
    require_root_and_containerd();
    let (_registry, image) = registry_with_fixture("esgz", "fixture", "esgz");
    let lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let stdout = lazysnap_pull(&containerd, "wh", "lazysnap", &image);
    assert_pulled_lazily(&stdout, &lazysnap);
    // The data layer whites out data/wh-dir/deleted-file, which no layer below has: `ls -la`
    // used to list the name and then fail to stat it.
    let out = containerd.run(
        "wh",
        "lazysnap",
        &image,
        &[
            "/bin/sh",
            "-c",
            "ls -a /data/wh-dir && ls -la /data/wh-dir >/dev/null && echo ok",
        ],
    );
    assert_eq!(
        out,
        ".\n..\nkept.txt\nok\n",
        "lazysnap log:\n{}",
        lazysnap.log()
    );
}

#[test]
fn zstdchunked_fixture_runs_through_lazysnap_pull() {
    require_root_and_containerd();
    let (_registry, image) = registry_with_fixture("zstdchunked", "fixture", "zstd");
    let lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let stdout = lazysnap_pull(&containerd, "zstd", "lazysnap", &image);
    assert_pulled_lazily(&stdout, &lazysnap);
    let out = containerd.run(
        "zstd",
        "lazysnap",
        &image,
        &["/bin/sh", "-c", "head -c 6 /data/text.txt"],
    );
    assert_eq!(out, "00000 ");
}

#[test]
fn ctr_remote_rpull_uses_the_stargz_labels() {
    require_root_and_containerd();
    let (registry, image) = registry_with_fixture("esgz-prio", "fixture", "prio");
    let lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let output = Command::new("/usr/bin/ctr-remote")
        .arg("-a")
        .arg(containerd.socket())
        .args([
            "-n",
            "rpull",
            "images",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "lazysnap",
        ])
        .arg(&image)
        .output()
        .expect("run ctr-remote (Debian package stargz-snapshotter)");
    assert!(
        output.status.success(),
        "ctr-remote rpull failed: {}\nlazysnap log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        lazysnap.log()
    );
    let out = containerd.run(
        "rpull",
        "lazysnap",
        &image,
        &["cat", "/data/small/file-007"],
    );
    assert_eq!(out, "small file 007\n");
    let (data_layer, data_size) = layer_digests("esgz-prio")[1].clone();
    let served = registry.blob_bytes_served(&data_layer);
    assert!(
        served < data_size,
        "rpull fetched the whole data layer ({served} bytes): it was not mounted lazily\n{}",
        lazysnap.log()
    );
}

#[test]
fn containers_start_after_lazysnap_is_killed_and_restarted() {
    require_root_and_containerd();
    let (_registry, image) = registry_with_fixture("esgz", "fixture", "esgz");
    let mut lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let stdout = lazysnap_pull(&containerd, "restart", "lazysnap", &image);
    assert_pulled_lazily(&stdout, &lazysnap);
    let before = containerd.run(
        "restart",
        "lazysnap",
        &image,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(before, "x");

    lazysnap.kill9_and_restart();
    // containerd redials its proxy plugin with gRPC backoff: allow it a few seconds.
    let mut attempt = 0;
    let listing = loop {
        let (ok, listing, err) =
            containerd.ctr("restart", &["snapshots", "--snapshotter", "lazysnap", "ls"]);
        if ok {
            break listing;
        }
        attempt += 1;
        assert!(attempt < 60, "{err}\n{}", lazysnap.log());
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(
        listing.lines().filter(|l| l.contains("Committed")).count() >= 2,
        "{listing}"
    );
    let after = containerd.run(
        "restart",
        "lazysnap",
        &image,
        &[
            "/bin/sh",
            "-c",
            "cat /data/zz-last.txt /data/one-byte.txt | tail -c 1",
        ],
    );
    assert_eq!(after, "x", "lazysnap log:\n{}", lazysnap.log());
}

#[test]
fn twenty_concurrent_containers_share_each_chunk_fetch() {
    require_root_and_containerd();
    let (registry, image) = registry_with_fixture("esgz", "fixture", "esgz");
    let lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let stdout = lazysnap_pull(&containerd, "many", "lazysnap", &image);
    assert_pulled_lazily(&stdout, &lazysnap);

    let outputs: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let containerd = &containerd;
                let image = &image;
                scope.spawn(move || {
                    let (ok, out, err) = containerd.ctr(
                        "many",
                        &[
                            "run",
                            "--rm",
                            "--snapshotter",
                            "lazysnap",
                            image,
                            &format!("c{i}"),
                            "/bin/sh",
                            "-c",
                            "sha256sum /data/text.txt | cut -c1-16",
                        ],
                    );
                    assert!(ok, "container {i}: {err}");
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in &outputs {
        assert_eq!(out.trim(), "beffedb77a2bf962");
    }
    for (digest, size) in layer_digests("esgz") {
        let served = registry.blob_bytes_served(&digest);
        assert!(
            served <= size + size / 10 + 64 * 1024,
            "layer {digest}: {served} bytes served for a {size}-byte blob: chunks fetched more than once"
        );
    }
}

#[test]
fn a_second_image_with_the_same_files_fetches_none_of_their_chunks() {
    require_root_and_containerd();
    let registry = RegistryServer::start().expect("start registry");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Same files, same 4 MiB chunking, different layer blobs (different order and landmark).
    let first = runtime.block_on(push_fixture(&registry.host(), "esgz", "fixture", "esgz"));
    let second = runtime.block_on(push_fixture(
        &registry.host(),
        "esgz-prio",
        "fixture",
        "prio",
    ));
    let lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    assert_pulled_lazily(
        &lazysnap_pull(&containerd, "dedup", "lazysnap", &first),
        &lazysnap,
    );
    assert_pulled_lazily(
        &lazysnap_pull(&containerd, "dedup", "lazysnap", &second),
        &lazysnap,
    );
    let read_big = ["/bin/sh", "-c", "cat /data/big-9m.bin | wc -c"];
    assert_eq!(
        containerd
            .run("dedup", "lazysnap", &first, &read_big)
            .trim(),
        "9437184"
    );
    let first_layers = layer_digests("esgz");
    let first_cost: u64 = first_layers
        .iter()
        .map(|(d, _)| registry.blob_bytes_served(d))
        .sum();
    assert_eq!(
        containerd
            .run("dedup", "lazysnap", &second, &read_big)
            .trim(),
        "9437184"
    );
    for (digest, size) in layer_digests("esgz-prio") {
        let served = registry.blob_bytes_served(&digest);
        // Only the footer and TOC, read at mount in one request of the blob's tail: every chunk
        // came from the shared cache.
        assert!(
            served < 24 * 1024 + lazysnap::estargz::DEFAULT_TAIL_GUESS,
            "layer {digest} of the second image fetched {served} of {size} bytes (the first image cost {first_cost})"
        );
    }
}
