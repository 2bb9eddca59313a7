//! stargz-snapshotter's own tooling accepts lazysnap's output: containerd 1.6 pulls and unpacks
//! the converted images (eStargz and zstd:chunked), and `ctr-remote images get-toc-digest`
//! parses every layer's footer and TOC and returns the digest in our annotation.
//! Needs root, containerd and ctr-remote (scripts/install-deps.sh); fails loudly without them.

mod cli_common;
use cli_common::*;

use std::path::Path;
use std::process::Command;

use lazysnap::image::{self, Manifest, OciLayout};
use lazysnap_testbed::images::{
    busybox_layer, every_entry_type_layer, fetch_manifest, push_layout_image, write_image,
    ImageOptions,
};
use lazysnap_testbed::{ContainerdOptions, ContainerdServer, RegistryServer};

/// Runs `ctr-remote --address <containerd> ARGS…`; returns stdout, failing with the output.
fn ctr_remote(containerd: &ContainerdServer, args: &[&str]) -> String {
    assert!(
        Path::new("/usr/bin/ctr-remote").is_file(),
        "ctr-remote is required: run scripts/install-deps.sh (Debian stargz-snapshotter)"
    );
    let output = Command::new("/usr/bin/ctr-remote")
        .arg("--address")
        .arg(containerd.address())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ctr-remote {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        containerd.log()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn ctr_remote_reads_the_toc_of_every_converted_layer() {
    let registry = RegistryServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&dir.path().join("src")).unwrap();
    write_image(
        &layout,
        &[busybox_layer().unwrap(), every_entry_type_layer().unwrap()],
        &ImageOptions::default(),
        Some("v1"),
    )
    .unwrap();
    let host = registry.host();
    push_layout_image(&layout, Some("v1"), &host, "src/every", "v1").unwrap();
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs containerd and needs root"
    );
    let containerd = ContainerdServer::start(&ContainerdOptions::default()).unwrap();

    for (tag, extra) in [("esgz", None), ("zstd", Some("--zstdchunked"))] {
        let dst = format!("{host}/dst/every:{tag}");
        let mut args = vec!["convert"];
        args.extend(extra);
        let src = format!("{host}/src/every:v1");
        args.extend([src.as_str(), dst.as_str()]);
        assert!(lazysnap(&args).status.success());

        // containerd's normal pull and unpack accept the image.
        containerd
            .ctr_ok(&["images", "pull", "--plain-http", &dst])
            .unwrap();

        let manifest: Manifest = image::parse_json(
            "m",
            &fetch_manifest(&registry.url(), "dst/every", tag).unwrap(),
        )
        .unwrap();
        for layer in &manifest.layers {
            let mut get = vec!["images", "get-toc-digest"];
            if extra.is_some() {
                get.push("--zstdchunked");
            }
            get.push(&layer.digest);
            let digest = ctr_remote(&containerd, &get);
            assert_eq!(
                digest.trim(),
                layer.annotations["containerd.io/snapshot/stargz/toc.digest"],
                "ctr-remote's TOC digest of {} ({tag})",
                layer.digest
            );
        }
    }
}
