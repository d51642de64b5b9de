"""Pulling through peerd: the first node gets the image from the registry, the others from peers.

Node 1 pulls straight from the registry (`lab.seed`), so that the peer path is all that nodes 2
and 3 can use: with pull-through, node 1's pull through peerd would leave some blobs in the caches of
their home nodes, and nodes 2 and 3 could serve those from their own cache. (The same spread with
pull-through is in test_pull_through.py.)"""

from conftest import NODES, metrics


def _served(node, source):
    return metrics(node).get("peerd_bytes_served_total", source=source)


def _pull_through_peers(lab, img):
    nodes = range(1, NODES + 1)
    before = {i: (_served(i, "peer"), _served(i, "local")) for i in nodes}
    fetched_before = {i: metrics(i).get("peerd_bytes_fetched_total", **{"from": "peer"}) for i in nodes}

    # Node 1 gets the image from the registry, past peerd; its peerd announces it.
    lab.seed(1, img)
    # Node 2 can only get it from node 1; node 3 from node 1 or node 2.
    lab.pull_and_advertise(2, img)
    lab.pull(3, img)

    for i in nodes:
        lab.check(i, img)
    # The registry saw exactly one download of each blob: node 1's.
    counts = {d: lab.registry_log_count(d) for d in img.blobs}
    assert all(n == 1 for n in counts.values()), f"registry GETs per blob (want 1 each): {counts}"

    after = {i: (_served(i, "peer"), _served(i, "local")) for i in nodes}
    peer_delta = {i: after[i][0] - before[i][0] for i in nodes}
    local_delta = {i: after[i][1] - before[i][1] for i in nodes}
    size = img.layer_bytes
    assert peer_delta[2] >= size, f"node 2 served {peer_delta[2]} bytes from peers, want >= {size}"
    assert peer_delta[3] >= size, f"node 3 served {peer_delta[3]} bytes from peers, want >= {size}"
    assert peer_delta[1] == 0, f"node 1 pulled from the registry, yet served {peer_delta[1]} bytes from peers"
    assert local_delta[1] >= size, f"node 1 served {local_delta[1]} bytes of its local content, want >= {size}"
    assert local_delta[1] + local_delta[2] >= 2 * size, f"local bytes served by nodes 1 and 2: {local_delta}"
    for i in (2, 3):
        fetched = metrics(i).get("peerd_bytes_fetched_total", **{"from": "peer"}) - fetched_before[i]
        assert fetched >= size, f"node {i} fetched {fetched} bytes from peers, want >= {size}"


def test_random_image_spreads_through_peers(lab):
    img = lab.push_random("spread", layers=4, size_mib=48)
    _pull_through_peers(lab, img)


def test_debian_image_spreads_through_peers(lab):
    img = lab.push_debian("debian")
    assert len(img.layers) == 1
    _pull_through_peers(lab, img)
