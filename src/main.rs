//! The `lazysnap` command: parses the command line and hands each subcommand to `cli`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
