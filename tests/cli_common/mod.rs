//! Running the real `lazysnap` binary from integration tests, as a user runs it.

#![allow(dead_code)] // each test file uses a different part

use std::process::{Command, Output};

/// Runs `lazysnap ARGS` (quiet logs) and echoes what it printed into the test's output.
/// `LAZYSNAP_BIN` pins another copy of the binary.
pub fn lazysnap(args: &[&str]) -> Output {
    let bin =
        std::env::var("LAZYSNAP_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lazysnap").into());
    let output = Command::new(bin)
        .args(args)
        .env("LAZYSNAP_LOG", "warn")
        .output()
        .expect("running lazysnap");
    eprintln!(
        "$ lazysnap {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Panics with everything lazysnap printed unless it succeeded.
pub fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "lazysnap failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Runs `lazysnap ARGS`, requires success and returns its stdout.
pub fn lazysnap_ok(args: &[&str]) -> String {
    let output = lazysnap(args);
    assert_ok(&output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Fails loudly unless the test can mount FUSE and overlayfs (root, /dev/fuse).
pub fn require_root_and_fuse() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests mount FUSE and overlayfs: run them as root (sudo scripts/test.sh)"
    );
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: install fuse3 and load the fuse module"
    );
}
