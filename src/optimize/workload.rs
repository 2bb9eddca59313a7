//! The workload `lazysnap optimize` records: an OCI runtime bundle made from the image config
//! (entrypoint, cmd, env, working dir, user) over a prepared root filesystem, run by runc until
//! it exits, prints an awaited line, its period ends or the user sends SIGINT.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::image::ImageConfig;

/// Lines of the workload's output kept for the report of a failed run.
const TAIL_LINES: usize = 20;

/// Why the workload could not be run.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("the image config names no command to run (no Entrypoint or Cmd): give one with --entrypoint or --args")]
    NoCommand,
    #[error("user {user:?} of the image config: {detail}")]
    User { user: String, detail: String },
    #[error("runc {action}: {detail} (is runc installed? scripts/install-deps.sh installs it)")]
    Runc { action: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--mount {0:?}: expected SRC:DST with an absolute DST")]
    BadMount(String),
    #[error("--env {0:?}: expected KEY=VALUE")]
    BadEnv(String),
}

/// When the recording ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopWhen {
    /// After this long (or when the workload exits).
    Period(Duration),
    /// When a line of output contains this text (or the workload exits, or after the timeout).
    Line { text: String, timeout: Duration },
    /// When lazysnap gets SIGINT (or the workload exits).
    Signal,
}

/// What to run, as the user overrides the image config.
#[derive(Debug, Clone, Default)]
pub struct WorkloadOverrides {
    pub entrypoint: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    /// `KEY=VALUE`, added to (or replacing in) the image's environment.
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// `SRC:DST` bind mounts.
    pub mounts: Vec<String>,
    /// Share the host's network namespace (no network at all otherwise).
    pub net_host: bool,
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The workload exited by itself with this code (128 + signal when killed by one).
    Exited(i32),
    /// The awaited line was printed.
    LineSeen,
    /// The period ended.
    PeriodOver,
    /// The line was awaited in vain until the timeout.
    TimedOut,
    /// The user sent SIGINT.
    Interrupted,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub ended: Ended,
    pub elapsed: Duration,
    /// The last lines of output (stdout and stderr interleaved as they came).
    pub tail: Vec<String>,
}

impl RunOutcome {
    /// Whether the run is a sound basis for an optimized image: it reached its stop condition,
    /// or exited with 0 while waiting for a period or a signal.
    pub fn succeeded(&self, stop: &StopWhen) -> bool {
        match (&self.ended, stop) {
            (Ended::Exited(0), StopWhen::Line { .. }) => false,
            (Ended::Exited(code), _) => *code == 0,
            (Ended::TimedOut, _) => false,
            _ => true,
        }
    }

    /// One sentence for the user.
    pub fn describe(&self, stop: &StopWhen) -> String {
        let after = format!("after {:.1} s", self.elapsed.as_secs_f64());
        if let (Ended::Exited(code), StopWhen::Line { text, .. }) = (&self.ended, stop) {
            return format!(
                "the workload exited with code {code} {after} without printing the awaited line {text:?}"
            );
        }
        match &self.ended {
            Ended::Exited(code) if *code > 128 => {
                format!("the workload was killed by signal {} {after}", code - 128)
            }
            Ended::Exited(code) => format!("the workload exited with code {code} {after}"),
            Ended::LineSeen => format!("the awaited line was printed {after}"),
            Ended::PeriodOver => format!("the recording period ended {after}"),
            Ended::TimedOut => format!("the awaited line was never printed ({after})"),
            Ended::Interrupted => format!("stopped by SIGINT {after}"),
        }
    }
}

/// The process to run: argv, environment, working dir and user (uid, gid, extra gids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
}

/// Builds the process from the image config and the overrides; names in `user` are looked up
/// in the root filesystem's /etc/passwd and /etc/group.
pub fn process_for(
    config: &ImageConfig,
    overrides: &WorkloadOverrides,
    rootfs: &Path,
) -> Result<Process, WorkloadError> {
    let image = config.process();
    let entrypoint = overrides
        .entrypoint
        .clone()
        .or(image.entrypoint)
        .unwrap_or_default();
    // A new entrypoint drops the image's cmd, as `docker run --entrypoint` does.
    let cmd = match (&overrides.args, &overrides.entrypoint) {
        (Some(args), _) => args.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => image.cmd.unwrap_or_default(),
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(WorkloadError::NoCommand);
    }
    let mut env = image.env.unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={}", crate::image::DEFAULT_PATH));
    }
    for pair in &overrides.env {
        let Some((key, _)) = pair.split_once('=') else {
            return Err(WorkloadError::BadEnv(pair.clone()));
        };
        env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key));
        env.push(pair.clone());
    }
    let cwd = overrides
        .cwd
        .clone()
        .or(image.working_dir)
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".into());
    let user = overrides.user.clone().or(image.user).unwrap_or_default();
    let (uid, gid) = resolve_user(&user, rootfs)?;
    Ok(Process {
        args,
        env,
        cwd,
        uid,
        gid,
    })
}

/// `user[:group]` (names or numbers) to uid and gid; empty is root.
fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), WorkloadError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let err = |detail: String| WorkloadError::User {
        user: user.to_string(),
        detail,
    };
    let (name, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let table = |file: &str| std::fs::read_to_string(rootfs.join(file)).unwrap_or_default();
    let lookup = |text: &str, wanted: &str| -> Option<(u32, u32)> {
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&wanted)).then(|| {
                let id = fields.get(2)?.parse().ok()?;
                let gid = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
                Some((id, gid))
            })?
        })
    };
    let (uid, primary_gid) = match name.parse::<u32>() {
        Ok(uid) => (
            uid,
            lookup(&table("etc/passwd"), name)
                .map(|(_, g)| g)
                .unwrap_or(uid),
        ),
        Err(_) => lookup(&table("etc/passwd"), name)
            .ok_or_else(|| err(format!("no user {name:?} in the image's /etc/passwd")))?,
    };
    let gid = match group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(&table("etc/group"), g)
                .map(|(gid, _)| gid)
                .ok_or_else(|| err(format!("no group {g:?} in the image's /etc/group")))?,
        },
    };
    Ok((uid, gid))
}

/// Writes `bundle/config.json` for `process` over `rootfs` (starting from `runc spec`'s
/// default, so the namespaces, masked paths and capabilities are runc's own).
pub async fn write_bundle(
    bundle: &Path,
    rootfs: &Path,
    process: &Process,
    overrides: &WorkloadOverrides,
) -> Result<(), WorkloadError> {
    let io = |context: String| move |source| WorkloadError::Io { context, source };
    let output = Command::new("runc")
        .arg("spec")
        .arg("--bundle")
        .arg(bundle)
        .output()
        .await
        .map_err(|e| WorkloadError::Runc {
            action: "spec".into(),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(WorkloadError::Runc {
            action: "spec".into(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
    let mut spec: Value = serde_json::from_slice(&text).map_err(|e| WorkloadError::Runc {
        action: "spec".into(),
        detail: format!("unreadable config.json: {e}"),
    })?;
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(process.args);
    spec["process"]["env"] = json!(process.env);
    spec["process"]["cwd"] = json!(process.cwd);
    spec["process"]["user"] = json!({"uid": process.uid, "gid": process.gid});
    spec["root"] = json!({"path": rootfs, "readonly": false});
    spec["hostname"] = json!("lazysnap-optimize");
    if overrides.net_host {
        if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
            namespaces.retain(|n| n["type"] != "network");
        }
        // The host's resolver, so names resolve as they would in a container with host networking.
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            mounts.push(json!({"destination": "/etc/resolv.conf", "type": "bind",
                "source": "/etc/resolv.conf", "options": ["rbind", "ro"]}));
        }
    }
    for mount in &overrides.mounts {
        let Some((source, destination)) = mount
            .split_once(':')
            .filter(|(s, d)| !s.is_empty() && d.starts_with('/'))
        else {
            return Err(WorkloadError::BadMount(mount.clone()));
        };
        let source = std::fs::canonicalize(source)
            .map_err(io(format!("--mount {mount}: source {source}")))?;
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            mounts.push(json!({"destination": destination, "type": "bind",
                "source": source, "options": ["rbind", "rw"]}));
        }
    }
    let text = serde_json::to_vec_pretty(&spec).map_err(|e| WorkloadError::Runc {
        action: "spec".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))
}

/// Runs the bundle with runc (state under `runc_root`) until `stop`, echoing the workload's
/// output to stderr, then kills and deletes the container.
pub async fn run(
    bundle: &Path,
    runc_root: &Path,
    id: &str,
    stop: &StopWhen,
) -> Result<RunOutcome, WorkloadError> {
    let started = Instant::now();
    let mut child = Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| WorkloadError::Runc {
            action: "run".into(),
            detail: e.to_string(),
        })?;
    let (lines_tx, mut lines_rx) = mpsc::unbounded_channel::<String>();
    if let Some(out) = child.stdout.take() {
        forward_lines(out, lines_tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, lines_tx);
    }
    let (deadline, awaited) = match stop {
        StopWhen::Period(p) => (Some(*p), None),
        StopWhen::Line { text, timeout } => (Some(*timeout), Some(text.as_str())),
        StopWhen::Signal => (None, None),
    };
    let sleep = tokio::time::sleep(deadline.unwrap_or(Duration::from_secs(u64::MAX >> 2)));
    tokio::pin!(sleep);
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut output_open = true;
    let ended = loop {
        tokio::select! {
            line = lines_rx.recv(), if output_open => match line {
                Some(line) => {
                    eprintln!("  | {line}");
                    let seen = awaited.is_some_and(|t| line.contains(t));
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                    if seen {
                        break Ended::LineSeen;
                    }
                }
                None => output_open = false,
            },
            status = child.wait() => {
                let status = status.map_err(|e| WorkloadError::Runc { action: "run".into(), detail: e.to_string() })?;
                // Take what the workload printed last.
                while let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(200), lines_rx.recv()).await {
                    eprintln!("  | {line}");
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                use std::os::unix::process::ExitStatusExt;
                let code = status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(-1);
                break Ended::Exited(code);
            }
            _ = &mut sleep => break if awaited.is_some() { Ended::TimedOut } else { Ended::PeriodOver },
            _ = tokio::signal::ctrl_c(), if *stop == StopWhen::Signal => break Ended::Interrupted,
        }
    };
    let elapsed = started.elapsed();
    stop_container(runc_root, id, &mut child).await;
    Ok(RunOutcome {
        ended,
        elapsed,
        tail: tail.into(),
    })
}

fn forward_lines(
    stream: impl AsyncRead + Unpin + Send + 'static,
    tx: mpsc::UnboundedSender<String>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// Kills the container if it still runs, reaps runc and deletes the container's state.
async fn stop_container(runc_root: &Path, id: &str, child: &mut tokio::process::Child) {
    let runc = |args: &[&str]| {
        let mut command = Command::new("runc");
        command
            .arg("--root")
            .arg(runc_root)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    };
    let _ = runc(&["kill", "--all", id, "KILL"]).status().await;
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    let _ = runc(&["delete", "--force", id]).status().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ImageConfig {
        crate::image::parse_json("config", json.as_bytes()).unwrap()
    }

    #[test]
    fn the_process_comes_from_the_config_and_the_overrides() {
        let c = config(
            r#"{"rootfs":{"type":"layers","diff_ids":[]},"config":{"Entrypoint":["/bin/app"],"Cmd":["--serve"],"Env":["A=1","PATH=/bin"],"WorkingDir":"/srv","User":"7:8"}}"#,
        );
        let dir = tempfile::tempdir().unwrap();
        let p = process_for(&c, &WorkloadOverrides::default(), dir.path()).unwrap();
        assert_eq!(p.args, vec!["/bin/app", "--serve"]);
        assert_eq!(p.env, vec!["A=1", "PATH=/bin"]);
        assert_eq!((p.cwd.as_str(), p.uid, p.gid), ("/srv", 7, 8));
        let o = WorkloadOverrides {
            entrypoint: Some(vec!["/bin/sh".into()]),
            env: vec!["A=2".into()],
            ..WorkloadOverrides::default()
        };
        let p = process_for(&c, &o, dir.path()).unwrap();
        assert_eq!(p.args, vec!["/bin/sh"]);
        assert_eq!(p.env, vec!["PATH=/bin", "A=2"]);
        let o = WorkloadOverrides {
            args: Some(vec!["-x".into()]),
            ..WorkloadOverrides::default()
        };
        assert_eq!(
            process_for(&c, &o, dir.path()).unwrap().args,
            vec!["/bin/app", "-x"]
        );
    }

    #[test]
    fn user_names_come_from_the_image_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:33:34::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user("web", dir.path()).unwrap(), (33, 34));
        assert_eq!(resolve_user("web:staff", dir.path()).unwrap(), (33, 50));
        assert_eq!(resolve_user("1000", dir.path()).unwrap(), (1000, 1000));
        let err = resolve_user("nobody", dir.path()).unwrap_err().to_string();
        assert!(err.contains("no user \"nobody\""), "{err}");
        let c = config(r#"{"rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#);
        let err = process_for(&c, &WorkloadOverrides::default(), dir.path()).unwrap_err();
        assert!(matches!(err, WorkloadError::NoCommand));
    }

    #[test]
    fn a_run_that_exits_zero_is_sound_unless_a_line_was_awaited() {
        let outcome = |ended| RunOutcome {
            ended,
            elapsed: Duration::ZERO,
            tail: vec![],
        };
        let period = StopWhen::Period(Duration::from_secs(1));
        let line = StopWhen::Line {
            text: "ready".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(outcome(Ended::Exited(0)).succeeded(&period));
        assert!(!outcome(Ended::Exited(1)).succeeded(&period));
        assert!(!outcome(Ended::Exited(0)).succeeded(&line));
        assert!(outcome(Ended::LineSeen).succeeded(&line));
        assert!(!outcome(Ended::TimedOut).succeeded(&line));
    }
}
