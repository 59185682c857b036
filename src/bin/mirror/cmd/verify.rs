//! `mirror verify`: compare two region files chunk by chunk and list the chunks that differ.
//!
//! Exit 0 and `IDENTICAL: ...` when they match, exit 1 and `DIFFERENT...` when not; the demo's
//! users, the tests and scripts look for these words.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::shared::{parse_size_arg, usage, CliResult};

/// At most this many differing chunks are listed one by one.
const LISTED_CHUNKS: usize = 100;

/// The flags of `mirror verify`.
#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// First region file
    pub a: PathBuf,
    /// Second region file
    pub b: PathBuf,
    /// Chunk size
    #[arg(long, default_value = "64KiB")]
    pub chunk: String,
}

pub fn run(args: &VerifyArgs) -> CliResult {
    let (a, b) = (&args.a, &args.b);
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
    let differing: Vec<usize> = ca
        .iter()
        .zip(&cb)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
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
    for i in differing.iter().take(LISTED_CHUNKS) {
        let start = *i as u64 * chunk;
        println!("  chunk {i}: bytes {start}..{}", (start + chunk).min(la));
    }
    if differing.len() > LISTED_CHUNKS {
        println!("  ... and {} more", differing.len() - LISTED_CHUNKS);
    }
    Ok(ExitCode::from(1))
}
