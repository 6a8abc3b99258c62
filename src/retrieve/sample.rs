//! Seeded, reproducible samples of interactions for coaching: uniform, or
//! stratified (k per agent or per queue), never repeating an interaction.
//!
//! Pure and deterministic: the same candidates and seed give the same
//! sample on every machine and release (splitmix64 and SHA-256, not the
//! platform's hasher or a crate's unstable RNG stream).

use std::collections::BTreeMap;

/// How to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strata {
    /// `count` interactions, uniformly at random.
    None,
    /// `per_stratum` interactions of each agent.
    Agent,
    /// `per_stratum` interactions of each queue.
    Queue,
}

/// An interaction that may be drawn: its key (the interaction id, or the
/// object id of an object without one) and its strata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub key: String,
    pub agent_id: String,
    pub queue: String,
}

/// splitmix64: tiny, well-mixed and fully specified, so a seed means the
/// same draw everywhere.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next();
            if v < zone {
                return v % n;
            }
        }
    }
}

/// The first `k` of a seeded Fisher–Yates shuffle of `items`.
fn pick<T>(mut items: Vec<T>, k: usize, rng: &mut SplitMix64) -> Vec<T> {
    let k = k.min(items.len());
    for i in 0..k {
        let j = i + rng.below((items.len() - i) as u64) as usize;
        items.swap(i, j);
    }
    items.truncate(k);
    items
}

fn stratum_seed(seed: u64, stratum: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, stratum.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    seed ^ u64::from_be_bytes(b)
}

/// Draws the sample: the keys chosen, each with its stratum (empty for a
/// uniform draw), in a stable order (stratum, then draw order).
/// Candidates with the same key are one interaction (the first one's
/// strata count). Each stratum is drawn with its own stream, so adding
/// interactions of one agent does not change another agent's draw.
pub fn draw(
    candidates: &[Candidate],
    strata: Strata,
    count: usize,
    per_stratum: usize,
    seed: u64,
) -> Vec<(String, String)> {
    let mut unique: BTreeMap<&str, &Candidate> = BTreeMap::new();
    for c in candidates {
        unique.entry(c.key.as_str()).or_insert(c);
    }
    match strata {
        Strata::None => {
            let keys: Vec<&str> = unique.keys().copied().collect();
            pick(keys, count, &mut SplitMix64(seed)).into_iter().map(|k| (k.to_owned(), String::new())).collect()
        }
        Strata::Agent | Strata::Queue => {
            let mut by_stratum: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (key, c) in &unique {
                let s = if strata == Strata::Agent { c.agent_id.as_str() } else { c.queue.as_str() };
                by_stratum.entry(s).or_default().push(key);
            }
            let mut out = Vec::new();
            for (stratum, keys) in by_stratum {
                let mut rng = SplitMix64(stratum_seed(seed, stratum));
                out.extend(pick(keys, per_stratum, &mut rng).into_iter().map(|k| (k.to_owned(), stratum.to_owned())));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates() -> Vec<Candidate> {
        (0..60)
            .map(|i| Candidate {
                key: format!("call-{i:02}"),
                agent_id: format!("agent-{}", i % 3),
                queue: if i % 2 == 0 { "billing".into() } else { "support".into() },
            })
            .collect()
    }

    #[test]
    fn the_same_seed_draws_the_same_sample() {
        let c = candidates();
        let a = draw(&c, Strata::None, 10, 0, 7);
        assert_eq!(a, draw(&c, Strata::None, 10, 0, 7));
        assert_ne!(a, draw(&c, Strata::None, 10, 0, 8), "another seed, another sample");
        // Input order does not matter.
        let mut reversed = c.clone();
        reversed.reverse();
        assert_eq!(a, draw(&reversed, Strata::None, 10, 0, 7));
    }

    #[test]
    fn no_repeats_and_never_more_than_there_is() {
        let mut c = candidates();
        c.extend(candidates()); // the transcript and recording of each call
        let all = draw(&c, Strata::None, 1000, 0, 1);
        assert_eq!(all.len(), 60);
        let mut keys: Vec<_> = all.iter().map(|(k, _)| k.clone()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 60);
    }

    #[test]
    fn stratified_draws_k_per_stratum() {
        let c = candidates();
        let s = draw(&c, Strata::Agent, 0, 2, 7);
        assert_eq!(s.len(), 6);
        for agent in ["agent-0", "agent-1", "agent-2"] {
            let mine: Vec<_> = s.iter().filter(|(_, st)| st == agent).collect();
            assert_eq!(mine.len(), 2, "{agent}");
            for (k, _) in mine {
                let n: usize = k[5..].parse().unwrap();
                assert_eq!(format!("agent-{}", n % 3), agent, "drawn from its own stratum");
            }
        }
        let q = draw(&c, Strata::Queue, 0, 5, 7);
        assert_eq!(q.iter().filter(|(_, s)| s == "billing").count(), 5);
        // One agent gaining calls leaves the others' draws unchanged.
        let mut more = c.clone();
        more.push(Candidate { key: "call-99".into(), agent_id: "agent-0".into(), queue: "billing".into() });
        let again = draw(&more, Strata::Agent, 0, 2, 7);
        let others = |v: &[(String, String)]| v.iter().filter(|(_, s)| s != "agent-0").cloned().collect::<Vec<_>>();
        assert_eq!(others(&s), others(&again));
    }

    #[test]
    fn uniform_draws_are_fair() {
        // Each of 10 candidates picked 3 at a time over 20k seeds: every
        // candidate near 30 %.
        let c: Vec<Candidate> = (0..10)
            .map(|i| Candidate { key: format!("k{i}"), agent_id: String::new(), queue: String::new() })
            .collect();
        let mut hits = BTreeMap::new();
        for seed in 0..20_000 {
            for (k, _) in draw(&c, Strata::None, 3, 0, seed) {
                *hits.entry(k).or_insert(0u32) += 1;
            }
        }
        for (k, n) in hits {
            let share = f64::from(n) / 20_000.0;
            assert!((0.28..0.32).contains(&share), "{k}: {share}");
        }
    }
}
