//! `mirror bench`'s latency over several runs: each run a fresh pair of nodes, and the targets
//! judged on the median of the runs' ratios (one run's p99 moves with the machine's own tail).

mod common;
use common::{bench_args, run};

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[test]
fn the_latency_targets_judge_the_median_of_the_runs() {
    let (st, out, err) = run(&bench_args(&[
        "--sizes",
        "64,4096",
        "--iterations",
        "200",
        "--latency-runs",
        "3",
        "--json",
    ]));
    assert!(st.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();

    // Every run's comparison is kept, numbered.
    let each = report["sync_latency"].as_array().unwrap();
    assert_eq!(each.len(), 6, "{each:?}");
    for payload in [64, 4096] {
        let runs: Vec<u64> = each
            .iter()
            .filter(|c| c["payload"] == payload)
            .map(|c| c["run"].as_u64().unwrap())
            .collect();
        assert_eq!(runs, [1, 2, 3], "payload {payload}");
    }

    let targets = report["targets"].as_array().unwrap();
    for payload in [64u64, 4096] {
        let medians = report["sync_latency_medians"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["payload"] == payload)
            .unwrap();
        assert_eq!(medians["runs"], 3);
        for (ratio, name) in [("ratio_p50", "p50"), ("ratio_p99", "p99")] {
            // The runs' own ratios, as each run's comparison printed them.
            let runs: Vec<f64> = each
                .iter()
                .filter(|c| c["payload"] == payload)
                .map(|c| c[ratio].as_f64().unwrap())
                .collect();
            let listed: Vec<f64> = medians[format!("{ratio}_each_run")]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(listed, runs);
            let m = median(&runs);
            assert_eq!(medians[ratio].as_f64().unwrap(), m);
            let row = targets
                .iter()
                .find(|r| r["figure"] == format!("sync write {name} / floor, {payload} B"))
                .unwrap();
            assert_eq!(row["measured"], format!("{m:.2}x (median of 3)"), "{row:?}");
        }
    }
}
