"""The metrics port: health, readiness and the metric names that the SPEC makes a contract."""

import pytest

from conftest import NODES, http, metrics

# (name, type) from SPEC.md. prometheus-client names a counter family without `_total` in # TYPE.
CONTRACT = {
    "peerd_request_duration_seconds": "histogram",
    "peerd_peer_discovery_duration_seconds": "histogram",
    "peerd_peer_response_speed_mib_per_second": "histogram",
    "peerd_upstream_response_speed_mib_per_second": "histogram",
    "peerd_bytes_served_total": "counter",
    "peerd_bytes_fetched_total": "counter",
    "peerd_requests_total": "counter",
    "peerd_shard_connections": "gauge",
    "peerd_digest_mismatch_total": "counter",
    "peerd_advertised_keys": "gauge",
    "peerd_peers": "gauge",
}


def _types(node):
    text = http(node, "GET", "/metrics/prometheus", port=5004).body.decode()
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind.strip()
    return text, types


def _type_of(types, name, kind):
    base = name[: -len("_total")] if kind == "counter" else name
    return types.get(name) or types.get(base)


@pytest.mark.parametrize("node", range(1, NODES + 1))
def test_health_and_readiness(lab, node):
    assert http(node, "GET", "/healthz", port=5004).status == 200
    assert http(node, "GET", "/readyz", port=5004).status == 200


def test_metric_names_are_the_contract(lab):
    img = lab.push_random("metrics", layers=1, size_mib=2)
    upstream_before = _upstream_totals()
    lab.pull_and_advertise(1, img)  # through pull-through: the blobs' home nodes fetched from upstream
    lab.pull(2, img)  # node 2 now has fetched from a peer or its cache, and served requests
    text, types = _types(2)
    for name, kind in CONTRACT.items():
        if name == "peerd_digest_mismatch_total":
            continue  # the mismatch counter: see the test below and test_failover
        assert _type_of(types, name, kind) == kind, f"{name}: want a {kind}, the scrape says {_type_of(types, name, kind)!r}"
    for family, labels in [
        ("peerd_bytes_served_total", ("shard", "source")),
        ("peerd_bytes_fetched_total", ("from",)),
        ("peerd_requests_total", ("shard", "handler", "code")),
        ("peerd_shard_connections", ("shard",)),
        ("peerd_request_duration_seconds_count", ("handler", "method", "code")),
    ]:
        samples = [l for l in text.splitlines() if l.startswith(family + "{")]
        assert samples, f"no samples of {family}"
        assert all(all(f'{k}="' in s for k in labels) for s in samples), samples[:3]
    assert metrics(2).get("peerd_peer_discovery_duration_seconds_count") >= 1
    # The upstream side, on whichever nodes were the blobs' homes.
    speeds, fetched, served = (a - b for a, b in zip(_upstream_totals(), upstream_before))
    assert speeds >= 1, "no upstream fetch observed in peerd_upstream_response_speed_mib_per_second{op=\"blob\"}"
    assert fetched >= img.layer_bytes, f'peerd_bytes_fetched_total{{from="upstream"}} went up by {fetched}'
    assert served >= img.layer_bytes, f'peerd_bytes_served_total{{source="upstream"}} went up by {served}'


def _upstream_totals():
    """Cluster-wide (upstream fetches timed, bytes fetched from upstream, bytes served as upstream)."""
    scrapes = [metrics(i) for i in range(1, NODES + 1)]
    return (
        sum(m.get("peerd_upstream_response_speed_mib_per_second_count", op="blob") for m in scrapes),
        sum(m.get("peerd_bytes_fetched_total", **{"from": "upstream"}) for m in scrapes),
        sum(m.get("peerd_bytes_served_total", source="upstream") for m in scrapes),
    )


def test_alerting_counters_exist_before_their_first_event(lab):
    """`increase(peerd_digest_mismatch_total[5m]) > 0` can only fire on the first mismatch if the
    series exists (at 0) before it: a counter born at 1 shows no increase."""
    lab.stop_peerd(3)
    lab.start_peerd(3)
    text, types = _types(3)
    missing = [
        n for n in ("peerd_digest_mismatch_total", "peerd_bytes_fetched_total")
        if _type_of(types, n, "counter") != "counter" or not any(l.startswith(n + "{") for l in text.splitlines())
    ]
    assert not missing, f"absent from a fresh node's scrape until their first increment: {missing}"


def test_libp2p_metrics_share_the_endpoint(lab):
    """libp2p's own metrics (connections, Kademlia queries, identify) are on the same scrape."""
    text, types = _types(1)
    libp2p = {name for name in types if name.startswith("libp2p_")}
    assert any(n.startswith("libp2p_swarm_") for n in libp2p), sorted(libp2p)
    assert any(n.startswith("libp2p_kad_") for n in libp2p), sorted(libp2p)
    assert any(n.startswith("libp2p_identify_") for n in libp2p), sorted(libp2p)


def test_per_core_series_exist_for_every_shard(lab):
    """Every shard reports its own bytes, connections, queue depth and busy time."""
    m = metrics(1)
    shards = {labels["shard"] for labels, _ in m.select("peerd_shard_connections")}
    assert shards, "no per-shard connection gauge"
    for name in ("peerd_shard_queue_depth", "peerd_shard_busy_seconds_total", "peerd_bytes_served_total"):
        assert {labels["shard"] for labels, _ in m.select(name)} == shards, name
