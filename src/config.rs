//! Command line, environment (`PEERD_<NAME>`) and config file, read → parse → validate.
//!
//! Precedence: flag, then environment, then the `--config` file (TOML, keys named like the
//! flags), then the default. The first block of flags keeps Azure Peerd's names and defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "peerd", about = "Peer-to-peer container image mirror", disable_version_flag = true)]
pub struct Cli {
    /// Print version and git revision.
    #[arg(short = 'V', long = "version", global = true)]
    pub version: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the daemon.
    Run(Box<RunConfig>),
    /// Write containerd hosts.toml files that point at the mirror (or --restore them).
    ConfigureContainerd(ConfigureArgs),
    /// Print version and git revision.
    Version,
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::to_owned).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IoEngine {
    /// io_uring when the kernel and seccomp allow it, else epoll.
    Auto,
    IoUring,
    Epoll,
}

#[derive(Debug, Clone, Args)]
pub struct MirrorArgs {
    /// Registries to mirror, comma-separated (empty: all).
    #[arg(long, env = "PEERD_HOSTS", value_delimiter = ',', default_value = "")]
    pub hosts: Vec<String>,
    /// Mirror endpoints written into hosts.toml.
    #[arg(long, env = "PEERD_MIRRORS", value_delimiter = ',', default_value = "http://localhost:30000")]
    pub mirrors: Vec<String>,
    /// Where containerd's hosts.toml files go.
    #[arg(long, env = "PEERD_CONTAINERD_HOSTS_CONFIG_PATH", default_value = "/etc/containerd/certs.d")]
    pub containerd_hosts_config_path: PathBuf,
}

impl MirrorArgs {
    pub fn hosts(&self) -> Vec<String> {
        self.hosts.iter().flat_map(|h| split_list(h)).collect()
    }
}

#[derive(Debug, Args)]
pub struct ConfigureArgs {
    #[command(flatten)]
    pub mirror: MirrorArgs,
    /// Put back the files that configure-containerd moved aside, and remove its own.
    #[arg(long)]
    pub restore: bool,
}

#[derive(Debug, Args)]
pub struct RunConfig {
    /// Config file (TOML; keys named like the flags).
    #[arg(long, env = "PEERD_CONFIG")]
    pub config: Option<PathBuf>,
    /// error, warn, info, debug or trace.
    #[arg(long, env = "PEERD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Plain HTTP: the OCI /v2 mirror and the /blobs/ streaming path.
    #[arg(long, env = "PEERD_HTTP_ADDR", default_value = "0.0.0.0:5000")]
    pub http_addr: SocketAddr,
    /// The same handlers over TLS (not served yet; accepted for compatibility).
    #[arg(long, env = "PEERD_HTTPS_ADDR", default_value = "0.0.0.0:5001")]
    pub https_addr: SocketAddr,
    /// libp2p listener.
    #[arg(long, env = "PEERD_ROUTER_ADDR", default_value = "0.0.0.0:5003")]
    pub router_addr: SocketAddr,
    /// Metrics, health and dashboard.
    #[arg(long, env = "PEERD_PROM_ADDR", default_value = "0.0.0.0:5004")]
    pub prom_addr: SocketAddr,
    #[command(flatten)]
    pub mirror: MirrorArgs,
    /// Write hosts.toml at start, as configure-containerd does.
    #[arg(long, env = "PEERD_ADD_MIRROR_CONFIGURATION")]
    pub add_mirror_configuration: bool,
    /// containerd gRPC socket.
    #[arg(long, env = "PEERD_CONTAINERD_SOCKET", default_value = "/run/containerd/containerd.sock")]
    pub containerd_socket: PathBuf,
    /// containerd namespace to advertise and serve.
    #[arg(long, env = "PEERD_CONTAINERD_NAMESPACE", default_value = "k8s.io")]
    pub containerd_namespace: String,
    /// containerd content store root.
    #[arg(long, env = "PEERD_CONTENT_DIR", default_value = "/var/lib/containerd/io.containerd.content.v1.content")]
    pub content_dir: PathBuf,
    /// kubernetes, dns:<name>[:port], static:<addr>[,<addr>...] or none.
    #[arg(long, env = "PEERD_BOOTSTRAP")]
    pub bootstrap: Option<String>,
    /// Persistent node identity and caches.
    #[arg(long, env = "PEERD_DATA_DIR", default_value = "/var/lib/peerd")]
    pub data_dir: PathBuf,
    /// Data-plane threads (default: usable cores).
    #[arg(long, env = "PEERD_SHARDS")]
    pub shards: Option<usize>,
    /// I/O engine of the data plane.
    #[arg(long, env = "PEERD_IO_ENGINE", value_enum, default_value = "auto")]
    pub io_engine: IoEngine,
    /// How long a request waits for the DHT to name a peer before answering 404 (containerd then
    /// goes to the next host).
    #[arg(long, env = "PEERD_LOOKUP_TIMEOUT_MS", default_value_t = 80)]
    pub lookup_timeout_ms: u64,
    /// How long a peer may take to start answering before a second peer is asked too.
    #[arg(long, env = "PEERD_HEDGE_DELAY_MS", default_value_t = 40)]
    pub hedge_delay_ms: u64,
    /// On a miss that no peer can serve, fetch the blob from the upstream registry once for the
    /// whole cluster (through the digest's home node) and share it while it arrives. Off: answer
    /// 404 and let containerd go to the registry itself.
    #[arg(long, env = "PEERD_PULL_THROUGH", default_value_t = true, action = clap::ArgAction::Set)]
    pub pull_through: bool,
    /// Size of the pull-through cache under `<data-dir>/cache`, in MiB. Blobs containerd holds
    /// itself are dropped from it first, then the oldest.
    #[arg(long, env = "PEERD_CACHE_SIZE_MIB", default_value_t = 4096)]
    pub cache_size_mib: u64,
    /// Resolve `latest` tags from peers too (off: a re-pushed latest must come from upstream).
    #[arg(long, env = "PEERD_RESOLVE_LATEST_TAG")]
    pub resolve_latest_tag: bool,
}

/// How this node finds its first peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    None,
    Kubernetes,
    Dns { name: String, port: u16 },
    Static(Vec<String>),
}

impl Bootstrap {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" | "" => Ok(Bootstrap::None),
            "kubernetes" => Ok(Bootstrap::Kubernetes),
            _ => {
                if let Some(list) = s.strip_prefix("static:") {
                    let addrs = split_list(list);
                    if addrs.is_empty() {
                        return Err("static: needs at least one address".into());
                    }
                    Ok(Bootstrap::Static(addrs))
                } else if let Some(rest) = s.strip_prefix("dns:") {
                    let (name, port) = match rest.rsplit_once(':') {
                        Some((n, p)) => (n, p.parse().map_err(|_| format!("bad port in {s}"))?),
                        None => (rest, 5003),
                    };
                    if name.is_empty() {
                        return Err("dns: needs a name".into());
                    }
                    Ok(Bootstrap::Dns { name: name.to_owned(), port })
                } else {
                    Err(format!("unknown bootstrap {s:?}: use kubernetes, dns:<name>[:port], static:<addrs> or none"))
                }
            }
        }
    }
}

impl RunConfig {
    pub fn bootstrap(&self) -> Result<Bootstrap, String> {
        match &self.bootstrap {
            Some(b) => Bootstrap::parse(b),
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Ok(Bootstrap::Kubernetes),
            None => Ok(Bootstrap::None),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    pub fn lookup_timeout(&self) -> Duration {
        Duration::from_millis(self.lookup_timeout_ms)
    }

    pub fn hedge_delay(&self) -> Duration {
        Duration::from_millis(self.hedge_delay_ms)
    }

    /// `host[:port]` → base URL of its API, for the registries `--hosts` names with a scheme.
    pub fn upstream_urls(&self) -> Vec<(String, String)> {
        self.mirror
            .hosts()
            .iter()
            .map(|h| {
                let host = registry_host(h);
                let scheme = if h.starts_with("http://") { "http" } else { "https" };
                let api = crate::upstream::api_host(&host).to_owned();
                (host, format!("{scheme}://{api}"))
            })
            .collect()
    }

    /// The registry hosts (`host[:port]`) that `--hosts` allows; empty means all.
    pub fn mirrored_registries(&self) -> Vec<String> {
        self.mirror.hosts().iter().map(|h| registry_host(h)).collect()
    }
}

/// `https://docker.io` → `docker.io`; `http://198.18.0.2:5000/` → `198.18.0.2:5000`.
pub fn registry_host(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.trim_end_matches('/').split('/').next().unwrap_or("").to_owned()
}

/// Applies a `--config` file by turning its keys into `PEERD_<KEY>` environment variables that
/// are not already set, so that flags and the environment keep precedence. Called before clap
/// parses.
pub fn apply_config_file(args: &[String]) -> anyhow::Result<()> {
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| args.iter().find_map(|a| a.strip_prefix("--config=").map(str::to_owned)))
        .or_else(|| std::env::var("PEERD_CONFIG").ok());
    let Some(path) = path else { return Ok(()) };
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading config file {path}: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("parsing config file {path}: {e}"))?;
    for (key, value) in table {
        let env = format!("PEERD_{}", key.to_ascii_uppercase().replace('-', "_"));
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        if std::env::var_os(&env).is_none() {
            std::env::set_var(env, value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_forms() {
        assert_eq!(Bootstrap::parse("none"), Ok(Bootstrap::None));
        assert_eq!(
            Bootstrap::parse("static:198.18.0.11:5003,/ip4/198.18.0.12/tcp/5003"),
            Ok(Bootstrap::Static(vec!["198.18.0.11:5003".into(), "/ip4/198.18.0.12/tcp/5003".into()]))
        );
        assert_eq!(Bootstrap::parse("dns:peerd.svc:7000"), Ok(Bootstrap::Dns { name: "peerd.svc".into(), port: 7000 }));
        assert_eq!(Bootstrap::parse("dns:peerd.svc"), Ok(Bootstrap::Dns { name: "peerd.svc".into(), port: 5003 }));
        assert!(Bootstrap::parse("static:").is_err());
        assert!(Bootstrap::parse("bogus").is_err());
    }

    #[test]
    fn registry_hosts() {
        assert_eq!(registry_host("https://docker.io"), "docker.io");
        assert_eq!(registry_host("http://198.18.0.2:5000/"), "198.18.0.2:5000");
        assert_eq!(registry_host("ghcr.io"), "ghcr.io");
    }

    #[test]
    fn defaults_match_azure_peerd() {
        let cli = Cli::try_parse_from(["peerd", "run"]).unwrap();
        let Some(Command::Run(c)) = cli.command else { panic!() };
        assert_eq!(c.http_addr.port(), 5000);
        assert_eq!(c.https_addr.port(), 5001);
        assert_eq!(c.router_addr.port(), 5003);
        assert_eq!(c.prom_addr.port(), 5004);
        assert_eq!(c.containerd_namespace, "k8s.io");
        assert_eq!(c.mirror.mirrors, vec!["http://localhost:30000".to_string()]);
    }
}
