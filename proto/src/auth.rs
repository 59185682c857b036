//! Peer authentication: a mutual challenge-response over a pre-shared secret before any protocol
//! frame is acted on, and the record layer that authenticates every frame after it.
//!
//! Sans-IO like the rest of this crate: bytes in, bytes out. The caller supplies the secrets and
//! a fresh random nonce per connection; nothing here reads a clock, a file or a random source,
//! so the tests (and the fuzz target) drive it deterministically.
//!
//! # The handshake (docs/FORMAT.md "Authentication")
//!
//! ```text
//! initiator (dials)                          responder (accepts)
//!   Challenge{initiator, id_i, bound_i, n_i}  ->
//!                                          <-  Challenge{responder, id_r, bound_r, n_r}
//!                                          <-  Proof{HMAC(K, "… responder proof" || T)}
//!   Proof{HMAC(K, "… initiator proof" || T)}  ->
//! ```
//!
//! `T` is the transcript: the two Challenge messages exactly as sent. Each proof therefore covers
//! both nonces (a recorded handshake fails against a fresh nonce), both node ids and what each
//! node is bound to (the pair identity), and the prover's side (a challenge reflected back to its
//! sender, or a responder's proof replayed as an initiator's, does not verify). Both sides refuse
//! a peer that claims their own node id or nonce.
//!
//! After the handshake each direction has its own key, `HKDF-SHA256(salt = T, ikm = K)` expanded
//! with the sender's side, and every byte of protocol frames travels in records:
//!
//! ```text
//! body_len u32 LE | body (whole frames) | tag: HMAC-SHA256(key, counter u64 LE || body_len || body)[..16]
//! ```
//!
//! The counter is implicit (0, 1, 2, … per direction), so a record dropped, replayed, reordered,
//! altered or inserted fails the next tag check, and the connection is dropped.
//!
//! Key rotation: a node proves with its first secret and accepts a proof made with any of its
//! secrets; each direction's key derives from the secret its sender proved with.

use bytes::{Buf, BytesMut};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::wire::{FRAME_HEADER_LEN, FRAME_MAGIC, MAX_BODY_LEN};

type HmacSha256 = Hmac<Sha256>;

/// First four bytes of every authentication message.
pub const AUTH_MAGIC: [u8; 4] = *b"MRAU";
/// Version of the authentication messages and of the record layer.
pub const AUTH_VERSION: u8 = 1;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a handshake proof (a full HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Fewest bytes a secret may have.
pub const MIN_SECRET_LEN: usize = 32;
/// Most bytes a secret may have (a longer file is not a secret but a mistake).
pub const MAX_SECRET_LEN: usize = 4096;
/// Bytes before the body: magic, version, kind, body length (u16 LE).
const HEADER_LEN: usize = 8;
/// Bytes after the body: crc32c of header and body.
const TRAILER_LEN: usize = 4;
/// Body of a Challenge: side, 7 reserved bytes, node id, bound peer, nonce.
const CHALLENGE_BODY_LEN: usize = 8 + 8 + 8 + NONCE_LEN;
/// Body of a Failure: the code and 3 reserved bytes.
const FAILURE_BODY_LEN: usize = 4;
/// The longest authentication message; a header announcing more is refused before any wait.
pub const MAX_AUTH_MESSAGE_LEN: usize = HEADER_LEN + CHALLENGE_BODY_LEN + TRAILER_LEN;
/// Bytes of a whole Challenge message (the transcript is two of them).
pub const CHALLENGE_LEN: usize = MAX_AUTH_MESSAGE_LEN;

/// Bytes of a record's length prefix.
pub const RECORD_HEADER_LEN: usize = 4;
/// Bytes of a record's tag (HMAC-SHA256 truncated to 128 bits, as in RFC 4868).
pub const RECORD_TAG_LEN: usize = 16;
/// A sender closes its current record once the body reaches this size (records hold whole
/// frames, so one may be longer: up to [`MAX_RECORD_BODY`]).
pub const RECORD_TARGET_BODY: usize = 64 << 10;
/// The longest record body a receiver accepts: a record just under the target plus one frame
/// of the largest size.
pub const MAX_RECORD_BODY: usize = RECORD_TARGET_BODY + FRAME_HEADER_LEN + MAX_BODY_LEN;

const PROOF_LABEL_INITIATOR: &[u8] = b"libmirror-auth-v1 initiator proof";
const PROOF_LABEL_RESPONDER: &[u8] = b"libmirror-auth-v1 responder proof";
const KEY_LABEL_INITIATOR: &[u8] = b"libmirror-auth-v1 records from initiator";
const KEY_LABEL_RESPONDER: &[u8] = b"libmirror-auth-v1 records from responder";

/// Which end of the connection a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Dialed the connection (a primary connecting to its peer).
    Initiator,
    /// Accepted it (a node with `listen`).
    Responder,
}

impl Side {
    fn code(self) -> u8 {
        match self {
            Side::Initiator => 1,
            Side::Responder => 2,
        }
    }

    fn proof_label(self) -> &'static [u8] {
        match self {
            Side::Initiator => PROOF_LABEL_INITIATOR,
            Side::Responder => PROOF_LABEL_RESPONDER,
        }
    }

    fn key_label(self) -> &'static [u8] {
        match self {
            Side::Initiator => KEY_LABEL_INITIATOR,
            Side::Responder => KEY_LABEL_RESPONDER,
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Initiator => Side::Responder,
            Side::Responder => Side::Initiator,
        }
    }
}

/// Why a node ends a handshake, sent to the peer in a Failure message (unauthenticated: it only
/// makes the peer's log say why; an attacker who forges one achieves a disconnection, which it
/// could cause anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCode {
    /// The peer's proof did not verify with any of this node's secrets.
    BadProof,
    /// The peer's message was malformed or out of order.
    Malformed,
    /// The peer claimed this node's own identity or nonce (a reflection).
    Reflected,
    /// A code this version does not know.
    Other(u8),
}

impl FailureCode {
    fn code(self) -> u8 {
        match self {
            FailureCode::BadProof => 1,
            FailureCode::Malformed => 2,
            FailureCode::Reflected => 3,
            FailureCode::Other(c) => c,
        }
    }

    fn from_code(c: u8) -> Self {
        match c {
            1 => FailureCode::BadProof,
            2 => FailureCode::Malformed,
            3 => FailureCode::Reflected,
            c => FailureCode::Other(c),
        }
    }
}

impl std::fmt::Display for FailureCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureCode::BadProof => f.write_str("our proof did not verify (the secrets differ)"),
            FailureCode::Malformed => f.write_str("our authentication message was malformed"),
            FailureCode::Reflected => f.write_str("it saw its own identity or nonce reflected"),
            FailureCode::Other(c) => write!(f, "code {c}"),
        }
    }
}

/// What went wrong in authentication or in the record layer. Every one ends the connection.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// The peer sent a protocol frame where an authentication message was due.
    #[error("peer does not authenticate: it sent a protocol frame, not an authentication message (set the same secret_file on both nodes)")]
    PeerUnauthenticated,
    /// Not an authentication message at all.
    #[error("peer sent bytes that are not an authentication message (magic {found:02x?})")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// Another version of the authentication messages.
    #[error("peer speaks authentication version {found}, this node speaks {AUTH_VERSION}")]
    UnsupportedVersion {
        /// The peer's version.
        found: u8,
    },
    /// A kind this version does not know.
    #[error("peer sent unknown authentication message kind {kind}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// A length that does not fit the kind, or more than any message may hold.
    #[error("peer sent an authentication message of kind {kind} with a {len}-byte body (oversized or malformed)")]
    BadLength {
        /// The kind byte.
        kind: u8,
        /// The announced body length.
        len: usize,
    },
    /// The checksum does not match.
    #[error("authentication message checksum mismatch: garbled in transit")]
    Checksum,
    /// A field holds a value it may not.
    #[error("malformed authentication message: {0}")]
    Malformed(&'static str),
    /// A message arrived out of order.
    #[error("peer sent a {got} where a {expected} was due")]
    OutOfOrder {
        /// What the handshake waited for.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The peer claimed this node's node id or nonce.
    #[error("peer reflected this node's own challenge (same {0}): refused")]
    Reflected(&'static str),
    /// The peer's proof did not verify.
    #[error("peer's proof does not verify: it does not hold this node's secret (or replayed an old handshake)")]
    BadProof,
    /// The peer ended the handshake.
    #[error("peer refused the authentication: {0}")]
    PeerRefused(FailureCode),
    /// A secret too short or too long.
    #[error("a secret must hold {MIN_SECRET_LEN} to {MAX_SECRET_LEN} bytes, this one holds {len}")]
    BadSecret {
        /// Its length.
        len: usize,
    },
    /// A record announces more than any record may hold.
    #[error("peer sent a record of {len} bytes, more than the maximum {MAX_RECORD_BODY}")]
    RecordTooLong {
        /// The announced body length.
        len: usize,
    },
    /// A record's tag does not verify: bytes were altered, inserted, dropped or replayed.
    #[error("record {counter} failed authentication: bytes were forged, altered, dropped or replayed on the wire")]
    RecordForged {
        /// The record's position in the stream.
        counter: u64,
    },
    /// A record ends inside a frame (senders close records only between frames).
    #[error("record {counter} ends inside a frame")]
    RecordSplitsFrame {
        /// The record's position in the stream.
        counter: u64,
    },
}

/// A challenge: who the speaker is, what it is bound to, and its fresh nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// Which end the speaker is.
    pub side: Side,
    /// The speaker's node id.
    pub node_id: u64,
    /// The node the speaker is bound to (0: not bound yet).
    pub bound_peer: u64,
    /// Fresh random bytes.
    pub nonce: [u8; NONCE_LEN],
}

/// One authentication message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMessage {
    /// Kind 1.
    Challenge(Challenge),
    /// Kind 2: HMAC-SHA256 over the transcript.
    Proof([u8; PROOF_LEN]),
    /// Kind 3: the sender gives up, and why.
    Failure(FailureCode),
}

impl AuthMessage {
    fn name(&self) -> &'static str {
        match self {
            AuthMessage::Challenge(_) => "Challenge",
            AuthMessage::Proof(_) => "Proof",
            AuthMessage::Failure(_) => "Failure",
        }
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let (kind, body_len) = match self {
            AuthMessage::Challenge(_) => (1u8, CHALLENGE_BODY_LEN),
            AuthMessage::Proof(_) => (2, PROOF_LEN),
            AuthMessage::Failure(_) => (3, FAILURE_BODY_LEN),
        };
        out.extend_from_slice(&AUTH_MAGIC);
        out.push(AUTH_VERSION);
        out.push(kind);
        out.extend_from_slice(&(body_len as u16).to_le_bytes());
        match self {
            AuthMessage::Challenge(c) => {
                out.push(c.side.code());
                out.extend_from_slice(&[0; 7]);
                out.extend_from_slice(&c.node_id.to_le_bytes());
                out.extend_from_slice(&c.bound_peer.to_le_bytes());
                out.extend_from_slice(&c.nonce);
            }
            AuthMessage::Proof(p) => out.extend_from_slice(p),
            AuthMessage::Failure(code) => out.extend_from_slice(&[code.code(), 0, 0, 0]),
        }
        let crc = crate::crc::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one message from the front of `buf`: `Ok(None)` while it is incomplete, else the
    /// message and the bytes it took. Every length is checked before it is trusted, so a
    /// truncated message waits (bounded by the caller's deadline) and an oversized one is
    /// refused at once.
    pub fn decode(buf: &[u8]) -> Result<Option<(AuthMessage, usize)>, AuthError> {
        if buf.len() < 4 {
            // Refuse a wrong start as soon as it shows, not only after four bytes.
            if !AUTH_MAGIC.starts_with(buf) {
                return Err(bad_magic(buf));
            }
            return Ok(None);
        }
        if buf[..4] != AUTH_MAGIC {
            return Err(bad_magic(buf));
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if buf[4] != AUTH_VERSION {
            return Err(AuthError::UnsupportedVersion { found: buf[4] });
        }
        let kind = buf[5];
        let len = u16::from_le_bytes([buf[6], buf[7]]) as usize;
        let expected = match kind {
            1 => CHALLENGE_BODY_LEN,
            2 => PROOF_LEN,
            3 => FAILURE_BODY_LEN,
            kind => return Err(AuthError::UnknownKind { kind }),
        };
        if len != expected {
            return Err(AuthError::BadLength { kind, len });
        }
        let total = HEADER_LEN + len + TRAILER_LEN;
        if buf.len() < total {
            return Ok(None);
        }
        let crc = u32::from_le_bytes(buf[total - 4..total].try_into().expect("4 bytes"));
        if crate::crc::crc32c(&buf[..total - 4]) != crc {
            return Err(AuthError::Checksum);
        }
        let body = &buf[HEADER_LEN..HEADER_LEN + len];
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        let msg = match kind {
            1 => {
                let side = match body[0] {
                    1 => Side::Initiator,
                    2 => Side::Responder,
                    _ => return Err(AuthError::Malformed("side is neither 1 nor 2")),
                };
                if body[1..8].iter().any(|&b| b != 0) {
                    return Err(AuthError::Malformed("reserved bytes are not zero"));
                }
                let node_id = u64_at(8);
                if node_id == 0 {
                    return Err(AuthError::Malformed("node id 0"));
                }
                let mut nonce = [0; NONCE_LEN];
                nonce.copy_from_slice(&body[24..24 + NONCE_LEN]);
                AuthMessage::Challenge(Challenge {
                    side,
                    node_id,
                    bound_peer: u64_at(16),
                    nonce,
                })
            }
            2 => {
                let mut p = [0; PROOF_LEN];
                p.copy_from_slice(body);
                AuthMessage::Proof(p)
            }
            _ => {
                if body[1..].iter().any(|&b| b != 0) {
                    return Err(AuthError::Malformed("reserved bytes are not zero"));
                }
                AuthMessage::Failure(FailureCode::from_code(body[0]))
            }
        };
        Ok(Some((msg, total)))
    }
}

fn bad_magic(buf: &[u8]) -> AuthError {
    let mut found = [0; 4];
    let n = buf.len().min(4);
    found[..n].copy_from_slice(&buf[..n]);
    if found == FRAME_MAGIC.to_le_bytes() {
        AuthError::PeerUnauthenticated
    } else {
        AuthError::BadMagic { found }
    }
}

/// A pre-shared secret (32 to 4096 bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Checks the length.
    pub fn new(bytes: Vec<u8>) -> Result<Self, AuthError> {
        if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&bytes.len()) {
            return Err(AuthError::BadSecret { len: bytes.len() });
        }
        Ok(Secret(bytes))
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// What a node brings to a handshake.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The secrets it accepts; it proves with the first (rotation: the new one first, the old
    /// one second, until both nodes have the new one).
    pub secrets: Vec<Secret>,
    /// Its node id.
    pub node_id: u64,
    /// The node it is bound to (0: not yet).
    pub bound_peer: u64,
}

/// An authenticated connection's result: who the peer proved to be, and the record keys.
#[derive(Debug)]
pub struct Session {
    /// The peer's node id, proven.
    pub peer_node_id: u64,
    /// The node the peer says it is bound to (covered by its proof).
    pub peer_bound: u64,
    /// Seals what this node sends.
    pub sealer: RecordSealer,
    /// Opens what the peer sends.
    pub opener: RecordOpener,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    AwaitChallenge,
    AwaitProof,
    Done,
    Failed,
}

/// One side of the handshake. Feed it the peer's bytes with [`Handshake::receive`]; send what
/// [`Handshake::take_output`] returns; after [`Handshake::is_done`], take the [`Session`].
pub struct Handshake {
    side: Side,
    creds: Credentials,
    own: Challenge,
    transcript: Vec<u8>,
    peer: Option<Challenge>,
    out: Vec<u8>,
    stage: Stage,
    session: Option<Session>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("side", &self.side)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts a handshake with a fresh random `nonce` (never reused). The initiator's Challenge
    /// is queued at once; the responder speaks when the initiator's arrives.
    pub fn new(side: Side, creds: Credentials, nonce: [u8; NONCE_LEN]) -> Result<Self, AuthError> {
        if creds.secrets.is_empty() {
            return Err(AuthError::BadSecret { len: 0 });
        }
        let own = Challenge {
            side,
            node_id: creds.node_id,
            bound_peer: creds.bound_peer,
            nonce,
        };
        let mut h = Handshake {
            side,
            creds,
            own,
            transcript: Vec::with_capacity(2 * CHALLENGE_LEN),
            peer: None,
            out: Vec::new(),
            stage: Stage::AwaitChallenge,
            session: None,
        };
        if side == Side::Initiator {
            AuthMessage::Challenge(own).encode(&mut h.transcript);
            h.out.extend_from_slice(&h.transcript);
        }
        Ok(h)
    }

    /// Bytes to send to the peer (taken: the next call returns only newer ones).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Whether the peer is authenticated (take the session with [`Handshake::into_session`]).
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// The session once done.
    pub fn into_session(self) -> Option<Session> {
        self.session
    }

    /// Consumes authentication messages from the front of `input`; returns how many bytes it
    /// took. Bytes after the last handshake message (the peer's first records) are left for
    /// the caller. An error ends the handshake; a Failure message for the peer is then queued
    /// in the output (best effort).
    pub fn receive(&mut self, input: &[u8]) -> Result<usize, AuthError> {
        let mut used = 0;
        while matches!(self.stage, Stage::AwaitChallenge | Stage::AwaitProof) {
            let (msg, n) = match AuthMessage::decode(&input[used..]) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return Err(self.fail(e, FailureCode::Malformed)),
            };
            let raw = &input[used..used + n];
            used += n;
            self.step(msg, raw)?;
        }
        Ok(used)
    }

    fn step(&mut self, msg: AuthMessage, raw: &[u8]) -> Result<(), AuthError> {
        let expected = match self.stage {
            Stage::AwaitChallenge => "Challenge",
            _ => "Proof",
        };
        match (self.stage, msg) {
            (_, AuthMessage::Failure(code)) => {
                self.stage = Stage::Failed;
                Err(AuthError::PeerRefused(code))
            }
            (Stage::AwaitChallenge, AuthMessage::Challenge(c)) => {
                if c.side != self.side.other() {
                    return Err(self.fail(AuthError::Reflected("side"), FailureCode::Reflected));
                }
                if c.nonce == self.own.nonce {
                    return Err(self.fail(AuthError::Reflected("nonce"), FailureCode::Reflected));
                }
                if c.node_id == self.own.node_id {
                    return Err(self.fail(AuthError::Reflected("node id"), FailureCode::Reflected));
                }
                self.peer = Some(c);
                if self.side == Side::Responder {
                    // Transcript order is fixed: the initiator's challenge first.
                    self.transcript.extend_from_slice(raw);
                    AuthMessage::Challenge(self.own).encode(&mut self.transcript);
                    self.out
                        .extend_from_slice(&self.transcript[CHALLENGE_LEN..]);
                    let proof = self.proof(self.side, &self.creds.secrets[0]);
                    AuthMessage::Proof(proof).encode(&mut self.out);
                } else {
                    self.transcript.extend_from_slice(raw);
                }
                self.stage = Stage::AwaitProof;
                Ok(())
            }
            (Stage::AwaitProof, AuthMessage::Proof(p)) => {
                let peer_side = self.side.other();
                let Some(peer_secret) = self
                    .creds
                    .secrets
                    .iter()
                    .position(|s| self.verify(peer_side, s, &p))
                else {
                    return Err(self.fail(AuthError::BadProof, FailureCode::BadProof));
                };
                if self.side == Side::Initiator {
                    let proof = self.proof(self.side, &self.creds.secrets[0]);
                    AuthMessage::Proof(proof).encode(&mut self.out);
                }
                let peer = self
                    .peer
                    .expect("a proof is awaited only after the challenge");
                let peer_secret = &self.creds.secrets[peer_secret];
                self.session = Some(Session {
                    peer_node_id: peer.node_id,
                    peer_bound: peer.bound_peer,
                    sealer: RecordSealer::new(self.record_key(self.side, &self.creds.secrets[0])),
                    opener: RecordOpener::new(self.record_key(peer_side, peer_secret)),
                });
                self.stage = Stage::Done;
                Ok(())
            }
            (_, other) => Err(self.fail(
                AuthError::OutOfOrder {
                    expected,
                    got: other.name(),
                },
                FailureCode::Malformed,
            )),
        }
    }

    fn fail(&mut self, e: AuthError, code: FailureCode) -> AuthError {
        self.stage = Stage::Failed;
        AuthMessage::Failure(code).encode(&mut self.out);
        e
    }

    fn proof_mac(&self, side: Side, secret: &Secret) -> HmacSha256 {
        let mut mac = secret.mac();
        mac.update(side.proof_label());
        mac.update(&self.transcript);
        mac
    }

    fn proof(&self, side: Side, secret: &Secret) -> [u8; PROOF_LEN] {
        self.proof_mac(side, secret).finalize().into_bytes().into()
    }

    /// Constant time (the comparison inside `verify_slice`).
    fn verify(&self, side: Side, secret: &Secret, proof: &[u8; PROOF_LEN]) -> bool {
        self.proof_mac(side, secret).verify_slice(proof).is_ok()
    }

    fn record_key(&self, sender: Side, secret: &Secret) -> [u8; 32] {
        let hk = Hkdf::<Sha256>::new(Some(&self.transcript), &secret.0);
        let mut key = [0; 32];
        hk.expand(sender.key_label(), &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        key
    }
}

/// Seals outgoing records (see the module docs for the layout).
pub struct RecordSealer {
    mac: HmacSha256,
    counter: u64,
}

impl std::fmt::Debug for RecordSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordSealer {{ counter: {} }}", self.counter)
    }
}

impl RecordSealer {
    fn new(key: [u8; 32]) -> Self {
        RecordSealer {
            mac: HmacSha256::new_from_slice(&key).expect("HMAC takes keys of any length"),
            counter: 0,
        }
    }

    /// Finishes the record at the end of `buf` that starts at `start`: `buf[start..start + 4]`
    /// was reserved for the length, the body follows; writes the length and appends the tag.
    pub fn seal(&mut self, buf: &mut BytesMut, start: usize) {
        let body_len = buf.len() - start - RECORD_HEADER_LEN;
        buf[start..start + RECORD_HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
        let tag = self.tag(&buf[start..]);
        buf.extend_from_slice(&tag);
    }

    fn tag(&mut self, header_and_body: &[u8]) -> [u8; RECORD_TAG_LEN] {
        let tag = record_tag(&self.mac, self.counter, header_and_body);
        self.counter += 1;
        tag
    }
}

fn record_tag(keyed: &HmacSha256, counter: u64, header_and_body: &[u8]) -> [u8; RECORD_TAG_LEN] {
    let mut mac = keyed.clone();
    mac.update(&counter.to_le_bytes());
    mac.update(header_and_body);
    let full = mac.finalize().into_bytes();
    let mut tag = [0; RECORD_TAG_LEN];
    tag.copy_from_slice(&full[..RECORD_TAG_LEN]);
    tag
}

/// Opens incoming records and checks each one's tag before any of its bytes are decoded.
pub struct RecordOpener {
    mac: HmacSha256,
    counter: u64,
}

impl std::fmt::Debug for RecordOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordOpener {{ counter: {} }}", self.counter)
    }
}

impl RecordOpener {
    fn new(key: [u8; 32]) -> Self {
        RecordOpener {
            mac: HmacSha256::new_from_slice(&key).expect("HMAC takes keys of any length"),
            counter: 0,
        }
    }

    /// Takes the next whole record off the front of `raw` and returns its verified body;
    /// `Ok(None)` while it is incomplete (after reserving room for the rest).
    pub fn open(&mut self, raw: &mut BytesMut) -> Result<Option<BytesMut>, AuthError> {
        if raw.len() < RECORD_HEADER_LEN {
            return Ok(None);
        }
        let body_len = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes")) as usize;
        if body_len > MAX_RECORD_BODY {
            return Err(AuthError::RecordTooLong { len: body_len });
        }
        let total = RECORD_HEADER_LEN + body_len + RECORD_TAG_LEN;
        if raw.len() < total {
            raw.reserve(total - raw.len());
            return Ok(None);
        }
        let tagged_end = RECORD_HEADER_LEN + body_len;
        let mut mac = self.mac.clone();
        mac.update(&self.counter.to_le_bytes());
        mac.update(&raw[..tagged_end]);
        if mac.verify_truncated_left(&raw[tagged_end..total]).is_err() {
            return Err(AuthError::RecordForged {
                counter: self.counter,
            });
        }
        self.counter += 1;
        let mut record = raw.split_to(total);
        record.advance(RECORD_HEADER_LEN);
        record.truncate(body_len);
        Ok(Some(record))
    }

    /// The position of the next record (for errors about the current one, one less).
    pub fn counter(&self) -> u64 {
        self.counter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(node_id: u64, secrets: &[&[u8]]) -> Credentials {
        Credentials {
            secrets: secrets
                .iter()
                .map(|s| Secret::new(s.to_vec()).unwrap())
                .collect(),
            node_id,
            bound_peer: 0,
        }
    }

    const K1: &[u8] = b"0123456789abcdef0123456789abcdef";
    const K2: &[u8] = b"fedcba9876543210fedcba9876543210";

    /// Runs both sides to the end, exchanging bytes; returns both results.
    fn run(
        mut i: Handshake,
        mut r: Handshake,
    ) -> (Result<Session, AuthError>, Result<Session, AuthError>) {
        let mut i_err = None;
        let mut r_err = None;
        for _ in 0..4 {
            let to_r = i.take_output();
            if r_err.is_none() && !to_r.is_empty() {
                if let Err(e) = r.receive(&to_r) {
                    r_err = Some(e);
                }
            }
            let to_i = r.take_output();
            if i_err.is_none() && !to_i.is_empty() {
                if let Err(e) = i.receive(&to_i) {
                    i_err = Some(e);
                }
            }
        }
        let i_res = match i_err {
            Some(e) => Err(e),
            None => i
                .into_session()
                .ok_or(AuthError::Malformed("initiator did not finish")),
        };
        let r_res = match r_err {
            Some(e) => Err(e),
            None => r
                .into_session()
                .ok_or(AuthError::Malformed("responder did not finish")),
        };
        (i_res, r_res)
    }

    fn pair(ik: &[&[u8]], rk: &[&[u8]]) -> (Handshake, Handshake) {
        (
            Handshake::new(Side::Initiator, creds(1, ik), [1; NONCE_LEN]).unwrap(),
            Handshake::new(Side::Responder, creds(2, rk), [2; NONCE_LEN]).unwrap(),
        )
    }

    #[test]
    fn same_secret_authenticates_both_sides_and_records_flow_both_ways() {
        let (i, r) = pair(&[K1], &[K1]);
        let (i, r) = run(i, r);
        let (mut i, mut r) = (i.unwrap(), r.unwrap());
        assert_eq!(i.peer_node_id, 2);
        assert_eq!(r.peer_node_id, 1);
        fn exchange(from: &mut Session, to: &mut Session) {
            let mut buf = BytesMut::new();
            for n in 0..3u8 {
                let start = buf.len();
                buf.extend_from_slice(&[0; 4]);
                buf.extend_from_slice(&[n; 10]);
                from.sealer.seal(&mut buf, start);
            }
            for n in 0..3u8 {
                let body = to.opener.open(&mut buf).unwrap().unwrap();
                assert_eq!(&body[..], &[n; 10]);
            }
            assert!(to.opener.open(&mut buf).unwrap().is_none());
        }
        exchange(&mut i, &mut r);
        exchange(&mut r, &mut i);
    }

    #[test]
    fn a_wrong_secret_fails_on_both_sides() {
        let (i, r) = pair(&[K1], &[K2]);
        let (i, r) = run(i, r);
        assert_eq!(i.unwrap_err(), AuthError::BadProof);
        // The responder never saw a proof; it saw the initiator's Failure.
        assert_eq!(
            r.unwrap_err(),
            AuthError::PeerRefused(FailureCode::BadProof)
        );
    }

    #[test]
    fn rotation_accepts_either_secret_and_keys_follow_the_prover() {
        // The initiator already proves with the new secret; the responder still proves with
        // the old one but accepts the new.
        let (i, r) = pair(&[K2, K1], &[K1, K2]);
        let (i, r) = run(i, r);
        let (mut i, mut r) = (i.unwrap(), r.unwrap());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(b"hello");
        i.sealer.seal(&mut buf, 0);
        assert_eq!(&r.opener.open(&mut buf).unwrap().unwrap()[..], b"hello");
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(b"back");
        r.sealer.seal(&mut buf, 0);
        assert_eq!(&i.opener.open(&mut buf).unwrap().unwrap()[..], b"back");
    }

    #[test]
    fn a_replayed_initiator_transcript_fails_against_a_fresh_nonce() {
        // Record a successful handshake's initiator bytes.
        let (mut i, mut r) = pair(&[K1], &[K1]);
        let mut recorded = i.take_output();
        r.receive(&recorded).unwrap();
        i.receive(&r.take_output()).unwrap();
        let proof = i.take_output();
        r.receive(&proof).unwrap();
        recorded.extend(proof);
        assert!(r.is_done() && i.is_done());
        // Replay them to a responder with a fresh nonce.
        let mut fresh = Handshake::new(Side::Responder, creds(2, &[K1]), [9; NONCE_LEN]).unwrap();
        assert_eq!(fresh.receive(&recorded), Err(AuthError::BadProof));
    }

    #[test]
    fn a_reflected_challenge_is_refused() {
        let mut i = Handshake::new(Side::Initiator, creds(1, &[K1]), [1; NONCE_LEN]).unwrap();
        let mine = i.take_output();
        // The attacker sends our challenge straight back.
        assert_eq!(i.receive(&mine), Err(AuthError::Reflected("side")));
        // Or re-labels it as a responder's: same nonce and node id.
        let mut r = Handshake::new(Side::Initiator, creds(1, &[K1]), [1; NONCE_LEN]).unwrap();
        let AuthMessage::Challenge(mut c) =
            AuthMessage::decode(&r.take_output()).unwrap().unwrap().0
        else {
            unreachable!()
        };
        c.side = Side::Responder;
        let mut forged = Vec::new();
        AuthMessage::Challenge(c).encode(&mut forged);
        assert_eq!(r.receive(&forged), Err(AuthError::Reflected("nonce")));
    }

    #[test]
    fn a_responder_proof_is_no_initiator_proof() {
        // An attacker opens two connections to the same node: as initiator on one it gets the
        // node's responder proof for a transcript it chose, and offers it back as its own proof.
        let mut victim = Handshake::new(Side::Responder, creds(2, &[K1]), [2; NONCE_LEN]).unwrap();
        let attacker = Challenge {
            side: Side::Initiator,
            node_id: 7,
            bound_peer: 0,
            nonce: [7; NONCE_LEN],
        };
        let mut msg = Vec::new();
        AuthMessage::Challenge(attacker).encode(&mut msg);
        victim.receive(&msg).unwrap();
        let answer = victim.take_output();
        let (_, n) = AuthMessage::decode(&answer).unwrap().unwrap();
        let proof = answer[n..].to_vec();
        assert_eq!(victim.receive(&proof), Err(AuthError::BadProof));
    }

    #[test]
    fn decode_refuses_garbage_truncation_waits_and_oversize_is_immediate() {
        let mut msg = Vec::new();
        AuthMessage::Proof([5; PROOF_LEN]).encode(&mut msg);
        for cut in 0..msg.len() {
            assert_eq!(AuthMessage::decode(&msg[..cut]), Ok(None), "cut at {cut}");
        }
        let mut garbled = msg.clone();
        garbled[10] ^= 1;
        assert_eq!(AuthMessage::decode(&garbled), Err(AuthError::Checksum));
        let mut oversized = msg.clone();
        oversized[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            AuthMessage::decode(&oversized[..8]),
            Err(AuthError::BadLength { .. })
        ));
        assert_eq!(
            AuthMessage::decode(b"LMIR\x03"),
            Err(AuthError::PeerUnauthenticated)
        );
        assert!(matches!(
            AuthMessage::decode(b"GET / HTTP/1.1"),
            Err(AuthError::BadMagic { .. })
        ));
    }

    #[test]
    fn any_altered_dropped_or_replayed_record_is_forged() {
        let (i, r) = pair(&[K1], &[K1]);
        let (i, r) = run(i, r);
        let (mut i, r) = (i.unwrap(), r.unwrap());
        let mut stream = BytesMut::new();
        for n in 0..3u8 {
            let start = stream.len();
            stream.extend_from_slice(&[0; 4]);
            stream.extend_from_slice(&[n; 32]);
            i.sealer.seal(&mut stream, start);
        }
        let record_len = 4 + 32 + RECORD_TAG_LEN;
        // Every single-bit flip anywhere in the first record is caught.
        for bit in 0..record_len * 8 {
            let mut opener = RecordOpener {
                mac: r.opener.mac.clone(),
                counter: 0,
            };
            let mut s = stream.clone();
            s[bit / 8] ^= 1 << (bit % 8);
            assert!(!matches!(opener.open(&mut s), Ok(Some(_))), "bit {bit}");
        }
        // A dropped record: the second arrives where the first was due.
        let mut opener = RecordOpener {
            mac: r.opener.mac.clone(),
            counter: 0,
        };
        let mut s = BytesMut::from(&stream[record_len..]);
        assert_eq!(
            opener.open(&mut s),
            Err(AuthError::RecordForged { counter: 0 })
        );
        // A replayed record.
        let mut opener = RecordOpener {
            mac: r.opener.mac.clone(),
            counter: 0,
        };
        let mut s = BytesMut::from(&stream[..record_len]);
        s.extend_from_slice(&stream[..record_len]);
        assert!(opener.open(&mut s).unwrap().is_some());
        assert_eq!(
            opener.open(&mut s),
            Err(AuthError::RecordForged { counter: 1 })
        );
        // An announced length beyond the maximum is refused before waiting for it.
        let mut opener = RecordOpener {
            mac: r.opener.mac.clone(),
            counter: 0,
        };
        let mut s = BytesMut::from(&(u32::MAX).to_le_bytes()[..]);
        assert!(matches!(
            opener.open(&mut s),
            Err(AuthError::RecordTooLong { .. })
        ));
    }
}
