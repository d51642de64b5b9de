//! The request handlers of the pull API: local content first, then peers, else a 404 that sends
//! containerd to its next host. Data flows one way: parse → local store → lookup → fetch →
//! verify → respond.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use super::fetch::{self, FetchError, PeerResponse, RelayOutcome};
use super::http::{self, Method, Request};
use super::send;
use super::Shard;
use crate::cache::{Begin, State, Transfer};
use crate::messages::ControlRequest;
use crate::metrics::{FromLabels, Handler, OpLabels, RequestLabels, Source};
use crate::oci::{self, ByteRange, Digest, ManifestDoc, OciError, Reference, Route};
use crate::store::MAX_MANIFEST_BYTES;
use crate::upstream::Job;

/// What happened to one request, for metrics and for whether the connection can go on.
pub struct Outcome {
    pub status: u16,
    pub handler: Handler,
    /// The response was not completed as announced: the connection must close.
    pub broken: bool,
}

impl Outcome {
    fn ok(status: u16, handler: Handler) -> Self {
        Self { status, handler, broken: false }
    }
}

/// Answers one request on `stream`.
pub async fn handle(shard: &Rc<Shard>, stream: &mut TcpStream, req: &Request) -> Outcome {
    let started = Instant::now();
    let route = oci::route(&req.method_name, &req.target);
    let handler = match route {
        Ok(Route::StreamBlob { .. }) => Handler::Files,
        _ => Handler::Oci,
    };
    let outcome = match route {
        Err(e) => respond_error(stream, &e, req, handler).await,
        Ok(Route::ApiVersion) => {
            let out = http::head(200, 2, &[("Content-Type", "application/json")], req.close);
            let mut out = out;
            if req.method == Method::Get {
                out.extend_from_slice(b"{}");
            }
            write_or_break(stream, out, 200, handler).await
        }
        Ok(Route::Blob { digest, registry, name }) => {
            if let Err(e) = shard.check_registry(registry.as_deref()) {
                respond_error(stream, &e, req, handler).await
            } else {
                let target = blob_target(&name, &digest, registry.as_deref());
                // A registry peerd may not reach (`ns=` naming a local address, with --hosts
                // allowing all) is served from peers only.
                let origin = shard
                    .upstream_url(registry.as_deref(), &name, &digest)
                    .and_then(|url| shard.cfg.egress.check(&url, &digest).ok())
                    .map(|url| Origin {
                        url: url.into(),
                        scope: Some(format!("repository:{name}:pull")),
                        home_target: target.clone(),
                    });
                serve_blob(shard, stream, req, &digest, &target, origin, handler).await
            }
        }
        Ok(Route::StreamBlob { digest, url }) => match shard.cfg.egress.check(&url, &digest) {
            // A URL peerd would not fetch is refused outright, even when a peer has the digest:
            // the answer must not depend on what the cluster happens to hold.
            Err(why) => respond_error(stream, &OciError::UpstreamDenied(why), req, handler).await,
            Ok(url) => {
                // Content is shared by digest, so peers are asked through the /v2 path they all
                // serve; the home node is handed the URL itself (and checks it again).
                let target = blob_target("peerd/stream", &digest, None);
                let origin = Origin { url: url.into(), scope: None, home_target: req.target.clone() };
                serve_blob(shard, stream, req, &digest, &target, Some(origin), handler).await
            }
        },
        Ok(Route::Manifest { name, reference, registry }) => match shard.check_registry(registry.as_deref()) {
            Err(e) => respond_error(stream, &e, req, handler).await,
            Ok(()) => serve_manifest(shard, stream, req, &name, &reference, registry.as_deref()).await,
        },
    };
    let elapsed = started.elapsed();
    let stats = shard.stats();
    stats.set_busy(crate::sys::thread_cpu_time());
    stats.request(outcome.handler, outcome.status);
    shard.observe_duration(
        RequestLabels {
            handler: if outcome.handler == Handler::Oci { "oci" } else { "files" },
            method: req.method.as_str(),
            code: outcome.status,
        },
        elapsed,
    );
    if outcome.status >= 500 {
        shard.control.send(ControlRequest::RequestFailed { reason: format!("{} {}", outcome.status, req.target) });
    }
    outcome
}

fn blob_target(name: &str, digest: &Digest, registry: Option<&str>) -> String {
    match registry {
        Some(r) => format!("/v2/{name}/blobs/{digest}?ns={r}"),
        None => format!("/v2/{name}/blobs/{digest}"),
    }
}

async fn respond_error(stream: &mut TcpStream, e: &OciError, req: &Request, handler: Handler) -> Outcome {
    let out = http::error_response(e, req.method, req.close);
    write_or_break(stream, out, e.status(), handler).await
}

async fn write_or_break(stream: &mut TcpStream, bytes: Vec<u8>, status: u16, handler: Handler) -> Outcome {
    let broken = http::write_all(stream, bytes).await.is_err();
    Outcome { status, handler, broken }
}

/// Where a blob comes from when no node has it.
struct Origin {
    url: String,
    /// The token scope, for registries that want an anonymous token.
    scope: Option<String>,
    /// The request to send to the digest's home node.
    home_target: String,
}

#[allow(clippy::too_many_arguments)]
async fn serve_blob(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    req: &Request,
    digest: &Digest,
    target: &str,
    origin: Option<Origin>,
    handler: Handler,
) -> Outcome {
    match shard.store.open(digest) {
        Ok((file, size)) => {
            let range = match oci::parse_range(req.range.as_deref(), size) {
                Ok(r) => r,
                Err(e) => return respond_error(stream, &e, req, handler).await,
            };
            let window = range.unwrap_or(ByteRange { start: 0, end: size.saturating_sub(1) });
            let len = if size == 0 { 0 } else { window.len() };
            let out = blob_head(digest, size, range, req.close);
            let status = if range.is_some() { 206 } else { 200 };
            let with_body = req.method != Method::Head && len > 0;
            // The head waits in the socket for the first body bytes: one packet, not two.
            let cork = with_body && crate::sys::set_cork(stream.as_raw_fd(), true).is_ok();
            if http::write_all(stream, out).await.is_err() {
                return Outcome { status, handler, broken: true };
            }
            if !with_body {
                return Outcome::ok(status, handler);
            }
            let (sent, res) = send::send_file(stream, &file, window.start, len).await;
            if cork {
                let _ = crate::sys::set_cork(stream.as_raw_fd(), false);
            }
            shard.stats().served(Source::Local, sent);
            Outcome { status, handler, broken: res.is_err() }
        }
        Err(_) => {
            // Already on its way from upstream to this node: read along.
            if let Some(t) = shard.pull_through.as_ref().and_then(|p| p.cache.joined(digest)) {
                return serve_transfer(shard, stream, req, t, handler).await;
            }
            match origin {
                // The digest's home node, asked by a peer: fetch it from upstream, never ask the
                // network again.
                Some(o) if req.from_peer && req.pull_through => {
                    pull_through(shard, stream, req, digest, target, &o, handler).await
                }
                _ if req.from_peer => respond_error(stream, &OciError::BlobUnknown, req, handler).await,
                origin => serve_blob_from_peers(shard, stream, req, digest, target, origin, handler).await,
            }
        }
    }
}

/// Fetches `digest` from upstream on this node (or joins the fetch already running) and serves
/// it as it arrives.
#[allow(clippy::too_many_arguments)]
async fn pull_through(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    req: &Request,
    digest: &Digest,
    target: &str,
    origin: &Origin,
    handler: Handler,
) -> Outcome {
    let Some(pt) = shard.pull_through.as_ref() else {
        return respond_error(stream, &OciError::BlobUnknown, req, handler).await;
    };
    let transfer = match pt.cache.begin(digest) {
        Ok(Begin::Joined(t)) => t,
        Ok(Begin::Started(t, writer)) => {
            tracing::debug!(%digest, url = %origin.url, "pulling through from upstream");
            pt.upstream.fetch(Job {
                url: origin.url.clone(),
                scope: origin.scope.clone(),
                transfer: t.clone(),
                writer,
            });
            t
        }
        // It landed in the cache in the meantime.
        Ok(Begin::Cached) => return Box::pin(serve_blob(shard, stream, req, digest, target, None, handler)).await,
        Err(e) => {
            tracing::warn!(%digest, error = %e, "cannot start a pull-through");
            return respond_error(stream, &OciError::BlobUnknown, req, handler).await;
        }
    };
    serve_transfer(shard, stream, req, transfer, handler).await
}

/// Serves a blob that is arriving from upstream: `sendfile` from the growing file as far as it
/// goes, the last byte only once the whole blob matched its digest.
async fn serve_transfer(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    req: &Request,
    t: Arc<Transfer>,
    handler: Handler,
) -> Outcome {
    let head = t.wait_head().await;
    if let State::Failed { before_body: true, .. } = head.state {
        return respond_error(stream, &OciError::BlobUnknown, req, handler).await;
    }
    if let State::Failed { .. } = head.state {
        // Failed mid-body before this request promised anything: it can still go elsewhere.
        return respond_error(stream, &OciError::BlobUnknown, req, handler).await;
    }
    let size = head.size;
    if size == 0 {
        // No body to hold the last byte of: the head itself waits for the verdict.
        let end = t.wait(|s| s.state == State::Verified).await;
        if end.state != State::Verified {
            return respond_error(stream, &OciError::BlobUnknown, req, handler).await;
        }
    }
    let range = match oci::parse_range(req.range.as_deref(), size) {
        Ok(r) => r,
        Err(e) => return respond_error(stream, &e, req, handler).await,
    };
    let status = if range.is_some() { 206 } else { 200 };
    if http::write_all(stream, blob_head(&t.digest, size, range, req.close)).await.is_err() {
        return Outcome { status, handler, broken: true };
    }
    if req.method == Method::Head || size == 0 {
        return Outcome::ok(status, handler);
    }
    let window = range.unwrap_or(ByteRange { start: 0, end: size - 1 });
    let end = window.end + 1;
    let mut pos = window.start;
    let mut sent_total = 0;
    let broken = loop {
        if pos == end {
            break false;
        }
        let snap = t.wait(|s| Transfer::sendable(s, end) > pos || s.state == State::Verified).await;
        if let State::Failed { reason, .. } = &snap.state {
            tracing::debug!(digest = %t.digest, %reason, "pull-through failed mid-body; cutting the response short");
            break true;
        }
        let limit = Transfer::sendable(&snap, end);
        if limit <= pos {
            continue;
        }
        let (sent, res) = send::send_file(stream, &t.file, pos, limit - pos).await;
        pos += sent;
        sent_total += sent;
        if res.is_err() {
            break true;
        }
    };
    shard.stats().served(Source::Upstream, sent_total);
    Outcome { status, handler, broken }
}

fn blob_head(digest: &Digest, size: u64, range: Option<ByteRange>, close: bool) -> Vec<u8> {
    let d = digest.to_string();
    let etag = format!("\"{d}\"");
    let mut headers = vec![
        ("Content-Type", "application/octet-stream"),
        ("Docker-Content-Digest", d.as_str()),
        ("Accept-Ranges", "bytes"),
        ("ETag", etag.as_str()),
    ];
    match range {
        Some(r) => {
            let cr = format!("bytes {}-{}/{size}", r.start, r.end);
            headers.push(("Content-Range", &cr));
            http::head(206, r.len(), &headers, close)
        }
        None => http::head(200, size, &headers, close),
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_blob_from_peers(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    req: &Request,
    digest: &Digest,
    target: &str,
    origin: Option<Origin>,
    handler: Handler,
) -> Outcome {
    let providers = shard.find_providers(digest.to_string()).await;
    let method = if req.method == Method::Head { "HEAD" } else { "GET" };
    let found = if providers.is_empty() {
        Err(FetchError::Exhausted)
    } else {
        fetch::first_response(&providers, 0, method, target, None, shard.cfg.hedge_delay).await
    };
    let (resp, idx, providers) = match found {
        Ok((resp, idx)) => (resp, idx, providers),
        Err(e) => {
            tracing::debug!(%digest, error = %e, "no peer has it");
            let (Some(origin), Some(pt)) = (origin, shard.pull_through.as_ref()) else {
                return respond_error(stream, &OciError::BlobUnknown, req, handler).await;
            };
            // Nobody has it: the digest's home node fetches it from upstream for everyone.
            let members = pt.members.load();
            let key = digest.to_string();
            let mut dead: Vec<String> = Vec::new();
            loop {
                let Some(home) = members.home_without(&key, &dead).cloned() else {
                    return pull_through(shard, stream, req, digest, target, &origin, handler).await;
                };
                match fetch::request_pull_through(home.http, method, &origin.home_target).await {
                    Ok(resp) => break (resp, 0, vec![home]),
                    Err(FetchError::Status(_, status)) => {
                        tracing::debug!(%digest, home = %home.http, status, "home node could not pull through");
                        return respond_error(stream, &OciError::BlobUnknown, req, handler).await;
                    }
                    Err(e @ FetchError::Connect(..)) if dead.len() < 2 => {
                        // Gone: leave it out for a while, and ask the next home, as every node that
                        // finds it gone will.
                        tracing::debug!(%digest, error = %e, "home node unreachable; trying the next");
                        shard.control.send(ControlRequest::BadPeer { peer_id: home.peer_id.clone() });
                        dead.push(home.peer_id);
                    }
                    Err(e @ FetchError::Connect(..)) => {
                        tracing::debug!(%digest, error = %e, "home nodes unreachable; pulling through here");
                        return pull_through(shard, stream, req, digest, target, &origin, handler).await;
                    }
                    Err(e) => {
                        // It took the request but has not answered: upstream may just be slow for
                        // it, so it is not held against it, and a second fetch is not started
                        // beside it. containerd goes to the registry itself.
                        tracing::debug!(%digest, home = %home.http, error = %e, "home node did not answer in time");
                        return respond_error(stream, &OciError::BlobUnknown, req, handler).await;
                    }
                }
            }
        }
    };
    let size = resp.content_length;
    if size == 0 && *digest != Digest::of(b"") {
        // An empty body cannot be the blob asked for, and nothing would be left to verify.
        tracing::warn!(%digest, peer = %resp.addr, "peer sent an empty body for a non-empty blob");
        shard.metrics.digest_mismatch.get_or_create(&FromLabels { from: "peer" }).inc();
        shard.control.send(ControlRequest::BadPeer { peer_id: providers[idx].peer_id.clone() });
        return respond_error(stream, &OciError::BlobUnknown, req, handler).await;
    }
    let range = match oci::parse_range(req.range.as_deref(), size) {
        Ok(r) => r,
        Err(e) => return respond_error(stream, &e, req, handler).await,
    };
    let status = if range.is_some() { 206 } else { 200 };
    if http::write_all(stream, blob_head(digest, size, range, req.close)).await.is_err() {
        return Outcome { status, handler, broken: true };
    }
    if req.method == Method::Head || size == 0 {
        return Outcome::ok(status, handler);
    }
    let window = range.unwrap_or(ByteRange { start: 0, end: size - 1 });
    let outcome =
        fetch::relay_blob(stream, resp, idx, &providers, target, digest, size, window, shard.cfg.hedge_delay).await;
    match outcome {
        RelayOutcome::Complete { from_peers, elapsed } => {
            shard.stats().served(Source::Peer, window.len());
            shard.metrics.bytes_fetched.get_or_create(&FromLabels { from: "peer" }).inc_by(from_peers);
            observe_speed(shard, "blob", from_peers, elapsed);
            shard.control.send(ControlRequest::ServedFromPeer { bytes: from_peers });
            Outcome::ok(status, handler)
        }
        RelayOutcome::Mismatch { peer_id } => {
            tracing::warn!(%digest, peer = %peer_id, "peer sent bytes that do not match the digest");
            shard.metrics.digest_mismatch.get_or_create(&FromLabels { from: "peer" }).inc();
            shard.control.send(ControlRequest::BadPeer { peer_id });
            Outcome { status: 502, handler, broken: true }
        }
        RelayOutcome::Failed => Outcome { status: 502, handler, broken: true },
        RelayOutcome::ClientGone => Outcome { status, handler, broken: true },
    }
}

fn observe_speed(shard: &Shard, op: &'static str, bytes: u64, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(1e-6);
    let mib_s = bytes as f64 / (1024.0 * 1024.0) / secs;
    shard.metrics.peer_response_speed.get_or_create(&OpLabels { op }).observe(mib_s);
}

/// A manifest ready to send.
struct ManifestBody {
    bytes: Vec<u8>,
    digest: Digest,
    media_type: String,
}

async fn serve_manifest(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    req: &Request,
    name: &str,
    reference: &Reference,
    registry: Option<&str>,
) -> Outcome {
    let handler = Handler::Oci;
    if let Reference::Tag(tag) = reference {
        // A re-pushed `latest` must not stay pinned to whichever copy the cluster saw first.
        if tag == "latest" && !shard.cfg.resolve_latest_tag {
            return respond_error(stream, &OciError::ManifestUnknown, req, handler).await;
        }
    }
    let registry = registry.or(shard.cfg.default_registry.as_deref());
    let local = local_manifest(shard, name, reference, registry);
    let body = match local {
        Some(b) => Some(b),
        None if req.from_peer => None,
        None => manifest_from_peers(shard, name, reference, registry).await,
    };
    let Some(body) = body else {
        return respond_error(stream, &OciError::ManifestUnknown, req, handler).await;
    };
    let d = body.digest.to_string();
    let headers = [("Content-Type", body.media_type.as_str()), ("Docker-Content-Digest", d.as_str())];
    let mut out = http::head(200, body.bytes.len() as u64, &headers, req.close);
    if req.method == Method::Get {
        out.extend_from_slice(&body.bytes);
    }
    write_or_break(stream, out, 200, handler).await
}

fn local_manifest(shard: &Shard, name: &str, reference: &Reference, registry: Option<&str>) -> Option<ManifestBody> {
    let (digest, known_type) = match reference {
        Reference::Digest(d) => (d.clone(), None),
        Reference::Tag(tag) => {
            let index = shard.index.load();
            let target = index.tags.get(&oci::tag_key(registry?, name, tag))?;
            (target.digest.clone(), Some(target.media_type.clone()))
        }
    };
    let bytes = shard.store.read_small(&digest).ok()?;
    if Digest::of(&bytes) != digest {
        // The store is corrupt: never serve it, and say so.
        tracing::warn!(%digest, "local manifest does not match its digest");
        shard.metrics.digest_mismatch.get_or_create(&FromLabels { from: "local" }).inc();
        return None;
    }
    let doc = ManifestDoc::parse(&bytes)?;
    let media_type = known_type.filter(|t| !t.is_empty()).or_else(|| doc.detect_media_type().map(str::to_owned))?;
    Some(ManifestBody { bytes, digest, media_type })
}

async fn manifest_from_peers(
    shard: &Rc<Shard>,
    name: &str,
    reference: &Reference,
    registry: Option<&str>,
) -> Option<ManifestBody> {
    let (key, reference_str) = match reference {
        Reference::Digest(d) => (d.to_string(), d.to_string()),
        Reference::Tag(t) => (oci::tag_key(registry?, name, t), t.clone()),
    };
    let providers = shard.find_providers(key).await;
    if providers.is_empty() {
        return None;
    }
    let target = match registry {
        Some(r) => format!("/v2/{name}/manifests/{reference_str}?ns={r}"),
        None => format!("/v2/{name}/manifests/{reference_str}"),
    };
    for start in 0..providers.len() {
        let started = Instant::now();
        let Ok((resp, idx)) =
            fetch::first_response(&providers, start, "GET", &target, None, shard.cfg.hedge_delay).await
        else {
            return None;
        };
        if let Some(body) = verify_manifest(shard, resp, reference).await {
            shard.metrics.bytes_fetched.get_or_create(&FromLabels { from: "peer" }).inc_by(body.bytes.len() as u64);
            observe_speed(shard, "manifest", body.bytes.len() as u64, started.elapsed());
            return Some(body);
        }
        shard.control.send(ControlRequest::BadPeer { peer_id: providers[idx].peer_id.clone() });
    }
    None
}

/// A manifest from a peer is accepted only if its bytes hash to the digest asked for (or, for a
/// tag, to the digest the peer claims) and it parses as a manifest or index.
async fn verify_manifest(shard: &Shard, resp: PeerResponse, reference: &Reference) -> Option<ManifestBody> {
    let claimed = resp.docker_digest.clone();
    let peer_type = resp.content_type.clone();
    let bytes = resp.read_to_end(MAX_MANIFEST_BYTES).await.ok()?;
    let actual = Digest::of(&bytes);
    let expected = match reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(_) => Digest::parse(claimed.as_deref()?).ok()?,
    };
    if actual != expected {
        shard.metrics.digest_mismatch.get_or_create(&FromLabels { from: "peer" }).inc();
        return None;
    }
    let doc = ManifestDoc::parse(&bytes)?;
    let media_type = doc.detect_media_type().map(str::to_owned).or(peer_type)?;
    Some(ManifestBody { bytes, digest: actual, media_type })
}
