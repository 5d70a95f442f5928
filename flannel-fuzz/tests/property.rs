//! The fuzz targets as a short property run in CI: every corpus file (seeds and every crash ever
//! found, kept as regression inputs), then random bytes and random mutations of the seeds.
//! `FLANNEL_FUZZ_CASES` sets the random cases per target and strategy (default 2000).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn cases() -> u32 {
    std::env::var("FLANNEL_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2000)
}

/// One edit of a seed: replace, insert or delete a byte at a position (taken modulo the length).
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for e in edits {
        let n = v.len().max(1);
        match *e {
            Edit::Replace(i, b) if !v.is_empty() => v[i % n] = b,
            Edit::Insert(i, b) => v.insert(i % (v.len() + 1), b),
            Edit::Delete(i) if !v.is_empty() => {
                v.remove(i % n);
            }
            Edit::Truncate(i) => v.truncate(i % (v.len() + 1)),
            _ => {}
        }
    }
    v
}

#[test]
fn every_target_survives_its_corpus_random_bytes_and_mutated_seeds() {
    for (name, target) in flannel_fuzz::TARGETS {
        let seeds = corpus(name);
        assert!(!seeds.is_empty(), "{name}: no seed corpus");
        for s in &seeds {
            target(s);
        }
        let mut runner = TestRunner::new(Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&prop::collection::vec(any::<u8>(), 0..600), |bytes| {
                target(&bytes);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{name}, random bytes: {e}"));
        let n = seeds.len();
        runner
            .run(
                &(0..n, prop::collection::vec(edit(), 1..12)),
                |(i, edits)| {
                    target(&mutate(&seeds[i], &edits));
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{name}, mutated seed: {e}"));
    }
}

#[test]
fn short_packets_are_dropped_not_a_panic() {
    // Found by the udp_datagram target: net_unreachable and dec_ttl indexed a short buffer.
    for len in 0..20 {
        flannel_fuzz::udp_datagram(&vec![0x45; len]);
    }
}
