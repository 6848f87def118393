//! Idle HTTP/1.1 keep-alive connections that hold no HTTP buffers.
//!
//! A hyper HTTP/1.1 connection keeps an 8 KiB read buffer, an 8 KiB write
//! buffer and a cached header map for as long as it lives, so 10,000 idle
//! keep-alive clients would cost well over 200 MiB. Instead, a plain
//! HTTP/1.1 connection is served by a hyper connection only while it has
//! work. When nothing has arrived for [`PARK_AFTER`] between two
//! exchanges, [`ParkIo`] tells hyper the client closed its side: hyper
//! ends its connection cleanly (flushing everything it wrote, writing
//! nothing more) and hands the socket back, with any bytes it had already
//! read. The accept task then waits on the bare socket and starts a new
//! hyper connection when the client sends again; the client sees one
//! ordinary keep-alive connection.
//!
//! The end-of-stream is only ever reported between two exchanges, which
//! [`Activity`] tracks from outside hyper: the last request's body was read
//! to its end, hyper has dropped the last response's body (written, or
//! abandoned with the connection), and every byte written was flushed. It
//! is never reported once a response was `101 Switching Protocols`: the
//! socket is then a tunnel, not HTTP.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::gateway::Gateway;
use crate::proxy::{Body, BoxError, ClientConn};

/// How long a keep-alive connection may sit idle between two requests
/// before it gives its HTTP buffers back. Short enough that idle clients
/// cost little, long enough that a busy connection (the next request
/// arrives within milliseconds) is never re-set-up per request.
pub(super) const PARK_AFTER: Duration = Duration::from_millis(250);

/// The last request's body was read to its end (or it had none).
const REQUEST_DONE: u64 = 1;
/// hyper dropped the last response's body.
const RESPONSE_DONE: u64 = 2;
/// A `101` was answered: the connection is a tunnel from now on.
const TUNNEL: u64 = 4;
/// The generation (one per request) lives above the flag bits.
const GEN_SHIFT: u32 = 8;

/// Where one connection's current exchange stands. Shared by the IO, the
/// service and the bodies of one connection; the bodies may be polled or
/// dropped on other tasks (the upstream client's), so each carries the
/// generation of its request and only ever marks its own.
#[derive(Debug)]
pub(super) struct Activity(AtomicU64);

impl Default for Activity {
    /// A new connection is between two exchanges: awaiting its first head.
    fn default() -> Activity {
        Activity(AtomicU64::new(REQUEST_DONE | RESPONSE_DONE))
    }
}

impl Activity {
    /// A request head was handed to the service; returns its generation.
    fn request_started(&self, body_done: bool) -> u64 {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let gen = (cur >> GEN_SHIFT).wrapping_add(1);
            let next =
                (gen << GEN_SHIFT) | (cur & TUNNEL) | if body_done { REQUEST_DONE } else { 0 };
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return gen,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Mark `flag` for the request of generation `gen`, if it is still the
    /// current one.
    fn mark(&self, gen: u64, flag: u64) {
        let mut cur = self.0.load(Ordering::Acquire);
        while cur >> GEN_SHIFT == gen && cur & flag == 0 {
            match self
                .0
                .compare_exchange_weak(cur, cur | flag, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    /// How many requests this connection has had.
    pub(super) fn generation(&self) -> u64 {
        self.0.load(Ordering::Acquire) >> GEN_SHIFT
    }

    fn tunnel(&self) {
        self.0.fetch_or(TUNNEL, Ordering::AcqRel);
    }

    /// The current response is out (hyper dropped its body) but the
    /// request's body is not finished; never on a tunnel.
    fn draining(&self) -> bool {
        let cur = self.0.load(Ordering::Acquire);
        cur & (REQUEST_DONE | RESPONSE_DONE | TUNNEL) == RESPONSE_DONE
    }

    /// Between two exchanges: safe to end hyper's connection.
    fn idle(&self) -> bool {
        let cur = self.0.load(Ordering::Acquire);
        cur & (REQUEST_DONE | RESPONSE_DONE | TUNNEL) == REQUEST_DONE | RESPONSE_DONE
    }
}

/// The client socket as hyper sees it on a plain HTTP/1.1 connection:
/// bytes hyper had read ahead come first; an idle period between two
/// exchanges reads as end-of-stream (see the module docs).
pub(super) struct ParkIo {
    stream: TcpStream,
    /// Bytes a previous hyper connection had read but not used.
    prefix: Bytes,
    activity: Arc<Activity>,
    /// Written bytes not yet flushed.
    dirty: bool,
    /// When the current idle period ends in a park (set on the first
    /// empty read after an exchange, cleared by any byte read).
    park_at: Option<Instant>,
    /// How long a request head may take (`listen.header_read_timeout`).
    head_timeout: Duration,
    /// By when the head that follows request generation `.0` must be
    /// complete: set on the first empty read after that exchange (as
    /// hyper's own timer starts when it begins to read a head).
    head_by: Option<(u64, Instant)>,
    /// When the connection is closed if nothing more arrives, once the
    /// response is out but the request's body is not finished (refused
    /// unread, which hyper then drains; or still uploading after an
    /// early answer): set on the first empty read in that state, cleared
    /// by any byte read.
    drain_by: Option<Instant>,
    /// Wakes hyper at `park_at`, `head_by` or `drain_by`, whichever is
    /// first; armed at most once per [`PARK_AFTER`] on a busy connection.
    timer: Option<Pin<Box<Sleep>>>,
    parked: bool,
}

impl ParkIo {
    pub(super) fn new(
        stream: TcpStream,
        activity: Arc<Activity>,
        head_timeout: Duration,
    ) -> ParkIo {
        ParkIo {
            stream,
            prefix: Bytes::new(),
            activity,
            dirty: false,
            park_at: None,
            head_timeout,
            head_by: None,
            drain_by: None,
            timer: None,
            parked: false,
        }
    }

    /// Whether hyper's connection ended because this IO reported an idle
    /// end-of-stream (rather than the client closing, or an error).
    pub(super) fn parked(&self) -> bool {
        self.parked
    }

    /// When the head being awaited must be complete, if it has begun to
    /// be awaited.
    pub(super) fn head_deadline(&self) -> Option<Instant> {
        self.head_by
            .filter(|(gen, _)| *gen == self.activity.generation())
            .map(|(_, by)| by)
    }

    /// Ready the socket for the next hyper connection, with the bytes the
    /// previous one had read but not used (copied: `unread` shares hyper's
    /// whole read buffer). Part of a head carried over keeps its
    /// deadline; with nothing carried over, the next head's starts anew.
    pub(super) fn resume(&mut self, unread: Bytes) {
        self.prefix = if unread.is_empty() {
            self.head_by = None;
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&unread)
        };
        self.parked = false;
        self.park_at = None;
        self.drain_by = None;
        self.timer = None;
    }

    pub(super) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The socket had nothing to read between two exchanges: fail if the
    /// next head is overdue, report end-of-stream if the connection has
    /// been idle long enough, else arrange to be polled again when one of
    /// the two will be due.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.dirty {
            return Poll::Pending;
        }
        if !self.activity.idle() {
            return self.poll_draining(cx);
        }
        let now = Instant::now();
        let gen = self.activity.generation();
        let head_by = match self.head_by {
            Some((g, by)) if g == gen => by,
            _ => {
                let by = now + self.head_timeout;
                self.head_by = Some((gen, by));
                by
            }
        };
        let park_at = *self.park_at.get_or_insert(now + PARK_AFTER);
        if let Some(due) = Self::due(now, head_by, park_at) {
            return Poll::Ready(due);
        }
        self.arm(cx, park_at.min(head_by));
        Poll::Pending
    }

    /// Mid-exchange: nothing is due until the response is out. After it,
    /// a request body that is not finished must keep arriving: after
    /// `head_timeout` without a byte the connection ends (hyper's own
    /// header timer used to end such a connection once it had drained
    /// the body; a body refused unread would otherwise keep an idle
    /// connection open for good, as it never counts as idle).
    fn poll_draining(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.activity.draining() {
            return Poll::Pending;
        }
        let now = Instant::now();
        let by = *self.drain_by.get_or_insert(now + self.head_timeout);
        if now >= by {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request body not finished within listen.header_read_timeout of the response",
            )));
        }
        self.arm(cx, by);
        Poll::Pending
    }

    /// Have the task woken at `at` at the latest (the caller has checked
    /// that nothing is due before it).
    fn arm(&mut self, cx: &mut Context<'_>, at: Instant) {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        // A timer still armed from an earlier idle period fires early and
        // is moved on then: no timer update per request.
        if timer.is_elapsed() || timer.deadline() > at {
            timer.as_mut().reset(at);
        }
        if timer.as_mut().poll(cx).is_ready() {
            // `at` passed since the caller looked: be polled again, and
            // find it due.
            cx.waker().wake_by_ref();
        }
    }

    /// What is due at `now`: the head's deadline passed (an error that
    /// ends the connection, as hyper's own header timeout does), or the
    /// park (end-of-stream).
    fn due(now: Instant, head_by: Instant, park_at: Instant) -> Option<io::Result<()>> {
        if now >= head_by {
            Some(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not complete within listen.header_read_timeout",
            )))
        } else if now >= park_at {
            Some(Ok(()))
        } else {
            None
        }
    }
}

impl AsyncRead for ParkIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.parked {
            return Poll::Ready(Ok(()));
        }
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.park_at = None;
                    this.drain_by = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_idle(cx) {
                Poll::Ready(Ok(())) => {
                    this.parked = true;
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for ParkIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.dirty |= !buf.is_empty();
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.dirty |= bufs.iter().any(|b| !b.is_empty());
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    /// hyper flushes the socket only once its own write buffer is empty,
    /// so a completed flush means every byte written has left.
    ///
    /// The flush that ends an exchange also arms the timer that parks the
    /// connection or ends an overdue head: hyper, having last seen the
    /// socket blocked, reads again only once woken.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = res {
            if std::mem::take(&mut self.dirty) && self.poll_idle(cx).is_ready() {
                // Already due: have hyper read, and find out.
                cx.waker().wake_by_ref();
            }
        }
        res
    }

    /// After a park hyper shuts its connection down; the socket stays open.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.parked {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The gateway as a hyper service on a parkable connection: each request
/// and response tells the connection's [`Activity`] where it stands.
#[derive(Clone)]
pub(super) struct ParkedService {
    pub(super) gateway: Arc<Gateway>,
    pub(super) conn: ClientConn,
    pub(super) activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ParkedService {
    type Response = Response<TrackedResponse>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<TrackedResponse>, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let body_done = http_body::Body::is_end_stream(req.body());
        let gen = self.activity.request_started(body_done);
        let req = req.map(|inner| TrackedRequest {
            inner,
            track: (!body_done).then(|| (self.activity.clone(), gen)),
        });
        let (gateway, conn, activity) = (self.gateway.clone(), self.conn, self.activity.clone());
        Box::pin(async move {
            let res = super::handle_catching(gateway, req, conn).await;
            if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                activity.tunnel();
            }
            Ok(res.map(|inner| TrackedResponse {
                inner,
                activity,
                gen,
            }))
        })
    }
}

/// A request body that marks its request done when it reaches its end.
pub(super) struct TrackedRequest {
    inner: Incoming,
    track: Option<(Arc<Activity>, u64)>,
}

impl TrackedRequest {
    fn check_end(&mut self) {
        if http_body::Body::is_end_stream(&self.inner) {
            if let Some((activity, gen)) = self.track.take() {
                activity.mark(gen, REQUEST_DONE);
            }
        }
    }
}

impl http_body::Body for TrackedRequest {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(None) => {
                if let Some((activity, gen)) = self.track.take() {
                    activity.mark(gen, REQUEST_DONE);
                }
            }
            Poll::Ready(Some(Ok(_))) => self.check_end(),
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that marks its response done when hyper drops it.
pub(super) struct TrackedResponse {
    inner: Body,
    activity: Arc<Activity>,
    gen: u64,
}

impl Drop for TrackedResponse {
    fn drop(&mut self) {
        self.activity.mark(self.gen, RESPONSE_DONE);
    }
}

impl http_body::Body for TrackedResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // Only a finished exchange of the current request counts as idle; a
    // late mark from an earlier request's body must not.
    fn idle_needs_both_ends_of_the_current_exchange() {
        let a = Activity::default();
        assert!(a.idle(), "a new connection awaits its first head");
        let g1 = a.request_started(false);
        assert!(!a.idle());
        assert!(!a.draining(), "no response yet");
        a.mark(g1, RESPONSE_DONE);
        assert!(!a.idle(), "request body still being read");
        assert!(a.draining(), "answered, body still coming");
        a.mark(g1, REQUEST_DONE);
        assert!(a.idle());
        assert!(!a.draining());
        let g2 = a.request_started(true);
        assert!(!a.idle(), "response of the new request not done");
        a.mark(g1, RESPONSE_DONE);
        assert!(!a.idle(), "a stale mark counted");
        a.mark(g2, RESPONSE_DONE);
        assert!(a.idle());
        a.tunnel();
        assert!(!a.idle(), "a tunnel is never parked");
        assert!(!a.draining(), "nor timed out as a body");
        let g3 = a.request_started(false);
        a.mark(g3, RESPONSE_DONE);
        assert!(!a.draining(), "a tunnel's reads are never a body");
        a.request_started(true);
        assert!(!a.idle());
    }
}
