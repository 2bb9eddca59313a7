//! stargz-snapshotter's own tooling accepts lazysnap's output: containerd 1.6 pulls and unpacks
//! the converted images (eStargz and zstd:chunked), and `ctr-remote images get-toc-digest`
//! parses every layer's footer and TOC and returns the digest in our annotation.
//! Needs root, containerd and ctr-remote (scripts/install-deps.sh); fails loudly without them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lazysnap::image::{self, Manifest, OciLayout};
use lazysnap::testbed::images::{
    busybox_layer, every_entry_type_layer, fetch_manifest, push_layout_image, write_image,
    ImageOptions,
};
use lazysnap::testbed::RegistryServer;

fn lazysnap(args: &[&str]) -> Output {
    // LAZYSNAP_BIN lets a run pin a copy of the binary (the target dir may be shared).
    let bin =
        std::env::var("LAZYSNAP_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lazysnap").into());
    let output = Command::new(bin)
        .args(args)
        .env("LAZYSNAP_LOG", "warn")
        .output()
        .expect("running lazysnap");
    eprintln!(
        "$ lazysnap {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A standalone containerd with its root, state and socket in a temp dir; killed on drop.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Self {
        assert!(
            Path::new("/usr/bin/containerd").is_file()
                && Path::new("/usr/bin/ctr-remote").is_file(),
            "containerd and ctr-remote are required: run scripts/install-deps.sh"
        );
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test runs containerd and needs root"
        );
        let dir = tempfile::Builder::new()
            .prefix("lazysnap-containerd-")
            .tempdir()
            .unwrap();
        let d = dir.path().display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let me = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !me.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let output = Command::new(program)
            .arg("--address")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // containerd leaves overlay mounts of unpacked snapshots behind only while running
        // containers; none are started here.
    }
}

#[test]
fn ctr_remote_reads_the_toc_of_every_converted_layer() {
    let registry = RegistryServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&dir.path().join("src")).unwrap();
    write_image(
        &layout,
        &[busybox_layer().unwrap(), every_entry_type_layer().unwrap()],
        &ImageOptions::default(),
        Some("v1"),
    )
    .unwrap();
    let host = registry.host();
    push_layout_image(&layout, Some("v1"), &host, "src/every", "v1").unwrap();
    let containerd = Containerd::start();

    for (tag, extra) in [("esgz", None), ("zstd", Some("--zstdchunked"))] {
        let dst = format!("{host}/dst/every:{tag}");
        let mut args = vec!["convert"];
        args.extend(extra);
        let src = format!("{host}/src/every:v1");
        args.extend([src.as_str(), dst.as_str()]);
        assert!(lazysnap(&args).status.success());

        // containerd's normal pull and unpack accept the image.
        containerd.run("/usr/bin/ctr", &["images", "pull", "--plain-http", &dst]);

        let manifest: Manifest = image::parse_json(
            "m",
            &fetch_manifest(&registry.url(), "dst/every", tag).unwrap(),
        )
        .unwrap();
        for layer in &manifest.layers {
            let mut get = vec!["images", "get-toc-digest"];
            if extra.is_some() {
                get.push("--zstdchunked");
            }
            get.push(&layer.digest);
            let digest = containerd.run("/usr/bin/ctr-remote", &get);
            assert_eq!(
                digest.trim(),
                layer.annotations["containerd.io/snapshot/stargz/toc.digest"],
                "ctr-remote's TOC digest of {} ({tag})",
                layer.digest
            );
        }
    }
}
