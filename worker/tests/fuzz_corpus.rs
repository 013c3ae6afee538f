//! Replays the fuzz target's seeds and kept corpus (`fuzz/seeds/`, `fuzz/corpus/decode_request/`)
//! through the same check, so a finding stays fixed without nightly or cargo-fuzz.

#[path = "../../fuzz/fuzz_targets/check.rs"]
mod check;

#[test]
fn every_kept_fuzz_input_decodes_or_is_refused_and_renders_the_intended_structure() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for folder in ["seeds", "corpus/decode_request"] {
        let Ok(entries) = std::fs::read_dir(root.join(folder)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let body = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check::decode_render_check(&body));
            assert!(outcome.is_ok(), "{} fails the check", path.display());
            replayed += 1;
        }
    }
    assert!(replayed >= 50, "only {replayed} inputs found under fuzz/");
}

/// Tokens the mutator inserts: JSON structure, the protocol's keys, and what matters to
/// apptainer's definition-file parser (the same as `fuzz/request.dict`).
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "\\u0000",
    "\\ud800",
    "\\n",
    "\\\\",
    "null",
    "true",
    "0",
    "-1",
    "1e999",
    "\"op\"",
    "\"start\"",
    "\"createvolume\"",
    "\"container_name\"",
    "\"container_command\"",
    "\"environment\"",
    "\"binds\"",
    "\"volume_name\"",
    "\"image_os\"",
    "\"image_version\"",
    "%post",
    "Bootstrap:",
    "bootſtrap:",
    "{{",
    "\\u2028",
    "\\u2003",
    "..",
    "/proc",
    "\u{a0}",
    "\\",
];

/// A small xorshift generator: the loop needs speed and reproducibility, not quality.
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

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                input.splice(at..at, token.iter().copied());
            }
            2 if at < input.len() => {
                let end = (at + 1 + rng.below(16)).min(input.len());
                input.drain(at..end);
            }
            3 if at < input.len() => {
                let end = (at + 1 + rng.below(64)).min(input.len());
                let copy = input[at..end].to_vec();
                input.splice(at..at, copy);
            }
            4 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(64)).min(other.len());
                input.splice(at..at, other[from..end].iter().copied());
            }
            _ => input.insert(at.min(input.len()), rng.next() as u8),
        }
    }
}

/// Without nightly (cargo-fuzz needs it): random mutations of the seeds for
/// `FUZZ_SECONDS` (default 10), through the same check. Not coverage-guided, so weaker
/// than `cargo fuzz run`; run it with
/// `FUZZ_SECONDS=600 cargo test -p apptainer-orchestrator-worker --test fuzz_corpus -- --ignored --nocapture`.
#[test]
#[ignore = "a long-running fuzz loop; see fuzz/README.md"]
fn random_mutations_of_the_seeds_pass_the_check() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut executions: u64 = 0;
    std::panic::set_hook(Box::new(|_| {}));
    while std::time::Instant::now() < deadline {
        let mut input = seeds[rng.below(seeds.len())].clone();
        let other = &seeds[rng.below(seeds.len())];
        for _ in 0..8 {
            mutate(&mut rng, &mut input, other);
            let outcome = std::panic::catch_unwind(|| check::decode_render_check(&input));
            executions += 1;
            if outcome.is_err() {
                let _ = std::panic::take_hook();
                panic!(
                    "rng seed {seed}: input fails the check: {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }
    let _ = std::panic::take_hook();
    println!("{executions} executions in {seconds} s (rng seed {seed}), no failure");
}
