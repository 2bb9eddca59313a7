//! The rig `lazysnap bench` runs on, which the tests (through the `lazysnap-testbed` crate) run
//! on too: the real Distribution registry, containerd and a userspace link emulator started on
//! 127.0.0.1, and generated OCI images. Everything started here is torn down when its handle
//! drops; nothing else is touched.

mod containerd;
pub mod images;
mod link;
mod registry;

pub use containerd::{ContainerdOptions, ContainerdServer};
pub use link::{LinkEmulator, LinkProfile};
pub use registry::{RegistryOptions, RegistryServer, RegistryTls};

use std::net::TcpListener;
use std::path::Path;

/// Errors starting or driving the rig's components.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// A program the test bed needs is not installed.
    #[error("{program} is not installed: run scripts/install-deps.sh (it installs the Debian package {package})")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    /// A component did not come up.
    #[error("{what} did not start: {detail}")]
    Start { what: String, detail: String },
    /// Filesystem or process error.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RigError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, RigError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(RigError::io("binding 127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(RigError::io("reading the bound address"))?
        .port();
    Ok(port)
}

/// Fails with [`RigError::Missing`] unless `program` is an executable file.
pub fn require_program(program: &'static str, package: &'static str) -> Result<(), RigError> {
    if std::path::Path::new(program).is_file() {
        Ok(())
    } else {
        Err(RigError::Missing { program, package })
    }
}

/// Lazily detaches every mount point at or below `dir`, deepest first (what a test bed component
/// mounted there, even after its process died).
pub fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let below = format!("{prefix}/");
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| point.replace("\\040", " "))
        .filter(|point| *point == prefix || point.starts_with(&below))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in points {
        let _ = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}
