//! `mirror demo` (the README's main job) with sizes other than its defaults: its checks are
//! about the engine, so the region and the queues are sized for the writes asked for, and a
//! region given too small for them is refused up front.

mod common;

use common::*;

#[test]
fn the_demo_holds_its_checks_with_4kib_writes() {
    // Writes of 4 KiB: an outage (the writes asked for, and those of the ~0.1 s the demo takes
    // to notice and restart the backup: 78 MB in one run) used to outgrow the 16 MiB default
    // region and fill the 64 MiB queue, failing "catch-up moved whole requests only" and "less
    // than the region".
    let dir = tempfile::tempdir().unwrap();
    let (st, out, err) = run(&[
        "demo",
        "--write-size",
        "4096",
        "--writes",
        "300",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(st.success(), "{out}\n{err}");
    assert!(out.contains("DEMO PASSED"), "{out}");
    assert!(!out.contains("[FAIL]"), "{out}");
    let region: u64 = out
        .split("region ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .expect("the demo names its region size");
    assert!(region > 16 << 20, "the region grew with the writes: {out}");
}

#[test]
fn a_region_too_small_for_the_demos_writes_is_refused() {
    let (st, out, err) = run(&["demo", "--region-size", "1MiB", "--writes", "20000"]);
    assert!(!st.success(), "{out}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("--region-size 1MiB"), "{err}");
    assert!(
        err.contains("13MiB"),
        "names the least region that would do: {err}"
    );
    assert!(out.is_empty(), "something ran: {out}");
}

#[test]
fn writes_the_demo_cannot_hold_are_refused_naming_what_would_do() {
    // 20 000 writes of 2 MiB per phase would need files of 160 GiB.
    let (st, out, err) = run(&["demo", "--write-size", "2MiB"]);
    assert!(!st.success(), "{out}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("give at most --writes"), "{err}");
    assert!(out.is_empty(), "something ran: {out}");
    let (st, out, err) = run(&["demo", "--write-size", "17MiB", "--writes", "1"]);
    assert!(!st.success(), "{out}");
    assert!(err.contains("at most 16 MiB"), "{err}");
    assert!(out.is_empty(), "something ran: {out}");
}
