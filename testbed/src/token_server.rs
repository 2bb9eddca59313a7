//! A small Bearer token service on 127.0.0.1 for the registry's `auth.token` mode: checks
//! Basic credentials, grants the requested repository scopes, and signs RS256 JWTs (with an
//! `x5c` certificate chain the registry trusts through `rootcertbundle`) using the `openssl`
//! command. Counts the tokens it issued so tests can assert caching and refresh.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

use lazysnap::rig::RigError;

const OPENSSL: &str = "/usr/bin/openssl";
const ISSUER: &str = "lazysnap-test-issuer";
const SERVICE: &str = "lazysnap-test-registry";

/// How the token service behaves.
#[derive(Debug, Clone)]
pub struct TokenServerOptions {
    /// Accounts (user, password); requests with other Basic credentials get 401.
    pub users: Vec<(String, String)>,
    /// Lifetime of issued tokens in seconds (`expires_in`).
    pub expires_in: u64,
    /// Grant `pull` to requests without credentials.
    pub anonymous_pull: bool,
}

impl Default for TokenServerOptions {
    fn default() -> Self {
        Self {
            users: Vec::new(),
            expires_in: 300,
            anonymous_pull: false,
        }
    }
}

/// A running token service; stopped on drop.
pub struct TokenServer {
    port: u16,
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    options: TokenServerOptions,
    key: PathBuf,
    cert_der: Vec<u8>,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl TokenServer {
    /// Generates a key and certificate, and starts serving `/token` on a free port.
    pub fn start(options: TokenServerOptions) -> Result<Self, RigError> {
        lazysnap::rig::require_program(OPENSSL, "openssl")?;
        let dir = tempfile::Builder::new()
            .prefix("lazysnap-token-")
            .tempdir()
            .map_err(RigError::io("creating the token server dir"))?;
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let der = dir.path().join("cert.der");
        run_openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=lazysnap-test-token",
            "-keyout",
            &key.to_string_lossy(),
            "-out",
            &cert.to_string_lossy(),
        ])?;
        run_openssl(&[
            "x509",
            "-in",
            &cert.to_string_lossy(),
            "-outform",
            "DER",
            "-out",
            &der.to_string_lossy(),
        ])?;
        let cert_der = std::fs::read(&der).map_err(RigError::io("reading cert.der"))?;
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(RigError::io("binding the token server"))?;
        let port = listener
            .local_addr()
            .map_err(RigError::io("token server address"))?
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            options,
            key,
            cert_der,
            issued: issued.clone(),
            refused: refused.clone(),
        });
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop_flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let shared = shared.clone();
                    std::thread::spawn(move || handle(stream, &shared));
                }
            }
        });
        Ok(Self {
            port,
            dir,
            stop,
            issued,
            refused,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>/token`.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The `auth.token` YAML section for [`lazysnap::rig::RegistryOptions::extra_config`].
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm(),
            self.dir.path().join("cert.pem").display()
        )
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    /// Token requests refused (bad or missing credentials).
    pub fn requests_refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_openssl(args: &[&str]) -> Result<(), RigError> {
    let out = Command::new(OPENSSL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(RigError::io("running openssl"))?;
    if !out.status.success() {
        return Err(RigError::Start {
            what: "openssl".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(stream: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
}

fn handle(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 << 10 {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let target = request_line.split(' ').nth(1).unwrap_or("");
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_string());
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut scopes = Vec::new();
    let mut service = String::new();
    for pair in query.split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            match k {
                "scope" => scopes.push(percent_decode(v)),
                "service" => service = percent_decode(v),
                _ => {}
            }
        }
    }
    let account = match authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Basic "))
    {
        Some(encoded) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .unwrap_or_default();
            let ok = shared
                .options
                .users
                .iter()
                .any(|(u, p)| decoded == format!("{u}:{p}"));
            if !ok {
                shared.refused.fetch_add(1, Ordering::SeqCst);
                respond(
                    &mut stream,
                    "401 Unauthorized",
                    "",
                    r#"{"details":"bad credentials"}"#,
                );
                return;
            }
            decoded.split(':').next().unwrap_or("").to_string()
        }
        None if shared.options.anonymous_pull => String::new(),
        None => {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            respond(
                &mut stream,
                "401 Unauthorized",
                "",
                r#"{"details":"credentials required"}"#,
            );
            return;
        }
    };
    let mut access = Vec::new();
    for scope in scopes.iter().flat_map(|s| s.split(' ')) {
        let mut parts = scope.splitn(3, ':');
        let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let actions: Vec<&str> = actions
            .split(',')
            .filter(|a| !account.is_empty() || *a == "pull")
            .collect();
        access.push(serde_json::json!({"type": kind, "name": name, "actions": actions}));
    }
    if service != SERVICE {
        respond(
            &mut stream,
            "400 Bad Request",
            "",
            r#"{"details":"unknown service"}"#,
        );
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let n = shared.issued.fetch_add(1, Ordering::SeqCst);
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "RS256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(&shared.cert_der)],
    });
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": account,
        "aud": SERVICE,
        "exp": now + shared.options.expires_in,
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": format!("lazysnap-{now}-{n}"),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = Command::new(OPENSSL)
        .args(["dgst", "-sha256", "-sign"])
        .arg(&shared.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(signing_input.as_bytes())?;
            }
            child.wait_with_output()
        });
    let signature = match signature {
        Ok(out) if out.status.success() => out.stdout,
        _ => {
            respond(
                &mut stream,
                "500 Internal Server Error",
                "",
                r#"{"details":"signing failed"}"#,
            );
            return;
        }
    };
    let token = format!("{signing_input}.{}", b64url(&signature));
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": shared.options.expires_in,
    })
    .to_string();
    respond(&mut stream, "200 OK", "", &body);
}
