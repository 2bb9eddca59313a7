//! Unit tests of image conversion: annotations, media types, progress.

use super::*;

#[test]
fn media_type_falls_back_to_the_document() {
    assert_eq!(effective_media_type(OCI_INDEX, b"{}"), OCI_INDEX);
    let docker_list = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
    assert_eq!(
        effective_media_type("application/json", docker_list),
        super::super::DOCKER_MANIFEST_LIST
    );
    assert_eq!(
        effective_media_type("application/octet-stream", br#"{"manifests":[]}"#),
        OCI_INDEX
    );
    assert_eq!(
        effective_media_type("", br#"{"schemaVersion":2,"layers":[]}"#),
        OCI_MANIFEST
    );
    assert_eq!(
        effective_media_type("text/plain", b"not json"),
        "text/plain"
    );
}

#[test]
fn rebuilt_layers_drop_old_format_annotations_only() {
    assert!(is_format_annotation(labels::TOC_DIGEST));
    assert!(is_format_annotation(estargz::UNCOMPRESSED_SIZE_ANNOTATION));
    assert!(is_format_annotation(
        estargz::ZSTD_MANIFEST_CHECKSUM_ANNOTATION
    ));
    assert!(!is_format_annotation("org.opencontainers.image.title"));
}

#[test]
fn default_levels_follow_the_compression() {
    let gzip = ConvertOptions::default().build_options(0);
    assert_eq!(
        (gzip.level, gzip.chunk_size),
        (9, estargz::DEFAULT_CHUNK_SIZE)
    );
    let zstd = ConvertOptions {
        compression: Compression::Zstd,
        ..Default::default()
    }
    .build_options(0);
    assert_eq!(zstd.level, 3);
    let explicit = ConvertOptions {
        level: Some(1),
        ..Default::default()
    }
    .build_options(0);
    assert_eq!(explicit.level, 1);
}
