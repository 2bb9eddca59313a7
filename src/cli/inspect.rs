//! `lazysnap inspect`.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct InspectArgs {}

pub fn run(_args: InspectArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`lazysnap inspect` is not built yet in this version")
}
