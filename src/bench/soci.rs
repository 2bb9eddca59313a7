//! The SOCI snapshotter as a measured peer (mode `soci`): its index built by `soci create` from
//! the gzip image and pushed beside it, an HTTPS front of the bench registry under a host name
//! other than localhost (SOCI 0.4.1 fetches indexes over HTTPS only, and layers of a localhost
//! registry over plain HTTP only), and its daemon and CLI run with state private to the bench.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::rig::{
    ContainerdOptions, ContainerdServer, RegistryOptions, RegistryServer, RegistryTls,
};

use super::procs::{io_error, run_timed, ServeProcess};
use super::{check_interrupted, BenchError, BenchOptions, NAMESPACE, REPOSITORY};

/// Where SOCI 0.4.1's CLI and daemon keep their artifact and content stores, whatever `-root`
/// says; see [`StateMount`].
const STATE_DIR: &str = "/var/lib/soci-snapshotter-grpc";
/// Tag of the gzip image SOCI runs (its index refers to this image's manifest).
pub const SOCI_TAG: &str = "gzip";

/// The SOCI binaries: the daemon given with `--soci-grpc` and the `soci` CLI beside it.
#[derive(Debug, Clone)]
pub struct SociTools {
    pub daemon: PathBuf,
    pub cli: PathBuf,
}

impl SociTools {
    /// Finds the `soci` CLI next to `daemon` (as the Debian package installs both).
    pub fn beside(daemon: &Path) -> Result<Self, BenchError> {
        let cli = daemon.with_file_name("soci");
        if !daemon.is_file() || !cli.is_file() {
            return Err(BenchError::Missing(format!(
                "--soci-grpc {}: needs soci-snapshotter-grpc with the soci CLI beside it \
                 (scripts/get-soci.sh extracts both from Debian's soci-snapshotter package)",
                daemon.display()
            )));
        }
        Ok(Self {
            daemon: daemon.to_path_buf(),
            cli,
        })
    }
}

/// Everything the soci mode shares across runs: the HTTPS registry, its name and certificate,
/// and the CLI's private state directory.
pub struct SociPeer {
    pub tools: SociTools,
    /// A name for 127.0.0.1 that is not `localhost` (the node's host name).
    pub registry_name: String,
    pub certificate: PathBuf,
    pub registry: RegistryServer,
}

impl SociPeer {
    /// Starts the HTTPS front of `plain`'s storage and builds and pushes the SOCI index of the
    /// gzip image through `plain`.
    pub fn prepare(
        options: &BenchOptions,
        tools: SociTools,
        work: &Path,
        plain: &RegistryServer,
    ) -> Result<Self, BenchError> {
        let registry_name = loopback_host_name()?;
        let tls_dir = work.join("soci-tls");
        std::fs::create_dir_all(&tls_dir)
            .map_err(io_error(format!("creating {}", tls_dir.display())))?;
        let tls = self_signed_certificate(&tls_dir, &registry_name)?;
        let certificate = tls.certificate.clone();
        let registry = RegistryServer::start_with(&RegistryOptions {
            tls: Some(tls),
            storage_root: Some(plain.storage_root().to_path_buf()),
            ..RegistryOptions::default()
        })?;
        let peer = Self {
            tools,
            registry_name,
            certificate,
            registry,
        };
        let _state = StateMount::over(&work.join("soci-create-state"))?;
        peer.create_and_push_index(options, plain)?;
        Ok(peer)
    }

    /// `soci create` of the gzip image pulled into a scratch containerd, then `soci push`.
    fn create_and_push_index(
        &self,
        options: &BenchOptions,
        plain: &RegistryServer,
    ) -> Result<(), BenchError> {
        let containerd = ContainerdServer::start(&ContainerdOptions::default())?;
        let source = format!("{}/{REPOSITORY}:{SOCI_TAG}", plain.host());
        let mut pull = containerd.ctr();
        pull.args(["-n", NAMESPACE, "images", "pull", "--plain-http", &source]);
        let what = format!("ctr images pull {source} (for soci create)");
        run_timed(pull, &what, options.step_timeout, None)?.success(&what)?;
        for args in [
            vec!["create", source.as_str()],
            vec!["push", "--plain-http", source.as_str()],
        ] {
            let mut command = self.cli(containerd.address().as_path());
            command.args(&args);
            let what = format!("soci {}", args.join(" "));
            run_timed(command, &what, options.step_timeout, None)?.success(&what)?;
            check_interrupted()?;
        }
        Ok(())
    }

    /// The `soci` CLI talking to the containerd at `address`, trusting the bench registry's
    /// certificate (its state goes where the caller's [`StateMount`] is).
    pub fn cli(&self, address: &Path) -> Command {
        let mut command = Command::new(&self.tools.cli);
        command
            .env("SSL_CERT_FILE", &self.certificate)
            .arg("--address")
            .arg(address)
            .args(["--namespace", NAMESPACE]);
        command
    }

    /// `soci-snapshotter-grpc` with its defaults, state in `dir` (and its stores in a fresh
    /// [`StateMount`] under `dir`, returned to keep for the run).
    pub fn start_daemon(&self, dir: &Path) -> Result<(ServeProcess, StateMount), BenchError> {
        let state = StateMount::over(&dir.join("var-lib-soci"))?;
        let daemon = ServeProcess::start_soci(&self.tools.daemon, dir, &self.certificate)?;
        Ok((daemon, state))
    }

    /// The reference of the gzip image through the link emulator at `port`.
    pub fn reference(&self, port: u16) -> String {
        format!("{}:{port}/{REPOSITORY}:{SOCI_TAG}", self.registry_name)
    }
}

/// A name other than `localhost` that resolves to 127.0.0.1: the node's host name when it does
/// (Debian and most sandboxes map it to a loopback address in /etc/hosts), else another name
/// /etc/hosts gives 127.0.0.1.
fn loopback_host_name() -> Result<String, BenchError> {
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(io_error(
            "reading the host name from /proc/sys/kernel/hostname",
        ))?
        .trim()
        .to_string();
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let resolves_to_loopback = |name: &str| {
        (name, 0)
            .to_socket_addrs()
            .map(|mut addrs| addrs.any(|addr| addr.ip() == loopback))
            .unwrap_or(false)
    };
    candidate_names(&host_name, &hosts)
        .into_iter()
        .find(|name| resolves_to_loopback(name))
        .ok_or_else(|| {
            BenchError::Missing(format!(
                "mode soci needs a name other than localhost that resolves to 127.0.0.1 (the \
                 host name {host_name:?} does not, nor does another in /etc/hosts): SOCI 0.4.1 \
                 reads its index over HTTPS only, and layers of a registry named localhost over \
                 plain HTTP only. Add `127.0.0.1 {host_name}` to /etc/hosts"
            ))
        })
}

/// The names to try for 127.0.0.1, in order: the host name, then the names /etc/hosts (`hosts`)
/// gives 127.0.0.1; never `localhost` or its variants.
fn candidate_names(host_name: &str, hosts: &str) -> Vec<String> {
    let listed = hosts
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some("127.0.0.1")).then(|| fields.map(str::to_string))
        })
        .flatten();
    std::iter::once(host_name.to_string())
        .chain(listed)
        .filter(|name| !name.is_empty() && !name.starts_with("localhost"))
        .collect()
}

/// A self-signed certificate for `name` and 127.0.0.1 (openssl), written into `dir`.
fn self_signed_certificate(dir: &Path, name: &str) -> Result<RegistryTls, BenchError> {
    crate::rig::require_program("/usr/bin/openssl", "openssl")?;
    let tls = RegistryTls {
        certificate: dir.join("registry.crt"),
        key: dir.join("registry.key"),
    };
    let output = Command::new("/usr/bin/openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-keyout")
        .arg(&tls.key)
        .arg("-out")
        .arg(&tls.certificate)
        .arg("-subj")
        .arg(format!("/CN={name}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{name},IP:127.0.0.1"))
        .output()
        .map_err(io_error("running openssl req"))?;
    if !output.status.success() {
        return Err(BenchError::Step {
            what: "making the HTTPS registry's certificate with openssl".into(),
            detail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(tls)
}

/// A directory of the bench bind-mounted over [`STATE_DIR`] while it lives: SOCI's CLI and
/// daemon keep their artifact and content store there whatever their root, so each run gets a
/// fresh one (cold, like the rest of the run) and nothing is left in the system's directory.
pub struct StateMount {
    created_mount_point: bool,
}

impl StateMount {
    /// Mounts `dir` (created) over [`STATE_DIR`]; refuses when the system's directory holds a
    /// SOCI installation's state.
    pub fn over(dir: &Path) -> Result<Self, BenchError> {
        std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let mount_point = Path::new(STATE_DIR);
        let created_mount_point = !mount_point.exists();
        if created_mount_point {
            std::fs::create_dir_all(mount_point)
                .map_err(io_error(format!("creating the mount point {STATE_DIR}")))?;
        } else if std::fs::read_dir(mount_point)
            .map_err(io_error(format!("listing {STATE_DIR}")))?
            .next()
            .is_some()
        {
            return Err(BenchError::Invalid(format!(
                "mode soci: {STATE_DIR} holds a SOCI installation's state; the bench mounts its \
                 own state there for each run, so run it on a node without SOCI in use"
            )));
        }
        nix::mount::mount(
            Some(dir),
            mount_point,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|errno| BenchError::Io {
            context: format!("bind-mounting {} over {STATE_DIR}", dir.display()),
            source: std::io::Error::from(errno),
        })?;
        Ok(Self {
            created_mount_point,
        })
    }
}

impl Drop for StateMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(STATE_DIR, nix::mount::MntFlags::MNT_DETACH);
        if self.created_mount_point {
            let _ = std::fs::remove_dir(STATE_DIR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::candidate_names;

    #[test]
    fn names_for_loopback_come_from_the_host_name_then_etc_hosts() {
        let hosts = "127.0.0.1 localhost\n# 127.0.0.1 commented\n127.0.1.1 node\n\
                     127.0.0.1 runsc vm # sandbox\n::1 localhost ip6-localhost\n";
        assert_eq!(candidate_names("node", hosts), ["node", "runsc", "vm"]);
        assert_eq!(
            candidate_names("localhost", "127.0.0.1 localhost.localdomain\n"),
            Vec::<String>::new()
        );
    }
}
