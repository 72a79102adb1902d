#![no_main]
//! See meshauth_fuzz_targets::policy_yaml.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshauth_fuzz_targets::policy_yaml(data));
