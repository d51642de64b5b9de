"""Pull-through: a blob that no node has is fetched from the registry once for the whole cluster, by
the digest's home node, and streamed to every client that asks for it while it arrives.

What a user notices: nodes that pull a new image at the same time make the registry serve each blob
once, every node ends with byte-exact content, a blob the registry does not have (or serves wrong)
never turns into a bad image, and `--pull-through false` brings back the plain 404 on a miss.
"""

import hashlib
import os
import threading

import pytest

from conftest import MIB, NODES, http, metrics, node_ip, oci_path, wait_for

ALL = range(1, NODES + 1)
PEER_ONLY = {"X-Peerd-Peer": "1"}  # a peer's request: answered from the node's own content only
BLOB_HEADERS = ("content-length", "content-type", "docker-content-digest", "accept-ranges", "content-range")


# --------------------------------------------------------------------------- helpers


def _cluster_sum(name, **labels) -> float:
    return sum(metrics(i).get(name, **labels) for i in ALL)


def _fetched_upstream() -> float:
    """Bytes the whole cluster received from the registry (peerd's own fetches, not containerd's)."""
    return _cluster_sum("peerd_bytes_fetched_total", **{"from": "upstream"})


def _served(i, *sources) -> float:
    m = metrics(i)
    return sum(m.get("peerd_bytes_served_total", source=s) for s in sources)


def _registry_bytes(lab, digest) -> bytes:
    """The registry's copy of a blob, read from its storage (not through it: no access-log line)."""
    return lab.registry_blob_file(digest).read_bytes()


def _blob_sizes(lab, img) -> dict:
    return {d: lab.registry_blob_file(d).stat().st_size for d in img.blobs}


def _registry_gets(lab, img) -> dict:
    return {d: lab.registry_log_count(d) for d in img.blobs}


def _cache_leftovers(lab, digest) -> list:
    """Every file any node's pull-through cache holds for `digest` (complete or in flight)."""
    return [p for i in ALL for p in (lab.cache_file(i, digest), lab.cache_file(i, digest, partial=True)) if p.exists()]


def _partials(lab) -> list:
    found = []
    for i in ALL:
        d = lab.cache_file(i, "sha256:x").parent
        if d.is_dir():
            found += [p for p in d.iterdir() if p.name.endswith(".partial")]
    return found


def _get_outcome(node, path, timeout=60):
    """(response, None) for a complete response, (None, why) when the body or head was cut short."""
    try:
        return http(node, "GET", path, timeout=timeout), None
    except AssertionError as e:  # NoResponse, or "body cut short" from read_response
        return None, str(e)


def _oci_error_code(r) -> str:
    assert r.header("content-type", "").startswith("application/json"), r
    return r.json()["errors"][0]["code"]


def _background_get(node, path, timeout=120):
    """Starts a GET in a thread (a client that kicks off a pull-through); join() it later."""
    result = {}

    def run():
        result["outcome"] = _get_outcome(node, path, timeout=timeout)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def _home_fetching(lab, digest, min_bytes):
    """The node whose cache is receiving `digest` from upstream, once it holds `min_bytes` of it."""
    for i in ALL:
        p = lab.cache_file(i, digest, partial=True)
        try:
            if p.stat().st_size >= min_bytes:
                return i
        except OSError:
            pass
    return None


# --------------------------------------------------------------------------- the registry serves a blob once


def test_simultaneous_pulls_get_each_blob_from_the_registry_once(lab):
    """Three nodes pull a new image at the same moment: every node gets the exact image and the
    registry serves each blob once, to peerd (so the bytes peerd fetched are exactly the blobs)."""
    img = lab.push_random("together", layers=3, size_mib=4)
    sizes = _blob_sizes(lab, img)
    fetched_before = _fetched_upstream()
    # A registry slow enough that the three pulls overlap while the blobs are still arriving.
    lab.set_registry_rate("200mbit")
    try:
        pulls = {i: lab.spawn("pull", i, img.ref) for i in ALL}
        results = {i: lab.finish(p, timeout=240) for i, p in pulls.items()}
    finally:
        lab.set_registry_rate("none")
    failed = {i: r.stderr[-2000:] for i, r in results.items() if r.returncode != 0}
    assert not failed, f"simultaneous pulls failed on node(s) {sorted(failed)}:\n{failed}"
    for i in ALL:
        lab.check(i, img)
    gets = _registry_gets(lab, img)
    assert all(n == 1 for n in gets.values()), f"registry GETs per blob across the cluster (want 1 each): {gets}"
    fetched = _fetched_upstream() - fetched_before
    assert fetched == sum(sizes.values()), (
        f"the cluster fetched {fetched:.0f} bytes from upstream, the image's blobs are {sum(sizes.values())} bytes"
    )


def test_concurrent_gets_of_an_uncached_blob_share_one_upstream_fetch(lab):
    """Clients on every node ask for the same new blob at once: all get the exact bytes, from one
    registry download."""
    import concurrent.futures

    img = lab.push_random("shared", layers=1, size_mib=16)
    digest = img.layers[0]
    data = _registry_bytes(lab, digest)
    path = oci_path("blobs", img.repo, digest)
    fetched_before = _fetched_upstream()
    jobs = [i for i in ALL for _ in range(4)]
    lab.set_registry_rate("100mbit")  # the blob takes over a second to arrive: the clients overlap
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = list(pool.map(lambda i: (i, _get_outcome(i, path, timeout=120)), jobs))
    finally:
        lab.set_registry_rate("none")
    bad = []
    for i, (r, why) in results:
        if r is None:
            bad.append((i, why))
        elif r.status != 200 or r.body != data:
            bad.append((i, r.status, len(r.body), r.body == data))
    assert not bad, f"{len(bad)}/{len(results)} concurrent GETs were not complete and exact: {bad[:6]}"
    assert lab.registry_log_count(digest) == 1, f"registry GETs of the blob: {lab.registry_log_count(digest)}, want 1"
    assert _fetched_upstream() - fetched_before == len(data)


def test_first_pull_goes_upstream_once_then_spreads(lab):
    """One node pulls a new image: its peerd (or the blobs' home nodes) fetch each blob from the
    registry once; the next nodes get it from peers and caches, the registry sees no new GET."""
    img = lab.push_random("first", layers=2, size_mib=8)
    sizes = _blob_sizes(lab, img)
    size = img.layer_bytes
    served_upstream_before = {i: _served(i, "upstream") for i in ALL}
    node1_before = _served(1, "upstream", "peer")
    fetched_before = _fetched_upstream()
    speeds_before = _cluster_sum("peerd_upstream_response_speed_mib_per_second_count", op="blob")

    lab.pull_and_advertise(1, img)
    lab.check(1, img)
    gets = _registry_gets(lab, img)
    assert all(n == 1 for n in gets.values()), f"registry GETs per blob (want 1 each): {gets}"
    fetched = _fetched_upstream() - fetched_before
    assert fetched == sum(sizes.values()), f"fetched from upstream {fetched:.0f}, blobs are {sum(sizes.values())} bytes"
    up = {i: _served(i, "upstream") - served_upstream_before[i] for i in ALL}
    assert sum(up.values()) >= sum(sizes.values()), f"bytes served as source=upstream per node: {up}"
    # Node 1's containerd got the layers through peerd (from upstream here or from a home peer),
    # not from the registry behind peerd's back.
    through = _served(1, "upstream", "peer") - node1_before
    assert through >= size, f"node 1 served {through:.0f} bytes pulled through, want >= {size}"
    assert _cluster_sum("peerd_upstream_response_speed_mib_per_second_count", op="blob") > speeds_before

    fetched_before = _fetched_upstream()
    for i in (2, 3):
        before = _served(i, "local", "peer")
        lab.pull(i, img)
        lab.check(i, img)
        got = _served(i, "local", "peer") - before
        assert got >= size, f"node {i} served {got:.0f} bytes from its cache or peers, want >= {size}"
    assert _registry_gets(lab, img) == gets, f"later pulls went to the registry: {_registry_gets(lab, img)}"
    assert _fetched_upstream() == fetched_before, "later pulls made peerd fetch from upstream again"
    assert not _partials(lab), f"transfers left unfinished: {_partials(lab)}"


# --------------------------------------------------------------------------- the OCI API on an uncached blob


def test_head_of_a_blob_nobody_has(lab):
    """HEAD says 200 with the real size and digest; the GET that follows (on any node) serves the
    exact bytes; the registry served the blob once, and its home keeps it in its cache."""
    img = lab.push_random("head", layers=1, size_mib=3)
    digest = img.layers[0]
    data = _registry_bytes(lab, digest)
    path = oci_path("blobs", img.repo, digest)
    head = http(2, "HEAD", path, timeout=30)
    assert head.status == 200, head
    assert int(head.header("content-length")) == len(data), head
    assert head.header("docker-content-digest") == digest, head
    get = http(2, "GET", path, timeout=60)
    assert get.status == 200, get
    assert get.body == data
    assert {h: head.header(h) for h in BLOB_HEADERS} == {h: get.header(h) for h in BLOB_HEADERS}
    other = http(3, "GET", path, timeout=60)
    assert other.status == 200 and other.body == data, other
    assert lab.registry_log_count(digest) == 1, f"registry GETs of the blob: {lab.registry_log_count(digest)}, want 1"

    # The verified blob stays in exactly one node's cache (its home's), and that node offers it.
    holders = wait_for(
        lambda: [i for i in ALL if lab.cache_file(i, digest).exists()] or None, 10, "the blob to land in a cache"
    )
    assert len(holders) == 1, f"nodes whose cache holds the blob: {holders}"
    assert lab.cache_file(holders[0], digest).read_bytes() == data
    offered = http(holders[0], "HEAD", path, headers=PEER_ONLY)
    assert offered.status == 200, f"node {holders[0]} caches the blob but does not offer it to peers: {offered}"
    assert not _partials(lab), _partials(lab)


@pytest.mark.parametrize("spec", ["100-", "1000-1999", "-4096"])
def test_range_of_an_uncached_blob(lab, spec):
    img = lab.push_random("range", layers=1, size_mib=2)
    digest = img.layers[0]
    data = _registry_bytes(lab, digest)
    size = len(data)
    a, _, b = spec.partition("-")
    start, end = (size - int(b), size - 1) if a == "" else (int(a), int(b) if b else size - 1)
    path = oci_path("blobs", img.repo, digest)
    r = http(3, "GET", path, headers={"Range": f"bytes={spec}"}, timeout=60)
    assert r.status == 206, r
    assert r.header("content-range") == f"bytes {start}-{end}/{size}", r
    assert int(r.header("content-length")) == end - start + 1, r
    assert r.body == data[start : end + 1]
    # The whole blob is there for the next client, without a second download.
    full = http(1, "GET", path, timeout=60)
    assert full.status == 200 and full.body == data, full
    assert lab.registry_log_count(digest) == 1, f"registry GETs of the blob: {lab.registry_log_count(digest)}, want 1"


def test_blob_the_registry_does_not_have_is_404(lab):
    """No peer has it and the registry answers 404: peerd says 404 with BLOB_UNKNOWN (containerd goes
    to the registry itself), on every node, without hanging, and caches nothing."""
    img = lab.push_random("unknown", layers=1, size_mib=0.1)  # a repository the registry knows
    digest = "sha256:" + hashlib.sha256(os.urandom(64)).hexdigest()
    path = oci_path("blobs", img.repo, digest)
    codes = {}
    for node in ALL:
        for method in ("HEAD", "GET"):
            r = http(node, method, path, timeout=10)
            assert r.status == 404, (node, method, r)
            if method == "GET":
                codes[node] = _oci_error_code(r)
    # The registry was asked (this is "nobody, not even upstream, has it", not merely "no peer").
    asked = [l for l in lab.registry_access_log().splitlines() if f"/blobs/{digest}" in l]
    assert asked, "no node asked the registry for the blob"
    assert all('" 404 ' in l for l in asked), asked
    assert not _cache_leftovers(lab, digest), _cache_leftovers(lab, digest)
    assert all(c == "BLOB_UNKNOWN" for c in codes.values()), f"OCI error codes of the 404s per node: {codes}"


# --------------------------------------------------------------------------- bad bytes from upstream


def _flip(path, offset, length=4096):
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
        f.flush()
        os.fsync(f.fileno())


def test_corrupt_upstream_bytes_never_complete_a_response(lab):
    """The registry serves a blob whose bytes do not match its digest: no client gets a complete
    200, the mismatch is counted, nothing is cached or offered, and once the registry is fixed the
    blob is served again."""
    img = lab.push_random("badupstream", layers=1, size_mib=4)
    digest = img.layers[0]
    reg = lab.registry_blob_file(digest)
    original = reg.read_bytes()
    size = len(original)
    path = oci_path("blobs", img.repo, digest)
    mismatches = _cluster_sum("peerd_digest_mismatch_total", **{"from": "upstream"})
    try:
        _flip(reg, size // 2)
        assert reg.stat().st_size == size
        for node in (2, 1):  # a node whose home may be another node, then again once it failed
            r, why = _get_outcome(node, path)
            assert r is None or r.status != 200, (
                f"node {node} completed a 200 of {len(r.body)} bytes hashing to "
                f"sha256:{hashlib.sha256(r.body).hexdigest()} for {digest} (upstream is corrupt)"
            )
            print(f"node {node}: {why or r}")
        wait_for(
            lambda: _cluster_sum("peerd_digest_mismatch_total", **{"from": "upstream"}) > mismatches,
            10,
            'peerd_digest_mismatch_total{from="upstream"} to count the corrupt download',
        )
        wait_for(lambda: not _cache_leftovers(lab, digest), 10, "no cache file for the corrupt blob on any node")
        for node in ALL:
            r = http(node, "HEAD", path, headers=PEER_ONLY)
            assert r.status == 404, f"node {node} offers the corrupt blob to peers: {r}"
    finally:
        reg.write_bytes(original)
    assert lab.registry_blob_file(digest).read_bytes() == original
    fixed = http(3, "GET", path, timeout=60)
    assert fixed.status == 200 and fixed.body == original, fixed


# --------------------------------------------------------------------------- the home node fails


def _start_pull_through(lab, img, min_bytes):
    """Starts node 1 on a direct GET of the image's only layer, waits until the layer's home node
    is receiving it, and returns (home, thread)."""
    digest = img.layers[0]
    t, _ = _background_get(1, oci_path("blobs", img.repo, digest), timeout=180)
    home = wait_for(lambda: _home_fetching(lab, digest, min_bytes), 60, "a node to pull the layer through", interval=0.02)
    return home, t


def test_home_node_killed_mid_pull_through(lab):
    """The node fetching a blob from upstream dies while another node pulls the image through it:
    that pull still ends with the exact image."""
    img = lab.push_random("homekilled", layers=1, size_mib=64)
    digest = img.layers[0]
    size = img.layer_sizes[0]
    lab.set_registry_rate("100mbit")  # about 5 s for the layer: room to be caught in the middle
    client = None
    try:
        home, client = _start_pull_through(lab, img, 2 * MIB)
        puller = next(i for i in (2, 3) if i != home)
        pull = lab.spawn("pull", puller, img.ref)
        wait_for(
            lambda: lab.bytes_acked_to(home, node_ip(puller)) > 4 * MIB,
            60,
            f"node {home} (home) to stream the layer to node {puller}",
            interval=0.02,
        )
        arrived = lab.cache_file(home, digest, partial=True).stat().st_size
        lab.stop_peerd(home, "KILL")
        res = lab.finish(pull, timeout=240)
        assert res.returncode == 0, f"pull on node {puller} failed after its home node {home} died:\n{res.stderr[-3000:]}"
        assert arrived < size, "the upstream transfer was not caught in the middle"
    finally:
        lab.set_registry_rate("none")
        if client is not None:
            client.join(timeout=180)
    lab.check(puller, img)
    print(f"home node {home} killed with {arrived}/{size} bytes from upstream; registry GETs of the layer: "
          f"{lab.registry_log_count(digest)}")
    lab.start_peerd(home)
    assert not lab.cache_file(home, digest, partial=True).exists(), "the restarted node kept the unfinished download"
    assert not lab.cache_file(home, digest).exists(), "the killed download ended up in the cache"


def test_frozen_home_node_does_not_stall_a_pull(lab):
    """The node fetching a blob from upstream stops answering (SIGSTOP) while another node pulls the
    image through it: that pull must not hang, and ends with the exact image."""
    import signal

    img = lab.push_random("homefrozen", layers=1, size_mib=32)
    lab.set_registry_rate("100mbit")
    client = pid = None
    try:
        home, client = _start_pull_through(lab, img, 2 * MIB)
        puller = next(i for i in (2, 3) if i != home)
        pid = lab.peerd_pid(home)
        assert pid
        os.kill(pid, signal.SIGSTOP)
        lab.pull(puller, img, timeout=180)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        lab.set_registry_rate("none")
        if client is not None:
            client.join(timeout=180)
    lab.check(puller, img)
    lab.wait_mesh()


# --------------------------------------------------------------------------- pull-through off


@pytest.mark.parametrize("how", ["flag", "env"])
def test_pull_through_off_alone_misses_are_404(lab, how):
    """`--pull-through false` (or PEERD_PULL_THROUGH=false) on a node with no peers: a miss is a 404
    as before pull-through, peerd downloads nothing, and containerd pulls from the registry itself."""
    img = lab.push_random("ptoff", layers=2, size_mib=2)
    node = 3
    for other in (1, 2):
        lab.stop_peerd(other)
    lab.stop_peerd(node)
    if how == "flag":
        lab.start_peerd(node, "--pull-through", "false")
    else:
        lab.run("start-peerd", node, "--io-engine", lab.engine, env={"PEERD_PULL_THROUGH": "false"}, timeout=60)
        lab.flags[node] = ("PEERD_PULL_THROUGH=false",)  # not the default: lab.restore() restarts it
    assert metrics(node).get("peerd_peers") == 0
    fetched = metrics(node).get("peerd_bytes_fetched_total", **{"from": "upstream"})
    digest = img.layers[0]
    path = oci_path("blobs", img.repo, digest)
    for method in ("HEAD", "GET"):
        r = http(node, method, path, timeout=10)
        assert r.status == 404, (method, r)
    code = _oci_error_code(r)
    assert lab.registry_log_count(digest) == 0, "peerd downloaded the blob with pull-through off"

    misses = metrics(node).get("peerd_requests_total", code="404")
    lab.pull(node, img)
    lab.check(node, img)
    assert metrics(node).get("peerd_requests_total", code="404") > misses, "containerd never asked peerd"
    gets = _registry_gets(lab, img)
    assert all(n == 1 for n in gets.values()), f"containerd should have fetched each blob itself, once: {gets}"
    assert metrics(node).get("peerd_bytes_fetched_total", **{"from": "upstream"}) == fetched
    assert not any(lab.cache_file(node, d).exists() for d in img.blobs)
    assert code == "BLOB_UNKNOWN", f"OCI error code of the 404: {code}"
