//! Every command that talks to a registry reads containerd's default hosts directory
//! (/etc/containerd/certs.d) like nerdctl and `serve`: an image named after a registry that is
//! down is served by the mirror its hosts.toml there names, for `inspect`, `convert`,
//! `optimize`, `mount`, `pull` and `warm` alike, with no `--hosts-dir`.

mod cli_common;
mod fixtures_common;
mod pull_common;

use std::path::{Path, PathBuf};

use cli_common::*;
use lazysnap_testbed::RegistryServer;
use pull_common::{lazysnap_pull, TestContainerd, TestLazysnap};

const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// `<DEFAULT_HOSTS_DIR>/<host>/hosts.toml` for the test's dead registry; removed on drop (with
/// the hosts directory itself when the test created it).
struct HostsEntry {
    host_dir: PathBuf,
    created_root: bool,
}

impl HostsEntry {
    fn write(host: &str, mirror: &str) -> HostsEntry {
        let root = Path::new(DEFAULT_HOSTS_DIR);
        let created_root = !root.exists();
        let host_dir = root.join(host);
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        HostsEntry {
            host_dir,
            created_root,
        }
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.host_dir);
        if self.created_root {
            let _ = std::fs::remove_dir(DEFAULT_HOSTS_DIR);
        }
    }
}

#[test]
fn every_registry_command_uses_the_mirror_of_the_default_hosts_dir() {
    pull_common::require_root_and_containerd();
    let mirror = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    // The origin is a port nobody listens on; its images live on the mirror only.
    let dead = format!("127.0.0.1:{}", lazysnap_testbed::free_port().unwrap());
    let _entry = HostsEntry::write(&dead, &mirror.host());
    push_generated(
        &mirror,
        work.path(),
        &[tar_of([(
            "m/a.txt".to_string(),
            b"from the mirror\n".to_vec(),
        )])],
        "app",
    );
    let source = format!("{dead}/app:src");

    // convert and optimize read through the mirror (and write to the mirror directly).
    let esgz = format!("{}/app:esgz", mirror.host());
    lazysnap_ok(&["convert", &source, &esgz]);
    let record = work.path().join("record.jsonl");
    std::fs::write(
        &record,
        "{\"layer\":0,\"path\":\"m/a.txt\",\"size\":16,\"read\":[[0,16]]}\n",
    )
    .unwrap();
    let optimized = format!("{}/app:opt", mirror.host());
    lazysnap_ok(&[
        "optimize",
        "--record-in",
        record.to_str().unwrap(),
        &source,
        &optimized,
    ]);
    let lazy = format!("{dead}/app:esgz");
    let out = lazysnap_ok(&["inspect", &lazy]);
    assert!(out.contains("entries"), "{out}");

    let mounted = MountedImage::new(&lazy, work.path(), "mnt", &[]);
    assert_eq!(
        std::fs::read(mounted.dir.join("m/a.txt")).unwrap(),
        b"from the mirror\n"
    );
    drop(mounted);

    // pull and warm, with serve on its default config_path.
    let serve = TestLazysnap::start_with_config("[fetch]\nbackground_fill = false\n");
    let containerd = TestContainerd::start(Some(&serve.socket()));
    let pulled = lazysnap_pull(&containerd, "default", "lazysnap", &lazy);
    assert!(pulled.contains("lazy"), "{pulled}");
    let warmed = lazysnap_ok(&[
        "warm",
        "-a",
        containerd.socket().to_str().unwrap(),
        "--root",
        serve.root().to_str().unwrap(),
        "--all",
        &format!("{dead}/app:opt"),
    ]);
    assert!(warmed.contains("every chunk in the cache"), "{warmed}");
}
