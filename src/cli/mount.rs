//! `lazysnap mount`, `lazysnap umount`, `lazysnap status`.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct MountArgs {}
#[derive(clap::Args)]
pub struct UmountArgs {}
#[derive(clap::Args)]
pub struct StatusArgs {}

pub fn run_mount(_args: MountArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`lazysnap mount` is not built yet in this version")
}
pub fn run_umount(_args: UmountArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`lazysnap umount` is not built yet in this version")
}
pub fn run_status(_args: StatusArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`lazysnap status` is not built yet in this version")
}
