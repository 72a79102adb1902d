//! A deterministic mini-fuzz on stable: the fuzz target's entry point
//! (`compile_text`) gets a few thousand mutated versions of the examples and
//! fixtures (byte flips, deletions, duplicated and spliced lines, swapped
//! scalars, truncations). Any panic fails the test. The real fuzz target
//! is policy-bridge/fuzz (cargo-fuzz, nightly).

mod common;

const SCALARS: &[&str] = &[
    "",
    "0",
    "-1",
    "65536",
    "99999999999999999999",
    "~",
    "null",
    "[]",
    "{}",
    "\"\"",
    "[1]",
    "{a: 1}",
    "true",
    "http",
    "TCP",
    "SCTP",
    "In",
    "Maybe",
    "required",
    "test-always-fail",
    "world",
    "k8s:",
    "reserved:host",
    "&a",
    "*a",
    "!!binary AA==",
    "'",
    "\"\\u0000\"",
    "- x",
    ": :",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(seed: &str, other: &str, r: &mut Rng) -> String {
    let mut lines: Vec<String> = seed.lines().map(str::to_string).collect();
    for _ in 0..1 + r.below(4) {
        let n = lines.len().max(1);
        match r.below(7) {
            0 if !lines.is_empty() => {
                lines.remove(r.below(n));
            }
            1 if !lines.is_empty() => {
                let l = lines[r.below(n)].clone();
                lines.insert(r.below(n), l);
            }
            2 => {
                let o: Vec<&str> = other.lines().collect();
                if !o.is_empty() {
                    lines.insert(r.below(n), o[r.below(o.len())].to_string());
                }
            }
            3 if !lines.is_empty() => {
                let i = r.below(n);
                if let Some(pos) = lines[i].find(": ") {
                    lines[i] = format!("{}: {}", &lines[i][..pos], SCALARS[r.below(SCALARS.len())]);
                }
            }
            4 if !lines.is_empty() => {
                let i = r.below(n);
                let mut b = lines[i].clone().into_bytes();
                if !b.is_empty() {
                    let j = r.below(b.len());
                    let cs = b" -:{}[]\t'\"#&*!|>%@`0aZ";
                    b[j] = cs[r.below(cs.len())];
                }
                lines[i] = String::from_utf8_lossy(&b).into_owned();
            }
            5 if !lines.is_empty() => {
                let i = r.below(n);
                lines[i] = format!("{}{}", " ".repeat(r.below(6)), lines[i].trim_start());
            }
            _ => {
                let keep = r.below(n + 1);
                lines.truncate(keep);
            }
        }
    }
    lines.join("\n")
}

#[test]
fn mutated_inputs_never_panic() {
    let mut seeds: Vec<String> = Vec::new();
    for dir in [
        "../deploy/examples",
        "tests/fixtures/cilium-docs",
        "tests/fixtures",
    ] {
        for e in std::fs::read_dir(common::manifest_dir().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                seeds.push(std::fs::read_to_string(p).unwrap());
            }
        }
    }
    assert!(seeds.len() >= 8);
    let cluster = seeds
        .iter()
        .position(|s| s.starts_with("# Namespaces, nodes and pods"))
        .expect("cluster fixture");
    let mut r = Rng(0x2545f4914f6cdd1d);
    let mut rejected = 0;
    let mut with_rules = 0;
    for _ in 0..3000 {
        let a = &seeds[r.below(seeds.len())];
        let b = &seeds[r.below(seeds.len())];
        let mut input = mutate(a, b, &mut r);
        if r.below(2) == 0 {
            // Give policies pods to select, so mutants reach the rule compiler.
            input = format!("{}\n---\n{input}", seeds[cluster]);
        }
        let (state, _status, errors) = policy_bridge::compile_text(&input, "mutant");
        rejected += usize::from(!errors.is_empty());
        with_rules += usize::from(!state.rules.is_empty());
        for rule in &state.rules {
            assert!(state.identities.contains_key(&rule.local), "{input}");
        }
    }
    // The mutations reach both the error paths and the compiler.
    assert!(rejected > 300, "rejected {rejected}");
    assert!(with_rules > 30, "with rules {with_rules}");
}
