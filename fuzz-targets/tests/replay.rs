//! Every fuzz target on stable, in the test command: the committed corpus
//! (`fuzz/seeds/<target>/` and `fuzz/corpus/<target>/`, what libFuzzer runs
//! kept), then
//! deterministic mutations of it — bit flips, truncations, splices,
//! repeated and random bytes. Nothing may panic; each input must finish
//! (a hang shows as this test's timeout). The coverage-guided runs are
//! `scripts/fuzz` (cargo fuzz, nightly).

use std::path::PathBuf;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The target's seeds (`fuzz/seeds/<target>`, required) and corpus
/// (`fuzz/corpus/<target>`, what libFuzzer runs kept).
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let seeds = root.join("seeds").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&seeds)
        .unwrap_or_else(|e| panic!("{}: {e}", seeds.display()))
        .chain(
            std::fs::read_dir(root.join("corpus").join(target))
                .into_iter()
                .flatten(),
        )
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

fn mutate(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = corpus[rng.random_range(0..corpus.len())].clone();
    for _ in 0..rng.random_range(1..5) {
        match rng.random_range(0..6) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !v.is_empty() => {
                let n = rng.random_range(0..v.len());
                v.truncate(n);
            }
            2 => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                let at = rng.random_range(0..=v.len());
                let from = rng.random_range(0..=other.len());
                v.splice(at..at, other[from..].iter().copied());
            }
            3 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                let b = v[i];
                let n = rng.random_range(1..64);
                v.splice(i..i, std::iter::repeat_n(b, n));
            }
            4 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = *[0u8, 0xff, 0x7f, 0x80, b'{', b'"', b'\n', b':', b'&', b'=']
                    .get(rng.random_range(0..10))
                    .unwrap_or(&0);
            }
            _ => v.extend((0..rng.random_range(0..16)).map(|_| rng.random::<u8>())),
        }
    }
    v
}

#[test]
fn every_target_survives_its_corpus_and_mutations_of_it() {
    let mutations: usize = std::env::var("MESHAUTH_FUZZ_REPLAY_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    for (i, (target, run)) in meshauth_fuzz_targets::TARGETS.iter().enumerate() {
        let inputs = corpus(target);
        assert!(!inputs.is_empty(), "fuzz/seeds/{target} is empty");
        let started = Instant::now();
        for input in &inputs {
            run(input);
        }
        let mut rng = StdRng::seed_from_u64(0xf022 + i as u64);
        for _ in 0..mutations {
            let m = mutate(&mut rng, &inputs);
            run(&m);
        }
        println!(
            "{target}: {} corpus inputs and {mutations} mutations in {:?}",
            inputs.len(),
            started.elapsed()
        );
    }
}
