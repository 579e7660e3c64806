#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pointsman_discovery::fuzzing::registry_entry(data));
