//! Test bed shared by the integration tests and `lazysnap bench`: real Distribution registry (and
//! later containerd and a link emulator) on 127.0.0.1, and generated OCI images.
