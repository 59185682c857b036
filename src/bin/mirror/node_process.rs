//! A child `mirror` node process, watched through its report lines.
//!
//! `mirror backup` and `mirror primary` print `kind key=value ...` lines on stdout (`status ...`,
//! `progress ...`, `done ...`); a thread keeps the latest line of each kind, so a caller can wait
//! for a phase or a count, then signal, kill or stop the node.
//!
//! Two users drive nodes this way: `mirror demo` (src/bin/mirror/cmd/demo.rs) and the
//! integration tests (tests/common/mod.rs includes this file with `#[path]`). That is why this
//! file needs only std, libc and the library, reports failures as values (the demo turns them
//! into errors, the tests into panics with the node's log), and leaves the program, the arguments
//! and the environment to the caller.

use std::borrow::BorrowMut;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mirror::MirrorError;

/// How often the waits below look at the child and its report lines.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The latest report line of each kind (its first word), as its `key=value` pairs.
type LatestReports = HashMap<String, HashMap<String, String>>;

/// What to do with a log file that already exists.
pub enum LogMode {
    /// Start it afresh (the demo: one file per node run).
    Truncate,
    /// Add to it (the tests: a restarted node may share its predecessor's log).
    // Only the integration tests append; the binary never does.
    #[allow(dead_code)]
    Append,
}

/// Why a wait ended without what it waited for.
#[derive(Debug)]
pub enum WaitError {
    /// The child exited before the condition held (from [`wait_until`]).
    Exited(ExitStatus),
    /// The time ran out. [`NodeProcess::stop`] and [`NodeProcess::wait_exit`] SIGKILL the child
    /// first, so that nothing outlives a failed wait.
    TimedOut,
    /// Asking the system about the child failed (from `stop` and `wait_exit`).
    Io(std::io::Error),
}

/// A running `mirror` node; SIGKILLed when dropped while still running.
pub struct NodeProcess {
    /// What messages call it ("primary", "backup").
    pub name: String,
    pub child: Child,
    /// Where the child's stderr (its log) goes.
    // Read by the integration tests (they print its tail on failure), not by the binary.
    #[allow(dead_code)]
    pub log: PathBuf,
    latest: Arc<Mutex<LatestReports>>,
}

impl NodeProcess {
    /// Starts `command` (the caller sets the program, the arguments and the environment) with
    /// stdin closed, stderr into `log`, and stdout read by a thread that keeps the latest report
    /// line of each kind.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log: &Path,
        log_mode: LogMode,
    ) -> Result<NodeProcess, MirrorError> {
        let (opened, verb) = match log_mode {
            LogMode::Truncate => (std::fs::File::create(log), "creating"),
            LogMode::Append => (
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log),
                "opening",
            ),
        };
        let stderr = opened.map_err(|source| MirrorError::Io {
            context: format!("{verb} {}", log.display()),
            source,
        })?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|source| MirrorError::Io {
                context: format!("starting the {name} process"),
                source,
            })?;
        let latest = Arc::new(Mutex::new(LatestReports::new()));
        // Always present: stdout is piped just above.
        if let Some(stdout) = child.stdout.take() {
            let sink = Arc::clone(&latest);
            std::thread::spawn(move || keep_latest_reports(stdout, &sink));
        }
        Ok(NodeProcess {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            latest,
        })
    }

    /// The value of `key` in the latest report line of `kind`.
    pub fn get(&self, kind: &str, key: &str) -> Option<String> {
        lock(&self.latest).get(kind)?.get(key).cloned()
    }

    /// Like [`get`](Self::get) as a number; 0 when absent or not a number (counters start at 0).
    pub fn num(&self, kind: &str, key: &str) -> u64 {
        self.get(kind, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Whether the node printed a line of `kind` yet.
    pub fn has(&self, kind: &str) -> bool {
        lock(&self.latest).contains_key(kind)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) takes any pid and signal number and touches no memory of ours; the pid
        // is our own child's, and `sig` a signal number from libc.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGKILL, then reap the child.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM (a node closes cleanly on it), then [`wait_exit`](Self::wait_exit).
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus, WaitError> {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits for the child to exit; SIGKILLs it when `timeout` passes first.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, WaitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(WaitError::Io)? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(WaitError::TimedOut);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Waits until `cond(node)` holds; fails when the child exits first or `timeout` passes (the
/// child keeps running then: the caller decides).
///
/// Generic over what holds the process so that a wrapper's callers see the wrapper in `cond`
/// (the tests wrap `NodeProcess` in their `Node`).
pub fn wait_until<N: BorrowMut<NodeProcess>>(
    node: &mut N,
    timeout: Duration,
    mut cond: impl FnMut(&N) -> bool,
) -> Result<(), WaitError> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond(node) {
            return Ok(());
        }
        if let Ok(Some(status)) = node.borrow_mut().child.try_wait() {
            return Err(WaitError::Exited(status));
        }
        if Instant::now() > deadline {
            return Err(WaitError::TimedOut);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The reader thread: until the child closes its stdout, records each line as the latest of its
/// kind.
fn keep_latest_reports(stdout: ChildStdout, latest: &Mutex<LatestReports>) {
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let mut words = line.split_whitespace();
        let Some(kind) = words.next() else {
            continue;
        };
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        lock(latest).insert(kind.to_owned(), fields);
    }
}

/// Locks the report lines even after a panic elsewhere: each update is a single insert, so the
/// map is never left half-written.
fn lock(latest: &Mutex<LatestReports>) -> MutexGuard<'_, LatestReports> {
    latest.lock().unwrap_or_else(PoisonError::into_inner)
}
