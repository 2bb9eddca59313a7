//! `lazysnap optimize`.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct OptimizeArgs {}

pub fn run(_args: OptimizeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`lazysnap optimize` is not built yet in this version")
}
