#![no_main]
//! See meshauth_fuzz_targets::local_api.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshauth_fuzz_targets::local_api(data));
