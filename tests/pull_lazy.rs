//! The lazy path of `lazysnap pull` with a real containerd: the lazysnap snapshot service runs in
//! this process with a stand-in remote-layer hook (it "mounts" an eStargz layer by extracting the
//! fixture blob from disk, so no byte comes from the registry), containerd answers the pull's
//! Prepare with AlreadyExists, the pull reports every layer lazy without fetching a layer blob,
//! the hook saw the CRI labels and TOC digests, and `ctr run` works on the result.

mod fixtures_common;
mod pull_common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lazysnap::snapshotter::{
    self, RemoteLayerError, RemoteLayerRequest, RemoteLayers, Service, ServiceOptions,
};
use lazysnap_testbed::RegistryServer;
use pull_common::*;

/// Remote-layer hook that extracts the layer from the fixture directory into the mountpoint and
/// records every request.
struct FixtureRemoteLayers {
    variant: &'static str,
    requests: Mutex<Vec<RemoteLayerRequest>>,
}

#[async_trait]
impl RemoteLayers for FixtureRemoteLayers {
    async fn mount_layer(&self, request: &RemoteLayerRequest) -> Result<(), RemoteLayerError> {
        self.requests.lock().unwrap().push(request.clone());
        if request.locator.toc_digest.is_none() {
            return Err(RemoteLayerError::Declined("no TOC digest".into()));
        }
        let hex = request.locator.layer_digest.trim_start_matches("sha256:");
        let blob = fixture_dir(self.variant).join(format!("{hex}.blob"));
        let file = std::fs::File::open(&blob)
            .map_err(|e| RemoteLayerError::Failed(format!("{}: {e}", blob.display())))?;
        let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(file));
        archive
            .unpack(&request.mountpoint)
            .map_err(|e| RemoteLayerError::Failed(format!("extracting {}: {e}", blob.display())))?;
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

    async fn unmount_layer(&self, _mountpoint: &Path) -> Result<(), RemoteLayerError> {
        Ok(())
    }
}

#[test]
fn pull_cli_lazy_layers_are_not_fetched_and_run() {
    require_root_and_containerd();
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let registry = RegistryServer::start().expect("start registry");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let image = runtime.block_on(push_fixture(&registry.host(), "esgz", "fixture", "esgz"));
    let manifest_digest = lazysnap::digest::sha256_digest(
        &std::fs::read(fixture_dir("esgz").join("manifest.json")).unwrap(),
    );
    let layers = [
        (
            "sha256:d7ffa78de5dc9f584ede75dd4055684882f6e559f9e9ccea9e3289e5d97bd03f",
            "sha256:5359947cff89af5acb71458b8da3965e12596b88956eeb9d16a91536450f2d2b",
        ),
        (
            "sha256:beb145bfbc1d2335bbaa76f52247d4053a246f6ea94ab3557c1318f73e9a2126",
            "sha256:d5a8932bfe32da6c38591f395ddcb09ba9dceb04ec6d97e3e92d6c731cd188e4",
        ),
    ];

    // The snapshot service in this process, with the stand-in hook.
    let dir = tempfile::Builder::new()
        .prefix("ls-lazy-")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = dir.path().join("lazysnap.sock");
    let hook = Arc::new(FixtureRemoteLayers {
        variant: "esgz",
        requests: Mutex::new(Vec::new()),
    });
    let service = Service::open(ServiceOptions::new(dir.path().join("root")), hook.clone())
        .expect("open snapshot service");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let _guard = runtime.enter();
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind snapshotter socket");
        runtime.spawn(snapshotter::serve(listener, service.clone(), async {
            let _ = stopped.await;
        }))
    };

    let containerd = TestContainerd::start(Some(&socket));
    let namespace = "pulllazy";
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .arg("pull")
        .arg("--containerd")
        .arg(containerd.socket())
        .arg("--namespace")
        .arg(namespace)
        .arg(&image)
        .output()
        .expect("run lazysnap pull");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "lazysnap pull failed:\n{}\nstdout: {stdout}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        containerd.log()
    );
    for (layer, _) in &layers {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(layer) && l.contains("lazy")),
            "layer {layer} should be lazy:\n{stdout}\nstats {:?}\nrequests {:#?}",
            service.stats(),
            hook.requests.lock().unwrap()
        );
        assert_eq!(
            registry.blob_bytes_served(layer),
            0,
            "the pull must not fetch lazy layer {layer}"
        );
    }
    assert_eq!(service.stats().remote_mounted, 2);

    // The hook got what a remote snapshotter needs to find each layer.
    let requests = hook.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for (request, (layer, toc)) in requests.iter().zip(layers.iter()) {
        assert_eq!(request.locator.image_ref, image);
        assert_eq!(request.locator.layer_digest, *layer);
        assert_eq!(request.locator.toc_digest.as_deref(), Some(*toc));
        assert_eq!(
            request.labels["containerd.io/snapshot/cri.manifest-digest"],
            manifest_digest
        );
        assert_eq!(
            request.labels["containerd.io/snapshot.ref"], request.target,
            "the target is the chain ID"
        );
    }
    assert_eq!(requests[0].locator.image_layers, [layers[0].0, layers[1].0]);
    assert_eq!(requests[1].locator.image_layers, [layers[1].0]);
    assert_eq!(requests[0].parent, "");
    assert!(requests[1].key.contains("extract-"), "{}", requests[1].key);

    let out = containerd.run(
        namespace,
        "lazysnap",
        &image,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(out, "x");
    // A second pull finds both layers present.
    let again = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .arg("pull")
        .arg("--containerd")
        .arg(containerd.socket())
        .arg("--namespace")
        .arg(namespace)
        .arg(&image)
        .output()
        .expect("run lazysnap pull");
    assert!(again.status.success());
    assert_eq!(
        String::from_utf8_lossy(&again.stdout)
            .matches("already present")
            .count(),
        2
    );

    drop(containerd);
    let _ = stop.send(());
    let _ = runtime.block_on(server);
    lazysnap_testbed::unmount_under(dir.path());
}

/// containerd's CRI plugin pulls the eStargz image through lazysnap: its Prepare labels (CRI's
/// own) let the snapshot service mount both layers remotely, so CRI fetches no layer blob.
#[test]
fn cri_pull_image_mounts_layers_lazily() {
    require_root_and_containerd();
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let registry = RegistryServer::start().expect("start registry");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let image = runtime.block_on(push_fixture(&registry.host(), "esgz", "fixture", "cri"));

    let dir = tempfile::Builder::new()
        .prefix("ls-cri-")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = dir.path().join("lazysnap.sock");
    let hook = Arc::new(FixtureRemoteLayers {
        variant: "esgz",
        requests: Mutex::new(Vec::new()),
    });
    let service = Service::open(ServiceOptions::new(dir.path().join("root")), hook.clone())
        .expect("open snapshot service");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let _guard = runtime.enter();
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind snapshotter socket");
        runtime.spawn(snapshotter::serve(listener, service.clone(), async {
            let _ = stopped.await;
        }))
    };
    let containerd = TestContainerd::start_with(lazysnap_testbed::ContainerdOptions {
        snapshotter_socket: Some(socket.clone()),
        enable_cri: true,
        ..Default::default()
    });

    let image_ref = runtime.block_on(async {
        use lazysnap::containerd::proto::runtime::v1::{
            image_service_client::ImageServiceClient, ImageSpec, PullImageRequest,
        };
        let client = lazysnap::containerd::Containerd::connect(&containerd.socket(), "k8s.io")
            .await
            .expect("connect");
        let mut cri = ImageServiceClient::new(client.channel());
        cri.pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                annotations: Default::default(),
            }),
            auth: None,
        })
        .await
        .unwrap_or_else(|e| panic!("CRI PullImage: {e}\ncontainerd log:\n{}", containerd.log()))
        .into_inner()
        .image_ref
    });
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");

    assert_eq!(
        service.stats().remote_mounted,
        2,
        "requests: {:#?}",
        hook.requests.lock().unwrap()
    );
    let requests = hook.requests.lock().unwrap().clone();
    for request in &requests {
        assert_eq!(request.locator.image_ref, image);
        assert!(request.locator.toc_digest.is_some());
    }
    for layer in [
        "sha256:d7ffa78de5dc9f584ede75dd4055684882f6e559f9e9ccea9e3289e5d97bd03f",
        "sha256:beb145bfbc1d2335bbaa76f52247d4053a246f6ea94ab3557c1318f73e9a2126",
    ] {
        assert_eq!(
            registry.blob_bytes_served(layer),
            0,
            "CRI must not fetch lazy layer {layer}"
        );
    }
    // The image is usable by ctr in CRI's namespace.
    let out = containerd.run("k8s.io", "lazysnap", &image, &["cat", "/data/one-byte.txt"]);
    assert_eq!(out, "x");

    drop(containerd);
    let _ = stop.send(());
    let _ = runtime.block_on(server);
    lazysnap_testbed::unmount_under(dir.path());
}
