"""Pull-through from a registry like the real ones: HTTPS with a private CA and bearer tokens.

The lab's TLS registry (`ci/lab.sh tls-registry up`) is distribution behind token auth: anyone gets
a pull token from its token server, as on Docker Hub; both speak HTTPS with certificates of a lab
CA. Each node's containerd trusts that CA through its hosts.toml and goes to peerd first.

What a user notices:
  - peerd trusting the CA: nodes that pull a new image together get it byte for byte, and the
    registry serves each blob once -- to peerd, which did the TLS handshake and the token dance
    itself;
  - peerd not trusting the CA: nothing changes for the pull (peerd answers 404 and containerd goes
    to the registry), the registry simply serves the nodes itself;
  - a registry that gives tokens only to users with credentials: peerd (anonymous) gets none,
    containerd with the user's credentials still pulls, byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CACHE_DIR, LAB_DIR, NODES, http, metrics, oci_path

ALL = range(1, NODES + 1)
TLS_ADDR = "198.18.0.3:5443"


# --------------------------------------------------------------------------- the TLS registry


@dataclass
class TlsImage:
    ref: str
    repo: str
    tag: str
    layers: list
    config: str
    manifest: str

    @property
    def blobs(self):
        return self.layers + [self.config]


class TlsRegistry:
    def __init__(self, lab, env: dict):
        self.lab = lab
        self.env = env
        self.dir = Path(env["TLS_CA"]).parent

    def push_random(self, name: str, layers: int, size_mib: float, tag: str = "v1") -> TlsImage:
        repo = f"itest/{name}-{uuid.uuid4().hex[:8]}"
        layout = CACHE_DIR / "images" / f"{repo.replace('/', '_')}_{tag}"
        try:
            out = self.lab.run("push-random", f"{repo}:{tag}", layers, size_mib, env={"TLS_REGISTRY": "1"}).stdout
        finally:
            shutil.rmtree(layout, ignore_errors=True)
        found = {"layer": [], "config": [], "manifest": []}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in found:
                found[parts[0]].append(parts[1])
        assert found["layer"] and found["config"] and found["manifest"], f"unexpected push output: {out!r}"
        return TlsImage(
            ref=f"{TLS_ADDR}/{repo}:{tag}", repo=repo, tag=tag, layers=found["layer"],
            config=found["config"][0], manifest=found["manifest"][0],
        )

    def blob_file(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.dir / "storage" / "docker" / "registry" / "v2" / "blobs" / algo / hexd[:2] / hexd / "data"

    def sizes(self, img: TlsImage) -> dict:
        return {d: self.blob_file(d).stat().st_size for d in img.blobs}

    def gets(self, img: TlsImage) -> dict:
        """Per blob: the registry's GETs of it answered 200/206 (lab.sh registry-log-count)."""
        return {
            d: int(self.lab.run("registry-log-count", d, env={"TLS_REGISTRY": "1"}).stdout.strip()) for d in img.blobs
        }

    def blob_get_agents(self, img: TlsImage) -> list:
        """User agents of the registry's 200/206 blob GETs of the image, from its access log."""
        text = Path(self.env["TLS_ACCESS_LOG"]).read_text(errors="replace")
        agents = []
        for d in img.blobs:
            pat = re.compile(r'"GET /v2/[^ "]+/blobs/' + re.escape(d) + r'(\?[^ "]*)? HTTP/[0-9.]+" (200|206) .*"([^"]*)"$')
            agents += [m.group(3) for m in map(pat.search, text.splitlines()) if m]
        return agents

    def token_log(self) -> list:
        try:
            lines = Path(self.env["TLS_TOKEN_LOG"]).read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def tokens(self, mode: str):
        self.lab.run("tls-registry", "tokens", mode)

    def set_rate(self, rate: str):
        self.lab.run("set-registry-rate", rate, env={"TLS_REGISTRY": "1"})

    def credentials(self) -> str:
        return Path(self.env["TLS_CREDENTIALS"]).read_text().strip()


def _save_tls_logs(tls: TlsRegistry) -> None:
    """The TLS registry's logs go away with it: keep them when a test of this module failed."""
    dest = Path(os.environ.get("PEERD_ITEST_ARTIFACTS", "/tmp/peerd-itest-artifacts")) / (
        time.strftime("%Y%m%d-%H%M%S") + "-tls-registry"
    )
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("access.log", "registry.log", "token.log", "token-server.log"):
            if (tls.dir / f).exists():
                shutil.copy(tls.dir / f, dest / f)
        sys.stderr.write(f"\nTLS registry logs saved in {dest}\n")
    except OSError as e:
        sys.stderr.write(f"\ncould not save the TLS registry's logs: {e}\n")


@pytest.fixture(scope="module")
def tls(request, lab):
    failed_before = request.session.testsfailed
    lab.run("tls-registry", "up", timeout=120)
    env = dict(line.split("=", 1) for line in lab.run("tls-registry", "env").stdout.splitlines() if "=" in line)
    reg = TlsRegistry(lab, env)
    try:
        yield reg
    finally:
        if request.session.testsfailed > failed_before:
            _save_tls_logs(reg)
        lab.run("tls-registry", "down", timeout=120, check=False)


def start_peerds(lab, mode: str):
    """Every node's peerd mirrors the TLS registry too; mode `1`: it trusts the lab CA (SSL_CERT_FILE
    is a bundle with it), `untrusted`: it does not. The lab_state fixture restores the defaults."""
    for i in ALL:
        if lab.peerd_pid(i) is not None:
            lab.run("stop-peerd", i, "TERM", timeout=60)
        lab.flags[i] = ("TLS_REGISTRY", mode)
        lab.run("start-peerd", i, "--io-engine", lab.engine, env={"TLS_REGISTRY": mode}, timeout=60)
    lab.wait_mesh()


def fetched_upstream() -> float:
    return sum(metrics(i).get("peerd_bytes_fetched_total", **{"from": "upstream"}) for i in ALL)


def pull_all(lab, img: TlsImage, *flags: str) -> None:
    """Pulls on every node at once; every pull must succeed."""
    pulls = {i: lab.spawn("pull", i, *((img.ref,) + flags)) for i in ALL}
    results = {i: lab.finish(p, timeout=240) for i, p in pulls.items()}
    failed = {i: r.stderr[-2000:] for i, r in results.items() if r.returncode != 0}
    assert not failed, f"pulls of {img.ref} failed on node(s) {sorted(failed)}:\n{failed}"


def pull_all_from_a_slow_registry(lab, tls: TlsRegistry, img: TlsImage) -> None:
    """pull_all with the registry's egress at 200 Mbit/s, slow enough that the pulls overlap while
    the blobs are still arriving."""
    tls.set_rate("200mbit")
    try:
        pull_all(lab, img)
    finally:
        tls.set_rate("none")


def assert_byte_exact(lab, tls: TlsRegistry, img: TlsImage) -> None:
    """ctr's check and the content verifier pass on every node, and every blob in each node's
    content store is the registry's own copy, byte for byte."""
    for i in ALL:
        lab.check(i, img.ref)
        for d in img.blobs:
            algo, hexd = d.split(":", 1)
            mine = LAB_DIR / f"node{i}" / "root" / "io.containerd.content.v1.content" / "blobs" / algo / hexd
            assert mine.read_bytes() == tls.blob_file(d).read_bytes(), f"node {i}: blob {d} differs from the registry's"


def assert_peerd_says_404(img: TlsImage) -> None:
    """Asked directly for a blob it cannot fetch, every node's peerd answers 404 with an OCI error
    body (what sends containerd to the registry), not another error and not a hang."""
    for i in ALL:
        for method in ("HEAD", "GET"):
            r = http(i, method, oci_path("blobs", img.repo, img.layers[0], ns=TLS_ADDR), timeout=30)
            assert r.status == 404, f"node {i}: {method} of a blob peerd cannot fetch: {r}"
            if method == "GET":
                assert r.json()["errors"][0]["code"], r


def peerd_token_requests(entries: list) -> list:
    return [e for e in entries if e.get("user_agent", "").startswith("peerd/")]


# --------------------------------------------------------------------------- tests


def test_simultaneous_pulls_through_tls_and_token_auth(lab, tls):
    """Three nodes pull a new image from the TLS + token registry at the same moment: every node gets
    the exact image, the registry serves each blob once, and what peerd fetched from upstream is
    exactly the image's blobs -- peerd did the TLS handshake and the bearer-token dance itself."""
    img = tls.push_random("tls-together", layers=3, size_mib=4)
    sizes = tls.sizes(img)
    start_peerds(lab, "1")
    tokens_before = len(tls.token_log())
    fetched_before = fetched_upstream()
    pull_all_from_a_slow_registry(lab, tls, img)
    assert_byte_exact(lab, tls, img)
    gets = tls.gets(img)
    agents = tls.blob_get_agents(img)
    assert all(n == 1 for n in gets.values()), (
        f"registry GETs per blob across the cluster (want 1 each): {gets}; by user agent: {agents}"
    )
    fetched = fetched_upstream() - fetched_before
    assert fetched == sum(sizes.values()), (
        f"the cluster fetched {fetched:.0f} bytes from upstream, the image's blobs are {sum(sizes.values())} bytes"
    )
    assert all(a.startswith("peerd/") for a in agents), f"blob GETs not made by peerd: {agents}"
    granted = [e for e in peerd_token_requests(tls.token_log()[tokens_before:]) if e["status"] == 200]
    assert granted, "peerd fetched from the token registry without asking its token server for a token"
    assert all(g["user"] is None and all(s.endswith(":pull") for s in g["granted"]) for g in granted), granted


def test_peerd_not_trusting_the_registry_ca_changes_nothing_for_the_user(lab, tls):
    """peerd does not trust the registry's CA: its fetches fail the TLS handshake, it answers 404,
    and containerd (which trusts the CA through hosts.toml) pulls from the registry itself. The
    pulls succeed byte for byte; the registry serves the nodes instead of peerd."""
    img = tls.push_random("tls-untrusted", layers=2, size_mib=4)
    start_peerds(lab, "untrusted")
    tokens_before = len(tls.token_log())
    fetched_before = fetched_upstream()
    assert_peerd_says_404(img)
    pull_all_from_a_slow_registry(lab, tls, img)
    assert_byte_exact(lab, tls, img)
    assert fetched_upstream() == fetched_before, "peerd fetched from a registry whose certificate it cannot verify"
    gets = tls.gets(img)
    agents = tls.blob_get_agents(img)
    # Every node's containerd went to the registry, unless a node that already had a blob served it.
    assert all(1 <= n <= NODES for n in gets.values()), f"registry GETs per blob: {gets}; by user agent: {agents}"
    assert not any(a.startswith("peerd/") for a in agents), f"peerd got blobs past an untrusted certificate: {agents}"
    assert not peerd_token_requests(tls.token_log()[tokens_before:]), "peerd reached the token server over TLS it cannot verify"


def test_registry_that_gives_tokens_only_to_users(lab, tls):
    """The token server refuses anonymous tokens (a private registry): peerd, which only ever asks
    anonymously, cannot fetch; the user pulls with credentials as without peerd, and the pulls
    succeed byte for byte, from the registry. Without credentials the pull fails, as it would
    without peerd."""
    img = tls.push_random("tls-private", layers=2, size_mib=2)
    start_peerds(lab, "1")
    tls.tokens("users")
    try:
        tokens_before = len(tls.token_log())
        fetched_before = fetched_upstream()
        assert_peerd_says_404(img)
        anonymous = lab.run("pull", 1, img.ref, check=False, timeout=240)
        assert anonymous.returncode != 0, "a pull without credentials succeeded although the registry wants them"
        pull_all(lab, img, "--user", tls.credentials())
        assert_byte_exact(lab, tls, img)
        assert fetched_upstream() == fetched_before, "peerd fetched blobs from a registry that gave it no token"
        gets = tls.gets(img)
        agents = tls.blob_get_agents(img)
        assert all(1 <= n <= NODES for n in gets.values()), f"registry GETs per blob: {gets}; by user agent: {agents}"
        assert not any(a.startswith("peerd/") for a in agents), agents
        asked = peerd_token_requests(tls.token_log()[tokens_before:])
        assert asked, "peerd never asked the token server (did it try upstream at all?)"
        assert all(e["status"] == 401 and e["user"] is None for e in asked), asked
    finally:
        tls.tokens("anonymous")
