"""A node alone, and the mirror in the path costs the pull less than a second (the issue's bound).

With pull-through (the default) the lonely node is every blob's home: it fetches each blob from the
registry itself and streams it to containerd. With `--pull-through false` every blob request misses
and containerd falls back to the registry."""

import pytest

from conftest import http, metrics

MAX_ADDED_SECONDS = 1.0


def _timed_pull(lab, node, img):
    secs = lab.pull_seconds(node, img)
    lab.check(node, img)
    lab.rmi(node, img)
    return secs


@pytest.mark.parametrize("pull_through", [True, False], ids=["pull-through", "no-pull-through"])
def test_alone_gets_the_registry_quickly(lab, pull_through):
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
    lab.start_peerd(node, *([] if pull_through else ["--pull-through", "false"]))
    assert metrics(node).get("peerd_peers") == 0
    ready = http(node, "GET", "/readyz", port=5004)
    assert ready.status != 200, f"a node that reaches no peer and is not alone by configuration is not ready: {ready}"
    before = metrics(node)
    gets_before = {d: lab.registry_log_count(d) for d in img.blobs}
    assert all(n == 3 for n in gets_before.values()), f"three direct pulls, three GETs per blob: {gets_before}"
    sizes = {d: lab.registry_blob_file(d).stat().st_size for d in img.blobs}
    # With pull-through the first pull through the mirror is the one that is timed: a second one
    # may be served from the cache.
    mirrored = [_timed_pull(lab, node, img) for _ in range(2)]
    after = metrics(node)
    gets = {d: lab.registry_log_count(d) - gets_before[d] for d in img.blobs}
    fetched = after.get("peerd_bytes_fetched_total", **{"from": "upstream"}) - before.get(
        "peerd_bytes_fetched_total", **{"from": "upstream"}
    )
    if pull_through:
        served = sum(
            after.get("peerd_bytes_served_total", source=s) - before.get("peerd_bytes_served_total", source=s)
            for s in ("upstream", "local")
        )
        assert served >= 2 * img.layer_bytes, f"peerd served {served:.0f} bytes of two pulls, want >= {2 * img.layer_bytes}"
        assert all(n >= 1 for n in gets.values()), f"registry GETs per blob during the mirrored pulls: {gets}"
        # Every registry download during the mirrored pulls was peerd's, none containerd's.
        assert fetched == sum(gets[d] * sizes[d] for d in img.blobs), (fetched, gets, sizes)
    else:
        misses = after.get("peerd_requests_total", code="404") - before.get("peerd_requests_total", code="404")
        assert misses > 0, "containerd never asked peerd"
        assert all(n == 2 for n in gets.values()), f"every mirrored pull must have come from the registry: {gets}"
        assert fetched == 0, f"peerd fetched {fetched:.0f} bytes from upstream with pull-through off"
    through = mirrored[0] if pull_through else min(mirrored)
    print(f"pull without mirror {direct:.3f} s, through a lonely peerd {mirrored} s")
    assert through - direct < MAX_ADDED_SECONDS, (
        f"peerd with no peers added {through - direct:.3f} s to a pull ({direct:.3f} s without a mirror)"
    )
