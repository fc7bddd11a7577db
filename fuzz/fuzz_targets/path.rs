//! Fuzz target `path`: see fuzz/src/props.rs for the input format and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| audgate_fuzz::props::path_target(data));
