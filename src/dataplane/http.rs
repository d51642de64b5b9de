//! The HTTP/1.1 framing of the data plane: reading one request head with hard limits, writing
//! response heads and OCI error responses. No bodies are ever read: the pull API has none.

use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::oci::{self, OciError};

/// The request line and the header block are each refused past this size (431).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// A client must send a whole request head within this time once it has started one.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this time.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Other,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Other => "OTHER",
        }
    }
}

/// One parsed request head, owning its strings.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub method_name: String,
    pub target: String,
    pub range: Option<String>,
    /// The client asked to close after this response (or spoke HTTP/1.0).
    pub close: bool,
    /// Sent by peerd to peerd: answer from local content only, never ask the network again.
    pub from_peer: bool,
    /// Sent by peerd to the digest's home node: fetch it from upstream if nobody has it.
    pub pull_through: bool,
    /// The request has a body we will not read; the connection cannot be reused.
    pub has_body: bool,
}

pub const PEER_HEADER: &str = "x-peerd-peer";
pub const PULL_THROUGH_HEADER: &str = "x-peerd-pull-through";

/// Why no request could be read.
pub enum ReadError {
    /// The peer closed or went idle between requests: just close.
    Closed,
    /// The head is malformed or too large: answer with this error, then close.
    Bad(OciError),
}

/// Reads one request head from `stream`. `buf` carries bytes already received past the previous
/// request (pipelining) and keeps the ones past this one.
pub async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Request, ReadError> {
    let mut started = !buf.is_empty();
    loop {
        if !buf.is_empty() {
            match parse_head(buf) {
                Ok(Some((req, used))) => {
                    buf.drain(..used);
                    return Ok(req);
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Bad(e)),
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Err(ReadError::Bad(OciError::HeadersTooLarge));
            }
        }
        let timeout = if started { HEAD_TIMEOUT } else { IDLE_TIMEOUT };
        // monoio fills an owned Vec from its start, so each read goes into a fresh chunk that is
        // appended: a head may arrive in any number of pieces.
        let read = monoio::time::timeout(timeout, stream.read(Vec::with_capacity(8192))).await;
        let (res, chunk) = match read {
            Ok(r) => r,
            Err(_) => return Err(ReadError::Closed),
        };
        match res {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                started = true;
            }
        }
    }
}

/// Parses a complete head from `buf`, or `None` if more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, OciError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(OciError::HeadersTooLarge),
        Err(_) => return Err(OciError::BadRequest("malformed HTTP request")),
    };
    if used > MAX_HEAD_BYTES {
        return Err(OciError::HeadersTooLarge);
    }
    let method_name = req.method.unwrap_or("").to_owned();
    let method = match method_name.as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("").to_owned();
    let mut close = req.version == Some(0);
    let mut range = None;
    let mut from_peer = false;
    let mut pull_through = false;
    let mut has_body = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("range") {
            range = std::str::from_utf8(h.value).ok().map(str::to_owned);
        } else if name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case(PEER_HEADER) {
            from_peer = true;
        } else if name.eq_ignore_ascii_case(PULL_THROUGH_HEADER) {
            pull_through = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            has_body |= h.value != b"0";
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        }
    }
    Ok(Some((Request { method, method_name, target, range, close, from_peer, pull_through, has_body }, used)))
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Builds a response head. `headers` are written as given.
pub fn head(status: u16, content_length: u64, headers: &[(&str, &str)], close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    out.extend_from_slice(format!("Content-Length: {content_length}\r\n").as_bytes());
    out.extend_from_slice(b"Docker-Distribution-API-Version: registry/2.0\r\n");
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// An OCI error response (head, and body unless HEAD).
pub fn error_response(err: &OciError, method: Method, close: bool) -> Vec<u8> {
    let body = oci::error_body(err.code(), &err.to_string());
    let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    let cr;
    if let OciError::RangeNotSatisfiable { size } = err {
        cr = format!("bytes */{size}");
        headers.push(("Content-Range", &cr));
    }
    if err.status() == 405 {
        headers.push(("Allow", "GET, HEAD"));
    }
    let mut out = head(err.status(), body.len() as u64, &headers, close);
    if method != Method::Head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

pub async fn write_all(stream: &mut TcpStream, bytes: Vec<u8>) -> std::io::Result<()> {
    let (res, _) = stream.write_all(bytes).await;
    res.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_pull_request() {
        let raw = b"GET /v2/a/blobs/x HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\nX-Peerd-Peer: 1\r\n\r\nGET /next";
        let (req, used) = parse_head(raw).unwrap().unwrap();
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.target, "/v2/a/blobs/x");
        assert_eq!(req.range.as_deref(), Some("bytes=0-1"));
        assert!(req.from_peer && !req.close);
        assert_eq!(&raw[used..], b"GET /next");
    }

    #[test]
    fn partial_and_malformed_heads() {
        assert!(parse_head(b"GET /v2/ HTTP/1.1\r\nHost:").unwrap().is_none());
        assert!(parse_head(b"\x00\x01garbage\r\n\r\n").is_err());
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_head(raw.as_bytes()).err(), Some(OciError::HeadersTooLarge));
        let (req, _) = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(req.close);
    }

    #[test]
    fn error_responses_carry_an_oci_body() {
        let out = error_response(&OciError::NotFound, Method::Get, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.ends_with(r#"{"errors":[{"code":"NOT_FOUND","detail":null,"message":"not found"}]}"#), "{text}");
        let head_only = error_response(&OciError::NotFound, Method::Head, false);
        assert!(head_only.ends_with(b"\r\n\r\n"));
    }
}
