//! The libp2p swarm: Kademlia under peerd's own protocol name, always in server mode, and
//! identify, through which peers learn each other's listen and HTTP addresses.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, identity, kad, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use prometheus_client::registry::Registry;

pub const KAD_PROTOCOL: &str = "/peerd/kad/1.0.0";
const IDENTIFY_PROTOCOL: &str = "/peerd/id/1.0.0";
/// Provider records live this long without a republish; announcements are republished well
/// before, and withdrawn content is forgotten by the network within this time.
pub const PROVIDER_TTL: Duration = Duration::from_secs(10 * 60);
const PROVIDER_REPUBLISH: Duration = Duration::from_secs(4 * 60);

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub kad: kad::Behaviour<MemoryStore>,
    pub identify: identify::Behaviour,
}

/// Loads the node's identity from `data_dir/identity.key`, creating it on first start, so that a
/// restarted node keeps its place in the DHT.
pub fn load_identity(data_dir: &Path) -> anyhow::Result<identity::Keypair> {
    let path = data_dir.join("identity.key");
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok(k) = identity::Keypair::from_protobuf_encoding(&bytes) {
            return Ok(k);
        }
        tracing::warn!(path = %path.display(), "identity file unreadable; creating a new identity");
    }
    let key = identity::Keypair::generate_ed25519();
    std::fs::create_dir_all(data_dir)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, key.to_protobuf_encoding()?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(key)
}

/// The agent string carries the HTTP port of the data plane, so that a peer found in the DHT can
/// be fetched from at the address its connection came from.
pub fn agent_version(http_port: u16) -> String {
    format!("peerd/{} http={http_port}", env!("CARGO_PKG_VERSION"))
}

pub fn http_port_from_agent(agent: &str) -> Option<u16> {
    agent.split_whitespace().find_map(|w| w.strip_prefix("http=")).and_then(|p| p.parse().ok())
}

pub fn build_swarm(
    key: identity::Keypair,
    http_port: u16,
    registry: &mut Registry,
) -> anyhow::Result<(Swarm<Behaviour>, libp2p::metrics::Metrics)> {
    let metrics = libp2p::metrics::Metrics::new(registry);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)?
        .with_dns()?
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let mut cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            cfg.set_provider_record_ttl(Some(PROVIDER_TTL))
                .set_provider_publication_interval(Some(PROVIDER_REPUBLISH))
                .set_query_timeout(Duration::from_secs(10))
                .set_parallelism(NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN))
                .set_periodic_bootstrap_interval(Some(Duration::from_secs(120)));
            // The default store caps a node at 1024 keys; a node holds thousands of layers.
            let store_cfg = MemoryStoreConfig {
                max_records: 1024,
                max_value_bytes: 64 * 1024,
                max_providers_per_key: 64,
                max_provided_keys: 1 << 20,
            };
            let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::with_config(peer_id, store_cfg), cfg);
            // Pod IPs are never confirmed as external addresses, so kad would stay a client.
            kad.set_mode(Some(kad::Mode::Server));
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                    .with_agent_version(agent_version(http_port)),
            );
            Behaviour { kad, identify }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok((swarm, metrics))
}

/// Turns a bootstrap entry (`host:port`, `ip:port` or a multiaddr) into a multiaddr to dial.
pub fn bootstrap_addr(entry: &str) -> Option<Multiaddr> {
    if entry.starts_with('/') {
        return entry.parse().ok();
    }
    if let Ok(sa) = entry.parse::<SocketAddr>() {
        let ip = match sa.ip() {
            IpAddr::V4(v4) => Protocol::Ip4(v4),
            IpAddr::V6(v6) => Protocol::Ip6(v6),
        };
        return Some(Multiaddr::empty().with(ip).with(Protocol::Tcp(sa.port())));
    }
    let (host, port) = entry.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(Multiaddr::empty().with(Protocol::Dns(host.to_owned().into())).with(Protocol::Tcp(port)))
}

/// The IP of a multiaddr, if it has one.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

pub fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Listen addresses worth telling Kademlia about: not loopback, not unspecified.
pub fn routable(addr: &Multiaddr) -> bool {
    match ip_of(addr) {
        Some(ip) => !ip.is_loopback() && !ip.is_unspecified(),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_entries() {
        assert_eq!(bootstrap_addr("198.18.0.11:5003").unwrap().to_string(), "/ip4/198.18.0.11/tcp/5003");
        assert_eq!(bootstrap_addr("peerd.ns.svc:5003").unwrap().to_string(), "/dns/peerd.ns.svc/tcp/5003");
        assert_eq!(bootstrap_addr("/ip4/198.18.0.12/tcp/5003").unwrap().to_string(), "/ip4/198.18.0.12/tcp/5003");
        assert!(bootstrap_addr("nonsense").is_none());
    }

    #[test]
    fn agent_carries_the_http_port() {
        assert_eq!(http_port_from_agent(&agent_version(5000)), Some(5000));
        assert_eq!(http_port_from_agent("rust-libp2p/1"), None);
    }
}
