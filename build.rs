//! Build script: compiles every `.proto` file under proto/ (containerd's API services and types,
//! and the CRI ImageService.PullImage slice) into Rust gRPC clients and servers with protox (pure
//! Rust, so no system `protoc` is needed) and tonic-prost-build. Adding a proto file needs no
//! change here. Also records the git commit built (`LAZYSNAP_GIT_COMMIT`, `unknown` outside a
//! git checkout) for `--version` and the build-info metric.

use std::path::{Path, PathBuf};

fn collect_protos(dir: &Path, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, found)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            found.push(path);
        }
    }
    Ok(())
}

/// The commit checked out (with `-dirty` when the tree has changes), if this is a git checkout.
fn git_commit() -> Option<String> {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = run(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|status| !status.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "cargo:rustc-env=LAZYSNAP_GIT_COMMIT={}",
        git_commit().unwrap_or_else(|| "unknown".into())
    );
    for git_state in [".git/HEAD", ".git/index"] {
        if Path::new(git_state).exists() {
            println!("cargo:rerun-if-changed={git_state}");
        }
    }
    println!("cargo:rerun-if-changed=proto");
    let mut protos = Vec::new();
    collect_protos(Path::new("proto"), &mut protos)?;
    protos.sort();
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let descriptors = protox::compile(&protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
