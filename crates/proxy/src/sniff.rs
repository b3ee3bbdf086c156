//! Reading a connection's first bytes to choose how to handle it (TLS or plaintext, HTTP or
//! TCP), and [`Rewind`], which hands those bytes back to whoever reads the stream next.
//!
//! The bytes are read, not peeked: peeking again after a short read would spin, while reading
//! waits for the client like any other read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request-line starts that make a plaintext connection HTTP/1 (method and space).
const HTTP1_STARTS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Longest prefix any decision needs.
pub(crate) const MAX_SNIFF: usize = H2_PREFACE.len();

/// `Some(true)` for a TLS record header carrying a handshake (0x16 0x03), `Some(false)` for
/// anything else, `None` until there are enough bytes.
pub(crate) fn is_tls(buf: &[u8]) -> Option<bool> {
    match buf {
        [] => None,
        [0x16] => None,
        [0x16, 0x03, ..] => Some(true),
        _ => Some(false),
    }
}

/// `Some(true)` when the bytes start an HTTP/1 request line or the HTTP/2 preface,
/// `Some(false)` when they cannot, `None` while they still might.
pub(crate) fn is_http(buf: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for start in HTTP1_STARTS.iter().copied().chain([H2_PREFACE]) {
        if buf.len() >= start.len() {
            if buf.starts_with(start) {
                return Some(true);
            }
        } else if start.starts_with(buf) {
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(false)
    }
}

/// Reads from `s` into `buf` until `decide` answers or `max` bytes are in; end of stream
/// stops too. The caller bounds the time.
pub(crate) async fn read_until<S, F>(
    s: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
    decide: F,
) -> io::Result<()>
where
    S: AsyncRead + Unpin,
    F: Fn(&[u8]) -> Option<bool>,
{
    let mut chunk = [0u8; MAX_SNIFF];
    while decide(buf).is_none() && buf.len() < max {
        let want = (max - buf.len()).min(chunk.len());
        let n = s.read(&mut chunk[..want]).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// A stream that first yields bytes already read from it.
pub(crate) struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_told_from_plaintext_by_the_record_header() {
        assert_eq!(is_tls(b""), None);
        assert_eq!(is_tls(b"\x16"), None);
        assert_eq!(is_tls(b"\x16\x03\x01"), Some(true));
        assert_eq!(is_tls(b"\x16\x02"), Some(false));
        assert_eq!(is_tls(b"GET /"), Some(false));
    }

    #[test]
    fn http_is_told_from_tcp_by_the_request_line_or_preface() {
        assert_eq!(is_http(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(is_http(b"PATCH /x"), Some(true));
        assert_eq!(is_http(b"P"), None);
        assert_eq!(is_http(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(is_http(H2_PREFACE), Some(true));
        assert_eq!(is_http(b"GETX"), Some(false));
        assert_eq!(is_http(b"\x00\x01hello"), Some(false));
        assert_eq!(is_http(b"get / HTTP/1.1"), Some(false));
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"world")
            .await
            .unwrap();
        drop(a);
        let mut r = Rewind::new(b"hello ".to_vec(), b);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
