//! The registry client through a fault-injecting proxy in front of the real registry: every
//! fault ends retried-and-correct or as a classified error within the read deadline.

use std::time::Duration;

use bytes::Bytes;
use lazysnap::blob::{BlobError, BlobSource};
use lazysnap::digest::sha256_digest;
use lazysnap::registry::{Client, ClientConfig, Reference, RegistryError};
use lazysnap_testbed::{Fault, FaultProxy, RegistryServer};
use tokio::io::AsyncReadExt as _;

struct Bed {
    _registry: RegistryServer,
    proxy: FaultProxy,
    client: Client,
    repo: Reference,
    digest: lazysnap::digest::Digest,
    data: Bytes,
}

async fn bed() -> Bed {
    let registry = RegistryServer::start().unwrap();
    let proxy = FaultProxy::start(&registry.host()).unwrap();
    let client = Client::new(ClientConfig {
        request_timeout: Duration::from_millis(1500),
        read_deadline: Duration::from_secs(6),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        max_retries: 4,
        ..ClientConfig::default()
    })
    .unwrap();
    let data = Bytes::from(
        (0..600_000u32)
            .map(|i| (i * 7 % 253) as u8)
            .collect::<Vec<u8>>(),
    );
    let digest = sha256_digest(&data);
    let direct = Reference::parse(&format!("{}/faulty/app:v1", registry.host())).unwrap();
    client
        .push_blob_bytes(&direct, &digest, data.clone())
        .await
        .unwrap();
    let repo = Reference::parse(&format!("{}/faulty/app:v1", proxy.host())).unwrap();
    Bed {
        _registry: registry,
        proxy,
        client,
        repo,
        digest,
        data,
    }
}

impl Bed {
    async fn read(&self, range: std::ops::Range<u64>) -> Result<Bytes, BlobError> {
        self.client
            .blob(&self.repo, &self.digest, self.data.len() as u64)
            .read_range(range)
            .await
    }
    fn expect(&self, got: Result<Bytes, BlobError>, range: std::ops::Range<u64>) {
        let got = got.unwrap();
        assert_eq!(
            &got[..],
            &self.data[range.start as usize..range.end as usize]
        );
    }
}

const BLOBS: &str = "/blobs/sha256:";

#[tokio::test]
async fn transient_faults_are_retried_and_reads_are_correct() {
    let bed = bed().await;
    let range = 1000..201_000;
    for fault in [
        Fault::ResetMidBody,
        Fault::TruncateBody,
        Fault::WrongContentRange,
        Fault::Stall(Duration::from_secs(3)),
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
    ] {
        let before = bed.proxy.faults_injected();
        bed.proxy.inject(BLOBS, fault.clone());
        bed.expect(bed.read(range.clone()).await, range.clone());
        assert_eq!(
            bed.proxy.faults_injected(),
            before + 1,
            "{fault:?} was not hit"
        );
    }
    // A burst of 5xx shorter than the retry budget.
    for code in [503, 500, 502] {
        bed.proxy.inject(BLOBS, Fault::Status(code));
    }
    bed.expect(bed.read(range.clone()).await, range.clone());
    assert_eq!(bed.proxy.pending_faults(), 0);
    // Multi-range reads survive a reset too.
    bed.proxy.inject(BLOBS, Fault::ResetMidBody);
    let blob = bed
        .client
        .blob(&bed.repo, &bed.digest, bed.data.len() as u64);
    let parts = blob
        .read_ranges(vec![0..100, 300_000..300_100])
        .await
        .unwrap();
    assert_eq!(&parts[1][..], &bed.data[300_000..300_100]);
}

#[tokio::test]
async fn sequential_streams_survive_faults_with_exact_bytes() {
    let bed = bed().await;
    let size = bed.data.len() as u64;
    let piece = 64 * 1024u64;
    for fault in [
        Fault::ResetMidBody,
        Fault::TruncateBody,
        Fault::WrongContentRange,
        Fault::Stall(Duration::from_secs(3)),
        Fault::Status(503),
    ] {
        let blob = bed.client.blob(&bed.repo, &bed.digest, size);
        let before = bed.proxy.faults_injected();
        let requests_before = bed.proxy.requests();
        let mut offset = 0u64;
        while offset < size {
            let end = (offset + piece).min(size);
            if offset == piece {
                // The second sequential read opens the streamed window: it meets the fault.
                bed.proxy.inject(BLOBS, fault.clone());
            }
            let got = blob.read_range(offset..end).await;
            bed.expect(got, offset..end);
            offset = end;
        }
        assert_eq!(
            bed.proxy.faults_injected(),
            before + 1,
            "{fault:?} was not hit"
        );
        // Ten pieces: the first alone, the rest from windows (the faulted one, a direct
        // read of the piece it broke, a new window), not a request each.
        let requests = bed.proxy.requests() - requests_before;
        assert!(
            requests < 8,
            "{fault:?}: {requests} requests for 10 sequential pieces"
        );
    }
}

#[tokio::test]
async fn streamed_ranges_arrive_whole_or_end_in_an_error() {
    let bed = bed().await;
    let blob = bed
        .client
        .blob(&bed.repo, &bed.digest, bed.data.len() as u64);
    let range = 1000..401_000u64;
    let collect = |blob: lazysnap::registry::RemoteBlob, range: std::ops::Range<u64>| async move {
        let mut stream = blob.read_stream(range).await?;
        let mut got = Vec::new();
        while let Some(piece) = futures::StreamExt::next(&mut stream).await {
            got.extend_from_slice(&piece?);
        }
        Ok::<_, BlobError>(got)
    };
    let got = collect(blob.clone(), range.clone()).await.unwrap();
    assert_eq!(&got[..], &bed.data[1000..401_000]);
    // A body broken off or cut short ends the stream with an error, never a short success.
    for fault in [Fault::ResetMidBody, Fault::TruncateBody] {
        let before = bed.proxy.faults_injected();
        bed.proxy.inject(BLOBS, fault.clone());
        let got = collect(blob.clone(), range.clone()).await;
        assert!(
            got.is_err(),
            "{fault:?}: {} bytes",
            got.map_or(0, |g| g.len())
        );
        assert_eq!(
            bed.proxy.faults_injected(),
            before + 1,
            "{fault:?} was not hit"
        );
    }
}

#[tokio::test]
async fn persistent_5xx_is_unavailable() {
    let bed = bed().await;
    // 404 is NotFound at once, not retried.
    let requests = bed.proxy.requests();
    let missing = bed.client.blob(&bed.repo, &sha256_digest(b"missing"), 10);
    let err = missing.read_range(0..10).await.unwrap_err();
    assert!(matches!(err, BlobError::NotFound(_)), "{err:?}");
    assert_eq!(bed.proxy.requests(), requests + 1);
    for _ in 0..10 {
        bed.proxy.inject(BLOBS, Fault::Status(503));
    }
    let err = bed.read(0..100).await.unwrap_err();
    assert!(matches!(err, BlobError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn persistent_wrong_content_range_is_corrupt() {
    let bed = bed().await;
    for _ in 0..10 {
        bed.proxy.inject(BLOBS, Fault::WrongContentRange);
    }
    let err = bed.read(0..100).await.unwrap_err();
    assert!(matches!(err, BlobError::Corrupt(_)), "{err:?}");
}

#[tokio::test]
async fn persistent_stalls_are_unavailable_within_the_deadline() {
    let bed = bed().await;
    for _ in 0..10 {
        bed.proxy
            .inject(BLOBS, Fault::Stall(Duration::from_secs(2)));
    }
    let err = bed.read(0..100).await.unwrap_err();
    assert!(matches!(err, BlobError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn retry_after_beyond_the_deadline_fails_fast() {
    let bed = bed().await;
    bed.proxy.inject(
        BLOBS,
        Fault::TooManyRequests {
            retry_after_secs: 3600,
        },
    );
    let err = bed.read(0..100).await.unwrap_err();
    assert!(matches!(err, BlobError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn corrupt_bodies_never_pass_digest_checks() {
    let bed = bed().await;
    for _ in 0..10 {
        bed.proxy.inject(BLOBS, Fault::CorruptBody);
    }
    let err = bed
        .client
        .get_blob(&bed.repo, &bed.digest)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Corrupt(_)), "{err:?}");
    // Streamed: the corruption is reported at the end, never a clean EOF.
    let bed = self::bed().await;
    bed.proxy.inject(BLOBS, Fault::CorruptBody);
    let mut reader = bed
        .client
        .blob_reader(&bed.repo, &bed.digest)
        .await
        .unwrap();
    let mut out = Vec::new();
    let err = reader.read_to_end(&mut out).await.unwrap_err();
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<RegistryError>());
    assert!(matches!(inner, Some(RegistryError::Corrupt(_))), "{err:?}");
}

#[tokio::test]
async fn streamed_blob_resumes_after_reset() {
    let bed = bed().await;
    bed.proxy.inject(BLOBS, Fault::ResetMidBody);
    let mut reader = bed
        .client
        .blob_reader(&bed.repo, &bed.digest)
        .await
        .unwrap();
    let mut out = Vec::new();
    reader.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, bed.data);
    assert_eq!(bed.proxy.faults_injected(), 1);
}

#[tokio::test]
async fn redirects_are_remembered_and_re_resolved_when_expired() {
    let bed = bed().await;
    bed.proxy.redirect_blobs(true);
    bed.expect(bed.read(0..4096).await, 0..4096);
    assert_eq!(bed.proxy.redirects_issued(), 1);
    let blob = bed
        .client
        .blob(&bed.repo, &bed.digest, bed.data.len() as u64);
    // Clones share the remembered target: no new redirect.
    let first = blob.clone();
    first.read_range(0..10).await.unwrap();
    let issued = bed.proxy.redirects_issued();
    blob.read_range(4096..8192).await.unwrap();
    blob.read_range(8192..9000).await.unwrap();
    assert_eq!(
        bed.proxy.redirects_issued(),
        issued,
        "redirect target must be reused"
    );
    // The signed URL expires (403): re-resolve through the registry, data still correct.
    bed.proxy.expire_redirects();
    let got = blob.read_range(100_000..100_500).await.unwrap();
    assert_eq!(&got[..], &bed.data[100_000..100_500]);
    assert_eq!(bed.proxy.redirects_refused(), 1);
    assert_eq!(bed.proxy.redirects_issued(), issued + 1);
}

#[tokio::test]
async fn multi_range_rejection_falls_back_to_single_ranges_and_is_remembered() {
    let bed = bed().await;
    bed.proxy.ignore_multi_range(true);
    let blob = bed
        .client
        .blob(&bed.repo, &bed.digest, bed.data.len() as u64);
    let ranges = vec![0..100, 1000..1100, 500_000..500_100];
    let parts = blob.read_ranges(ranges.clone()).await.unwrap();
    for (r, p) in ranges.iter().zip(&parts) {
        assert_eq!(&p[..], &bed.data[r.start as usize..r.end as usize]);
    }
    assert_eq!(bed.proxy.multi_range_requests(), 1);
    let parts = blob.read_ranges(ranges.clone()).await.unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(
        bed.proxy.multi_range_requests(),
        1,
        "fallback must be remembered"
    );
}
