//! A user's own image in the bench (`--image REF --ready-line TEXT [--cmd ...]`): the manifest of
//! this node's platform, its config and its layers copied unchanged into the bench's registry,
//! where the bench converts and optimizes it as it does its built-in images.

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::BenchError;
use crate::image::{resolve_image, ImageLocation, Platform};
use crate::registry::{Client, ClientConfig, Reference};

/// An image the user named, and how its workload is run and known to be ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedImage {
    /// Where the image is: `registry/repository[:tag][@digest]`.
    pub reference: String,
    /// The stdout line that says the workload is ready.
    pub ready_line: String,
    /// The container's command; empty: the image's own entrypoint and cmd.
    pub cmd: Vec<String>,
}

/// What [`copy_image`] copied.
pub struct CopiedImage {
    pub layers: usize,
}

/// Copies the image at `source` (for this node's platform, when it is an index) to `target`, a
/// reference with a tag: config and layers first, then the manifest.
pub fn copy_image(
    source: &str,
    target: &str,
    progress: &dyn Fn(&str),
) -> Result<CopiedImage, BenchError> {
    let failed = |detail: String| BenchError::Step {
        what: format!("copying {source} into the bench's registry"),
        detail,
    };
    let location = ImageLocation::parse(source).map_err(|e| failed(e.to_string()))?;
    let ImageLocation::Registry(from) = &location else {
        return Err(failed(
            "--image takes a registry reference (registry/repository:tag)".into(),
        ));
    };
    let to = Reference::parse(target).map_err(|e| failed(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("starting a runtime: {e}")))?;
    runtime.block_on(async {
        let client = Client::new(ClientConfig::default()).map_err(|e| failed(e.to_string()))?;
        let image = resolve_image(&client, &location, &Platform::host())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let config = client
            .get_blob(from, &image.manifest.config.digest)
            .await
            .map_err(|e| failed(format!("the config: {e}")))?;
        client
            .push_blob_bytes(&to, &image.manifest.config.digest, config)
            .await
            .map_err(|e| failed(format!("pushing the config: {e}")))?;
        for (layer, blob) in image.manifest.layers.iter().zip(&image.blobs) {
            progress(&format!(
                "copying layer {} ({:.1} MB)",
                layer.digest,
                layer.size as f64 / 1e6
            ));
            // Through a file, streamed both ways: layers can be larger than memory.
            let file = tempfile::NamedTempFile::new()
                .map_err(|e| failed(format!("a temporary file for a layer: {e}")))?;
            let mut out = tokio::fs::File::from_std(
                file.reopen()
                    .map_err(|e| failed(format!("opening {}: {e}", file.path().display())))?,
            );
            let mut pieces = blob
                .read_range_stream(0..blob.size())
                .await
                .map_err(|e| failed(format!("layer {}: {e}", layer.digest)))?;
            while let Some(piece) = pieces.next().await {
                let piece = piece.map_err(|e| failed(format!("layer {}: {e}", layer.digest)))?;
                out.write_all(&piece)
                    .await
                    .map_err(|e| failed(format!("writing layer {}: {e}", layer.digest)))?;
            }
            out.flush()
                .await
                .map_err(|e| failed(format!("writing layer {}: {e}", layer.digest)))?;
            client
                .push_blob_file(&to, &layer.digest, file.path())
                .await
                .map_err(|e| failed(format!("pushing layer {}: {e}", layer.digest)))?;
        }
        let manifest = serde_json::to_vec(&image.manifest)
            .map_err(|e| failed(format!("writing the manifest: {e}")))?;
        client
            .put_manifest(&to, &image.descriptor.media_type, Bytes::from(manifest))
            .await
            .map_err(|e| failed(format!("pushing the manifest: {e}")))?;
        Ok(CopiedImage {
            layers: image.manifest.layers.len(),
        })
    })
}

/// Parses `--cmd`: a JSON array of strings, or one word.
pub fn parse_cmd(text: &str) -> Result<Vec<String>, BenchError> {
    if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(|e| {
            BenchError::Invalid(format!(
                "--cmd {text:?}: not a JSON array of strings ({e}); write e.g. '[\"python3\",\"-c\",\"print(1)\"]'"
            ))
        })
    } else {
        Ok(vec![text.to_string()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_is_a_json_array_or_one_word() {
        assert_eq!(
            parse_cmd(r#"["python3","-c","print(1)"]"#).unwrap(),
            ["python3", "-c", "print(1)"]
        );
        assert_eq!(parse_cmd("/start").unwrap(), ["/start"]);
        let err = parse_cmd("[python3").unwrap_err().to_string();
        assert!(err.contains("--cmd") && err.contains("JSON array"), "{err}");
    }
}
