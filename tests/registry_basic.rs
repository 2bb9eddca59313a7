//! The registry client against the real Distribution registry on 127.0.0.1: push (monolithic,
//! chunked, mount), manifests by tag and digest, blob get/stream/ranged reads.

use std::time::Duration;

use bytes::Bytes;
use lazysnap::blob::{BlobError, BlobSource};
use lazysnap::digest::sha256_digest;
use lazysnap::registry::{Client, ClientConfig, Reference, RegistryError, MEDIA_TYPE_OCI_MANIFEST};
use lazysnap_testbed::RegistryServer;
use tokio::io::AsyncReadExt as _;

fn test_config() -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_secs(10),
        read_deadline: Duration::from_secs(20),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(200),
        ..ClientConfig::default()
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn manifest_for(
    config_digest: &str,
    config_len: usize,
    layer_digest: &str,
    layer_len: usize,
) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_len}]
        }))
        .unwrap(),
    )
}

#[tokio::test]
async fn push_resolve_and_read_through_real_registry() {
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    let client = Client::new(ClientConfig {
        upload_chunk_size: 300_000,
        ..test_config()
    })
    .unwrap();
    let repo = Reference::parse(&format!("{}/team/app:v1", registry.host())).unwrap();

    // Small blob, monolithic.
    let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let config_digest = sha256_digest(&config);
    assert!(!client.blob_exists(&repo, &config_digest).await.unwrap());
    client
        .push_blob_bytes(&repo, &config_digest, config.clone())
        .await
        .unwrap();
    assert!(client.blob_exists(&repo, &config_digest).await.unwrap());
    // Refuses to push bytes that do not match the digest.
    let wrong = client
        .push_blob_bytes(&repo, &config_digest, Bytes::from_static(b"other"))
        .await;
    assert!(matches!(wrong, Err(RegistryError::Corrupt(_))), "{wrong:?}");

    // A 1 MB file, chunked in 300 kB PATCHes.
    let layer = pattern(1_000_000, 7);
    let layer_digest = sha256_digest(&layer);
    let dir = tempfile::tempdir().unwrap();
    let layer_path = dir.path().join("layer");
    std::fs::write(&layer_path, &layer).unwrap();
    client
        .push_blob_file(&repo, &layer_digest, &layer_path)
        .await
        .unwrap();
    assert!(client.blob_exists(&repo, &layer_digest).await.unwrap());
    let log = registry.log();
    assert!(
        log.contains("\"PATCH /v2/team/app/blobs/uploads/"),
        "chunked upload expected"
    );

    // Cross-repository mount.
    let other = Reference::parse(&format!("{}/team/other:v1", registry.host())).unwrap();
    assert!(client
        .mount_blob(&other, &layer_digest, "team/app")
        .await
        .unwrap());
    assert!(client.blob_exists(&other, &layer_digest).await.unwrap());
    // Mounting something that is not there says false (then the caller uploads).
    let absent = sha256_digest(b"absent");
    assert!(!client
        .mount_blob(&other, &absent, "team/app")
        .await
        .unwrap());

    // Manifest PUT by tag, GET by tag and by digest.
    let manifest = manifest_for(&config_digest, config.len(), &layer_digest, layer.len());
    let digest = client
        .put_manifest(&repo, MEDIA_TYPE_OCI_MANIFEST, manifest.clone())
        .await
        .unwrap();
    assert_eq!(digest, sha256_digest(&manifest));
    let by_tag = client.get_manifest(&repo).await.unwrap();
    assert_eq!(by_tag.digest, digest);
    assert_eq!(by_tag.media_type, MEDIA_TYPE_OCI_MANIFEST);
    assert_eq!(by_tag.bytes, manifest);
    let by_digest = client
        .get_manifest(&repo.with_digest(&digest))
        .await
        .unwrap();
    assert_eq!(by_digest.bytes, manifest);
    let missing = client.get_manifest(&repo.with_tag("nope")).await;
    assert!(
        matches!(missing, Err(RegistryError::NotFound(_))),
        "{missing:?}"
    );

    // Blob get (verified) and streamed reader.
    assert_eq!(
        client.get_blob(&repo, &config_digest).await.unwrap(),
        config
    );
    let mut reader = client.blob_reader(&repo, &layer_digest).await.unwrap();
    assert_eq!(reader.size(), Some(layer.len() as u64));
    let mut streamed = Vec::new();
    reader.read_to_end(&mut streamed).await.unwrap();
    assert_eq!(streamed, layer);
    let missing_blob = client.get_blob(&repo, &absent).await;
    assert!(
        matches!(missing_blob, Err(RegistryError::NotFound(_))),
        "{missing_blob:?}"
    );

    // Ranged reads: single, multi (one multipart request), adjacent coalesced.
    let blob = client.blob(&repo, &layer_digest, layer.len() as u64);
    assert_eq!(blob.size(), layer.len() as u64);
    let got = blob.read_range(1000..5096).await.unwrap();
    assert_eq!(&got[..], &layer[1000..5096]);
    let before = registry.blob_gets(&layer_digest).len();
    let ranges = vec![900_000..900_100, 10..20, 20..30, 500_000..504_096, 0..0];
    let parts = blob.read_ranges(ranges.clone()).await.unwrap();
    for (r, p) in ranges.iter().zip(&parts) {
        assert_eq!(
            &p[..],
            &layer[r.start as usize..r.end as usize],
            "range {r:?}"
        );
    }
    let gets = registry.blob_gets(&layer_digest);
    assert_eq!(
        gets.len(),
        before + 1,
        "one multi-range request expected: {gets:?}"
    );
    assert_eq!(gets.last().unwrap().0, 206);
    // Out of bounds is Invalid, not a request.
    let oob = blob.read_range(999_999..1_000_001).await;
    assert!(matches!(oob, Err(BlobError::Invalid(_))), "{oob:?}");
    // A wrong size is detected as a wrong Content-Range total, never as silent data.
    let lying = client.blob(&repo, &layer_digest, 2_000_000);
    let err = lying.read_range(0..10).await;
    assert!(matches!(err, Err(BlobError::Corrupt(_))), "{err:?}");
}

#[tokio::test]
async fn large_file_upload_streams_monolithically() {
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    let client = Client::new(test_config()).unwrap();
    let repo = Reference::parse(&format!("{}/big/blob:v1", registry.host())).unwrap();
    let data = pattern(20 << 20, 3);
    let digest = sha256_digest(&data);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, &data).unwrap();
    client.push_blob_file(&repo, &digest, &path).await.unwrap();
    let blob = client.blob(&repo, &digest, data.len() as u64);
    let tail = blob.read_range((20 << 20) - 51..20 << 20).await.unwrap();
    assert_eq!(&tail[..], &data[(20 << 20) - 51..]);
    // Pushing a file under the wrong digest is rejected by the registry and classified.
    let bad = client
        .push_blob_file(&repo, &sha256_digest(b"not this"), &path)
        .await;
    assert!(matches!(bad, Err(RegistryError::Invalid(_))), "{bad:?}");
}

#[tokio::test]
async fn sequential_reads_share_one_streamed_response() {
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    let client = Client::new(test_config()).unwrap();
    let repo = Reference::parse(&format!("{}/seq/blob:v1", registry.host())).unwrap();
    let data = pattern(3_000_000, 11);
    let digest = sha256_digest(&data);
    client
        .push_blob_bytes(&repo, &digest, Bytes::from(data.clone()))
        .await
        .unwrap();
    let blob = client.blob(&repo, &digest, data.len() as u64);
    let piece = 100_000u64;
    let mut offset = 0u64;
    while offset < data.len() as u64 {
        let end = (offset + piece).min(data.len() as u64);
        let got = blob.read(offset..end).await.unwrap();
        assert_eq!(
            &got[..],
            &data[offset as usize..end as usize],
            "piece at {offset}"
        );
        offset = end;
    }
    // The first piece is read on its own; the other 29 come from one streamed window.
    let gets = registry.blob_gets(&digest);
    assert!(
        !gets.is_empty() && gets.len() <= 2,
        "30 sequential reads took {} requests: {gets:?}",
        gets.len()
    );
    // A jump elsewhere still reads the right bytes.
    let got = blob.read(1_234_567..1_334_567).await.unwrap();
    assert_eq!(&got[..], &data[1_234_567..1_334_567]);
    let got = blob.read(10..20).await.unwrap();
    assert_eq!(&got[..], &data[10..20]);
    // With streaming off every piece is its own request.
    let unstreamed = Client::new(ClientConfig {
        sequential_window: 0,
        ..test_config()
    })
    .unwrap()
    .blob(&repo, &digest, data.len() as u64);
    let before = registry.blob_gets(&digest).len();
    for start in [0u64, piece, 2 * piece] {
        let got = unstreamed.read(start..start + piece).await.unwrap();
        assert_eq!(&got[..], &data[start as usize..(start + piece) as usize]);
    }
    assert_eq!(registry.blob_gets(&digest).len(), before + 3);
}
