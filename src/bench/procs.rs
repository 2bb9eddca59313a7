//! Processes the bench starts and times: `lazysnap serve` as a guard that stops it and unmounts
//! what it left, commands run to completion under a deadline, and a container run timed until its
//! ready line appears on stdout. Every process is ended by its own pid, never by name.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::BenchError;

/// The daemon's socket and log, in its directory.
const SOCKET: &str = "snapshotter.sock";
const LOG: &str = "daemon.log";

/// A snapshotter daemon (`lazysnap serve`, or a peer's) with its own root (so its cache starts empty) and socket; on drop
/// it gets SIGTERM (SIGKILL after 10 s) and every mount under its directory is detached.
pub struct ServeProcess {
    child: Option<Child>,
    dir: PathBuf,
    what: &'static str,
}

impl ServeProcess {
    /// Starts `lazysnap_bin serve` with state in `dir` (created) and `config_toml` as its config
    /// file; waits until its socket accepts connections.
    pub fn start(lazysnap_bin: &Path, dir: &Path, config_toml: &str) -> Result<Self, BenchError> {
        std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml)
            .map_err(io_error(format!("writing {}", config.display())))?;
        let mut command = Command::new(lazysnap_bin);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--address")
            .arg(dir.join(SOCKET));
        Self::spawn(command, dir, "lazysnap serve")
    }

    /// Starts stargz-snapshotter's daemon (`containerd-stargz-grpc`, default settings) with its
    /// root in `dir` (created); waits until its socket accepts connections.
    pub fn start_stargz(stargz_bin: &Path, dir: &Path) -> Result<Self, BenchError> {
        std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let mut command = Command::new(stargz_bin);
        command
            .arg("--address")
            .arg(dir.join(SOCKET))
            .arg("--root")
            .arg(dir.join("root"))
            .args(["--log-level", "info"]);
        Self::spawn(command, dir, "containerd-stargz-grpc")
    }

    /// Starts SOCI's daemon (`soci-snapshotter-grpc`, default settings) with its root in `dir`
    /// (created), trusting `certificate` for the bench's HTTPS registry.
    pub fn start_soci(soci_bin: &Path, dir: &Path, certificate: &Path) -> Result<Self, BenchError> {
        std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            "# soci-snapshotter-grpc defaults (written by lazysnap bench)\n",
        )
        .map_err(io_error(format!("writing {}", config.display())))?;
        let mut command = Command::new(soci_bin);
        command
            .env("SSL_CERT_FILE", certificate)
            .arg("-address")
            .arg(dir.join(SOCKET))
            .arg("-root")
            .arg(dir.join("root"))
            .arg("-config")
            .arg(&config)
            .args(["-log-level", "info"]);
        Self::spawn(command, dir, "soci-snapshotter-grpc")
    }

    fn spawn(mut command: Command, dir: &Path, what: &'static str) -> Result<Self, BenchError> {
        let log = std::fs::File::create(dir.join(LOG))
            .map_err(io_error(format!("creating the {what} log")))?;
        let log_err = log
            .try_clone()
            .map_err(io_error(format!("duplicating the {what} log handle")))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_error(format!("spawning {what}")))?;
        let mut serve = Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            what,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(serve.socket()).is_ok() {
                return Ok(serve);
            }
            if let Some(Ok(Some(status))) = serve.child.as_mut().map(Child::try_wait) {
                return Err(BenchError::Step {
                    what: serve.what.into(),
                    detail: format!("exited with {status}; log:\n{}", tail(&serve.log(), 30)),
                });
            }
            if Instant::now() > deadline {
                return Err(BenchError::Step {
                    what: serve.what.into(),
                    detail: format!(
                        "not listening on {} after 30 s; log:\n{}",
                        serve.socket().display(),
                        tail(&serve.log(), 30)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The snapshotter socket containerd's proxy plugin connects to.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(LOG)).unwrap_or_default()
    }

    /// The daemon's peak resident memory so far (VmHWM of /proc/PID/status), in bytes; `None`
    /// once stopped or where /proc does not say.
    pub fn peak_rss(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        vm_hwm_bytes(&status)
    }

    /// Stops the process and detaches its mounts (idempotent).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        crate::rig::unmount_under(&self.dir);
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From spawn to exit.
    pub elapsed: Duration,
    /// From spawn to the first stdout line equal to the marker, if one was asked for and seen.
    pub ready_after: Option<Duration>,
}

impl Finished {
    /// Fails with the command's output unless it exited 0.
    pub fn success(self, what: &str) -> Result<Self, BenchError> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(BenchError::Step {
                what: what.to_string(),
                detail: format!(
                    "{}\nstdout: {}\nstderr: {}",
                    self.status,
                    tail(&self.stdout, 20),
                    tail(&self.stderr, 20)
                ),
            })
        }
    }
}

/// Runs `command` to completion (killing it after `timeout`), capturing its output; with
/// `ready_marker`, also notes when a stdout line equal to it appeared.
pub fn run_timed(
    command: Command,
    what: &str,
    timeout: Duration,
    ready_marker: Option<&str>,
) -> Result<Finished, BenchError> {
    run_watched(command, what, timeout, ready_marker, &|| {})
}

/// [`run_timed`], calling `on_ready` once when the ready line appears (to stop a workload that
/// would otherwise run on, such as a server).
pub fn run_watched(
    mut command: Command,
    what: &str,
    timeout: Duration,
    ready_marker: Option<&str>,
    on_ready: &dyn Fn(),
) -> Result<Finished, BenchError> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(io_error(format!("spawning {what}")))?;
    let (lines_tx, lines_rx) = mpsc::channel::<(Instant, String)>();
    let stdout_reader = child.stdout.take().map(|stdout| {
        std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines_tx.send((Instant::now(), line.clone()));
                all.push_str(&line);
                all.push('\n');
            }
            all
        })
    });
    let stderr_reader = child.stderr.take().map(|mut stderr| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stderr.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    });
    let deadline = started + timeout;
    let mut ready_after = None;
    let status = loop {
        while let Ok((at, line)) = lines_rx.try_recv() {
            if ready_after.is_none() && ready_marker == Some(line.trim()) {
                ready_after = Some(at.duration_since(started));
                on_ready();
            }
        }
        if super::check_interrupted().is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BenchError::Interrupted);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::Step {
                    what: what.to_string(),
                    detail: format!("did not finish within {timeout:?}; killed"),
                });
            }
            Err(source) => {
                return Err(BenchError::Io {
                    context: format!("waiting for {what}"),
                    source,
                })
            }
        }
    };
    let elapsed = started.elapsed();
    let stdout = stdout_reader
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    while let Ok((at, line)) = lines_rx.try_recv() {
        if ready_after.is_none() && ready_marker == Some(line.trim()) {
            ready_after = Some(at.duration_since(started));
        }
    }
    let stderr = stderr_reader
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    Ok(Finished {
        status,
        stdout,
        stderr,
        elapsed,
        ready_after,
    })
}

/// The last `lines` lines of `text`.
/// The VmHWM line of a /proc/PID/status text, in bytes.
fn vm_hwm_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_read_from_vm_hwm() {
        let status = "Name:\tlazysnap\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(vm_hwm_bytes(status), Some(12345 * 1024));
        assert_eq!(vm_hwm_bytes("Name:\tx\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(vm_hwm_bytes(&own).unwrap() > 0);
    }

    #[test]
    fn run_timed_sees_the_ready_line_before_exit() {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "echo starting; echo ready; sleep 0.3; echo done"]);
        let finished = run_timed(command, "sh", Duration::from_secs(10), Some("ready"))
            .unwrap()
            .success("sh")
            .unwrap();
        let ready = finished.ready_after.expect("ready seen");
        assert!(ready < finished.elapsed);
        assert!(finished.stdout.contains("done"));
    }

    #[test]
    fn run_timed_kills_after_the_timeout_and_reports_failures() {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "sleep 30"]);
        let err = run_timed(command, "sleeper", Duration::from_millis(200), None).unwrap_err();
        assert!(err.to_string().contains("sleeper"), "{err}");

        let mut command = Command::new("/bin/sh");
        command.args(["-c", "echo oops >&2; exit 3"]);
        let err = run_timed(command, "failing", Duration::from_secs(10), None)
            .unwrap()
            .success("failing step")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("failing step") && err.contains("oops"),
            "{err}"
        );
    }
}
