//! Score arithmetic: accuracy with a 95% interval, and the unbiased pass@k.

use serde::Serialize;

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// A mean with its 95% confidence interval, clamped to [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub mean: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// How many independent units (questions) the interval rests on.
    pub n: usize,
}

/// Accuracy over questions answered `repeats` times each: `groups[q]` holds
/// question q's outcomes. The interval is the normal interval of the mean of the
/// per-question accuracies (the repeats of one question are not independent, so
/// the question is the unit); with one question it is Wilson's interval over
/// its repeats. An empty input gives 0 with the interval [0, 1].
pub fn accuracy(groups: &[Vec<bool>]) -> Estimate {
    let per_question: Vec<f64> = groups
        .iter()
        .filter(|g| !g.is_empty())
        .map(|g| g.iter().filter(|&&c| c).count() as f64 / g.len() as f64)
        .collect();
    let n = per_question.len();
    if n == 0 {
        return Estimate {
            mean: 0.0,
            ci_low: 0.0,
            ci_high: 1.0,
            n: 0,
        };
    }
    if n == 1 {
        let g = &groups
            .iter()
            .find(|g| !g.is_empty())
            .expect("one non-empty");
        let (low, high) = wilson(g.iter().filter(|&&c| c).count(), g.len());
        return Estimate {
            mean: per_question[0],
            ci_low: low,
            ci_high: high,
            n,
        };
    }
    let mean = per_question.iter().sum::<f64>() / n as f64;
    let var = per_question
        .iter()
        .map(|x| (x - mean) * (x - mean))
        .sum::<f64>()
        / (n - 1) as f64;
    let half = Z95 * (var / n as f64).sqrt();
    Estimate {
        mean,
        ci_low: (mean - half).max(0.0),
        ci_high: (mean + half).min(1.0),
        n,
    }
}

/// Wilson's score interval for `successes` out of `n` (95%).
pub fn wilson(successes: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = successes as f64 / n;
    let z2 = Z95 * Z95;
    let center = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// The unbiased pass@k estimate for one problem with `n` samples of which `c`
/// passed: `1 - C(n-c, k) / C(n, k)`, computed as the product
/// `prod_{i=n-c+1}^{n} (1 - k/i)` (no huge binomials). `None` when k > n.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Option<f64> {
    if k == 0 || k > n {
        return None;
    }
    let c = c.min(n);
    if n - c < k {
        return Some(1.0);
    }
    let fail: f64 = ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product();
    Some(1.0 - fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn pass_at_k_matches_hand_computed_binomials() {
        // n=10, c=3, k=1: 1 - C(7,1)/C(10,1) = 1 - 7/10
        assert!(close(pass_at_k(10, 3, 1).unwrap(), 0.3));
        // n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252
        assert!(close(pass_at_k(10, 3, 5).unwrap(), 1.0 - 21.0 / 252.0));
        // n=5, c=1, k=2: 1 - C(4,2)/C(5,2) = 1 - 6/10
        assert!(close(pass_at_k(5, 1, 2).unwrap(), 0.4));
        // n=200, c=13, k=10: 1 - C(187,10)/C(200,10), via log-gamma-free ratio
        let ratio: f64 = (0..10)
            .map(|i| (187 - i) as f64 / (200 - i) as f64)
            .product();
        assert!(close(pass_at_k(200, 13, 10).unwrap(), 1.0 - ratio));
        // edge cases
        assert_eq!(pass_at_k(10, 0, 1), Some(0.0));
        assert_eq!(pass_at_k(10, 10, 10), Some(1.0));
        assert_eq!(pass_at_k(10, 8, 3), Some(1.0)); // n - c < k: every k-subset passes
        assert_eq!(pass_at_k(1, 1, 1), Some(1.0));
        assert_eq!(pass_at_k(1, 0, 1), Some(0.0));
        assert_eq!(pass_at_k(3, 1, 4), None);
    }

    #[test]
    fn accuracy_interval_by_question() {
        // 4 questions, 2 repeats: per-question 1, 0.5, 0, 0.5 -> mean 0.5,
        // sample sd sqrt(((.5)^2+0+(.5)^2+0)/3) = sqrt(1/6), se = sqrt(1/24)
        let g = vec![
            vec![true, true],
            vec![true, false],
            vec![false, false],
            vec![false, true],
        ];
        let e = accuracy(&g);
        assert!(close(e.mean, 0.5));
        let half = Z95 * (1.0f64 / 24.0).sqrt();
        assert!(close(e.ci_low, 0.5 - half) && close(e.ci_high, 0.5 + half));
        assert_eq!(e.n, 4);
        // all right: a zero-width interval at 1
        let e = accuracy(&[vec![true], vec![true]]);
        assert_eq!((e.mean, e.ci_low, e.ci_high), (1.0, 1.0, 1.0));
        // one question: Wilson over its repeats
        let e = accuracy(&[vec![true, false, true, true]]);
        assert!(close(e.mean, 0.75));
        assert!(e.ci_low > 0.2 && e.ci_low < 0.75 && e.ci_high > 0.75 && e.ci_high <= 1.0);
        assert_eq!(accuracy(&[]).n, 0);
    }

    #[test]
    fn wilson_known_value() {
        // 8 of 10: the textbook Wilson interval (0.4902, 0.9433)
        let (lo, hi) = wilson(8, 10);
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
    }
}
