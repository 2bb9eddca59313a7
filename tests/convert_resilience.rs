//! `lazysnap convert` through what production registries put in the way: Basic auth with
//! credentials from a Docker config file, a flaky connection (resets, 5xx, 429 with
//! Retry-After), and a pull-through mirror configured only in a containerd hosts.toml that is
//! then stopped. Real Distribution registries on 127.0.0.1, the real binary.

mod cli_common;
use cli_common::*;

use std::path::Path;
use std::process::Command;

use lazysnap::image::OciLayout;
use lazysnap_testbed::images::{self, ImageOptions};
use lazysnap_testbed::{
    write_docker_config, write_htpasswd, Fault, FaultProxy, RegistryOptions, RegistryServer,
};

/// Pushes a small busybox image to `registry` as `repo:src`.
fn push_source(registry: &RegistryServer, work: &Path, repo: &str) {
    let layout = OciLayout::create(&work.join(format!("layout-{repo}"))).unwrap();
    let layers = vec![images::busybox_layer().unwrap()];
    images::write_image(&layout, &layers, &ImageOptions::default(), Some("src")).unwrap();
    images::push_layout_image(&layout, Some("src"), &registry.host(), repo, "src").unwrap();
}

/// `lazysnap ARGS` with `DOCKER_CONFIG` pointing at `docker_config`.
fn lazysnap_with_docker_config(docker_config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(args)
        .env("DOCKER_CONFIG", docker_config)
        .env("LAZYSNAP_LOG", "warn")
        .output()
        .expect("running lazysnap")
}

#[test]
fn converts_into_a_registry_with_basic_auth_from_the_docker_config() {
    let work = tempfile::tempdir().unwrap();
    let source = RegistryServer::start().unwrap();
    push_source(&source, work.path(), "app");
    let htpasswd = work.path().join("htpasswd");
    write_htpasswd(&htpasswd, &[("alice", "s3cret-pass")]).unwrap();
    let target = RegistryServer::start_with(&RegistryOptions {
        htpasswd: Some(htpasswd),
        ..RegistryOptions::default()
    })
    .unwrap();
    let src = format!("{}/app:src", source.host());
    let dst = format!("{}/app:esgz", target.host());

    let no_credentials = work.path().join("empty-config");
    std::fs::create_dir_all(&no_credentials).unwrap();
    let refused = lazysnap_with_docker_config(&no_credentials, &["convert", &src, &dst]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(
        message.contains("auth") || message.contains("credential"),
        "the error should say credentials are missing: {message}"
    );

    let credentials = work.path().join("docker");
    write_docker_config(&credentials, &[(&target.host(), "alice", "s3cret-pass")]).unwrap();
    let converted = lazysnap_with_docker_config(&credentials, &["convert", &src, &dst]);
    assert!(converted.status.success(), "{converted:?}");
    let verified = lazysnap_with_docker_config(&credentials, &["inspect", "--verify", &dst]);
    assert!(verified.status.success(), "{verified:?}");
    let printed = format!("{converted:?}{verified:?}");
    assert!(!printed.contains("s3cret-pass"), "a secret was printed");
}

#[test]
fn converts_through_resets_server_errors_and_rate_limits() {
    let work = tempfile::tempdir().unwrap();
    let registry = RegistryServer::start().unwrap();
    push_source(&registry, work.path(), "flaky");
    let proxy = FaultProxy::start(&registry.host()).unwrap();
    proxy.inject("/blobs/", Fault::ResetMidBody);
    proxy.inject("/blobs/", Fault::Status(503));
    proxy.inject(
        "/blobs/",
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
    );
    proxy.inject("/manifests/", Fault::Status(502));
    let src = format!("{}/flaky:src", proxy.host());
    let dst = format!("{}/flaky:esgz", registry.host());
    lazysnap_ok(&["convert", &src, &dst]);
    assert_eq!(proxy.pending_faults(), 0, "every injected fault was met");
    lazysnap_ok(&["inspect", "--verify", &dst]);
}

#[test]
fn converts_through_a_hosts_toml_mirror_and_falls_back_to_the_origin() {
    let work = tempfile::tempdir().unwrap();
    let origin = RegistryServer::start().unwrap();
    push_source(&origin, work.path(), "mirrored");
    let mut mirror = RegistryServer::start_with(&RegistryOptions {
        proxy_remote_url: Some(origin.url()),
        ..RegistryOptions::default()
    })
    .unwrap();
    let hosts = work.path().join("certs.d");
    let host_dir = hosts.join(origin.host());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            origin.url(),
            mirror.url()
        ),
    )
    .unwrap();
    let hosts_arg = hosts.to_str().unwrap();
    let src = format!("{}/mirrored:src", origin.host());
    let manifest: serde_json::Value =
        serde_json::from_slice(&images::fetch_manifest(&origin.url(), "mirrored", "src").unwrap())
            .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    let first = format!("{}/mirrored:esgz", origin.host());
    lazysnap_ok(&["convert", "--hosts-dir", hosts_arg, &src, &first]);
    assert!(
        mirror.blob_bytes_served(&layer) > 0,
        "the source layer was not read from the mirror:\n{}",
        mirror.log()
    );

    mirror.stop();
    let second = format!("{}/mirrored:esgz-again", origin.host());
    lazysnap_ok(&["convert", "--hosts-dir", hosts_arg, &src, &second]);
    lazysnap_ok(&["inspect", "--verify", &second]);
}
