//! `mirror secret` (a new pair secret, written private) and `mirror fingerprint` (what a peer
//! pins with `tls_peer_fingerprint`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use mirror::MirrorError;

use super::shared::{usage, CliResult};

/// The flags of `mirror secret`.
#[derive(Args, Debug, Clone)]
pub struct SecretArgs {
    /// Where to write it (created with mode 600; an existing file is not overwritten)
    out: PathBuf,
    /// Random bytes in it (32 to 4096)
    #[arg(long, default_value_t = 32)]
    bytes: usize,
}

/// Writes `bytes` random bytes from the OS to a new file only its owner can read.
pub fn secret(a: &SecretArgs) -> CliResult {
    if !(mirror_proto::auth::MIN_SECRET_LEN..=mirror_proto::auth::MAX_SECRET_LEN).contains(&a.bytes)
    {
        return Err(usage(format!("--bytes {} is outside 32..=4096", a.bytes)));
    }
    let mut secret = vec![0u8; a.bytes];
    getrandom::fill(&mut secret).map_err(|e| MirrorError::Io {
        context: "drawing random bytes".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let io = |source| MirrorError::Io {
        context: format!("writing {}", a.out.display()),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.out)
        .map_err(io)?;
    f.write_all(&secret).map_err(io)?;
    f.sync_all().map_err(io)?;
    println!(
        "wrote a {}-byte secret to {} (mode 600): copy it to the other node over a secure channel and set secret_file on both",
        a.bytes,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The flags of `mirror fingerprint`.
#[derive(Args, Debug, Clone)]
pub struct FingerprintArgs {
    /// A PEM certificate (the first one in the file is fingerprinted)
    cert: PathBuf,
}

/// Prints the SHA-256 fingerprint of a certificate, as `tls_peer_fingerprint` takes it.
pub fn fingerprint(a: &FingerprintArgs) -> CliResult {
    let fp = mirror::transport::tls::fingerprint_of_file(&a.cert)?;
    println!("{fp}");
    Ok(ExitCode::SUCCESS)
}
