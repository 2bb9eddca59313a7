//! The mounts a snapshot is used through, shaped as containerd's overlay snapshotter shapes them:
//! a bind mount when there is no parent (or a read-only view of one layer), otherwise overlayfs
//! with the parents' `fs/` dirs as `lowerdir` (nearest first) and, for an active snapshot, its own
//! `fs/` as `upperdir` and `work/` as `workdir`.

use std::path::Path;

use super::proto::Mount;
use super::store::Kind;

/// Host-dependent overlay options, decided once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayOptions {
    /// Add `index=off` (the kernel has the overlay `index` feature; containerd turns it off so
    /// layers can be shared between overlay mounts).
    pub index_off: bool,
    /// Add `userxattr`: needed when mounting inside a user namespace (rootless), where overlay
    /// must use `user.overlay.*` xattrs.
    pub userxattr: bool,
}

impl OverlayOptions {
    /// Detects the options for this host: `index=off` when the overlay module exposes the
    /// `index` parameter, `userxattr` when this process is not in the initial user namespace.
    pub fn detect() -> Self {
        let index_off = Path::new("/sys/module/overlay/parameters/index").exists();
        let userxattr = std::fs::read_to_string("/proc/self/uid_map")
            .map(|map| !is_initial_user_namespace(&map))
            .unwrap_or(false);
        Self {
            index_off,
            userxattr,
        }
    }
}

fn is_initial_user_namespace(uid_map: &str) -> bool {
    let fields: Vec<&str> = uid_map.split_whitespace().collect();
    fields == ["0", "0", "4294967295"]
}

/// Builds the mounts for a snapshot of `kind` whose own directory is `own_dir` and whose
/// ancestors' directories are `parent_dirs` (nearest first).
pub fn snapshot_mounts(
    kind: Kind,
    own_dir: &Path,
    parent_dirs: &[&Path],
    opts: &OverlayOptions,
) -> Vec<Mount> {
    let fs_of = |dir: &Path| dir.join("fs").to_string_lossy().into_owned();
    if parent_dirs.is_empty() {
        let access = if kind == Kind::Active { "rw" } else { "ro" };
        return vec![bind(fs_of(own_dir), access)];
    }
    let mut options = Vec::new();
    if opts.index_off {
        options.push("index=off".to_string());
    }
    if opts.userxattr {
        options.push("userxattr".to_string());
    }
    if kind == Kind::Active {
        options.push(format!(
            "workdir={}",
            own_dir.join("work").to_string_lossy()
        ));
        options.push(format!("upperdir={}", fs_of(own_dir)));
    } else if let [only] = parent_dirs {
        return vec![bind(fs_of(only), "ro")];
    }
    let lower: Vec<String> = parent_dirs.iter().map(|d| fs_of(d)).collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

fn bind(source: String, access: &str) -> Mount {
    Mount {
        r#type: "bind".into(),
        source,
        target: String::new(),
        options: vec![access.into(), "rbind".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_containerd_overlay() {
        let opts = OverlayOptions {
            index_off: true,
            userxattr: false,
        };
        let own = Path::new("/r/snapshots/3");
        let p2 = Path::new("/r/snapshots/2");
        let p1 = Path::new("/r/snapshots/1");

        let m = snapshot_mounts(Kind::Active, own, &[], &opts);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, "/r/snapshots/3/fs");
        assert_eq!(m[0].options, ["rw", "rbind"]);

        let m = snapshot_mounts(Kind::View, own, &[p2], &opts);
        assert_eq!(m[0].source, "/r/snapshots/2/fs");
        assert_eq!(m[0].options, ["ro", "rbind"]);

        let m = snapshot_mounts(Kind::Active, own, &[p2, p1], &opts);
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            m[0].options,
            [
                "index=off",
                "workdir=/r/snapshots/3/work",
                "upperdir=/r/snapshots/3/fs",
                "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs"
            ]
        );

        let m = snapshot_mounts(Kind::View, own, &[p2, p1], &OverlayOptions::default());
        assert_eq!(
            m[0].options,
            ["lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs"]
        );
    }

    #[test]
    fn user_namespace_detection() {
        assert!(is_initial_user_namespace(
            "         0          0 4294967295\n"
        ));
        assert!(!is_initial_user_namespace("0 1000 1\n"));
    }
}
