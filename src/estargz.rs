//! eStargz and zstd:chunked: footer, TOC types, reader (TOC and chunk digest verification) and
//! writer (chunking, prioritized files and landmarks, parallel compression).
