//! The statistics of the benchmark, identical to the peers' harness (`shared/bench-peers`):
//! the median of the repetitions (mean of the two middle values for an even count), their min
//! and max, and nearest-rank percentiles.

/// Median, min and max of the repetitions of one measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Summary {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Summary {
    /// The summary of `values` (`None` when there are none or one is NaN).
    pub(crate) fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let sorted = sorted(values);
        Some(Summary {
            median: median_of_sorted(&sorted),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

fn median_of_sorted(sorted: &[f64]) -> f64 {
    let m = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[m]
    } else {
        (sorted[m - 1] + sorted[m]) / 2.0
    }
}

/// The median of `values` (NaN for none).
pub(crate) fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    median_of_sorted(&sorted(values))
}

/// The nearest-rank percentile `p` (0 to 100) of `values`: the smallest value such that at least
/// `p` % of the values are at most it (NaN for none).
pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let sorted = sorted(values);
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_or_the_mean_of_the_two_middles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn summary_has_median_min_and_max() {
        assert_eq!(
            Summary::of(&[5.0, 1.0, 3.0]),
            Some(Summary {
                median: 3.0,
                min: 1.0,
                max: 5.0
            })
        );
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 95.0), 95.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
        // 500 values: p99 is the 495th smallest, as in the peers' harness.
        let values: Vec<f64> = (1..=500).rev().map(f64::from).collect();
        assert_eq!(percentile(&values, 99.0), 495.0);
        assert_eq!(percentile(&values, 50.0), 250.0);
        assert_eq!(percentile(&[4.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&[4.0], 0.0), 4.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
