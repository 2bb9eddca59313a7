//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1 in front of a registry: scripted faults
//! (resets mid-body, 5xx, 429 with `Retry-After`, stalls, truncated bodies, wrong
//! `Content-Range`) for requests whose path matches, and optional redirects of blob GETs to
//! proxy-signed URLs that can be expired on demand. Counters let tests assert what happened.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lazysnap::rig::RigError;

/// One scripted misbehaviour, applied to the next request whose path matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Send the headers and half the body, then reset the connection (RST).
    ResetMidBody,
    /// Answer with this status and an empty body instead of forwarding.
    Status(u16),
    /// Answer 429 with `Retry-After: <secs>`.
    TooManyRequests { retry_after_secs: u64 },
    /// Hold the request this long, then close the connection without answering.
    Stall(Duration),
    /// Send the original headers (full `Content-Length`) but half the body, then close.
    TruncateBody,
    /// Shift the `Content-Range` one byte forward (same length, wrong bytes claimed).
    WrongContentRange,
    /// Flip one byte in the middle of the body.
    CorruptBody,
    /// Hold the request this long, then forward it normally.
    Delay(Duration),
    /// Answer with other content than asked for, as a registry serving the wrong blob would:
    /// the original headers and length, the body reversed.
    OtherContent,
}

/// What the proxy saw, in order: a request arriving and its answer sent, by request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyEvent {
    Arrived(String),
    Answered(String),
}

#[derive(Default)]
struct ProxyState {
    faults: Mutex<VecDeque<(String, Fault)>>,
    down_until: Mutex<Option<Instant>>,
    redirect_blobs: AtomicBool,
    ignore_multi_range: AtomicBool,
    multi_range_requests: AtomicUsize,
    generation: AtomicU64,
    requests: AtomicUsize,
    faults_injected: AtomicUsize,
    redirects_issued: AtomicUsize,
    redirects_refused: AtomicUsize,
    events: Mutex<Vec<ProxyEvent>>,
}

impl ProxyState {
    fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }

    fn record(&self, event: ProxyEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }
}

/// A running fault proxy; stopped on drop.
pub struct FaultProxy {
    port: u16,
    state: Arc<ProxyState>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy forwarding to `upstream` (`127.0.0.1:<port>`).
    pub fn start(upstream: &str) -> Result<Self, RigError> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(RigError::io("binding the fault proxy"))?;
        let port = listener
            .local_addr()
            .map_err(RigError::io("fault proxy address"))?
            .port();
        let state = Arc::new(ProxyState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_string();
        let (thread_state, thread_stop) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    if thread_state.is_down() {
                        reset(stream);
                        continue;
                    }
                    let state = thread_state.clone();
                    let upstream = upstream.clone();
                    std::thread::spawn(move || serve_connection(stream, &upstream, port, &state));
                }
            }
        });
        Ok(Self {
            port,
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:<port>`: use it as the registry host in references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Queues `fault` for the next request whose path contains `path_contains`.
    pub fn inject(&self, path_contains: &str, fault: Fault) {
        self.lock_faults()
            .push_back((path_contains.to_string(), fault));
    }

    /// Faults still queued (not yet triggered).
    pub fn pending_faults(&self) -> usize {
        self.lock_faults().len()
    }

    fn lock_faults(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, Fault)>> {
        self.state.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the registry down for `period`: every connection and request is reset at once, as
    /// a crashed or unreachable registry looks to a client. It comes back by itself.
    pub fn go_down_for(&self, period: Duration) {
        *self
            .state
            .down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + period);
    }

    /// Answer blob GETs with 307 to a proxy URL valid until [`Self::expire_redirects`].
    pub fn redirect_blobs(&self, on: bool) {
        self.state.redirect_blobs.store(on, Ordering::SeqCst);
    }

    /// Makes every redirect URL issued so far answer 403 (as an expired signed URL does).
    pub fn expire_redirects(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Behave like a server without multi-range support: a `Range` with several ranges is
    /// dropped and the whole blob answered with 200.
    pub fn ignore_multi_range(&self, on: bool) {
        self.state.ignore_multi_range.store(on, Ordering::SeqCst);
    }

    /// Requests that asked for several ranges at once.
    pub fn multi_range_requests(&self) -> usize {
        self.state.multi_range_requests.load(Ordering::SeqCst)
    }

    /// Requests arriving and answers sent so far, in order.
    pub fn events(&self) -> Vec<ProxyEvent> {
        self.state
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests received.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Faults applied.
    pub fn faults_injected(&self) -> usize {
        self.state.faults_injected.load(Ordering::SeqCst)
    }

    /// Redirects answered.
    pub fn redirects_issued(&self) -> usize {
        self.state.redirects_issued.load(Ordering::SeqCst)
    }

    /// Requests to expired redirect URLs (answered 403).
    pub fn redirects_refused(&self) -> usize {
        self.state.redirects_refused.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_simple(stream: &mut TcpStream, status: &str, extra_headers: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\n{extra_headers}\r\n"
    )?;
    stream.flush()
}

fn reset(stream: TcpStream) {
    let linger = nix::sys::socket::sockopt::Linger;
    let _ = nix::sys::socket::setsockopt(
        &stream,
        linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    drop(stream);
}

fn serve_connection(stream: TcpStream, upstream: &str, port: u16, state: &ProxyState) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut stream = stream;
    loop {
        // Request head.
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut headers: Vec<(String, String)> = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let content_length: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if state.is_down() {
            reset(stream);
            return;
        }
        state.requests.fetch_add(1, Ordering::SeqCst);
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("GET").to_string();
        let mut target = parts.next().unwrap_or("/").to_string();
        state.record(ProxyEvent::Arrived(target.clone()));

        if let Some(rest) = target.strip_prefix("/_redirect/") {
            let (generation, original) = rest.split_once('/').unwrap_or(("", ""));
            if generation.parse::<u64>().ok() != Some(state.generation.load(Ordering::SeqCst)) {
                state.redirects_refused.fetch_add(1, Ordering::SeqCst);
                if write_simple(&mut stream, "403 Forbidden", "").is_err() {
                    return;
                }
                continue;
            }
            target = format!("/{original}");
        } else if method == "GET"
            && target.contains("/blobs/sha256:")
            && state.redirect_blobs.load(Ordering::SeqCst)
        {
            state.redirects_issued.fetch_add(1, Ordering::SeqCst);
            let location = format!(
                "Location: http://127.0.0.1:{port}/_redirect/{}{target}\r\n",
                state.generation.load(Ordering::SeqCst)
            );
            if write_simple(&mut stream, "307 Temporary Redirect", &location).is_err() {
                return;
            }
            continue;
        }

        let fault = {
            let mut faults = state.faults.lock().unwrap_or_else(|p| p.into_inner());
            let index = faults.iter().position(|(m, _)| target.contains(m.as_str()));
            index.and_then(|i| faults.remove(i)).map(|(_, f)| f)
        };
        if fault.is_some() {
            state.faults_injected.fetch_add(1, Ordering::SeqCst);
        }
        match &fault {
            Some(Fault::Status(code)) => {
                if write_simple(&mut stream, &format!("{code} Injected"), "").is_err() {
                    return;
                }
                continue;
            }
            Some(Fault::TooManyRequests { retry_after_secs }) => {
                let extra = format!("Retry-After: {retry_after_secs}\r\n");
                if write_simple(&mut stream, "429 Too Many Requests", &extra).is_err() {
                    return;
                }
                continue;
            }
            Some(Fault::Stall(duration)) => {
                std::thread::sleep(*duration);
                return;
            }
            Some(Fault::Delay(duration)) => std::thread::sleep(*duration),
            _ => {}
        }

        // Forward, one upstream connection per request.
        let Ok(mut up) = TcpStream::connect(upstream) else {
            let _ = write_simple(&mut stream, "502 Bad Gateway", "");
            return;
        };
        let multi_range = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("range") && v.contains(','));
        if multi_range {
            state.multi_range_requests.fetch_add(1, Ordering::SeqCst);
        }
        let drop_range = multi_range && state.ignore_multi_range.load(Ordering::SeqCst);
        let mut forwarded = format!("{method} {target} HTTP/1.1\r\n");
        for (k, v) in &headers {
            if drop_range && k.eq_ignore_ascii_case("range") {
                continue;
            }
            if !k.eq_ignore_ascii_case("connection") && !k.eq_ignore_ascii_case("keep-alive") {
                forwarded.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        forwarded.push_str("Connection: close\r\n\r\n");
        let mut response = Vec::new();
        if up.write_all(forwarded.as_bytes()).is_err()
            || up.write_all(&body).is_err()
            || up.read_to_end(&mut response).is_err()
        {
            let _ = write_simple(&mut stream, "502 Bad Gateway", "");
            return;
        }
        let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            let _ = write_simple(&mut stream, "502 Bad Gateway", "");
            return;
        };
        let head_text = String::from_utf8_lossy(&response[..split]).into_owned();
        let mut response_body = response[split + 4..].to_vec();
        match fault {
            Some(Fault::CorruptBody) => {
                let middle = response_body.len() / 2;
                if let Some(b) = response_body.get_mut(middle) {
                    *b ^= 0x5a;
                }
            }
            Some(Fault::OtherContent) => response_body.reverse(),
            _ => {}
        }
        let mut head = String::new();
        for (i, line) in head_text.split("\r\n").enumerate() {
            if i > 0 {
                if let Some((k, v)) = line.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("connection") {
                        continue;
                    }
                    if k.trim().eq_ignore_ascii_case("content-range")
                        && fault == Some(Fault::WrongContentRange)
                    {
                        head.push_str(&format!("Content-Range: {}\r\n", shift_range(v.trim())));
                        continue;
                    }
                }
            }
            head.push_str(line);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let half = response_body.len() / 2;
        let sent = match fault {
            Some(Fault::ResetMidBody) => {
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&response_body[..half]);
                let _ = stream.flush();
                std::thread::sleep(Duration::from_millis(20));
                reset(stream);
                return;
            }
            Some(Fault::TruncateBody) => {
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&response_body[..half]);
                let _ = stream.flush();
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            _ => stream
                .write_all(head.as_bytes())
                .and_then(|()| stream.write_all(&response_body))
                .and_then(|()| stream.flush()),
        };
        if sent.is_err() {
            return;
        }
        state.record(ProxyEvent::Answered(target));
    }
}

/// `bytes a-b/t` → `bytes a+1-b+1/t`.
fn shift_range(value: &str) -> String {
    let parsed = value
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .and_then(|(span, total)| {
            let (a, b) = span.split_once('-')?;
            Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?, total))
        });
    match parsed {
        Some((a, b, total)) => format!("bytes {}-{}/{total}", a + 1, b + 1),
        None => value.to_string(),
    }
}
