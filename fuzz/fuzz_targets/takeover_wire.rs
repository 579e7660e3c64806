#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pointsman::process::takeover::fuzzing::takeover_wire(data));
