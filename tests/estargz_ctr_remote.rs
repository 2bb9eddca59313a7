//! stargz-snapshotter's own reader accepts our layers: each layer `build_layer` writes (eStargz
//! and zstd:chunked) is ingested into a private containerd and `ctr-remote images
//! get-toc-digest` (the Go estargz reader: footer, TOC member, JSON) returns our TOC digest.
//! Needs root, containerd and ctr-remote (Debian `containerd`, `stargz-snapshotter`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazysnap::estargz::{build_layer, BuildOptions, Compression};

/// A containerd of our own, killed on drop.
struct Containerd {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        for tool in ["containerd", "ctr", "ctr-remote"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                found,
                "{tool} is required (apt-get install containerd stargz-snapshotter)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .unwrap();
        let socket = dir.path().join("c.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}/root\"\nstate = \"{root}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
                root = dir.path().display(),
                sock = socket.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Containerd {
            child,
            socket,
            _dir: dir,
        }
    }

    fn ingest(&self, blob: &Path, digest: &str, size: u64) {
        let status = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["content", "ingest", "--expected-digest", digest])
            .args([
                "--expected-size",
                &size.to_string(),
                &format!("ingest-{digest}"),
            ])
            .stdin(std::fs::File::open(blob).unwrap())
            .status()
            .unwrap();
        assert!(status.success(), "ctr content ingest {digest}");
    }

    fn toc_digest(&self, digest: &str, zstd: bool) -> String {
        let mut cmd = Command::new("ctr-remote");
        cmd.arg("-a")
            .arg(&self.socket)
            .args(["images", "get-toc-digest"]);
        if zstd {
            cmd.arg("--zstdchunked");
        }
        let out = cmd.arg(digest).output().unwrap();
        assert!(
            out.status.success(),
            "ctr-remote get-toc-digest {digest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sample_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("app/", tar::EntryType::Directory, &[]);
    add("app/empty", tar::EntryType::Regular, &[]);
    let big: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    add("app/big.bin", tar::EntryType::Regular, &big);
    add("app/hello.txt", tar::EntryType::Regular, b"hello\n");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "app/link", "hello.txt").unwrap();
    b.into_inner().unwrap()
}

#[test]
fn ctr_remote_reads_the_toc_digest_of_our_layers() {
    let containerd = Containerd::start();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let tar = sample_tar();
    for (compression, prioritized) in [
        (Compression::Gzip, vec![]),
        (Compression::Gzip, vec!["app/hello.txt".to_string()]),
        (Compression::Zstd, vec![]),
    ] {
        let opts = BuildOptions {
            chunk_size: 256 * 1024,
            prioritized,
            ..BuildOptions::new(compression)
        };
        let mut blob = Vec::new();
        let built = build_layer(&tar[..], &mut blob, &opts).unwrap();
        let path = dir.path().join(built.blob_digest.replace(':', "-"));
        std::fs::write(&path, &blob).unwrap();
        containerd.ingest(&path, &built.blob_digest, built.blob_size);
        let theirs = containerd.toc_digest(&built.blob_digest, compression == Compression::Zstd);
        assert_eq!(theirs, built.toc_digest, "{compression:?}");
    }
}
