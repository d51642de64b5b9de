"""Hostile and malformed requests against a running peerd: every one gets a 4xx with an OCI error
body, none gets a 5xx, a hang or a crash, and peerd keeps serving; idle and slow-loris connections
do not stop a real pull."""

import socket
import threading

import pytest

from conftest import REGISTRY, http, metrics, node_ip, send_raw, sha256_digest, wait_for

NODE = 1


@pytest.fixture(scope="module")
def blob(lab):
    """A layer that node 1 holds locally: (repo, digest, size)."""
    lab.restore()
    img = lab.push_random("badinput", layers=1, size_mib=1)
    lab.pull_and_advertise(NODE, img)
    return img.repo, img.layers[0], img.layer_sizes[0]


def _req(method, target, headers=(), version="HTTP/1.1"):
    lines = [f"{method} {target} {version}", f"Host: {node_ip(NODE)}:5000", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# (id, builder(repo, digest, size) -> (request bytes, method), expected status or None for any 4xx)
CASES = [
    # Path traversal and names outside the OCI grammar.
    ("dotdot", lambda r, d, s: (_req("GET", f"/v2/../etc/blobs/{d}"), "GET"), None),
    ("dotdot-inside", lambda r, d, s: (_req("GET", f"/v2/{r}/../../../blobs/{d}"), "GET"), None),
    ("dotdot-manifest", lambda r, d, s: (_req("GET", "/v2/../../etc/passwd/manifests/v1"), "GET"), None),
    ("pct-dotdot", lambda r, d, s: (_req("GET", f"/v2/%2e%2e/blobs/{d}"), "GET"), None),
    ("pct-dotdot-upper", lambda r, d, s: (_req("GET", f"/v2/%2E%2E/%2E%2E/blobs/{d}"), "GET"), None),
    ("pct-slash", lambda r, d, s: (_req("GET", "/v2/..%2f..%2fetc/manifests/v1"), "GET"), None),
    ("uppercase-name", lambda r, d, s: (_req("GET", "/v2/Library/Alpine/manifests/v1"), "GET"), None),
    ("empty-component", lambda r, d, s: (_req("GET", "/v2/a//b/manifests/v1"), "GET"), None),
    ("leading-slash", lambda r, d, s: (_req("GET", f"/v2//a/blobs/{d}"), "GET"), None),
    ("trailing-slash", lambda r, d, s: (_req("GET", f"/v2/a//blobs/{d}"), "GET"), None),
    ("name-too-long", lambda r, d, s: (_req("GET", f"/v2/{'a' * 300}/manifests/v1"), "GET"), None),
    ("bad-separator", lambda r, d, s: (_req("GET", "/v2/a___b/manifests/v1"), "GET"), None),
    ("tag-dotdot", lambda r, d, s: (_req("GET", f"/v2/{r}/manifests/.."), "GET"), None),
    ("tag-bad-char", lambda r, d, s: (_req("GET", f"/v2/{r}/manifests/v1$x"), "GET"), None),
    ("nul-in-path", lambda r, d, s: (b"GET /v2/a\x00b/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n", "GET"), None),
    ("head-dotdot", lambda r, d, s: (_req("HEAD", f"/v2/../etc/blobs/{d}"), "HEAD"), None),
    # Digests.
    ("digest-short", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/sha256:abc"), "GET"), None),
    ("digest-long", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d}0"), "GET"), None),
    ("digest-nonhex", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/sha256:{'g' * 64}"), "GET"), None),
    ("digest-upperhex", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d.upper().replace('SHA256', 'sha256')}"), "GET"), None),
    ("digest-md5", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/md5:{'0' * 32}"), "GET"), None),
    ("digest-sha512", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/sha512:{'0' * 128}"), "GET"), None),
    ("digest-no-algo", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d.split(':')[1]}"), "GET"), None),
    ("digest-empty-algo", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/:{d.split(':')[1]}"), "GET"), None),
    ("manifest-digest-bad", lambda r, d, s: (_req("GET", f"/v2/{r}/manifests/sha256:zz"), "GET"), None),
    ("manifest-digest-md5", lambda r, d, s: (_req("GET", f"/v2/{r}/manifests/md5:{'0' * 32}"), "GET"), None),
    ("head-digest-bad", lambda r, d, s: (_req("HEAD", f"/v2/{r}/blobs/sha256:abc"), "HEAD"), None),
    # Ranges on a blob of s bytes that node 1 has.
    ("range-inverted", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d}", ["Range: bytes=10-5"]), "GET"), 416),
    ("range-past-end", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d}", [f"Range: bytes={s}-"]), "GET"), 416),
    ("range-far-past-end", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d}", [f"Range: bytes={s + 10}-{s + 20}"]), "GET"), 416),
    ("range-empty-suffix", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d}", ["Range: bytes=-0"]), "GET"), 416),
    ("range-head-inverted", lambda r, d, s: (_req("HEAD", f"/v2/{r}/blobs/{d}", ["Range: bytes=10-5"]), "HEAD"), 416),
    ("range-garbage", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d}", ["Range: bytes=a-b"]), "GET"), None),
    ("range-huge-number", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d}", ["Range: bytes=99999999999999999999999-"]), "GET"), None),
    # Oversized heads.
    ("header-block-64k", lambda r, d, s: (_req("GET", "/v2/", [f"X-Big-{i}: {'a' * 2000}" for i in range(40)]), "GET"), 431),
    ("one-header-70k", lambda r, d, s: (_req("GET", "/v2/", [f"X-Big: {'a' * 70000}"]), "GET"), 431),
    ("request-line-70k", lambda r, d, s: (_req("GET", f"/v2/{'a' * 70000}/manifests/v1"), "GET"), 431),
    # Write methods: the mirror is pull-only.
    ("put-manifest", lambda r, d, s: (_req("PUT", f"/v2/{r}/manifests/v1", ["Content-Length: 0"]), "PUT"), 405),
    ("put-manifest-body", lambda r, d, s: (_req("PUT", f"/v2/{r}/manifests/v1", ["Content-Type: application/json", "Content-Length: 2"]) + b"{}", "PUT"), 405),
    ("post-upload", lambda r, d, s: (_req("POST", f"/v2/{r}/blobs/uploads/", ["Content-Length: 0"]), "POST"), 405),
    ("patch-upload", lambda r, d, s: (_req("PATCH", f"/v2/{r}/blobs/uploads/123", ["Content-Length: 0"]), "PATCH"), 405),
    ("delete-blob", lambda r, d, s: (_req("DELETE", f"/v2/{r}/blobs/{d}"), "DELETE"), 405),
    ("delete-manifest", lambda r, d, s: (_req("DELETE", f"/v2/{r}/manifests/{d}"), "DELETE"), 405),
    ("put-stream-path", lambda r, d, s: (_req("PUT", f"/blobs/http://{REGISTRY}/v2/{r}/blobs/{d}", ["Content-Length: 0"]), "PUT"), 405),
    # Registries that this node does not mirror.
    ("ns-not-mirrored-manifest", lambda r, d, s: (_req("GET", "/v2/library/alpine/manifests/3.19?ns=docker.io"), "GET"), 403),
    ("ns-not-mirrored-blob", lambda r, d, s: (_req("GET", f"/v2/{r}/blobs/{d}?ns=ghcr.io"), "GET"), 403),
    ("ns-not-mirrored-head", lambda r, d, s: (_req("HEAD", f"/v2/{r}/blobs/{d}?ns=evil.example:5000"), "HEAD"), 403),
    ("ns-garbage", lambda r, d, s: (_req("GET", f"/v2/{r}/manifests/v1?ns=evil%2F..%2Fpath"), "GET"), None),
    # Not HTTP at all, or not a pull path.
    ("garbage", lambda r, d, s: (b"\x00\x01\x02\x03garbage\r\n\r\n", "GET"), None),
    ("bad-version", lambda r, d, s: (b"GET /v2/ HTTP/7.1\r\nHost: x\r\n\r\n", "GET"), None),
    ("catalog", lambda r, d, s: (_req("GET", "/v2/_catalog"), "GET"), None),
    ("tags-list", lambda r, d, s: (_req("GET", f"/v2/{r}/tags/list"), "GET"), None),
    ("outside-v2", lambda r, d, s: (_req("GET", "/etc/passwd"), "GET"), None),
]


def _server_errors(m):
    return sum(v for labels, v in m.select("peerd_requests_total") if labels.get("code", "").startswith("5"))


@pytest.mark.parametrize(
    "build,expected", [pytest.param(b, e, id=i) for i, b, e in CASES]
)
def test_bad_request_gets_4xx(lab, blob, build, expected):
    repo, digest, size = blob
    pid = lab.peerd_pid(NODE)
    errors_before = _server_errors(metrics(NODE))
    data, method = build(repo, digest, size)
    r = send_raw(NODE, data, method=method)
    if expected is None:
        assert 400 <= r.status < 500, r
    else:
        assert r.status == expected, r
    if method != "HEAD":
        assert r.header("content-type", "").startswith("application/json"), r
        body = r.json()
        assert isinstance(body.get("errors"), list) and body["errors"], r
        assert isinstance(body["errors"][0].get("code"), str) and body["errors"][0]["code"], r
    if r.status == 416:
        assert r.header("content-range") == f"bytes */{size}", r
    # peerd keeps serving, and did not count a server error.
    ok = http(NODE, "GET", f"/v2/{repo}/blobs/{digest}?ns={REGISTRY}", headers={"Range": "bytes=0-9"})
    assert ok.status == 206 and len(ok.body) == 10, ok
    assert lab.peerd_pid(NODE) == pid, "peerd restarted or died"
    assert _server_errors(metrics(NODE)) == errors_before


def test_multiple_ranges_get_the_whole_blob(lab, blob):
    repo, digest, size = blob
    r = http(NODE, "GET", f"/v2/{repo}/blobs/{digest}?ns={REGISTRY}", headers={"Range": "bytes=0-1,5-6"})
    assert r.status == 200, r
    assert int(r.header("content-length")) == size and len(r.body) == size
    assert sha256_digest(r.body) == digest


# --------------------------------------------------------------------------- connection floods

IDLE = 2000
LORIS = 200


class SlowLoris(threading.Thread):
    """Keeps `n` connections each sending one more header byte every second."""

    def __init__(self, socks):
        super().__init__(daemon=True)
        self.socks = list(socks)
        self.stop = threading.Event()
        self.closed_by_server = 0

    def run(self):
        while not self.stop.wait(1.0):
            alive = []
            for s in self.socks:
                try:
                    s.send(b"a")
                    alive.append(s)
                except OSError:
                    self.closed_by_server += 1
                    s.close()
            self.socks = alive

    def close(self):
        self.stop.set()
        self.join(5)
        for s in self.socks:
            s.close()


def _connect_many(n, host):
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, 5000), timeout=10)
        s.setblocking(True)
        socks.append(s)
    return socks


def test_idle_and_slow_loris_connections_do_not_block_a_pull(lab):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + LORIS + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE + LORIS + 1024), hard))
    img = lab.push_random("flood", layers=2, size_mib=16)
    lab.seed(2, img)  # node 1 will fetch it from node 2 (its only holder) through its own (busy) peerd
    host = node_ip(NODE)
    peer_before = metrics(NODE).get("peerd_bytes_served_total", source="peer")
    idle, loris_socks, loris = [], [], None
    try:
        idle = _connect_many(IDLE, host)
        loris_socks = _connect_many(LORIS, host)
        for s in loris_socks:
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        loris = SlowLoris(loris_socks)
        loris.start()
        wait_for(
            lambda: metrics(NODE).get("peerd_shard_connections") >= IDLE + LORIS,
            30,
            f"peerd on node {NODE} to hold {IDLE + LORIS} connections",
            interval=0.2,
        )
        # A fresh client is still answered at once.
        r = http(NODE, "GET", "/v2/", timeout=10)
        assert r.status == 200, r
        lab.pull(NODE, img, timeout=180)
        lab.check(NODE, img)
        served = metrics(NODE).get("peerd_bytes_served_total", source="peer") - peer_before
        assert served >= img.layer_bytes, f"node {NODE} served {served} bytes from its peer, want >= {img.layer_bytes}"
    finally:
        if loris is not None:
            loris.close()
        for s in idle + loris_socks:
            s.close()
    # Once the clients are gone, so are their connections.
    wait_for(
        lambda: metrics(NODE).get("peerd_shard_connections") < 50,
        30,
        "peerd to drop the closed connections",
        interval=0.2,
    )
