//! One layer's conversion: the blob streamed through the eStargz or zstd:chunked writer with
//! progress counted as it is read, and the media type and annotations of the result.

use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::Path;

use crate::estargz::{self, BuildOptions};
use crate::image::types::{is_index, is_manifest, OCI_INDEX, OCI_MANIFEST};
use crate::image::ImageError;

use super::{io_err, ConvertProgress};

/// Annotations describing a layer's format, which a rebuilt layer replaces.
pub(super) fn is_format_annotation(key: &str) -> bool {
    key.starts_with("containerd.io/snapshot/stargz/")
        || key.starts_with("io.containers.estargz.")
        || key.starts_with("io.containers.zstd-chunked.")
}

/// Forwards positions to a [`ConvertProgress`] for one layer.
pub(super) struct ProgressRelay<'a> {
    pub(super) progress: &'a dyn ConvertProgress,
    pub(super) layer: &'a str,
}

impl<'a> ProgressRelay<'a> {
    pub(super) fn new(progress: &'a dyn ConvertProgress, layer: &'a str) -> Self {
        Self { progress, layer }
    }
    pub(super) fn position(&self, bytes: u64) {
        self.progress.layer_position(self.layer, bytes);
    }
}

/// Counts bytes read from the compressed input and publishes them every MiB.
pub(super) struct CountingReader<R> {
    pub(super) inner: R,
    pub(super) count: u64,
    pub(super) last_sent: u64,
    pub(super) tx: tokio::sync::watch::Sender<u64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count - self.last_sent >= 1 << 20 || n == 0 {
            self.last_sent = self.count;
            let _ = self.tx.send(self.count);
        }
        Ok(n)
    }
}

pub(super) fn convert_file(
    input: &Path,
    output: &Path,
    build: &BuildOptions,
    digest: &str,
    tx: tokio::sync::watch::Sender<u64>,
) -> Result<estargz::BuiltLayer, ImageError> {
    let file = File::open(input).map_err(io_err(format!("opening {}", input.display())))?;
    let counting = CountingReader {
        inner: std::io::BufReader::with_capacity(1 << 20, file),
        count: 0,
        last_sent: 0,
        tx,
    };
    let tar = estargz::decompressed_reader(counting).map_err(|source| ImageError::Format {
        context: format!("decompressing layer {digest}"),
        source,
    })?;
    let out = File::create(output).map_err(io_err(format!("creating {}", output.display())))?;
    let writer = BufWriter::with_capacity(1 << 20, out);
    estargz::build_layer(tar, writer, build).map_err(|source| ImageError::Format {
        context: format!("converting layer {digest}"),
        source,
    })
}

/// The media type of a manifest document: the transport's, or the document's own `mediaType`
/// when the transport gave a generic one.
pub(crate) fn effective_media_type(declared: &str, bytes: &[u8]) -> String {
    if is_index(declared) || is_manifest(declared) {
        return declared.to_string();
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(m),
            ..
        }) => m,
        Ok(Probe {
            manifests: Some(_), ..
        }) => OCI_INDEX.to_string(),
        Ok(_) => OCI_MANIFEST.to_string(),
        Err(_) => declared.to_string(),
    }
}
