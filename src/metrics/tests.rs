//! Unit tests of the metrics: names, labels, exposition.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

#[test]
fn encode_names_every_family() {
    record_fetch(FetchKind::OnDemand, 10, Duration::from_millis(3));
    record_cache_hit(CacheTier::Memory);
    record_cache_miss();
    record_verify_failure("layer-x", "digest_mismatch");
    record_verify_failure("layer-x", "digest_mismatch");
    record_fallback("not_estargz");
    observe_fuse_op("read", Duration::from_micros(20));
    let text = encode();
    for needle in [
        "lazysnap_fetched_bytes_total{kind=\"on_demand\"}",
        "lazysnap_cache_hits_total{tier=\"memory\"}",
        "lazysnap_cache_misses_total",
        "lazysnap_chunk_verify_failures_total{layer=\"layer-x\",reason=\"digest_mismatch\"} 2",
        "lazysnap_fallbacks_total{reason=\"not_estargz\"}",
        "lazysnap_fuse_op_duration_seconds_bucket{",
        "lazysnap_fetch_duration_seconds_count{kind=\"on_demand\"}",
        "lazysnap_build_info{version=\"",
        "lazysnap_fetch_errors_total{reason=\"auth\"} 0",
        "lazysnap_fallbacks_total{reason=\"no_labels\"}",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_cpu_seconds_total ",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[tokio::test]
async fn endpoint_serves_metrics_over_http() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_listener(listener));
    record_fallback("endpoint_test");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains("lazysnap_fallbacks_total{reason=\"endpoint_test\"}"));
    server.abort();
}

#[tokio::test]
async fn healthz_says_whether_the_snapshotter_serves() {
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_listener(listener));
    crate::metrics::set_serving(false);
    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503"));
    assert!(get(addr, "/livez").await.starts_with("HTTP/1.1 200"));
    crate::metrics::set_serving(true);
    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    crate::metrics::set_serving(false);
    server.abort();
}
