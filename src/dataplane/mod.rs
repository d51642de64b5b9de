//! The data plane: one single-threaded runtime per core, each accepting its own connections on
//! a SO_REUSEPORT socket and serving them to the end. It knows nothing of libp2p or Kubernetes;
//! it reaches the control thread only through [`crate::messages`].

pub mod fetch;
pub mod http;
pub mod send;
pub mod serve;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use prometheus_client::metrics::histogram::Histogram;

use crate::cache::BlobCache;
use crate::config::IoEngine;
use crate::messages::{ControlHandle, Provider, SharedMembers};
use crate::metrics::{Metrics, RequestLabels, ShardStats};
use crate::oci::{self, OciError};
use crate::store::{ContentStore, SharedIndex};
use crate::upstream::UpstreamHandle;

/// The I/O engine a shard actually runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    IoUring,
    Epoll,
}

impl Engine {
    /// Resolves `--io-engine`: `auto` probes io_uring once and falls back to epoll, saying why.
    pub fn choose(wanted: IoEngine) -> Engine {
        match wanted {
            IoEngine::Epoll => Engine::Epoll,
            IoEngine::IoUring | IoEngine::Auto => match crate::sys::io_uring_available() {
                Ok(()) if monoio::utils::detect_uring() => Engine::IoUring,
                Ok(()) => {
                    tracing::warn!("io_uring lacks operations the data plane needs; serving with epoll");
                    Engine::Epoll
                }
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring is unavailable (seccomp or kernel.io_uring_disabled); serving with epoll");
                    Engine::Epoll
                }
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::IoUring => "io_uring",
            Engine::Epoll => "epoll",
        }
    }
}

/// Settings of the serving path.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// `host[:port]` of the registries mirrored; empty means all.
    pub registries: Vec<String>,
    /// Used for tags when a client sends no `ns` (only when exactly one registry is mirrored).
    pub default_registry: Option<String>,
    pub lookup_timeout: Duration,
    pub hedge_delay: Duration,
    pub resolve_latest_tag: bool,
    /// `host[:port]` → base URL of its API (from `--hosts`); a registry not listed is reached
    /// over https when `--hosts` allows all.
    pub upstreams: Vec<(String, String)>,
    /// Which URLs pull-through may fetch.
    pub egress: crate::egress::Egress,
}

/// Pull-through: the cache of blobs fetched from upstream, and the thread that fetches them.
#[derive(Clone)]
pub struct PullThrough {
    pub cache: Arc<BlobCache>,
    pub upstream: UpstreamHandle,
    pub members: SharedMembers,
}

/// What every shard shares (all of it read-only or lock-free).
#[derive(Clone)]
pub struct Shared {
    pub store: ContentStore,
    pub index: SharedIndex,
    pub control: ControlHandle,
    pub metrics: Metrics,
    pub cfg: ServeConfig,
    pub pull_through: Option<PullThrough>,
}

/// One shard's state, owned by its thread.
pub struct Shard {
    pub id: usize,
    pub store: ContentStore,
    pub index: SharedIndex,
    pub control: ControlHandle,
    pub metrics: Metrics,
    pub cfg: ServeConfig,
    pub pull_through: Option<PullThrough>,
    durations: RefCell<HashMap<RequestLabels, Histogram>>,
}

impl Shard {
    pub fn stats(&self) -> &ShardStats {
        self.metrics.shard(self.id)
    }

    /// Resolves the histogram for `labels` once per shard, then observes without the family lock.
    pub fn observe_duration(&self, labels: RequestLabels, elapsed: Duration) {
        let mut cache = self.durations.borrow_mut();
        let h =
            cache.entry(labels.clone()).or_insert_with(|| self.metrics.request_duration.get_or_create(&labels).clone());
        h.observe(elapsed.as_secs_f64());
    }

    pub fn check_registry(&self, registry: Option<&str>) -> Result<(), OciError> {
        match registry {
            Some(r) if !self.cfg.registries.is_empty() && !self.cfg.registries.iter().any(|x| x == r) => {
                Err(OciError::RegistryDenied(r.to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// The URL to fetch `digest` of repository `name` from, for registry `ns`.
    pub fn upstream_url(&self, registry: Option<&str>, name: &str, digest: &oci::Digest) -> Option<String> {
        let registry = registry.or(self.cfg.default_registry.as_deref())?;
        let base = match self.cfg.upstreams.iter().find(|(h, _)| h == registry) {
            Some((_, base)) => base.clone(),
            None if self.cfg.registries.is_empty() => format!("https://{}", crate::upstream::api_host(registry)),
            None => return None,
        };
        Some(format!("{base}/v2/{name}/blobs/{digest}"))
    }

    pub async fn find_providers(&self, key: String) -> Vec<Provider> {
        self.stats().lookup_started();
        let p = self.control.find_providers(key, self.cfg.lookup_timeout).await;
        self.stats().lookup_finished();
        p
    }
}

/// Starts `count` shards listening on `addr`. Returns once every shard has bound its socket, so
/// that a port in use is an error at start, not a silent shard.
pub fn start(count: usize, addr: SocketAddr, engine: Engine, shared: Shared) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::with_capacity(count);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    for id in 0..count {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("peerd-shard-{id}"))
            .spawn(move || run_shard(id, addr, engine, shared, ready))?;
        handles.push(h);
    }
    for _ in 0..count {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("data plane on {addr}: {e}"),
            Err(_) => anyhow::bail!("a shard died while starting"),
        }
    }
    tracing::info!(%addr, shards = count, engine = engine.name(), "data plane listening");
    Ok(handles)
}

fn run_shard(id: usize, addr: SocketAddr, engine: Engine, shared: Shared, ready: mpsc::Sender<Result<(), String>>) {
    let fut = shard_main(id, addr, shared, ready.clone());
    let built = match engine {
        Engine::IoUring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .build()
            .map(|mut rt| rt.block_on(fut)),
        Engine::Epoll => {
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().map(|mut rt| rt.block_on(fut))
        }
    };
    if let Err(e) = built {
        let _ = ready.send(Err(format!("building the {} runtime: {e}", engine.name())));
    }
}

async fn shard_main(id: usize, addr: SocketAddr, shared: Shared, ready: mpsc::Sender<Result<(), String>>) {
    let opts = ListenerOpts::new().reuse_port(true).reuse_addr(true).backlog(4096);
    let listener = match TcpListener::bind_with_config(addr, &opts) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);
    let shard = Rc::new(Shard {
        id,
        store: shared.store,
        index: shared.index,
        control: shared.control,
        metrics: shared.metrics,
        cfg: shared.cfg,
        pull_through: shared.pull_through,
        durations: RefCell::new(HashMap::new()),
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shard = shard.clone();
                monoio::spawn(async move {
                    shard.stats().connection_opened();
                    serve_connection(&shard, stream).await;
                    shard.stats().connection_closed();
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(shard = id, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(shard: &Rc<Shard>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    loop {
        let req = match http::read_request(&mut stream, &mut buf).await {
            Ok(r) => r,
            Err(http::ReadError::Closed) => return,
            Err(http::ReadError::Bad(e)) => {
                let _ = http::write_all(&mut stream, http::error_response(&e, http::Method::Get, true)).await;
                shard.stats().request(crate::metrics::Handler::Oci, e.status());
                shard.stats().set_busy(crate::sys::thread_cpu_time());
                return;
            }
        };
        let outcome = serve::handle(shard, &mut stream, &req).await;
        if outcome.broken || req.close || req.has_body {
            return;
        }
    }
}
