//! The body type on both sides of the gateway, and bounded reading of the
//! few bodies the gateway itself consumes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::Body as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};

/// Errors crossing body boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the gateway: streamed, never buffered.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body made of one buffer (gateway-generated responses).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Why a body could not be read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("body unreadable")]
    Unreadable,
}

/// Read a whole body of at most `max` bytes.
pub fn read_limited(body: Body, max: usize) -> ReadLimited {
    ReadLimited {
        body: Limited::new(body, max),
        max,
        buf: BytesMut::new(),
    }
}

/// The future of [`read_limited`]. A hand-written future rather than
/// `Limited::collect()`: with `Collect`'s body projection inside a
/// caller's async block, proving that future `Send` trips a rustc
/// limitation (higher-ranked lifetimes in `dyn Error + '_`).
pub struct ReadLimited {
    body: Limited<Body>,
    max: usize,
    buf: BytesMut,
}

impl Future for ReadLimited {
    type Output = Result<Bytes, BodyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(self.buf.split().freeze())),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        self.buf.extend_from_slice(data);
                    }
                }
                Poll::Ready(Some(Err(e))) if e.is::<LengthLimitError>() => {
                    return Poll::Ready(Err(BodyError::TooLarge(self.max)))
                }
                Poll::Ready(Some(Err(_))) => return Poll::Ready(Err(BodyError::Unreadable)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    // The limit is exact: `max` bytes are read, one more is refused.
    async fn limit_is_exact() {
        let ok = read_limited(full(vec![b'a'; 16]), 16).await;
        assert_eq!(ok.map(|b| b.len()), Ok(16));
        let big = read_limited(full(vec![b'a'; 17]), 16).await;
        assert_eq!(big, Err(BodyError::TooLarge(16)));
    }
}
