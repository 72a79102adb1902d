#![no_main]
//! See meshauth_fuzz_targets::delegated_api.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshauth_fuzz_targets::delegated_api(data));
