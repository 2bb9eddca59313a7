//! A standalone containerd for tests: Debian 12's 1.6 by default, or the binaries of another
//! version (`scripts/get-containerd.sh`); its own root, state, socket and config in a temp dir,
//! lazysnap registered as `[proxy_plugins.lazysnap]` (a snapshot proxy on lazysnap's socket) or
//! through one of `packaging/containerd/`'s snippets merged in, CRI disabled unless asked for. Start lazysnap **before** this: containerd
//! connects to proxy plugins at start and backs off when they are missing.
//! On drop it kills containerd and the shims it started, and unmounts what it left mounted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{require_program, RigError};

/// Where Debian 12's containerd and ctr are.
const SYSTEM_BIN_DIR: &str = "/usr/bin";

/// How to start containerd.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// lazysnap's socket: registers `[proxy_plugins.lazysnap] type = "snapshot"` on it.
    pub snapshotter_socket: Option<PathBuf>,
    /// Enable the CRI plugin, with lazysnap as its snapshotter and snapshot annotations on.
    pub enable_cri: bool,
    /// Extra TOML appended verbatim to the config.
    pub extra_config: Option<String>,
    /// Directory of the `containerd`, `ctr` and `containerd-shim-runc-v2` to run (another
    /// version's, extracted by `scripts/get-containerd.sh`); default Debian 12's in /usr/bin.
    pub bin_dir: Option<PathBuf>,
    /// A configuration snippet as shipped (`packaging/containerd/…`), merged into the generated
    /// config: its `version` picks the config format, and its lazysnap `address` is replaced by
    /// `snapshotter_socket`. With a snippet, what CRI pulls with comes from it.
    pub snippet: Option<String>,
}

/// A running containerd; killed (with its shims) and its state removed on drop.
pub struct ContainerdServer {
    child: Child,
    dir: tempfile::TempDir,
    ctr_bin: PathBuf,
}

impl ContainerdServer {
    /// Starts containerd with `options` and waits until it answers `ctr version`.
    pub fn start(options: &ContainerdOptions) -> Result<Self, RigError> {
        let bin_dir = options
            .bin_dir
            .as_deref()
            .unwrap_or(Path::new(SYSTEM_BIN_DIR));
        let containerd_bin = bin_dir.join("containerd");
        let ctr_bin = bin_dir.join("ctr");
        match &options.bin_dir {
            None => {
                require_program("/usr/bin/containerd", "containerd")?;
                require_program("/usr/bin/ctr", "containerd")?;
            }
            Some(dir) if !containerd_bin.is_file() || !ctr_bin.is_file() => {
                return Err(RigError::Start {
                    what: "containerd".into(),
                    detail: format!(
                        "{} has no containerd and ctr: run scripts/get-containerd.sh SUITE DIR",
                        dir.display()
                    ),
                })
            }
            Some(_) => {}
        }
        require_program("/usr/sbin/runc", "runc")?;
        let dir = tempfile::Builder::new()
            .prefix("lazysnap-containerd-")
            .tempdir()
            .map_err(RigError::io("creating the containerd temp dir"))?;
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, render_config(dir.path(), options)?)
            .map_err(RigError::io("writing the containerd config"))?;
        let log = File::create(dir.path().join("containerd.log"))
            .map_err(RigError::io("creating the containerd log"))?;
        let log_err = log
            .try_clone()
            .map_err(RigError::io("duplicating the containerd log handle"))?;
        // The shim is found on PATH: the one of the same version first.
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let child = Command::new(&containerd_bin)
            .arg("--config")
            .arg(&config_path)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(RigError::io("spawning containerd"))?;
        let mut server = Self {
            child,
            dir,
            ctr_bin,
        };
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
        let mut command = Command::new(&self.ctr_bin);
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

fn render_config(dir: &Path, options: &ContainerdOptions) -> Result<String, RigError> {
    let snippet = options
        .snippet
        .as_deref()
        .map(toml::from_str::<toml::Table>)
        .transpose()
        .map_err(|e| RigError::Start {
            what: "containerd".into(),
            detail: format!("the configuration snippet is not valid TOML: {e}"),
        })?;
    let version = snippet
        .as_ref()
        .and_then(|s| s.get("version"))
        .and_then(toml::Value::as_integer)
        .unwrap_or(2);
    let mut config = base_config(dir, options, version);
    if let Some(snippet) = snippet {
        let mut config_table: toml::Table =
            toml::from_str(&config).map_err(|e| RigError::Start {
                what: "containerd".into(),
                detail: format!("generated config: {e}"),
            })?;
        merge(&mut config_table, snippet);
        if let (Some(socket), Some(lazysnap)) = (
            &options.snapshotter_socket,
            config_table
                .get_mut("proxy_plugins")
                .and_then(|p| p.get_mut("lazysnap"))
                .and_then(toml::Value::as_table_mut),
        ) {
            lazysnap.insert(
                "address".into(),
                toml::Value::String(socket.display().to_string()),
            );
        }
        config = toml::to_string(&config_table).map_err(|e| RigError::Start {
            what: "containerd".into(),
            detail: format!("rendering the config: {e}"),
        })?;
    } else {
        if options.enable_cri {
            config.push_str(
                "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"lazysnap\"\n  disable_snapshot_annotations = false\n",
            );
        }
        if let Some(socket) = &options.snapshotter_socket {
            config.push_str(&format!(
                "[proxy_plugins]\n  [proxy_plugins.lazysnap]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                socket.display()
            ));
        }
    }
    if let Some(extra) = &options.extra_config {
        config.push_str(extra);
        if !extra.ends_with('\n') {
            config.push('\n');
        }
    }
    Ok(config)
}

/// Paths, sockets and CRI's test settings in config format `version` (2: containerd 1.x; 3:
/// containerd 2.x, whose CRI plugin is split into images and runtime parts).
fn base_config(dir: &Path, options: &ContainerdOptions, version: i64) -> String {
    let d = dir.display();
    let disabled = if options.enable_cri {
        ""
    } else {
        "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
    };
    let mut config = format!(
        "version = {version}\n\
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
        let cni = if version >= 3 {
            "io.containerd.cri.v1.runtime\".cni"
        } else {
            "io.containerd.grpc.v1.cri\".cni"
        };
        // 2.x reads `bin_dirs` (a list) and warns about `bin_dir`.
        let bin_dir = if version >= 3 {
            format!("bin_dirs = [\"{d}/cni/bin\"]")
        } else {
            format!("bin_dir = \"{d}/cni/bin\"")
        };
        config.push_str(&format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\
             [plugins.\"{cni}]\n  {bin_dir}\n  conf_dir = \"{d}/cni/conf\"\n"
        ));
    }
    config
}

/// Merges `from` into `into`, tables key by key (the snippet wins).
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => merge(existing, new),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
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
        let text = render_config(Path::new("/tmp/c"), &options).unwrap();
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
        )
        .unwrap();
        let value: toml::Value = toml::from_str(&cri).unwrap();
        let containerd = &value["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(containerd["snapshotter"].as_str(), Some("lazysnap"));
        assert_eq!(
            containerd["disable_snapshot_annotations"].as_bool(),
            Some(false)
        );
    }
}
