//! Registry client throughput and latency on loopback against the real registry:
//! sequential 1 MiB ranged reads of a 200 MB blob vs one `curl` download of it, and p50/p99 of
//! 4 KiB random ranged reads over warm connections, against Distribution and against a minimal
//! in-memory range server (the client's own cost). Run: `cargo bench --bench registry_bench`.

use std::process::Command;
use std::time::{Duration, Instant};

use lazysnap::digest::sha256_digest;
use lazysnap::registry::{Client, ClientConfig, Reference, RemoteBlob};
use lazysnap_testbed::RegistryServer;

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
    let best_seq = best_sequential(&blob).await;
    let seq_rate = mb_per_s(BLOB_SIZE, best_seq);
    println!(
        "sequential 1 MiB ranged reads (streamed windows): {best_seq:.2?} = {seq_rate:.0} MB/s ({:.2}x curl)",
        seq_rate / curl_rate
    );
    let unstreamed = Client::new(ClientConfig {
        sequential_window: 0,
        ..ClientConfig::default()
    })
    .expect("client");
    let best_unstreamed = best_sequential(&unstreamed.blob(&repo, &digest, BLOB_SIZE)).await;
    let unstreamed_rate = mb_per_s(BLOB_SIZE, best_unstreamed);
    println!(
        "sequential 1 MiB ranged reads, a request each: {best_unstreamed:.2?} = {unstreamed_rate:.0} MB/s ({:.2}x curl)",
        unstreamed_rate / curl_rate
    );

    // 4 KiB random reads, warm connection: against Distribution, and against a minimal range
    // server that answers from memory (what is left is the client's own cost).
    let latencies = random_latencies(&blob).await;
    print_percentiles("4 KiB random ranged reads, Distribution", &latencies);
    let mut rng: u64 = 777;
    let random_ranges: Vec<(u64, u64)> = (0..1000)
        .map(|_| {
            let off = xorshift(&mut rng) % (BLOB_SIZE - RANDOM_READ);
            (off, off + RANDOM_READ)
        })
        .collect();
    if let Some(t) = curl_ranges(dir.path(), &url, &random_ranges) {
        println!(
            "curl 1000 random 4 KiB ranged requests to Distribution (one connection): mean {:.3} ms",
            t.as_secs_f64() * 1e3 / 1000.0
        );
    }
    let data = std::fs::read(&path).expect("read blob back");
    let server = range_server::start(data).await;
    let minimal = Reference::parse(&format!("{}/bench/blob:v1", server)).expect("ref");
    let latencies = random_latencies(&client.blob(&minimal, &digest, BLOB_SIZE)).await;
    print_percentiles(
        "4 KiB random ranged reads, minimal range server",
        &latencies,
    );
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Best of 3 passes of sequential 1 MiB reads over the whole blob.
async fn best_sequential(blob: &RemoteBlob) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut offset = 0;
        while offset < BLOB_SIZE {
            let end = (offset + SEQ_CHUNK).min(BLOB_SIZE);
            let got = blob.read(offset..end).await.expect("sequential read");
            assert_eq!(got.len() as u64, end - offset);
            offset = end;
        }
        best = best.min(start.elapsed());
    }
    best
}

/// Latencies of random 4 KiB reads after 200 warm-up reads, sorted.
async fn random_latencies(blob: &RemoteBlob) -> Vec<Duration> {
    let mut rng: u64 = 12345;
    for _ in 0..200 {
        let off = xorshift(&mut rng) % (BLOB_SIZE - RANDOM_READ);
        blob.read(off..off + RANDOM_READ)
            .await
            .expect("warm-up read");
    }
    let mut latencies = Vec::with_capacity(RANDOM_READS);
    for _ in 0..RANDOM_READS {
        let off = xorshift(&mut rng) % (BLOB_SIZE - RANDOM_READ);
        let start = Instant::now();
        let got = blob
            .read(off..off + RANDOM_READ)
            .await
            .expect("random read");
        latencies.push(start.elapsed());
        assert_eq!(got.len() as u64, RANDOM_READ);
    }
    latencies.sort();
    latencies
}

fn print_percentiles(what: &str, sorted: &[Duration]) {
    let pct = |p: f64| sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)];
    println!(
        "{what} ({}): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        sorted.len(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
}

/// An HTTP/1.1 server on 127.0.0.1 answering every `GET …/blobs/…` with `Range: bytes=a-b`
/// from memory, keep-alive: the floor a registry could offer, to isolate the client's cost.
mod range_server {
    use std::sync::Arc;

    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::TcpListener;

    /// Starts the server; returns its `127.0.0.1:port`.
    pub async fn start(data: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let data = Arc::new(data);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let _ = socket.set_nodelay(true);
                tokio::spawn(serve(socket, data.clone()));
            }
        });
        addr
    }

    async fn serve(socket: tokio::net::TcpStream, data: Arc<Vec<u8>>) {
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read);
        loop {
            let mut range = None;
            let mut line = String::new();
            loop {
                line.clear();
                match lines.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let trimmed = line.trim_end();
                if trimmed.is_empty() {
                    break;
                }
                if let Some(spec) = trimmed.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = spec.split_once('-').and_then(|(a, b)| {
                        Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
                    });
                }
            }
            let reply = match range {
                Some((start, end)) if start <= end && end < data.len() => {
                    let mut head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\n\r\n",
                        end - start + 1,
                        data.len()
                    )
                    .into_bytes();
                    head.extend_from_slice(&data[start..=end]);
                    head
                }
                _ => b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n".to_vec(),
            };
            if write.write_all(&reply).await.is_err() {
                return;
            }
        }
    }
}
