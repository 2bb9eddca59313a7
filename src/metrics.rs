//! Prometheus metrics an operator graphs: bytes fetched on demand vs prefetch, cache hits, fetch
//! and FUSE operation latency; served on an optional loopback endpoint.
