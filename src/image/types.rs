//! Media types and the serde types of manifests, indexes, descriptors and image configs, for both
//! OCI and Docker schema 2. Unknown fields are kept (`extra`) so a round trip loses nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

use super::{ImageError, Platform};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer (also the media type of eStargz layers).
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer (also the media type of zstd:chunked layers).
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// OCI non-distributable gzip layer.
pub const OCI_LAYER_NONDIST_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker foreign (non-distributable) layer.
pub const DOCKER_LAYER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
/// Annotation naming a manifest in an OCI layout's index.json.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// True for single-image manifest media types (OCI or Docker).
pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// True for index / manifest list media types (OCI or Docker).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// True for layer media types whose blobs are tar archives (plain, gzip or zstd).
pub fn is_layer(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_LAYER_TAR
            | OCI_LAYER_GZIP
            | OCI_LAYER_ZSTD
            | OCI_LAYER_NONDIST_GZIP
            | DOCKER_LAYER_GZIP
            | DOCKER_LAYER_FOREIGN
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
    )
}

/// A content descriptor: what a manifest or index points at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// A descriptor with no annotations, platform or URLs.
    pub fn new(media_type: &str, digest: &Digest, size: u64) -> Self {
        Self {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
            platform: None,
            artifact_type: None,
        }
    }
}

/// An image manifest (OCI or Docker schema 2; same JSON shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Index {
    /// An empty OCI index.
    pub fn new_oci() -> Self {
        Self {
            schema_version: 2,
            media_type: Some(OCI_INDEX.to_string()),
            manifests: Vec::new(),
            annotations: BTreeMap::new(),
            extra: serde_json::Map::new(),
        }
    }
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// An image config (OCI and Docker share the fields lazysnap touches); everything else is kept
/// verbatim in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub rootfs: RootFs,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The process part of an image config (`config` in its JSON): what a container runs by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// `PATH` of a process whose environment sets none (what Docker and containerd give it).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ImageConfig {
    /// The config's process part; empty when it has none or it does not parse.
    pub fn process(&self) -> ProcessConfig {
        self.extra
            .get("config")
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default()
    }
}

impl ProcessConfig {
    /// Where the program a container runs by default may be, most likely first: the first word
    /// of entrypoint + cmd as it is when it holds a `/` (against the working directory when
    /// relative), else joined to each `PATH` directory in order. Absolute paths; empty when the
    /// config names no command.
    pub fn program_candidates(&self) -> Vec<String> {
        let program = self
            .entrypoint
            .iter()
            .chain(&self.cmd)
            .flatten()
            .next()
            .filter(|p| !p.is_empty());
        let Some(program) = program else {
            return Vec::new();
        };
        if program.contains('/') {
            if program.starts_with('/') {
                return vec![program.clone()];
            }
            let cwd = self.working_dir.as_deref().unwrap_or("/");
            return vec![format!("{}/{program}", cwd.trim_end_matches('/'))];
        }
        let path = self
            .env
            .iter()
            .flatten()
            .find_map(|pair| pair.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|dir| dir.starts_with('/'))
            .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
            .collect()
    }
}

/// Largest manifest, index or config accepted (the OCI distribution spec suggests 4 MiB).
pub const MAX_METADATA_BYTES: usize = 16 * 1024 * 1024;

/// Parses JSON metadata, naming `what` in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    what: &str,
    bytes: &[u8],
) -> Result<T, ImageError> {
    if bytes.len() > MAX_METADATA_BYTES {
        return Err(ImageError::Invalid(format!(
            "{what} is {} bytes, more than the {MAX_METADATA_BYTES} accepted",
            bytes.len()
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| ImageError::Invalid(format!("{what}: {e}")))
}

/// Serializes metadata as compact JSON.
pub fn to_json<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(value).map_err(|e| ImageError::Invalid(format!("serializing {what}: {e}")))
}

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits (the only algorithm
/// lazysnap writes or reads paths for), and returns the hex part.
pub fn digest_hex(digest: &Digest) -> Result<&str, ImageError> {
    if digest.algorithm() != "sha256" {
        return Err(ImageError::Invalid(format!(
            "digest {digest} is not sha256 (the only algorithm an OCI layout here holds)"
        )));
    }
    Ok(digest.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_manifest_round_trips_with_unknown_fields() {
        let json = r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":7023,"digest":"sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7"},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":32654,"digest":"sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f"}],"foo":1}"#;
        let m: Manifest = parse_json("manifest", json.as_bytes()).unwrap();
        assert_eq!(m.layers.len(), 1);
        assert!(is_layer(&m.layers[0].media_type));
        assert_eq!(m.extra["foo"], 1);
        let back: serde_json::Value = serde_json::from_slice(&to_json("m", &m).unwrap()).unwrap();
        assert_eq!(back["config"]["mediaType"], DOCKER_CONFIG);
        assert_eq!(back["foo"], 1);
    }

    #[test]
    fn the_program_is_looked_for_where_the_runtime_would_run_it() {
        let candidates = |json: &str| {
            let config: ImageConfig = parse_json("config", json.as_bytes()).unwrap();
            config.process().program_candidates()
        };
        let rootfs = r#""rootfs":{"type":"layers","diff_ids":[]}"#;
        assert_eq!(
            candidates(&format!(
                r#"{{{rootfs},"config":{{"Entrypoint":["tini","--"],"Cmd":["app"],"Env":["A=1","PATH=/opt/bin:relative:/bin/"]}}}}"#
            )),
            ["/opt/bin/tini", "/bin/tini"]
        );
        assert_eq!(
            candidates(&format!(r#"{{{rootfs},"config":{{"Cmd":["python3"]}}}}"#)).len(),
            DEFAULT_PATH.split(':').count()
        );
        assert_eq!(
            candidates(&format!(
                r#"{{{rootfs},"config":{{"Cmd":["./run.sh"],"WorkingDir":"/srv/"}}}}"#
            )),
            ["/srv/./run.sh"]
        );
        assert_eq!(
            candidates(&format!(
                r#"{{{rootfs},"config":{{"Cmd":["/bin/sh","-c","x"]}}}}"#
            )),
            ["/bin/sh"]
        );
        assert!(candidates(&format!(r#"{{{rootfs}}}"#)).is_empty());
        assert!(candidates(&format!(r#"{{{rootfs},"config":{{"Cmd":7}}}}"#)).is_empty());
    }

    #[test]
    fn config_keeps_everything_but_diff_ids() {
        let json = r#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"history":[{"created_by":"x"}],"rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        let mut c: ImageConfig = parse_json("config", json.as_bytes()).unwrap();
        c.rootfs.diff_ids = vec!["sha256:bb".into()];
        let back: serde_json::Value = serde_json::from_slice(&to_json("c", &c).unwrap()).unwrap();
        assert_eq!(back["config"]["Cmd"][0], "/bin/sh");
        assert_eq!(back["history"][0]["created_by"], "x");
        assert_eq!(back["rootfs"]["diff_ids"][0], "sha256:bb");
    }

    #[test]
    fn digests_are_checked_before_use_as_paths() {
        // A descriptor naming a path instead of a digest is refused where it is parsed.
        let traversal = r#"{"mediaType":"x","size":1,"digest":"sha256:../../etc/passwd"}"#;
        let err = parse_json::<Descriptor>("descriptor", traversal.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("../../etc/passwd"), "{err}");
        let md5 = r#"{"mediaType":"x","size":1,"digest":"md5:00"}"#;
        assert!(parse_json::<Descriptor>("descriptor", md5.as_bytes()).is_err());
        let sha512 = Digest::parse(&format!("sha512:{}", "ab".repeat(64))).unwrap();
        assert!(digest_hex(&sha512).is_err());
        let d = crate::digest::sha256_digest(b"");
        assert_eq!(
            digest_hex(&d).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
