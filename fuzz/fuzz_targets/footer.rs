//! Fuzz target: footer recognition (eStargz 51 B, legacy 47 B, zstd:chunked 48 B).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lazysnap::estargz::fuzzing::footer(data);
});
