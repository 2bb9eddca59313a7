//! The label and annotation names containerd, its CRI plugin and remote snapshotters agree on
//! (the one list: the snapshotter reads them, `lazysnap pull` and the converter write them), and
//! the values computed for them (chain IDs, the size-bounded CRI layer list).

use sha2::{Digest as _, Sha256};

/// Lease label: RFC 3339 time after which containerd may delete the lease.
pub const GC_EXPIRE: &str = "containerd.io/gc.expire";
/// Content label prefix linking a blob to another blob GC must keep (`.config`, `.l.<i>`, `.m.<i>`).
pub const GC_REF_CONTENT: &str = "containerd.io/gc.ref.content";
/// Content label prefix linking a blob to a snapshot GC must keep: `<prefix>.<snapshotter>`.
pub const GC_REF_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot";
/// Layer content label: the layer's uncompressed digest (diff ID).
pub const UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Content label prefix recording where a blob can be fetched again: `<prefix>.<registry host>`
/// = repository.
pub const DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source";
/// Snapshot label: the chain ID the snapshot being prepared will be committed as.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// CRI snapshot label: the image reference being pulled.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// CRI snapshot label: the digest of the layer blob being prepared.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// CRI snapshot label: comma-separated digests of this layer and the following ones.
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// CRI snapshot label: the digest of the image manifest.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// stargz (`ctr-remote images rpull`) snapshot label: the image reference.
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// stargz snapshot label: the layer's blob digest.
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// stargz snapshot label: every layer digest of the image, comma separated.
pub const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
/// Layer annotation (passed on as a snapshot label) with the TOC digest of an eStargz or
/// zstd:chunked layer: the mark of a lazily pullable layer.
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Prefix of the layer annotations containerd passes on to snapshotters as labels.
pub const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";
/// Largest key + value containerd accepts for one label.
pub const MAX_LABEL_BYTES: usize = 4096;

/// Chain IDs of a layer stack from its diff IDs: the first is the first diff ID, each next one
/// is `sha256(previous + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(previous) => {
                let digest = Sha256::digest(format!("{previous} {diff_id}").as_bytes());
                format!("sha256:{}", hex::encode(digest))
            }
        };
        chain.push(next);
    }
    chain
}

/// The CRI `cri.image-layers` value for the layer at `index`: its digest and the following
/// layers' digests, comma-separated, as many as fit in one label (at least the layer's own).
pub fn image_layers_value(layer_digests: &[String], index: usize) -> String {
    let budget = MAX_LABEL_BYTES.saturating_sub(CRI_IMAGE_LAYERS.len());
    let mut value = String::new();
    for digest in layer_digests.iter().skip(index) {
        let extra = if value.is_empty() {
            digest.len()
        } else {
            digest.len() + 1
        };
        if !value.is_empty() && value.len() + extra > budget {
            break;
        }
        if !value.is_empty() {
            value.push(',');
        }
        value.push_str(digest);
    }
    value
}

/// Whether a label fits containerd's size limit.
pub fn fits(key: &str, value: &str) -> bool {
    key.len().saturating_add(value.len()) <= MAX_LABEL_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_match_the_fixture_image() {
        // Diff IDs of ../shared/fixtures/orig (layer B then layer A).
        let diff_ids = vec![
            "sha256:230cedc6075bfdbc6407b7546b84c35e9a969f450df956b57a2c92a9594f1ca5".to_string(),
            "sha256:1ceb7f2c42da5e6e11e0ddf9e0cbc9e3ad594365d428bde11f39605d907f9c2c".to_string(),
        ];
        let chain = chain_ids(&diff_ids);
        assert_eq!(chain[0], diff_ids[0]);
        let expected = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(
                format!("{} {}", diff_ids[0], diff_ids[1]).as_bytes()
            ))
        );
        assert_eq!(chain[1], expected);
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn image_layers_start_at_the_layer_and_stay_within_one_label() {
        let digests: Vec<String> = (0..200).map(|i| format!("sha256:{i:064x}")).collect();
        let value = image_layers_value(&digests, 1);
        assert!(value.starts_with(&digests[1]));
        assert!(fits(CRI_IMAGE_LAYERS, &value));
        let parts: Vec<&str> = value.split(',').collect();
        assert_eq!(
            parts[..3],
            [&digests[1], &digests[2], &digests[3]].map(String::as_str)
        );
        assert!(parts.len() < 199, "the list is cut to fit a label");
        assert_eq!(image_layers_value(&digests[..2], 1), digests[1]);
        assert_eq!(image_layers_value(&digests[..2], 2), "");
    }
}
