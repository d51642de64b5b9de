"""A node alone: every request misses, containerd falls back to the registry, and the mirror in
the path costs the pull less than a second (the issue's bound)."""

from conftest import http, metrics

MAX_ADDED_SECONDS = 1.0


def _timed_pull(lab, node, img):
    secs = lab.pull_seconds(node, img)
    lab.check(node, img)
    lab.rmi(node, img)
    return secs


def test_alone_falls_back_to_registry_quickly(lab):
    img = lab.push_random("alone", layers=4, size_mib=8)
    node = 3
    for other in (1, 2):
        lab.stop_peerd(other)

    # Without a mirror: peerd stopped, the connection is refused and containerd goes straight on.
    lab.stop_peerd(node)
    _timed_pull(lab, node, img)  # warms the registry's page cache
    direct = min(_timed_pull(lab, node, img) for _ in range(2))

    # With a mirror that has nobody to ask: its bootstrap peers are all down. (The lab always
    # passes --bootstrap static:<the other nodes>, so `--bootstrap none` cannot be added.)
    lab.start_peerd(node)
    assert metrics(node).get("peerd_peers") == 0
    ready = http(node, "GET", "/readyz", port=5004)
    assert ready.status != 200, f"a node that reaches no peer and is not alone by configuration is not ready: {ready}"
    misses = metrics(node).get("peerd_requests_total", code="404")
    mirrored = min(_timed_pull(lab, node, img) for _ in range(2))
    assert metrics(node).get("peerd_requests_total", code="404") > misses, "containerd never asked peerd"

    counts = {d: lab.registry_log_count(d) for d in img.blobs}
    assert all(n == 5 for n in counts.values()), f"every pull must have come from the registry: {counts}"
    print(f"pull without mirror {direct:.3f} s, through a lonely peerd {mirrored:.3f} s")
    assert mirrored - direct < MAX_ADDED_SECONDS, (
        f"peerd with no peers added {mirrored - direct:.3f} s to a pull ({direct:.3f} s without a mirror)"
    )
