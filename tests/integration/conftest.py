"""Shared harness of peerd's integration tests: the lab, a raw HTTP client, metrics.

The lab (`ci/lab.sh`) is one machine-wide resource that other people use too, so the whole
session holds an exclusive flock on /var/lock/peerd-lab-session.lock, brings a fresh lab up at the
start and takes it down at the end, also when something failed.

Every test starts with peerd running on every node with the session's flags (`default flags`);
a test that restarts a node with other flags, or stops it, leaves the repair to the autouse
`lab_state` fixture, which also fails the test if a peerd died without being asked to.

Run from the repository root:

    python3 -m pytest tests/integration -x -q                    # io_uring
    python3 -m pytest tests/integration -x -q --io-engine epoll  # epoll
    PEERD_IO_ENGINE=epoll python3 -m pytest tests/integration    # same
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LAB_SH = REPO_ROOT / "ci" / "lab.sh"
SESSION_LOCK = "/var/lock/peerd-lab-session.lock"
LAB_DIR = Path(os.environ.get("LAB_DIR", "/var/lib/peerd-lab"))
CACHE_DIR = Path(os.environ.get("PEERD_CACHE", "/root/.cache/peerd"))
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", "/root/.cache/peerd/target"))
REGISTRY = "198.18.0.2:5000"
NODES = 3
HTTP_PORT = 5000
METRICS_PORT = 5004
MIB = 1 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

# Only the lab's addresses and loopback may ever be contacted.
_ALLOWED_NETS = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("127.0.0.0/8")]


def node_ip(i: int) -> str:
    return f"198.18.0.{10 + i}"


def _check_addr(host: str) -> None:
    addr = ipaddress.ip_address(host)
    if not any(addr in net for net in _ALLOWED_NETS):
        raise AssertionError(f"refusing to contact {host}: outside 198.18.0.0/15 and loopback")


def _host_of(node) -> str:
    return node_ip(node) if isinstance(node, int) else node


# --------------------------------------------------------------------------- options


def pytest_addoption(parser):
    default = os.environ.get("PEERD_IO_ENGINE", "io-uring")
    parser.addoption(
        "--io-engine",
        default=default,
        choices=["io-uring", "epoll", "auto"],
        help="peerd --io-engine for every peerd of the session (default: $PEERD_IO_ENGINE or io-uring)",
    )
    parser.addoption(
        "--lab-lock-wait",
        type=float,
        default=float(os.environ.get("PEERD_ITEST_LOCK_WAIT", "3600")),
        help="seconds to wait for the shared lab lock",
    )


def pytest_report_header(config):
    return f"peerd io engine: {config.getoption('--io-engine')}; lab lock: {SESSION_LOCK}"


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class Response:
    status: int
    reason: str
    headers: dict  # lower-case name -> value (the last one if repeated)
    header_list: list
    body: bytes

    def json(self):
        return json.loads(self.body.decode())

    def header(self, name: str, default=None):
        return self.headers.get(name.lower(), default)

    def __repr__(self):
        return f"<Response {self.status} {self.reason} {self.headers} body={self.body[:200]!r}>"


class NoResponse(AssertionError):
    """The server closed, reset or timed out before sending a complete response head."""


class Reader:
    """A socket with the bytes received past the last response (keep-alive, pipelining)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pending = b""

    def recv(self, n: int, deadline: float) -> bytes:
        if self.pending:
            out, self.pending = self.pending[:n], self.pending[n:]
            return out
        self.sock.settimeout(max(0.05, deadline - time.monotonic()))
        return self.sock.recv(n)


def _reader(sock) -> Reader:
    # A bare socket gets a fresh Reader: fine for one response per connection; keep-alive and
    # pipelining need one Reader kept across calls.
    return sock if isinstance(sock, Reader) else Reader(sock)


def _recv_head(rd: Reader, deadline: float) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            chunk = rd.recv(65536, deadline)
        except socket.timeout as e:
            raise NoResponse(f"timed out waiting for a response head (got {buf[:200]!r})") from e
        except ConnectionError as e:
            raise NoResponse(f"connection error before a response head: {e!r} (got {buf[:200]!r})") from e
        if not chunk:
            raise NoResponse(f"connection closed before a response head (got {buf[:200]!r})")
        buf += chunk
        if len(buf) > 1 << 20:
            raise NoResponse("response head over 1 MiB")
    head, rest = buf.split(b"\r\n\r\n", 1)
    rd.pending = rest + rd.pending
    return head


def read_response(sock, method: str, timeout: float = 15.0) -> Response:
    """Reads one response from `sock` (bytes past it stay buffered for the next call)."""
    rd = _reader(sock)
    deadline = time.monotonic() + timeout
    head = _recv_head(rd, deadline)
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3}) ?(.*)$", lines[0])
    if not m:
        raise AssertionError(f"bad status line {lines[0]!r}")
    status, reason = int(m.group(1)), m.group(2)
    header_list = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        header_list.append((name.strip(), value.strip()))
    headers = {k.lower(): v for k, v in header_list}
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Response(status, reason, headers, header_list, b"")
    body = b""
    if "content-length" in headers:
        want = int(headers["content-length"])
        while len(body) < want:
            try:
                chunk = rd.recv(min(1 << 20, want - len(body)), deadline)
            except (socket.timeout, ConnectionError) as e:
                raise AssertionError(f"body cut short at {len(body)}/{want} bytes: {e!r}") from e
            if not chunk:
                raise AssertionError(f"body cut short at {len(body)}/{want} bytes (connection closed)")
            body += chunk
    else:
        while True:
            try:
                chunk = rd.recv(1 << 20, deadline)
            except socket.timeout as e:
                raise AssertionError("no Content-Length and the connection stayed open") from e
            if not chunk:
                break
            body += chunk
    return Response(status, reason, headers, header_list, body)


def send_raw(node, data: bytes, port: int = HTTP_PORT, timeout: float = 15.0, method: str = "GET") -> Response:
    """Sends `data` as is on a new connection and reads one response."""
    host = _host_of(node)
    _check_addr(host)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (and close) before reading everything: read what it said
        return read_response(sock, method, timeout)


def http(node, method: str, path: str, headers: dict | None = None, port: int = HTTP_PORT, timeout: float = 15.0) -> Response:
    """One request on a fresh connection (`Connection: close`). `node` is a node index or an IP."""
    host = _host_of(node)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return send_raw(host, data, port=port, timeout=timeout, method=method)


def oci_path(kind: str, repo: str, ref: str, ns: str | None = REGISTRY) -> str:
    """`/v2/<repo>/<kind>/<ref>?ns=<ns>`, as containerd asks a mirror."""
    path = f"/v2/{repo}/{kind}/{ref}"
    return f"{path}?ns={ns}" if ns else path


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """One scrape of a node's /metrics/prometheus."""

    def __init__(self, text: str):
        self.samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if not m:
                continue
            labels = dict(_LABEL.findall(m.group(2) or ""))
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            self.samples.append((m.group(1), labels, value))

    def get(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for n, l, v in self.samples:
            if n == name and all(l.get(k) == str(val) for k, val in labels.items()):
                total += v
        return total

    def select(self, name: str):
        return [(l, v) for n, l, v in self.samples if n == name]


def metrics(node) -> Metrics:
    r = http(node, "GET", "/metrics/prometheus", port=METRICS_PORT, timeout=10)
    assert r.status == 200, r
    return Metrics(r.body.decode())


def wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    """Polls `cond()` until it returns a truthy value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except (OSError, AssertionError) as e:
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


# --------------------------------------------------------------------------- images


@dataclass
class Image:
    ref: str  # registry/repo:tag, what ctr pulls
    repo: str
    tag: str
    layers: list
    layer_sizes: list
    config: str
    manifest: str
    index: str | None
    manifest_bytes: bytes = b""
    index_bytes: bytes | None = None

    @property
    def blobs(self):
        return self.layers + [self.config]

    @property
    def layer_bytes(self) -> int:
        return sum(self.layer_sizes)

    @property
    def min_keys(self) -> int:
        """Keys a node advertises for this image at least: its blobs and manifests."""
        return len(self.blobs) + 1 + (1 if self.index else 0)


class LabError(AssertionError):
    pass


class Lab:
    """Drives ci/lab.sh. Every subprocess runs in its own session, killed as a group on timeout."""

    def __init__(self, engine: str, peerd_bin: Path):
        self.engine = engine
        self.peerd_bin = peerd_bin
        self.flags: dict[int, tuple | None] = {}  # node -> extra flags; None: stopped on purpose
        self.layouts: list[Path] = []

    # -- plumbing

    def _env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env["PEERD_BIN"] = str(self.peerd_bin)
        env["LAB_DIR"] = str(LAB_DIR)
        for k in ("NO_MEDIATYPE", "INDEX", "SEED", "TLS_REGISTRY"):
            env.pop(k, None)
        env.update(extra or {})
        return env

    def run(self, *args, timeout: float = 300, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["bash", str(LAB_SH), *map(str, args)]
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self._env(env), start_new_session=True, cwd=REPO_ROOT
        )
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise LabError(f"lab.sh {' '.join(map(str, args))} timed out after {timeout} s\nstdout: {out}\nstderr: {err[-4000:]}")
        res = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        if check and p.returncode != 0:
            raise LabError(
                f"lab.sh {' '.join(map(str, args))} failed (exit {p.returncode})\nstdout: {out}\nstderr: {err[-4000:]}"
            )
        return res

    def spawn(self, *args, env: dict | None = None) -> subprocess.Popen:
        """Starts a lab.sh command in the background (e.g. a pull to interfere with)."""
        cmd = ["bash", str(LAB_SH), *map(str, args)]
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self._env(env), start_new_session=True, cwd=REPO_ROOT
        )

    @staticmethod
    def finish(p: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise LabError(f"{' '.join(p.args)} timed out after {timeout} s\nstderr: {err[-4000:]}")
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    # -- lab life cycle

    def up(self):
        self.run("down", timeout=180)
        self.run("up", NODES, timeout=300)
        for i in range(1, NODES + 1):
            self.start_peerd(i, wait_mesh=False)
        self.wait_mesh()

    def down(self):
        self.run("down", timeout=180, check=False)

    # -- peerd

    def start_peerd(self, i: int, *extra: str, wait_mesh: bool = True):
        flags = list(extra)
        if not any(f == "--io-engine" or f.startswith("--io-engine=") for f in flags):
            flags = ["--io-engine", self.engine] + flags
        self.run("start-peerd", i, *flags, timeout=60)
        self.flags[i] = tuple(extra)
        if wait_mesh:
            self.wait_mesh()

    def stop_peerd(self, i: int, sig: str = "TERM"):
        self.flags[i] = None
        self.run("stop-peerd", i, sig, timeout=60)

    def peerd_pid(self, i: int) -> int | None:
        try:
            pid = int(Path(f"/run/peerd-lab/node{i}/peerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            st = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        state = st.rsplit(")", 1)[1].split()[0]
        return None if state in ("Z", "X") else pid

    def running(self):
        return [i for i in range(1, NODES + 1) if self.flags.get(i) is not None]

    def wait_mesh(self, timeout: float = 30):
        """Every running peerd sees every other running peerd and is ready (containerd scanned)."""
        nodes = self.running()
        want = len(nodes) - 1
        for i in nodes:
            wait_for(lambda: metrics(i).get("peerd_peers") >= want, timeout, f"node {i} to see {want} peer(s)", interval=0.1)
            if want > 0:
                wait_for(
                    lambda: http(i, "GET", "/readyz", port=METRICS_PORT).status == 200,
                    timeout,
                    f"node {i} to be ready",
                    interval=0.1,
                )

    def restore(self):
        """Back to the session's default: every node runs peerd with the default flags."""
        changed = False
        for i in range(1, NODES + 1):
            if self.flags.get(i) != () or self.peerd_pid(i) is None:
                if self.peerd_pid(i) is not None:
                    self.run("stop-peerd", i, "TERM", timeout=60, check=False)
                self.start_peerd(i, wait_mesh=False)
                changed = True
        if changed:
            self.wait_mesh()

    def log(self, i: int) -> str:
        try:
            return (LAB_DIR / f"node{i}" / "peerd.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- images

    def _layout(self, repo: str, tag: str) -> Path:
        return CACHE_DIR / "images" / f"{repo.replace('/', '_')}_{tag}"

    def _image_from_output(self, repo: str, tag: str, out: str) -> Image:
        layers, config, manifest, index = [], None, None, None
        for line in out.splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue
            k, v = parts
            if k == "layer":
                layers.append(v)
            elif k == "config":
                config = v
            elif k == "manifest":
                manifest = v
            elif k == "index":
                index = v
        assert layers and config and manifest, f"unexpected push output: {out!r}"
        layout = self._layout(repo, tag)
        blobs = layout / "blobs" / "sha256"
        sizes = [(blobs / d.split(":", 1)[1]).stat().st_size for d in layers]
        img = Image(
            ref=f"{REGISTRY}/{repo}:{tag}", repo=repo, tag=tag, layers=layers, layer_sizes=sizes,
            config=config, manifest=manifest, index=index,
            manifest_bytes=(blobs / manifest.split(":", 1)[1]).read_bytes(),
            index_bytes=(blobs / index.split(":", 1)[1]).read_bytes() if index else None,
        )
        # The layout is only needed for the push; big ones go away at once.
        shutil.rmtree(layout, ignore_errors=True)
        return img

    def push_random(self, name: str, layers: int, size_mib: float, tag: str = "v1", no_mediatype=False, index=False) -> Image:
        repo = f"itest/{name}-{uuid.uuid4().hex[:8]}"
        env = {}
        if no_mediatype:
            env["NO_MEDIATYPE"] = "1"
        if index:
            env["INDEX"] = "1"
        self.layouts.append(self._layout(repo, tag))
        out = self.run("push-random", f"{repo}:{tag}", layers, size_mib, env=env, timeout=300).stdout
        return self._image_from_output(repo, tag, out)

    def push_debian(self, name: str, tag: str = "bookworm") -> Image:
        repo = f"itest/{name}-{uuid.uuid4().hex[:8]}"
        self.layouts.append(self._layout(repo, tag))
        out = self.run("push-debian", f"{repo}:{tag}", timeout=900).stdout
        return self._image_from_output(repo, tag, out)

    # -- nodes

    def pull(self, i: int, img, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
        ref = img.ref if isinstance(img, Image) else img
        return self.run("pull", i, ref, timeout=timeout, check=check)

    def pull_seconds(self, i: int, img) -> float:
        out = self.pull(i, img).stdout
        m = re.search(r"pull-seconds\s+([0-9.]+)", out)
        assert m, out
        return float(m.group(1))

    def pull_and_advertise(self, i: int, img: Image, timeout: float = 20):
        """Pulls on node i, then waits (bounded) until its peerd announces the image."""
        self._advertised_after(i, img, lambda: self.pull(i, img), timeout)

    @staticmethod
    def _advertised_after(i: int, img: Image, pull, timeout: float):
        """Runs `pull`, then waits (bounded) until node i advertises img's keys on top of what it
        advertised before."""
        before = metrics(i).get("peerd_advertised_keys")
        pull()
        want = before + img.min_keys
        wait_for(
            lambda: metrics(i).get("peerd_advertised_keys") >= want,
            timeout,
            f"node {i} to advertise {img.ref} (advertised_keys >= {want})",
        )

    def pull_from_registry(self, i: int, img, timeout: float = 240) -> subprocess.CompletedProcess:
        """Pulls on node i straight from the registry, as if there were no mirror: containerd gets no
        hosts.toml that names peerd. peerd only sees the new content in containerd; no peerd
        fetches anything, so no pull-through cache holds the image afterwards."""
        ref = img.ref if isinstance(img, Image) else img
        # ctr takes the last --hosts-dir given: this empty one, after lab.sh's own; the registry is
        # then asked directly (over plain HTTP, as the lab's registry speaks).
        hosts_dir = LAB_DIR / f"node{i}" / "certs.registry-only"
        hosts_dir.mkdir(parents=True, exist_ok=True)
        return self.run("pull", i, ref, "--hosts-dir", str(hosts_dir), "--plain-http", timeout=timeout)

    def seed(self, i: int, img: Image, timeout: float = 20):
        """Makes node i the only holder of `img`, the way it was before pull-through: a pull straight
        from the registry, then (bounded) until node i's peerd announces it. Tests of the peer path
        use it so that which node serves what does not depend on where pull-through put a blob."""
        self._advertised_after(i, img, lambda: self.pull_from_registry(i, img), timeout)

    def cache_file(self, i: int, digest: str, partial: bool = False) -> Path:
        """Where node i's peerd keeps a blob it pulled through from upstream."""
        algo, hexd = digest.split(":", 1)
        return LAB_DIR / f"node{i}" / "peerd" / "cache" / algo / (hexd + (".partial" if partial else ""))

    def registry_blob_file(self, digest: str) -> Path:
        """The registry's own copy of a blob (its filesystem storage driver serves it as is)."""
        algo, hexd = digest.split(":", 1)
        return LAB_DIR / "registry" / "storage" / "docker" / "registry" / "v2" / "blobs" / algo / hexd[:2] / hexd / "data"

    def check(self, i: int, img) -> str:
        ref = img.ref if isinstance(img, Image) else img
        res = self.run("check", i, ref, timeout=120, check=False)
        assert res.returncode == 0 and "check-ok" in res.stdout, f"check {ref} on node {i} failed:\n{res.stdout}\n{res.stderr[-2000:]}"
        return res.stdout

    def rmi(self, i: int, img):
        ref = img.ref if isinstance(img, Image) else img
        return self.run("rmi", i, ref, timeout=120)

    def registry_log_count(self, digest: str) -> int:
        return int(self.run("registry-log-count", digest).stdout.strip())

    def registry_access_log(self) -> str:
        try:
            return (LAB_DIR / "registry" / "access.log").read_text(errors="replace")
        except OSError:
            return ""

    def set_registry_rate(self, rate: str):
        self.run("set-registry-rate", rate)

    def bytes_acked_to(self, server: int, client_ip: str) -> int:
        """Bytes that peerd on node `server` has had acknowledged on one connection from `client_ip`
        (the largest such connection): how far a transfer to that client has come."""
        res = self.exec(server, "ss", "-Htni", "state", "established", "( sport = :5000 )", check=False, timeout=10)
        total = 0
        peer = None
        for line in res.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 4 and not line.startswith((" ", "\t")):
                # recv-q send-q local peer
                peer = fields[3].rsplit(":", 1)[0]
                continue
            m = re.search(r"bytes_acked:(\d+)", line)
            if m and peer == client_ip:
                total = max(total, int(m.group(1)))
        return total

    def exec(self, i: int, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("exec", i, *cmd, check=check, timeout=timeout)

    def content_file(self, i: int, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return LAB_DIR / f"node{i}" / "root" / "io.containerd.content.v1.content" / "blobs" / algo / hexd

    def cleanup_layouts(self):
        for p in self.layouts:
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- fixtures


def _take_session_lock(wait: float):
    fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                pytest.exit(f"the lab is busy: could not lock {SESSION_LOCK} within {wait} s", returncode=3)
            if not told:
                sys.stderr.write(f"\nwaiting for the lab lock {SESSION_LOCK} (someone else uses the lab)...\n")
                told = True
            time.sleep(2)


def _save_artifacts():
    dest = Path(os.environ.get("PEERD_ITEST_ARTIFACTS", "/tmp/peerd-itest-artifacts")) / time.strftime("%Y%m%d-%H%M%S")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for i in range(1, NODES + 1):
            for f in ("peerd.log", "peerd.log.prev", "containerd.log", "pull.log"):
                src = LAB_DIR / f"node{i}" / f
                if src.exists():
                    shutil.copy(src, dest / f"node{i}-{f}")
        for f in ("access.log", "registry.log"):
            src = LAB_DIR / "registry" / f
            if src.exists():
                shutil.copy(src, dest / f"registry-{f}")
        sys.stderr.write(f"\npeerd integration: logs of the failed session saved in {dest}\n")
    except OSError as e:
        sys.stderr.write(f"\ncould not save logs: {e}\n")


@pytest.fixture(scope="session")
def lab(request):
    if os.geteuid() != 0:
        pytest.exit("the peerd lab needs root", returncode=3)
    src = TARGET_DIR / "release" / "peerd"
    if not os.access(os.environ.get("PEERD_BIN", src), os.X_OK):
        pytest.exit(f"peerd binary not found: {src} (cargo build --release, or set PEERD_BIN)", returncode=3)
    engine = request.config.getoption("--io-engine")
    lock_fd = _take_session_lock(request.config.getoption("--lab-lock-wait"))

    # A CI job cancelled with SIGTERM still takes the lab down and restores sysctls on its way out.
    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="peerd-itest-"))
    lab = None
    try:
        # A private copy: a rebuild during the session must not swap the binary under the lab.
        peerd_bin = tmp / "peerd"
        shutil.copy2(os.environ.get("PEERD_BIN", src), peerd_bin)
        subprocess.run([str(peerd_bin), "version"], check=True, capture_output=True, timeout=10)
        lab = Lab(engine, peerd_bin)
        lab.up()
        yield lab
    finally:
        try:
            if request.session.testsfailed:
                _save_artifacts()
        finally:
            if lab is not None:
                lab.cleanup_layouts()
            Lab(engine, Path("/nonexistent")).down()
            shutil.rmtree(tmp, ignore_errors=True)
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
            signal.signal(signal.SIGTERM, previous_handler)


@pytest.fixture(autouse=True)
def lab_state(request, lab):
    """Before each test: the default lab. After it: no peerd died unasked; back to the default."""
    lab.restore()
    yield lab
    died = [i for i in range(1, NODES + 1) if lab.flags.get(i) is not None and lab.peerd_pid(i) is None]
    tails = {i: "\n".join(lab.log(i).splitlines()[-30:]) for i in died}
    lab.restore()
    if died:
        pytest.fail(
            "peerd exited on its own during the test on node(s) "
            + ", ".join(map(str, died))
            + "".join(f"\n---- node {i} peerd.log (tail)\n{t}" for i, t in tails.items())
        )
