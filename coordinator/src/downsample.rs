//! Long curves reduced for drawing: Largest-Triangle-Three-Buckets keeps the
//! first and last points and, from each bucket between them, the point that
//! spans the largest triangle with its neighbours' choices, so spikes and
//! minima survive where averaging would flatten them.

/// At most `threshold` of `points` (steps ascending), the first and last
/// always among them; all of them when they are that few already.
pub fn lttb(points: &[(i64, f64)], threshold: usize) -> Vec<(i64, f64)> {
    let n = points.len();
    if threshold >= n || threshold < 3 {
        return if threshold < 3 && n > threshold {
            // Too few to bucket: the ends.
            points
                .iter()
                .take(1)
                .chain(points.last().filter(|_| threshold >= 2))
                .copied()
                .collect()
        } else {
            points.to_vec()
        };
    }
    let mut out = Vec::with_capacity(threshold);
    out.push(points[0]);
    // The points between the ends fall into threshold - 2 buckets.
    let every = (n - 2) as f64 / (threshold - 2) as f64;
    let mut chosen = 0usize;
    for bucket in 0..threshold - 2 {
        let start = (bucket as f64 * every) as usize + 1;
        let end = (((bucket + 1) as f64 * every) as usize + 1).min(n - 1);
        // The next bucket's mean (or the last point) is the triangle's third corner.
        let next_end = (((bucket + 2) as f64 * every) as usize + 1).min(n);
        let (mean_x, mean_y) = if bucket + 1 == threshold - 2 {
            (points[n - 1].0 as f64, points[n - 1].1)
        } else {
            let next = &points[end..next_end.max(end + 1).min(n)];
            let len = next.len() as f64;
            (
                next.iter().map(|p| p.0 as f64).sum::<f64>() / len,
                next.iter().map(|p| p.1).sum::<f64>() / len,
            )
        };
        let (ax, ay) = (points[chosen].0 as f64, points[chosen].1);
        let mut best = start;
        let mut best_area = -1.0;
        for (i, p) in points.iter().enumerate().take(end.max(start + 1)).skip(start) {
            let area = ((ax - mean_x) * (p.1 - ay) - (ax - p.0 as f64) * (mean_y - ay)).abs();
            // NaN and infinite values are kept, not lost: they rank first.
            let area = if area.is_finite() { area } else { f64::INFINITY };
            if area > best_area {
                best_area = area;
                best = i;
            }
        }
        out.push(points[best]);
        chosen = best;
    }
    out.push(points[n - 1]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_ends_the_count_and_the_spikes() {
        let points: Vec<(i64, f64)> = (0..10_000)
            .map(|s| (s, if s == 4321 { 100.0 } else { (s as f64 * 0.01).sin() }))
            .collect();
        let reduced = lttb(&points, 500);
        assert_eq!(reduced.len(), 500);
        assert_eq!(reduced.first(), points.first());
        assert_eq!(reduced.last(), points.last());
        assert!(reduced.windows(2).all(|w| w[0].0 < w[1].0), "steps stay in order");
        assert!(reduced.contains(&(4321, 100.0)), "the spike survives");
        let low = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let kept_low = reduced.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        assert!(kept_low - low < 0.01, "the minimum survives: {kept_low} vs {low}");
        // Short curves come back whole; tiny thresholds keep the ends.
        assert_eq!(lttb(&points[..300], 500), points[..300].to_vec());
        assert_eq!(lttb(&points, 2), vec![points[0], points[9_999]]);
        assert_eq!(lttb(&points, 1), vec![points[0]]);
        assert!(lttb(&[], 10).is_empty());
        for n in [3usize, 4, 5, 7, 11] {
            for t in 3..n {
                let r = lttb(&points[..n], t);
                assert_eq!(r.len(), t, "{n} points to {t}");
                assert!(r.windows(2).all(|w| w[0].0 < w[1].0), "{n} to {t}: {r:?}");
            }
        }
    }
}
