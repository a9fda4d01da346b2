//! A bounded fuzz driver for keel's parsers, on the stable toolchain: inputs made by
//! mutating seed inputs (valid messages) with a seeded generator, handed to the code
//! under test, for a number of inputs or a time, whichever ends first.
//!
//! Tests call [`run`] with their seeds and a check that must not panic (and may
//! assert more). A panic names the input, in Rust byte-string syntax, so that it can
//! be kept as a regression test. `KEEL_FUZZ_INPUTS` raises the count (a long run by
//! hand); `KEEL_FUZZ_SEED` replays one run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// How many inputs a run tries and for how long at most.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Inputs to try (overridden by `KEEL_FUZZ_INPUTS`).
    pub inputs: u64,
    /// Wall-clock limit of the run.
    pub time: Duration,
}

impl Default for Budget {
    /// 20 000 inputs or 5 s: a bounded run for every test suite.
    fn default() -> Self {
        Self {
            inputs: 20_000,
            time: Duration::from_secs(5),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Inputs tried.
    pub inputs: u64,
    /// The generator's seed, for `KEEL_FUZZ_SEED`.
    pub seed: u64,
}

/// xorshift64*: small, fast, and the same on every machine.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap_or(0)
    }
}

/// Bytes that parsers treat specially.
const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b":",
    b";",
    b" ",
    b"\t",
    b"0",
    b"ffffffffffffffff",
    b"-1",
    b"chunked",
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"\x7f",
    b"\xff",
    b"\"",
];

fn mutate(input: &mut Vec<u8>, generator: &mut Generator, seeds: &[&[u8]]) {
    for _ in 0..=generator.below(4) {
        let at = generator.below(input.len() + 1);
        match generator.below(7) {
            0 if !input.is_empty() => {
                let at = at.min(input.len() - 1);
                input[at] ^= 1 << generator.below(8);
            }
            1 if !input.is_empty() => {
                let at = at.min(input.len() - 1);
                input[at] = u8::try_from(generator.below(256)).unwrap_or(0);
            }
            2 => {
                let end = (at + generator.below(16)).min(input.len());
                input.drain(at..end);
            }
            3 => {
                let piece = INTERESTING[generator.below(INTERESTING.len())];
                input.splice(at..at, piece.iter().copied());
            }
            4 => input.truncate(at),
            5 if !input.is_empty() => {
                // Repeat a slice: long lines, many headers.
                let start = generator.below(input.len());
                let end = (start + 1 + generator.below(32)).min(input.len());
                let slice = input[start..end].to_vec();
                for _ in 0..generator.below(64) {
                    input.splice(at..at, slice.iter().copied());
                }
            }
            _ => {
                // Splice in part of another seed.
                let other = seeds[generator.below(seeds.len())];
                let start = generator.below(other.len() + 1);
                input.splice(at..at, other[start..].iter().copied());
            }
        }
    }
}

/// Feeds `check` the seeds, then mutations of them, within `budget`.
///
/// # Panics
///
/// When `check` panics: the message names the input and the seed that made it.
pub fn run(seeds: &[&[u8]], budget: Budget, check: impl FnMut(&[u8])) -> Report {
    // A count asked for by hand is run whole, however long it takes.
    let budget = match std::env::var("KEEL_FUZZ_INPUTS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        Some(inputs) => Budget {
            inputs,
            time: Duration::MAX,
        },
        None => budget,
    };
    let seed = std::env::var("KEEL_FUZZ_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |since| u64::from(since.subsec_nanos()) | 1)
        });
    drive(seeds, budget, seed, check)
}

/// [`run`] with the budget and the seed as given.
fn drive(seeds: &[&[u8]], budget: Budget, seed: u64, mut check: impl FnMut(&[u8])) -> Report {
    let inputs = budget.inputs;
    let mut generator = Generator(seed | 1);
    let started = Instant::now();
    let mut tried = 0;
    let mut input = Vec::new();
    while tried < inputs && (tried < 100 || started.elapsed() < budget.time) {
        input.clear();
        if let Some(seed_input) = seeds.get(usize::try_from(tried).unwrap_or(usize::MAX)) {
            input.extend_from_slice(seed_input);
        } else if !seeds.is_empty() {
            input.extend_from_slice(seeds[generator.below(seeds.len())]);
            mutate(&mut input, &mut generator, seeds);
        }
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            panic!(
                "input {tried} of seed {seed} (KEEL_FUZZ_SEED={seed}) panicked: b\"{}\"",
                input.escape_ascii()
            );
        }
        tried += 1;
    }
    Report {
        inputs: tried,
        seed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_check_should_be_reported_with_its_input() {
        let caught = catch_unwind(|| {
            drive(&[b"abc"], Budget::default(), 7, |input| {
                assert!(!input.contains(&b'\n'), "a newline");
            })
        });
        let message = caught.expect_err("some mutation inserts a newline");
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            text.contains("KEEL_FUZZ_SEED=") && text.contains("\\n"),
            "{text}"
        );
    }

    #[test]
    fn a_run_should_stop_at_its_budget() {
        let budget = Budget {
            inputs: 500,
            time: Duration::from_secs(60),
        };
        let report = drive(&[b"seed"], budget, 7, |_| {});
        assert_eq!(report.inputs, 500);
    }
}
