//! The shipped packaging files say what they must: containerd snippets register the proxy plugin
//! on lazysnap's default socket and switch CRI to it with annotations on; the systemd unit keeps
//! helpers alive on restart, is ready when serve says so and is wanted, not required, by
//! containerd; the DaemonSet shares mounts with the host.

use std::path::Path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn toml(rel: &str) -> toml::Value {
    toml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid TOML: {e}"))
}

#[test]
fn containerd_v2_snippet_registers_proxy_and_cri() {
    let v = toml("packaging/containerd/config-v2-containerd-1.6-1.7.toml");
    assert_eq!(v["version"].as_integer(), Some(2));
    let proxy = &v["proxy_plugins"]["lazysnap"];
    assert_eq!(proxy["type"].as_str(), Some("snapshot"));
    assert_eq!(
        proxy["address"].as_str(),
        Some(lazysnap::config::DEFAULT_ADDRESS)
    );
    let cri = &v["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
    assert_eq!(cri["snapshotter"].as_str(), Some("lazysnap"));
    assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
}

#[test]
fn containerd_v3_snippet_uses_cri_images_plugin() {
    let v = toml("packaging/containerd/config-v3-containerd-2.x.toml");
    assert_eq!(v["version"].as_integer(), Some(3));
    assert_eq!(
        v["proxy_plugins"]["lazysnap"]["address"].as_str(),
        Some(lazysnap::config::DEFAULT_ADDRESS)
    );
    let images = &v["plugins"]["io.containerd.cri.v1.images"];
    assert_eq!(images["snapshotter"].as_str(), Some("lazysnap"));
    // Setting it makes containerd 2.x's CRI fall back to its legacy pull.
    assert!(images.get("disable_snapshot_annotations").is_none());
    let exports = &v["proxy_plugins"]["lazysnap"]["exports"];
    assert_eq!(
        exports["enable_remote_snapshot_annotations"].as_str(),
        Some("true")
    );
    assert_eq!(
        exports["root"].as_str(),
        Some(lazysnap::config::DEFAULT_ROOT)
    );
    let unpack = v["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
        .as_array()
        .unwrap();
    let snapshotters: Vec<&str> = unpack
        .iter()
        .filter_map(|u| u["snapshotter"].as_str())
        .collect();
    assert_eq!(snapshotters, ["overlayfs", "lazysnap"]);
}

#[test]
fn systemd_unit_and_daemonset() {
    let unit = read("packaging/systemd/lazysnap.service");
    assert!(unit.lines().any(|l| l == "KillMode=process"));
    assert!(unit.lines().any(|l| l == "Before=containerd.service"));
    // Ready when serve says so (sd_notify), and wanted, never required, by containerd: a failed
    // or restarted lazysnap neither keeps containerd down nor restarts it.
    assert!(unit.lines().any(|l| l == "Type=notify"));
    assert!(unit.lines().any(|l| l == "NotifyAccess=main"));
    assert!(!unit.contains("RequiredBy="), "{unit}");
    assert!(
        unit.lines()
            .any(|l| l.starts_with("WantedBy=") && l.contains("containerd.service")),
        "{unit}"
    );
    assert!(unit.contains("lazysnap serve --config /etc/lazysnap/config.toml"));
    let daemonset = read("packaging/kubernetes/lazysnap-daemonset.yaml");
    assert!(daemonset.contains("kind: DaemonSet"));
    assert!(daemonset.contains("mountPropagation: Bidirectional"));
    assert!(daemonset.contains("privileged: true"));
    // Pinned to the version scripts/build-image.sh tags, probed, and with the holder as a
    // sidecar that outlives restarts of the lazysnap container.
    assert!(!daemonset.contains(":latest"), "{daemonset}");
    assert!(daemonset.contains(&format!(
        "image: ghcr.io/lazysnap/lazysnap:{}",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(daemonset.contains("path: /healthz") && daemonset.contains("path: /livez"));
    assert!(daemonset.contains("restartPolicy: Always"));
    assert!(daemonset.contains(
        "\"fuse-holder\", \"--socket\", \"/var/lib/lazysnap/fuse-holder.sock\", \"--stay\""
    ));
    // The ConfigMap's config is a valid lazysnap config.
    let start = daemonset.find("config.toml: |").unwrap();
    let body: String = daemonset[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    lazysnap::config::Config::parse(&body, "daemonset configmap").unwrap();
}
