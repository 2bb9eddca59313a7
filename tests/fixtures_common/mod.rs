//! Where the interoperability fixtures made by stargz's ctr-remote live for the tests:
//! `../shared/fixtures` beside the repository (a test-time path; nothing shipped refers to it).

use std::path::{Path, PathBuf};

/// `../shared/fixtures` beside the repository.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}
