//! Unit tests of the FUSE index: building, lookups, listings, hard links.

use super::*;

fn attr(mode: u32) -> NodeAttr {
    NodeAttr::new(mode, 1, 2, 1_700_000_000)
}

fn file(size: u64, content: ContentId) -> NewNode {
    NewNode {
        kind: NodeKind::File { size, content },
        attr: attr(0o644),
        xattrs: vec![],
    }
}

fn dir() -> NewNode {
    NewNode {
        kind: NodeKind::Dir,
        attr: attr(0o750),
        xattrs: vec![],
    }
}

#[test]
fn implied_parents_then_explicit_attrs() {
    let mut b = IndexBuilder::new(attr(0o755));
    b.add("a/b/c.txt", file(3, 7)).unwrap();
    b.add("a/", dir()).unwrap();
    let index = b.build();
    let a = index.node(index.lookup_path("a").unwrap()).unwrap();
    assert_eq!(a.attr.mode, 0o750);
    assert_eq!(a.nlink, 3);
    let b_dir = index.node(index.lookup_path("./a/b").unwrap()).unwrap();
    assert_eq!(b_dir.attr.mode, 0o755);
    assert_eq!(b_dir.attr.uid, 0);
    let c = index
        .node(index.lookup_path("/a/b/c.txt").unwrap())
        .unwrap();
    assert_eq!(c.kind, NodeKindInfo::File { content: 7 });
    assert_eq!(c.size, 3);
    assert_eq!(index.node(ROOT_INO).unwrap().nlink, 3);
}

#[test]
fn inode_numbers_follow_build_order() {
    let mut b = IndexBuilder::new(attr(0o755));
    b.add("z", file(1, 0)).unwrap();
    b.add("a", file(1, 1)).unwrap();
    let index = b.build();
    assert_eq!(index.lookup_path("z"), Some(2));
    assert_eq!(index.lookup_path("a"), Some(3));
    let names: Vec<_> = index
        .children(ROOT_INO)
        .iter()
        .map(|d| index.name(d).to_vec())
        .collect();
    assert_eq!(names, vec![b"a".to_vec(), b"z".to_vec()]);
}

#[test]
fn hardlinks_share_inode_and_count_links() {
    let mut b = IndexBuilder::new(attr(0o755));
    b.add("f", file(5, 1)).unwrap();
    b.add(
        "d/g",
        NewNode {
            kind: NodeKind::HardLink {
                target_path: "./f".into(),
            },
            attr: attr(0),
            xattrs: vec![],
        },
    )
    .unwrap();
    let index = b.build();
    let f = index.lookup_path("f").unwrap();
    assert_eq!(index.lookup_path("d/g"), Some(f));
    assert_eq!(index.node(f).unwrap().nlink, 2);
}

#[test]
fn hardlink_errors_name_the_entry() {
    let mut b = IndexBuilder::new(attr(0o755));
    b.add("d", dir()).unwrap();
    let link = |t: &str| NewNode {
        kind: NodeKind::HardLink {
            target_path: t.into(),
        },
        attr: attr(0),
        xattrs: vec![],
    };
    assert!(matches!(
        b.add("x", link("missing")),
        Err(IndexError::HardLinkTargetMissing { .. })
    ));
    assert!(matches!(
        b.add("y", link("d")),
        Err(IndexError::HardLinkToDir { .. })
    ));
}

#[test]
fn whiteouts_and_opaque_dirs_convert() {
    let mut b = IndexBuilder::new(attr(0o755));
    b.add("etc/.wh.passwd", file(0, 0)).unwrap();
    b.add("var/.wh..wh..opq", file(0, 0)).unwrap();
    b.add("var/.wh..wh.plnk", file(0, 0)).unwrap();
    let index = b.build();
    let wh = index
        .node(index.lookup_path("etc/passwd").unwrap())
        .unwrap();
    assert_eq!(wh.kind, NodeKindInfo::CharDev { rdev: 0 });
    assert!(index.lookup_path("etc/.wh.passwd").is_none());
    let var = index.node(index.lookup_path("var").unwrap()).unwrap();
    assert!(var.opaque);
    assert!(index.children(var.ino).is_empty());
}

#[test]
fn whiteouts_kept_when_conversion_is_off() {
    let mut b = IndexBuilder::new(attr(0o755));
    b.set_convert_whiteouts(false);
    b.add("etc/.wh.passwd", file(0, 0)).unwrap();
    let index = b.build();
    assert!(index.lookup_path("etc/.wh.passwd").is_some());
}

#[test]
fn later_entries_replace_earlier_ones() {
    let mut b = IndexBuilder::new(attr(0o755));
    b.add("f", file(5, 1)).unwrap();
    b.add("f", file(9, 2)).unwrap();
    let index = b.build();
    let f = index.node(index.lookup_path("f").unwrap()).unwrap();
    assert_eq!(f.kind, NodeKindInfo::File { content: 2 });
    assert_eq!(index.entry_count(), 1);
}

#[test]
fn bad_paths_are_rejected() {
    let mut b = IndexBuilder::new(attr(0o755));
    assert!(matches!(
        b.add("a/../b", file(0, 0)),
        Err(IndexError::InvalidPath { .. })
    ));
    assert!(matches!(
        b.add(&"n".repeat(256), file(0, 0)),
        Err(IndexError::NameTooLong { .. })
    ));
    b.add("f", file(0, 0)).unwrap();
    assert!(matches!(
        b.add("f/g", file(0, 0)),
        Err(IndexError::ParentNotDir { .. })
    ));
    let dev = NewNode {
        kind: NodeKind::CharDev {
            major: 5000,
            minor: 1,
        },
        attr: attr(0),
        xattrs: vec![],
    };
    assert!(matches!(
        b.add("dev", dev),
        Err(IndexError::DeviceNumberTooLarge { .. })
    ));
}

#[test]
fn devices_symlinks_and_xattrs() {
    let mut b = IndexBuilder::new(attr(0o755));
    b.add(
        "null",
        NewNode {
            kind: NodeKind::CharDev { major: 1, minor: 3 },
            attr: attr(0o666),
            xattrs: vec![],
        },
    )
    .unwrap();
    b.add(
        "big",
        NewNode {
            kind: NodeKind::BlockDev {
                major: 259,
                minor: 65537,
            },
            attr: attr(0o660),
            xattrs: vec![],
        },
    )
    .unwrap();
    b.add(
        "l",
        NewNode {
            kind: NodeKind::Symlink {
                target: "../x/y".into(),
            },
            attr: attr(0o777),
            xattrs: vec![("user.a".into(), b"1".to_vec()), ("user.b".into(), vec![])],
        },
    )
    .unwrap();
    let index = b.build();
    let null = index.node(index.lookup_path("null").unwrap()).unwrap();
    assert_eq!(null.kind, NodeKindInfo::CharDev { rdev: (1 << 8) | 3 });
    let big = index.node(index.lookup_path("big").unwrap()).unwrap();
    let expected = (65537 & 0xff) | (259 << 8) | ((65537 & !0xff) << 12);
    assert_eq!(big.kind, NodeKindInfo::BlockDev { rdev: expected });
    let l = index.lookup_path("l").unwrap();
    assert_eq!(index.symlink_target(l), Some(&b"../x/y"[..]));
    let xs: Vec<_> = index
        .xattrs(l)
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(
        xs,
        vec![
            (b"user.a".to_vec(), b"1".to_vec()),
            (b"user.b".to_vec(), vec![])
        ]
    );
    assert_eq!(index.xattrs(ROOT_INO).count(), 0);
}
