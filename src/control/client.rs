//! Client: [`request`] sends one request and returns the node's answer; [`status`],
//! [`promote`], [`demote`] and [`resolve`] wrap it for each op.

use std::io::{self, BufRead, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::socket::{connect, send_all};
use super::wire::{encode_request, parse_response};
use super::{
    io_error, ControlError, DiscardNode, LiveStatus, Promoted, Request, Response,
    RESPONSE_LINE_MAX_BYTES,
};

/// Sends `req` to the node whose control socket is at `path` and returns its answer; the whole
/// exchange (connect, send, answer) must finish within `timeout`. A refusal is an `Ok`
/// ([`Response::Refused`]); an `Err` means no valid answer arrived.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let deadline = Instant::now() + timeout;
    let stream = send_request(path, req, timeout, deadline)?;
    let answer = read_response_line(path, &stream, deadline).map_err(|e| match e {
        Some(e) => e,
        None => ControlError::TimedOut {
            path: path.to_owned(),
            timeout,
            waiting_for: "waiting for the answer",
        },
    })?;
    parse_response(path, req, &answer)
}

/// Connects to the control socket at `path` and sends `req`, within `deadline`.
fn send_request(
    path: &Path,
    req: &Request,
    timeout: Duration,
    deadline: Instant,
) -> Result<UnixStream, ControlError> {
    let timed_out = |waiting_for| ControlError::TimedOut {
        path: path.to_owned(),
        timeout,
        waiting_for,
    };
    let stream = connect(path, timeout).map_err(|source| match source.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => timed_out("connecting"),
        io::ErrorKind::PermissionDenied => ControlError::Connect {
            path: path.to_owned(),
            source,
            hint: "only the node's user and root may use its control socket",
        },
        io::ErrorKind::InvalidInput => ControlError::Connect {
            path: path.to_owned(),
            source,
            hint: "a Unix socket path holds at most 107 bytes",
        },
        _ => ControlError::Connect {
            path: path.to_owned(),
            source,
            hint: "is the node running? the socket is created by a running node beside its \
                   queue file",
        },
    })?;
    let line = encode_request(req).map_err(|e| ControlError::Io {
        context: "encoding the request".into(),
        source: e.into(),
    })?;
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| timed_out("sending the request"))?;
    stream.set_write_timeout(Some(left)).map_err(io_error(
        "setting the control socket's write timeout".to_string(),
    ))?;
    if let Err(e) = send_all(&stream, &line) {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                return Err(timed_out("sending the request"))
            }
            // The server may have answered and closed before reading (a refused peer): its
            // answer is still ours to read.
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {}
            _ => {
                return Err(ControlError::Io {
                    context: format!("sending the request to {}", path.display()),
                    source: e,
                })
            }
        }
    }
    Ok(stream)
}

/// Follows the node's events (`mirror events`): calls `on_event` with each event's JSON line,
/// in order, until the node closes (then returns `Ok`) or `on_event` returns `false`. `timeout`
/// bounds connecting and the node's first answer, not the wait between events.
pub fn follow_events(
    path: &Path,
    timeout: Duration,
    mut on_event: impl FnMut(&str) -> bool,
) -> Result<(), ControlError> {
    let deadline = Instant::now() + timeout;
    let stream = send_request(path, &Request::Events, timeout, deadline)?;
    let reading = |source| ControlError::Io {
        context: format!("reading events from {}", path.display()),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(reading)?;
    let mut reader = io::BufReader::new(&stream);
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => {
            return Err(ControlError::BadResponse {
                path: path.to_owned(),
                why: "connection closed before the answer".into(),
            })
        }
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(ControlError::TimedOut {
                path: path.to_owned(),
                timeout,
                waiting_for: "waiting for the answer",
            })
        }
        Err(e) => return Err(reading(e)),
    }
    match parse_response(path, &Request::Events, line.trim_end().as_bytes())? {
        Response::Done => {}
        other => return Err(unexpected(path, other)),
    }
    // From here on the node speaks when something happens: wait as long as it takes.
    stream.set_read_timeout(None).map_err(reading)?;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                if !on_event(line.trim_end()) {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(reading(e)),
        }
    }
}

/// Reads the response line (without its `\n`); `Err(None)` means the deadline passed.
fn read_response_line(
    path: &Path,
    stream: &UnixStream,
    deadline: Instant,
) -> Result<Vec<u8>, Option<ControlError>> {
    let mut line = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(None)?;
        stream.set_read_timeout(Some(left)).map_err(|e| {
            Some(ControlError::Io {
                context: "setting the control socket's read timeout".into(),
                source: e,
            })
        })?;
        let n = match (&*stream).read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(None)
            }
            Err(e) => {
                return Err(Some(ControlError::Io {
                    context: format!("reading the answer from {}", path.display()),
                    source: e,
                }))
            }
        };
        let bad = |why: String| {
            Some(ControlError::BadResponse {
                path: path.to_owned(),
                why,
            })
        };
        if n == 0 {
            return Err(bad(format!(
                "connection closed after {} bytes, before a complete response line",
                line.len()
            )));
        }
        let received = &chunk[..n];
        if let Some(at) = received.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&received[..at]);
            return Ok(line);
        }
        line.extend_from_slice(received);
        if line.len() >= RESPONSE_LINE_MAX_BYTES {
            return Err(bad(format!(
                "response line longer than {RESPONSE_LINE_MAX_BYTES} bytes"
            )));
        }
    }
}

/// Asks the node for its [`LiveStatus`].
pub fn status(path: &Path, timeout: Duration) -> Result<LiveStatus, ControlError> {
    match request(path, &Request::Status, timeout)? {
        Response::Status(s) => Ok(*s),
        other => Err(unexpected(path, other)),
    }
}

/// Asks the node to become the primary.
pub fn promote(path: &Path, force: bool, timeout: Duration) -> Result<Promoted, ControlError> {
    match request(path, &Request::Promote { force }, timeout)? {
        Response::Promoted(p) => Ok(p),
        other => Err(unexpected(path, other)),
    }
}

/// Asks the node to become a backup.
pub fn demote(path: &Path, timeout: Duration) -> Result<(), ControlError> {
    match request(path, &Request::Demote, timeout)? {
        Response::Done => Ok(()),
        other => Err(unexpected(path, other)),
    }
}

/// Asks the node to resolve a split brain by discarding `discard`'s divergent writes.
pub fn resolve(path: &Path, discard: DiscardNode, timeout: Duration) -> Result<(), ControlError> {
    let request_ = Request::Resolve {
        discard: discard.to_string(),
    };
    match request(path, &request_, timeout)? {
        Response::Done => Ok(()),
        other => Err(unexpected(path, other)),
    }
}

/// Starts an online verify on the node (a primary); `status` then reports its progress and,
/// once `verifies_finished` grew, its result.
pub fn verify(path: &Path, repair: bool, timeout: Duration) -> Result<(), ControlError> {
    match request(path, &Request::Verify { repair }, timeout)? {
        Response::Done => Ok(()),
        other => Err(unexpected(path, other)),
    }
}

/// A refusal becomes [`ControlError::Refused`]; anything else cannot happen, because
/// [`request`] already checked the answer matches the request.
fn unexpected(path: &Path, response: Response) -> ControlError {
    match response {
        Response::Refused(r) => ControlError::Refused(r),
        other => ControlError::BadResponse {
            path: path.to_owned(),
            why: format!("unexpected answer {other:?}"),
        },
    }
}
