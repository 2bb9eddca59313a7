//! Real FUSE mounts under overlayfs (root required): whiteouts and opaque directories look as
//! overlayfs expects (checked through a real overlay mount), `userxattr` mounts report the user
//! opaque xattr, a 100k-entry directory lists completely, and a passthrough layer stacks.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{attr, get_xattr, list_xattrs, node, pattern, test_options, MemorySource, TestMount};
use lazysnap_fuse::{IndexBuilder, MountOptions, NodeKind};

fn whiteout_index() -> (lazysnap_fuse::Index, MemorySource) {
    let mut source = MemorySource::default();
    source.insert(1, b"upper\n".to_vec());
    let mut b = IndexBuilder::new(attr(0o755, 0, 0, 0));
    b.add(
        "etc/.wh.hosts",
        node(
            NodeKind::File {
                size: 0,
                content: 0,
            },
            attr(0o644, 0, 0, 0),
        ),
    )
    .unwrap();
    b.add(
        "var/.wh..wh..opq",
        node(
            NodeKind::File {
                size: 0,
                content: 0,
            },
            attr(0o644, 0, 0, 0),
        ),
    )
    .unwrap();
    b.add(
        "var/new",
        node(
            NodeKind::File {
                size: 6,
                content: 1,
            },
            attr(0o644, 0, 0, 0),
        ),
    )
    .unwrap();
    (b.build(), source)
}

#[test]
fn whiteouts_and_opaque_dirs_as_overlayfs_lowerdir() {
    let (index, source) = whiteout_index();
    let mnt = TestMount::new(index, Arc::new(source), &test_options());

    let wh = std::fs::symlink_metadata(mnt.path("etc/hosts")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(std::fs::symlink_metadata(mnt.path("etc/.wh.hosts")).is_err());
    let var_names: Vec<_> = std::fs::read_dir(mnt.path("var"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(var_names, vec!["new"], "the opaque marker is hidden");
    assert_eq!(
        get_xattr(&mnt.path("var"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        list_xattrs(&mnt.path("var")),
        vec!["trusted.overlay.opaque"]
    );
    assert_eq!(get_xattr(&mnt.path("etc"), "trusted.overlay.opaque"), None);

    // A real overlayfs with this layer above a plain lower directory.
    let base = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(base.path().join("etc")).unwrap();
    std::fs::write(base.path().join("etc/hosts"), b"base hosts").unwrap();
    std::fs::write(base.path().join("etc/keep"), b"kept").unwrap();
    std::fs::create_dir_all(base.path().join("var/old")).unwrap();
    std::fs::write(base.path().join("var/old/file"), b"old").unwrap();
    let merged = tempfile::tempdir().unwrap();
    let overlay = OverlayGuard::mount(&[mnt.path(""), base.path().to_path_buf()], merged.path());
    assert!(
        !merged.path().join("etc/hosts").exists(),
        "whiteout hides the lower file"
    );
    assert_eq!(
        std::fs::read(merged.path().join("etc/keep")).unwrap(),
        b"kept"
    );
    let merged_var: Vec<_> = std::fs::read_dir(merged.path().join("var"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        merged_var,
        vec!["new"],
        "opaque directory hides the lower contents"
    );
    assert_eq!(
        std::fs::read(merged.path().join("var/new")).unwrap(),
        b"upper\n"
    );
    drop(overlay);
}

#[test]
fn userxattr_mount_reports_user_opaque() {
    let (index, source) = whiteout_index();
    let opts = MountOptions {
        userxattr: true,
        ..test_options()
    };
    let mnt = TestMount::new(index, Arc::new(source), &opts);
    assert_eq!(
        get_xattr(&mnt.path("var"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(get_xattr(&mnt.path("var"), "trusted.overlay.opaque"), None);
    assert_eq!(list_xattrs(&mnt.path("var")), vec!["user.overlay.opaque"]);
}

/// Read-only overlayfs over lower dirs; unmounted on drop.
struct OverlayGuard {
    target: std::path::PathBuf,
}

impl OverlayGuard {
    fn mount(lowers: &[std::path::PathBuf], target: &Path) -> OverlayGuard {
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("lowerdir={}", lowerdir.join(":")))
            .arg(target)
            .status()
            .expect("run mount -t overlay");
        assert!(status.success(), "overlay mount over the FUSE layer failed");
        OverlayGuard {
            target: target.to_path_buf(),
        }
    }
}

impl Drop for OverlayGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.target).status();
    }
}

#[test]
fn directory_with_100k_entries_lists_completely() {
    const N: usize = 100_000;
    let mut source = MemorySource::default();
    source.insert(1, b"x".to_vec());
    let mut b = IndexBuilder::new(attr(0o755, 0, 0, 0));
    // Insert in reverse order: the listing must still be complete and sorted.
    for i in (0..N).rev() {
        b.add(
            &format!("big/file-{i:06}"),
            node(
                NodeKind::File {
                    size: 1,
                    content: 1,
                },
                attr(0o644, 0, 0, 0),
            ),
        )
        .unwrap();
    }
    let index = b.build();
    assert!(
        index.memory_usage() < 30 * 1024 * 1024,
        "index of 100k entries uses {} bytes",
        index.memory_usage()
    );
    let mnt = TestMount::new(index, Arc::new(source), &test_options());

    let names: Vec<String> = std::fs::read_dir(mnt.path("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), N);
    let expected: Vec<String> = (0..N).map(|i| format!("file-{i:06}")).collect();
    assert!(
        names == expected,
        "listing is complete and in stable sorted order"
    );

    // Listing again gives the same order (readdir offsets are stable).
    let again: Vec<String> = std::fs::read_dir(mnt.path("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(again == names);
    for i in [0, 1, 4_999, 50_000, N - 1] {
        let p = mnt.path(&format!("big/file-{i:06}"));
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
    }
    assert!(std::fs::metadata(mnt.path("big/file-100000")).is_err());
}

#[test]
fn passthrough_layer_stacks_under_overlayfs() {
    let local_dir = tempfile::tempdir().unwrap();
    let local = local_dir.path().join("content");
    let data = pattern(300_000, 9);
    std::fs::write(&local, &data).unwrap();
    let mut source = MemorySource::default();
    source.insert(1, data.clone());
    source.local_files.insert(1, local);
    let mut b = IndexBuilder::new(attr(0o755, 0, 0, 0));
    b.add(
        "dir/file",
        node(
            NodeKind::File {
                size: data.len() as u64,
                content: 1,
            },
            attr(0o644, 0, 0, 0),
        ),
    )
    .unwrap();
    let mnt = TestMount::new(
        b.build(),
        Arc::new(source),
        &MountOptions {
            passthrough: true,
            ..test_options()
        },
    );
    assert!(mnt.handle.stats().passthrough_active);

    let base = tempfile::tempdir().unwrap();
    std::fs::write(base.path().join("base-file"), b"base").unwrap();
    let merged = tempfile::tempdir().unwrap();
    let overlay = OverlayGuard::mount(&[mnt.path(""), base.path().to_path_buf()], merged.path());
    assert!(std::fs::read(merged.path().join("dir/file")).unwrap() == data);
    assert_eq!(
        std::fs::read(merged.path().join("base-file")).unwrap(),
        b"base"
    );
    assert!(
        mnt.handle.stats().passthrough_opens >= 1,
        "reads through overlayfs used passthrough"
    );
    drop(overlay);
}
