//! Connection hygiene below HTTP: a cap on concurrent connections and a header-read timeout,
//! as an acceptor that wraps another (poem has neither; its `Server::idle_timeout` gives the
//! idle timeout).
//!
//! - The cap: [`Guarded::accept`] takes a permit before it accepts. At the cap it stops
//!   accepting, so new connections wait in the kernel's listen backlog (they hold no file of
//!   this process) until a served connection closes and frees its permit.
//! - The header-read timeout: each connection watches the bytes it reads. From the moment it
//!   is accepted, and again from the first byte of each following request, the client must
//!   finish the request head (the blank line `\r\n\r\n`) within the timeout, else the next read
//!   fails with `TimedOut` and the connection is closed. Once the head is in, nothing is timed
//!   here until the server has answered (an interim `1xx` does not count); a keep-alive
//!   connection waiting for its next request is left to the idle timeout. HTTP/2 (prior
//!   knowledge) connections are not timed here.
//! - Clients that leave: a read that finds the end of the stream (the client closed its side)
//!   cancels the connection's token, which a request waiting on it can find with
//!   [`client_gone`] (hyper itself does not drop a request whose client closed the connection
//!   once it has seen the end of the stream while reading the request).
//! - Problem bodies for requests the framework could not parse: hyper answers a bad request line,
//!   bad header syntax or framing (`Content-Length`, `Transfer-Encoding`), an overlong URI and an
//!   oversized head itself, with an empty `400`/`414`/`431`, before any endpoint sees the request.
//!   Every answer of ours carries a `Content-Type` (the front turns every error into a problem),
//!   so a `400`/`414`/`431` head without one, written as the first answer to a request, is
//!   hyper's: it is replaced by the same status with an RFC 9457 problem and `Connection: close`,
//!   and the connection reads as ended afterwards (hyper closes it after such an answer anyway).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use poem::http::StatusCode;
use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use poem_openapi::types::ToJSON;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::problem::{PROBLEM_CONTENT_TYPE, Problem};
use crate::telemetry;

/// The HTTP/2 connection preface's start.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// The connections this process serves under [`Guarded`], by (local, peer) address (unique
/// among open TCP connections), each with the token its end of stream cancels.
static CLIENTS: LazyLock<Mutex<HashMap<ConnKey, (u64, CancellationToken)>>> =
    LazyLock::new(Mutex::default);

/// A connection's (local, peer) addresses.
type ConnKey = (SocketAddr, SocketAddr);

/// Numbers the entries of [`CLIENTS`], so that a connection removes only its own.
static SERIAL: AtomicU64 = AtomicU64::new(0);

/// The token that is cancelled once the client of the connection with these addresses has closed
/// it (its side at least); `None` when the request did not arrive over a connection served
/// under [`Guarded`] (an in-process test client, say).
pub(crate) fn client_gone(local: &LocalAddr, remote: &RemoteAddr) -> Option<CancellationToken> {
    let key = (*local.as_socket_addr()?, *remote.as_socket_addr()?);
    CLIENTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
        .map(|(_, gone)| gone.clone())
}

/// A connection's entry in [`CLIENTS`], removed when the connection is dropped.
struct Registered {
    key: ConnKey,
    serial: u64,
    gone: CancellationToken,
}

impl Registered {
    fn new(local: &LocalAddr, remote: &RemoteAddr) -> Option<Registered> {
        let key = (*local.as_socket_addr()?, *remote.as_socket_addr()?);
        let gone = CancellationToken::new();
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        CLIENTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (serial, gone.clone()));
        Some(Registered { key, serial, gone })
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut clients = CLIENTS.lock().unwrap_or_else(PoisonError::into_inner);
        // Only our own entry (a later connection cannot have our addresses while we are open).
        if clients
            .get(&self.key)
            .is_some_and(|(serial, _)| *serial == self.serial)
        {
            clients.remove(&self.key);
        }
    }
}

/// Wraps an acceptor with the connection cap and the header-read timeout.
pub(crate) struct Guarded<A> {
    inner: A,
    permits: Arc<Semaphore>,
    header_read_timeout: Duration,
}

impl<A> Guarded<A> {
    /// At most `max_connections` (at least 1) connections at once; each must send its request
    /// heads within `header_read_timeout`.
    pub(crate) fn new(inner: A, max_connections: usize, header_read_timeout: Duration) -> Self {
        Guarded {
            inner,
            permits: Arc::new(Semaphore::new(
                max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            header_read_timeout,
        }
    }
}

impl<A: Acceptor> Acceptor for Guarded<A> {
    type Io = GuardedIo<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        // Cancel-safe: a dropped wait takes nothing; a permit taken and dropped with an accept
        // that did not finish goes back.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (io, local, remote, scheme) = self.inner.accept().await?;
        let io = GuardedIo {
            client: Registered::new(&local, &remote),
            inner: io,
            _permit: permit,
            timeout: self.header_read_timeout,
            state: State::Head,
            deadline: Box::pin(tokio::time::sleep(self.header_read_timeout)),
            tail: Vec::with_capacity(4),
            seen: Vec::new(),
            replacement: None,
        };
        Ok((io, local, remote, scheme))
    }
}

/// Where a connection is in its request/response cycle, as far as its bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head: the deadline runs.
    Head,
    /// The head is in; the server has not answered yet.
    Request,
    /// The server answered; the next byte read starts a new head.
    Answered,
    /// Not timed (HTTP/2).
    Off,
}

/// A connection under [`Guarded`]: holds its permit until dropped.
pub(crate) struct GuardedIo<T> {
    inner: T,
    /// This connection's entry in [`CLIENTS`] (`None` when it has no socket addresses).
    client: Option<Registered>,
    _permit: OwnedSemaphorePermit,
    timeout: Duration,
    state: State,
    deadline: Pin<Box<Sleep>>,
    /// The last (up to 3) bytes of the head so far, to find a `\r\n\r\n` split across reads.
    tail: Vec<u8>,
    /// The first bytes of the connection, until they tell whether it is HTTP/2.
    seen: Vec<u8>,
    /// The problem answer written instead of hyper's empty one, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<T> GuardedIo<T> {
    /// Follows the bytes just read.
    fn observe(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.state == State::Answered {
            self.state = State::Head;
            self.tail.clear();
            self.deadline.as_mut().reset(Instant::now() + self.timeout);
        }
        if self.state != State::Head {
            return;
        }
        if self.seen.len() < H2_PREFACE.len() {
            let take = (H2_PREFACE.len() - self.seen.len()).min(bytes.len());
            self.seen.extend_from_slice(&bytes[..take]);
            if self.seen.len() == H2_PREFACE.len() && self.seen == H2_PREFACE {
                self.state = State::Off;
                return;
            }
        }
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(bytes);
        if window.windows(4).any(|w| w == b"\r\n\r\n") {
            self.state = State::Request;
            return;
        }
        window.drain(..window.len().saturating_sub(3));
        self.tail = window;
    }

    /// Follows the bytes about to be written: an answer (not an interim `1xx`) ends the request.
    fn answered(&mut self, bytes: &[u8]) {
        if self.state == State::Off || bytes.is_empty() {
            return;
        }
        if bytes.starts_with(b"HTTP/1.1 1") || bytes.starts_with(b"HTTP/1.0 1") {
            return;
        }
        self.state = State::Answered;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replacement.is_some() {
            // The connection ends with the problem answer: nothing more is read.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if room && buf.filled().len() == before {
                    // The end of the stream: the client closed the connection (its side).
                    if let Some(client) = &this.client {
                        client.gone.cancel();
                    }
                }
                this.observe(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                if this.state == State::Head && this.deadline.as_mut().poll(cx).is_ready() {
                    tracing::debug!(
                        "closing a connection that did not send its request head in time"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not received within the header-read timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> GuardedIo<T> {
    /// Starts the replacement when `bytes` is hyper's empty answer to a request it could not
    /// parse (only the first write of an answer can be its head).
    fn check_unparsed(&mut self, bytes: &[u8]) {
        if self.replacement.is_none()
            && matches!(self.state, State::Head | State::Request)
            && let Some((status, answer)) = unparsed_answer(bytes)
        {
            tracing::debug!(status, "answered a request that could not be parsed");
            telemetry::unparsed_request(status);
            self.state = State::Answered;
            self.replacement = Some((answer, 0));
        }
    }

    /// Writes the replacement answer; the `swallowed` bytes hyper offered count as written once
    /// it is out (hyper's answer, and anything after it, never reach the socket).
    fn poll_replacement(
        &mut self,
        cx: &mut Context<'_>,
        swallowed: usize,
    ) -> Poll<io::Result<usize>> {
        let Some((answer, written)) = &mut self.replacement else {
            return Poll::Ready(Ok(0));
        };
        while *written < answer.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(swallowed))
    }
}

/// When `bytes` starts with hyper's own answer to an unparsable request (status 400, 414 or 431,
/// a complete head without `Content-Type`), that status and the problem answer to send instead.
fn unparsed_answer(bytes: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    let detail = match status {
        400 => {
            "the request is not HTTP/1.1 the server can parse (its request line, the syntax of a \
             header, or its framing: Content-Length, Transfer-Encoding); the connection is closed"
        }
        414 => "the request line is longer than the server reads; the connection is closed",
        431 => {
            "the request head (request line and headers) is larger than the server reads; the \
             connection is closed"
        }
        _ => return None,
    };
    if lines.any(|line| {
        line.split_once(':')
            .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("content-type"))
    }) {
        return None;
    }
    let status_code = StatusCode::from_u16(status).ok()?;
    let body = Problem::from_status(status_code, detail)
        .to_json()
        .map(|value| value.to_string())
        .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {PROBLEM_CONTENT_TYPE}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        status_code.canonical_reason().unwrap_or("Error"),
        body.len()
    );
    Some((status, answer.into_bytes()))
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.check_unparsed(buf);
        if this.replacement.is_some() {
            return this.poll_replacement(cx, buf.len());
        }
        this.answered(buf);
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.check_unparsed(first);
            if this.replacement.is_some() {
                return this.poll_replacement(cx, bufs.iter().map(|b| b.len()).sum());
            }
            this.answered(first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> GuardedIo<()> {
        GuardedIo {
            inner: (),
            client: None,
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            timeout: Duration::from_secs(1),
            state: State::Head,
            deadline: Box::pin(tokio::time::sleep(Duration::from_secs(1))),
            tail: Vec::new(),
            seen: Vec::new(),
            replacement: None,
        }
    }

    #[tokio::test]
    async fn a_head_ends_at_the_blank_line_even_split_across_reads() {
        for split in 1..20 {
            let head = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
            let mut io = io();
            for chunk in head.chunks(split) {
                assert_eq!(io.state, State::Head, "{split}");
                io.observe(chunk);
            }
            assert_eq!(io.state, State::Request, "{split}");
        }
    }

    #[tokio::test]
    async fn the_next_request_restarts_the_head_and_interim_answers_do_not_count() {
        let mut io = io();
        io.observe(b"POST /v1/jobs HTTP/1.1\r\nExpect: 100-continue\r\n\r\n");
        io.answered(b"HTTP/1.1 100 Continue\r\n\r\n");
        io.observe(b"{\"a\":1}");
        assert_eq!(io.state, State::Request);
        io.answered(b"HTTP/1.1 201 Created\r\n");
        assert_eq!(io.state, State::Answered);
        io.observe(b"GET /health");
        assert_eq!(io.state, State::Head);
        io.observe(b" HTTP/1.1\r\n\r\n");
        assert_eq!(io.state, State::Request);
    }

    #[test]
    fn only_hypers_empty_answers_to_unparsed_requests_are_replaced() {
        let hyper =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let (status, answer) = unparsed_answer(hyper).expect("replaced");
        assert_eq!(status, 431);
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{head}"
        );
        assert!(
            head.contains("content-type: application/problem+json"),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["type"], crate::problem::types::HEADERS_TOO_LARGE);
        assert_eq!(problem["status"], 431);
        for status in ["400 Bad Request", "414 URI Too Long"] {
            let head = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            assert!(unparsed_answer(head.as_bytes()).is_some(), "{status}");
        }
        // Our own answers carry a content type; other statuses and partial heads are left alone.
        for kept in [
            &b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/problem+json\r\ncontent-length: 2\r\n\r\n{}"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"{\"HTTP/1.1 400 \"}",
        ] {
            assert!(unparsed_answer(kept).is_none(), "{}", String::from_utf8_lossy(kept));
        }
    }

    #[tokio::test]
    async fn http2_is_not_timed() {
        let mut io = io();
        io.observe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(io.state, State::Off);
    }
}
