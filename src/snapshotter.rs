//! containerd snapshots.v1 service: metadata store, overlay mounts, remote-layer labels and
//! restart recovery.
