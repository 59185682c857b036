//! Socket helpers shared by the server and the client. Every `unsafe` block of the control
//! endpoint is here (poll, send, getsockopt, geteuid), each with its `// SAFETY:` comment.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// What [`wait_readable`] saw.
pub(super) enum Readiness {
    /// The watched descriptor is readable (or hung up: the next read says which).
    Ready,
    /// The stop signal fired.
    Stop,
    /// The deadline passed.
    TimedOut,
}

/// Waits until `fd` is readable, `stop` is readable (the server's stop signal), or `deadline`
/// passes. With `fd` `None` it only waits for `stop` or the deadline.
pub(super) fn wait_readable(
    fd: Option<RawFd>,
    stop: RawFd,
    deadline: Option<Instant>,
) -> io::Result<Readiness> {
    loop {
        let timeout_ms: libc::c_int = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Readiness::TimedOut);
                }
                // Round up, so that a wake-up never comes before the deadline and spins.
                let ms = left.as_nanos().div_ceil(1_000_000);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        let mut fds = [
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // poll(2) ignores an entry whose fd is negative.
                fd: fd.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two initialised pollfd, valid and exclusively borrowed
        // for the duration of the call, and its length is passed as nfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // The stop signal wins: a stopping server abandons the connection it was reading.
        if fds[0].revents != 0 {
            return Ok(Readiness::Stop);
        }
        if fds[1].revents != 0 {
            return Ok(Readiness::Ready);
        }
        // n == 0: timed out, or woken early; the loop re-checks the deadline.
    }
}

/// Writes all of `bytes` with `MSG_NOSIGNAL`: a peer that has gone away must cost an `EPIPE`
/// error, not a SIGPIPE that would kill a process (a C program embedding the library) that has
/// not ignored it. `std`'s `Write` for `UnixStream` uses write(2), which raises the signal.
pub(super) fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for reads of `bytes.len()` bytes for the duration of the
        // call; the descriptor is open because `stream` is borrowed.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let sent = usize::try_from(n).unwrap_or(0);
        if sent == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = bytes.get(sent..).unwrap_or_default();
    }
    Ok(())
}

/// The uid and pid of the process at the other end of `stream`, as the kernel recorded them at
/// connect(2).
pub(super) fn peer_credentials(stream: &UnixStream) -> io::Result<(u32, i32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let expected_len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let mut len = expected_len;
    // SAFETY: `cred` is a valid, writable ucred and `len` holds its size, as SO_PEERCRED
    // requires; the kernel writes at most `len` bytes. The descriptor is open because `stream`
    // is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len != expected_len {
        return Err(io::Error::other(format!(
            "SO_PEERCRED returned {len} bytes, expected {expected_len}"
        )));
    }
    Ok((cred.uid, cred.pid))
}

pub(super) fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() }
}

/// Connects to the socket at `path` within `timeout`. socket2 rather than std, because std's
/// `UnixStream::connect` has no timeout and blocks while the server's accept queue is full.
pub(super) fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let address = socket2::SockAddr::unix(path)?;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.connect_timeout(&address, timeout)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}
