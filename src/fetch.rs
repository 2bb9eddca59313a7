//! Per-layer chunk reader behind FUSE: on-demand reads first, then prefetch, then background fill;
//! singleflight per chunk, coalesced ranges, deadlines, decompression and digest verification.
