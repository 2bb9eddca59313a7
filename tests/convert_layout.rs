//! `lazysnap convert` with OCI image layouts (`oci:DIR[:TAG]`) as source and destination, and
//! multi-platform indexes (`--platform`, `--all-platforms`), run as a user runs it.

mod cli_common;
use cli_common::*;

use lazysnap::image::{self, Index, Manifest, OciLayout, Platform};
use lazysnap_testbed::images::{
    busybox_layer, every_entry_type_layer, fetch_manifest, push_layout_image, write_image,
    write_index, ImageOptions, LayerCompression,
};
use lazysnap_testbed::RegistryServer;

/// A layout tagged `multi` with an index over linux/amd64 (OCI, gzip) and linux/arm64 (Docker
/// media types, uncompressed) images, each with a marker file naming its platform.
fn multi_platform_layout(dir: &std::path::Path) -> (OciLayout, Vec<lazysnap::digest::Digest>) {
    let layout = OciLayout::create(dir).unwrap();
    let mut images = Vec::new();
    for (platform, docker, compression) in [
        ("linux/amd64", false, LayerCompression::Gzip),
        ("linux/arm64", true, LayerCompression::None),
    ] {
        let mut marker = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(platform.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        marker
            .append_data(&mut header, "platform.txt", platform.as_bytes())
            .unwrap();
        let layers = vec![
            every_entry_type_layer().unwrap(),
            marker.into_inner().unwrap(),
        ];
        images.push(
            write_image(
                &layout,
                &layers,
                &ImageOptions {
                    platform: Platform::parse(platform).unwrap(),
                    compression,
                    docker_media_types: docker,
                    ..Default::default()
                },
                None,
            )
            .unwrap(),
        );
    }
    write_index(&layout, &images, false, Some("multi")).unwrap();
    let digests = images.iter().map(|i| i.manifest.digest.clone()).collect();
    (layout, digests)
}

#[test]
fn converts_layout_to_layout_and_inspects_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = OciLayout::create(&dir.path().join("src")).unwrap();
    write_image(
        &src,
        &[busybox_layer().unwrap(), every_entry_type_layer().unwrap()],
        &ImageOptions {
            compression: LayerCompression::Zstd,
            ..Default::default()
        },
        Some("v1"),
    )
    .unwrap();
    let src_arg = format!("oci:{}:v1", dir.path().join("src").display());
    let dst_dir = dir.path().join("dst");
    let dst_arg = format!("oci:{}:esgz", dst_dir.display());
    assert_ok(&lazysnap(&[
        "convert",
        "--chunk-size",
        "524288",
        &src_arg,
        &dst_arg,
    ]));

    let dst = OciLayout::open(&dst_dir).unwrap();
    let top = dst.resolve(Some("esgz")).unwrap();
    assert_eq!(top.media_type, image::OCI_MANIFEST);
    let manifest: Manifest = image::parse_json("m", &dst.read_blob(&top.digest).unwrap()).unwrap();
    assert_eq!(manifest.layers.len(), 2);
    for layer in &manifest.layers {
        assert_eq!(layer.media_type, image::OCI_LAYER_GZIP);
        assert!(dst.has_blob(&layer.digest));
    }
    let inspect = lazysnap(&["inspect", "--verify", &dst_arg]);
    assert_ok(&inspect);
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout)
            .matches("verified")
            .count(),
        2
    );

    // A single layer blob file inspects too, with --toc and an explicit --toc-digest.
    let layer = &manifest.layers[1];
    let blob = dst.blob_path(&layer.digest).unwrap();
    let toc_digest = &layer.annotations["containerd.io/snapshot/stargz/toc.digest"];
    let out = lazysnap(&[
        "inspect",
        "--verify",
        "--toc",
        "--toc-digest",
        toc_digest,
        blob.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"entries\""), "{text}");
    assert!(text.contains("data/big.bin"), "{text}");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = lazysnap(&["inspect", "--toc-digest", &wrong, blob.to_str().unwrap()]);
    assert!(!out.status.success());
}

#[test]
fn picks_one_platform_from_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let (_layout, _) = multi_platform_layout(&dir.path().join("src"));
    let src_arg = format!("oci:{}:multi", dir.path().join("src").display());
    let dst_dir = dir.path().join("dst");
    let dst_arg = format!("oci:{}:arm", dst_dir.display());
    assert_ok(&lazysnap(&[
        "convert",
        "--platform",
        "linux/arm64",
        &src_arg,
        &dst_arg,
    ]));
    let dst = OciLayout::open(&dst_dir).unwrap();
    let top = dst.resolve(Some("arm")).unwrap();
    assert_eq!(
        top.media_type,
        image::OCI_MANIFEST,
        "one platform gives a manifest"
    );
    let manifest: Manifest = image::parse_json("m", &dst.read_blob(&top.digest).unwrap()).unwrap();
    let config: image::ImageConfig =
        image::parse_json("c", &dst.read_blob(&manifest.config.digest).unwrap()).unwrap();
    assert_eq!(config.architecture, "arm64");

    let out = lazysnap(&[
        "convert",
        "--platform",
        "linux/s390x",
        &src_arg,
        &format!("oci:{}:none", dst_dir.display()),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("linux/s390x") && stderr.contains("linux/arm64"),
        "{stderr}"
    );
}

#[test]
fn converts_all_platforms_of_an_index_registry_to_registry() {
    let registry = RegistryServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (layout, source_digests) = multi_platform_layout(&dir.path().join("src"));
    push_layout_image(&layout, Some("multi"), &registry.host(), "src/multi", "v1").unwrap();
    let host = registry.host();
    assert_ok(&lazysnap(&[
        "convert",
        "--all-platforms",
        &format!("{host}/src/multi:v1"),
        &format!("{host}/dst/multi:esgz"),
    ]));
    let index: Index = image::parse_json(
        "index",
        &fetch_manifest(&registry.url(), "dst/multi", "esgz").unwrap(),
    )
    .unwrap();
    assert_eq!(index.media_type.as_deref(), Some(image::OCI_INDEX));
    assert_eq!(index.manifests.len(), 2);
    let platforms: Vec<String> = index
        .manifests
        .iter()
        .map(|d| d.platform.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    for child in &index.manifests {
        assert!(!source_digests.contains(&child.digest));
        let manifest: Manifest = image::parse_json(
            "m",
            &fetch_manifest(&registry.url(), "dst/multi", &child.digest).unwrap(),
        )
        .unwrap();
        assert!(manifest
            .layers
            .iter()
            .all(|l| l.media_type == image::OCI_LAYER_GZIP
                && l.annotations
                    .contains_key("containerd.io/snapshot/stargz/toc.digest")));
    }
    // Each platform inspects and verifies.
    for platform in ["linux/amd64", "linux/arm64"] {
        assert_ok(&lazysnap(&[
            "inspect",
            "--verify",
            "--platform",
            platform,
            &format!("{host}/dst/multi:esgz"),
        ]));
    }
    // And into a layout too.
    let out_dir = dir.path().join("out");
    assert_ok(&lazysnap(&[
        "convert",
        "--all-platforms",
        &format!("{host}/src/multi:v1"),
        &format!("oci:{}:all", out_dir.display()),
    ]));
    let out = OciLayout::open(&out_dir).unwrap();
    assert_eq!(
        out.resolve(Some("all")).unwrap().media_type,
        image::OCI_INDEX
    );
}

/// A layer holding a GNU sparse file (GNU tar `--sparse`, PAX 1.0) is refused with the file's
/// real name and what to do, and nothing is written: never a file whose content is the sparse
/// map.
#[test]
fn a_gnu_sparse_member_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let sparse = std::fs::File::create(files.join("sparse.bin")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    sparse.write_all_at(b"data in the middle", 1 << 29).unwrap();
    let layer_tar = dir.path().join("layer.tar");
    let status = std::process::Command::new("tar")
        .args(["--sparse", "--format=pax", "-cf"])
        .arg(&layer_tar)
        .arg("-C")
        .arg(&files)
        .arg("sparse.bin")
        .status()
        .unwrap();
    assert!(status.success(), "GNU tar is needed (Debian package tar)");
    let layout = OciLayout::create(&dir.path().join("src")).unwrap();
    write_image(
        &layout,
        &[std::fs::read(&layer_tar).unwrap()],
        &ImageOptions::default(),
        Some("v1"),
    )
    .unwrap();
    let dst = dir.path().join("dst");
    let output = lazysnap(&[
        "convert",
        &format!("oci:{}:v1", dir.path().join("src").display()),
        &format!("oci:{}:esgz", dst.display()),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sparse.bin") && stderr.contains("GNU sparse"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("GNUSparseFile"),
        "the real name is given: {stderr}"
    );
}
