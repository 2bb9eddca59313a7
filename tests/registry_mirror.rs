//! Mirrors from a containerd hosts.toml: Distribution in proxy (pull-through cache) mode in
//! front of an origin registry. Reads go to the mirror; with the mirror stopped they fall
//! back to the origin.

use std::time::Duration;

use bytes::Bytes;
use lazysnap::digest::sha256_digest;
use lazysnap::registry::{Client, ClientConfig, Reference, MEDIA_TYPE_OCI_MANIFEST};
use lazysnap_testbed::{RegistryOptions, RegistryServer};

/// Access-log GETs of `digest` (mirror requests carry `?ns=`, so match the path prefix).
fn blob_gets(registry: &RegistryServer, digest: &str) -> usize {
    let needle = format!("\"GET /v2/mirrored/app/blobs/{digest}");
    registry
        .log()
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

#[tokio::test]
async fn reads_use_the_mirror_then_fall_back_to_the_origin() {
    let origin = RegistryServer::start().unwrap();
    let mut mirror = RegistryServer::start_with(&RegistryOptions {
        proxy_remote_url: Some(origin.url()),
        ..RegistryOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host_dir = dir.path().join(origin.host());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  [host.\"{}\".header]\n    x-lazysnap-test = \"mirror\"\n",
            origin.url(),
            mirror.url(),
            mirror.url()
        ),
    )
    .unwrap();
    let config = ClientConfig {
        hosts_dir: Some(dir.path().to_path_buf()),
        request_timeout: Duration::from_secs(5),
        read_deadline: Duration::from_secs(15),
        initial_backoff: Duration::from_millis(10),
        ..ClientConfig::default()
    };
    let client = Client::new(config).unwrap();
    let repo = Reference::parse(&format!("{}/mirrored/app:v1", origin.host())).unwrap();

    // Push goes to the origin (the mirror has no push capability).
    let layer = Bytes::from(
        (0..1_500_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let layer_digest = sha256_digest(&layer);
    client
        .push_blob_bytes(&repo, &layer_digest, layer.clone())
        .await
        .unwrap();
    let config_blob = Bytes::from_static(b"{}");
    let config_digest = sha256_digest(&config_blob);
    client
        .push_blob_bytes(&repo, &config_digest, config_blob.clone())
        .await
        .unwrap();
    let manifest = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}]
        }))
        .unwrap(),
    );
    let manifest_digest = client
        .put_manifest(&repo, MEDIA_TYPE_OCI_MANIFEST, manifest.clone())
        .await
        .unwrap();
    assert!(
        !mirror.log().contains("PUT /v2/"),
        "pushes must not go to the mirror"
    );

    // Resolve and read through the mirror.
    let fetched = client.get_manifest(&repo).await.unwrap();
    assert_eq!(fetched.digest, manifest_digest);
    assert!(
        mirror.log().contains("/v2/mirrored/app/manifests/v1"),
        "{}",
        mirror.log()
    );
    let blob = client.blob(&repo, &layer_digest, layer.len() as u64);
    let got = blob.read(1_000_000..1_004_096).await.unwrap();
    assert_eq!(&got[..], &layer[1_000_000..1_004_096]);
    let parts = blob.read_many(vec![0..10, 500_000..500_010]).await.unwrap();
    assert_eq!(&parts[1][..], &layer[500_000..500_010]);
    assert!(blob_gets(&mirror, &layer_digest) > 0, "{}", mirror.log());
    let origin_reads_before = blob_gets(&origin, &layer_digest);

    // Stop the mirror: reads fall back to the origin.
    mirror.stop();
    let got = blob.read(10..20).await.unwrap();
    assert_eq!(&got[..], &layer[10..20]);
    assert_eq!(
        client
            .get_manifest(&repo.with_digest(&manifest_digest))
            .await
            .unwrap()
            .bytes,
        manifest
    );
    assert!(blob_gets(&origin, &layer_digest) > origin_reads_before);
}
