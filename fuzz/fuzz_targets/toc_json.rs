//! Fuzz target: TOC JSON parsing and entry validation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lazysnap::estargz::fuzzing::toc_json(data);
});
