//! Build script: compiles proto/ (containerd's snapshots.v1 service and types.Mount, and the CRI
//! ImageService.PullImage slice used to drive containerd's CRI plugin) into Rust
//! with protox (pure Rust, so no system `protoc` is needed) and tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/containerd/types/mount.proto",
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/k8s/cri/runtime/v1/image_service.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
