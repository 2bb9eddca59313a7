//! Hostile images through the real parts (registry, `lazysnap convert`, `lazysnap mount` on
//! FUSE): duplicate names and symlink loops are contained (the last member of a name wins as in
//! tar; a loop gives ELOOP, never a hang), and a manifest whose bytes do not match its digest is
//! refused with an error that says so.

mod cli_common;
use cli_common::*;

use lazysnap_testbed::{images, Fault, FaultProxy, RegistryServer};

fn tar_with_duplicates_and_loops() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let file = |tar: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, path, data).unwrap();
    };
    file(&mut tar, "h/dup.txt", b"first\n");
    file(&mut tar, "h/other.txt", b"other\n");
    file(&mut tar, "h/dup.txt", b"second, the one that counts\n");
    for (name, target) in [
        ("h/loop-a", "loop-b"),
        ("h/loop-b", "loop-a"),
        ("h/self", "self"),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        tar.append_link(&mut header, name, target).unwrap();
    }
    tar.into_inner().unwrap()
}

#[test]
fn duplicate_names_and_symlink_loops_are_contained() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let source = push_generated(
        &registry,
        work.path(),
        &[tar_with_duplicates_and_loops()],
        "hostile",
    );
    let esgz = format!("{}/hostile:esgz", registry.host());
    lazysnap_ok(&["convert", &source, &esgz]);
    let mounted = MountedImage::new(&esgz, work.path(), "mnt", &["--no-background"]);

    let mut names: Vec<String> = std::fs::read_dir(mounted.dir.join("h"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["dup.txt", "loop-a", "loop-b", "other.txt", "self"]);
    assert_eq!(
        std::fs::read_to_string(mounted.dir.join("h/dup.txt")).unwrap(),
        "second, the one that counts\n"
    );
    assert_eq!(
        std::fs::read_to_string(mounted.dir.join("h/other.txt")).unwrap(),
        "other\n"
    );
    for name in ["h/loop-a", "h/self"] {
        let err = std::fs::read(mounted.dir.join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{name}: {err}");
    }
}

#[test]
fn a_manifest_that_does_not_match_its_digest_is_refused() {
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    push_generated(&registry, work.path(), &[tar_of([])], "swapped");
    let manifest = images::fetch_manifest(&registry.url(), "swapped", "src").unwrap();
    let digest = lazysnap::digest::sha256_digest(&manifest);
    let proxy = FaultProxy::start(&registry.host()).unwrap();
    // Every answer for the manifest carries other bytes, as a compromised or broken registry
    // or mirror would send.
    for _ in 0..32 {
        proxy.inject("/manifests/", Fault::OtherContent);
    }
    let by_digest = format!("{}/swapped@{digest}", proxy.host());
    let target = format!("{}/swapped:converted", registry.host());
    let output = lazysnap(&["convert", &by_digest, &target]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains(digest.as_str()),
        "the error names the digest: {err}"
    );
    assert!(
        err.to_lowercase().contains("digest"),
        "the error says the digest does not match: {err}"
    );
}
