"""The OCI pull API as a client sees it: ranges, HEAD/GET agreement, manifest media types, tags."""

import json

import pytest

from conftest import (
    OCI_INDEX,
    OCI_MANIFEST,
    REGISTRY,
    http,
    metrics,
    node_ip,
    oci_path,
    sha256_digest,
    wait_for,
)

BLOB_HEADERS = ("content-length", "content-type", "docker-content-digest", "accept-ranges", "content-range")


@pytest.fixture(scope="module")
def image_on_node1(lab):
    """A two-layer image that only node 1 holds (pulled past peerd: no pull-through cache has it)."""
    lab.restore()
    img = lab.push_random("api", layers=2, size_mib=4)
    lab.seed(1, img)
    return img


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("node", [1, 2], ids=["local", "via-peer"])
@pytest.mark.parametrize("spec", ["0-9", "10-", "-5", "7-7", "END-3-END+100"])
def test_range_returns_exact_bytes(lab, image_on_node1, node, spec):
    img = image_on_node1
    digest = img.layers[0]
    data = lab.content_file(1, digest).read_bytes()
    size = len(data)
    spec = spec.replace("END+100", str(size + 100)).replace("END-3", str(size - 3))
    a, _, b = spec.partition("-")
    if a == "":
        start, end = size - int(b), size - 1
    else:
        start, end = int(a), (min(int(b), size - 1) if b else size - 1)
    path = oci_path("blobs", img.repo, digest)
    get = http(node, "GET", path, headers={"Range": f"bytes={spec}"})
    assert get.status == 206, get
    assert get.body == data[start : end + 1]
    assert get.header("content-range") == f"bytes {start}-{end}/{size}"
    assert int(get.header("content-length")) == end - start + 1
    assert get.header("docker-content-digest") == digest
    head = http(node, "HEAD", path, headers={"Range": f"bytes={spec}"})
    assert head.status == 206, head
    assert {h: head.header(h) for h in BLOB_HEADERS} == {h: get.header(h) for h in BLOB_HEADERS}


@pytest.mark.parametrize("node", [1, 2], ids=["local", "via-peer"])
def test_head_and_get_agree_on_a_whole_blob(lab, image_on_node1, node):
    img = image_on_node1
    digest = img.layers[1]
    data = lab.content_file(1, digest).read_bytes()
    path = oci_path("blobs", img.repo, digest)
    head = http(node, "HEAD", path)
    get = http(node, "GET", path)
    assert head.status == get.status == 200, (head, get)
    assert get.body == data
    assert get.header("accept-ranges") == "bytes"
    assert int(get.header("content-length")) == len(data)
    assert {h: head.header(h) for h in BLOB_HEADERS} == {h: get.header(h) for h in BLOB_HEADERS}


# --------------------------------------------------------------------------- HEAD 200 means GET serves


def test_head_200_on_a_peer_blob_means_get_serves(lab, image_on_node1):
    img = image_on_node1
    for digest in img.blobs:
        path = oci_path("blobs", img.repo, digest)
        head = http(2, "HEAD", path)
        assert head.status == 200, head
        length = int(head.header("content-length"))
        assert head.header("docker-content-digest") == digest
        get = http(2, "GET", path)
        assert get.status == 200, get
        assert len(get.body) == length
        assert sha256_digest(get.body) == digest
        # A peer's request is answered from local content only: node 2 does not have it.
        from_peer = http(2, "HEAD", path, headers={"X-Peerd-Peer": "1"})
        assert from_peer.status == 404, from_peer


def test_unknown_blob_is_404_for_head_and_get(lab, image_on_node1):
    """No peer has it and the registry answers 404 to the pull-through: 404, so that containerd
    goes on to the registry itself."""
    path = oci_path("blobs", image_on_node1.repo, "sha256:" + "e" * 64)
    head = http(2, "HEAD", path)
    get = http(2, "GET", path)
    assert head.status == get.status == 404, (head, get)
    assert get.json()["errors"][0]["code"]


# --------------------------------------------------------------------------- manifests without mediaType


def _check_manifest(node, repo, ref, digest, body, media_type):
    path = oci_path("manifests", repo, ref)
    get = http(node, "GET", path)
    assert get.status == 200, (node, ref, get)
    assert get.header("content-type") == media_type, (node, ref, get.headers)
    assert get.header("docker-content-digest") == digest, (node, ref, get.headers)
    assert sha256_digest(get.body) == digest
    assert get.body == body
    head = http(node, "HEAD", path)
    assert head.status == 200, (node, ref, head)
    for h in ("content-type", "docker-content-digest", "content-length"):
        assert head.header(h) == get.header(h), (node, ref, h, head.headers, get.headers)


@pytest.mark.parametrize("index", [False, True], ids=["manifest", "index"])
def test_manifest_without_mediatype_gets_the_real_media_type(lab, index):
    img = lab.push_random("nomt", layers=1, size_mib=1, no_mediatype=True, index=index)
    assert "mediaType" not in json.loads(img.manifest_bytes)
    if index:
        assert "mediaType" not in json.loads(img.index_bytes)
    lab.seed(1, img)
    for node in (1, 2):  # node 1 from its store, node 2 through node 1
        _check_manifest(node, img.repo, img.manifest, img.manifest, img.manifest_bytes, OCI_MANIFEST)
        if index:
            _check_manifest(node, img.repo, img.index, img.index, img.index_bytes, OCI_INDEX)
            _check_manifest(node, img.repo, img.tag, img.index, img.index_bytes, OCI_INDEX)
        else:
            _check_manifest(node, img.repo, img.tag, img.manifest, img.manifest_bytes, OCI_MANIFEST)
    served = metrics(2).get("peerd_bytes_served_total", source="peer")
    lab.pull(2, img)
    lab.check(2, img)
    assert metrics(2).get("peerd_bytes_served_total", source="peer") - served >= img.layer_bytes
    assert lab.registry_log_count(img.layers[0]) == 1


# --------------------------------------------------------------------------- latest


def _registry_manifest_requests(lab, repo, tag, client_ip):
    needle = f"/v2/{repo}/manifests/{tag}"
    return sum(1 for line in lab.registry_access_log().splitlines() if line.startswith(client_ip + " ") and needle in line)


def test_latest_tag_goes_upstream_unless_resolved(lab):
    img = lab.push_random("latest", layers=1, size_mib=1, tag="latest")
    lab.pull_and_advertise(1, img)
    path = oci_path("manifests", img.repo, "latest")
    for node in (1, 2):
        for method in ("HEAD", "GET"):
            r = http(node, method, path)
            assert r.status == 404, (node, method, r)
        # The same manifest by digest is served as usual.
        assert http(node, "HEAD", oci_path("manifests", img.repo, img.manifest)).status == 200
    # A pull of :latest on node 2 resolves the tag at the registry, and takes the blobs from node 1
    # (or the pull-through caches of node 1's pull): no second download of the layer.
    before = _registry_manifest_requests(lab, img.repo, "latest", node_ip(2))
    lab.pull(2, img)
    lab.check(2, img)
    assert _registry_manifest_requests(lab, img.repo, "latest", node_ip(2)) > before
    assert lab.registry_log_count(img.layers[0]) == 1

    # With --resolve-latest-tag, latest is served like any tag, locally and through peers.
    lab.rmi(2, img)
    lab.stop_peerd(2)
    lab.stop_peerd(1)
    lab.start_peerd(1, "--resolve-latest-tag", wait_mesh=False)
    lab.start_peerd(2, "--resolve-latest-tag")
    wait_for(lambda: metrics(1).get("peerd_advertised_keys") >= img.min_keys, 20, "node 1 to advertise again")
    for node in (1, 2):
        r = wait_for(
            lambda: (lambda r: r if r.status == 200 else None)(http(node, "GET", path)),
            10,
            f"node {node} to resolve latest",
            interval=0.2,
        )
        assert r.header("docker-content-digest") == img.manifest
        assert sha256_digest(r.body) == img.manifest


# --------------------------------------------------------------------------- /blobs/<upstream-url>


@pytest.mark.parametrize("node", [1, 2], ids=["local", "via-peer"])
def test_streaming_path_serves_ranges_by_digest(lab, image_on_node1, node):
    """Peerd's `/blobs/<upstream-url>` path (overlaybd, artifact streaming): content by digest."""
    img = image_on_node1
    digest = img.layers[0]
    data = lab.content_file(1, digest).read_bytes()
    path = f"/blobs/http://{REGISTRY}/v2/{img.repo}/blobs/{digest}"
    r = http(node, "GET", path, headers={"Range": "bytes=100-4195"})
    assert r.status == 206, r
    assert r.body == data[100:4196]
    assert r.header("content-range") == f"bytes 100-4195/{len(data)}"
    head = http(node, "HEAD", path)
    assert head.status == 200 and int(head.header("content-length")) == len(data), head


# --------------------------------------------------------------------------- clients that go away


@pytest.fixture(scope="module")
def big_image_on_node1(lab):
    lab.restore()
    img = lab.push_random("abort", layers=1, size_mib=48)
    lab.seed(1, img)
    return img


@pytest.mark.parametrize("node", [1, 2], ids=["local", "via-peer"])
def test_client_gone_mid_body_leaves_peerd_serving(lab, big_image_on_node1, node):
    import socket
    import struct

    img = big_image_on_node1
    digest = img.layers[0]
    path = oci_path("blobs", img.repo, digest)
    for _ in range(3):
        s = socket.create_connection((node_ip(node), 5000), timeout=10)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = 0
        while got < 2 << 20:
            chunk = s.recv(65536)
            assert chunk, "peerd closed before sending 2 MiB"
            got += len(chunk)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        s.close()
    full = http(node, "GET", path, timeout=60)
    assert full.status == 200 and sha256_digest(full.body) == digest, full


def test_concurrent_gets_through_peers_are_all_exact(lab, image_on_node1):
    """Many clients asking node 2 at once for what only node 1 has: every answer is complete and exact."""
    import concurrent.futures

    img = image_on_node1
    jobs = [(d, i) for i in range(8) for d in img.blobs]

    def get(job):
        digest, _ = job
        r = http(2, "GET", oci_path("blobs", img.repo, digest), timeout=60)
        return digest, r.status, sha256_digest(r.body) if r.status == 200 else None

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(get, jobs))
    bad = [(d, st, h) for d, st, h in results if st != 200 or h != d]
    assert not bad, f"{len(bad)}/{len(results)} concurrent GETs failed: {bad[:5]}"
