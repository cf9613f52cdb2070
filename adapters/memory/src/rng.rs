//! A tiny deterministic PRNG (splitmix64) for the retry-jitter samples, so a seeded store replays
//! exactly the same backoff delays.

/// Sebastiano Vigna's splitmix64: one `u64` of state, full period, good enough for jitter.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed` (any value, zero included).
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A sample uniform in `[0, 1)`: the top 53 bits scaled by 2^-53, so 1.0 is never produced.
    pub(crate) fn next_f64(&mut self) -> f64 {
        unit_from_bits(self.next_u64())
    }
}

/// Maps 64 random bits to `[0, 1)`: the top 53 bits (an f64's precision) times 2^-53.
fn unit_from_bits(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1_u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_stay_in_the_unit_interval_and_spread_over_it() {
        let mut rng = SplitMix64::new(42);
        let mut low = false;
        let mut high = false;
        for _ in 0..100_000 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x), "{x} outside [0, 1)");
            low |= x < 0.01;
            high |= x > 0.99;
        }
        assert!(low && high, "samples should reach both ends of [0, 1)");
    }

    #[test]
    fn extreme_bits_map_inside_the_interval() {
        assert_eq!(unit_from_bits(0), 0.0);
        let top = unit_from_bits(u64::MAX);
        assert!(top < 1.0, "{top}");
        assert!(top > 0.999_999, "{top}");
    }

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let draw = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // Reference value of splitmix64 seeded with 0 (from the reference C implementation).
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }
}
