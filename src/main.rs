//! peerd: a peer-to-peer, pull-only OCI registry mirror for Kubernetes nodes.
//!
//! `main` wires the rooms together: config → control thread (libp2p, containerd, metrics port)
//! → data-plane shards. Everything below returns typed errors; `anyhow` lives only here.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::Parser;
use prometheus_client::registry::Registry;

use peerd::config::{self, Cli, Command, ConfigureArgs, MirrorArgs, RunConfig};
use peerd::{cache, control, dataplane, hosts_config, messages, metrics, store, sys, upstream};

const GIT_REVISION: &str = match option_env!("PEERD_GIT_REVISION") {
    Some(r) => r,
    None => "unknown",
};
/// The dial timeout written into hosts.toml: containerd falls back quickly when peerd is down.
const MIRROR_DIAL_TIMEOUT: Duration = Duration::from_millis(200);

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = config::apply_config_file(&args) {
        eprintln!("peerd: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let cli = Cli::parse_from(&args);
    if cli.version {
        print_version();
        return std::process::ExitCode::SUCCESS;
    }
    let result = match cli.command {
        Some(Command::Run(cfg)) => run(*cfg),
        Some(Command::ConfigureContainerd(args)) => configure_containerd(args),
        Some(Command::Version) | None => {
            print_version();
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_version() {
    println!("peerd {} (git {})", env!("CARGO_PKG_VERSION"), GIT_REVISION);
}

fn init_logging(level: &str) {
    // Our own crate logs at the chosen level; the dependencies' chatter only from warn up.
    let filter = tracing_subscriber::EnvFilter::try_new(format!("warn,peerd={level}"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,peerd=info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

fn mirror_config(m: &MirrorArgs) -> hosts_config::MirrorConfig {
    hosts_config::MirrorConfig {
        hosts: m.hosts(),
        mirrors: m.mirrors.clone(),
        config_path: m.containerd_hosts_config_path.clone(),
        dial_timeout: MIRROR_DIAL_TIMEOUT,
    }
}

fn configure_containerd(args: ConfigureArgs) -> anyhow::Result<()> {
    let files = if args.restore {
        hosts_config::restore(&args.mirror.containerd_hosts_config_path)?
    } else {
        hosts_config::configure(&mirror_config(&args.mirror))?
    };
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

fn run(cfg: RunConfig) -> anyhow::Result<()> {
    init_logging(&cfg.log_level);
    let bootstrap = cfg.bootstrap().map_err(anyhow::Error::msg)?;
    match sys::raise_fd_limit() {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
    if cfg.add_mirror_configuration {
        let files = hosts_config::configure(&mirror_config(&cfg.mirror)).context("writing hosts.toml")?;
        tracing::info!(files = files.len(), "containerd mirror configuration written");
    }
    let shards = cfg.shard_count();
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(shards, &mut registry);
    let (control_handle, control_rx) = messages::channel();
    let index: store::SharedIndex = Arc::new(ArcSwap::from_pointee(store::LocalIndex::default()));
    let cache_dir = cfg.data_dir.join("cache");
    let content = store::ContentStore::new(&cfg.content_dir).with_cache(&cache_dir);
    let members: messages::SharedMembers = Arc::default();

    let control = control::spawn(
        control::ControlConfig {
            router_addr: cfg.router_addr,
            prom_addr: cfg.prom_addr,
            http_port: cfg.http_addr.port(),
            bootstrap,
            data_dir: cfg.data_dir.clone(),
            containerd_socket: cfg.containerd_socket.clone(),
            namespace: cfg.containerd_namespace.clone(),
            store: content.clone(),
            members: members.clone(),
            cache_max_bytes: cfg.cache_size_mib.saturating_mul(1 << 20),
        },
        control_rx,
        index.clone(),
        metrics.clone(),
        registry,
    )?;

    let registries = cfg.mirrored_registries();
    // What pull-through may fetch: the registries --hosts names, or (all) public https hosts.
    let egress = peerd::egress::Egress::new(&cfg.upstream_urls());
    let serve_cfg = dataplane::ServeConfig {
        default_registry: (registries.len() == 1).then(|| registries[0].clone()),
        registries,
        lookup_timeout: cfg.lookup_timeout(),
        hedge_delay: cfg.hedge_delay(),
        resolve_latest_tag: cfg.resolve_latest_tag,
        upstreams: cfg.upstream_urls(),
        egress: egress.clone(),
    };
    let pull_through = if cfg.pull_through {
        let blob_cache = Arc::new(cache::BlobCache::new(&cache_dir).context("creating the pull-through cache")?);
        let upstream = upstream::spawn(blob_cache.clone(), metrics.clone(), control_handle.clone(), &egress)?;
        Some(dataplane::PullThrough { cache: blob_cache, upstream, members })
    } else {
        None
    };
    let engine = dataplane::Engine::choose(cfg.io_engine);
    let shared = dataplane::Shared {
        store: content,
        index,
        control: control_handle.clone(),
        metrics,
        cfg: serve_cfg,
        pull_through,
    };
    let _shards = match dataplane::start(shards, cfg.http_addr, engine, shared) {
        Ok(s) => s,
        Err(e) => {
            // Operators see this on the pod (P2PFailed), not only in the log of a crash loop.
            let (published, done) = std::sync::mpsc::channel();
            control_handle
                .send(messages::ControlRequest::Fatal { reason: format!("failed to start: {e:#}"), published });
            let _ = done.recv_timeout(Duration::from_secs(10));
            return Err(e);
        }
    };

    // The control thread returns on SIGTERM/SIGINT; the shards end with the process.
    match control.join() {
        Ok(r) => r,
        Err(_) => anyhow::bail!("control thread panicked"),
    }
}
