//! Peer authentication on a real socket: the node's secrets (read from `secret_file`, and
//! `accept_secret_file` during a rotation), and a non-blocking driver that runs the
//! challenge-response of [`mirror_proto::auth`] on a fresh TCP connection before it carries any
//! protocol frame (for TCP, and for the RDMA transport's setup socket).

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::BytesMut;
use mirror_proto::auth::{Credentials, Handshake, Secret, Session, Side, NONCE_LEN};

use super::TransportError;
use crate::error::ConfigError;

/// Bytes read from the socket per call during the handshake (its messages are 44 to 68 bytes).
const HANDSHAKE_READ: usize = 4096;

/// Reads and checks a secret file: at most readable by its owner, 32 to 4096 bytes. `key` names
/// the config key in the error.
pub fn read_secret(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    check_private(key, path)?;
    let bytes =
        std::fs::read(path).map_err(|e| bad_file(key, path, format!("cannot read it: {e}")))?;
    Secret::new(bytes).map_err(|e| bad_file(key, path, e.to_string()))
}

fn bad_file(key: &str, path: &Path, why: String) -> ConfigError {
    ConfigError::BadValue {
        key: key.into(),
        value: path.display().to_string(),
        why,
    }
}

/// Checks that `path` (named by config key `key`) is a regular file that only its owner can
/// read or write: a secret or a private key.
pub fn check_private(key: &str, path: &Path) -> Result<(), ConfigError> {
    let meta =
        std::fs::metadata(path).map_err(|e| bad_file(key, path, format!("cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(bad_file(key, path, "is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad_file(
            key,
            path,
            format!(
                "is readable or writable by group or others (mode {mode:03o}): it must be private to its owner (chmod 600)"
            ),
        ));
    }
    Ok(())
}

/// What a node authenticates with, shared by its listener and its connection attempts. The
/// secret files are read again for every handshake, so a rotation needs no restart (a file that
/// became unreadable or unsafe is logged and the secrets read last are kept).
#[derive(Debug)]
pub struct AuthContext {
    secret_file: PathBuf,
    accept_secret_file: Option<PathBuf>,
    last_good: Mutex<Vec<Secret>>,
    node_id: AtomicU64,
    bound_peer: AtomicU64,
}

impl AuthContext {
    /// Reads and checks both files (open fails on a bad one, naming its key).
    pub fn new(
        secret_file: PathBuf,
        accept_secret_file: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let secrets = Self::read(&secret_file, accept_secret_file.as_deref())?;
        Ok(AuthContext {
            secret_file,
            accept_secret_file,
            last_good: Mutex::new(secrets),
            node_id: AtomicU64::new(0),
            bound_peer: AtomicU64::new(0),
        })
    }

    fn read(secret_file: &Path, accept: Option<&Path>) -> Result<Vec<Secret>, ConfigError> {
        let mut secrets = vec![read_secret("secret_file", secret_file)?];
        if let Some(a) = accept {
            secrets.push(read_secret("accept_secret_file", a)?);
        }
        Ok(secrets)
    }

    /// Who this node is in the handshakes that follow (its node id and the peer it is bound
    /// to, 0 if none). Relaxed: each is a plain value read at the start of a handshake; a
    /// handshake that reads the old binding is judged again at the Hello.
    pub fn set_identity(&self, node_id: u64, bound_peer: u64) {
        self.node_id.store(node_id, Ordering::Relaxed);
        self.bound_peer.store(bound_peer, Ordering::Relaxed);
    }

    fn credentials(&self) -> Credentials {
        let mut last = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        match Self::read(&self.secret_file, self.accept_secret_file.as_deref()) {
            Ok(secrets) => *last = secrets,
            Err(e) => {
                tracing::error!(error = %e, "cannot re-read the secret; using the one read before")
            }
        }
        Credentials {
            secrets: last.clone(),
            node_id: self.node_id.load(Ordering::Relaxed),
            bound_peer: self.bound_peer.load(Ordering::Relaxed),
        }
    }

    /// Starts a handshake for a new connection.
    pub fn start(&self, side: Side) -> Result<Authenticating, TransportError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| TransportError::Io {
            context: "drawing a nonce",
            source: io::Error::other(e.to_string()),
        })?;
        let handshake = Handshake::new(side, self.credentials(), nonce)?;
        Ok(Authenticating {
            handshake: Some(handshake),
            received: BytesMut::new(),
            unsent: Vec::new(),
        })
    }
}

/// A handshake in progress on a non-blocking socket.
#[derive(Debug)]
pub struct Authenticating {
    handshake: Option<Handshake>,
    /// Bytes read and not yet taken by the handshake (after it: the peer's first records).
    received: BytesMut,
    unsent: Vec<u8>,
}

impl Authenticating {
    /// Moves the handshake on as far as the socket allows, never blocking. Returns the session
    /// and the bytes that arrived after the handshake once the peer is authenticated (and our
    /// last message is sent), `Ok(None)` while in progress, or why it failed (our Failure
    /// message for the peer is sent first, best effort).
    pub fn poll(
        &mut self,
        stream: &mut (impl Read + Write),
    ) -> Result<Option<(Session, BytesMut)>, TransportError> {
        loop {
            let Some(hs) = self.handshake.as_mut() else {
                return Err(TransportError::Closed);
            };
            self.unsent.extend(hs.take_output());
            write_some(stream, &mut self.unsent)?;
            if hs.is_done() {
                if !self.unsent.is_empty() {
                    return Ok(None);
                }
                let session = self
                    .handshake
                    .take()
                    .and_then(Handshake::into_session)
                    .ok_or(TransportError::Closed)?;
                return Ok(Some((session, std::mem::take(&mut self.received))));
            }
            let mut chunk = [0u8; HANDSHAKE_READ];
            match stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(TransportError::Io {
                        context: "authenticating",
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed the connection during authentication",
                        ),
                    })
                }
                Ok(n) => self.received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(TransportError::Io {
                        context: "authenticating",
                        source: e,
                    })
                }
            }
            match hs.receive(&self.received) {
                Ok(used) => {
                    let _ = self.received.split_to(used);
                }
                Err(e) => {
                    // Tell the peer why (its log then says so), as far as the socket takes it.
                    let mut failure = hs.take_output();
                    let _ = write_some(stream, &mut failure);
                    self.handshake = None;
                    return Err(e.into());
                }
            }
        }
    }

    /// Whether our side still has bytes to send (wait for `POLLOUT` too).
    pub fn wants_write(&self) -> bool {
        !self.unsent.is_empty()
    }
}

/// Writes as much of `buf` as the socket takes without blocking and drops what it took.
fn write_some(stream: &mut impl Write, buf: &mut Vec<u8>) -> Result<(), TransportError> {
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => return Err(TransportError::Closed),
            Ok(n) => {
                buf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(TransportError::Io {
                    context: "authenticating",
                    source: e,
                })
            }
        }
    }
    Ok(())
}
