#![no_main]
//! See meshauth_fuzz_targets::handshake_message.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshauth_fuzz_targets::handshake_message(data));
