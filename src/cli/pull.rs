//! `lazysnap pull`.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct PullArgs {}

pub fn run(_args: PullArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`lazysnap pull` is not built yet in this version")
}
