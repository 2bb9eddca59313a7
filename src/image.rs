//! Images: manifests, indexes and configs (OCI and Docker media types), platform choice, OCI
//! layouts, and conversion of whole images to eStargz / zstd:chunked.
