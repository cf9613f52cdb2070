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

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The HTTP/2 connection preface's start.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

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
            inner: io,
            _permit: permit,
            timeout: self.header_read_timeout,
            state: State::Head,
            deadline: Box::pin(tokio::time::sleep(self.header_read_timeout)),
            tail: Vec::with_capacity(4),
            seen: Vec::new(),
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
    _permit: OwnedSemaphorePermit,
    timeout: Duration,
    state: State,
    deadline: Pin<Box<Sleep>>,
    /// The last (up to 3) bytes of the head so far, to find a `\r\n\r\n` split across reads.
    tail: Vec<u8>,
    /// The first bytes of the connection, until they tell whether it is HTTP/2.
    seen: Vec<u8>,
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
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
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

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
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
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            timeout: Duration::from_secs(1),
            state: State::Head,
            deadline: Box::pin(tokio::time::sleep(Duration::from_secs(1))),
            tail: Vec::new(),
            seen: Vec::new(),
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

    #[tokio::test]
    async fn http2_is_not_timed() {
        let mut io = io();
        io.observe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(io.state, State::Off);
    }
}
