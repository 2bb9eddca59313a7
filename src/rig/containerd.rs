//! A standalone containerd 1.6 (Debian `containerd`) for tests: its own root, state, socket and
//! config in a temp dir, lazysnap registered as `[proxy_plugins.lazysnap]` (a snapshot proxy on
//! lazysnap's socket), CRI disabled unless asked for. Start lazysnap **before** this: containerd
//! connects to proxy plugins at start and backs off when they are missing.
//! On drop it kills containerd and the shims it started, and unmounts what it left mounted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{require_program, RigError};

const CONTAINERD_BIN: &str = "/usr/bin/containerd";
const CTR_BIN: &str = "/usr/bin/ctr";

/// How to start containerd.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// lazysnap's socket: registers `[proxy_plugins.lazysnap] type = "snapshot"` on it.
    pub snapshotter_socket: Option<PathBuf>,
    /// Enable the CRI plugin, with lazysnap as its snapshotter and snapshot annotations on.
    pub enable_cri: bool,
    /// Extra TOML appended verbatim to the config.
    pub extra_config: Option<String>,
}

/// A running containerd; killed (with its shims) and its state removed on drop.
pub struct ContainerdServer {
    child: Child,
    dir: tempfile::TempDir,
}

impl ContainerdServer {
    /// Starts containerd with `options` and waits until it answers `ctr version`.
    pub fn start(options: &ContainerdOptions) -> Result<Self, RigError> {
        require_program(CONTAINERD_BIN, "containerd")?;
        require_program(CTR_BIN, "containerd")?;
        require_program("/usr/sbin/runc", "runc")?;
        let dir = tempfile::Builder::new()
            .prefix("lazysnap-containerd-")
            .tempdir()
            .map_err(RigError::io("creating the containerd temp dir"))?;
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, render_config(dir.path(), options))
            .map_err(RigError::io("writing the containerd config"))?;
        let log = File::create(dir.path().join("containerd.log"))
            .map_err(RigError::io("creating the containerd log"))?;
        let log_err = log
            .try_clone()
            .map_err(RigError::io("duplicating the containerd log handle"))?;
        let child = Command::new(CONTAINERD_BIN)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(RigError::io("spawning containerd"))?;
        let mut server = Self { child, dir };
        server.wait_ready(Duration::from_secs(30))?;
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), RigError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(RigError::Start {
                    what: "containerd".into(),
                    detail: format!("exited with {status}; log:\n{}", self.log()),
                });
            }
            if self.address().exists() {
                if let Ok(out) = self.ctr().arg("version").output() {
                    if out.status.success() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(RigError::Start {
                    what: "containerd".into(),
                    detail: format!("not answering after {timeout:?}; log:\n{}", self.log()),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The temp dir holding config, root, state and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything containerd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --address <socket>`, ready for more arguments.
    pub fn ctr(&self) -> Command {
        let mut command = Command::new(CTR_BIN);
        command.arg("--address").arg(self.address());
        command
    }

    /// Runs `ctr --address <socket> ARGS…` and fails with its output unless it succeeds.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<Output, RigError> {
        let output = self
            .ctr()
            .args(args)
            .output()
            .map_err(RigError::io(format!("running ctr {args:?}")))?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(RigError::Start {
                what: format!("ctr {}", args.join(" ")),
                detail: format!(
                    "{}\nstdout: {}\nstderr: {}\ncontainerd log tail:\n{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr),
                    tail(&self.log(), 30)
                ),
            })
        }
    }

    /// Kills containerd, the shims it started, and unmounts what it left under its dir.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_shims_of(&self.address());
        super::unmount_under(self.dir.path());
    }
}

impl Drop for ContainerdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn render_config(dir: &Path, options: &ContainerdOptions) -> String {
    let d = dir.display();
    let disabled = if options.enable_cri {
        ""
    } else {
        "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
    };
    let mut config = format!(
        "version = 2\n\
         root = \"{d}/root\"\n\
         state = \"{d}/state\"\n\
         {disabled}\
         [grpc]\n  address = \"{d}/containerd.sock\"\n\
         [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
         [debug]\n  level = \"info\"\n\
         [metrics]\n  address = \"\"\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
    );
    if options.enable_cri {
        config.push_str(&format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"lazysnap\"\n  disable_snapshot_annotations = false\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{d}/cni/bin\"\n  conf_dir = \"{d}/cni/conf\"\n"
        ));
    }
    if let Some(socket) = &options.snapshotter_socket {
        config.push_str(&format!(
            "[proxy_plugins]\n  [proxy_plugins.lazysnap]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            socket.display()
        ));
    }
    if let Some(extra) = &options.extra_config {
        config.push_str(extra);
        if !extra.ends_with('\n') {
            config.push('\n');
        }
    }
    config
}

/// Kills (SIGKILL, by pid) shim processes whose command line names `address`.
fn kill_shims_of(address: &Path) {
    let needle = address.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_valid_toml_with_proxy_plugin() {
        let options = ContainerdOptions {
            snapshotter_socket: Some("/tmp/x/lazysnap.sock".into()),
            ..Default::default()
        };
        let text = render_config(Path::new("/tmp/c"), &options);
        let value: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(value["version"].as_integer(), Some(2));
        assert_eq!(
            value["proxy_plugins"]["lazysnap"]["address"].as_str(),
            Some("/tmp/x/lazysnap.sock")
        );
        assert_eq!(
            value["disabled_plugins"][0].as_str(),
            Some("io.containerd.grpc.v1.cri")
        );
        let cri = render_config(
            Path::new("/tmp/c"),
            &ContainerdOptions {
                enable_cri: true,
                ..Default::default()
            },
        );
        let value: toml::Value = toml::from_str(&cri).unwrap();
        let containerd = &value["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(containerd["snapshotter"].as_str(), Some("lazysnap"));
        assert_eq!(
            containerd["disable_snapshot_annotations"].as_bool(),
            Some(false)
        );
    }
}
