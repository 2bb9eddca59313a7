//! Unit tests of the bench report: medians, ratios, the table, the charts.

use super::render::{format_seconds, grid_steps, nice_ceiling};
use super::*;

fn run(pull: f64, run: f64, bytes: u64) -> RunResult {
    RunResult {
        pull_secs: pull,
        run_secs: run,
        total_secs: pull + run,
        fetched_bytes: bytes,
        ready: true,
        lazy_layers: None,
        layers: 2,
        snapshotter_peak_rss: None,
        warm_run_secs: None,
        create_secs: 0.0,
        fetched_all_bytes: None,
    }
}

/// `mode`'s result of one run on the sample report's shaped link.
fn result_of(mode: Mode, one: RunResult) -> ModeResult {
    ModeResult {
        link: "20mbit:50ms".into(),
        mode,
        median: Summary::of(std::slice::from_ref(&one)),
        runs: vec![one],
        speedup: None,
        vs_best_peer: None,
        vs_ideal: None,
    }
}

fn sample_report() -> BenchReport {
    let mut results = vec![
        ModeResult {
            link: "20mbit:50ms".into(),
            mode: Mode::Overlayfs,
            runs: vec![run(10.0, 1.0, 20_000_000), run(12.0, 1.0, 20_000_000)],
            median: Summary::of(&[run(10.0, 1.0, 20_000_000), run(12.0, 1.0, 20_000_000)]),
            speedup: None,
            vs_best_peer: None,
            vs_ideal: None,
        },
        ModeResult {
            link: "20mbit:50ms".into(),
            mode: Mode::Lazysnap,
            runs: vec![RunResult {
                lazy_layers: Some(2),
                ..run(0.5, 1.5, 2_000_000)
            }],
            median: Summary::of(&[run(0.5, 1.5, 2_000_000)]),
            speedup: None,
            vs_best_peer: None,
            vs_ideal: None,
        },
    ];
    compute_ratios(&mut results);
    BenchReport {
        lazysnap_version: "0.1.0".into(),
        finished_unix: 0,
        runs_per_mode: 2,
        image: ImageReport {
            gzip_reference: "127.0.0.1:1/bench/app:gzip".into(),
            estargz_reference: "127.0.0.1:1/bench/app:estargz".into(),
            layers: 2,
            app_bytes: 40_000_000,
            app_files: 100,
            gzip_bytes: 20_000_000,
            estargz_bytes: 21_000_000,
            workload: vec!["/bin/sh".into()],
            prefetch_list: vec![],
            converter: "builtin".into(),
        },
        state_dir: "/tmp".into(),
        background_fill: true,
        ideal_bytes: None,
        results,
        notes: vec![],
    }
}

#[test]
fn medians_and_speedups() {
    assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    assert_eq!(median(vec![]), 0.0);
    let report = sample_report();
    assert_eq!(report.results[0].median.total_secs, 12.0);
    assert_eq!(report.results[1].speedup, Some(6.0));
}

#[test]
fn table_has_one_row_per_mode_with_speedup() {
    let table = render_table(&sample_report());
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("link") && lines[0].contains("MB to ready"));
    let markdown = render_markdown(&sample_report());
    assert_eq!(markdown.lines().count(), 4, "{markdown}");
    assert!(markdown
        .lines()
        .nth(1)
        .unwrap()
        .starts_with("| --- | --- | ---: |"));
    assert!(lines[2].contains("overlayfs") && lines[2].contains("1.00x"));
    assert!(
        lines[3].contains("lazysnap") && lines[3].contains("6.00x"),
        "{table}"
    );
    assert!(
        lines[3].contains("2.0") && lines[3].contains("2/2"),
        "{table}"
    );
    assert!(lines[2].contains(" - "), "{table}");
}

#[test]
fn svg_is_well_formed_and_labels_every_bar() {
    let svg = render_svg(&sample_report());
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<rect").count(), 1 + 4 + 4);
    assert!(svg.contains("12.00 s") && svg.contains("2.00 s") && svg.contains(">6.0x<"));
    assert!(svg.contains("20mbit:50ms"));
    let json = serde_json::to_string(&sample_report()).unwrap();
    let back: BenchReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, sample_report());
}

#[test]
fn spread_peak_memory_and_the_ratio_to_the_fastest_peer() {
    let mut report = sample_report();
    let overlay = &report.results[0].median;
    assert_eq!(
        (overlay.total_min_secs, overlay.total_max_secs),
        (11.0, 13.0)
    );
    let peer = |mode, total: f64| {
        result_of(
            mode,
            RunResult {
                snapshotter_peak_rss: Some(50_000_000),
                ..run(0.5, total - 0.5, 1_000_000)
            },
        )
    };
    report.results.push(peer(Mode::Stargz, 4.0));
    report.results.push(peer(Mode::Soci, 2.5));
    compute_ratios(&mut report.results);
    // lazysnap's 2 s against the faster peer's 2.5 s.
    assert_eq!(report.results[1].vs_best_peer, Some(0.8));
    assert!(report.results[2].vs_best_peer.is_none());
    assert_eq!(
        report.results[3].median.snapshotter_peak_rss,
        Some(50_000_000)
    );
    let table = render_table(&report);
    assert!(
        table.contains("vs best peer") && table.contains("0.80"),
        "{table}"
    );
    assert!(table.contains("11.00-13.00"), "{table}");
    let soci = table.lines().find(|l| l.contains("soci")).unwrap();
    assert!(soci.contains(" 50 "), "{table}");
    // A results.json written before these fields existed still reads.
    let mut old = serde_json::to_value(sample_report()).unwrap();
    old["results"][0]["median"]
        .as_object_mut()
        .unwrap()
        .remove("total_min_secs");
    old["results"][0]
        .as_object_mut()
        .unwrap()
        .remove("vs_best_peer");
    assert!(serde_json::from_value::<BenchReport>(old).is_ok());
}

#[test]
fn an_optimized_peer_sets_the_bar_for_optimized_lazysnap_only() {
    let mut report = sample_report();
    let with = |mode, total: f64| result_of(mode, run(0.5, total - 0.5, 1_000_000));
    report.results.push(with(Mode::LazysnapOptimized, 1.0));
    report.results.push(with(Mode::Stargz, 4.0));
    report.results.push(with(Mode::StargzOptimized, 2.5));
    compute_ratios(&mut report.results);
    let ratio = |mode| {
        report
            .results
            .iter()
            .find(|r| r.mode == mode)
            .and_then(|r| r.vs_best_peer)
    };
    // Unoptimized lazysnap (2 s) against stargz on its unoptimized image (4 s).
    assert_eq!(ratio(Mode::Lazysnap), Some(0.5));
    // lazysnap-opt (1 s) against the fastest peer, stargz-opt (2.5 s).
    assert_eq!(ratio(Mode::LazysnapOptimized), Some(0.4));
    assert_eq!(ratio(Mode::StargzOptimized), None);
    assert_eq!(Mode::parse("stargz-opt"), Some(Mode::StargzOptimized));
    let table = render_table(&report);
    assert!(table.contains("stargz-opt"), "{table}");
    assert!(render_svg(&report).contains("stargz-opt"));
}

#[test]
fn the_ideal_start_is_the_read_bytes_at_the_link_rate_plus_three_round_trips() {
    let rtt = std::time::Duration::from_millis(100);
    // 2.5 MB at 10 Mbit/s (1.25 MB/s) is 2 s, plus 0.3 s of round trips.
    let ideal = ideal_secs(2_500_000, Some(10_000_000), rtt).unwrap();
    assert!((ideal - 2.3).abs() < 1e-9, "{ideal}");
    assert_eq!(ideal_secs(2_500_000, None, rtt), None);
    let mut report = sample_report();
    report.ideal_bytes = Some(2_500_000);
    compute_ideal_ratios(&mut report.results, &[("20mbit:50ms".into(), 0.5)]);
    // lazysnap's 2 s against an ideal 0.5 s.
    assert_eq!(report.results[1].vs_ideal, Some(4.0));
    let table = render_table(&report);
    assert!(
        table.contains("vs ideal") && table.contains("4.00"),
        "{table}"
    );
    assert!(render_svg(&report).contains("ideal 0.50 s"));
    // Warm runs, where measured, show as their median.
    let warm = |secs| RunResult {
        warm_run_secs: Some(secs),
        ..run(0.5, 1.0, 1)
    };
    assert_eq!(
        Summary::of(&[warm(0.2), warm(0.4), run(0.5, 1.0, 1)]).warm_run_secs,
        Some(0.30000000000000004)
    );
    assert_eq!(Summary::of(&[run(0.5, 1.0, 1)]).warm_run_secs, None);
    assert!(table.contains("warm s"), "{table}");
}

#[test]
fn the_png_chart_is_the_svg_drawn_at_twice_its_size() {
    let png = render_png(&render_svg(&sample_report())).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR: width and height, big-endian, after the signature and the chunk header.
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1520, 840));
    assert!(render_png("not svg").is_err());
}

#[test]
fn nice_ceiling_rounds_up() {
    assert_eq!(nice_ceiling(7.3), 10.0);
    assert_eq!(nice_ceiling(1.7), 2.0);
    assert_eq!(nice_ceiling(23.0), 25.0);
    assert_eq!(nice_ceiling(0.4), 0.5);
    assert_eq!(format_seconds(1.25), "1.25");
    assert_eq!(grid_steps(25.0), 5);
    assert_eq!(grid_steps(20.0), 4);
    assert_eq!(grid_steps(10.0), 5);
    assert_eq!(format_seconds(5.0), "5");
    assert_eq!(format_seconds(0.0), "0");
}
