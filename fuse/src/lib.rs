//! lazysnap-fuse: a read-only FUSE filesystem over an immutable index of entries and an
//! asynchronous content source. It knows nothing of registries, formats or gRPC.
