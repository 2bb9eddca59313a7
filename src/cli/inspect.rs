//! `lazysnap inspect TARGET`: summary, TOC and full verification of an eStargz / zstd:chunked
//! layer blob file, or of every layer of an image.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use lazysnap::blob::{BlobSource, FileBlob};
use lazysnap::estargz::{self, Compression, LayerToc};
use lazysnap::image::{self, ImageLocation, Platform};
use lazysnap::labels;
use lazysnap::registry::{Client, ClientConfig};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A layer blob file, an image reference, or `oci:DIR[:TAG]`.
    pub target: String,
    /// Print the TOC as JSON.
    #[arg(long)]
    pub toc: bool,
    /// Check the footer, the TOC digest and every chunk.
    #[arg(long)]
    pub verify: bool,
    /// Expected TOC digest of a layer file (images use their layers' annotation).
    #[arg(long)]
    pub toc_digest: Option<String>,
    /// Platform to inspect from an index; default: this host's.
    #[arg(long)]
    pub platform: Option<String>,
    /// Use plain HTTP for registries other than localhost / 127.0.0.1.
    #[arg(long, alias = "insecure")]
    pub plain_http: bool,
    /// containerd hosts directory (`certs.d` layout with hosts.toml files; default:
    /// /etc/containerd/certs.d, else /etc/docker/certs.d, when they exist).
    #[arg(long)]
    pub hosts_dir: Option<PathBuf>,
}

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let runtime = super::runtime()?;
    let path = Path::new(&args.target);
    if path.is_file() {
        let blob = FileBlob::open(path).with_context(|| format!("opening {}", path.display()))?;
        let name = path.display().to_string();
        let ok = runtime.block_on(inspect_layer(
            &args,
            &name,
            &blob,
            args.toc_digest.as_deref(),
        ));
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let location = ImageLocation::parse(&args.target)
        .with_context(|| format!("{} is neither a file nor an image reference", args.target))?;
    if args.toc_digest.is_some() {
        anyhow::bail!("--toc-digest applies to a layer file; images use each layer's annotation");
    }
    let platform = match &args.platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let client = Client::new(ClientConfig {
        plain_http: args.plain_http,
        hosts_dir: super::hosts_dir_or_default(args.hosts_dir.clone()),
        ..ClientConfig::default()
    })
    .context("setting up the registry client")?;
    let ok = runtime.block_on(async {
        let resolved = image::resolve_image(&client, &location, &platform)
            .await
            .with_context(|| format!("resolving {location}"))?;
        out!("image {location} manifest {}", resolved.descriptor.digest);
        let mut ok = true;
        for (i, (layer, blob)) in resolved
            .manifest
            .layers
            .iter()
            .zip(resolved.blobs.iter())
            .enumerate()
        {
            if !image::is_layer(&layer.media_type) {
                out!(
                    "layer {i} {} ({}): not a tar layer, skipped",
                    layer.digest,
                    layer.media_type
                );
                continue;
            }
            let name = format!("layer {i} {}", layer.digest);
            let expected = layer
                .annotations
                .get(labels::TOC_DIGEST)
                .map(String::as_str);
            let blob: &Arc<dyn BlobSource> = blob;
            ok &= inspect_layer(&args, &name, blob.as_ref(), expected).await;
        }
        anyhow::Ok(ok)
    })?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints one layer's summary (and TOC / verification as asked); false on any failure, after
/// printing the error to stderr.
async fn inspect_layer(
    args: &InspectArgs,
    name: &str,
    blob: &dyn BlobSource,
    expected_toc_digest: Option<&str>,
) -> bool {
    let layer = match estargz::open_layer(blob, expected_toc_digest).await {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("lazysnap: {name}: {e}");
            if e.is_not_lazy_format() {
                eprintln!(
                    "lazysnap: {name} is not eStargz or zstd:chunked (a plain gzip or zstd \
                     layer?): `lazysnap convert SRC DST` writes the image in a lazily pullable \
                     format"
                );
            }
            return false;
        }
    };
    print_summary(name, &layer, expected_toc_digest);
    if args.toc {
        match serde_json::to_string_pretty(&layer.toc()) {
            Ok(json) => out!("{json}"),
            Err(e) => {
                eprintln!("lazysnap: {name}: cannot print the TOC: {e}");
                return false;
            }
        }
    }
    if args.verify {
        match estargz::verify_layer(blob, &layer).await {
            Ok(report) => out!(
                "  verified: footer, TOC digest{}, {} chunks of {} files ({} bytes)",
                if expected_toc_digest.is_some() {
                    " (matches the expected digest)"
                } else {
                    ""
                },
                report.chunks,
                report.files,
                report.bytes
            ),
            Err(e) => {
                eprintln!("lazysnap: {name}: verification failed: {e}");
                return false;
            }
        }
    }
    true
}

fn print_summary(name: &str, layer: &LayerToc, expected: Option<&str>) {
    let entries = layer.entries();
    let chunks: usize = entries.iter().map(|e| e.chunks.len()).sum();
    let files = entries
        .iter()
        .filter(|e| e.kind == estargz::EntryKind::Reg)
        .count();
    let bytes: u64 = entries.iter().map(|e| e.size).sum();
    let compression = match layer.compression() {
        Compression::Gzip => "gzip (eStargz)",
        Compression::Zstd => "zstd (zstd:chunked)",
    };
    let landmark = match layer.landmark() {
        Some(estargz::Landmark::Prefetch) => "prefetch",
        Some(estargz::Landmark::NoPrefetch) => "no-prefetch",
        None => "none",
    };
    let prioritized = layer
        .prefetch_range()
        .map(|r| r.end.saturating_sub(r.start))
        .unwrap_or(0);
    out!("{name}");
    out!("  compression:       {compression}");
    out!("  blob size:         {}", layer.blob_size());
    out!("  TOC digest:        {}", layer.toc_digest());
    if let Some(expected) = expected {
        out!("  expected TOC:      {expected}");
    }
    out!(
        "  entries:           {} ({files} regular files, {bytes} bytes)",
        entries.len()
    );
    out!("  chunks:            {chunks}");
    out!("  landmark:          {landmark}");
    out!("  prioritized bytes: {prioritized} (compressed)");
    if !layer.prefetch_skipped().is_empty() {
        out!(
            "  lazysnap prefetch: {} (compressed; {} chunks of partly read files left out)",
            layer.prefetch_bytes(),
            layer.prefetch_skipped().len()
        );
    }
}
