//! Raw HTTP/1.1 over a socket, for the checks a client library would hide:
//! exact heads, framing, interim responses, when the peer closes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads bytes into `buf` until it contains `\r\n\r\n`; returns the head's
/// length (including the blank line). Panics on EOF or after 10 s.
pub async fn read_until_blank_line<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> usize {
    let read = async {
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = r.read(&mut chunk).await.expect("read a response head");
            assert!(
                n > 0,
                "connection closed before a full head; got {:?}",
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response head within 10 s")
}

/// Parses a response head: the status and lower-cased headers.
pub fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// Reads one response (Content-Length, chunked, or until close) from a
/// keep-alive connection. 1xx interim responses are skipped.
pub async fn read_response<R: AsyncRead + Unpin>(r: &mut R) -> RawResponse {
    let mut buf = Vec::new();
    loop {
        let head_len = read_until_blank_line(r, &mut buf).await;
        let (status, headers) = parse_head(&buf[..head_len]);
        buf.drain(..head_len);
        if (100..200).contains(&status) {
            continue;
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let body = if let Some(len) = header("content-length") {
            let len: usize = len.parse().expect("numeric content-length");
            while buf.len() < len {
                read_more(r, &mut buf).await;
            }
            buf.truncate(len);
            buf
        } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            read_chunked(r, buf).await
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut buf)).await;
            buf
        };
        return RawResponse {
            status,
            headers,
            body,
        };
    }
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut chunk))
        .await
        .expect("more body within 10 s")
        .expect("read a body");
    assert!(n > 0, "connection closed in the middle of a body");
    buf.extend_from_slice(&chunk[..n]);
}

async fn read_chunked<R: AsyncRead + Unpin>(r: &mut R, mut buf: Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            read_more(r, &mut buf).await;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (none expected) and the final CRLF.
            while !buf.windows(2).any(|w| w == b"\r\n") {
                read_more(r, &mut buf).await;
            }
            return body;
        }
        while buf.len() < size + 2 {
            read_more(r, &mut buf).await;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// Sends `request` (raw bytes) on a new connection and reads one response.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("send the request");
    read_response(&mut s).await
}

/// Waits until the peer closes `s` (a read returns 0 or fails); returns
/// how long that took and what arrived before it.
pub async fn wait_closed(s: &mut TcpStream, deadline: Duration) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or_else(|_| panic!("the connection was still open after {deadline:?}"));
    (start.elapsed(), got)
}
