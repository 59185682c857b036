//! `mirror verify`: compare two region files chunk by chunk and list the chunks that differ;
//! with `--online`, ask a running primary to compare its region with its backup's while writes
//! go on (and with `--repair`, to bring differing chunks over).
//!
//! Exit 0 and `IDENTICAL: ...` (or `REPAIRED: ...`) when the regions match (now), exit 1 and
//! `DIFFERENT...` when not; the demo's users, the tests and scripts look for these words.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use mirror::control::{self, control_socket_path, LiveStatus, VerifySummary};
use mirror::MirrorError;

use super::shared::{parse_size_arg, usage, CliResult};

/// At most this many differing chunks are listed one by one.
const LISTED_CHUNKS: usize = 100;
/// How long each exchange with the node may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an online verify's progress is read.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The flags of `mirror verify`.
#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// First region file; with --online, the primary's queue file
    pub a: Option<PathBuf>,
    /// Second region file (not with --online)
    pub b: Option<PathBuf>,
    /// Compare the live regions of a running pair, through the primary's control socket
    #[arg(long)]
    pub online: bool,
    /// With --online: bring differing chunks over from the primary
    #[arg(long, requires = "online")]
    pub repair: bool,
    /// With --online: the primary's control socket (default: the queue file with `.ctl`)
    #[arg(long, requires = "online")]
    pub socket: Option<PathBuf>,
    /// Chunk size of an offline comparison (online, the node's `chunk_size` is used)
    #[arg(long, default_value = "64KiB")]
    pub chunk: String,
}

pub fn run(args: &VerifyArgs) -> CliResult {
    if args.online {
        return online(args);
    }
    let (Some(a), Some(b)) = (&args.a, &args.b) else {
        return Err(usage(
            "name two region files, or --online and the primary's queue file",
        ));
    };
    let chunk = parse_size_arg(&args.chunk)?;
    if chunk == 0 {
        return Err(usage("--chunk must be at least 1 byte"));
    }
    let ca = mirror_storage::file_chunk_checksums(a, chunk)?;
    let cb = mirror_storage::file_chunk_checksums(b, chunk)?;
    let la = std::fs::metadata(a).map(|m| m.len()).unwrap_or(0);
    let lb = std::fs::metadata(b).map(|m| m.len()).unwrap_or(0);
    if la != lb {
        println!(
            "DIFFERENT sizes: {} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        );
        return Ok(ExitCode::from(1));
    }
    let differing: Vec<(u64, u64)> = ca
        .iter()
        .zip(&cb)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| {
            let start = i as u64 * chunk;
            (start, chunk.min(la - start))
        })
        .collect();
    if differing.is_empty() {
        println!(
            "IDENTICAL: {} chunks of {chunk} bytes ({la} bytes)",
            ca.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "DIFFERENT: {} of {} chunks differ",
        differing.len(),
        ca.len()
    );
    list_chunks(&differing, differing.len() as u64, chunk);
    Ok(ExitCode::from(1))
}

fn list_chunks(chunks: &[(u64, u64)], total: u64, chunk_size: u64) {
    for &(start, len) in chunks.iter().take(LISTED_CHUNKS) {
        println!(
            "  chunk {}: bytes {start}..{}",
            start / chunk_size.max(1),
            start + len
        );
    }
    if total > LISTED_CHUNKS as u64 {
        println!("  ... and {} more", total - LISTED_CHUNKS as u64);
    }
}

/// Where the operator watches a verify: a progress bar on a terminal, a line every few
/// seconds otherwise.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { last: Instant },
}

impl Progress {
    fn new() -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} chunks, {binary_bytes_per_sec}, eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                last: Instant::now(),
            }
        }
    }

    fn show(&mut self, s: &LiveStatus) {
        let Some(t) = &s.transfer else { return };
        match self {
            Progress::Bar(bar) => {
                bar.set_message(t.kind.clone());
                bar.set_length(t.chunks_total);
                bar.set_position(t.chunks_done);
            }
            Progress::Lines { last } => {
                if last.elapsed() >= Duration::from_secs(5) {
                    *last = Instant::now();
                    eprintln!(
                        "{}: {}/{} chunks, {} differing, {} MiB/s, eta {}",
                        t.kind,
                        t.chunks_done,
                        t.chunks_total,
                        t.chunks_differing,
                        t.rate_bytes_per_s >> 20,
                        t.eta_s.map_or("?".into(), |s| format!("{s}s"))
                    );
                }
            }
        }
    }

    fn finish(self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// `--online`: start the verify on the primary, follow its progress, print its result.
fn online(args: &VerifyArgs) -> CliResult {
    let socket = match (&args.socket, &args.a) {
        (Some(s), _) => s.clone(),
        (None, Some(q)) => control_socket_path(q),
        (None, None) => return Err(usage("name the primary: its queue file, or --socket PATH")),
    };
    if args.b.is_some() {
        return Err(usage(
            "--online compares a running pair: name only the primary",
        ));
    }
    let control_error = |e: control::ControlError| MirrorError::Verify(e.to_string());
    let before = control::status(&socket, ANSWER_TIMEOUT)
        .map_err(control_error)?
        .verifies_finished;
    control::verify(&socket, args.repair, ANSWER_TIMEOUT).map_err(control_error)?;
    let mut progress = Progress::new();
    let (summary, chunk_size) = loop {
        std::thread::sleep(POLL_INTERVAL);
        let s = control::status(&socket, ANSWER_TIMEOUT).map_err(control_error)?;
        progress.show(&s);
        if s.verifies_finished > before {
            match s.last_verify {
                Some(v) => break (v, s.chunk_size),
                None => return Err(MirrorError::Verify("the node reported no result".into())),
            }
        }
        if let Some(why) = s.failure {
            return Err(MirrorError::Verify(format!("the node failed: {why}")));
        }
    };
    progress.finish();
    report(&summary, chunk_size)
}

fn report(v: &VerifySummary, chunk_size: u64) -> CliResult {
    if let Some(why) = &v.abandoned {
        println!(
            "INCOMPLETE: {} chunks compared, {} differing so far; {why}",
            v.chunks_compared, v.chunks_differing
        );
        return Ok(ExitCode::from(2));
    }
    let chunks: Vec<(u64, u64)> = v.differing.iter().map(|&[o, l]| (o, l)).collect();
    if v.chunks_differing == 0 {
        println!(
            "IDENTICAL: {} chunks of {chunk_size} bytes compared online in {} ms",
            v.chunks_compared, v.elapsed_ms
        );
        return Ok(ExitCode::SUCCESS);
    }
    if v.chunks_repaired == v.chunks_differing {
        println!(
            "REPAIRED: {} of {} chunks differed and were brought over from the primary",
            v.chunks_differing, v.chunks_compared
        );
        list_chunks(&chunks, v.chunks_differing, chunk_size);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "DIFFERENT: {} of {} chunks differ (compared online; `--repair` brings them over from the primary)",
        v.chunks_differing, v.chunks_compared
    );
    list_chunks(&chunks, v.chunks_differing, chunk_size);
    Ok(ExitCode::from(1))
}
