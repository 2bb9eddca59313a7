//! The metrics endpoint: the registry encoded in the Prometheus text format and served over
//! plain HTTP (`/metrics`), with the probes of an orchestrator: `/livez` (the process answers)
//! and `/healthz` (the snapshotter serves: 503 while starting or stopping).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::METRICS;

pub(super) static ENCODE_LOCK: Mutex<()> = Mutex::new(());

/// Whether the snapshotter serves containerd (what `/healthz` reports).
static SERVING: AtomicBool = AtomicBool::new(false);

/// Tells `/healthz` whether the snapshotter serves (set once its socket answers and its remote
/// layers are mounted again; cleared when it stops).
pub fn set_serving(serving: bool) {
    SERVING.store(serving, Ordering::Relaxed);
}

/// All metrics in the Prometheus text exposition format (OpenMetrics flavour).
pub fn encode() -> String {
    let _serialized = ENCODE_LOCK.lock();
    METRICS.process.refresh();
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry);
    out
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listening socket could not be opened.
    #[error("cannot listen for metrics on {addr}: {source} (pick a free loopback port for metrics_address in the config)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Serves `GET /metrics` on `addr` until the future is dropped. Meant for a loopback address;
/// a non-loopback address is served too but logged as a warning.
pub async fn serve(addr: SocketAddr) -> Result<(), MetricsError> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics endpoint listens on a non-loopback address");
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    serve_listener(listener).await;
    Ok(())
}

/// Serves `GET /metrics` on an already bound listener until the future is dropped.
pub async fn serve_listener(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = answer(stream).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers one HTTP/1.x request and closes the connection.
pub(super) async fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Read until the end of the request head, bounded in size and time.
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
            if request.windows(4).any(|w| w == b"\r\n\r\n") || request.len() > 16 * 1024 {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(head, Ok(Ok(()))) {
        return Ok(());
    }
    let first_line = request
        .split(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default();
    let mut parts = first_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics" | "/") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            encode(),
        ),
        ("GET", "/livez") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/healthz") if SERVING.load(Ordering::Relaxed) => {
            ("200 OK", "text/plain", "ok\n".to_string())
        }
        ("GET", "/healthz") => (
            "503 Service Unavailable",
            "text/plain",
            "the snapshotter is not serving (starting or stopping)\n".to_string(),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "GET /metrics, /healthz or /livez\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
