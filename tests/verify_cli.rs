//! `mirror verify --online` as an operator runs it against a live pair of `mirror` processes
//! (the runbook's "Verify a live pair"): identical while the primary writes, a byte flipped in
//! the backup's region file found at its chunk, `--repair` bringing it back, and refusals that
//! say why.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

#[test]
fn verify_online_finds_and_repairs_a_flipped_byte_of_a_live_pair() {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(dir.path(), "block");
    pair.rate = 2000;
    let backup = pair.start_backup(0);
    let mut primary = pair.start_primary(0, 0, 4);
    primary.wait_until("writes", Duration::from_secs(30), |p| {
        p.num("progress", "completed") > 500
    });
    let queue = pair.path("primary.queue");
    let queue = queue.to_str().unwrap();
    // Under load: no false difference.
    let (st, out, err) = run(&["verify", "--online", queue]);
    assert!(st.success() && out.contains("IDENTICAL"), "{out}{err}");
    // Writes slow to a trickle (one a second: the flipped byte below stays flipped), then,
    // behind the engine's back, one byte of the backup's region flips.
    assert!(primary.stop().success());
    pair.rate = 1;
    let mut primary = pair.start_primary(1, 0, 1);
    primary.wait_until("synchronous", Duration::from_secs(30), |p| {
        p.get("progress", "phase").as_deref() == Some("synchronous")
    });
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pair.path("backup.region"))
        .unwrap();
    let at = 7 * 65536 + 3;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    byte[0] ^= 0xff;
    file.write_all_at(&byte, at).unwrap();
    let (st, out, _) = run(&["verify", "--online", queue]);
    assert_eq!(st.code(), Some(1), "{out}");
    assert!(
        out.contains("DIFFERENT: 1 of 16 chunks") && out.contains("chunk 7:"),
        "{out}"
    );
    let (st, out, _) = run(&["verify", "--online", "--repair", queue]);
    assert!(st.success() && out.contains("REPAIRED"), "{out}");
    let (st, out, _) = run(&["verify", "--online", queue]);
    assert!(st.success() && out.contains("IDENTICAL"), "{out}");
    // The backup does not drive a verify; --repair needs --online.
    let bq = pair.path("backup.queue");
    let (st, _, err) = run(&["verify", "--online", bq.to_str().unwrap()]);
    assert!(!st.success() && err.contains("primary"), "{err}");
    let (st, _, err) = run(&["verify", "--repair", queue]);
    assert!(!st.success() && err.contains("--online"), "{err}");
    finish_and_verify(&pair, primary, Some(backup), 1);
}
