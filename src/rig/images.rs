//! Generated images for the bench and the tests: a static busybox layer so a container can run,
//! layers assembled into OCI or Docker images in an OCI layout, optionally under a
//! multi-platform index, and pushed to a registry.
//!
//! Pushing uses `curl` against the Distribution API on purpose: images built here stay an oracle
//! independent of lazysnap's own registry client.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use tar::{EntryType, Header};

use super::RigError;
use crate::digest::Digest;
use crate::image::{self, Descriptor, ImageConfig, Index, Manifest, OciLayout, Platform, RootFs};

/// Modification time of every generated entry (2023-11-14).
pub const TEST_MTIME: u64 = 1_700_000_000;

fn image_err(e: image::ImageError) -> RigError {
    RigError::Start {
        what: "test image".into(),
        detail: e.to_string(),
    }
}

fn tar_err(context: &str) -> impl FnOnce(std::io::Error) -> RigError + '_ {
    move |source| RigError::Io {
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

/// A layer with `/bin/busybox` (the host's static busybox from Debian `busybox-static`),
/// `/bin/sh` and a few applets as symlinks to it, `/etc/motd`, `/tmp`: enough to run `sh -c`.
pub fn busybox_layer() -> Result<Vec<u8>, RigError> {
    super::require_program("/bin/busybox", "busybox-static")?;
    let busybox = fs::read("/bin/busybox").map_err(RigError::io("reading /bin/busybox"))?;
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: EntryType, mode: u32, size: u64| {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(TEST_MTIME);
        h.set_size(size);
        h
    };
    for dir in ["bin", "etc", "proc", "sys", "dev", "root", "var"] {
        tar.append_data(
            &mut header(EntryType::Directory, 0o755, 0),
            dir,
            std::io::empty(),
        )
        .map_err(tar_err(dir))?;
    }
    tar.append_data(
        &mut header(EntryType::Directory, 0o1777, 0),
        "tmp",
        std::io::empty(),
    )
    .map_err(tar_err("tmp"))?;
    tar.append_data(
        &mut header(EntryType::Regular, 0o755, busybox.len() as u64),
        "bin/busybox",
        busybox.as_slice(),
    )
    .map_err(tar_err("bin/busybox"))?;
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
        let path = format!("bin/{applet}");
        tar.append_link(&mut header(EntryType::Symlink, 0o777, 0), &path, "busybox")
            .map_err(tar_err(&path))?;
    }
    let motd = b"hello from lazysnap\n";
    tar.append_data(
        &mut header(EntryType::Regular, 0o644, motd.len() as u64),
        "etc/motd",
        &motd[..],
    )
    .map_err(tar_err("etc/motd"))?;
    tar.into_inner().map_err(tar_err("end of archive"))
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
    pub config_digest: Digest,
    pub layers: Vec<Descriptor>,
    /// `sha256` of each uncompressed layer tar.
    pub diff_ids: Vec<Digest>,
}

/// Writes an image made of `layers` (uncompressed tars, bottom first) into `layout`, tagged `tag`
/// when given.
pub fn write_image(
    layout: &OciLayout,
    layers: &[Vec<u8>],
    options: &ImageOptions,
    tag: Option<&str>,
) -> Result<GeneratedImage, RigError> {
    let docker = options.docker_media_types;
    let mut layer_descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(crate::digest::sha256_digest(tar));
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
            diff_ids: diff_ids.iter().map(ToString::to_string).collect(),
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
) -> Result<Descriptor, RigError> {
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
) -> Result<Digest, RigError> {
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
    fn push_manifest_tree(&self, descriptor: &Descriptor) -> Result<(), RigError> {
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

    fn push_blob(&self, digest: &Digest) -> Result<(), RigError> {
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
            .ok_or_else(|| RigError::Start {
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

    fn put_manifest(&self, descriptor: &Descriptor, reference: &str) -> Result<(), RigError> {
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

fn curl(args: &[&str]) -> Result<String, RigError> {
    let output = Command::new("curl")
        .args(["-fsS", "--retry", "2"])
        .args(args)
        .output()
        .map_err(RigError::io("running curl (Debian package curl)"))?;
    if !output.status.success() {
        return Err(RigError::Start {
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
) -> Result<Vec<u8>, RigError> {
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
) -> Result<(), RigError> {
    let dest_text = dest.display().to_string();
    curl(&[
        "-o",
        &dest_text,
        &format!("{registry_url}/v2/{repository}/blobs/{digest}"),
    ])
    .map(|_| ())
}
