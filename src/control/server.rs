//! Server: [`ControlServer`] binds the socket, and its thread accepts one connection at a time,
//! checks the peer's uid, reads the request line, calls the [`ControlTarget`] and answers.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::socket::{connect, effective_uid, peer_credentials, send_all, wait_readable, Readiness};
use super::wire::{encode_response, parse_request};
use super::{
    io_error, ControlError, ControlRefusal, ControlTarget, Request, Response, ACCEPT_ERROR_BACKOFF,
    DRAIN_GRACE, DRAIN_MAX_BYTES, KIND_INTERNAL, KIND_PERMISSION_DENIED, PROBE_TIMEOUT,
    REQUEST_LINE_MAX_BYTES, REQUEST_TIMEOUT,
};
use crate::ffi::{MIRROR_EIO, MIRROR_EPANIC};

/// A running control endpoint: a socket at [`ControlServer::path`] served by one background
/// thread named `mirror-control`. Dropping it (or [`ControlServer::stop`]) stops the thread and
/// removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file we bound: only that file is removed at stop, never
    /// one that replaced it.
    socket_file: (u64, u64),
    /// Dropping this end wakes the thread's poll (the other end reads end-of-file): the stop
    /// signal, prompt even while the thread waits for a slow client.
    stop_signal: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds the control socket at `path` (mode 0600) and starts serving `target` on a
    /// background thread.
    ///
    /// A socket file already at `path` that nobody answers on is a stale one left by a killed
    /// node: it is removed and replaced. If a server answers there, this fails with
    /// [`ControlError::LiveSocket`]; if something other than a socket is there, with
    /// [`ControlError::NotASocket`] (it is never removed).
    pub fn start(path: &Path, target: Arc<dyn ControlTarget>) -> Result<Self, ControlError> {
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(io_error(format!(
            "binding the control socket {}",
            path.display()
        )))?;
        // From here on the file at `path` is ours; remove it if starting fails.
        let started = (|| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                io_error(format!(
                    "setting mode 0600 on the control socket {}",
                    path.display()
                )),
            )?;
            let meta = std::fs::symlink_metadata(path).map_err(io_error(format!(
                "reading back the control socket {}",
                path.display()
            )))?;
            // Non-blocking, so that an accept after a wake-up whose client already left (or
            // that another accept took) returns WouldBlock instead of hanging the thread.
            listener.set_nonblocking(true).map_err(io_error(
                "making the control listener non-blocking".to_string(),
            ))?;
            let (stop_signal, stop_watch) = UnixStream::pair().map_err(io_error(
                "creating the control thread's stop signal".to_string(),
            ))?;
            let thread = std::thread::Builder::new()
                .name("mirror-control".into())
                .spawn(move || serve(listener, stop_watch, target))
                .map_err(io_error("starting the control thread".to_string()))?;
            Ok((meta.dev(), meta.ino(), stop_signal, thread))
        })();
        match started {
            Ok((dev, ino, stop_signal, thread)) => {
                tracing::info!(path = %path.display(), "control socket listening");
                Ok(Self {
                    path: path.to_owned(),
                    socket_file: (dev, ino),
                    stop_signal: Some(stop_signal),
                    thread: Some(thread),
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the thread and removes the socket file, reporting what could not be done (dropping
    /// the server does the same and logs it).
    pub fn stop(mut self) -> Result<(), ControlError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ControlError> {
        drop(self.stop_signal.take());
        let mut result = Ok(());
        if let Some(thread) = self.thread.take() {
            // Joining ourselves would deadlock: a target that drops its server from inside a
            // request leaves the thread to end on its own (it sees the stop signal next).
            if thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
                result = Err(ControlError::Io {
                    context: "stopping the control thread".into(),
                    source: io::Error::other("the thread panicked"),
                });
            }
        }
        // Remove only the socket we bound: if another node replaced it (after finding ours
        // stale), or someone put a file there, it is theirs.
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.socket_file => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    if e.kind() != io::ErrorKind::NotFound && result.is_ok() {
                        result = Err(ControlError::Io {
                            context: format!("removing the control socket {}", self.path.display()),
                            source: e,
                        });
                    }
                }
            }
            _ => {}
        }
        result
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "stopping the control endpoint");
        }
    }
}

/// Clears the way for binding at `path`: nothing there, or a stale socket (removed). Refuses a
/// live socket and anything that is not a socket.
fn remove_stale_socket(path: &Path) -> Result<(), ControlError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ControlError::Io {
                context: format!("checking for an existing control socket {}", path.display()),
                source: e,
            })
        }
    };
    let file_type = meta.file_type();
    if !file_type.is_socket() {
        let what = if file_type.is_file() {
            "regular file"
        } else if file_type.is_dir() {
            "directory"
        } else if file_type.is_symlink() {
            "symbolic link"
        } else if file_type.is_fifo() {
            "FIFO"
        } else {
            "device or other special file"
        };
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
            what,
        });
    }
    match connect(path, PROBE_TIMEOUT) {
        Ok(probe) => {
            // Hang up at once: the live server reads end-of-file and moves on, rather than
            // waiting out its request timeout for us.
            let _ = probe.shutdown(std::net::Shutdown::Both);
            Err(ControlError::LiveSocket {
                path: path.to_owned(),
            })
        }
        // A full accept queue (EAGAIN on a non-blocking connect) or a slow accept: a server is
        // there, just busy.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(ControlError::LiveSocket {
                path: path.to_owned(),
            })
        }
        // Nobody listens: the socket of a node that was killed before it could remove it.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            tracing::info!(path = %path.display(), "removing a stale control socket");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ControlError::Io {
                    context: format!("removing the stale control socket {}", path.display()),
                    source: e,
                }),
            }
        }
        // E.g. EACCES: a socket of another user; we cannot tell whether it is live.
        Err(e) => Err(ControlError::Io {
            context: format!(
                "probing the existing control socket {} (to tell a live node from a stale file)",
                path.display()
            ),
            source: e,
        }),
    }
}

/// The control thread: accepts and serves one connection at a time until the stop signal.
fn serve(listener: UnixListener, stop: UnixStream, target: Arc<dyn ControlTarget>) {
    let own_uid = effective_uid();
    loop {
        match wait_readable(Some(listener.as_raw_fd()), stop.as_raw_fd(), None) {
            Ok(Readiness::Ready) => {}
            Ok(Readiness::Stop) => return,
            Ok(Readiness::TimedOut) => continue,
            Err(e) => {
                tracing::error!(error = %e, "control endpoint: poll failed; stopping it");
                return;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if serve_connection(stream, stop.as_raw_fd(), &*target, own_uid).is_stop() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // Out of descriptors or memory: the listener stays readable, so back off
                // instead of spinning, and stay responsive to stop meanwhile.
                tracing::warn!(error = %e, "control endpoint: accept failed");
                let deadline = Instant::now() + ACCEPT_ERROR_BACKOFF;
                if let Ok(Readiness::Stop) = wait_readable(None, stop.as_raw_fd(), Some(deadline)) {
                    return;
                }
            }
        }
    }
}

/// How a connection ended, for the accept loop.
enum Served {
    Answered,
    Stopping,
}

impl Served {
    fn is_stop(&self) -> bool {
        matches!(self, Served::Stopping)
    }
}

/// Checks the peer, reads its request, calls the target, answers, and closes (on return).
fn serve_connection(
    owned: UnixStream,
    stop: RawFd,
    target: &dyn ControlTarget,
    own_uid: u32,
) -> Served {
    let stream = &owned;
    // The listener is non-blocking; accept4 does not pass that on, but say so rather than
    // rely on it: reads are preceded by poll, writes must block (up to the timeout).
    if stream.set_nonblocking(false).is_err()
        || stream.set_write_timeout(Some(REQUEST_TIMEOUT)).is_err()
    {
        return Served::Answered;
    }
    let refusal = match peer_credentials(stream) {
        Ok((uid, _)) if uid == own_uid || uid == 0 => None,
        Ok((uid, pid)) => {
            tracing::warn!(
                uid,
                pid,
                "control endpoint: refused a connection from another user"
            );
            Some(format!(
                "permission denied: the connecting process (pid {pid}) runs as uid {uid}; only \
                 this node's uid {own_uid} and root may use its control socket"
            ))
        }
        Err(e) => Some(format!(
            "permission denied: the connecting process's credentials cannot be read: {e}"
        )),
    };
    if let Some(message) = refusal {
        // An OS-level refusal, as connect(2) gives once the file mode is in force: MIRROR_EIO.
        let refusal = ControlRefusal::new(MIRROR_EIO, KIND_PERMISSION_DENIED, message);
        answer(stream, stop, &Response::Refused(refusal));
        return Served::Answered;
    }
    let response = match read_request_line(stream, stop) {
        Err(LineError::Stopping) => return Served::Stopping,
        Err(LineError::Bad(message)) => Response::Refused(ControlRefusal::bad_request(message)),
        Ok(line) => match parse_request(&line) {
            Err(message) => Response::Refused(ControlRefusal::bad_request(message)),
            Ok(Request::Events) => match follow_events(owned, target) {
                Ok(()) => return Served::Answered,
                Err((owned, refusal)) => {
                    answer(&owned, stop, &Response::Refused(refusal));
                    return Served::Answered;
                }
            },
            Ok(request) => dispatch(target, request),
        },
    };
    if let Response::Refused(r) = &response {
        tracing::debug!(kind = %r.kind, message = %r.message, "control request refused");
    }
    answer(stream, stop, &response);
    Served::Answered
}

/// `events` clients being served at once; more are refused (each holds a thread).
const MAX_EVENT_FOLLOWERS: usize = 16;
/// A follower that does not take an event line within this time is dropped (its subscription
/// goes with it: the node never waits for it).
const EVENT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a follower's thread checks that its client is still there between events.
const EVENT_IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

static EVENT_FOLLOWERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Serves an `events` request on a thread of its own (the control thread goes on serving
/// others): the answer line, then one JSON line per event until the client hangs up, stalls, or
/// the node closes. Gives the stream back with a refusal if it cannot.
fn follow_events(
    stream: UnixStream,
    target: &dyn ControlTarget,
) -> Result<(), (UnixStream, ControlRefusal)> {
    use std::sync::atomic::Ordering;
    // Relaxed: a count, read and changed only through this one atomic.
    if EVENT_FOLLOWERS.fetch_add(1, Ordering::Relaxed) >= MAX_EVENT_FOLLOWERS {
        EVENT_FOLLOWERS.fetch_sub(1, Ordering::Relaxed);
        let refusal = ControlRefusal::new(
            crate::ffi::MIRROR_EBUSY,
            super::KIND_BUSY,
            format!("{MAX_EVENT_FOLLOWERS} clients already follow this node's events"),
        );
        return Err((stream, refusal));
    }
    let events = match target.subscribe() {
        Ok(e) => e,
        Err(r) => {
            EVENT_FOLLOWERS.fetch_sub(1, Ordering::Relaxed);
            return Err((stream, r));
        }
    };
    let spawned = std::thread::Builder::new()
        .name("mirror-events".into())
        .spawn(move || {
            stream_events(&stream, &events);
            EVENT_FOLLOWERS.fetch_sub(1, Ordering::Relaxed);
        });
    if let Err(e) = spawned {
        EVENT_FOLLOWERS.fetch_sub(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "control endpoint: cannot start an events thread");
    }
    Ok(())
}

/// The body of an events follower's thread.
fn stream_events(stream: &UnixStream, events: &crate::Events) {
    if stream.set_write_timeout(Some(EVENT_WRITE_TIMEOUT)).is_err()
        || send_all(stream, &encode_response(&Response::Done)).is_err()
    {
        return;
    }
    loop {
        match events.next_timeout(EVENT_IDLE_CHECK) {
            Some(record) => {
                let Ok(mut line) = serde_json::to_vec(&record) else {
                    continue;
                };
                line.push(b'\n');
                if send_all(stream, &line).is_err() {
                    return; // gone, or stalled past the write timeout
                }
            }
            None if events.ended() => return,
            None if client_gone(stream) => return,
            None => {}
        }
    }
}

/// Whether the client hung up (its end reads as end-of-file or fails).
fn client_gone(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; no wait.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n <= 0 {
        return false;
    }
    if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        return true;
    }
    // Readable: end-of-file, or bytes a follower should not send (read and ignored).
    let mut buf = [0u8; 256];
    matches!((&*stream).read(&mut buf), Ok(0) | Err(_))
}

/// Sends the answer, then lets the client read it to a clean end-of-file.
fn answer(stream: &UnixStream, stop: RawFd, response: &Response) {
    // The client may have gone away; that is its business, and the next client's turn.
    if let Err(e) = send_all(stream, &encode_response(response)) {
        tracing::debug!(error = %e, "control endpoint: the client left before the answer");
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    drain_unread(stream, stop);
}

/// Reads and discards what the client sent beyond what was parsed (the rest of an over-long
/// line, bytes after the newline, or a refused peer's whole request), until it hangs up, for at
/// most [`DRAIN_GRACE`] and [`DRAIN_MAX_BYTES`]. On Linux, closing a Unix socket with unread
/// bytes makes the client's next read fail with ECONNRESET instead of end-of-file, so a client
/// that reads to the end would report an error after the answer.
fn drain_unread(stream: &UnixStream, stop: RawFd) {
    let deadline = Instant::now() + DRAIN_GRACE;
    let mut scratch = [0u8; 4096];
    let mut drained = 0usize;
    while drained < DRAIN_MAX_BYTES {
        match wait_readable(Some(stream.as_raw_fd()), stop, Some(deadline)) {
            Ok(Readiness::Ready) => {}
            Ok(Readiness::Stop | Readiness::TimedOut) | Err(_) => return,
        }
        match (&*stream).read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

enum LineError {
    /// The server is stopping; the connection is abandoned without an answer.
    Stopping,
    /// The message for the `bad_request` answer.
    Bad(String),
}

/// Reads up to the first `\n` (returned without it) within [`REQUEST_TIMEOUT`] from accept,
/// never more than [`REQUEST_LINE_MAX_BYTES`]. One deadline for the whole line, not a timeout
/// per read: a client trickling one byte at a time must not hold the thread for longer.
fn read_request_line(stream: &UnixStream, stop: RawFd) -> Result<Vec<u8>, LineError> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut line = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        match wait_readable(Some(stream.as_raw_fd()), stop, Some(deadline)) {
            Ok(Readiness::Ready) => {}
            Ok(Readiness::Stop) => return Err(LineError::Stopping),
            Ok(Readiness::TimedOut) => {
                return Err(LineError::Bad(format!(
                    "no complete request line within {REQUEST_TIMEOUT:?} ({} bytes received, \
                     no newline)",
                    line.len()
                )))
            }
            Err(e) => return Err(LineError::Bad(format!("waiting for the request: {e}"))),
        }
        // Never buffer past the limit: the rest of an over-long line is only drained.
        let want = chunk.len().min(REQUEST_LINE_MAX_BYTES - line.len());
        let n = match (&*stream).read(&mut chunk[..want]) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                continue
            }
            Err(e) => return Err(LineError::Bad(format!("reading the request: {e}"))),
        };
        if n == 0 {
            return Err(LineError::Bad(if line.is_empty() {
                "connection closed before a request was sent".into()
            } else {
                format!(
                    "connection closed after {} bytes without the newline that ends a request",
                    line.len()
                )
            }));
        }
        let received = &chunk[..n];
        if let Some(at) = received.iter().position(|&b| b == b'\n') {
            // Anything after the newline is ignored: one request per connection.
            line.extend_from_slice(&received[..at]);
            return Ok(line);
        }
        line.extend_from_slice(received);
        if line.len() >= REQUEST_LINE_MAX_BYTES {
            return Err(LineError::Bad(format!(
                "request line longer than {REQUEST_LINE_MAX_BYTES} bytes (the limit counts the \
                 newline)"
            )));
        }
    }
}

/// Calls the target. A panic in the node's code is answered as an `internal` refusal rather
/// than ending the control thread, so the endpoint stays up for the operator.
fn dispatch(target: &dyn ControlTarget, request: Request) -> Response {
    let op = request.op();
    let outcome = catch_unwind(AssertUnwindSafe(|| match request {
        Request::Status => Response::Status(Box::new(target.live_status())),
        Request::Promote { force } => match target.promote(force) {
            Ok(p) => Response::Promoted(p),
            Err(r) => Response::Refused(r),
        },
        Request::Demote => match target.demote() {
            Ok(()) => Response::Done,
            Err(r) => Response::Refused(r),
        },
        Request::Resolve { discard } => match target.resolve(&discard) {
            Ok(()) => Response::Done,
            Err(r) => Response::Refused(r),
        },
        Request::Verify { repair } => match target.verify(repair) {
            Ok(()) => Response::Done,
            Err(r) => Response::Refused(r),
        },
        // Served as a stream by `follow_events`, never here.
        Request::Events => Response::Refused(ControlRefusal::bad_request(
            "events is a stream, served apart".to_string(),
        )),
    }));
    outcome.unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        tracing::error!(op, panic = %what, "control request panicked in the node");
        Response::Refused(ControlRefusal::new(
            MIRROR_EPANIC,
            KIND_INTERNAL,
            format!("the node panicked while handling {op} (a bug): {what}"),
        ))
    })
}
