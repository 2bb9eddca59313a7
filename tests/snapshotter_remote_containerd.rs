//! The remote-layer contract with the real containerd: `ctr-remote images rpull` sends Prepare
//! with stargz labels (`containerd.io/snapshot.ref`, `…/remote/stargz.{reference,digest,layers}`,
//! the TOC digest annotation), and containerd's CRI plugin (driven by a small CRI PullImage
//! client) sends the `containerd.io/snapshot/cri.*` labels. A test hook "mounts" one layer (it materializes the eStargz blob
//! into the snapshot's `fs/`, as a FUSE mount would show it) and declines the other. containerd
//! must accept the AlreadyExists answer, find the remote snapshot by its label and parent, fetch
//! and unpack only the declined layer, and `ctr run` must see files of both layers.
//! Needs root, containerd, runc, ctr-remote and docker-registry: fails loudly without.

mod fixtures_common;

use lazysnap::labels;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lazysnap::snapshotter::proto::runtime::v1 as cri;
use lazysnap::snapshotter::proto::runtime::v1::image_service_client::ImageServiceClient;
use lazysnap::snapshotter::{
    LocatorSource, RemoteLayerError, RemoteLayerRequest, RemoteLayers, Service, ServiceOptions,
};
use lazysnap_testbed::{ContainerdOptions, ContainerdServer, RegistryServer};

/// The fixture image used here, from `../shared/fixtures`.
fn fixture() -> std::path::PathBuf {
    fixtures_common::fixtures_dir().join("esgz")
}
/// Layer A of the fixture (the /data tree): the hook declines it, so containerd unpacks it.
const DECLINED_LAYER: &str =
    "sha256:beb145bfbc1d2335bbaa76f52247d4053a246f6ea94ab3557c1318f73e9a2126";

/// Materializes accepted layers from the local fixture blobs; records what it was asked.
struct MaterializingRemote {
    /// The label family Prepare must carry (stargz from ctr-remote, CRI from the CRI plugin).
    source: LocatorSource,
    mounted: Mutex<Vec<String>>,
    declined: Mutex<Vec<String>>,
    unmounted: Mutex<Vec<PathBuf>>,
}

#[async_trait]
impl RemoteLayers for MaterializingRemote {
    async fn mount_layer(&self, request: &RemoteLayerRequest) -> Result<(), RemoteLayerError> {
        let locator = &request.locator;
        assert_eq!(locator.source, self.source, "{:?}", request.labels);
        // The layers label lists this layer and the ones after it (a prefetch hint).
        assert!(
            locator.image_layers.contains(&locator.layer_digest),
            "{:?}",
            request.labels
        );
        if locator.layer_digest == DECLINED_LAYER {
            self.declined
                .lock()
                .unwrap()
                .push(locator.layer_digest.clone());
            return Err(RemoteLayerError::Declined("test declines layer A".into()));
        }
        let hex = locator.layer_digest.trim_start_matches("sha256:");
        let toc = std::fs::read(fixture().join(format!("{hex}.toc.json"))).unwrap();
        assert_eq!(
            locator.toc_digest.as_deref(),
            Some(format!("sha256:{}", sha256_hex(&toc)).as_str()),
            "the TOC digest annotation reaches the hook"
        );
        let blob = fixture().join(format!("{hex}.blob"));
        let mountpoint = request.mountpoint.clone();
        tokio::task::spawn_blocking(move || unpack_layer(&blob, &mountpoint))
            .await
            .unwrap();
        self.mounted
            .lock()
            .unwrap()
            .push(locator.layer_digest.clone());
        Ok(())
    }

    async fn restore_layer(
        &self,
        _mountpoint: &Path,
        _labels: &BTreeMap<String, String>,
        _lower_dirs: &[std::path::PathBuf],
    ) -> Result<(), RemoteLayerError> {
        Ok(())
    }

    async fn unmount_layer(&self, mountpoint: &Path) -> Result<(), RemoteLayerError> {
        self.unmounted
            .lock()
            .unwrap()
            .push(mountpoint.to_path_buf());
        Ok(())
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Unpacks an eStargz blob (a valid tar.gz) as overlayfs expects a lower layer: the TOC and
/// landmark entries are skipped, whiteouts become 0/0 char devices.
fn unpack_layer(blob: &Path, dest: &Path) {
    let gz = flate2::read::MultiGzDecoder::new(std::fs::File::open(blob).unwrap());
    let mut archive = tar::Archive::new(gz);
    archive.set_preserve_permissions(true);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if matches!(
            name.as_ref(),
            "stargz.index.json" | ".prefetch.landmark" | ".no.prefetch.landmark"
        ) {
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let parent = dest.join(path.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&parent).unwrap();
            if hidden == ".wh..opq" {
                xattr_set(&parent, "trusted.overlay.opaque", b"y");
            } else {
                nix::sys::stat::mknod(
                    &parent.join(hidden),
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    0,
                )
                .unwrap();
            }
            continue;
        }
        entry.unpack_in(dest).unwrap();
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    let status = Command::new("setfattr")
        .args(["-n", name, "-v"])
        .arg(String::from_utf8_lossy(value).into_owned())
        .arg(path)
        .status();
    // setfattr is only needed for opaque dirs; the fixture's layer B has none.
    if let Ok(status) = status {
        assert!(status.success(), "setfattr {name} on {}", path.display());
    }
}

/// Pushes a blob with the registry's two-step upload (POST, then PUT with the digest).
fn push_blob(registry: &RegistryServer, repo: &str, digest: &str, file: &Path) {
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "-X", "POST"])
        .arg(format!("{}/v2/{repo}/blobs/uploads/", registry.url()))
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout);
    let location = headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .unwrap_or_else(|| panic!("no upload location in {headers}"))
        .trim()
        .to_string();
    let separator = if location.contains('?') { '&' } else { '?' };
    let status = Command::new("curl")
        .args([
            "-sSf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("{location}{separator}digest={digest}"))
        .status()
        .unwrap();
    assert!(status.success(), "uploading {digest}");
}

fn push_fixture(registry: &RegistryServer, repo: &str, tag: &str) {
    let dir = fixture();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    push_blob(registry, repo, config_digest, &dir.join("config.json"));
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        let hex = digest.trim_start_matches("sha256:");
        push_blob(registry, repo, digest, &dir.join(format!("{hex}.blob")));
    }
    let status = Command::new("curl")
        .args([
            "-sSf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.manifest.v1+json",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", dir.join("manifest.json").display()))
        .arg(format!("{}/v2/{repo}/manifests/{tag}", registry.url()))
        .status()
        .unwrap();
    assert!(status.success(), "pushing the manifest");
}

/// Registry with the fixture pushed, lazysnap in-process with the test hook, containerd on it.
struct Bed {
    registry: RegistryServer,
    image: String,
    runtime: tokio::runtime::Runtime,
    service: Service,
    remote: Arc<MaterializingRemote>,
    containerd: Option<ContainerdServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Bed {
    fn start(source: LocatorSource) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test runs containerd and runc and must run as root"
        );
        let registry = RegistryServer::start().unwrap_or_else(|e| panic!("{e}"));
        push_fixture(&registry, "fixture", "esgz");
        let image = format!("{}/fixture:esgz", registry.host());
        let dir = tempfile::Builder::new()
            .prefix("lazysnap-remote-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("lazysnap.sock");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let remote = Arc::new(MaterializingRemote {
            source,
            mounted: Mutex::default(),
            declined: Mutex::default(),
            unmounted: Mutex::default(),
        });
        let service =
            Service::open(ServiceOptions::new(dir.path().join("root")), remote.clone()).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = {
            let service = service.clone();
            let _guard = runtime.enter();
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            runtime.spawn(async move {
                lazysnap::snapshotter::serve(listener, service, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            })
        };
        // lazysnap is up before containerd starts.
        let containerd = ContainerdServer::start(&ContainerdOptions {
            snapshotter_socket: Some(socket),
            enable_cri: source == LocatorSource::Cri,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        Self {
            registry,
            image,
            runtime,
            service,
            remote,
            containerd: Some(containerd),
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
        }
    }

    fn containerd(&self) -> &ContainerdServer {
        self.containerd.as_ref().unwrap()
    }

    /// One layer mounted remotely, the declined one fetched whole and unpacked by containerd.
    fn assert_one_remote_one_unpacked(&self) {
        assert_eq!(
            self.remote.mounted.lock().unwrap().len(),
            1,
            "layer B mounted"
        );
        assert_eq!(
            *self.remote.declined.lock().unwrap(),
            [DECLINED_LAYER.to_string()]
        );
        let stats = self.service.stats();
        assert_eq!((stats.remote_mounted, stats.remote_fallbacks), (1, 1));
        let layer_b = self.remote.mounted.lock().unwrap()[0].clone();
        assert_eq!(
            self.registry.blob_bytes_served(&layer_b),
            0,
            "remote layer not fetched"
        );
        assert!(self.registry.blob_bytes_served(DECLINED_LAYER) > 0);
    }

    fn run(&self, namespace: &str, id: &str, command: &str) -> String {
        let out = self
            .containerd()
            .ctr_ok(&[
                "--namespace",
                namespace,
                "run",
                "--snapshotter",
                "lazysnap",
                "--rm",
                &self.image,
                id,
                "/bin/sh",
                "-c",
                command,
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Removes the image; containerd's garbage collector then removes every snapshot (checked
    /// when `expect_gc`), the remote one through the hook.
    fn remove_image_and_stop(mut self, namespace: &str, expect_gc: bool) {
        // CRI records the image under several names (tag, repo digest, ID): remove them all.
        let listed = self
            .containerd()
            .ctr_ok(&["--namespace", namespace, "images", "ls", "-q"])
            .unwrap_or_else(|e| panic!("{e}"));
        let names = String::from_utf8_lossy(&listed.stdout).into_owned();
        let mut args = vec!["--namespace", namespace, "images", "rm", "--sync"];
        args.extend(names.lines().filter(|l| !l.is_empty()));
        self.containerd()
            .ctr_ok(&args)
            .unwrap_or_else(|e| panic!("{e}"));
        self.containerd.take();
        let left = self.runtime.block_on(self.service.list(&[])).unwrap();
        if expect_gc {
            assert!(
                left.is_empty(),
                "containerd's GC removed every snapshot: {left:?}"
            );
        } else {
            // The CRI namespace keeps its snapshots past `images rm`: remove them here,
            // children first, as containerd's GC would.
            let mut names: Vec<String> = left.into_iter().map(|i| i.name).collect();
            while !names.is_empty() {
                let before = names.len();
                let service = self.service.clone();
                names.retain(|name| self.runtime.block_on(service.remove(name)).is_err());
                assert!(
                    names.len() < before,
                    "snapshots cannot be removed: {names:?}"
                );
            }
        }
        assert_eq!(self.remote.unmounted.lock().unwrap().len(), 1);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server).unwrap();
        }
    }
}

#[test]
fn rpull_mounts_remote_layers_and_unpacks_declined_ones() {
    assert!(
        Path::new("/usr/bin/ctr-remote").is_file(),
        "ctr-remote is missing: install the Debian package stargz-snapshotter"
    );
    let bed = Bed::start(LocatorSource::Stargz);
    let rpull = Command::new("/usr/bin/ctr-remote")
        .arg("--address")
        .arg(bed.containerd().address())
        .args([
            "images",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "lazysnap",
        ])
        .arg(&bed.image)
        .output()
        .unwrap();
    assert!(
        rpull.status.success(),
        "rpull failed: {}\n{}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&rpull.stdout),
        String::from_utf8_lossy(&rpull.stderr),
        bed.containerd().log()
    );
    bed.assert_one_remote_one_unpacked();

    // The remote snapshot carries its labels, as containerd's lookup needs.
    let layer_b = bed.remote.mounted.lock().unwrap()[0].clone();
    let infos = bed
        .runtime
        .block_on(bed.service.list(&[format!(
            r#"labels."containerd.io/snapshot/remote/stargz.digest"=={layer_b}"#
        )]))
        .unwrap();
    assert_eq!(infos.len(), 1);
    assert!(infos[0].labels.contains_key(labels::TOC_DIGEST));
    assert!(infos[0].labels.contains_key(labels::STARGZ_LAYERS));

    assert_eq!(
        bed.run(
            "default",
            "remote-1",
            "cat /data/one-byte.txt; ls /bin/busybox"
        ),
        "x/bin/busybox\n"
    );
    bed.remove_image_and_stop("default", true);
}

#[test]
fn cri_pull_image_mounts_remote_layers_with_cri_labels() {
    let bed = Bed::start(LocatorSource::Cri);
    let address = bed.containerd().address();
    let image = bed.image.clone();
    let pulled = bed.runtime.block_on(async move {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("unix://{}", address.display()))
                .unwrap()
                .connect()
                .await
                .unwrap();
        let mut client = ImageServiceClient::new(channel);
        client
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image,
                    annotations: Default::default(),
                }),
                auth: None,
            })
            .await
    });
    let pulled = pulled.unwrap_or_else(|status| {
        panic!(
            "CRI PullImage failed: {status}\ncontainerd log:\n{}",
            bed.containerd().log()
        )
    });
    assert!(pulled.into_inner().image_ref.starts_with("sha256:"));
    bed.assert_one_remote_one_unpacked();
    let layer_b = bed.remote.mounted.lock().unwrap()[0].clone();
    let infos = bed
        .runtime
        .block_on(bed.service.list(&[format!(
            r#"labels."{}"=="{}",labels."{}"=={layer_b}"#,
            labels::CRI_IMAGE_REF,
            bed.image,
            labels::CRI_LAYER_DIGEST
        )]))
        .unwrap();
    assert_eq!(infos.len(), 1, "the remote snapshot keeps its CRI labels");
    assert_eq!(bed.run("k8s.io", "cri-1", "cat /data/one-byte.txt"), "x");
    bed.remove_image_and_stop("k8s.io", false);
}
