//! The upstream thread: fetches blobs from the registry for [`crate::cache`] transfers.
//!
//! One OS thread with its own single-threaded tokio runtime and a reqwest client (rustls, the
//! system's roots plus `SSL_CERT_FILE`, redirects to blob storage followed). Shards hand it jobs
//! through a lock-free mailbox and never wait for it: they read the transfer's file as it grows.
//! Registries that want an anonymous bearer token (Docker Hub, GHCR, MCR...) get one; a registry
//! that wants credentials gets none from us, the client is told 404 and containerd goes to the
//! registry itself with its own.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::cache::{BlobCache, Reservation, Transfer};
use crate::egress::Egress;
use crate::messages::{mailbox, ControlHandle, ControlRequest, MailboxReceiver, MailboxSender};
use crate::metrics::{FromLabels, Metrics, OpLabels};
use crate::oci::Digest;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REDIRECTS: usize = 8;
/// Upstream may pause this long mid-body before the fetch is given up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes the cache's filesystem keeps free beyond a blob before the blob is fetched.
const MIN_FREE_BYTES: u64 = 512 << 20;
/// Arriving bytes are written to the cache (and readers woken) in steps of this size...
const WRITE_EVERY: usize = 256 * 1024;
/// ...or this long after the previous step, whichever comes first.
const WRITE_AFTER: Duration = Duration::from_millis(10);

/// One blob to fetch into a transfer.
pub struct Job {
    pub url: String,
    /// `repository:<name>:pull`, for a token when upstream asks for one.
    pub scope: Option<String>,
    pub transfer: Arc<Transfer>,
    pub writer: File,
}

/// The shards' side.
#[derive(Clone)]
pub struct UpstreamHandle {
    tx: MailboxSender<Job>,
}

impl UpstreamHandle {
    pub fn fetch(&self, job: Job) {
        self.tx.send(job);
    }
}

/// Starts the upstream thread.
pub fn spawn(
    cache: Arc<BlobCache>,
    metrics: Metrics,
    control: ControlHandle,
    egress: &Egress,
) -> anyhow::Result<UpstreamHandle> {
    let (tx, rx) = mailbox::<Job>();
    // Registries redirect blob GETs to their storage; a redirect may not lead where a client
    // could not have sent peerd itself (see `crate::egress`).
    let policy = {
        let egress = egress.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error("too many redirects");
            }
            match egress.redirect_allowed(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(why),
            }
        })
    };
    let client = reqwest::Client::builder()
        .user_agent(concat!("peerd/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .redirect(policy)
        .dns_resolver(egress.resolver())
        .build()?;
    // Built here, not on the thread: a runtime that cannot start fails `spawn`, instead of
    // leaving jobs queued that no one will ever run.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("peerd-upstream".into()).spawn(move || {
        let ctx = Arc::new(Upstream { client, cache, metrics, control, tokens: Default::default() });
        rt.block_on(run(ctx, rx));
    })?;
    Ok(UpstreamHandle { tx })
}

struct Upstream {
    client: reqwest::Client,
    cache: Arc<BlobCache>,
    metrics: Metrics,
    control: ControlHandle,
    /// Anonymous bearer tokens by (realm, service, scope), with their expiry.
    tokens: std::sync::Mutex<HashMap<String, (String, Instant)>>,
}

async fn run(ctx: Arc<Upstream>, rx: MailboxReceiver<Job>) {
    loop {
        let job = rx.recv().await;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let transfer = job.transfer.clone();
            let ending = Ending { cache: ctx.cache.clone(), transfer: transfer.clone(), done: false };
            let result = fetch(&ctx, job).await;
            let result = match result {
                Ok(writer) => {
                    // Readers finish now; the cache copy is made durable beside them, so that a
                    // crash cannot leave a torn file that looks complete.
                    transfer.mark_verified();
                    let synced = match tokio::task::spawn_blocking(move || writer.sync_data()).await {
                        Ok(r) => r,
                        Err(e) => Err(std::io::Error::other(e)),
                    };
                    if let Err(e) = synced {
                        // The readers have the right bytes; only the cache copy is not kept.
                        tracing::warn!(digest = %transfer.digest, error = %e, "could not keep a pulled-through blob");
                        ending.discard();
                        return;
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            };
            if let Err((reason, _)) = &result {
                tracing::info!(digest = %transfer.digest, %reason, "pull-through failed");
            }
            let ok = result.is_ok();
            ending.finish(result);
            if ok {
                ctx.control.send(ControlRequest::ContentChanged);
            }
        });
    }
}

/// Ends a transfer exactly once: with the fetch's result, or as failed if the task is dropped
/// without one, so that no reader ever waits on a transfer nobody feeds.
struct Ending {
    cache: Arc<BlobCache>,
    transfer: Arc<Transfer>,
    done: bool,
}

impl Ending {
    fn finish(mut self, result: Result<(), Failure>) {
        self.done = true;
        self.cache.finish(&self.transfer, result);
    }

    /// Verified, but not to be kept.
    fn discard(mut self) {
        self.done = true;
        self.cache.discard(&self.transfer);
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        if !self.done {
            let before_body = !self.transfer.is_started();
            self.cache.finish(&self.transfer, Err(("the fetch was abandoned".into(), before_body)));
        }
    }
}

/// Why a fetch failed, and whether it failed before the body started.
type Failure = (String, bool);

/// Fetches the job's blob into its transfer; the writer comes back once every byte is written
/// and matched the digest.
async fn fetch(ctx: &Upstream, job: Job) -> Result<File, Failure> {
    let Job { url, scope, transfer, mut writer } = job;
    let started = Instant::now();
    let mut resp = get(ctx, &url, scope.as_deref()).await.map_err(|e| (e, true))?;
    let size = resp.content_length().ok_or_else(|| ("upstream sent no Content-Length".to_owned(), true))?;
    // A full disk must not turn into broken pulls: refuse before promising a body, and the client
    // goes to the registry itself. Transfers in flight hold their share of the free space.
    let mut space = match crate::sys::free_bytes(&writer) {
        Ok(free) => Some(
            ctx.cache
                .reserve(size, free, MIN_FREE_BYTES)
                .map_err(|avail| (format!("{size} bytes do not fit the cache ({avail} bytes free)"), true))?,
        ),
        Err(_) => None,
    };
    transfer.set_size(size);
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let fetched = ctx.metrics.bytes_fetched.get_or_create(&FromLabels { from: "upstream" }).clone();
    // Chunks are small (a few KiB); write and tell readers in larger steps, or after a pause.
    let mut pending: Vec<u8> = Vec::with_capacity(WRITE_EVERY);
    let mut last_write = Instant::now();
    loop {
        // Bytes held back for a larger write go out when upstream pauses, not when it resumes.
        let next = if pending.is_empty() {
            resp.chunk().await
        } else {
            match tokio::time::timeout(WRITE_AFTER.saturating_sub(last_write.elapsed()), resp.chunk()).await {
                Ok(next) => next,
                Err(_) => {
                    flush(&mut writer, &mut pending, &transfer, &mut space)?;
                    last_write = Instant::now();
                    continue;
                }
            }
        };
        let chunk = match next {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err((format!("reading from upstream: {}", chain(&e)), false)),
        };
        if got + chunk.len() as u64 > size {
            return Err(("upstream sent more than its Content-Length".into(), false));
        }
        hasher.update(&chunk);
        got += chunk.len() as u64;
        fetched.inc_by(chunk.len() as u64);
        pending.extend_from_slice(&chunk);
        if pending.len() >= WRITE_EVERY || last_write.elapsed() >= WRITE_AFTER {
            flush(&mut writer, &mut pending, &transfer, &mut space)?;
            last_write = Instant::now();
        }
    }
    flush(&mut writer, &mut pending, &transfer, &mut space)?;
    if got != size {
        return Err((format!("upstream ended after {got} of {size} bytes"), false));
    }
    if Digest::from_sha256(hasher.finalize().into()) != transfer.digest {
        tracing::warn!(digest = %transfer.digest, %url, "upstream sent bytes that do not match the digest");
        ctx.metrics.digest_mismatch.get_or_create(&FromLabels { from: "upstream" }).inc();
        return Err(("digest mismatch".into(), false));
    }
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    ctx.metrics
        .upstream_response_speed
        .get_or_create(&OpLabels { op: "blob" })
        .observe(size as f64 / (1024.0 * 1024.0) / secs);
    Ok(writer)
}

fn flush(
    writer: &mut File,
    pending: &mut Vec<u8>,
    transfer: &Transfer,
    space: &mut Option<Reservation>,
) -> Result<(), Failure> {
    if pending.is_empty() {
        return Ok(());
    }
    writer.write_all(pending).map_err(|e| (format!("writing the cache: {e}"), false))?;
    transfer.advance(pending.len() as u64);
    if let Some(space) = space {
        // On disk now: the filesystem's free space accounts for these bytes from here on.
        space.written(pending.len() as u64);
    }
    pending.clear();
    Ok(())
}

/// GET with the anonymous token dance: on a 401 that names a bearer realm, fetch a token for the
/// scope and try once more.
async fn get(ctx: &Upstream, url: &str, scope: Option<&str>) -> Result<reqwest::Response, String> {
    let resp = ctx.client.get(url).send().await.map_err(|e| format!("upstream: {}", chain(&e)))?;
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(BearerChallenge::parse)
            .ok_or_else(|| "upstream wants credentials peerd does not have".to_owned())?;
        let token = token(ctx, &challenge, scope).await?;
        let resp =
            ctx.client.get(url).bearer_auth(token).send().await.map_err(|e| format!("upstream: {}", chain(&e)))?;
        return ok_status(resp);
    }
    ok_status(resp)
}

/// An error with its causes: reqwest's own message leaves out why (a TLS handshake, a refused
/// connection), and that is what an operator needs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn ok_status(resp: reqwest::Response) -> Result<reqwest::Response, String> {
    if resp.status() == reqwest::StatusCode::OK {
        Ok(resp)
    } else {
        Err(format!("upstream answered {}", resp.status()))
    }
}

async fn token(ctx: &Upstream, c: &BearerChallenge, scope: Option<&str>) -> Result<String, String> {
    let scope = c.scope.as_deref().or(scope);
    let key = format!("{}|{}|{}", c.realm, c.service.as_deref().unwrap_or(""), scope.unwrap_or(""));
    if let Some((t, until)) = ctx.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        if Instant::now() < *until {
            return Ok(t.clone());
        }
    }
    let mut query: Vec<(&str, &str)> = Vec::new();
    if let Some(s) = c.service.as_deref() {
        query.push(("service", s));
    }
    if let Some(s) = scope {
        query.push(("scope", s));
    }
    let resp = ctx.client.get(&c.realm).query(&query).send().await.map_err(|e| format!("token: {}", chain(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("token endpoint answered {}", resp.status()));
    }
    let body: serde_json::Value = resp.json().await.map_err(|e| format!("token: {}", chain(&e)))?;
    let t = body
        .get("token")
        .or_else(|| body.get("access_token"))
        .and_then(|v| v.as_str())
        .ok_or_else(|| "token endpoint sent no token".to_owned())?
        .to_owned();
    let ttl = body.get("expires_in").and_then(|v| v.as_u64()).unwrap_or(60).clamp(10, 3600);
    // Renew a little early, so that a token never expires between the check and the request.
    let until = Instant::now() + Duration::from_secs(ttl - ttl / 5);
    ctx.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (t.clone(), until));
    Ok(t)
}

/// `WWW-Authenticate: Bearer realm="...",service="...",scope="..."`.
#[derive(Debug, PartialEq, Eq)]
pub struct BearerChallenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

impl BearerChallenge {
    pub fn parse(header: &str) -> Option<Self> {
        let (scheme, rest) = header.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut params = HashMap::new();
        let mut rest = rest.trim();
        while !rest.is_empty() {
            let (name, after) = rest.split_once('=')?;
            let name = name.trim().to_ascii_lowercase();
            let after = after.trim_start();
            let (value, tail) = if let Some(q) = after.strip_prefix('"') {
                let end = q.find('"')?;
                (&q[..end], &q[end + 1..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim(), &after[end..])
            };
            params.insert(name, value.to_owned());
            rest = tail.trim_start().trim_start_matches(',').trim_start();
        }
        let realm = params.remove("realm")?;
        if !(realm.starts_with("https://") || realm.starts_with("http://")) {
            return None;
        }
        Some(Self { realm, service: params.remove("service"), scope: params.remove("scope") })
    }
}

/// The registry host that serves `ns`: Docker Hub's API lives on another name.
pub fn api_host(ns: &str) -> &str {
    match ns {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges() {
        let c = BearerChallenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.docker.io/token");
        assert_eq!(c.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(c.scope.as_deref(), Some("repository:library/alpine:pull"));
        let c = BearerChallenge::parse(r#"bearer realm=https://ghcr.io/token, service=ghcr.io"#).unwrap();
        assert_eq!(c.realm, "https://ghcr.io/token");
        assert_eq!(c.service.as_deref(), Some("ghcr.io"));
        assert_eq!(BearerChallenge::parse(r#"Basic realm="x""#), None);
        assert_eq!(BearerChallenge::parse(r#"Bearer realm="file:///etc/passwd""#), None);
        assert_eq!(BearerChallenge::parse(r#"Bearer realm="unterminated"#), None);
        assert_eq!(BearerChallenge::parse("Bearer"), None);
    }

    #[test]
    fn docker_hub_is_served_elsewhere() {
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        assert_eq!(api_host("ghcr.io"), "ghcr.io");
    }
}
