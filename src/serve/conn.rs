//! The server's connections, below HTTP: a deadline on request heads, JSON bodies for the
//! errors hyper answers by itself, and a lingering close.
//!
//! `axum::serve` gives hyper no timer, so hyper has no header-read timeout of its own; and
//! the answers hyper writes for requests it cannot parse (400, 414, 431) never reach the
//! router, so no middleware can give them a body. Both are done here, on the socket:
//!
//! - [`TimedListener`] hands out [`TimedIo`] sockets. While no request is with the router, a
//!   read that waits past the head deadline (`--read-timeout-secs`, counted from when the
//!   server starts waiting for a request) ends the connection: with a 408 JSON answer when
//!   part of a request head had arrived, silently when the connection was idle. While the
//!   router has a request, reads have no deadline here: the handler bounds the body itself
//!   (`--body-timeout-secs`).
//! - Whether the router has a request is known from [`ConnHandle`], which the router gets
//!   as `ConnectInfo` and counts requests in and out on (the `track` middleware).
//! - A response that hyper writes while the router has had no request since the last
//!   response is one of hyper's own error answers (it writes nothing else unprompted): it is
//!   replaced by the same status with a `{"error", "reason"}` JSON body.
//! - On close, the socket first shuts its write side, then reads and drops what the client
//!   still sends (the rest of a refused body) for a moment: closing a socket with unread
//!   data resets the connection, and a reset can destroy the answer before the client reads
//!   it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::http::StatusCode;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use super::stats::ServerStats;

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(1);
/// The most bytes a closing connection reads and drops.
const LINGER_BYTES: usize = 16 << 20;

#[derive(Debug, Default)]
struct Counters {
    /// Requests the router has begun on this connection.
    started: AtomicU64,
    /// Requests the router has finished (answered, or dropped) on this connection.
    finished: AtomicU64,
}

/// One connection's request counters, shared by its socket and (as `ConnectInfo`) the router.
#[derive(Debug, Clone, Default)]
pub struct ConnHandle(Arc<Counters>);

impl ConnHandle {
    /// The router has a request on this connection until the returned guard drops.
    pub fn begin(&self) -> InFlight {
        self.0.started.fetch_add(1, Ordering::AcqRel);
        InFlight(self.0.clone())
    }

    fn started(&self) -> u64 {
        self.0.started.load(Ordering::Acquire)
    }

    fn busy(&self) -> bool {
        let finished = self.0.finished.load(Ordering::Acquire);
        self.0.started.load(Ordering::Acquire) != finished
    }
}

/// A request with the router; dropping it marks the request finished.
pub struct InFlight(Arc<Counters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::AcqRel);
    }
}

/// A TCP listener whose connections are [`TimedIo`].
pub struct TimedListener {
    inner: TcpListener,
    head_timeout: Duration,
    stats: Arc<ServerStats>,
}

impl TimedListener {
    pub fn new(inner: TcpListener, head_timeout: Duration, stats: Arc<ServerStats>) -> Self {
        TimedListener { inner, head_timeout, stats }
    }
}

impl Listener for TimedListener {
    type Io = TimedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => return (TimedIo::new(stream, self.head_timeout, self.stats.clone()), addr),
                // A connection that failed before it was accepted concerns only its client.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) => {}
                // Out of file descriptors and the like: back off rather than spin.
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl Connected<IncomingStream<'_, TimedListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, TimedListener>) -> Self {
        stream.io().conn.clone()
    }
}

/// A server-side TCP connection; see the module docs.
pub struct TimedIo {
    inner: TcpStream,
    conn: ConnHandle,
    stats: Arc<ServerStats>,
    head_timeout: Duration,
    /// The head deadline; meaningful while `armed`.
    deadline: Pin<Box<Sleep>>,
    armed: bool,
    /// The router's request count when this socket last looked.
    seen: u64,
    /// The request count when a response was last written.
    answered: u64,
    /// Bytes of a request head have arrived since the router's last request began.
    head_bytes: bool,
    /// An answer was just written: what is read until the socket runs dry is the rest of the
    /// request's unread body (hyper drains it), not a new head.
    draining: bool,
    /// The head deadline passed: every later read fails.
    timed_out: bool,
    /// Our JSON answer in place of hyper's own error answer, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
    /// While closing: until when, and how much, to read and drop.
    linger: Option<(Pin<Box<Sleep>>, usize)>,
}

impl TimedIo {
    fn new(inner: TcpStream, head_timeout: Duration, stats: Arc<ServerStats>) -> Self {
        TimedIo {
            inner,
            conn: ConnHandle::default(),
            stats,
            head_timeout,
            deadline: Box::pin(tokio::time::sleep(head_timeout)),
            armed: false,
            seen: 0,
            answered: 0,
            head_bytes: false,
            draining: false,
            timed_out: false,
            replacement: None,
            linger: None,
        }
    }

    /// A request reached the router since the last look: the wait for a head starts over.
    fn sync(&mut self) {
        let started = self.conn.started();
        if started != self.seen {
            self.seen = started;
            self.head_bytes = false;
            self.armed = false;
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no complete request head in time")));
        }
        this.sync();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && !this.conn.busy() && !this.draining {
                    this.head_bytes = true;
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if this.conn.busy() {
            // The router has the request: the handler bounds the body read itself.
            return Poll::Pending;
        }
        this.draining = false;
        if !this.armed {
            this.armed = true;
            this.deadline.as_mut().reset(Instant::now() + this.head_timeout);
        }
        if this.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.timed_out = true;
        if this.head_bytes {
            let secs = this.head_timeout.as_secs();
            let answer = raw_response(
                StatusCode::REQUEST_TIMEOUT,
                "header_timeout",
                &format!("the request head was not complete within {secs} s (--read-timeout-secs)"),
            );
            // Best effort: a socket that cannot take a few hundred bytes now gets none.
            let _ = this.inner.try_write(&answer);
            this.stats.error("header_timeout");
            this.stats.observe_request("other", StatusCode::REQUEST_TIMEOUT.as_u16(), this.head_timeout);
        }
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no complete request head in time")))
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.sync();
        if this.replacement.is_none()
            && this.answered == this.seen
            && !this.conn.busy()
            && let Some(status) = automatic_status(buf)
        {
            let (reason, message) = automatic_reason(status);
            this.replacement = Some((raw_response(status, reason, message), 0));
            this.stats.error(reason);
            this.stats.observe_request("other", status.as_u16(), Duration::ZERO);
        }
        if let Some((out, written)) = &mut this.replacement {
            while *written < out.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &out[*written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => *written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // Ours went out in its place: hyper's bytes are dropped.
            return Poll::Ready(Ok(buf.len()));
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        // A `100 Continue` is not the answer: the final one (perhaps a 4xx) is still to come.
        if let Poll::Ready(Ok(n)) = result
            && n > 0
            && !informational(buf)
        {
            this.answered = this.seen;
            // The wait for the next head starts after this answer.
            this.head_bytes = false;
            this.draining = true;
            this.armed = false;
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
        }
        let Some((until, dropped)) = &mut this.linger else { return Poll::Ready(Ok(())) };
        let mut scratch = [0u8; 8192];
        loop {
            let mut chunk = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
                // The client closed (or the connection broke): nothing left to protect.
                Poll::Ready(Ok(())) if chunk.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    *dropped += chunk.filled().len();
                    if *dropped > LINGER_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Pending => break,
            }
        }
        if until.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

/// The status of an HTTP/1 response head at the start of `buf`, when it is an error.
fn automatic_status(buf: &[u8]) -> Option<StatusCode> {
    let rest = buf.strip_prefix(b"HTTP/1.")?;
    if rest.get(1) != Some(&b' ') {
        return None;
    }
    let status = StatusCode::from_bytes(rest.get(2..5)?).ok()?;
    (status.is_client_error() || status.is_server_error()).then_some(status)
}

/// Whether `buf` starts with an informational (1xx) response head.
fn informational(buf: &[u8]) -> bool {
    buf.strip_prefix(b"HTTP/1.").and_then(|rest| rest.get(2)) == Some(&b'1')
}

/// The reason and message for an answer hyper gives on its own.
fn automatic_reason(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            ("headers_too_large", "the request head is too large: too many header fields, or too many bytes")
        }
        StatusCode::URI_TOO_LONG => ("uri_too_long", "the request URI is too long"),
        StatusCode::BAD_REQUEST => ("bad_request", "the request is not valid HTTP/1.1"),
        other => (super::status_reason(other), "the request could not be read"),
    }
}

/// A complete HTTP/1.1 response with the server's JSON error body; it closes the connection.
fn raw_response(status: StatusCode, reason: &str, message: &str) -> Vec<u8> {
    let body = super::error_body(message, reason);
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_error_heads_are_replaced() {
        assert_eq!(
            automatic_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n"),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        assert_eq!(automatic_status(b"HTTP/1.0 400 Bad Request\r\n"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(automatic_status(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(automatic_status(b"HTTP/1.1 100 Continue\r\n"), None);
        assert_eq!(automatic_status(b"{\"error\": \"HTTP/1.1 400\"}"), None);
        assert_eq!(automatic_status(b"HTTP/1.1"), None);
        assert!(informational(b"HTTP/1.1 100 Continue\r\n\r\n"));
        assert!(!informational(b"HTTP/1.1 413 Payload Too Large\r\n"));
        assert!(!informational(b"1 2 3"));
    }

    #[test]
    fn raw_answers_are_json_with_their_length() {
        let raw = String::from_utf8(raw_response(StatusCode::REQUEST_TIMEOUT, "header_timeout", "late \"head\"")).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json, serde_json::json!({ "error": "late \"head\"", "reason": "header_timeout" }));
    }
}
