//! Fuzz target: the writer's tar parser and layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lazysnap::estargz::fuzzing::tar_input(data);
});
