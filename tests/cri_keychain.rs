//! Private images under Kubernetes: the pull secret reaches lazysnap only in a CRI PullImage
//! request, as kubelet sends it. `lazysnap serve` with `[cri_keychain]` serves the CRI image
//! service on its own socket and forwards to containerd's (real registry behind Basic auth,
//! containerd with CRI, runc, FUSE); the image's layers are mounted lazily with the request's
//! credentials (the registry served only part of the data layer), a container reads the right
//! bytes of a file nobody had fetched, other calls (ImageFsInfo) are forwarded as they are, and
//! the password is in no log.

mod fixtures_common;
mod pull_common;

use std::path::Path;
use std::time::Duration;

use lazysnap::containerd::proto::runtime::v1::{
    image_service_client::ImageServiceClient, AuthConfig, ImageFsInfoRequest, ImageSpec,
    PullImageRequest,
};
use pull_common::*;

const USER: &str = "kube";
const PASSWORD: &str = "pull-secret-7c1d0e";

/// A gRPC channel to a unix socket.
async fn unix_channel(socket: &Path) -> tonic::transport::Channel {
    let socket = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://cri.sock")
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("connect to lazysnap's CRI socket")
}

#[test]
fn a_cri_pull_with_credentials_only_in_the_request_mounts_lazily() {
    require_root_and_containerd();
    let work = tempfile::tempdir().unwrap();
    let (_open, private, image) = private_registry_with_fixture(work.path(), USER, PASSWORD);

    // containerd starts after lazysnap, at a path known only then: lazysnap dials a link to it.
    let containerd_link = work.path().join("containerd.sock");
    let cri_socket = work.path().join("cri-image.sock");
    let lazysnap = TestLazysnap::start_with_config(&format!(
        "[fetch]\nprefetch = false\nbackground_fill = false\nreadahead = false\n\
         [cri_keychain]\nenable = true\nlisten_path = \"{}\"\nimage_service_path = \"{}\"\n",
        cri_socket.display(),
        containerd_link.display()
    ));
    let containerd = TestContainerd::start_with(lazysnap_testbed::ContainerdOptions {
        snapshotter_socket: Some(lazysnap.socket()),
        enable_cri: true,
        ..Default::default()
    });
    std::os::unix::fs::symlink(containerd.socket(), &containerd_link).unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mountpoints, image_ref) = runtime.block_on(async {
        let mut cri = ImageServiceClient::new(unix_channel(&cri_socket).await);
        let pulled = cri
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                auth: Some(AuthConfig {
                    username: USER.into(),
                    password: PASSWORD.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "CRI PullImage through lazysnap: {e}\nlazysnap log:\n{}\ncontainerd log:\n{}",
                    lazysnap.log(),
                    containerd.log()
                )
            })
            .into_inner();
        let info = cri
            .image_fs_info(ImageFsInfoRequest {})
            .await
            .expect("ImageFsInfo forwarded")
            .into_inner();
        let mountpoints: Vec<String> = info
            .image_filesystems
            .iter()
            .filter_map(|fs| fs.fs_id.as_ref().map(|id| id.mountpoint.clone()))
            .collect();
        (mountpoints, pulled.image_ref)
    });
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert!(!mountpoints.is_empty(), "ImageFsInfo answered nothing");

    // The layers are lazy: a file nobody read is fetched now, with the kept credentials.
    std::thread::sleep(Duration::from_millis(200));
    let out = containerd.run(
        "k8s.io",
        "lazysnap",
        &image,
        &["cat", "/data/small/file-042"],
    );
    assert_eq!(out, "small file 042\n", "lazysnap log:\n{}", lazysnap.log());
    let (data_layer, data_size) = layer_digests("esgz")[1].clone();
    let served = private.blob_bytes_served(&data_layer);
    assert!(
        served > 0 && served < data_size,
        "the data layer should be fetched lazily by lazysnap with the CRI credentials \
         ({served} of {data_size} bytes served)\nlazysnap log:\n{}",
        lazysnap.log()
    );
    let log = lazysnap.log();
    assert!(
        log.contains("keeping the credentials of a CRI pull"),
        "{log}"
    );
    assert!(
        !log.contains(PASSWORD),
        "the password leaked into the log:\n{log}"
    );
}
