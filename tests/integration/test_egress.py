"""Pull-through must not become a way to read internal services.

The streaming path (`/blobs/<url>`) names the URL to fetch, and a client that streams a response sees
every byte but the last before the digest is checked. So whoever reaches a node's peerd (any pod can)
must not make it fetch from a host `--hosts` does not name: not a service on the node's own loopback,
not a link-local address (where cloud metadata services answer), not through a `..` that moves the
digest out of the path. The internal service here is real: an HTTP server in node 2's namespace that
holds a secret, and its access log says whether peerd ever asked it.
"""

import hashlib
import subprocess
import time

import pytest

from conftest import LAB_DIR, REGISTRY, http, wait_for

NODE = 2
SECRET = b"the node's cloud credentials\n"
PORT = 8099
# The lab passes `--hosts http://198.18.0.2:5000`: only that registry may be fetched from.
PEER = {"X-Peerd-Peer": "1", "X-Peerd-Pull-Through": "1"}  # what a home node is sent by its peers


@pytest.fixture
def internal_service(lab):
    """An HTTP server on node 2's loopback and on a link-local address of its namespace."""
    root = LAB_DIR / "egress-secret"
    (root / "latest").mkdir(parents=True, exist_ok=True)
    (root / "secret").write_bytes(SECRET)
    (root / "latest" / "meta-data").write_bytes(SECRET)
    ns = f"pd-node{NODE}"
    subprocess.run(["ip", "netns", "exec", ns, "ip", "addr", "replace", "169.254.169.254/32", "dev", "lo"], check=True)
    log = open(LAB_DIR / "egress-secret.log", "w+b")
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, "python3", "-m", "http.server", str(PORT), "--bind", "0.0.0.0", "--directory", str(root)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Reachable, and it really serves the secret (so a refusal below is peerd's doing).
        def up():
            r = subprocess.run(
                ["ip", "netns", "exec", ns, "curl", "-fsS", "--max-time", "1", f"http://127.0.0.1:{PORT}/secret"],
                capture_output=True,
            )
            return r.returncode == 0 and r.stdout == SECRET

        wait_for(up, 10, "the internal service to answer")
        time.sleep(0.2)
        log.seek(0)
        served_before = log.read().count(b'"GET ')
        yield lambda: _requests(log) - served_before
    finally:
        server.kill()
        server.wait()
        log.close()
        subprocess.run(["ip", "netns", "exec", ns, "ip", "addr", "del", "169.254.169.254/32", "dev", "lo"], check=False)


def _requests(log) -> int:
    log.seek(0)
    return log.read().count(b'"GET ')


HEX = hashlib.sha256(SECRET).hexdigest()
DIGEST = "sha256:" + HEX
STREAM_URLS = [
    f"http://127.0.0.1:{PORT}/{DIGEST}/../secret",  # the digest only before a `..`
    f"http://127.0.0.1:{PORT}/{DIGEST}/%2e%2e/secret",  # the same, encoded
    f"http://127.0.0.1:{PORT}/secret?{DIGEST}",  # the digest only in the query
    f"http://127.0.0.1:{PORT}/{DIGEST}",  # a local service, digest and all
    f"http://169.254.169.254:{PORT}/latest/{DIGEST}/../meta-data",
    f"http://169.254.169.254:{PORT}/{DIGEST}",
    f"http://[::ffff:127.0.0.1]:{PORT}/{DIGEST}",
    f"http://user:pw@{REGISTRY}/v2/x/blobs/{DIGEST}",  # the configured registry, with credentials
]


@pytest.mark.parametrize("url", STREAM_URLS)
@pytest.mark.parametrize("as_peer", [False, True], ids=["client", "as-peer"])
def test_stream_path_refuses_hosts_that_hosts_does_not_name(lab, internal_service, url, as_peer):
    for method in ("HEAD", "GET"):
        r = http(NODE, method, "/blobs/" + url, headers=PEER if as_peer else None, timeout=20)
        assert r.status in (400, 403), f"{method} /blobs/{url}: {r.status}, want a refusal"
        assert SECRET not in r.body, f"the secret leaked through {url}"
        if method == "GET":
            code = r.json()["errors"][0]["code"]
            assert code in ("DENIED", "DIGEST_INVALID", "UNSUPPORTED"), r.body
    time.sleep(0.3)  # a fetch that had been started would have reached the server by now
    assert internal_service() == 0, "peerd sent a request to the internal service"


def test_registry_ns_naming_a_local_service_is_refused(lab, internal_service):
    """The /v2 path builds its upstream URL from `ns=`: an ns that is not a mirrored registry is 403."""
    for ns in (f"127.0.0.1:{PORT}", f"169.254.169.254:{PORT}"):
        path = f"/v2/latest/blobs/{DIGEST}?ns={ns}"
        r = http(NODE, "GET", path, headers=PEER)
        assert r.status == 403, (path, r)
        assert SECRET not in r.body
    time.sleep(0.3)
    assert internal_service() == 0, "peerd sent a request to the internal service"
