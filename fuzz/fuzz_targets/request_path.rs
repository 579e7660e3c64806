#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pointsman::fuzzing::request_path(data));
