//! Chunk cache: verified, decompressed chunks keyed by chunk digest, a memory tier over a
//! size-bounded LRU on disk, shared by all layers and images, crash-safe and reused after restarts.
