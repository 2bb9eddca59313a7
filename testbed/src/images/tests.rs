//! Tests of the test bed's images: every entry type, layouts, a push to a real registry.

use super::*;
use lazysnap::image::{self, ImageConfig, Index, Manifest, OciLayout, Platform};

#[test]
fn every_entry_type_layer_has_every_type() {
    let tar_bytes = every_entry_type_layer().unwrap();
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut kinds = std::collections::BTreeSet::new();
    let mut names = Vec::new();
    let mut xattr_count = 0;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        kinds.insert(format!("{:?}", entry.header().entry_type()));
        names.push(entry.path().unwrap().to_string_lossy().into_owned());
        if let Some(exts) = entry.pax_extensions().unwrap() {
            xattr_count += exts
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .key()
                        .unwrap()
                        .starts_with("SCHILY.xattr.")
                })
                .count();
        }
    }
    for kind in ["Directory", "Regular", "Symlink", "Link", "Fifo", "Char"] {
        assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }
    assert_eq!(xattr_count, 3);
    assert!(names.iter().any(|n| n == LONG_NAME));
    assert!(names.iter().any(|n| n == PAX_UTF8_NAME));
    assert!(names.iter().any(|n| n.ends_with(".wh..wh..opq")));
    assert!(LONG_NAME.len() > 100 && PAX_UTF8_NAME.len() > 100);
}

#[test]
fn writes_single_and_multi_platform_images() {
    let dir = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(dir.path()).unwrap();
    let layer = every_entry_type_layer().unwrap();
    let amd = write_image(
        &layout,
        std::slice::from_ref(&layer),
        &ImageOptions {
            platform: Platform::parse("linux/amd64").unwrap(),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let arm = write_image(
        &layout,
        &[layer],
        &ImageOptions {
            platform: Platform::parse("linux/arm64").unwrap(),
            docker_media_types: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    write_index(&layout, &[amd.clone(), arm], false, Some("multi")).unwrap();
    let top = layout.resolve(Some("multi")).unwrap();
    let index: Index = image::parse_json("index", &layout.read_blob(&top.digest).unwrap()).unwrap();
    let chosen = image::select_platform(&index, &Platform::parse("linux/amd64").unwrap()).unwrap();
    assert_eq!(chosen.digest, amd.manifest.digest);
    let m: Manifest = image::parse_json("m", &layout.read_blob(&chosen.digest).unwrap()).unwrap();
    let config: ImageConfig =
        image::parse_json("c", &layout.read_blob(&m.config.digest).unwrap()).unwrap();
    assert_eq!(config.rootfs.diff_ids, amd.diff_ids);
}

#[test]
fn pushes_to_a_real_registry_and_extracts_with_gnu_tar() {
    let registry = lazysnap::rig::RegistryServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&dir.path().join("oci")).unwrap();
    let layer = every_entry_type_layer().unwrap();
    let image = write_image(
        &layout,
        &[busybox_layer().unwrap(), layer],
        &ImageOptions::default(),
        Some("v1"),
    )
    .unwrap();
    let digest =
        push_layout_image(&layout, Some("v1"), &registry.host(), "test/every", "v1").unwrap();
    assert_eq!(digest, image.manifest.digest);
    let got = fetch_manifest(&registry.url(), "test/every", "v1").unwrap();
    assert_eq!(lazysnap::digest::sha256_digest(&got), digest);
    let out = dir.path().join("x");
    extract_with_gnu_tar(&layout.blob_path(&image.layers[1].digest).unwrap(), &out).unwrap();
    let listing = tree_listing(&out).unwrap();
    let find = |p: &str| {
        listing
            .iter()
            .find(|l| l.starts_with(&format!("{p} ")))
            .cloned()
            .unwrap_or_else(|| panic!("{p} missing: {listing:#?}"))
    };
    assert!(find("data/null-dev").contains("char") && find("data/null-dev").contains("dev=1,3"));
    assert!(find("data/with-xattrs").contains("xattr:user.comment="));
    assert!(find("data/setuid").contains("mode=4755"));
    assert!(find("data/hardlink-to-small").contains("linkgroup=data/hardlink-to-small"));
    assert!(find("data/small.txt").contains("uid=1000 gid=1001"));
    find(PAX_UTF8_NAME);
    find(LONG_NAME);
}
