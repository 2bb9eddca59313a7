//! Real FUSE mounts (root required): the mounted tree equals what was indexed, every kind of node
//! with its attributes, contents, links and xattrs. Whiteouts, overlayfs stacking and large
//! directories are `overlay.rs`.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{attr, get_xattr, list_xattrs, node, pattern, test_options, MemorySource, TestMount};
use lazysnap_fuse::{IndexBuilder, NewNode, NodeKind};

/// What a path should look like when stat'ed through the mount.
#[derive(Debug, Clone)]
enum Expect {
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: i64,
        nlink: u64,
    },
    File {
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: i64,
        content: Vec<u8>,
        nlink: u64,
    },
    Symlink {
        target: &'static str,
        uid: u32,
        mtime: i64,
    },
    Char {
        major: u32,
        minor: u32,
        mode: u32,
    },
    Block {
        major: u32,
        minor: u32,
        mode: u32,
    },
    Fifo {
        mode: u32,
        uid: u32,
    },
}

#[test]
fn mounted_tree_equals_index() {
    let mut source = MemorySource::default();
    let mut b = IndexBuilder::new(attr(0o755, 0, 0, 1_600_000_000));
    let mut expect: BTreeMap<&str, Expect> = BTreeMap::new();

    b.add("etc", node(NodeKind::Dir, attr(0o755, 0, 0, 1_600_000_001)))
        .unwrap();
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n".to_vec();
    source.insert(1, passwd.clone());
    b.add(
        "etc/passwd",
        node(
            NodeKind::File {
                size: passwd.len() as u64,
                content: 1,
            },
            attr(0o644, 0, 0, 1_600_000_002),
        ),
    )
    .unwrap();
    let big = pattern(5 * 1024 * 1024 + 17, 7);
    source.insert(2, big.clone());
    b.add(
        "data/big.bin",
        node(
            NodeKind::File {
                size: big.len() as u64,
                content: 2,
            },
            attr(0o600, 1000, 1001, 1_500_000_000),
        ),
    )
    .unwrap();
    source.insert(3, Vec::new());
    b.add(
        "data/empty",
        node(
            NodeKind::File {
                size: 0,
                content: 3,
            },
            attr(0o444, 5, 6, 0),
        ),
    )
    .unwrap();
    b.add(
        "data/hard",
        node(
            NodeKind::HardLink {
                target_path: "data/big.bin".into(),
            },
            attr(0, 0, 0, 0),
        ),
    )
    .unwrap();
    b.add(
        "data/link",
        node(
            NodeKind::Symlink {
                target: "big.bin".into(),
            },
            attr(0o777, 7, 7, 1_400_000_000),
        ),
    )
    .unwrap();
    b.add(
        "abs",
        node(
            NodeKind::Symlink {
                target: "/etc/passwd".into(),
            },
            attr(0o777, 0, 0, -86_400),
        ),
    )
    .unwrap();
    b.add(
        "dev/null",
        node(
            NodeKind::CharDev { major: 1, minor: 3 },
            attr(0o666, 0, 0, 0),
        ),
    )
    .unwrap();
    b.add(
        "dev/sda",
        node(
            NodeKind::BlockDev {
                major: 8,
                minor: 300,
            },
            attr(0o660, 0, 6, 0),
        ),
    )
    .unwrap();
    b.add("run/fifo", node(NodeKind::Fifo, attr(0o620, 33, 33, 0)))
        .unwrap();
    b.add(
        "bin/su",
        node(
            NodeKind::File {
                size: 4,
                content: 4,
            },
            attr(0o4755, 0, 0, 0),
        ),
    )
    .unwrap();
    source.insert(4, b"#!x\n".to_vec());
    b.add("tmp", node(NodeKind::Dir, attr(0o1777, 0, 0, 0)))
        .unwrap();
    b.add(
        "ünïcødé name with spaces",
        node(
            NodeKind::File {
                size: 4,
                content: 4,
            },
            attr(0o640, 0, 0, 0),
        ),
    )
    .unwrap();
    let long_name = "L".repeat(255);
    b.add(
        &long_name,
        node(
            NodeKind::File {
                size: 4,
                content: 4,
            },
            attr(0o640, 0, 0, 0),
        ),
    )
    .unwrap();
    b.add(
        "xattr-file",
        NewNode {
            kind: NodeKind::File {
                size: 4,
                content: 4,
            },
            attr: attr(0o644, 0, 0, 0),
            xattrs: vec![
                ("user.comment".into(), b"hello".to_vec()),
                (
                    "security.capability".into(),
                    vec![
                        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ],
                ),
                ("user.empty".into(), vec![]),
            ],
        },
    )
    .unwrap();

    expect.insert(
        "etc",
        Expect::Dir {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_001,
            nlink: 2,
        },
    );
    expect.insert(
        "etc/passwd",
        Expect::File {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_002,
            content: passwd,
            nlink: 1,
        },
    );
    expect.insert(
        "data",
        Expect::Dir {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            nlink: 2,
        },
    );
    expect.insert(
        "data/big.bin",
        Expect::File {
            mode: 0o600,
            uid: 1000,
            gid: 1001,
            mtime: 1_500_000_000,
            content: big.clone(),
            nlink: 2,
        },
    );
    expect.insert(
        "data/hard",
        Expect::File {
            mode: 0o600,
            uid: 1000,
            gid: 1001,
            mtime: 1_500_000_000,
            content: big,
            nlink: 2,
        },
    );
    expect.insert(
        "data/empty",
        Expect::File {
            mode: 0o444,
            uid: 5,
            gid: 6,
            mtime: 0,
            content: vec![],
            nlink: 1,
        },
    );
    expect.insert(
        "data/link",
        Expect::Symlink {
            target: "big.bin",
            uid: 7,
            mtime: 1_400_000_000,
        },
    );
    expect.insert(
        "abs",
        Expect::Symlink {
            target: "/etc/passwd",
            uid: 0,
            mtime: -86_400,
        },
    );
    expect.insert(
        "dev",
        Expect::Dir {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            nlink: 2,
        },
    );
    expect.insert(
        "dev/null",
        Expect::Char {
            major: 1,
            minor: 3,
            mode: 0o666,
        },
    );
    expect.insert(
        "dev/sda",
        Expect::Block {
            major: 8,
            minor: 300,
            mode: 0o660,
        },
    );
    expect.insert(
        "run",
        Expect::Dir {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            nlink: 2,
        },
    );
    expect.insert(
        "run/fifo",
        Expect::Fifo {
            mode: 0o620,
            uid: 33,
        },
    );
    expect.insert(
        "bin",
        Expect::Dir {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            nlink: 2,
        },
    );
    expect.insert(
        "bin/su",
        Expect::File {
            mode: 0o4755,
            uid: 0,
            gid: 0,
            mtime: 0,
            content: b"#!x\n".to_vec(),
            nlink: 1,
        },
    );
    expect.insert(
        "tmp",
        Expect::Dir {
            mode: 0o1777,
            uid: 0,
            gid: 0,
            mtime: 0,
            nlink: 2,
        },
    );
    expect.insert(
        "ünïcødé name with spaces",
        Expect::File {
            mode: 0o640,
            uid: 0,
            gid: 0,
            mtime: 0,
            content: b"#!x\n".to_vec(),
            nlink: 1,
        },
    );
    let long_name_static: &'static str = Box::leak(long_name.into_boxed_str());
    expect.insert(
        long_name_static,
        Expect::File {
            mode: 0o640,
            uid: 0,
            gid: 0,
            mtime: 0,
            content: b"#!x\n".to_vec(),
            nlink: 1,
        },
    );
    expect.insert(
        "xattr-file",
        Expect::File {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            content: b"#!x\n".to_vec(),
            nlink: 1,
        },
    );

    let index = b.build();
    let mnt = TestMount::new(index, Arc::new(source), &test_options());

    // Root: attributes and link count (2 + 6 subdirectories).
    let root = std::fs::metadata(mnt.path("")).unwrap();
    assert!(root.is_dir());
    assert_eq!(root.mode() & 0o7777, 0o755);
    assert_eq!(root.nlink(), 2 + 6);
    assert_eq!(root.mtime(), 1_600_000_000);

    // Walk the mount and compare with the expectations, both ways.
    let mut seen = Vec::new();
    walk(&mnt.path(""), &mnt.path(""), &mut seen);
    seen.sort();
    let mut wanted: Vec<String> = expect.keys().map(|k| k.to_string()).collect();
    wanted.sort();
    assert_eq!(
        seen, wanted,
        "the mounted tree lists exactly the indexed paths"
    );

    for (rel, want) in &expect {
        let path = mnt.path(rel);
        let meta = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {rel}: {e}"));
        match want {
            Expect::Dir {
                mode,
                uid,
                gid,
                mtime,
                nlink,
            } => {
                assert!(meta.is_dir(), "{rel} is a directory");
                assert_eq!(meta.mode() & 0o7777, *mode, "{rel} mode");
                assert_eq!((meta.uid(), meta.gid()), (*uid, *gid), "{rel} owner");
                assert_eq!(meta.mtime(), *mtime, "{rel} mtime");
                assert_eq!(meta.nlink(), *nlink, "{rel} nlink");
            }
            Expect::File {
                mode,
                uid,
                gid,
                mtime,
                content,
                nlink,
            } => {
                assert!(meta.file_type().is_file(), "{rel} is a regular file");
                assert_eq!(meta.mode() & 0o7777, *mode, "{rel} mode");
                assert_eq!((meta.uid(), meta.gid()), (*uid, *gid), "{rel} owner");
                assert_eq!(meta.mtime(), *mtime, "{rel} mtime");
                assert_eq!(meta.size(), content.len() as u64, "{rel} size");
                assert_eq!(meta.nlink(), *nlink, "{rel} nlink");
                let got = std::fs::read(&path).unwrap_or_else(|e| panic!("read {rel}: {e}"));
                assert!(got == *content, "{rel} content differs");
            }
            Expect::Symlink { target, uid, mtime } => {
                assert!(meta.file_type().is_symlink(), "{rel} is a symlink");
                assert_eq!(
                    std::fs::read_link(&path).unwrap().to_str(),
                    Some(*target),
                    "{rel} target"
                );
                assert_eq!(meta.size(), target.len() as u64, "{rel} size");
                assert_eq!(meta.uid(), *uid, "{rel} uid");
                assert_eq!(meta.mtime(), *mtime, "{rel} mtime");
            }
            Expect::Char { major, minor, mode } => {
                assert!(meta.file_type().is_char_device(), "{rel} is a char device");
                assert_eq!(
                    (libc::major(meta.rdev()), libc::minor(meta.rdev())),
                    (*major, *minor),
                    "{rel} rdev"
                );
                assert_eq!(meta.mode() & 0o7777, *mode, "{rel} mode");
            }
            Expect::Block { major, minor, mode } => {
                assert!(
                    meta.file_type().is_block_device(),
                    "{rel} is a block device"
                );
                assert_eq!(
                    (libc::major(meta.rdev()), libc::minor(meta.rdev())),
                    (*major, *minor),
                    "{rel} rdev"
                );
                assert_eq!(meta.mode() & 0o7777, *mode, "{rel} mode");
            }
            Expect::Fifo { mode, uid } => {
                assert!(meta.file_type().is_fifo(), "{rel} is a fifo");
                assert_eq!(meta.mode() & 0o7777, *mode, "{rel} mode");
                assert_eq!(meta.uid(), *uid, "{rel} uid");
            }
        }
    }

    // Hard links share one inode; inode numbers are stable across lookups.
    let big_meta = std::fs::metadata(mnt.path("data/big.bin")).unwrap();
    let hard_meta = std::fs::metadata(mnt.path("data/hard")).unwrap();
    assert_eq!(big_meta.ino(), hard_meta.ino());
    assert_ne!(
        big_meta.ino(),
        std::fs::metadata(mnt.path("etc/passwd")).unwrap().ino()
    );

    // Extended attributes.
    let x = mnt.path("xattr-file");
    assert_eq!(
        list_xattrs(&x),
        vec!["user.comment", "security.capability", "user.empty"]
    );
    assert_eq!(
        get_xattr(&x, "user.comment").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(get_xattr(&x, "user.empty").as_deref(), Some(&b""[..]));
    assert_eq!(
        get_xattr(&x, "security.capability").map(|v| v.len()),
        Some(20)
    );
    assert_eq!(get_xattr(&x, "user.absent"), None);
    assert!(list_xattrs(&mnt.path("etc/passwd")).is_empty());

    // Read-only: writes and creations fail.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.path("etc/passwd"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = std::fs::write(mnt.path("new-file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        std::fs::metadata(mnt.path("missing"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOENT)
    );

    // statfs answers.
    let out = Command::new("stat")
        .arg("-f")
        .arg("-c")
        .arg("%b %c")
        .arg(mnt.path(""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stat -f on the mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        out.push(
            path.strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        );
        if entry.file_type().unwrap().is_dir() {
            walk(root, &path, out);
        }
    }
}
