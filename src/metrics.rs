//! Every metric peerd exports, on one prometheus-client `Registry`.
//!
//! The per-request counters live in one cache-padded block per shard and are written only by
//! that shard (relaxed atomics, never contended); a `Collector` sums them into the exposition at
//! scrape time. Histograms and rare counters use prometheus-client families; shards resolve their
//! handles once and keep them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Where served bytes came from. (`Upstream` is served once pull-through lands; the label is
/// exported from the start so that dashboards need no change.)
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Local = 0,
    Peer = 1,
    Upstream = 2,
}
const SOURCES: [&str; 3] = ["local", "peer", "upstream"];

/// Which handler answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handler {
    Oci = 0,
    Files = 1,
}
const HANDLERS: [&str; 2] = ["oci", "files"];
const CODES: [u16; 13] = [200, 206, 400, 403, 404, 405, 408, 413, 416, 431, 500, 502, 503];

fn code_index(code: u16) -> usize {
    CODES.iter().position(|&c| c == code).unwrap_or(CODES.len())
}

/// One shard's counters. Written by its shard only.
#[derive(Debug, Default)]
pub struct ShardStats {
    bytes_served: [AtomicU64; 3],
    requests: [[AtomicU64; CODES.len() + 1]; 2],
    connections: AtomicI64,
    busy_nanos: AtomicU64,
    lookups_in_flight: AtomicI64,
}

impl ShardStats {
    pub fn served(&self, source: Source, bytes: u64) {
        self.bytes_served[source as usize].fetch_add(bytes, Relaxed);
    }
    pub fn request(&self, handler: Handler, code: u16) {
        self.requests[handler as usize][code_index(code)].fetch_add(1, Relaxed);
    }
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
    }
    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }
    /// Records the CPU time the shard's thread has used so far (it is busy exactly when it uses
    /// CPU; waiting in the event loop costs none).
    pub fn set_busy(&self, cpu: std::time::Duration) {
        self.busy_nanos.store(cpu.as_nanos() as u64, Relaxed);
    }
    pub fn lookup_started(&self) {
        self.lookups_in_flight.fetch_add(1, Relaxed);
    }
    pub fn lookup_finished(&self) {
        self.lookups_in_flight.fetch_sub(1, Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub handler: &'static str,
    pub method: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FromLabels {
    pub from: &'static str,
}

/// Handles to every metric; cloned into each shard and the control thread.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub shards: Arc<Vec<CachePadded<ShardStats>>>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub peer_discovery_duration: Histogram,
    pub peer_response_speed: Family<OpLabels, Histogram>,
    pub upstream_response_speed: Family<OpLabels, Histogram>,
    pub bytes_fetched: Family<FromLabels, Counter>,
    pub digest_mismatch: Family<FromLabels, Counter>,
    pub advertised_keys: Gauge,
    pub peers: Gauge,
}

fn speed_histogram() -> Histogram {
    // MiB/s from 1 to ~16 GiB/s.
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

impl Metrics {
    /// Creates the metrics and registers them (and the per-shard collector) on `registry`.
    pub fn new(shard_count: usize, registry: &mut Registry) -> Self {
        let shards: Arc<Vec<CachePadded<ShardStats>>> =
            Arc::new((0..shard_count).map(|_| CachePadded::new(ShardStats::default())).collect());
        let m = Metrics {
            shards: shards.clone(),
            request_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.5, 16))),
            peer_discovery_duration: Histogram::new(exponential_buckets(0.0002, 2.0, 16)),
            peer_response_speed: Family::new_with_constructor(speed_histogram),
            upstream_response_speed: Family::new_with_constructor(speed_histogram),
            bytes_fetched: Family::default(),
            digest_mismatch: Family::default(),
            advertised_keys: Gauge::default(),
            peers: Gauge::default(),
        };
        registry.register(
            "peerd_request_duration_seconds",
            "Time to answer a request, by handler, method and status code",
            m.request_duration.clone(),
        );
        registry.register(
            "peerd_peer_discovery_duration_seconds",
            "Time from asking the DHT to the first provider",
            m.peer_discovery_duration.clone(),
        );
        registry.register(
            "peerd_peer_response_speed_mib_per_second",
            "Speed of content fetched from peers, MiB/s",
            m.peer_response_speed.clone(),
        );
        registry.register(
            "peerd_upstream_response_speed_mib_per_second",
            "Speed of content fetched from the upstream registry, MiB/s",
            m.upstream_response_speed.clone(),
        );
        registry.register("peerd_bytes_fetched", "Bytes fetched, by origin", m.bytes_fetched.clone());
        registry.register(
            "peerd_digest_mismatch",
            "Blobs whose bytes did not match their digest, by origin",
            m.digest_mismatch.clone(),
        );
        registry.register("peerd_advertised_keys", "Keys this node announces in the DHT", m.advertised_keys.clone());
        registry.register("peerd_peers", "Connected peers", m.peers.clone());
        registry.register_collector(Box::new(ShardCollector { shards }));
        // Counters that alerts watch exist at zero from the start, so that the first event is an
        // increase and not a new series.
        for from in ["peer", "upstream"] {
            let _ = m.bytes_fetched.get_or_create(&FromLabels { from });
        }
        for from in ["peer", "upstream", "local"] {
            let _ = m.digest_mismatch.get_or_create(&FromLabels { from });
        }
        m
    }

    pub fn shard(&self, id: usize) -> &ShardStats {
        &self.shards[id]
    }
}

#[derive(Debug)]
struct ShardCollector {
    shards: Arc<Vec<CachePadded<ShardStats>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardSource {
    shard: String,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardHandlerCode {
    shard: String,
    handler: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardOnly {
    shard: String,
}

impl Collector for ShardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let mut e = encoder.encode_descriptor(
                "peerd_bytes_served",
                "Bytes sent to clients, by shard and by where they came from",
                None,
                MetricType::Counter,
            )?;
            for (i, s) in self.shards.iter().enumerate() {
                for (src, name) in SOURCES.iter().enumerate() {
                    let labels = ShardSource { shard: i.to_string(), source: name };
                    ConstCounter::new(s.bytes_served[src].load(Relaxed)).encode(e.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut e = encoder.encode_descriptor(
                "peerd_requests",
                "Requests answered, by shard",
                None,
                MetricType::Counter,
            )?;
            for (i, s) in self.shards.iter().enumerate() {
                for (h, handler) in HANDLERS.iter().enumerate() {
                    for (c, counter) in s.requests[h].iter().enumerate() {
                        let v = counter.load(Relaxed);
                        if v == 0 {
                            continue;
                        }
                        let code = CODES.get(c).map(|c| c.to_string()).unwrap_or_else(|| "other".into());
                        let labels = ShardHandlerCode { shard: i.to_string(), handler, code };
                        ConstCounter::new(v).encode(e.encode_family(&labels)?)?;
                    }
                }
            }
        }
        type Read = fn(&ShardStats) -> i64;
        let gauges: [(&str, &str, Read); 2] = [
            ("peerd_shard_connections", "Open client connections, by shard", |s| s.connections.load(Relaxed)),
            ("peerd_shard_queue_depth", "Requests waiting on a peer lookup, by shard", |s| {
                s.lookups_in_flight.load(Relaxed)
            }),
        ];
        for (name, help, get) in gauges {
            let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (i, s) in self.shards.iter().enumerate() {
                ConstGauge::new(get(s)).encode(e.encode_family(&ShardOnly { shard: i.to_string() })?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "peerd_shard_busy_seconds",
            "CPU time each shard's thread has used",
            None,
            MetricType::Counter,
        )?;
        for (i, s) in self.shards.iter().enumerate() {
            let secs = s.busy_nanos.load(Relaxed) as f64 / 1e9;
            ConstCounter::new(secs).encode(e.encode_family(&ShardOnly { shard: i.to_string() })?)?;
        }
        Ok(())
    }
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_counters_appear_with_their_labels() {
        let mut reg = Registry::default();
        let m = Metrics::new(2, &mut reg);
        m.shard(1).served(Source::Peer, 42);
        m.shard(0).request(Handler::Oci, 404);
        m.shard(0).connection_opened();
        m.bytes_fetched.get_or_create(&FromLabels { from: "peer" }).inc_by(7);
        m.request_duration.get_or_create(&RequestLabels { handler: "oci", method: "GET", code: 200 }).observe(0.01);
        let text = render(&reg);
        assert!(text.contains(r#"peerd_bytes_served_total{shard="1",source="peer"} 42"#), "{text}");
        assert!(text.contains(r#"peerd_requests_total{shard="0",handler="oci",code="404"} 1"#), "{text}");
        assert!(text.contains(r#"peerd_shard_connections{shard="0"} 1"#), "{text}");
        assert!(text.contains(r#"peerd_bytes_fetched_total{from="peer"} 7"#), "{text}");
        assert!(
            text.contains(r#"peerd_request_duration_seconds_count{handler="oci",method="GET",code="200"} 1"#),
            "{text}"
        );
    }
}
