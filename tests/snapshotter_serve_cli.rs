//! `lazysnap serve` as users run it: config keys it rejects are named, the config's root and
//! address are used, the metrics endpoint answers on the configured loopback port, a second server
//! on a live socket is refused, SIGTERM stops it cleanly, and systemd hears READY=1 once the socket
//! answers and STOPPING=1 on the way out.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn lazysnap() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazysnap"))
}

/// serve creates its socket with mode 0660 under a root-owned dir: those tests need root.
fn require_root_for_the_socket() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "serve creates its socket with mode 0660 under a root-owned dir: run as root"
    );
}

/// Whether a server accepts connections on `socket` within 30 s.
fn listens_within_30s(socket: &std::path::Path) -> bool {
    for _ in 0..300 {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn unknown_config_key_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[fetch]\nprefetch = true\nbandwith = 5\n").unwrap();
    let out = lazysnap()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bandwith"), "{stderr}");
    assert!(stderr.contains("config.toml"), "{stderr}");
}

#[test]
fn version_names_the_commit_and_date_built() {
    let out = lazysnap().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let (commit, date) = text
        .trim()
        .strip_prefix(&format!("lazysnap {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|rest| rest.split_once(", built "))
        .unwrap_or_else(|| panic!("unexpected --version output: {text}"));
    let parts: Vec<&str> = date.split('-').collect();
    assert!(
        parts.len() == 3 && date.len() == 10 && date.starts_with("20"),
        "build date {date:?} in {text}"
    );
    let hex = commit.trim_end_matches("-dirty");
    assert!(
        commit == "unknown" || (hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit())),
        "{text}"
    );
}

#[test]
fn serve_uses_config_refuses_a_live_socket_and_stops_on_sigterm() {
    require_root_for_the_socket();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    let socket = dir.path().join("run/lazysnap.sock");
    let config = dir.path().join("config.toml");
    let metrics_port = lazysnap_testbed::free_port().unwrap();
    std::fs::write(
        &config,
        format!(
            "root = \"{}\"\naddress = \"{}\"\nmetrics_address = \"127.0.0.1:{metrics_port}\"\n",
            root.display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut server = lazysnap()
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if !listens_within_30s(&socket) {
        let _ = server.kill();
        panic!("lazysnap serve did not listen on {}", socket.display());
    }
    assert!(root.join("metadata.db").is_file());
    let metrics = Command::new("curl")
        .args(["-sSfi"])
        .arg(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .output()
        .unwrap();
    assert!(metrics.status.success(), "metrics endpoint answers");
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(metrics.contains("# EOF"));
    assert!(
        metrics.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{metrics}"
    );
    // Bounded label sets are there from the start, and the process metrics.
    for family in [
        "lazysnap_fallbacks_total{reason=\"no_labels\"} 0",
        "lazysnap_fetch_errors_total{reason=\"unavailable\"} 0",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_cpu_seconds_total ",
    ] {
        assert!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    // The probes a DaemonSet uses: serving (readiness) and answering (liveness).
    for probe in ["healthz", "livez"] {
        let answer = Command::new("curl")
            .args(["-sSf"])
            .arg(format!("http://127.0.0.1:{metrics_port}/{probe}"))
            .output()
            .unwrap();
        assert!(
            answer.status.success(),
            "/{probe} answers 200 while serving"
        );
        assert_eq!(String::from_utf8_lossy(&answer.stdout), "ok\n");
    }
    // Which build is running, from the start.
    assert!(
        metrics.contains(&format!(
            "lazysnap_build_info{{version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );

    let second = lazysnap()
        .args(["serve", "--root"])
        .arg(dir.path().join("other"))
        .arg("--address")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another server is listening"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // A second serve on the same root (another socket) is refused naming the root.
    let same_root = lazysnap()
        .args(["serve", "--root"])
        .arg(&root)
        .arg("--address")
        .arg(dir.path().join("run/second.sock"))
        .output()
        .unwrap();
    assert!(!same_root.status.success());
    let err = String::from_utf8_lossy(&same_root.stderr);
    assert!(
        err.contains(root.to_str().unwrap()) && err.contains("another lazysnap serve"),
        "{err}"
    );
    // status reads the running serve through its control socket.
    let status = lazysnap()
        .args(["status", "--json", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["serve"]["layers"], serde_json::json!([]), "{status}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(server.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = server.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(!socket.exists());
}

/// Puts a configuration at /etc/lazysnap/config.toml for a test, restoring what was there.
struct DefaultConfig {
    backup: Option<Vec<u8>>,
    created_dir: bool,
}

impl DefaultConfig {
    const PATH: &'static str = "/etc/lazysnap/config.toml";

    fn write(text: &str) -> DefaultConfig {
        let dir = std::path::Path::new(Self::PATH).parent().unwrap();
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir).unwrap();
        let backup = std::fs::read(Self::PATH).ok();
        std::fs::write(Self::PATH, text).unwrap();
        DefaultConfig {
            backup,
            created_dir,
        }
    }
}

impl Drop for DefaultConfig {
    fn drop(&mut self) {
        match &self.backup {
            Some(old) => {
                let _ = std::fs::write(Self::PATH, old);
            }
            None => {
                let _ = std::fs::remove_file(Self::PATH);
                if self.created_dir {
                    let _ = std::fs::remove_dir("/etc/lazysnap");
                }
            }
        }
    }
}

#[test]
fn serve_reads_the_default_config_file_without_config() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test writes /etc/lazysnap/config.toml: run as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    let socket = dir.path().join("default.sock");
    let _config = DefaultConfig::write(&format!(
        "root = \"{}\"\naddress = \"{}\"\nlog_level = \"debug\"\n",
        root.display(),
        socket.display()
    ));
    let server = lazysnap()
        .arg("serve")
        .env_remove("LAZYSNAP_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let up = listens_within_30s(&socket);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(server.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = server.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        up,
        "serve did not listen on the default config's address:\n{log}"
    );
    assert!(log.contains("/etc/lazysnap/config.toml"), "{log}");
    assert!(
        log.contains("DEBUG"),
        "log_level = debug was not applied:\n{log}"
    );
}

/// The next datagram on `socket`, within 30 s; else `serve`'s log, after killing it.
fn next_notification(socket: &std::os::unix::net::UnixDatagram, server: &mut Child) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(len) => String::from_utf8_lossy(&buf[..len]).into_owned(),
        Err(e) => {
            let _ = server.kill();
            let mut log = String::new();
            if let Some(mut stderr) = server.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
            }
            panic!("no notification on $NOTIFY_SOCKET within 30 s ({e}); serve's log:\n{log}")
        }
    }
}

#[test]
fn serve_tells_systemd_it_is_ready_once_its_socket_answers_and_when_it_stops() {
    require_root_for_the_socket();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    let socket = dir.path().join("run/lazysnap.sock");
    // What systemd gives a Type=notify service: a datagram socket named in $NOTIFY_SOCKET.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let mut server = lazysnap()
        .args(["serve", "--root"])
        .arg(&root)
        .arg("--address")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = next_notification(&notify, &mut server);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.contains(&format!("STATUS=serving on {}", socket.display())),
        "{ready:?}"
    );
    // Ready means ready: the socket answers at once, no retry.
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "READY=1 came before {} accepted connections",
        socket.display()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopping = next_notification(&notify, &mut server);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(server.wait().unwrap().success());
}
