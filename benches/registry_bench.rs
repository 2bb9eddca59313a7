//! Registry client throughput and latency on loopback against the real registry:
//! sequential 1 MiB ranged reads of a 200 MB blob vs one `curl` download of it, and p50/p99 of
//! 4 KiB random ranged reads over warm connections. Run: `cargo bench --bench registry_bench`.

use std::process::Command;
use std::time::{Duration, Instant};

use lazysnap::registry::{sha256_digest, Client, ClientConfig, Reference};
use lazysnap::testbed::RegistryServer;

const BLOB_SIZE: u64 = 200 * 1000 * 1000;
const SEQ_CHUNK: u64 = 1 << 20;
const RANDOM_READ: u64 = 4096;
const RANDOM_READS: usize = 5000;

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn curl_download(url: &str) -> Option<Duration> {
    let out = Command::new("curl")
        .args(["-s", "-f", "-o", "/dev/null", "-w", "%{time_total}", url])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(Duration::from_secs_f64(secs))
}

/// Times one curl process fetching `ranges` of `url` in order over one kept-alive connection.
fn curl_ranges(dir: &std::path::Path, url: &str, ranges: &[(u64, u64)]) -> Option<Duration> {
    let mut config = String::new();
    for (i, (start, end)) in ranges.iter().enumerate() {
        if i > 0 {
            config.push_str("next\n");
        }
        config.push_str(&format!(
            "url = \"{url}\"\nrange = \"{start}-{}\"\noutput = \"/dev/null\"\nsilent\n",
            end - 1
        ));
    }
    let path = dir.join("curl-ranges.cfg");
    std::fs::write(&path, config).ok()?;
    let start = Instant::now();
    let status = Command::new("curl").arg("-K").arg(&path).status().ok()?;
    status.success().then(|| start.elapsed())
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    let client = Client::new(ClientConfig::default()).expect("client");
    let repo = Reference::parse(&format!("{}/bench/blob:v1", registry.host())).expect("ref");

    let mut data = vec![0u8; BLOB_SIZE as usize];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let digest = sha256_digest(&data);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("blob");
    std::fs::write(&path, &data).expect("write blob");
    drop(data);
    let start = Instant::now();
    client
        .push_blob_file(&repo, &digest, &path)
        .await
        .expect("push");
    println!(
        "push of {} MB (streamed from file): {:.0} MB/s",
        BLOB_SIZE / 1_000_000,
        mb_per_s(BLOB_SIZE, start.elapsed())
    );
    let url = format!("{}/v2/bench/blob/blobs/{digest}", registry.url());

    // Warm the registry's page cache, then take the best of 3 curl runs.
    let _ = curl_download(&url);
    let curl_best = (0..3)
        .filter_map(|_| curl_download(&url))
        .min()
        .expect("curl must be installed and download the blob");
    let curl_rate = mb_per_s(BLOB_SIZE, curl_best);
    println!("curl full download: {curl_best:.2?} = {curl_rate:.0} MB/s");

    // The registry's own per-request cost: curl doing the same 1 MiB ranged requests.
    let seq_ranges: Vec<(u64, u64)> = (0..BLOB_SIZE.div_ceil(SEQ_CHUNK))
        .map(|i| (i * SEQ_CHUNK, ((i + 1) * SEQ_CHUNK).min(BLOB_SIZE)))
        .collect();
    if let Some(t) = (0..3)
        .filter_map(|_| curl_ranges(dir.path(), &url, &seq_ranges))
        .min()
    {
        println!(
            "curl sequential 1 MiB ranged requests (one connection): {t:.2?} = {:.0} MB/s",
            mb_per_s(BLOB_SIZE, t)
        );
    }

    let blob = client.blob(&repo, &digest, BLOB_SIZE);
    let mut best_seq = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut offset = 0;
        while offset < BLOB_SIZE {
            let end = (offset + SEQ_CHUNK).min(BLOB_SIZE);
            let got = blob.read(offset..end).await.expect("sequential read");
            assert_eq!(got.len() as u64, end - offset);
            offset = end;
        }
        best_seq = best_seq.min(start.elapsed());
    }
    let seq_rate = mb_per_s(BLOB_SIZE, best_seq);
    println!(
        "sequential 1 MiB ranged reads: {best_seq:.2?} = {seq_rate:.0} MB/s ({:.2}x curl)",
        seq_rate / curl_rate
    );

    // The same with the opt-in sequential read-ahead (4 pieces ahead).
    let ahead_client = Client::new(ClientConfig {
        sequential_readahead: 4,
        ..ClientConfig::default()
    })
    .expect("client");
    let ahead_blob = ahead_client.blob(&repo, &digest, BLOB_SIZE);
    let mut best_ahead = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut offset = 0;
        while offset < BLOB_SIZE {
            let end = (offset + SEQ_CHUNK).min(BLOB_SIZE);
            let got = ahead_blob.read(offset..end).await.expect("sequential read");
            assert_eq!(got.len() as u64, end - offset);
            offset = end;
        }
        best_ahead = best_ahead.min(start.elapsed());
    }
    let ahead_rate = mb_per_s(BLOB_SIZE, best_ahead);
    println!(
        "sequential 1 MiB ranged reads, read-ahead 4: {best_ahead:.2?} = {ahead_rate:.0} MB/s ({:.2}x curl)",
        ahead_rate / curl_rate
    );

    // 4 KiB random reads, warm connection.
    let mut rng: u64 = 12345;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..200 {
        let off = next() % (BLOB_SIZE - RANDOM_READ);
        blob.read(off..off + RANDOM_READ)
            .await
            .expect("warm-up read");
    }
    let mut latencies = Vec::with_capacity(RANDOM_READS);
    for _ in 0..RANDOM_READS {
        let off = next() % (BLOB_SIZE - RANDOM_READ);
        let start = Instant::now();
        let got = blob
            .read(off..off + RANDOM_READ)
            .await
            .expect("random read");
        latencies.push(start.elapsed());
        assert_eq!(got.len() as u64, RANDOM_READ);
    }
    latencies.sort();
    let random_ranges: Vec<(u64, u64)> = (0..1000)
        .map(|_| {
            let off = next() % (BLOB_SIZE - RANDOM_READ);
            (off, off + RANDOM_READ)
        })
        .collect();
    if let Some(t) = curl_ranges(dir.path(), &url, &random_ranges) {
        println!(
            "curl 1000 random 4 KiB ranged requests (one connection): mean {:.3} ms",
            t.as_secs_f64() * 1e3 / 1000.0
        );
    }
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "4 KiB random ranged reads ({RANDOM_READS}): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
}
