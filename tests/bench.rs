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

#[test]
fn a_report_names_the_machine_it_measured() {
    // Every section off: the machine is named whatever runs.
    let (st, out, err) = run(&bench_args(&["--json"]));
    assert!(st.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let machine = &report["machine"];
    let cpus = machine["cpus"].as_u64().unwrap_or(0);
    let online = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(cpus, online, "{machine}");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(machine["kernel"], kernel.trim(), "{machine}");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    if let Some(name) = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
    {
        assert_eq!(machine["cpu"], name.1.trim(), "{machine}");
    }

    // And as the first line of the text report, before any figure.
    let (st, out, err) = run(&bench_args(&[]));
    assert!(st.success(), "{err}");
    let first = out.lines().next().unwrap_or_default();
    assert!(first.starts_with("machine: "), "{out}");
    assert!(first.contains(&format!(", {online} CPU")), "{first}");
    assert!(
        first.ends_with(&format!("kernel {}", kernel.trim())),
        "{first}"
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_bench_quietly_and_its_files_with_it() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    // Long enough that it prints again after the reader is gone (`mirror bench | head -2`).
    let args = bench_args(&[
        "--sizes",
        "64",
        "--iterations",
        "2000",
        "--latency-runs",
        "3",
        "--dir",
        dir_arg,
    ]);
    let mut child = Command::new(common::BIN)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("machine: "), "{first}");
    // The reader is gone (dropped with the BufReader).
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(141),
        "{:?} {err}",
        out.status.signal()
    );
    assert!(!err.contains("panicked"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "the run's files were left behind: {left:?}"
    );
}
