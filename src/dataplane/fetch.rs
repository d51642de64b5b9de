//! Fetching content from peers: a minimal HTTP/1.1 client on the shard's runtime, hedged
//! requests, resumption with Range from another peer, and digest verification of every byte.
//!
//! Nothing a peer sends is trusted: the client sees the end of a response only after the bytes
//! hashed to the digest it asked for. On a mismatch the connection is closed short, so the client
//! sees a failed transfer, never a wrong one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::future::{select, Either};
use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use sha2::{Digest as _, Sha256};

use crate::dataplane::http::{PEER_HEADER, PULL_THROUGH_HEADER};
use crate::messages::Provider;
use crate::oci::{ByteRange, Digest};

/// Connecting to a peer, on the cluster network.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Connecting and receiving a response head from a peer.
const HEAD_TIMEOUT: Duration = Duration::from_secs(3);
/// A home node answers once upstream did: connecting, a token, a redirect.
const PULL_THROUGH_HEAD_TIMEOUT: Duration = Duration::from_secs(15);
/// A peer that sends nothing for this long mid-body is given up for another.
const STALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A home node relays upstream, which may pause as long as the upstream thread tolerates.
const PULL_THROUGH_STALL_TIMEOUT: Duration = Duration::from_secs(30);
const BUF_SIZE: usize = 256 * 1024;

/// Why a peer could not serve.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The peer refused the connection or did not accept it in time: it is likely gone.
    #[error("connecting to peer {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    /// The peer did not answer in time.
    #[error("peer {0} timed out")]
    Timeout(SocketAddr),
    /// The peer answered with a status we cannot use (it no longer has the content).
    #[error("peer {0} answered {1}")]
    Status(SocketAddr, u16),
    /// The peer's response was not valid HTTP or did not fit the request.
    #[error("peer {0} sent an invalid response: {1}")]
    Protocol(SocketAddr, &'static str),
    /// Reading from the peer failed.
    #[error("reading from peer {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    /// Every provider failed.
    #[error("no peer could serve the content")]
    Exhausted,
}

/// A response head from a peer, with the connection positioned at its body.
pub struct PeerResponse {
    pub addr: SocketAddr,
    pub stream: TcpStream,
    pub content_length: u64,
    pub content_type: Option<String>,
    pub docker_digest: Option<String>,
    /// For a 206: the first byte and the total size from `Content-Range`.
    pub range_start: u64,
    pub total: u64,
    /// Body bytes that arrived together with the head.
    leftover: Vec<u8>,
    /// How long the body may pause before this peer is given up.
    stall: Duration,
}

/// Sends one request to a peer and reads its response head.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    range_from: Option<u64>,
) -> Result<PeerResponse, FetchError> {
    match monoio::time::timeout(HEAD_TIMEOUT, request_inner(addr, method, target, range_from, "")).await {
        Ok(r) => r.map(|r| r.with_stall(STALL_TIMEOUT)),
        Err(_) => Err(FetchError::Timeout(addr)),
    }
}

/// Asks a digest's home node to serve it, fetching it from upstream if it must. Its answer waits
/// for upstream's, so it gets longer than a peer's to start.
pub async fn request_pull_through(addr: SocketAddr, method: &str, target: &str) -> Result<PeerResponse, FetchError> {
    let extra = format!("{PULL_THROUGH_HEADER}: 1\r\n");
    match monoio::time::timeout(PULL_THROUGH_HEAD_TIMEOUT, request_inner(addr, method, target, None, &extra)).await {
        Ok(r) => r.map(|r| r.with_stall(PULL_THROUGH_STALL_TIMEOUT)),
        Err(_) => Err(FetchError::Timeout(addr)),
    }
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    target: &str,
    range_from: Option<u64>,
    extra: &str,
) -> Result<PeerResponse, FetchError> {
    // A peer that vanished without a reset must not cost the whole head timeout.
    let mut stream = match monoio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect_addr(addr)).await {
        Ok(r) => r.map_err(|e| FetchError::Connect(addr, e))?,
        Err(_) => {
            return Err(FetchError::Connect(addr, std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer")))
        }
    };
    let _ = stream.set_nodelay(true);
    let range = range_from.map(|r| format!("Range: bytes={r}-\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{PEER_HEADER}: 1\r\n{extra}{range}Connection: close\r\n\r\n"
    );
    let (res, _) = stream.write_all(head.into_bytes()).await;
    res.map_err(|e| FetchError::Io(addr, e))?;

    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        // monoio fills an owned Vec from its start: read into a chunk and append.
        let (res, c) = stream.read(chunk).await;
        chunk = c;
        match res {
            Ok(0) => return Err(FetchError::Protocol(addr, "closed before the response head")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(FetchError::Io(addr, e)),
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let used = match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => continue,
            _ => return Err(FetchError::Protocol(addr, "malformed response head")),
        };
        let status = resp.code.unwrap_or(0);
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::to_owned)
        };
        let ok = matches!((range_from, status), (None | Some(0), 200) | (Some(_), 206));
        if !ok {
            return Err(FetchError::Status(addr, status));
        }
        let content_length = header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or(FetchError::Protocol(addr, "no Content-Length"))?;
        let (range_start, total) = if status == 206 {
            parse_content_range(header("content-range").as_deref())
                .ok_or(FetchError::Protocol(addr, "bad Content-Range"))?
        } else {
            (0, content_length)
        };
        let leftover = buf[used..].to_vec();
        return Ok(PeerResponse {
            addr,
            stream,
            content_length,
            content_type: header("content-type"),
            docker_digest: header("docker-content-digest"),
            range_start,
            total,
            leftover,
            stall: STALL_TIMEOUT,
        });
    }
}

/// `bytes a-b/total` → (a, total).
fn parse_content_range(v: Option<&str>) -> Option<(u64, u64)> {
    let rest = v?.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, _) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, total.trim().parse().ok()?))
}

impl PeerResponse {
    fn with_stall(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    /// Reads the next piece of the body into `buf` (cleared first). `Ok(0)` at the end.
    async fn read_chunk(&mut self, mut buf: Vec<u8>) -> (Result<usize, FetchError>, Vec<u8>) {
        buf.clear();
        if !self.leftover.is_empty() {
            buf.extend_from_slice(&self.leftover);
            self.leftover.clear();
            return (Ok(buf.len()), buf);
        }
        match monoio::time::timeout(self.stall, self.stream.read(buf)).await {
            Ok((Ok(n), b)) => (Ok(n), b),
            Ok((Err(e), b)) => (Err(FetchError::Io(self.addr, e)), b),
            Err(_) => (Err(FetchError::Timeout(self.addr)), Vec::with_capacity(BUF_SIZE)),
        }
    }

    /// Reads a whole small body (a manifest), at most `max` bytes.
    pub async fn read_to_end(mut self, max: u64) -> Result<Vec<u8>, FetchError> {
        if self.content_length > max {
            return Err(FetchError::Protocol(self.addr, "body too large"));
        }
        let mut out = Vec::with_capacity(self.content_length as usize);
        let mut buf = Vec::with_capacity(64 * 1024);
        while (out.len() as u64) < self.content_length {
            let (res, b) = self.read_chunk(buf).await;
            buf = b;
            match res? {
                0 => return Err(FetchError::Protocol(self.addr, "body ended early")),
                _ => out.extend_from_slice(&buf),
            }
        }
        out.truncate(self.content_length as usize);
        Ok(out)
    }
}

/// Asks `providers` in turn, starting at `start`, for `target`; when one has not produced a
/// response head after `hedge`, the next is asked too and the first good answer wins.
pub async fn first_response(
    providers: &[Provider],
    start: usize,
    method: &str,
    target: &str,
    range_from: Option<u64>,
    hedge: Duration,
) -> Result<(PeerResponse, usize), FetchError> {
    let n = providers.len();
    let mut i = start;
    let mut tried = 0;
    while tried < n {
        let a = Box::pin(request(providers[i % n].http, method, target, range_from));
        if tried + 1 >= n {
            return a.await.map(|r| (r, i % n)).map_err(|_| FetchError::Exhausted);
        }
        let j = i + 1;
        let b = Box::pin(async move {
            monoio::time::sleep(hedge).await;
            request(providers[j % n].http, method, target, range_from).await
        });
        match select(a, b).await {
            Either::Left((Ok(r), _)) => return Ok((r, i % n)),
            Either::Right((Ok(r), _)) => return Ok((r, j % n)),
            Either::Left((Err(e), b)) => {
                tracing::debug!(error = %e, "peer failed, hedge continues");
                if let Ok(r) = b.await {
                    return Ok((r, j % n));
                }
            }
            Either::Right((Err(e), a)) => {
                tracing::debug!(error = %e, "hedge failed, first peer continues");
                if let Ok(r) = a.await {
                    return Ok((r, i % n));
                }
            }
        }
        i += 2;
        tried += 2;
    }
    Err(FetchError::Exhausted)
}

/// How a relayed body ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Every byte arrived, matched the digest, and reached the client.
    Complete { from_peers: u64, elapsed: Duration },
    /// The client went away.
    ClientGone,
    /// No peer could supply the rest of the body; the client saw a short response.
    Failed,
    /// The bytes did not match the digest; the client saw a short response.
    Mismatch { peer_id: String },
}

/// Streams a blob of `size` bytes from peers to `client`, sending only `window` of it, hashing
/// all of it, and holding back the last piece until the digest checks out. When a peer fails
/// mid-body, the rest is asked from the next provider with a Range request.
#[allow(clippy::too_many_arguments)]
pub async fn relay_blob(
    client: &mut TcpStream,
    mut resp: PeerResponse,
    mut provider: usize,
    providers: &[Provider],
    target: &str,
    digest: &Digest,
    size: u64,
    window: ByteRange,
    hedge: Duration,
) -> RelayOutcome {
    let started = Instant::now();
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let mut spare = Vec::with_capacity(BUF_SIZE);
    // The piece to send next, as (buffer, start, end); written only once the following piece
    // has arrived, or after verification for the last one.
    let mut pending: Option<(Vec<u8>, usize, usize)> = None;
    // Failures in a row, without a byte between them: progress resets it.
    let mut failures = 0;
    // A resumed body may pause as long as the first one could (a home node relaying upstream).
    let stall = resp.stall;
    while offset < size {
        let (res, buf) = resp.read_chunk(spare).await;
        let mut buf = buf;
        let n = match res {
            Ok(n) if n > 0 => n,
            other => {
                if let Err(e) = other {
                    tracing::debug!(error = %e, offset, "peer failed mid-body");
                }
                failures += 1;
                if failures > providers.len() * 2 + 1 {
                    return RelayOutcome::Failed;
                }
                match first_response(providers, provider + 1, "GET", target, Some(offset), hedge).await {
                    Ok((r, p)) if r.range_start == offset && r.total == size => {
                        resp = r.with_stall(stall);
                        provider = p;
                        spare = buf;
                        continue;
                    }
                    _ => return RelayOutcome::Failed,
                }
            }
        };
        failures = 0;
        // A peer that sends past the size is cut off at the size; the digest judges the rest.
        let n = n.min((size - offset) as usize);
        buf.truncate(n);
        hasher.update(&buf);
        let lo = offset.max(window.start);
        let hi = (offset + n as u64).min(window.end + 1);
        let piece = (lo < hi).then(|| ((lo - offset) as usize, (hi - offset) as usize));
        offset += n as u64;
        match piece {
            // The held piece goes out only once a later piece of the window has arrived: the
            // window's last piece waits for the digest even when the blob goes on past it.
            Some((a, b)) => {
                spare = match pending.take() {
                    Some((p, pa, pb)) => match write_slice(client, p, pa, pb).await {
                        Ok(p) => p,
                        Err(()) => return RelayOutcome::ClientGone,
                    },
                    None => Vec::with_capacity(BUF_SIZE),
                };
                pending = Some((buf, a, b));
            }
            None => spare = buf,
        }
    }
    if Digest::from_sha256(hasher.finalize().into()) != *digest {
        return RelayOutcome::Mismatch { peer_id: providers[provider].peer_id.clone() };
    }
    if let Some((p, a, b)) = pending.take() {
        if write_slice(client, p, a, b).await.is_err() {
            return RelayOutcome::ClientGone;
        }
    }
    RelayOutcome::Complete { from_peers: offset, elapsed: started.elapsed() }
}

async fn write_slice(client: &mut TcpStream, buf: Vec<u8>, a: usize, b: usize) -> Result<Vec<u8>, ()> {
    let (res, slice) = client.write_all(buf.slice(a..b)).await;
    match res {
        Ok(_) => Ok(slice.into_inner()),
        Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range(Some("bytes 10-99/100")), Some((10, 100)));
        assert_eq!(parse_content_range(Some("bytes */100")), None);
        assert_eq!(parse_content_range(None), None);
    }
}
