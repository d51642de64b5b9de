//! The control thread: one OS thread with its own single-threaded tokio runtime that owns the
//! libp2p swarm, the containerd watcher, the metrics port and the event reporter. Shards reach
//! it only through [`crate::messages`]; it answers each lookup with a oneshot and never blocks
//! them.

pub mod admin;
pub mod containerd;
pub mod events;
pub mod kube;
pub mod p2p;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::StreamExt;
use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult};
use libp2p::metrics::Recorder;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, Multiaddr, PeerId, Swarm};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::config::Bootstrap;
use crate::messages::{ControlReceiver, ControlRequest, Members, Provider, SharedMembers};
use crate::metrics::FromLabels;
use crate::metrics::Metrics;
use crate::store::{keep_verified, ContentStore, LocalIndex, SharedIndex, VerifiedBlobs};
use admin::Health;
use events::{Reason, Reporter};
use p2p::{Behaviour, BehaviourEvent};

/// How long a peer that sent bad bytes is left out of lookups.
const BAD_PEER_PENALTY: Duration = Duration::from_secs(120);
/// How often the loop checks its peers and redials the bootstrap list when alone.
const MAINTAIN_EVERY: Duration = Duration::from_secs(3);
const RESCAN_EVERY: Duration = Duration::from_secs(30);

pub struct ControlConfig {
    pub router_addr: SocketAddr,
    pub prom_addr: SocketAddr,
    pub http_port: u16,
    pub bootstrap: Bootstrap,
    pub data_dir: PathBuf,
    pub containerd_socket: PathBuf,
    pub namespace: String,
    pub store: ContentStore,
    /// Published for the shards' choice of a digest's home node.
    pub members: SharedMembers,
    pub cache_max_bytes: u64,
}

/// Starts the control thread; returns once its listeners are bound.
pub fn spawn(
    cfg: ControlConfig,
    rx: ControlReceiver,
    index: SharedIndex,
    metrics: Metrics,
    registry: Registry,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let handle = std::thread::Builder::new().name("peerd-control".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(run(cfg, rx, index, metrics, registry, ready_tx))
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => anyhow::bail!(e),
        Err(_) => match handle.join() {
            Ok(Err(e)) => Err(e),
            _ => anyhow::bail!("control thread died while starting"),
        },
    }
}

struct Lookup {
    key: String,
    waiters: Vec<oneshot::Sender<Vec<Provider>>>,
    started: Instant,
}

#[derive(Default)]
struct PeerEntry {
    ip: Option<IpAddr>,
    http_port: Option<u16>,
    connections: u32,
}

struct Control {
    swarm: Swarm<Behaviour>,
    p2p_metrics: libp2p::metrics::Metrics,
    metrics: Metrics,
    index: SharedIndex,
    health: Arc<Health>,
    reporter: Reporter,
    bootstrap: Bootstrap,
    http_port: u16,
    peers: HashMap<PeerId, PeerEntry>,
    lookups: HashMap<QueryId, Lookup>,
    lookup_by_key: HashMap<String, QueryId>,
    bad_peers: HashMap<PeerId, Instant>,
    advertised: HashSet<String>,
    /// The peerd pods the API server last listed (`--bootstrap kubernetes`).
    pod_ips: Vec<IpAddr>,
    router_port: u16,
    members: SharedMembers,
    /// Set when the node's own content changed outside containerd (the pull-through cache).
    rescan_now: bool,
}

async fn run(
    cfg: ControlConfig,
    rx: ControlReceiver,
    index: SharedIndex,
    metrics: Metrics,
    mut registry: Registry,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> anyhow::Result<()> {
    let fail = |e: String| {
        let _ = ready.send(Err(e.clone()));
        anyhow::anyhow!(e)
    };
    let key = p2p::load_identity(&cfg.data_dir).map_err(|e| fail(format!("node identity: {e}")))?;
    let (mut swarm, p2p_metrics) =
        p2p::build_swarm(key, cfg.http_port, &mut registry).map_err(|e| fail(format!("libp2p: {e}")))?;
    let listen = Multiaddr::empty()
        .with(match cfg.router_addr.ip() {
            IpAddr::V4(v) => Protocol::Ip4(v),
            IpAddr::V6(v) => Protocol::Ip6(v),
        })
        .with(Protocol::Tcp(cfg.router_addr.port()));
    swarm.listen_on(listen).map_err(|e| fail(format!("libp2p listener on {}: {e}", cfg.router_addr)))?;
    let admin_listener = tokio::net::TcpListener::bind(cfg.prom_addr)
        .await
        .map_err(|e| fail(format!("metrics listener on {}: {e}", cfg.prom_addr)))?;
    let health = Arc::new(Health { alone_ok: cfg.bootstrap == Bootstrap::None, ..Health::default() });
    tokio::spawn(admin::serve(admin_listener, Arc::new(registry), health.clone()));
    tracing::info!(peer_id = %swarm.local_peer_id(), router = %cfg.router_addr, metrics = %cfg.prom_addr, "control plane started");
    let _ = ready.send(Ok(()));

    let (changed_tx, mut changed_rx) = mpsc::channel::<()>(64);
    tokio::spawn(containerd::watch(cfg.containerd_socket.clone(), cfg.namespace.clone(), changed_tx));
    let (scanned_tx, mut scanned_rx) = mpsc::channel::<ScanResult>(4);

    // In a pod: events on the pod object, and (with --bootstrap kubernetes) peers from the API.
    let (peer_ips_tx, mut peer_ips_rx) = mpsc::channel::<Vec<IpAddr>>(8);
    let reporter = match kube::PodIdentity::from_env() {
        Some(pod) => {
            let (events_tx, events_rx) = mpsc::channel::<events::Published>(64);
            let peers = (cfg.bootstrap == Bootstrap::Kubernetes).then_some(peer_ips_tx);
            tokio::spawn(kube::run(pod, events_rx, peers));
            Reporter::with_sink(events_tx)
        }
        None => {
            if cfg.bootstrap == Bootstrap::Kubernetes {
                tracing::warn!("--bootstrap kubernetes needs POD_NAME and POD_NAMESPACE; no peers will be found");
            }
            Reporter::default()
        }
    };
    let router_port = cfg.router_addr.port();

    let mut control = Control {
        swarm,
        p2p_metrics,
        metrics,
        index,
        health,
        reporter,
        bootstrap: cfg.bootstrap,
        http_port: cfg.http_port,
        peers: HashMap::new(),
        lookups: HashMap::new(),
        lookup_by_key: HashMap::new(),
        bad_peers: HashMap::new(),
        advertised: HashSet::new(),
        pod_ips: Vec::new(),
        router_port,
        members: cfg.members.clone(),
        rescan_now: false,
    };
    control.reporter.report(Reason::Initializing, "peerd is starting");
    control.dial_bootstrap().await;
    let mut maintain = tokio::time::interval(MAINTAIN_EVERY);
    let mut idle_job = Some(ScanJob {
        socket: cfg.containerd_socket.clone(),
        namespace: cfg.namespace.clone(),
        store: cfg.store.clone(),
        verified: VerifiedBlobs::new(),
        metrics: control.metrics.clone(),
        cache_max_bytes: cfg.cache_max_bytes,
    });
    let mut last_scan = Instant::now();
    let mut rescan_wanted = false;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = control.swarm.select_next_some() => control.on_swarm_event(ev),
            req = rx.recv() => {
                control.on_request(req);
                if std::mem::take(&mut control.rescan_now) {
                    match idle_job.take() {
                        Some(job) => spawn_scan(job, scanned_tx.clone()),
                        None => rescan_wanted = true,
                    }
                }
            }
            Some(()) = changed_rx.recv() => match idle_job.take() {
                Some(job) => spawn_scan(job, scanned_tx.clone()),
                None => rescan_wanted = true,
            },
            Some((result, job)) = scanned_rx.recv() => {
                control.apply_scan(result);
                last_scan = Instant::now();
                if rescan_wanted {
                    rescan_wanted = false;
                    spawn_scan(job, scanned_tx.clone());
                } else {
                    idle_job = Some(job);
                }
            }
            _ = maintain.tick() => {
                control.maintain().await;
                // A slow safety net under the event stream (content GC emits no image event).
                if last_scan.elapsed() > RESCAN_EVERY {
                    if let Some(job) = idle_job.take() {
                        spawn_scan(job, scanned_tx.clone());
                    }
                }
            }
            Some(ips) = peer_ips_rx.recv() => control.dial_pods(ips, router_port),
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("shutting down");
    Ok(())
}

/// The inputs of a scan, moved into the scanning task and back (one scan runs at a time).
struct ScanJob {
    socket: PathBuf,
    namespace: String,
    store: ContentStore,
    verified: VerifiedBlobs,
    metrics: Metrics,
    cache_max_bytes: u64,
}

type ScanResult = (Option<LocalIndex>, ScanJob);

fn spawn_scan(mut job: ScanJob, done: mpsc::Sender<ScanResult>) {
    tokio::spawn(async move {
        // Coalesce a burst of events (a pull emits several) into one scan.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let result = match containerd::connect(&job.socket).await {
            Ok(ch) => containerd::scan(&ch, &job.namespace, &job.store).await,
            Err(e) => Err(e),
        };
        let index = match result {
            Ok(mut index) => {
                // Hash new blobs off the runtime: a corrupt blob is never announced.
                let verified = tokio::task::spawn_blocking(move || {
                    // The pull-through cache: drop what containerd now holds, keep it in size,
                    // and announce the rest with containerd's content.
                    crate::cache::trim(&job.store, job.cache_max_bytes);
                    index.digests.extend(crate::cache::cached_digests(&job.store));
                    let bad = keep_verified(&job.store, &mut index, &mut job.verified);
                    (index, job, bad)
                })
                .await;
                match verified {
                    Ok((index, j, bad)) => {
                        job = j;
                        for d in bad {
                            tracing::warn!(digest = %d, "blob in the content store does not match its digest; not announced");
                            job.metrics.digest_mismatch.get_or_create(&FromLabels { from: "local" }).inc();
                        }
                        Some(index)
                    }
                    Err(_) => return,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "scanning containerd failed");
                // Pull-through goes on without containerd: its cache must still keep in size.
                let (store, max) = (job.store.clone(), job.cache_max_bytes);
                let _ = tokio::task::spawn_blocking(move || crate::cache::trim(&store, max)).await;
                None
            }
        };
        let _ = done.send((index, job)).await;
    });
}

impl Control {
    fn on_request(&mut self, req: ControlRequest) {
        match req {
            ControlRequest::FindProviders { key, reply } => self.find_providers(key, reply),
            ControlRequest::ServedFromPeer { bytes } => {
                self.reporter.report(Reason::Active, &format!("serving content from peers ({bytes} bytes)"))
            }
            ControlRequest::RequestFailed { reason } => {
                self.reporter.report(Reason::Failed, &format!("failed to serve a request: {reason}"))
            }
            ControlRequest::Fatal { reason, published } => self.reporter.report_fatal(&reason, published),
            ControlRequest::BadPeer { peer_id } => {
                if let Ok(p) = peer_id.parse::<PeerId>() {
                    self.bad_peers.insert(p, Instant::now());
                    self.publish_members();
                }
            }
            ControlRequest::ContentChanged => self.rescan_now = true,
        }
    }

    fn find_providers(&mut self, key: String, reply: oneshot::Sender<Vec<Provider>>) {
        if let Some(id) = self.lookup_by_key.get(&key) {
            if let Some(l) = self.lookups.get_mut(id) {
                l.waiters.push(reply);
                return;
            }
        }
        let id = self.swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&key));
        self.lookup_by_key.insert(key.clone(), id);
        self.lookups.insert(id, Lookup { key, waiters: vec![reply], started: Instant::now() });
    }

    fn finish_lookup(&mut self, id: QueryId, providers: Vec<Provider>) {
        if let Some(l) = self.lookups.remove(&id) {
            self.lookup_by_key.remove(&l.key);
            if !providers.is_empty() {
                self.metrics.peer_discovery_duration.observe(l.started.elapsed().as_secs_f64());
            }
            for w in l.waiters {
                let _ = w.send(providers.clone());
            }
        }
        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
            q.finish();
        }
    }

    /// Providers we can fetch from: not us, not penalised, and with a known HTTP address.
    fn usable(&mut self, found: HashSet<PeerId>) -> Vec<Provider> {
        let me = *self.swarm.local_peer_id();
        let now = Instant::now();
        self.bad_peers.retain(|_, t| now.duration_since(*t) < BAD_PEER_PENALTY);
        let mut out = Vec::new();
        for p in found {
            if p == me || self.bad_peers.contains_key(&p) {
                continue;
            }
            match self.peers.get(&p) {
                Some(PeerEntry { ip: Some(ip), http_port, connections, .. }) if *connections > 0 => {
                    out.push(Provider {
                        peer_id: p.to_string(),
                        http: SocketAddr::new(*ip, http_port.unwrap_or(self.http_port)),
                    });
                }
                _ => {
                    // Not connected: dial it so that the next lookup can use it.
                    let _ = self.swarm.dial(p);
                }
            }
        }
        out
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        self.p2p_metrics.record(&ev);
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => {
                self.p2p_metrics.record(&ev);
                self.on_kad_event(ev);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(ev)) => {
                self.p2p_metrics.record(&ev);
                if let identify::Event::Received { peer_id, info, .. } = ev {
                    let entry = self.peers.entry(peer_id).or_default();
                    entry.http_port = p2p::http_port_from_agent(&info.agent_version);
                    self.publish_members();
                    if info.protocols.iter().any(|p| p.as_ref() == p2p::KAD_PROTOCOL) {
                        for addr in info.listen_addrs.into_iter().filter(p2p::routable) {
                            self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                        }
                    }
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                let entry = self.peers.entry(peer_id).or_default();
                entry.connections += 1;
                if entry.ip.is_none() || endpoint.is_dialer() {
                    entry.ip = p2p::ip_of(endpoint.get_remote_address());
                }
                self.peers_changed();
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, .. } => {
                if let Some(e) = self.peers.get_mut(&peer_id) {
                    e.connections = num_established;
                }
                self.peers_changed();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, %error, "dial failed");
            }
            SwarmEvent::NewListenAddr { address, .. } => tracing::debug!(%address, "libp2p listening"),
            _ => {}
        }
    }

    fn on_kad_event(&mut self, ev: kad::Event) {
        if matches!(ev, kad::Event::RoutingUpdated { .. }) {
            self.publish_members();
            return;
        }
        if let kad::Event::OutboundQueryProgressed { id, result: QueryResult::GetProviders(res), step, .. } = ev {
            if !self.lookups.contains_key(&id) {
                return;
            }
            match res {
                Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                    let usable = self.usable(providers);
                    if !usable.is_empty() || step.last {
                        self.finish_lookup(id, usable);
                    }
                }
                Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) | Err(_) => {
                    self.finish_lookup(id, Vec::new())
                }
            }
        }
    }

    /// Tells the shards which peers can be a digest's home: every peer in the routing table (so
    /// that nodes connected to different subsets still agree) and every connected one, unless
    /// penalised. A peer whose data-plane port identify has not told yet is assumed to use ours,
    /// as every pod of the DaemonSet does.
    fn publish_members(&mut self) {
        let now = Instant::now();
        self.bad_peers.retain(|_, t| now.duration_since(*t) < BAD_PEER_PENALTY);
        let mut known: HashMap<PeerId, SocketAddr> = HashMap::new();
        let http_port = self.http_port;
        let peers = &self.peers;
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                let id = *entry.node.key.preimage();
                let Some(ip) = entry.node.value.iter().find_map(p2p::ip_of) else { continue };
                let port = peers.get(&id).and_then(|e| e.http_port).unwrap_or(http_port);
                known.insert(id, SocketAddr::new(ip, port));
            }
        }
        for (id, e) in &self.peers {
            if let (true, Some(ip)) = (e.connections > 0, e.ip) {
                known.insert(*id, SocketAddr::new(ip, e.http_port.unwrap_or(http_port)));
            }
        }
        let members = known
            .into_iter()
            .filter(|(id, _)| !self.bad_peers.contains_key(id))
            .map(|(id, http)| (id.to_bytes(), Provider { peer_id: id.to_string(), http }));
        let me = self.swarm.local_peer_id().to_bytes();
        self.members.store(Arc::new(Members::new(&me, members)));
    }

    fn connected_peers(&self) -> usize {
        self.peers.values().filter(|p| p.connections > 0).count()
    }

    fn peers_changed(&mut self) {
        self.publish_members();
        let n = self.connected_peers();
        let before = self.health.peers.swap(n, Ordering::Relaxed);
        self.metrics.peers.set(n as i64);
        if before == 0 && n > 0 {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
            self.reporter.report(Reason::Connected, &format!("joined the p2p network ({n} peers)"));
            self.republish_all();
        } else if before > 0 && n == 0 {
            self.reporter.report(Reason::Disconnected, "lost every peer");
        }
    }

    fn apply_scan(&mut self, result: Option<LocalIndex>) {
        let Some(index) = result else {
            self.health.containerd.store(false, Ordering::Relaxed);
            return;
        };
        self.health.containerd.store(true, Ordering::Relaxed);
        let keys = index.keys();
        let kad = &mut self.swarm.behaviour_mut().kad;
        for gone in self.advertised.difference(&keys) {
            kad.stop_providing(&kad::RecordKey::new(gone));
        }
        let mut added = 0;
        for new in keys.difference(&self.advertised) {
            if kad.start_providing(kad::RecordKey::new(new)).is_ok() {
                added += 1;
            }
        }
        tracing::debug!(keys = keys.len(), added, "local content rescanned");
        self.metrics.advertised_keys.set(keys.len() as i64);
        self.advertised = keys;
        self.index.store(Arc::new(index));
    }

    /// After joining (or rejoining) the network, announce everything again: records stored while
    /// alone reached nobody.
    fn republish_all(&mut self) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        for k in &self.advertised {
            let _ = kad.start_providing(kad::RecordKey::new(k));
        }
    }

    async fn maintain(&mut self) {
        if !self.bad_peers.is_empty() {
            // A penalty that ran out puts the peer back among the homes.
            self.publish_members();
        }
        if self.connected_peers() == 0 {
            self.dial_bootstrap().await;
        }
    }

    /// `--bootstrap kubernetes`: dial a few of the peerd pods we are not connected to yet. A few
    /// are enough to join the DHT; Kademlia finds the rest, and no pod is special.
    fn dial_pods(&mut self, ips: Vec<IpAddr>, port: u16) {
        const DIAL_AT_MOST: usize = 5;
        let connected: HashSet<IpAddr> =
            self.peers.values().filter(|p| p.connections > 0).filter_map(|p| p.ip).collect();
        if connected.len() >= DIAL_AT_MOST {
            self.pod_ips = ips;
            return;
        }
        // Start at a different place on each node so that not every node dials the same pods.
        let offset = self.swarm.local_peer_id().to_bytes().last().copied().unwrap_or(0) as usize;
        let candidates: Vec<&IpAddr> = ips.iter().filter(|ip| !connected.contains(ip)).collect();
        for i in 0..candidates.len().min(DIAL_AT_MOST - connected.len()) {
            let ip = candidates[(offset + i) % candidates.len()];
            if let Some(addr) = p2p::bootstrap_addr(&SocketAddr::new(*ip, port).to_string()) {
                let _ = self.swarm.dial(addr);
            }
        }
        self.pod_ips = ips;
    }

    async fn dial_bootstrap(&mut self) {
        let addrs: Vec<Multiaddr> = match &self.bootstrap {
            Bootstrap::None => Vec::new(),
            Bootstrap::Kubernetes => {
                let port = self.router_port;
                self.pod_ips
                    .iter()
                    .filter_map(|ip| p2p::bootstrap_addr(&SocketAddr::new(*ip, port).to_string()))
                    .collect()
            }
            Bootstrap::Static(list) => list.iter().filter_map(|e| p2p::bootstrap_addr(e)).collect(),
            Bootstrap::Dns { name, port } => match tokio::net::lookup_host((name.as_str(), *port)).await {
                Ok(it) => it.filter_map(|sa| p2p::bootstrap_addr(&sa.to_string())).collect(),
                Err(e) => {
                    tracing::warn!(%name, error = %e, "bootstrap DNS lookup failed");
                    Vec::new()
                }
            },
        };
        for addr in addrs {
            if let Some(peer) = p2p::peer_id_of(&addr) {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %e, "bootstrap dial failed");
            }
        }
    }
}
