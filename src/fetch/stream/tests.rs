//! Unit tests of streamed fetches: how runs are cut.

use super::*;

#[test]
fn runs_coalesce_adjacent_and_respect_limits() {
    let items = vec![(0..10, 'a'), (10..20, 'b'), (25..30, 'c'), (30..100, 'd')];
    let runs = build_runs(items.clone(), 1000, 0);
    let ranges: Vec<_> = runs.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(ranges, vec![0..20, 25..100]);
    let runs = build_runs(items.clone(), 1000, u64::MAX);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].0, 0..100);
    let runs = build_runs(items, 20, 0);
    let ranges: Vec<_> = runs.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(ranges, vec![0..20, 25..30, 30..100]);
    // Chunks sharing one compressed member always share a request.
    let shared = build_runs(vec![(0..50, 1), (0..50, 2)], 10, 0);
    assert_eq!(shared.len(), 1);
}
