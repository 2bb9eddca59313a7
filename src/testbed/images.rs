//! Generated test images: tar layers with every entry type (and a static busybox layer so a
//! container can run), assembled into OCI or Docker images in an OCI layout, optionally under a
//! multi-platform index, and pushed to a test registry. Also compares extracted trees.
//!
//! Pushing uses `curl` against the Distribution API on purpose: the test bed stays an oracle
//! independent of lazysnap's own registry client.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tar::{EntryType, Header};

use super::TestbedError;
use crate::image::{self, Descriptor, ImageConfig, Index, Manifest, OciLayout, Platform, RootFs};

/// Modification time of every generated entry (2023-11-14).
pub const TEST_MTIME: u64 = 1_700_000_000;
/// Size of the generated multi-chunk file `data/big.bin` (more than two default 4 MiB chunks).
pub const BIG_FILE_SIZE: usize = 9 * 1024 * 1024 + 123;

fn image_err(e: image::ImageError) -> TestbedError {
    TestbedError::Start {
        what: "test image".into(),
        detail: e.to_string(),
    }
}

fn tar_err(context: &str) -> impl FnOnce(std::io::Error) -> TestbedError + '_ {
    move |source| TestbedError::Io {
        context: format!("building the test layer: {context}"),
        source,
    }
}

/// Deterministic pseudo-random bytes (xorshift), half of each 4 KiB block compressible text so
/// compressed sizes are realistic.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let block = (out.len() / 4096) % 2;
        if block == 0 {
            out.extend_from_slice(&state.to_le_bytes());
        } else {
            let word = b"lazysnap chunk text ";
            let at = (state % word.len() as u64) as usize;
            out.extend_from_slice(&word[at..]);
        }
    }
    out.truncate(len);
    out
}

/// Tar writer with the header details the test layers need.
struct LayerTar {
    builder: tar::Builder<Vec<u8>>,
}

struct Meta<'a> {
    mode: u32,
    uid: u64,
    gid: u64,
    user: &'a str,
    group: &'a str,
}

const ROOT: Meta<'static> = Meta {
    mode: 0o755,
    uid: 0,
    gid: 0,
    user: "root",
    group: "root",
};

impl LayerTar {
    fn new() -> Self {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Complete);
        Self { builder }
    }

    fn header(kind: EntryType, meta: &Meta<'_>, size: u64) -> Result<Header, TestbedError> {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(meta.mode);
        h.set_uid(meta.uid);
        h.set_gid(meta.gid);
        h.set_username(meta.user).map_err(tar_err("user name"))?;
        h.set_groupname(meta.group).map_err(tar_err("group name"))?;
        h.set_mtime(TEST_MTIME);
        h.set_size(size);
        Ok(h)
    }

    /// A PAX extended header (`x`) applying `records` to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> Result<(), TestbedError> {
        let mut data = Vec::new();
        for (key, value) in records {
            let body_len = key.len() + value.len() + 3; // ' ', '=', '\n'
            let mut len = body_len + 1;
            while len.to_string().len() + body_len != len {
                len = len.to_string().len() + body_len;
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut h = Self::header(EntryType::XHeader, &ROOT, data.len() as u64)?;
        h.set_mode(0o644);
        h.set_path("PaxHeaders/entry")
            .map_err(tar_err("pax header"))?;
        h.set_cksum();
        self.builder
            .append(&h, data.as_slice())
            .map_err(tar_err("pax header"))
    }

    fn dir(&mut self, path: &str, meta: &Meta<'_>) -> Result<(), TestbedError> {
        let mut h = Self::header(EntryType::Directory, meta, 0)?;
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .map_err(tar_err(path))
    }

    fn file(&mut self, path: &str, meta: &Meta<'_>, data: &[u8]) -> Result<(), TestbedError> {
        let mut h = Self::header(EntryType::Regular, meta, data.len() as u64)?;
        self.builder
            .append_data(&mut h, path, data)
            .map_err(tar_err(path))
    }

    fn link(
        &mut self,
        kind: EntryType,
        path: &str,
        target: &str,
        meta: &Meta<'_>,
    ) -> Result<(), TestbedError> {
        let mut h = Self::header(kind, meta, 0)?;
        self.builder
            .append_link(&mut h, path, target)
            .map_err(tar_err(path))
    }

    fn special(
        &mut self,
        kind: EntryType,
        path: &str,
        meta: &Meta<'_>,
        major: u32,
        minor: u32,
    ) -> Result<(), TestbedError> {
        let mut h = Self::header(kind, meta, 0)?;
        h.set_device_major(major).map_err(tar_err(path))?;
        h.set_device_minor(minor).map_err(tar_err(path))?;
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .map_err(tar_err(path))
    }

    fn finish(self) -> Result<Vec<u8>, TestbedError> {
        self.builder.into_inner().map_err(tar_err("end of archive"))
    }
}

/// Path of the long (> 100 bytes) name in [`every_entry_type_layer`] (written with a GNU long
/// name header).
pub const LONG_NAME: &str = "deep/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/long-file-name-over-one-hundred-bytes.txt";
/// A UTF-8 name longer than 100 bytes, written with a PAX `path` record.
pub const PAX_UTF8_NAME: &str = "ünïcødé/文件-名前-ファイル-файл-αρχείο-with-a-long-tail-to-pass-the-ustar-limit-of-one-hundred-bytes.txt";

/// An uncompressed tar layer holding every entry type lazysnap must carry through: dirs; regular
/// files from empty to multi-chunk ([`BIG_FILE_SIZE`]); relative and absolute symlinks; a
/// hardlink; whiteouts `.wh.*` and an opaque `.wh..wh..opq`; PAX xattrs; a fifo; a char device;
/// setuid / setgid / sticky modes; owners with names; long and UTF-8 names.
pub fn every_entry_type_layer() -> Result<Vec<u8>, TestbedError> {
    let mut t = LayerTar::new();
    let user = Meta {
        mode: 0o644,
        uid: 1000,
        gid: 1001,
        user: "alice",
        group: "staff",
    };
    t.dir("data", &ROOT)?;
    t.file("data/empty", &ROOT.with_mode(0o644), b"")?;
    t.file("data/small.txt", &user, b"hello, lazy world\n")?;
    t.file(
        "data/medium.bin",
        &ROOT.with_mode(0o600),
        &pseudo_random_bytes(300 * 1024 + 7, 1),
    )?;
    t.file(
        "data/big.bin",
        &ROOT.with_mode(0o644),
        &pseudo_random_bytes(BIG_FILE_SIZE, 2),
    )?;
    t.file("data/exactly-4096", &ROOT.with_mode(0o644), &[b'x'; 4096])?;
    t.link(
        EntryType::Symlink,
        "data/link-rel",
        "small.txt",
        &ROOT.with_mode(0o777),
    )?;
    t.link(
        EntryType::Symlink,
        "data/link-abs",
        "/etc/motd",
        &ROOT.with_mode(0o777),
    )?;
    t.link(
        EntryType::Symlink,
        "data/link-dangling",
        "../nowhere/at/all",
        &ROOT.with_mode(0o777),
    )?;
    t.link(
        EntryType::Link,
        "data/hardlink-to-small",
        "data/small.txt",
        &user,
    )?;
    t.file(
        "data/setuid",
        &ROOT.with_mode(0o4755),
        b"#!/bin/sh\necho setuid\n",
    )?;
    t.file(
        "data/setgid",
        &ROOT.with_mode(0o2755),
        b"#!/bin/sh\necho setgid\n",
    )?;
    t.dir("data/sticky", &ROOT.with_mode(0o1777))?;
    t.dir("data/private", &user.with_mode(0o700))?;
    t.file("data/private/secret", &user.with_mode(0o400), b"s3cr3t")?;
    t.pax(&[
        ("SCHILY.xattr.user.comment", b"a comment"),
        ("SCHILY.xattr.user.binary", &[0, 1, 2, 255]),
    ])?;
    t.file("data/with-xattrs", &ROOT.with_mode(0o644), b"xattrs here\n")?;
    t.pax(&[("SCHILY.xattr.user.dir", b"on a dir")])?;
    t.dir("data/xattr-dir", &ROOT)?;
    t.special(EntryType::Fifo, "data/fifo", &ROOT.with_mode(0o644), 0, 0)?;
    t.special(
        EntryType::Char,
        "data/null-dev",
        &ROOT.with_mode(0o666),
        1,
        3,
    )?;
    t.dir("whiteouts", &ROOT)?;
    t.file("whiteouts/.wh.deleted-file", &ROOT.with_mode(0o644), b"")?;
    t.dir("whiteouts/opaque", &ROOT)?;
    t.file("whiteouts/opaque/.wh..wh..opq", &ROOT.with_mode(0o644), b"")?;
    t.file("whiteouts/opaque/kept", &ROOT.with_mode(0o644), b"kept\n")?;
    t.dir("deep", &ROOT)?;
    t.file(LONG_NAME, &ROOT.with_mode(0o644), b"long name\n")?;
    t.link(
        EntryType::Symlink,
        "deep/long-target-link",
        LONG_NAME,
        &ROOT.with_mode(0o777),
    )?;
    t.dir("ünïcødé", &ROOT)?;
    t.file(
        "ünïcødé/ファイル.txt",
        &ROOT.with_mode(0o644),
        "こんにちは\n".as_bytes(),
    )?;
    t.pax(&[("path", PAX_UTF8_NAME.as_bytes())])?;
    t.file("pax-short-name", &ROOT.with_mode(0o644), b"pax path\n")?;
    t.dir("many", &ROOT)?;
    for i in 0..64 {
        t.file(
            &format!("many/f{i:03}"),
            &ROOT.with_mode(0o644),
            &pseudo_random_bytes(i * 97, i as u64 + 10),
        )?;
    }
    t.finish()
}

impl Meta<'_> {
    fn with_mode(&self, mode: u32) -> Self {
        Meta { mode, ..*self }
    }
}

/// A layer with `/bin/busybox` (the host's static busybox from Debian `busybox-static`),
/// `/bin/sh` and a few applets as symlinks to it, `/etc/motd`, `/tmp`: enough to run `sh -c`.
pub fn busybox_layer() -> Result<Vec<u8>, TestbedError> {
    super::require_program("/bin/busybox", "busybox-static")?;
    let busybox = fs::read("/bin/busybox").map_err(TestbedError::io("reading /bin/busybox"))?;
    let mut t = LayerTar::new();
    for dir in ["bin", "etc", "proc", "sys", "dev", "root", "var"] {
        t.dir(dir, &ROOT)?;
    }
    t.dir("tmp", &ROOT.with_mode(0o1777))?;
    t.file("bin/busybox", &ROOT, &busybox)?;
    for applet in [
        "sh",
        "ls",
        "cat",
        "echo",
        "sha256sum",
        "find",
        "stat",
        "head",
        "wc",
    ] {
        t.link(
            EntryType::Symlink,
            &format!("bin/{applet}"),
            "busybox",
            &ROOT.with_mode(0o777),
        )?;
    }
    t.file("etc/motd", &ROOT.with_mode(0o644), b"hello from lazysnap\n")?;
    t.finish()
}

/// Size of `app/big.bin` in [`workload_layer`].
pub const WORKLOAD_BIG_FILE_SIZE: usize = 8 << 20;

/// The script [`workload_layer`] runs as its Cmd (over [`busybox_layer`]): it reads `app/b.txt`,
/// `app/a.txt`, the first 4 KiB of `app/big.bin` and 8 KiB at 6 MiB into it, in that order.
pub const WORKLOAD_SCRIPT: &str = "#!/bin/sh\ncat /app/b.txt\ncat /app/a.txt\nhead -c 4096 /app/big.bin | wc -c\ndd if=/app/big.bin bs=4096 skip=1536 count=2 status=none | wc -c\necho workload-done\n";

/// What [`WORKLOAD_SCRIPT`] prints.
pub const WORKLOAD_OUTPUT: &str = "bee\nay\n4096\n8192\nworkload-done\n";

/// A layer for recording a workload (stacked on [`busybox_layer`]): `/app/run.sh`
/// ([`WORKLOAD_SCRIPT`]), the files it reads, files it never touches (`app/c.txt`,
/// `app/unused.bin`), and `/bin/dd`.
pub fn workload_layer() -> Result<Vec<u8>, TestbedError> {
    let mut t = LayerTar::new();
    t.dir("bin", &ROOT)?;
    t.link(
        EntryType::Symlink,
        "bin/dd",
        "busybox",
        &ROOT.with_mode(0o777),
    )?;
    t.dir("app", &ROOT)?;
    t.file("app/c.txt", &ROOT.with_mode(0o644), b"sea\n")?;
    t.file(
        "app/unused.bin",
        &ROOT.with_mode(0o644),
        &pseudo_random_bytes(1 << 20, 11),
    )?;
    t.file("app/a.txt", &ROOT.with_mode(0o644), b"ay\n")?;
    t.file(
        "app/big.bin",
        &ROOT.with_mode(0o644),
        &pseudo_random_bytes(WORKLOAD_BIG_FILE_SIZE, 12),
    )?;
    t.file("app/b.txt", &ROOT.with_mode(0o644), b"bee\n")?;
    t.file(
        "app/run.sh",
        &ROOT.with_mode(0o755),
        WORKLOAD_SCRIPT.as_bytes(),
    )?;
    t.finish()
}

/// A layer whose files no workload reads: `data/notes.txt`.
pub fn unread_layer() -> Result<Vec<u8>, TestbedError> {
    let mut t = LayerTar::new();
    t.dir("data", &ROOT)?;
    t.file(
        "data/notes.txt",
        &ROOT.with_mode(0o644),
        b"nobody reads this\n",
    )?;
    t.finish()
}

/// How generated layer blobs are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// Plain tar.
    None,
    /// tar+gzip.
    Gzip,
    /// tar+zstd.
    Zstd,
}

/// How to assemble a generated image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub platform: Platform,
    pub compression: LayerCompression,
    /// Docker schema 2 media types instead of OCI.
    pub docker_media_types: bool,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.Env`.
    pub env: Vec<String>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            platform: Platform::host(),
            compression: LayerCompression::Gzip,
            docker_media_types: false,
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into()],
        }
    }
}

/// An image written into an OCI layout.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// Descriptor of the manifest (with the platform set).
    pub manifest: Descriptor,
    pub config_digest: String,
    pub layers: Vec<Descriptor>,
    /// `sha256` of each uncompressed layer tar.
    pub diff_ids: Vec<String>,
}

/// Writes an image made of `layers` (uncompressed tars, bottom first) into `layout`, tagged `tag`
/// when given.
pub fn write_image(
    layout: &OciLayout,
    layers: &[Vec<u8>],
    options: &ImageOptions,
    tag: Option<&str>,
) -> Result<GeneratedImage, TestbedError> {
    let docker = options.docker_media_types;
    let mut layer_descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(image::sha256_digest(tar));
        let (blob, media_type) = match options.compression {
            LayerCompression::None => (
                tar.clone(),
                if docker {
                    "application/vnd.docker.image.rootfs.diff.tar"
                } else {
                    image::OCI_LAYER_TAR
                },
            ),
            LayerCompression::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                enc.write_all(tar).map_err(tar_err("gzip"))?;
                let blob = enc.finish().map_err(tar_err("gzip"))?;
                (
                    blob,
                    if docker {
                        image::DOCKER_LAYER_GZIP
                    } else {
                        image::OCI_LAYER_GZIP
                    },
                )
            }
            LayerCompression::Zstd => (
                zstd::encode_all(tar.as_slice(), 3).map_err(tar_err("zstd"))?,
                image::OCI_LAYER_ZSTD,
            ),
        };
        let digest = layout.write_blob(&blob).map_err(image_err)?;
        layer_descriptors.push(Descriptor::new(media_type, &digest, blob.len() as u64));
    }
    let mut extra = serde_json::Map::new();
    extra.insert(
        "config".into(),
        serde_json::json!({ "Cmd": options.cmd, "Env": options.env }),
    );
    extra.insert(
        "created".into(),
        serde_json::Value::String("2023-11-14T22:13:20Z".into()),
    );
    let config = ImageConfig {
        architecture: options.platform.architecture.clone(),
        os: options.platform.os.clone(),
        variant: options.platform.variant.clone(),
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids: diff_ids.clone(),
        },
        extra,
    };
    let config_bytes = image::to_json("config", &config).map_err(image_err)?;
    let config_digest = layout.write_blob(&config_bytes).map_err(image_err)?;
    let (manifest_type, config_type) = if docker {
        (image::DOCKER_MANIFEST, image::DOCKER_CONFIG)
    } else {
        (image::OCI_MANIFEST, image::OCI_CONFIG)
    };
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(manifest_type.into()),
        config: Descriptor::new(config_type, &config_digest, config_bytes.len() as u64),
        layers: layer_descriptors.clone(),
        annotations: BTreeMap::new(),
        extra: serde_json::Map::new(),
    };
    let manifest_bytes = image::to_json("manifest", &manifest).map_err(image_err)?;
    let manifest_digest = layout.write_blob(&manifest_bytes).map_err(image_err)?;
    let mut descriptor =
        Descriptor::new(manifest_type, &manifest_digest, manifest_bytes.len() as u64);
    descriptor.platform = Some(options.platform.clone());
    layout
        .add_to_index(descriptor.clone(), tag)
        .map_err(image_err)?;
    Ok(GeneratedImage {
        manifest: descriptor,
        config_digest,
        layers: layer_descriptors,
        diff_ids,
    })
}

/// Writes an index (OCI, or a Docker manifest list) over `images` into `layout`, tagged `tag`.
pub fn write_index(
    layout: &OciLayout,
    images: &[GeneratedImage],
    docker_media_types: bool,
    tag: Option<&str>,
) -> Result<Descriptor, TestbedError> {
    let media_type = if docker_media_types {
        image::DOCKER_MANIFEST_LIST
    } else {
        image::OCI_INDEX
    };
    let mut index = Index::new_oci();
    index.media_type = Some(media_type.into());
    index.manifests = images.iter().map(|i| i.manifest.clone()).collect();
    let bytes = image::to_json("index", &index).map_err(image_err)?;
    let digest = layout.write_blob(&bytes).map_err(image_err)?;
    let descriptor = Descriptor::new(media_type, &digest, bytes.len() as u64);
    layout
        .add_to_index(descriptor.clone(), tag)
        .map_err(image_err)?;
    Ok(descriptor)
}

/// Pushes the image (or index, with every manifest it lists) tagged `tag` in `layout` to
/// `http://{registry_host}/v2/{repository}` under `target_tag`. Returns the top digest.
pub fn push_layout_image(
    layout: &OciLayout,
    tag: Option<&str>,
    registry_host: &str,
    repository: &str,
    target_tag: &str,
) -> Result<String, TestbedError> {
    let top = layout.resolve(tag).map_err(image_err)?;
    let pusher = Pusher {
        layout,
        base: format!("http://{registry_host}/v2/{repository}"),
    };
    pusher.push_manifest_tree(&top)?;
    pusher.put_manifest(&top, target_tag)?;
    Ok(top.digest)
}

struct Pusher<'a> {
    layout: &'a OciLayout,
    base: String,
}

impl Pusher<'_> {
    fn push_manifest_tree(&self, descriptor: &Descriptor) -> Result<(), TestbedError> {
        let bytes = self
            .layout
            .read_blob(&descriptor.digest)
            .map_err(image_err)?;
        if image::is_index(&descriptor.media_type) {
            let index: Index = image::parse_json("index", &bytes).map_err(image_err)?;
            for child in &index.manifests {
                self.push_manifest_tree(child)?;
                self.put_manifest(child, &child.digest)?;
            }
        } else {
            let manifest: Manifest = image::parse_json("manifest", &bytes).map_err(image_err)?;
            for blob in manifest
                .layers
                .iter()
                .chain(std::iter::once(&manifest.config))
            {
                self.push_blob(&blob.digest)?;
            }
        }
        Ok(())
    }

    fn push_blob(&self, digest: &str) -> Result<(), TestbedError> {
        let path = self.layout.blob_path(digest).map_err(image_err)?;
        let start = curl(&[
            "-X",
            "POST",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("{}/blobs/uploads/", self.base),
        ])?;
        let location = start
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("location")
                    .then(|| value.trim().to_string())
            })
            .ok_or_else(|| TestbedError::Start {
                what: "blob upload".into(),
                detail: format!("no Location header in {start:?}"),
            })?;
        let mut url = if location.starts_with('/') {
            let host_end = self.base.find("/v2/").unwrap_or(self.base.len());
            format!("{}{location}", &self.base[..host_end])
        } else {
            location
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", path.display()),
            "-o",
            "/dev/null",
            &url,
        ])?;
        Ok(())
    }

    fn put_manifest(&self, descriptor: &Descriptor, reference: &str) -> Result<(), TestbedError> {
        let path = self
            .layout
            .blob_path(&descriptor.digest)
            .map_err(image_err)?;
        curl(&[
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {}", descriptor.media_type),
            "--data-binary",
            &format!("@{}", path.display()),
            "-o",
            "/dev/null",
            &format!("{}/manifests/{reference}", self.base),
        ])?;
        Ok(())
    }
}

fn curl(args: &[&str]) -> Result<String, TestbedError> {
    let output = Command::new("curl")
        .args(["-fsS", "--retry", "2"])
        .args(args)
        .output()
        .map_err(TestbedError::io("running curl (Debian package curl)"))?;
    if !output.status.success() {
        return Err(TestbedError::Start {
            what: format!("curl {}", args.join(" ")),
            detail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `Accept` header listing every manifest and index media type.
pub const ACCEPT_ALL_MANIFESTS: &str = "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Fetches a manifest or index (`reference` is a tag or digest) with curl; returns its bytes.
pub fn fetch_manifest(
    registry_url: &str,
    repository: &str,
    reference: &str,
) -> Result<Vec<u8>, TestbedError> {
    curl(&[
        "-H",
        ACCEPT_ALL_MANIFESTS,
        &format!("{registry_url}/v2/{repository}/manifests/{reference}"),
    ])
    .map(String::into_bytes)
}

/// Downloads a blob with curl into `dest`.
pub fn fetch_blob(
    registry_url: &str,
    repository: &str,
    digest: &str,
    dest: &Path,
) -> Result<(), TestbedError> {
    let dest_text = dest.display().to_string();
    curl(&[
        "-o",
        &dest_text,
        &format!("{registry_url}/v2/{repository}/blobs/{digest}"),
    ])
    .map(|_| ())
}

/// [`tree_listing`] without the entries an eStargz layer adds (`stargz.index.json` and the
/// prefetch landmarks), for comparing a converted layer with its source.
pub fn tree_listing_without_estargz_entries(root: &Path) -> Result<Vec<String>, TestbedError> {
    Ok(tree_listing(root)?
        .into_iter()
        .filter(|l| {
            ![
                "stargz.index.json ",
                ".prefetch.landmark ",
                ".no.prefetch.landmark ",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .collect())
}

/// Extracts a layer blob (tar, tar.gz or tar.zst) with GNU tar into `dest`, keeping owners,
/// modes, xattrs and device nodes (needs root for the latter two).
pub fn extract_with_gnu_tar(blob: &Path, dest: &Path) -> Result<(), TestbedError> {
    fs::create_dir_all(dest).map_err(TestbedError::io(format!("creating {}", dest.display())))?;
    let output = Command::new("tar")
        .args([
            "--numeric-owner",
            "--same-owner",
            "-p",
            "--xattrs",
            "--xattrs-include=*",
        ])
        .arg("-C")
        .arg(dest)
        .arg("-xf")
        .arg(blob)
        .output()
        .map_err(TestbedError::io("running GNU tar"))?;
    if !output.status.success() {
        return Err(TestbedError::Start {
            what: format!("tar -xf {}", blob.display()),
            detail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

/// One line per entry of the tree under `root`, sorted by path: type, mode, owner, size, mtime
/// (not for directories, see below),
/// sha256 of the content, link target, device numbers, xattrs, and the hardlink group (first path
/// sharing the inode). Two trees are equal when their listings are.
pub fn tree_listing(root: &Path) -> Result<Vec<String>, TestbedError> {
    let mut paths = Vec::new();
    collect(root, root, &mut paths)?;
    paths.sort();
    let mut first_path_of_inode: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut lines = Vec::new();
    for rel in paths {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)
            .map_err(TestbedError::io(format!("stat {}", path.display())))?;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else {
            "reg"
        };
        let mut line = format!(
            "{rel} {kind} mode={:o} uid={} gid={}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
        );
        // GNU tar restores a directory's mtime when it leaves the directory in member order, so
        // a directory's mtime after extraction depends on the order of the archive (and
        // prioritized files are moved out of order on purpose): only non-directories carry it.
        if !ft.is_dir() {
            line.push_str(&format!(" mtime={}", meta.mtime()));
        }
        if ft.is_file() {
            let data =
                fs::read(&path).map_err(TestbedError::io(format!("reading {}", path.display())))?;
            line.push_str(&format!(
                " size={} {}",
                data.len(),
                image::sha256_digest(&data)
            ));
            if meta.nlink() > 1 {
                let first = first_path_of_inode
                    .entry((meta.dev(), meta.ino()))
                    .or_insert_with(|| rel.clone());
                line.push_str(&format!(" linkgroup={first}"));
            }
        }
        if ft.is_symlink() {
            let target = fs::read_link(&path)
                .map_err(TestbedError::io(format!("readlink {}", path.display())))?;
            line.push_str(&format!(" -> {}", target.display()));
        }
        if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            line.push_str(&format!(" dev={},{}", libc::major(rdev), libc::minor(rdev)));
        }
        if !ft.is_symlink() {
            for (name, value) in xattrs(&path)? {
                line.push_str(&format!(" xattr:{name}={}", hex::encode(value)));
            }
        }
        lines.push(line);
    }
    Ok(lines)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), TestbedError> {
    let entries =
        fs::read_dir(dir).map_err(TestbedError::io(format!("listing {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(TestbedError::io(format!("listing {}", dir.display())))?;
        let path: PathBuf = entry.path();
        let rel = path
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_dir = entry
            .file_type()
            .map_err(TestbedError::io(format!("stat {}", path.display())))?
            .is_dir();
        out.push(rel);
        if is_dir {
            collect(root, &path, out)?;
        }
    }
    Ok(())
}

fn xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, TestbedError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| TestbedError::Start {
        what: "xattr".into(),
        detail: "NUL in path".into(),
    })?;
    let io = |what: &str| TestbedError::io(format!("{what} {}", path.display()));
    // SAFETY: c_path is a valid NUL-terminated string; a null buffer asks for the size.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        return Err(io("listxattr")(std::io::Error::last_os_error()));
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: names has room for len bytes.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(io("listxattr")(std::io::Error::last_os_error()));
    }
    names.truncate(len as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name).map_err(|_| TestbedError::Start {
            what: "xattr".into(),
            detail: "NUL in name".into(),
        })?;
        let mut value = vec![0u8; 65536];
        // SAFETY: value has room for its length; c_path and c_name are NUL-terminated.
        let n = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if n < 0 {
            return Err(io("getxattr")(std::io::Error::last_os_error()));
        }
        value.truncate(n as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_type_layer_has_every_type() {
        let tar_bytes = every_entry_type_layer().unwrap();
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let mut kinds = std::collections::BTreeSet::new();
        let mut names = Vec::new();
        let mut xattr_count = 0;
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            kinds.insert(format!("{:?}", entry.header().entry_type()));
            names.push(entry.path().unwrap().to_string_lossy().into_owned());
            if let Some(exts) = entry.pax_extensions().unwrap() {
                xattr_count += exts
                    .filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .key()
                            .unwrap()
                            .starts_with("SCHILY.xattr.")
                    })
                    .count();
            }
        }
        for kind in ["Directory", "Regular", "Symlink", "Link", "Fifo", "Char"] {
            assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
        }
        assert_eq!(xattr_count, 3);
        assert!(names.iter().any(|n| n == LONG_NAME));
        assert!(names.iter().any(|n| n == PAX_UTF8_NAME));
        assert!(names.iter().any(|n| n.ends_with(".wh..wh..opq")));
        assert!(LONG_NAME.len() > 100 && PAX_UTF8_NAME.len() > 100);
    }

    #[test]
    fn writes_single_and_multi_platform_images() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let layer = every_entry_type_layer().unwrap();
        let amd = write_image(
            &layout,
            std::slice::from_ref(&layer),
            &ImageOptions {
                platform: Platform::parse("linux/amd64").unwrap(),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let arm = write_image(
            &layout,
            &[layer],
            &ImageOptions {
                platform: Platform::parse("linux/arm64").unwrap(),
                docker_media_types: true,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        write_index(&layout, &[amd.clone(), arm], false, Some("multi")).unwrap();
        let top = layout.resolve(Some("multi")).unwrap();
        let index: Index =
            image::parse_json("index", &layout.read_blob(&top.digest).unwrap()).unwrap();
        let chosen =
            image::select_platform(&index, &Platform::parse("linux/amd64").unwrap()).unwrap();
        assert_eq!(chosen.digest, amd.manifest.digest);
        let m: Manifest =
            image::parse_json("m", &layout.read_blob(&chosen.digest).unwrap()).unwrap();
        let config: ImageConfig =
            image::parse_json("c", &layout.read_blob(&m.config.digest).unwrap()).unwrap();
        assert_eq!(config.rootfs.diff_ids, amd.diff_ids);
    }

    #[test]
    fn pushes_to_a_real_registry_and_extracts_with_gnu_tar() {
        let registry = crate::testbed::RegistryServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(&dir.path().join("oci")).unwrap();
        let layer = every_entry_type_layer().unwrap();
        let image = write_image(
            &layout,
            &[busybox_layer().unwrap(), layer],
            &ImageOptions::default(),
            Some("v1"),
        )
        .unwrap();
        let digest =
            push_layout_image(&layout, Some("v1"), &registry.host(), "test/every", "v1").unwrap();
        assert_eq!(digest, image.manifest.digest);
        let got = curl(&[
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("{}/v2/test/every/manifests/v1", registry.url()),
        ])
        .unwrap();
        assert_eq!(image::sha256_digest(got.as_bytes()), digest);
        let out = dir.path().join("x");
        extract_with_gnu_tar(&layout.blob_path(&image.layers[1].digest).unwrap(), &out).unwrap();
        let listing = tree_listing(&out).unwrap();
        let find = |p: &str| {
            listing
                .iter()
                .find(|l| l.starts_with(&format!("{p} ")))
                .cloned()
                .unwrap_or_else(|| panic!("{p} missing: {listing:#?}"))
        };
        assert!(
            find("data/null-dev").contains("char") && find("data/null-dev").contains("dev=1,3")
        );
        assert!(find("data/with-xattrs").contains("xattr:user.comment="));
        assert!(find("data/setuid").contains("mode=4755"));
        assert!(find("data/hardlink-to-small").contains("linkgroup=data/hardlink-to-small"));
        assert!(find("data/small.txt").contains("uid=1000 gid=1001"));
        find(PAX_UTF8_NAME);
        find(LONG_NAME);
    }
}
