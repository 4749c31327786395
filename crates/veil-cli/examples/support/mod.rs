//! What the benchmark examples share.

/// Min, median and max of `v` (zeros if empty).
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (s[0], s[s.len() / 2], s[s.len() - 1])
}
