//! `lazysnap convert` registry → registry, run as a user runs it, against the real Distribution
//! registry: every tar entry type survives (GNU tar extracts the same tree), `inspect --verify`
//! accepts the result, `--reuse` is a no-op on a converted image, and a missing image is named.

mod cli_common;
use cli_common::*;

use std::path::Path;
use std::process::Command;

use lazysnap::image::{self, ImageConfig, Manifest, OciLayout};
use lazysnap_testbed::images::{
    busybox_layer, every_entry_type_layer, extract_with_gnu_tar, fetch_blob, fetch_manifest,
    push_layout_image, tree_listing, tree_listing_without_estargz_entries, write_image,
    ImageOptions, LayerCompression,
};
use lazysnap_testbed::RegistryServer;

/// Pushes a busybox + every-entry-type image to `src_repo:v1`; returns the source layer tars.
fn push_source_image(registry: &RegistryServer, dir: &Path, src_repo: &str) -> Vec<Vec<u8>> {
    let layout = OciLayout::create(&dir.join("src-oci")).unwrap();
    let layers = vec![busybox_layer().unwrap(), every_entry_type_layer().unwrap()];
    write_image(
        &layout,
        &layers,
        &ImageOptions {
            compression: LayerCompression::Gzip,
            docker_media_types: true,
            ..Default::default()
        },
        Some("v1"),
    )
    .unwrap();
    push_layout_image(&layout, Some("v1"), &registry.host(), src_repo, "v1").unwrap();
    layers
}

/// Checks the converted image at `repo:tag` layer by layer against the source tars: media type,
/// annotations, config diff_ids, and the tree GNU tar extracts. Returns the manifest.
fn check_converted(
    registry: &RegistryServer,
    dir: &Path,
    repo: &str,
    tag: &str,
    source_layers: &[Vec<u8>],
    layer_media_type: &str,
) -> Manifest {
    let manifest_bytes = fetch_manifest(&registry.url(), repo, tag).unwrap();
    let manifest: Manifest = image::parse_json("manifest", &manifest_bytes).unwrap();
    assert_eq!(manifest.media_type.as_deref(), Some(image::OCI_MANIFEST));
    assert_eq!(manifest.config.media_type, image::OCI_CONFIG);
    let config_path = dir.join(format!("{tag}-config.json"));
    fetch_blob(&registry.url(), repo, &manifest.config.digest, &config_path).unwrap();
    let config: ImageConfig =
        image::parse_json("config", &std::fs::read(&config_path).unwrap()).unwrap();
    assert_eq!(config.rootfs.diff_ids.len(), source_layers.len());
    assert_eq!(
        config.extra["config"]["Cmd"][0], "/bin/sh",
        "the rest of the config is kept"
    );
    for (i, (layer, source_tar)) in manifest.layers.iter().zip(source_layers).enumerate() {
        assert_eq!(layer.media_type, layer_media_type);
        let toc_digest = &layer.annotations["containerd.io/snapshot/stargz/toc.digest"];
        assert!(toc_digest.starts_with("sha256:"), "{layer:?}");
        let uncompressed: u64 = layer.annotations["io.containers.estargz.uncompressed-size"]
            .parse()
            .unwrap();
        let blob = dir.join(format!("{tag}-layer{i}"));
        fetch_blob(&registry.url(), repo, &layer.digest, &blob).unwrap();

        // The diff_id is the digest of the decompressed blob.
        let decompressed = dir.join(format!("{tag}-layer{i}.tar"));
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "(gzip -dc {b} 2>/dev/null || zstd -dcq {b}) > {d}",
                b = blob.display(),
                d = decompressed.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        let tar_bytes = std::fs::read(&decompressed).unwrap();
        assert_eq!(
            tar_bytes.len() as u64,
            uncompressed,
            "uncompressed-size annotation"
        );
        assert_eq!(
            config.rootfs.diff_ids[i],
            lazysnap::digest::sha256_digest(&tar_bytes)
        );

        // GNU tar extracts the source tree exactly.
        let source_file = dir.join(format!("{tag}-source{i}.tar"));
        std::fs::write(&source_file, source_tar).unwrap();
        let want_dir = dir.join(format!("{tag}-want{i}"));
        let got_dir = dir.join(format!("{tag}-got{i}"));
        extract_with_gnu_tar(&source_file, &want_dir).unwrap();
        extract_with_gnu_tar(&blob, &got_dir).unwrap();
        let want = tree_listing(&want_dir).unwrap();
        let got = tree_listing_without_estargz_entries(&got_dir).unwrap();
        assert!(want.len() > 5);
        if want != got {
            let only_want: Vec<_> = want.iter().filter(|l| !got.contains(l)).collect();
            let only_got: Vec<_> = got.iter().filter(|l| !want.contains(l)).collect();
            panic!(
                "layer {i} differs:\nsource only: {only_want:#?}\nconverted only: {only_got:#?}"
            );
        }
    }
    manifest
}

#[test]
fn converts_every_entry_type_image_to_estargz_with_a_prefetch_list() {
    let registry = RegistryServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = push_source_image(&registry, dir.path(), "src/every");
    let prefetch = dir.path().join("prefetch.txt");
    std::fs::write(
        &prefetch,
        "# files read at startup\nbin/busybox\ndata/small.txt\nmany/f00*\n",
    )
    .unwrap();
    let host = registry.host();
    let out = lazysnap(&[
        "convert",
        "--chunk-size",
        "262144",
        "--prefetch-list",
        prefetch.to_str().unwrap(),
        &format!("{host}/src/every:v1"),
        &format!("{host}/dst/every:esgz"),
    ]);
    assert_ok(&out);
    let manifest = check_converted(
        &registry,
        dir.path(),
        "dst/every",
        "esgz",
        &source,
        image::OCI_LAYER_GZIP,
    );

    let inspect = lazysnap(&["inspect", "--verify", &format!("{host}/dst/every:esgz")]);
    assert_ok(&inspect);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("landmark:          prefetch"), "{text}");
    assert!(text.contains("verified"), "{text}");
    // The busybox layer's prioritized part holds at least busybox itself.
    let prioritized: Vec<u64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("prioritized bytes:"))
        .map(|v| v.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(prioritized.len(), 2, "{text}");
    assert!(prioritized[0] > 100_000, "{text}");

    // --reuse on the converted image keeps every layer and yields the same manifest.
    let again = lazysnap(&[
        "convert",
        "--reuse",
        &format!("{host}/dst/every:esgz"),
        &format!("{host}/dst/every:again"),
    ]);
    assert_ok(&again);
    let again_text = String::from_utf8_lossy(&again.stdout);
    assert_eq!(again_text.matches(" reused,").count(), 2, "{again_text}");
    assert!(!again_text.contains(", pushed"), "{again_text}");
    let first = fetch_manifest(&registry.url(), "dst/every", "esgz").unwrap();
    let second = fetch_manifest(&registry.url(), "dst/every", "again").unwrap();
    assert_eq!(
        lazysnap::digest::sha256_digest(&first),
        lazysnap::digest::sha256_digest(&second),
        "--reuse changed the image"
    );
    assert_eq!(manifest.layers.len(), 2);

    // Into another repository of the same registry, kept layers are mounted, not uploaded.
    let mounted = lazysnap(&[
        "convert",
        "--reuse",
        &format!("{host}/dst/every:esgz"),
        &format!("{host}/other/every:mounted"),
    ]);
    assert_ok(&mounted);
    let mounted_text = String::from_utf8_lossy(&mounted.stdout);
    assert_eq!(
        mounted_text.matches(" reused,").count(),
        2,
        "{mounted_text}"
    );
    assert!(!mounted_text.contains(", pushed"), "{mounted_text}");
    let third = fetch_manifest(&registry.url(), "other/every", "mounted").unwrap();
    assert_eq!(
        lazysnap::digest::sha256_digest(&first),
        lazysnap::digest::sha256_digest(&third)
    );
}

#[test]
fn converts_every_entry_type_image_to_zstd_chunked() {
    let registry = RegistryServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = push_source_image(&registry, dir.path(), "src/every");
    let prefetch = dir.path().join("prefetch.txt");
    std::fs::write(&prefetch, "data/*.txt\n").unwrap();
    let host = registry.host();
    let out = lazysnap(&[
        "convert",
        "--zstdchunked",
        "--chunk-size",
        "1048576",
        "--level",
        "5",
        "--prefetch-list",
        prefetch.to_str().unwrap(),
        &format!("{host}/src/every:v1"),
        &format!("{host}/dst/every:zstd"),
    ]);
    assert_ok(&out);
    let manifest = check_converted(
        &registry,
        dir.path(),
        "dst/every",
        "zstd",
        &source,
        image::OCI_LAYER_ZSTD,
    );
    for layer in &manifest.layers {
        assert!(
            layer
                .annotations
                .contains_key("io.containers.zstd-chunked.manifest-checksum"),
            "{layer:?}"
        );
        assert!(
            layer
                .annotations
                .contains_key("io.containers.zstd-chunked.manifest-position"),
            "{layer:?}"
        );
    }
    let inspect = lazysnap(&["inspect", "--verify", &format!("{host}/dst/every:zstd")]);
    assert_ok(&inspect);
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("zstd:chunked"));
}

#[test]
fn converting_a_missing_image_names_it() {
    let registry = RegistryServer::start().unwrap();
    let host = registry.host();
    let out = lazysnap(&[
        "convert",
        &format!("{host}/no/such-image:v9"),
        &format!("{host}/dst/x:esgz"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no/such-image"), "{stderr}");
}
