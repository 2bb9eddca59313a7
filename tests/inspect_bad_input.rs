//! `lazysnap inspect` on bad input: a corrupted eStargz layer names the entry and offset and
//! exits non-zero; a plain tar.gz is not mistaken for eStargz.

mod cli_common;
use cli_common::*;

use lazysnap::image::{self, Manifest, OciLayout};
use lazysnap_testbed::images::{every_entry_type_layer, write_image, ImageOptions};

/// An image of the every-entry-type layer in an OCI layout under `dir`, converted by `lazysnap
/// convert` into the layout `dir/dst` (tag `esgz`).
fn converted_layout(
    dir: &std::path::Path,
) -> (lazysnap_testbed::images::GeneratedImage, std::path::PathBuf) {
    let src = OciLayout::create(&dir.join("src")).unwrap();
    let generated = write_image(
        &src,
        &[every_entry_type_layer().unwrap()],
        &ImageOptions::default(),
        Some("v1"),
    )
    .unwrap();
    let dst_dir = dir.join("dst");
    assert_ok(&lazysnap(&[
        "convert",
        &format!("oci:{}:v1", dir.join("src").display()),
        &format!("oci:{}:esgz", dst_dir.display()),
    ]));
    (generated, dst_dir)
}

#[test]
fn corrupt_chunk_is_named_with_entry_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (generated, dst_dir) = converted_layout(dir.path());
    let dst = OciLayout::open(&dst_dir).unwrap();
    let top = dst.resolve(Some("esgz")).unwrap();
    let manifest: Manifest = image::parse_json("m", &dst.read_blob(&top.digest).unwrap()).unwrap();
    let blob_path = dst.blob_path(&manifest.layers[0].digest).unwrap();
    let mut blob = std::fs::read(&blob_path).unwrap();

    // Flip bytes inside data/big.bin's compressed data: find its first chunk via the TOC.
    let toc_out = lazysnap(&["inspect", "--toc", blob_path.to_str().unwrap()]);
    assert!(toc_out.status.success());
    let text = String::from_utf8_lossy(&toc_out.stdout);
    let json_start = text.find('{').unwrap();
    let toc: serde_json::Value = serde_json::from_str(&text[json_start..]).unwrap();
    let entry = toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "data/big.bin")
        .unwrap();
    let offset = entry["offset"].as_u64().unwrap() as usize;
    for b in &mut blob[offset + 40..offset + 60] {
        *b ^= 0x5a;
    }
    let corrupt = dir.path().join("corrupt.tar.gz");
    std::fs::write(&corrupt, &blob).unwrap();
    let out = lazysnap(&["inspect", "--verify", corrupt.to_str().unwrap()]);
    assert!(!out.status.success(), "corruption not detected");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("data/big.bin"), "{stderr}");
    assert!(stderr.contains("offset"), "{stderr}");

    // A plain gzip layer (the source) is refused with a footer error.
    let src = OciLayout::open(&dir.path().join("src")).unwrap();
    let plain = src.blob_path(&generated.layers[0].digest).unwrap();
    let out = lazysnap(&["inspect", plain.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("footer"));

    // A truncated blob fails too.
    let truncated = dir.path().join("truncated.tar.gz");
    std::fs::write(&truncated, &blob[..blob.len() / 2]).unwrap();
    let out = lazysnap(&["inspect", "--verify", truncated.to_str().unwrap()]);
    assert!(!out.status.success());
}

/// `lazysnap inspect --toc L | head -1`: the reader going away ends inspect quietly, with the
/// status of a tool killed by SIGPIPE, never a panic.
#[test]
fn a_closed_stdout_ends_inspect_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, dst_dir) = converted_layout(dir.path());
    let bin =
        std::env::var("LAZYSNAP_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lazysnap").into());
    // A pipe whose reader is gone: every write fails with EPIPE, as after `| head -1` exits.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let output = std::process::Command::new(bin)
        .args([
            "inspect",
            "--toc",
            &format!("oci:{}:esgz", dst_dir.display()),
        ])
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        output.status.code() == Some(141),
        "{:?}: {stderr}",
        output.status
    );
}
