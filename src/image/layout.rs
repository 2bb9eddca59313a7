//! OCI image layouts on disk (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): read images from
//! them and write images into them. Used for `oci:DIR[:TAG]` locations.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::types::{digest_hex, parse_json, to_json, MAX_METADATA_BYTES};
use super::{Descriptor, ImageError, Index, REF_NAME_ANNOTATION};
use crate::digest::{sha256_digest, Digest};

const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT_CONTENT: &str = "{\"imageLayoutVersion\":\"1.0.0\"}";

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> ImageError {
    move |source| ImageError::Io { context, source }
}

impl OciLayout {
    /// Opens an existing layout; fails naming the directory when it has no `oci-layout` file.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        if !dir.join(LAYOUT_FILE).is_file() {
            return Err(ImageError::NotFound(format!(
                "{} is not an OCI image layout (no {LAYOUT_FILE} file)",
                dir.display()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens the layout at `dir`, creating the directory and an empty layout if needed.
    pub fn create(dir: &Path) -> Result<Self, ImageError> {
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err(format!("creating {}", blobs.display())))?;
        let layout_file = dir.join(LAYOUT_FILE);
        if !layout_file.is_file() {
            fs::write(&layout_file, LAYOUT_CONTENT)
                .map_err(io_err(format!("writing {}", layout_file.display())))?;
        }
        let layout = Self {
            dir: dir.to_path_buf(),
        };
        if !dir.join("index.json").is_file() {
            layout.write_index(&Index::new_oci())?;
        }
        Ok(layout)
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The top-level `index.json`.
    pub fn index(&self) -> Result<Index, ImageError> {
        let path = self.dir.join("index.json");
        let bytes = read_bounded(&path)?;
        parse_json(&format!("{}", path.display()), &bytes)
    }

    fn write_index(&self, index: &Index) -> Result<(), ImageError> {
        let bytes = to_json("index.json", index)?;
        let path = self.dir.join("index.json");
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io_err(format!(
            "creating a temp file in {}",
            self.dir.display()
        )))?;
        tmp.write_all(&bytes)
            .map_err(io_err(format!("writing {}", path.display())))?;
        tmp.persist(&path).map_err(|e| ImageError::Io {
            context: format!("replacing {}", path.display()),
            source: e.error,
        })?;
        Ok(())
    }

    /// The descriptor `tag` names in `index.json` (annotation
    /// `org.opencontainers.image.ref.name`), or the only one when `tag` is `None`.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, ImageError> {
        let index = self.index()?;
        let where_ = self.dir.display();
        match tag {
            Some(tag) => index
                .manifests
                .iter()
                .find(|d| d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) == Some(tag))
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<&str> = index
                        .manifests
                        .iter()
                        .filter_map(|d| d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str))
                        .collect();
                    ImageError::NotFound(format!(
                        "no image tagged {tag:?} in the OCI layout {where_} (tags: {})",
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ))
                }),
            None => match index.manifests.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(ImageError::NotFound(format!(
                    "the OCI layout {where_} holds no image"
                ))),
                _ => Err(ImageError::Invalid(format!(
                    "the OCI layout {where_} holds {} images: name one with oci:DIR:TAG",
                    index.manifests.len()
                ))),
            },
        }
    }

    /// Path of a blob (which may not exist).
    pub fn blob_path(&self, digest: &Digest) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest)?;
        Ok(self.dir.join("blobs").join("sha256").join(hex))
    }

    /// True when the layout holds the blob.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Reads a small blob (manifest, index, config) and checks its digest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest)?;
        if !path.is_file() {
            return Err(ImageError::NotFound(format!(
                "blob {digest} is missing from the OCI layout {}",
                self.dir.display()
            )));
        }
        let bytes = read_bounded(&path)?;
        let actual = sha256_digest(&bytes);
        if actual != *digest {
            return Err(ImageError::Corrupt(format!(
                "blob {} has digest {actual}, not {digest}",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Stores `bytes` as a blob and returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<Digest, ImageError> {
        let digest = sha256_digest(bytes);
        let path = self.blob_path(&digest)?;
        if !path.is_file() {
            let mut tmp = self.temp_file()?;
            tmp.write_all(bytes)
                .map_err(io_err(format!("writing blob {digest}")))?;
            self.persist(tmp, &path)?;
        }
        Ok(digest)
    }

    /// Stores the file at `source` as the blob `digest` (the caller computed the digest while
    /// writing it). The file is moved when it is on the same filesystem, else copied.
    pub fn import_blob_file(&self, digest: &Digest, source: &Path) -> Result<(), ImageError> {
        let path = self.blob_path(digest)?;
        if path.is_file() {
            return Ok(());
        }
        if fs::rename(source, &path).is_ok() {
            return Ok(());
        }
        let tmp = self.temp_file()?;
        fs::copy(source, tmp.path()).map_err(io_err(format!(
            "copying {} into the OCI layout {}",
            source.display(),
            self.dir.display()
        )))?;
        self.persist(tmp, &path)
    }

    /// Adds `descriptor` to `index.json`; with `tag`, it carries the ref-name annotation and
    /// replaces any descriptor with that tag.
    pub fn add_to_index(
        &self,
        mut descriptor: Descriptor,
        tag: Option<&str>,
    ) -> Result<(), ImageError> {
        let mut index = self.index()?;
        match tag {
            Some(tag) => {
                index.manifests.retain(|d| {
                    d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) != Some(tag)
                });
                descriptor
                    .annotations
                    .insert(REF_NAME_ANNOTATION.to_string(), tag.to_string());
            }
            None => index.manifests.retain(|d| d.digest != descriptor.digest),
        }
        index.manifests.push(descriptor);
        self.write_index(&index)
    }

    fn temp_file(&self) -> Result<tempfile::NamedTempFile, ImageError> {
        let blobs = self.dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err(format!("creating {}", blobs.display())))?;
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&blobs)
            .map_err(io_err(format!(
                "creating a temp file in {}",
                blobs.display()
            )))
    }

    fn persist(&self, tmp: tempfile::NamedTempFile, path: &Path) -> Result<(), ImageError> {
        tmp.persist(path).map_err(|e| ImageError::Io {
            context: format!("storing {}", path.display()),
            source: e.error,
        })?;
        Ok(())
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ImageError> {
    let len = fs::metadata(path)
        .map_err(io_err(format!("reading {}", path.display())))?
        .len();
    if len > MAX_METADATA_BYTES as u64 {
        return Err(ImageError::Invalid(format!(
            "{} is {len} bytes, more than the {MAX_METADATA_BYTES} accepted for metadata",
            path.display()
        )));
    }
    fs::read(path).map_err(io_err(format!("reading {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OCI_MANIFEST;

    #[test]
    fn writes_reads_and_resolves_tags() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        assert!(OciLayout::open(dir.path()).is_ok());
        let digest = layout.write_blob(b"{}").unwrap();
        assert_eq!(layout.read_blob(&digest).unwrap(), b"{}");
        let d = Descriptor::new(OCI_MANIFEST, &digest, 2);
        layout.add_to_index(d.clone(), Some("v1")).unwrap();
        layout.add_to_index(d.clone(), Some("v1")).unwrap();
        assert_eq!(layout.index().unwrap().manifests.len(), 1);
        assert_eq!(layout.resolve(Some("v1")).unwrap().digest, digest);
        assert_eq!(layout.resolve(None).unwrap().digest, digest);
        let err = layout.resolve(Some("v2")).unwrap_err().to_string();
        assert!(err.contains("v2") && err.contains("v1"), "{err}");
        // Corruption is detected.
        std::fs::write(layout.blob_path(&digest).unwrap(), b"{ }").unwrap();
        assert!(layout.read_blob(&digest).is_err());
        assert!(OciLayout::open(&dir.path().join("nope")).is_err());
    }
}
