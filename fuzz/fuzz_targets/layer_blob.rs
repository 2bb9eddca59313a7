//! Fuzz target: opening and verifying a whole blob.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lazysnap::estargz::fuzzing::layer_blob(data);
});
