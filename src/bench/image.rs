//! The bench's sample image: the test bed's busybox layer plus an "app" layer of about
//! `layer_mb` MB (shared libraries, assets, a config file and a start script) whose startup
//! command reads only the small files. Written as a plain gzip OCI image, and, when the
//! `lazysnap convert` binary cannot be used, converted to eStargz in-process.

use std::collections::BTreeMap;
use std::path::Path;

use tar::{EntryType, Header};

use crate::estargz::{self, BuildOptions, Compression};
use crate::image::{self, Descriptor, ImageConfig, Manifest, OciLayout, Platform, RootFs};
use crate::rig::images::{busybox_layer, pseudo_random_bytes, TEST_MTIME};

use super::BenchError;

/// What the container runs: reads two small files of the app layer and prints `ready`.
pub const WORKLOAD: [&str; 3] = [
    "/bin/sh",
    "-c",
    "cat /app/etc/config.txt /app/bin/start.sh >/dev/null && echo ready",
];

/// The line the workload prints once it has started.
pub const READY_MARKER: &str = "ready";

/// Files the workload reads first, in order: the prefetch list given to the converter.
pub const STARTUP_FILES: [&str; 3] = ["bin/busybox", "app/etc/config.txt", "app/bin/start.sh"];

/// The generated image, as uncompressed layer tars (bottom first).
#[derive(Debug, Clone)]
pub struct SampleImage {
    pub layers: Vec<Vec<u8>>,
    /// Regular files in the app layer.
    pub app_files: usize,
    /// Bytes of file content in the app layer.
    pub app_bytes: u64,
}

/// Builds the busybox layer and an app layer with about `layer_mb` MB of file content.
pub fn sample_image(layer_mb: u64) -> Result<SampleImage, BenchError> {
    let busybox = busybox_layer()?;
    let (app, app_files, app_bytes) = app_layer(layer_mb.saturating_mul(1_000_000))?;
    Ok(SampleImage {
        layers: vec![busybox, app],
        app_files,
        app_bytes,
    })
}

fn tar_error(path: &str) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        context: format!("building the sample app layer (entry {path})"),
        source,
    }
}

struct AppTar {
    builder: tar::Builder<Vec<u8>>,
    files: usize,
    bytes: u64,
}

impl AppTar {
    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(TEST_MTIME);
        header.set_size(size);
        header
    }

    fn dir(&mut self, path: &str) -> Result<(), BenchError> {
        let mut header = Self::header(EntryType::Directory, 0o755, 0);
        self.builder
            .append_data(&mut header, path, std::io::empty())
            .map_err(tar_error(path))
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), BenchError> {
        let mut header = Self::header(EntryType::Regular, mode, data.len() as u64);
        self.builder
            .append_data(&mut header, path, data)
            .map_err(tar_error(path))?;
        self.files += 1;
        self.bytes += data.len() as u64;
        Ok(())
    }
}

/// About 60% of `target_bytes` in eight "shared libraries", the rest in 64–256 KiB assets, plus
/// the small files the workload reads. Content is half random, half text (compresses ~2:1).
fn app_layer(target_bytes: u64) -> Result<(Vec<u8>, usize, u64), BenchError> {
    let mut tar = AppTar {
        builder: tar::Builder::new(Vec::new()),
        files: 0,
        bytes: 0,
    };
    tar.builder.mode(tar::HeaderMode::Complete);
    for dir in [
        "app",
        "app/bin",
        "app/etc",
        "app/lib",
        "app/share",
        "app/share/assets",
    ] {
        tar.dir(dir)?;
    }
    tar.file(
        "app/bin/start.sh",
        0o755,
        b"#!/bin/sh\n# starts the sample service\nexec echo ready\n",
    )?;
    let config: String = (0..64)
        .map(|i| format!("option_{i:02} = value-{i:02}\n"))
        .collect();
    tar.file("app/etc/config.txt", 0o644, config.as_bytes())?;

    let library_total = target_bytes / 10 * 6;
    let library_size = (library_total / 8) as usize;
    if library_size > 0 {
        for index in 0..8u64 {
            let data = pseudo_random_bytes(library_size, 1000 + index);
            tar.file(&format!("app/lib/libsample{index}.so"), 0o755, &data)?;
        }
    }
    let mut seed = 5000u64;
    while tar.bytes < target_bytes {
        let size = 64 * 1024 + (seed % 4) as usize * 64 * 1024;
        let remaining = (target_bytes - tar.bytes) as usize;
        let data = pseudo_random_bytes(size.min(remaining), seed);
        tar.file(
            &format!("app/share/assets/asset-{seed:05}.dat"),
            0o644,
            &data,
        )?;
        seed += 1;
    }
    let (files, bytes) = (tar.files, tar.bytes);
    let data = tar
        .builder
        .into_inner()
        .map_err(tar_error("end of archive"))?;
    Ok((data, files, bytes))
}

/// Converts every layer of `sample` to eStargz (gzip, `prioritized` first) with the in-process
/// writer and writes the image into `layout` tagged `tag`, with `cmd` as its command.
pub fn write_estargz_image(
    layout: &OciLayout,
    sample: &SampleImage,
    prioritized: &[String],
    cmd: &[String],
    tag: &str,
) -> Result<Descriptor, BenchError> {
    let image_error = |e: image::ImageError| BenchError::Step {
        what: "writing the eStargz sample image".into(),
        detail: e.to_string(),
    };
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (index, tar) in sample.layers.iter().enumerate() {
        let options = BuildOptions {
            prioritized: prioritized.to_vec(),
            ..BuildOptions::new(Compression::Gzip)
        };
        let mut blob = Vec::new();
        let built = estargz::build_layer(tar.as_slice(), &mut blob, &options).map_err(|e| {
            BenchError::Step {
                what: format!("converting sample layer {index} to eStargz"),
                detail: e.to_string(),
            }
        })?;
        let digest = layout.write_blob(&blob).map_err(image_error)?;
        let mut descriptor = Descriptor::new(image::OCI_LAYER_GZIP, &digest, blob.len() as u64);
        descriptor.annotations = built.annotations();
        layers.push(descriptor);
        diff_ids.push(built.diff_id);
    }
    let platform = Platform::host();
    let mut extra = serde_json::Map::new();
    extra.insert(
        "config".into(),
        serde_json::json!({ "Cmd": cmd, "Env": ["PATH=/bin"] }),
    );
    let config = ImageConfig {
        architecture: platform.architecture.clone(),
        os: platform.os.clone(),
        variant: platform.variant.clone(),
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids: diff_ids.iter().map(ToString::to_string).collect(),
        },
        extra,
    };
    let config_bytes = image::to_json("config", &config).map_err(image_error)?;
    let config_digest = layout.write_blob(&config_bytes).map_err(image_error)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(image::OCI_MANIFEST.into()),
        config: Descriptor::new(image::OCI_CONFIG, &config_digest, config_bytes.len() as u64),
        layers,
        annotations: BTreeMap::new(),
        extra: serde_json::Map::new(),
    };
    let manifest_bytes = image::to_json("manifest", &manifest).map_err(image_error)?;
    let manifest_digest = layout.write_blob(&manifest_bytes).map_err(image_error)?;
    let mut descriptor = Descriptor::new(
        image::OCI_MANIFEST,
        &manifest_digest,
        manifest_bytes.len() as u64,
    );
    descriptor.platform = Some(platform);
    layout
        .add_to_index(descriptor.clone(), Some(tag))
        .map_err(image_error)?;
    Ok(descriptor)
}

/// Layer descriptors of the manifest `reference` in `repository` on `registry_url` (resolving
/// an index to this host's platform), read with curl.
pub fn registry_layers(
    registry_url: &str,
    repository: &str,
    reference: &str,
) -> Result<Vec<Descriptor>, BenchError> {
    let bytes = crate::rig::images::fetch_manifest(registry_url, repository, reference)?;
    let parse_error = |e: image::ImageError| BenchError::Step {
        what: format!("reading manifest {repository}:{reference} from {registry_url}"),
        detail: e.to_string(),
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| BenchError::Step {
            what: format!("reading manifest {repository}:{reference} from {registry_url}"),
            detail: e.to_string(),
        })?;
    if value.get("manifests").is_some() {
        let index: image::Index = image::parse_json("index", &bytes).map_err(parse_error)?;
        let chosen = image::select_platform(&index, &Platform::host())
            .map_err(parse_error)?
            .digest
            .clone();
        return registry_layers(registry_url, repository, &chosen);
    }
    let manifest: Manifest = image::parse_json("manifest", &bytes).map_err(parse_error)?;
    Ok(manifest.layers)
}

/// Writes `patterns` one per line (the `--prefetch-list` format).
pub fn write_prefetch_list(path: &Path, patterns: &[String]) -> Result<(), BenchError> {
    let mut text = patterns.join("\n");
    text.push('\n');
    std::fs::write(path, text).map_err(|source| BenchError::Io {
        context: format!("writing the prefetch list {}", path.display()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_layer_has_the_startup_files_and_about_the_requested_size() {
        let (tar, files, bytes) = app_layer(3_000_000).unwrap();
        assert!((3_000_000..3_000_000 + 300_000).contains(&bytes), "{bytes}");
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        for startup in [
            "app/etc/config.txt",
            "app/bin/start.sh",
            "app/lib/libsample7.so",
        ] {
            assert!(names.iter().any(|n| n == startup), "{startup} in {names:?}");
        }
        assert_eq!(
            files,
            names
                .iter()
                .filter(|n| !n.ends_with('/') && n.contains('.'))
                .count()
        );
    }
}
