//! Node configuration: one set of keys shared by the TOML file, the `mirror` command's flags and
//! the C API's `mirror_config_set`. Every key is parsed in one place ([`ConfigBuilder::set`]), and
//! every bad value is an error that names the key.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use mirror_proto::{FencedPolicy, PeerLossPolicy, SplitBrainPolicy};
use mirror_storage::Durability;

use crate::error::{ConfigError, MirrorError};

/// Which side of the mirror a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes application writes and mirrors them to the backup.
    Primary,
    /// Keeps the second copy; serves one primary.
    Backup,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        })
    }
}

/// How requests travel between the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP (the embedded default; loopback in the demo).
    Tcp,
    /// RDMA verbs (reliable connected queue pairs).
    Rdma,
}

/// How a node authenticates its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Mutual challenge-response over a pre-shared secret, then authenticated records.
    Secret {
        /// The secret this node proves with (and accepts).
        secret_file: PathBuf,
        /// A second secret it also accepts, during a rotation.
        accept_secret_file: Option<PathBuf>,
    },
    /// No authentication, and every address is loopback (only local users can connect).
    Loopback,
    /// No authentication although an address is not loopback: `auth = none`, set explicitly.
    Disabled,
    /// No secret: TLS certificates authenticate the peers (`tls = on`).
    TlsOnly,
}

/// How a TLS node verifies its peer's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsVerify {
    /// Signed by a CA in this PEM file (the dialing node also checks the name).
    Ca(PathBuf),
    /// Exactly the certificate with this SHA-256 fingerprint.
    Fingerprint([u8; 32]),
}

/// TLS for the TCP transport (`tls = on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// This node's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 600).
    pub key: PathBuf,
    /// How the peer's certificate is checked.
    pub verify: TlsVerify,
    /// The name the dialing node expects in the peer's certificate (with a CA).
    pub server_name: String,
}

/// How a node describes its peer authentication (the stats, `mirror status --live`).
pub fn describe_security(auth: &Auth, tls: Option<&TlsSettings>) -> &'static str {
    match (auth, tls) {
        (Auth::Secret { .. }, Some(_)) => "tls+secret",
        (_, Some(_)) => "tls",
        (Auth::Secret { .. }, None) => "secret",
        (Auth::Loopback | Auth::TlsOnly, None) => "none (loopback only)",
        (Auth::Disabled, None) => "none (auth = none: peers are not authenticated)",
    }
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Primary or backup.
    pub role: Role,
    /// Path of the region file (exactly `region_size` bytes).
    pub region: PathBuf,
    /// Size of the mirrored region in bytes.
    pub region_size: u64,
    /// Path of the persistent queue file.
    pub queue: PathBuf,
    /// Capacity of the queue's record area in bytes.
    pub queue_size: u64,
    /// Address this node listens on: required of a backup; a primary that has it can be
    /// demoted live, and meets (and fences, or is fenced by) a primary of another term there.
    pub listen: Option<SocketAddr>,
    /// Address of the other node, which a primary connects to: required of a primary; a
    /// backup that has it can be promoted live.
    pub peer: Option<String>,
    /// Transport.
    pub transport: TransportKind,
    /// RDMA: device name as `ibv_devices` lists it (none: the first device).
    pub rdma_device: Option<String>,
    /// RDMA: port number of the device (from 1).
    pub rdma_port: u8,
    /// RDMA: GID table index (none: the port's first IPv4-mapped GID, else its first one).
    pub rdma_gid_index: Option<u8>,
    /// What a completed write survives.
    pub durability: Durability,
    /// Primary: behaviour while the backup is unreachable.
    pub on_peer_loss: PeerLossPolicy,
    /// Primary: what to do once a newer primary is seen (fenced).
    pub on_fenced: FencedPolicy,
    /// What to do when a handshake finds a split brain.
    pub after_split_brain: SplitBrainPolicy,
    /// Run the local control endpoint (a Unix socket beside the queue, `<queue>.ctl`).
    pub control_socket: bool,
    /// How peers authenticate (`secret_file`, `accept_secret_file`, `auth`).
    pub auth: Auth,
    /// TLS on the TCP transport (`tls = on` and the `tls_*` keys).
    pub tls: Option<TlsSettings>,
    /// The form of the log lines where this library installs the log (the CLI, the C API).
    pub log_format: crate::logging::LogFormat,
    /// Their level (`MIRROR_LOG` overrides it); none: the program's default.
    pub log_level: Option<String>,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// CPU to pin the polling thread to (none: not pinned).
    pub cpu: Option<usize>,
    /// How long the poller busy-polls after its last work before it sleeps in the kernel.
    pub idle_spin: Duration,
    /// How long a caller waiting for a completion spins before it sleeps.
    pub wait_spin: Duration,
    /// Primary: an outstanding write not acknowledged within this time, or a backup silent this
    /// long, means the backup is lost. Backup: a primary silent this long is dropped. Announced
    /// to the peer, which heartbeats at a quarter of it.
    pub ack_timeout: Duration,
    /// A handshake that makes no progress for this long is abandoned.
    pub handshake_timeout: Duration,
    /// Primary: delay between connection attempts.
    pub reconnect_interval: Duration,
    /// `write` gives up after this long (none: waits for as long as it takes).
    pub write_timeout: Option<Duration>,
    /// Slots of the ring that hands writes from application threads to the poller.
    pub submit_ring: usize,
    /// Largest payload of one write.
    pub max_write: usize,
    /// Run to completion: a caller waiting for its write runs the poller's loop itself.
    pub caller_drives: bool,
    /// Chunk size of the dirty-chunk bitmap, resyncs and online verifies (a power of two).
    pub chunk_size: u64,
    /// Bytes of region per second a resync or verify may process (0: no limit).
    pub resync_rate: u64,
    /// Consent to an initial sync (see the key).
    pub initial_sync: bool,
    /// Testing aid: the node kills its own process (SIGKILL) just before applying this sequence
    /// number, i.e. after the backup acknowledged it and before the primary applied it. Set only
    /// in builds with the cargo feature `fail-points`.
    pub crash_before_apply_seq: Option<u64>,
}

/// `max_write` when unset (and the queue holds four such records).
pub const DEFAULT_MAX_WRITE: u64 = 1 << 20;

/// Keys accepted by [`ConfigBuilder::set`], with their meaning (for `--help` and docs).
pub const KEYS: &[(&str, &str)] = &[
    ("role", "primary | backup"),
    ("region", "path of the region file"),
    ("region_size", "region size: bytes, or with KiB/MiB/GiB"),
    ("queue", "path of the persistent queue file"),
    ("queue_size", "queue capacity (default 64MiB)"),
    (
        "listen",
        "address to listen on, e.g. 127.0.0.1:7400 (a backup needs it; set on both nodes for failover)",
    ),
    (
        "peer",
        "address of the other node's listen (a primary needs it; set on both nodes for failover)",
    ),
    ("transport", "tcp (default) | rdma"),
    (
        "rdma_device",
        "rdma: device name as ibv_devices lists it (default: the first device)",
    ),
    ("rdma_port", "rdma: device port, from 1 (default 1)"),
    (
        "rdma_gid_index",
        "rdma: GID index, or 'auto' = first IPv4-mapped GID (default auto)",
    ),
    ("durability", "process (default) | power | pmem"),
    ("on_peer_loss", "continue (default) | block"),
    (
        "on_fenced",
        "a primary that learns of a newer primary: demote (default, it rejoins as a backup) | stop",
    ),
    (
        "control_socket",
        "on (default): serve `mirror promote/demote/resolve/status --live` on <queue>.ctl | off",
    ),
    (
        "after_split_brain",
        "disconnect (default) | discard-younger-primary | discard-least-changes | discard-node:<node id>",
    ),
    (
        "secret_file",
        "file with the pair's shared secret (32 to 4096 bytes, mode 600); peers authenticate with it",
    ),
    (
        "accept_secret_file",
        "during a secret rotation: a second secret this node also accepts",
    ),
    (
        "auth",
        "secret (default when secret_file is set) | none (required to run without a secret or TLS on a non-loopback address)",
    ),
    ("tls", "TCP only: off (default) | on (rustls, both nodes present certificates)"),
    ("tls_cert", "tls: this node's certificate chain (PEM)"),
    ("tls_key", "tls: this node's private key (PEM, mode 600)"),
    ("tls_ca", "tls: accept a peer certificate signed by this CA (PEM)"),
    (
        "tls_peer_fingerprint",
        "tls: accept exactly the peer certificate with this SHA-256 fingerprint (hex; `mirror fingerprint CERT` prints it)",
    ),
    (
        "tls_server_name",
        "tls with tls_ca: the name the peer's certificate must carry (default: the host of 'peer')",
    ),
    (
        "metrics_listen",
        "serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 (default: none)",
    ),
    (
        "log_format",
        "text (default) | json: the form of log lines (the mirror command and the C API)",
    ),
    (
        "log_level",
        "error | warn | info (default) | debug | trace (MIRROR_LOG overrides it)",
    ),
    ("cpu", "CPU to pin the poller to, or 'none' (default)"),
    (
        "idle_spin_us",
        "poller busy-poll time before it sleeps (default 200)",
    ),
    (
        "wait_spin_us",
        "caller spin time before it sleeps (default 50)",
    ),
    (
        "ack_timeout_ms",
        "backup lost after this long without an ack (default 1000)",
    ),
    ("handshake_timeout_ms", "handshake timeout (default 5000)"),
    (
        "reconnect_interval_ms",
        "primary: delay between connection attempts (default 100)",
    ),
    (
        "write_timeout_ms",
        "write() gives up after this long; 0 = never (default 0)",
    ),
    ("submit_ring", "submission ring slots (default 4096)"),
    (
        "max_write",
        "largest write in bytes (default 1MiB, at most queue_size/4)",
    ),
    (
        "caller_drives",
        "a waiting caller runs the poll loop itself: true (default) | false",
    ),
    (
        "chunk_size",
        "chunk of the dirty-chunk bitmap, resyncs and verifies: a power of two, 4KiB..1MiB (default 64KiB)",
    ),
    (
        "resync_rate",
        "bytes of region per second a resync or online verify may process, e.g. 200MiB; 0 = no limit (default 0)",
    ),
    (
        "initial_sync",
        "backup: consent to an initial sync when the primary's queue cannot catch it up (a new, replaced or stale node): false (default) | true",
    ),
    (
        "crash_before_apply_seq",
        "testing, builds with the feature fail-points only: SIGKILL self before applying this seq",
    ),
];

/// Collects keys one at a time, then validates the whole.
#[derive(Debug, Clone, Default)]
pub struct ConfigBuilder {
    role: Option<Role>,
    region: Option<PathBuf>,
    region_size: Option<u64>,
    queue: Option<PathBuf>,
    queue_size: Option<u64>,
    listen: Option<String>,
    peer: Option<String>,
    transport: Option<TransportKind>,
    rdma_device: Option<String>,
    rdma_port: Option<u8>,
    rdma_gid_index: Option<Option<u8>>,
    durability: Option<Durability>,
    on_peer_loss: Option<PeerLossPolicy>,
    on_fenced: Option<FencedPolicy>,
    after_split_brain: Option<SplitBrainPolicy>,
    control_socket: Option<bool>,
    secret_file: Option<PathBuf>,
    accept_secret_file: Option<PathBuf>,
    auth_none: Option<bool>,
    tls: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_peer_fingerprint: Option<[u8; 32]>,
    tls_server_name: Option<String>,
    log_format: Option<crate::logging::LogFormat>,
    log_level: Option<String>,
    metrics_listen: Option<String>,
    cpu: Option<Option<usize>>,
    idle_spin_us: Option<u64>,
    wait_spin_us: Option<u64>,
    ack_timeout_ms: Option<u64>,
    handshake_timeout_ms: Option<u64>,
    reconnect_interval_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    submit_ring: Option<usize>,
    max_write: Option<u64>,
    chunk_size: Option<u64>,
    resync_rate: Option<u64>,
    initial_sync: Option<bool>,
    caller_drives: Option<bool>,
    crash_before_apply_seq: Option<u64>,
}

fn bad(key: &str, value: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::BadValue {
        key: key.to_owned(),
        value: value.to_owned(),
        why: why.into(),
    }
}

/// A boolean key: true/false (also 1/0, yes/no).
fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(bad(key, value, "expected 'true' or 'false'")),
    }
}

/// Parses a byte size: a plain number, or a number with a `K`/`KiB`/`M`/`MiB`/`G`/`GiB` suffix
/// (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 4096, 64KiB, 16MiB, 1GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit '{other}' (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn parse_u64(key: &str, value: &str) -> Result<u64, ConfigError> {
    value
        .trim()
        .replace('_', "")
        .parse()
        .map_err(|_| bad(key, value, "expected a non-negative integer"))
}

impl ConfigBuilder {
    /// An empty builder (all defaults, no required key set).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets one key from its text form. Unknown keys and bad values are errors that name the key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let v = value.trim();
        let nonempty = |what: &str| -> Result<(), ConfigError> {
            if v.is_empty() {
                Err(bad(key, value, format!("{what} must not be empty")))
            } else {
                Ok(())
            }
        };
        match key {
            "role" => {
                self.role = Some(match v {
                    "primary" => Role::Primary,
                    "backup" => Role::Backup,
                    _ => return Err(bad(key, value, "expected 'primary' or 'backup'")),
                })
            }
            "region" => {
                nonempty("a path")?;
                self.region = Some(PathBuf::from(v));
            }
            "region_size" => {
                self.region_size = Some(parse_size(v).map_err(|e| bad(key, value, e))?)
            }
            "queue" => {
                nonempty("a path")?;
                self.queue = Some(PathBuf::from(v));
            }
            "queue_size" => self.queue_size = Some(parse_size(v).map_err(|e| bad(key, value, e))?),
            "listen" => {
                nonempty("an address")?;
                self.listen = Some(v.to_owned());
            }
            "peer" => {
                nonempty("an address")?;
                self.peer = Some(v.to_owned());
            }
            "transport" => {
                self.transport = Some(match v {
                    "tcp" => TransportKind::Tcp,
                    "rdma" => TransportKind::Rdma,
                    _ => return Err(bad(key, value, "expected 'tcp' or 'rdma'")),
                })
            }
            "rdma_device" => {
                nonempty("a device name")?;
                self.rdma_device = Some(v.to_owned());
            }
            "rdma_port" => {
                self.rdma_port = Some(match parse_u64(key, value)? {
                    p @ 1..=255 => p as u8,
                    _ => return Err(bad(key, value, "expected a port number from 1 to 255")),
                })
            }
            "rdma_gid_index" => {
                self.rdma_gid_index = Some(if v == "auto" {
                    None
                } else {
                    match parse_u64(key, value) {
                        Ok(i @ 0..=255) => Some(i as u8),
                        _ => {
                            return Err(bad(
                                key,
                                value,
                                "expected 'auto' or an index from 0 to 255",
                            ))
                        }
                    }
                })
            }
            "durability" => {
                self.durability = Some(
                    Durability::from_str(v)
                        .map_err(|_| bad(key, value, "expected 'process', 'power' or 'pmem'"))?,
                )
            }
            "on_peer_loss" => {
                self.on_peer_loss = Some(match v {
                    "continue" => PeerLossPolicy::Continue,
                    "block" => PeerLossPolicy::Block,
                    _ => return Err(bad(key, value, "expected 'continue' or 'block'")),
                })
            }
            "on_fenced" => {
                self.on_fenced = Some(match v {
                    "demote" => FencedPolicy::Demote,
                    "stop" => FencedPolicy::Stop,
                    _ => return Err(bad(key, value, "expected 'demote' or 'stop'")),
                })
            }
            "control_socket" => {
                self.control_socket = Some(match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad(key, value, "expected 'on' or 'off'")),
                })
            }
            "secret_file" => self.secret_file = Some(PathBuf::from(v)),
            "accept_secret_file" => self.accept_secret_file = Some(PathBuf::from(v)),
            "auth" => {
                self.auth_none = Some(match v {
                    "secret" => false,
                    "none" => true,
                    _ => return Err(bad(key, value, "expected secret or none")),
                })
            }
            "tls" => {
                self.tls = Some(match v {
                    "on" | "true" | "yes" | "1" => true,
                    "off" | "false" | "no" | "0" => false,
                    _ => return Err(bad(key, value, "expected on or off")),
                })
            }
            "tls_cert" => self.tls_cert = Some(PathBuf::from(v)),
            "tls_key" => self.tls_key = Some(PathBuf::from(v)),
            "tls_ca" => self.tls_ca = Some(PathBuf::from(v)),
            "tls_peer_fingerprint" => {
                self.tls_peer_fingerprint = Some(parse_fingerprint(v).map_err(|why| bad(key, value, why))?)
            }
            "tls_server_name" => self.tls_server_name = Some(v.to_owned()),
            "metrics_listen" => self.metrics_listen = Some(v.to_owned()),
            "log_format" => {
                self.log_format = Some(match v {
                    "text" => crate::logging::LogFormat::Text,
                    "json" => crate::logging::LogFormat::Json,
                    _ => return Err(bad(key, value, "expected text or json")),
                })
            }
            "log_level" => {
                if !crate::logging::LOG_LEVELS.contains(&v) {
                    return Err(bad(
                        key,
                        value,
                        format!("expected one of {}", crate::logging::LOG_LEVELS.join(", ")),
                    ));
                }
                self.log_level = Some(v.to_owned());
            }
            "after_split_brain" => {
                self.after_split_brain = Some(match v {
                    "disconnect" => SplitBrainPolicy::Disconnect,
                    "discard-younger-primary" => SplitBrainPolicy::DiscardYoungerPrimary,
                    "discard-least-changes" => SplitBrainPolicy::DiscardLeastChanges,
                    _ => match v
                        .strip_prefix("discard-node:")
                        .map(str::parse::<crate::control::DiscardNode>)
                    {
                        Some(Ok(crate::control::DiscardNode::Id(id))) => {
                            SplitBrainPolicy::DiscardNode(id)
                        }
                        Some(Ok(_)) => {
                            return Err(bad(
                                key,
                                value,
                                "name the node by its id (as `mirror status` prints it): both nodes read this setting",
                            ))
                        }
                        Some(Err(why)) => return Err(bad(key, value, why.to_string())),
                        None => return Err(bad(
                            key,
                            value,
                            "expected 'disconnect', 'discard-younger-primary', 'discard-least-changes' or 'discard-node:<node id>'",
                        )),
                    },
                })
            }
            "cpu" => {
                self.cpu = Some(if v == "none" || v.is_empty() {
                    None
                } else {
                    Some(parse_u64(key, value)? as usize)
                })
            }
            "idle_spin_us" => self.idle_spin_us = Some(parse_u64(key, value)?),
            "wait_spin_us" => self.wait_spin_us = Some(parse_u64(key, value)?),
            "ack_timeout_ms" => self.ack_timeout_ms = Some(parse_u64(key, value)?),
            "handshake_timeout_ms" => self.handshake_timeout_ms = Some(parse_u64(key, value)?),
            "reconnect_interval_ms" => self.reconnect_interval_ms = Some(parse_u64(key, value)?),
            "write_timeout_ms" => self.write_timeout_ms = Some(parse_u64(key, value)?),
            "submit_ring" => self.submit_ring = Some(parse_u64(key, value)? as usize),
            "max_write" => self.max_write = Some(parse_size(v).map_err(|e| bad(key, value, e))?),
            "caller_drives" => self.caller_drives = Some(parse_bool(key, value)?),
            "initial_sync" => self.initial_sync = Some(parse_bool(key, value)?),
            "chunk_size" => {
                let size = parse_size(v).map_err(|e| bad(key, value, e))?;
                mirror_proto::ChunkGeometry::new(1, size).map_err(|e| bad(key, value, e.to_string()))?;
                self.chunk_size = Some(size);
            }
            "resync_rate" => {
                let rate = v.strip_suffix("/s").unwrap_or(v);
                self.resync_rate = Some(parse_size(rate).map_err(|e| bad(key, value, e))?);
            }
            "crash_before_apply_seq" if cfg!(feature = "fail-points") => {
                self.crash_before_apply_seq = Some(parse_u64(key, value)?)
            }
            "crash_before_apply_seq" => {
                return Err(bad(
                    key,
                    value,
                    "a test fail point, compiled only into builds with the cargo feature fail-points (never a release build)",
                ))
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: key.to_owned(),
                })
            }
        }
        Ok(())
    }

    /// Reads every key of a TOML file (a flat table; strings, integers and booleans).
    pub fn load_toml(&mut self, path: &Path) -> Result<(), MirrorError> {
        let text = std::fs::read_to_string(path).map_err(|source| MirrorError::Io {
            context: format!("reading config file {}", path.display()),
            source,
        })?;
        self.merge_toml(&text).map_err(|e| {
            MirrorError::Config(ConfigError::File {
                path: path.to_owned(),
                inner: Box::new(e),
            })
        })
    }

    /// Reads every key of a TOML document.
    pub fn merge_toml(&mut self, text: &str) -> Result<(), ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Toml {
                message: e.message().to_owned(),
            })?;
        for (key, value) in &table {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(bad(
                        key,
                        &other.to_string(),
                        "expected a string or an integer",
                    ))
                }
            };
            self.set(key, &text)?;
        }
        Ok(())
    }

    /// Validates the whole and fills defaults.
    pub fn build(&self) -> Result<Config, ConfigError> {
        let missing = |key: &'static str| ConfigError::Missing { key };
        let role = self.role.ok_or(missing("role"))?;
        let region = self.region.clone().ok_or(missing("region"))?;
        let region_size = self.region_size.ok_or(missing("region_size"))?;
        let queue = self.queue.clone().ok_or(missing("queue"))?;
        if region_size == 0 {
            return Err(bad("region_size", "0", "must be at least 1 byte"));
        }
        let queue_size = self.queue_size.unwrap_or(64 << 20);
        if queue_size < 64 << 10 {
            return Err(bad(
                "queue_size",
                &queue_size.to_string(),
                "must be at least 64KiB",
            ));
        }
        if region == queue {
            return Err(bad(
                "queue",
                &queue.display().to_string(),
                "must not be the same file as 'region'",
            ));
        }
        let max_write_cap = (queue_size / 4).min(mirror_proto::wire::MAX_WRITE_LEN as u64);
        // Unset: 1 MiB, or less when a small queue cannot hold records that large.
        let max_write = self
            .max_write
            .unwrap_or(DEFAULT_MAX_WRITE.min(max_write_cap));
        if max_write == 0 || max_write > max_write_cap {
            return Err(bad(
                "max_write",
                &max_write.to_string(),
                format!("must be between 1 and {max_write_cap} (a quarter of queue_size, at most 16MiB)"),
            ));
        }
        // A backup listens and a primary connects to its peer; a node with both can change
        // its role live (promote, demote, fenced).
        match role {
            Role::Backup if self.listen.is_none() => return Err(missing("listen")),
            Role::Primary if self.peer.is_none() => return Err(missing("peer")),
            _ => {}
        }
        let listen = match self.listen.as_deref() {
            Some(l) => Some(resolve("listen", l)?),
            None => None,
        };
        let peer = match self.peer.as_deref() {
            Some(p) => {
                resolve("peer", p)?;
                Some(p.to_owned())
            }
            None => None,
        };
        if let (Some(l), Some(p)) = (listen, peer.as_deref()) {
            if resolve("peer", p)? == l {
                return Err(bad(
                    "peer",
                    p,
                    "is this node's own 'listen' address: 'peer' is the other node's",
                ));
            }
        }
        let tls = self.tls(peer.as_deref())?;
        let auth = self.auth(listen, peer.as_deref(), tls.is_some())?;
        let submit_ring = self.submit_ring.unwrap_or(4096);
        if submit_ring == 0 || submit_ring > 1 << 20 {
            return Err(bad(
                "submit_ring",
                &submit_ring.to_string(),
                "must be between 1 and 1048576",
            ));
        }
        let cpu = self.cpu.unwrap_or(None);
        if let Some(c) = cpu {
            let n = machine_cpus();
            if c >= n {
                return Err(bad(
                    "cpu",
                    &c.to_string(),
                    format!("this machine has CPUs 0..{}", n - 1),
                ));
            }
        }
        let ms = |v: Option<u64>, d: u64| Duration::from_millis(v.unwrap_or(d));
        let ack_timeout = ms(self.ack_timeout_ms, 1000);
        if ack_timeout.is_zero() {
            return Err(bad("ack_timeout_ms", "0", "must be at least 1"));
        }
        Ok(Config {
            role,
            region,
            region_size,
            queue,
            queue_size,
            listen,
            peer,
            transport: self.transport.unwrap_or(TransportKind::Tcp),
            rdma_device: self.rdma_device.clone(),
            rdma_port: self.rdma_port.unwrap_or(1),
            rdma_gid_index: self.rdma_gid_index.unwrap_or(None),
            durability: self.durability.unwrap_or(Durability::Process),
            on_peer_loss: self.on_peer_loss.unwrap_or(PeerLossPolicy::Continue),
            on_fenced: self.on_fenced.unwrap_or(FencedPolicy::Demote),
            after_split_brain: self.after_split_brain.unwrap_or_default(),
            control_socket: self.control_socket.unwrap_or(true),
            auth,
            tls,
            log_format: self.log_format.unwrap_or_default(),
            log_level: self.log_level.clone(),
            metrics_listen: match self.metrics_listen.as_deref() {
                Some(a) => Some(resolve("metrics_listen", a)?),
                None => None,
            },
            cpu,
            idle_spin: Duration::from_micros(self.idle_spin_us.unwrap_or(200)),
            wait_spin: Duration::from_micros(self.wait_spin_us.unwrap_or(50)),
            ack_timeout,
            handshake_timeout: ms(self.handshake_timeout_ms, 5000).max(Duration::from_millis(1)),
            reconnect_interval: ms(self.reconnect_interval_ms, 100),
            write_timeout: match self.write_timeout_ms {
                None | Some(0) => None,
                Some(t) => Some(Duration::from_millis(t)),
            },
            submit_ring,
            max_write: max_write as usize,
            caller_drives: self.caller_drives.unwrap_or(true),
            chunk_size: self.chunk_size.unwrap_or(mirror_proto::DEFAULT_CHUNK_SIZE),
            resync_rate: self.resync_rate.unwrap_or(0),
            initial_sync: self.initial_sync.unwrap_or(false),
            crash_before_apply_seq: self.crash_before_apply_seq,
        })
    }
}

impl ConfigBuilder {
    /// TLS settings, if `tls = on`: a certificate, its key, and one way to check the peer's.
    fn tls(&self, peer: Option<&str>) -> Result<Option<TlsSettings>, ConfigError> {
        if self.tls != Some(true) {
            for (key, set) in [
                ("tls_cert", self.tls_cert.is_some()),
                ("tls_key", self.tls_key.is_some()),
                ("tls_ca", self.tls_ca.is_some()),
                ("tls_peer_fingerprint", self.tls_peer_fingerprint.is_some()),
                ("tls_server_name", self.tls_server_name.is_some()),
            ] {
                if set {
                    return Err(bad(key, "(set)", "has no effect without tls = on"));
                }
            }
            return Ok(None);
        }
        if self.transport == Some(TransportKind::Rdma) {
            return Err(bad(
                "tls",
                "on",
                "applies to the TCP transport only; over RDMA set secret_file (the setup is authenticated and every frame tagged; the data path is not encrypted)",
            ));
        }
        let cert = self
            .tls_cert
            .clone()
            .ok_or(ConfigError::Missing { key: "tls_cert" })?;
        let key = self
            .tls_key
            .clone()
            .ok_or(ConfigError::Missing { key: "tls_key" })?;
        let verify = match (&self.tls_ca, self.tls_peer_fingerprint) {
            (Some(ca), None) => TlsVerify::Ca(ca.clone()),
            (None, Some(fp)) => TlsVerify::Fingerprint(fp),
            (None, None) => {
                return Err(bad(
                    "tls",
                    "on",
                    "needs tls_ca (a CA that signed the peer's certificate) or tls_peer_fingerprint (the peer certificate's SHA-256)",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    "tls_peer_fingerprint",
                    "(set)",
                    "set tls_ca or tls_peer_fingerprint, not both",
                ))
            }
        };
        let server_name = match (&self.tls_server_name, peer) {
            (Some(n), _) => n.clone(),
            (None, Some(p)) => host_of(p).to_string(),
            (None, None) => "localhost".to_string(),
        };
        Ok(Some(TlsSettings {
            cert,
            key,
            verify,
            server_name,
        }))
    }

    /// The secure default: a node reachable beyond this machine authenticates its peers (a
    /// secret, or TLS with certificates), unless `auth = none` says otherwise in so many words.
    fn auth(
        &self,
        listen: Option<SocketAddr>,
        peer: Option<&str>,
        tls: bool,
    ) -> Result<Auth, ConfigError> {
        match (self.auth_none, &self.secret_file) {
            (Some(true), Some(f)) => {
                return Err(bad(
                    "auth",
                    "none",
                    format!(
                        "contradicts secret_file = {} (remove one of them)",
                        f.display()
                    ),
                ))
            }
            (_, Some(f)) => {
                return Ok(Auth::Secret {
                    secret_file: f.clone(),
                    accept_secret_file: self.accept_secret_file.clone(),
                })
            }
            (Some(false), None) => return Err(ConfigError::Missing { key: "secret_file" }),
            _ => {}
        }
        if let Some(f) = &self.accept_secret_file {
            return Err(bad(
                "accept_secret_file",
                &f.display().to_string(),
                "needs secret_file (it adds a second accepted secret during a rotation)",
            ));
        }
        let mut exposed = None;
        if let Some(l) = listen.filter(|l| !l.ip().is_loopback()) {
            exposed = Some(("listen", l.to_string()));
        }
        if let Some(p) = peer {
            if !resolve("peer", p)?.ip().is_loopback() {
                exposed = Some(("peer", p.to_string()));
            }
        }
        match (exposed, self.auth_none) {
            (None, _) => Ok(Auth::Loopback),
            (Some(_), _) if tls => Ok(Auth::TlsOnly),
            (Some(_), Some(true)) => Ok(Auth::Disabled),
            (Some((key, addr)), _) => Err(bad(
                key,
                &addr,
                "is not a loopback address, so other machines can reach this node: set secret_file (the same file of at least 32 random bytes, mode 600, on both nodes) so that only the peer can write into the region, or set auth = none to run unauthenticated",
            )),
        }
    }
}

/// The host part of `host:port` (an IPv6 literal without its brackets).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A SHA-256 fingerprint: 64 hex digits, optionally with colons between bytes and a
/// `sha256:` prefix.
fn parse_fingerprint(v: &str) -> Result<[u8; 32], String> {
    let hex: String = v
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("expected a SHA-256 fingerprint: 64 hex digits (colons allowed)".into());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn resolve(key: &str, addr: &str) -> Result<SocketAddr, ConfigError> {
    addr.to_socket_addrs()
        .map_err(|e| bad(key, addr, format!("not a host:port address ({e})")))?
        .next()
        .ok_or_else(|| bad(key, addr, "resolves to no address"))
}

/// CPUs this machine numbers (online or not: an offline one may sit between online ones, and
/// pinning to it fails when the poller starts, with a warning). Not `available_parallelism`,
/// which counts those the calling thread may run on: a caller pinned to one CPU could not open
/// a node whose poller is pinned to another.
fn machine_cpus() -> usize {
    // SAFETY: sysconf only reads a system value; `_SC_NPROCESSORS_CONF` is a valid name.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n).map_or(1, |n| n.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup() -> ConfigBuilder {
        let mut b = ConfigBuilder::new();
        b.set("role", "backup").unwrap();
        b.set("region", "/tmp/r").unwrap();
        b.set("region_size", "1MiB").unwrap();
        b.set("queue", "/tmp/q").unwrap();
        b.set("listen", "127.0.0.1:0").unwrap();
        b
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("16 MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn a_complete_backup_config_builds_with_defaults() {
        let c = backup().build().unwrap();
        assert_eq!(c.role, Role::Backup);
        assert_eq!(c.region_size, 1 << 20);
        assert_eq!(c.durability, Durability::Process);
        assert_eq!(c.on_peer_loss, PeerLossPolicy::Continue);
        assert_eq!(c.transport, TransportKind::Tcp);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let mut b = ConfigBuilder::new();
        let e = b.set("regoin", "x").unwrap_err();
        assert!(e.to_string().contains("regoin"), "{e}");
        let e = b.set("durability", "sometimes").unwrap_err();
        assert!(e.to_string().contains("durability"), "{e}");
        let e = b.set("region_size", "-1").unwrap_err();
        assert!(e.to_string().contains("region_size"), "{e}");
        let e = b.set("cpu", "one").unwrap_err();
        assert!(e.to_string().contains("cpu"), "{e}");
    }

    #[test]
    fn rdma_keys_parse_validate_and_default() {
        let c = backup().build().unwrap();
        assert_eq!(
            (c.rdma_device.as_deref(), c.rdma_port, c.rdma_gid_index),
            (None, 1, None)
        );
        let mut b = backup();
        b.set("transport", "rdma").unwrap();
        b.set("rdma_device", "rxe0").unwrap();
        b.set("rdma_port", "2").unwrap();
        b.set("rdma_gid_index", "1").unwrap();
        let c = b.build().unwrap();
        assert_eq!(c.transport, TransportKind::Rdma);
        assert_eq!(
            (c.rdma_device.as_deref(), c.rdma_port, c.rdma_gid_index),
            (Some("rxe0"), 2, Some(1))
        );
        b.set("rdma_gid_index", "auto").unwrap();
        assert_eq!(b.build().unwrap().rdma_gid_index, None);
        for (key, value) in [
            ("rdma_device", ""),
            ("rdma_port", "0"),
            ("rdma_port", "256"),
            ("rdma_port", "one"),
            ("rdma_gid_index", "256"),
            ("rdma_gid_index", "first"),
        ] {
            let e = ConfigBuilder::new().set(key, value).unwrap_err();
            assert!(e.to_string().contains(key), "{key}={value}: {e}");
        }
        assert!(KEYS.iter().any(|(k, _)| *k == "rdma_gid_index"));
    }

    #[test]
    fn missing_and_contradictory_keys_are_refused() {
        // Both addresses on one node: it can take either role live.
        let mut b = backup();
        b.set("peer", "127.0.0.1:1").unwrap();
        let c = b.build().unwrap();
        assert_eq!(c.peer.as_deref(), Some("127.0.0.1:1"));
        b.set("role", "primary").unwrap();
        assert!(b.build().unwrap().listen.is_some());
        // ...but not its own address as its peer.
        let listen = c.listen.unwrap().to_string();
        b.set("peer", &listen).unwrap();
        let e = b.build().unwrap_err().to_string();
        assert!(e.contains("peer") && e.contains("own"), "{e}");
        b.set("on_fenced", "stop").unwrap();
        let e = b.set("on_fenced", "retire").unwrap_err().to_string();
        assert!(e.contains("on_fenced") && e.contains("demote"), "{e}");
        let mut b = ConfigBuilder::new();
        b.set("role", "primary").unwrap();
        b.set("region", "/tmp/r").unwrap();
        b.set("region_size", "1MiB").unwrap();
        b.set("queue", "/tmp/q").unwrap();
        b.set("listen", "127.0.0.1:7400").unwrap();
        assert!(b.build().unwrap_err().to_string().contains("peer"));
        let mut b = ConfigBuilder::new();
        b.set("role", "primary").unwrap();
        assert!(b.build().unwrap_err().to_string().contains("region"));
        let mut b = backup();
        b.set("region_size", "0").unwrap();
        assert!(b.build().is_err());
        let mut b = backup();
        b.set("queue", "/tmp/r").unwrap();
        assert!(b.build().unwrap_err().to_string().contains("queue"));
        let mut b = backup();
        b.set("cpu", "100000").unwrap();
        assert!(b.build().unwrap_err().to_string().contains("cpu"));
        let mut b = backup();
        b.set("listen", "not an address").unwrap();
        assert!(b.build().unwrap_err().to_string().contains("listen"));
        let mut b = backup();
        b.set("max_write", "1GiB").unwrap();
        assert!(b.build().unwrap_err().to_string().contains("max_write"));
    }

    #[test]
    fn a_caller_pinned_to_one_cpu_may_pin_the_poller_to_another() {
        if machine_cpus() < 2 {
            return; // one CPU: there is no other to name
        }
        std::thread::spawn(|| {
            assert!(core_affinity::set_for_current(core_affinity::CoreId {
                id: 0
            }));
            let mut b = backup();
            b.set("cpu", "1").unwrap();
            assert_eq!(b.build().unwrap().cpu, Some(1));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn toml_files_use_the_same_keys() {
        let mut b = ConfigBuilder::new();
        b.merge_toml(
            "role = \"primary\"\nregion = \"/tmp/r\"\nregion_size = 65536\nqueue = \"/tmp/q\"\npeer = \"127.0.0.1:7400\"\non_peer_loss = \"block\"\n",
        )
        .unwrap();
        let c = b.build().unwrap();
        assert_eq!(c.on_peer_loss, PeerLossPolicy::Block);
        assert_eq!(c.region_size, 65536);
        let e = ConfigBuilder::new()
            .merge_toml("role = [1, 2]")
            .unwrap_err();
        assert!(e.to_string().contains("role"), "{e}");
        let e = ConfigBuilder::new().merge_toml("role = ").unwrap_err();
        assert!(matches!(e, ConfigError::Toml { .. }));
    }
}
