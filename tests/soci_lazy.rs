//! Plain gzip images indexed by Debian's `soci` 0.4.1 run lazily under lazysnap, through the real
//! registry (which lacks the referrers API: the index is found by its tag fallback), containerd
//! and `lazysnap serve`: the same output as overlayfs, a fraction of the layer fetched, and a
//! corrupted span read as EIO, never as wrong bytes.

mod cli_common;
mod fixtures_common;
mod pull_common;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use lazysnap::digest::{sha256_digest, Digest};
use lazysnap::registry::{Client, ClientConfig, Reference};
use lazysnap_testbed::RegistryServer;
use pull_common::*;

/// Where `scripts/get-soci.sh` extracts Debian's soci-snapshotter package.
const SOCI_CLI: &str = "/var/cache/lazysnap-bench/soci/root/usr/bin/soci";
const HELLO: &str = "hello from a plain gzip layer\n";
const TAIL: &str = "the last file of the layer\n";
/// Large enough to span several of soci's 4 MiB spans.
const BIG_LEN: usize = 16 << 20;

fn soci_cli() -> PathBuf {
    let cli = PathBuf::from(SOCI_CLI);
    assert!(
        cli.is_file(),
        "{SOCI_CLI} is missing: run scripts/get-soci.sh (it extracts Debian's soci 0.4.1)"
    );
    cli
}

/// One gzip layer (a single member, as `gzip` writes): busybox, a small file, a large random
/// one, a file after it, a symlink and a hard link.
fn gzip_layer() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, data).unwrap();
    };
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    add("bin/busybox", 0o755, &busybox);
    add("data/hello", 0o644, HELLO.as_bytes());
    add(
        "data/big",
        0o644,
        &lazysnap::rig::images::pseudo_random_bytes(BIG_LEN, 7),
    );
    add("data/tail", 0o644, TAIL.as_bytes());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    builder
        .append_link(&mut link, "data/link", "hello")
        .unwrap();
    let mut hard = tar::Header::new_gnu();
    hard.set_entry_type(tar::EntryType::Link);
    hard.set_size(0);
    hard.set_mode(0o644);
    builder
        .append_link(&mut hard, "data/hard", "data/hello")
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gzip.write_all(&tar).unwrap();
    gzip.finish().unwrap()
}

/// Pushes the gzip image as `HOST/plain:gzip`; returns its reference and its layer's digest.
fn push_gzip_image(registry: &RegistryServer) -> (String, Digest, Vec<u8>) {
    let layer = gzip_layer();
    let layer_digest = sha256_digest(&layer);
    let mut tar = Vec::new();
    std::io::copy(&mut flate2::read::GzDecoder::new(&layer[..]), &mut tar).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "cat", "/data/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&tar).to_string()]},
    }))
    .unwrap();
    let config_digest = sha256_digest(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest.to_string(), "size": layer.len()}],
    }))
    .unwrap();
    let image = format!("{}/plain:gzip", registry.host());
    let reference = Reference::parse(&image).unwrap();
    let client = Client::new(ClientConfig::default()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for (digest, bytes) in [(&config_digest, config), (&layer_digest, layer.clone())] {
            client
                .push_blob_bytes(&reference, digest, bytes.into())
                .await
                .unwrap();
        }
        client
            .put_manifest(
                &reference,
                "application/vnd.oci.image.manifest.v1+json",
                manifest.into(),
            )
            .await
            .unwrap();
    });
    (image, layer_digest, layer)
}

/// `soci create` and `soci push` of `image`, through a scratch containerd, with soci's state in
/// `work` (bind-mounted over its fixed directory while this runs).
fn soci_index(image: &str, work: &Path) {
    // soci's state directory is one per node: one test at a time.
    static SOCI_STATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SOCI_STATE.lock().unwrap_or_else(|e| e.into_inner());
    let cli = soci_cli();
    let _state = lazysnap::bench::StateMount::over(&work.join("soci-state")).expect("soci state");
    let containerd = TestContainerd::start(None);
    let (ok, _, err) = containerd.ctr("default", &["images", "pull", "--plain-http", image]);
    assert!(ok, "ctr images pull {image}: {err}");
    let create = vec!["create", "--min-layer-size", "1048576", image];
    for args in [create, vec!["push", "--plain-http", image]] {
        let output = std::process::Command::new(&cli)
            .arg("--address")
            .arg(containerd.socket())
            .args(["--namespace", "default"])
            .args(&args)
            .output()
            .expect("run soci");
        assert!(
            output.status.success(),
            "soci {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A registry serving the gzip image with its SOCI index, and what the tests check against.
struct Indexed {
    work: tempfile::TempDir,
    registry: RegistryServer,
    image: String,
    layer_digest: Digest,
    layer: Vec<u8>,
    /// The image's manifest digest before it was indexed.
    manifest_before: Digest,
}

/// Pushes the gzip image and indexes it with `soci create` and `soci push`.
fn indexed_image() -> Indexed {
    let work = tempfile::Builder::new()
        .prefix("ls-soci-")
        .tempdir_in("/tmp")
        .unwrap();
    let registry = RegistryServer::start().expect("start registry");
    let (image, layer_digest, layer) = push_gzip_image(&registry);
    let manifest_before = registry_manifest_digest(&image);
    soci_index(&image, work.path());
    Indexed {
        work,
        registry,
        image,
        layer_digest,
        layer,
        manifest_before,
    }
}

/// The registry blob file holding `digest` (Distribution's filesystem layout).
fn stored_blob(registry: &RegistryServer, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    registry
        .storage_root()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

const CONFIG: &str = "[fetch]\nbackground_fill = false\nread_deadline_secs = 10\n";

#[test]
fn an_image_indexed_by_soci_runs_lazily_with_the_output_of_overlayfs() {
    require_root_and_containerd();
    let Indexed {
        registry,
        image,
        layer_digest,
        layer,
        manifest_before,
        ..
    } = indexed_image();
    assert_eq!(
        registry_manifest_digest(&image),
        manifest_before,
        "the index must leave the image's manifest as it was"
    );

    let whole_gets = || {
        registry
            .blob_gets(layer_digest.as_str())
            .iter()
            .filter(|(status, _)| *status == 200)
            .count()
    };
    // The scratch containerd's pull for `soci create`.
    assert_eq!(whole_gets(), 1);

    let lazysnap = TestLazysnap::start_with_config(CONFIG);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let pulled = lazysnap_pull(&containerd, "soci", "lazysnap", &image);
    assert!(
        pulled
            .lines()
            .any(|l| l.starts_with(layer_digest.as_str()) && l.contains("lazy")),
        "the gzip layer should be mounted lazily:\n{pulled}\n{}",
        lazysnap.log()
    );
    let run_lazy = |cmd: &[&str]| containerd.run("soci", "lazysnap", &image, cmd);
    let script = "cat /data/hello /data/link /data/hard /data/tail";
    let lazy = run_lazy(&["/bin/busybox", "sh", "-c", script]);
    assert_eq!(
        lazy,
        format!("{HELLO}{HELLO}{HELLO}{TAIL}"),
        "{}",
        lazysnap.log()
    );
    assert_eq!(
        whole_gets(),
        1,
        "lazysnap pull must not fetch the indexed layer whole"
    );
    // lazysnap reads by range; the whole-blob GET is the scratch containerd's, for soci.
    let fetched: u64 = registry
        .blob_gets(layer_digest.as_str())
        .iter()
        .filter(|(status, _)| *status == 206)
        .map(|(_, bytes)| bytes)
        .sum();
    assert!(
        fetched > 0 && fetched < layer.len() as u64 * 3 / 4,
        "lazysnap fetched {fetched} bytes of the {}-byte layer to run it:\n{}",
        layer.len(),
        lazysnap.log()
    );

    // The large file, read whole, hashes as it should; so does everything under overlayfs.
    let big = lazysnap::rig::images::pseudo_random_bytes(BIG_LEN, 7);
    let expected = format!("{}  /data/big\n", sha256_digest(&big).hex());
    let hashed = run_lazy(&["/bin/busybox", "sha256sum", "/data/big"]);
    assert_eq!(hashed, expected, "{}", lazysnap.log());
    let plain = TestContainerd::start(None);
    let (ok, _, err) = plain.ctr("plain", &["images", "pull", "--plain-http", &image]);
    assert!(ok, "{err}");
    let run_plain = |cmd: &[&str]| plain.run("plain", "overlayfs", &image, cmd);
    assert_eq!(run_plain(&["/bin/busybox", "sh", "-c", script]), lazy);
    let overlay_big = run_plain(&["/bin/busybox", "sha256sum", "/data/big"]);
    assert_eq!(overlay_big, hashed);
}

#[test]
fn a_corrupted_span_is_an_io_error_never_wrong_bytes() {
    require_root_and_containerd();
    let Indexed {
        registry,
        image,
        layer_digest,
        layer,
        ..
    } = indexed_image();
    // One byte in the middle of the large random file's compressed bytes.
    let blob = stored_blob(&registry, &layer_digest);
    let mut stored = std::fs::read(&blob).unwrap();
    assert_eq!(stored, layer);
    let middle = stored.len() / 2;
    stored[middle] ^= 0x40;
    std::fs::write(&blob, &stored).unwrap();

    let lazysnap = TestLazysnap::start_with_config(CONFIG);
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    lazysnap_pull(&containerd, "soci", "lazysnap", &image);
    let run_lazy = |cmd: &[&str]| containerd.run("soci", "lazysnap", &image, cmd);
    let hello = run_lazy(&["/bin/busybox", "cat", "/data/hello"]);
    assert_eq!(hello, HELLO, "a file in an intact span reads");
    let script = "/bin/busybox sha256sum /data/big; echo rc=$?";
    let out = run_lazy(&["/bin/busybox", "sh", "-c", script]);
    assert!(
        out.contains("rc=1") && !out.lines().any(|l| l.ends_with("  /data/big")),
        "reading the corrupted span must fail, not return bytes: {out}\n{}",
        lazysnap.log()
    );
    assert!(
        lazysnap.log().contains("digest mismatch"),
        "the log names the failed verification:\n{}",
        lazysnap.log()
    );
}

/// The digest of `image`'s manifest as its registry serves it.
fn registry_manifest_digest(image: &str) -> Digest {
    let reference = Reference::parse(image).unwrap();
    let client = Client::new(ClientConfig::default()).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(client.get_manifest(&reference))
        .unwrap()
        .digest
}

#[test]
fn lazysnap_mount_reads_an_indexed_layer_lazily_too() {
    require_root_and_containerd();
    let Indexed {
        work,
        registry,
        image,
        layer_digest,
        layer,
        ..
    } = indexed_image();
    let mounted = cli_common::MountedImage::new(&image, work.path(), "soci", &[]);
    assert_eq!(
        std::fs::read_to_string(mounted.dir.join("data/hello")).unwrap(),
        HELLO
    );
    assert_eq!(
        std::fs::read_to_string(mounted.dir.join("data/hard")).unwrap(),
        HELLO
    );
    assert_eq!(
        std::fs::read_to_string(mounted.dir.join("data/tail")).unwrap(),
        TAIL
    );
    let gets = registry.blob_gets(layer_digest.as_str());
    let whole = gets.iter().filter(|(status, _)| *status == 200).count();
    let ranged: u64 = gets
        .iter()
        .filter(|(status, _)| *status == 206)
        .map(|(_, b)| b)
        .sum();
    assert_eq!(
        whole, 1,
        "only the scratch containerd's pull for soci fetched it whole"
    );
    assert!(
        ranged > 0 && ranged < layer.len() as u64 * 3 / 4,
        "{ranged} of {} bytes",
        layer.len()
    );
}
