//! YAML text → parsed objects → compiled rules and status: must never panic.
//! Run: `cargo +nightly fuzz run yaml_to_rules` in policy-bridge/ (seed
//! corpus: `fuzz/corpus/yaml_to_rules`, copies of the examples and fixtures).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let (state, status, _errors) = policy_bridge::compile_text(text, "fuzz");
        // Every rule's identities exist; every status names its policy.
        for r in &state.rules {
            assert!(state.identities.contains_key(&r.local));
        }
        for s in &status {
            assert!(!s.kind.is_empty());
        }
    }
});
