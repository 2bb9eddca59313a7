//! The test bed of lazysnap's integration tests: the rig the bench runs on (`lazysnap::rig`:
//! the real registry, containerd and link emulator on 127.0.0.1, image builders), re-exported,
//! plus what only tests need: a fault-injecting proxy, a token server, htpasswd and docker
//! config files, layers with every entry type, and listings of extracted trees. A
//! dev-dependency only: nothing here ships in the daemon.

mod fault_proxy;
mod htpasswd;
pub mod images;
mod token_server;

pub use fault_proxy::{Fault, FaultProxy, ProxyEvent};
pub use htpasswd::{write_docker_config, write_htpasswd};
pub use lazysnap::rig::{
    free_port, require_program, unmount_under, ContainerdOptions, ContainerdServer, LinkEmulator,
    LinkProfile, RegistryOptions, RegistryServer, RegistryTls, RigError,
};
pub use token_server::{TokenServer, TokenServerOptions};
