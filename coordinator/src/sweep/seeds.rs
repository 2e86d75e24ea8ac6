//! Seeds of a sweep, fixed at planning: a list, a `{ from, count }` range, or `{ random = N }`
//! drawn once from the caller's RNG seed. Random seeds are the high 32 bits of successive
//! SplitMix64 outputs (repeats skipped), so they fit A1111-style 32-bit seed fields, and a
//! larger `N` with the same RNG seed extends the same sequence — extending a sweep keeps its
//! old cells.

use toml::Spanned;

use super::error::{PlanError, PlanErrorKind};
use super::source::SweepSource;
use super::spec::SeedsSpec;

/// The seeds, in order. `max` bounds their number (the cell limit).
pub(crate) fn resolve(
    spec: &Spanned<SeedsSpec>,
    src: &SweepSource,
    random_seed: u64,
    max: u64,
) -> Result<Vec<u64>, PlanError> {
    let invalid = |span: std::ops::Range<usize>, key: &str, message: String| {
        PlanError::new(
            src.place_of(&span),
            PlanErrorKind::Invalid {
                key: key.into(),
                message,
            },
        )
    };
    let count = |c: &Spanned<i64>, key: &str| -> Result<u64, PlanError> {
        let n = *c.get_ref();
        if n < 1 {
            return Err(invalid(
                c.span(),
                key,
                format!("{n} is not a positive count"),
            ));
        }
        let n = n as u64;
        if n > max {
            return Err(PlanError::new(
                src.place_of(&c.span()),
                PlanErrorKind::TooManyCells {
                    count: n.to_string(),
                    limit: max,
                },
            ));
        }
        Ok(n)
    };
    match spec.get_ref() {
        SeedsSpec::List(list) => {
            if list.is_empty() {
                return Err(PlanError::new(
                    src.place_of(&spec.span()),
                    PlanErrorKind::EmptyList("seeds".into()),
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    u64::try_from(*s.get_ref()).map_err(|_| {
                        invalid(
                            s.span(),
                            &format!("seeds[{i}]"),
                            format!("{} is negative", s.get_ref()),
                        )
                    })
                })
                .collect()
        }
        SeedsSpec::Range { from, count: c } => {
            let n = count(c, "seeds.count")?;
            let start = u64::try_from(*from.get_ref()).map_err(|_| {
                invalid(
                    from.span(),
                    "seeds.from",
                    format!("{} is negative", from.get_ref()),
                )
            })?;
            // `from` is at most i64::MAX (a TOML integer), so this cannot overflow u64.
            if start + (n - 1) > i64::MAX as u64 {
                return Err(invalid(
                    c.span(),
                    "seeds.count",
                    "the range runs past 2^63-1".into(),
                ));
            }
            Ok((start..start + n).collect())
        }
        SeedsSpec::Random { count: c } => Ok(random(random_seed, count(c, "seeds.random")?)),
    }
}

/// `n` distinct seeds in `0..2^32` drawn from `rng_seed`.
pub(crate) fn random(rng_seed: u64, n: u64) -> Vec<u64> {
    let mut state = rng_seed;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    while (out.len() as u64) < n {
        let s = splitmix64(&mut state) >> 32;
        if seen.insert(s) {
            out.push(s);
        }
    }
    out
}

/// SplitMix64 (Steele, Lea, Flood 2014), as in `java.util.SplittableRandom`.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_reference() {
        // First outputs for seed 0 from the reference implementation
        // (https://prng.di.unimi.it/splitmix64.c).
        let mut s = 0;
        assert_eq!(splitmix64(&mut s), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(&mut s), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn random_seeds_are_deterministic_distinct_and_extendable() {
        let a = random(42, 100);
        assert_eq!(a, random(42, 100));
        assert_ne!(a, random(43, 100));
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), 100);
        assert!(a.iter().all(|s| *s < 1 << 32));
        assert_eq!(random(42, 150)[..100], a[..]);
    }
}
