//! OCI distribution client: references, resolve, ranged blob reads, push, auth, hosts.toml
//! mirrors, redirects and retries.
