"""Harness of peerd's Kubernetes tests: the shared lab (ci/lab.sh, 5 nodes), a real API server
(ci/k8s/control-plane.sh), pod objects that stand in for the DaemonSet's pods, metrics and HTTP.

There is no kubelet and no controller-manager: a "peerd pod" here is a Pod object whose status the
test writes itself (phase Running, podIP = the lab node's IP), and a lab node's peerd plays that pod
by running with POD_NAME / POD_NAMESPACE / KUBECONFIG in its environment.

Only loopback and 198.18.0.0/15 are ever contacted.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LAB_SH = REPO_ROOT / "ci" / "lab.sh"
CONTROL_PLANE_SH = REPO_ROOT / "ci" / "k8s" / "control-plane.sh"
CHART = REPO_ROOT / "k8s" / "peerd-helm"
KIND_E2E = REPO_ROOT / "ci" / "kind-e2e.sh"
EVENTS_PY = Path(__file__).resolve().parent / "events.py"
SESSION_LOCK = "/var/lock/peerd-lab-session.lock"
LAB_DIR = Path(os.environ.get("LAB_DIR", "/var/lib/peerd-lab"))
CACHE_DIR = Path(os.environ.get("PEERD_CACHE", "/root/.cache/peerd"))
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", "/root/.cache/peerd/target"))
K8S_BIN = Path(os.environ.get("PEERD_K8S_CACHE", "/root/.cache/peerd/k8s")) / "bin"
KUBECTL = K8S_BIN / "kubectl"
HELM = K8S_BIN / "helm"
# A control plane of our own (state dir and ports), so that nobody else's use of
# ci/k8s/control-plane.sh (its selftest, a default instance) can stop ours mid-run, or we theirs.
CP_STATE = Path(os.environ.get("PEERD_K8S_TEST_STATE", "/var/lib/peerd-k8s-tests"))
CP_ENV = {
    "PEERD_K8S_STATE": str(CP_STATE),
    "PEERD_K8S_PORT": os.environ.get("PEERD_K8S_TEST_PORT", "6543"),
    "PEERD_K8S_ETCD_PORT": os.environ.get("PEERD_K8S_TEST_ETCD_PORT", "12379"),
}
REGISTRY = "198.18.0.2:5000"
NODES = 5
HTTP_PORT = 5000
ROUTER_PORT = 5003
METRICS_PORT = 5004
MIB = 1 << 20

_ALLOWED_NETS = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("127.0.0.0/8")]


def node_ip(i: int) -> str:
    return f"198.18.0.{10 + i}"


def pod_name(i: int) -> str:
    return f"peerd-node{i}"


def _check_addr(host: str) -> None:
    addr = ipaddress.ip_address(host)
    if not any(addr in net for net in _ALLOWED_NETS):
        raise AssertionError(f"refusing to contact {host}: outside 198.18.0.0/15 and loopback")


# --------------------------------------------------------------------------- processes


class CommandError(AssertionError):
    pass


def run(cmd, timeout: float = 120, env: dict | None = None, check: bool = True, input: str | None = None,
        cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Runs `cmd` in its own session; on timeout the whole group is killed."""
    cmd = [str(c) for c in cmd]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True, cwd=cwd)
    try:
        out, err = p.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise CommandError(f"{' '.join(cmd)} timed out after {timeout} s\nstdout: {out[-2000:]}\nstderr: {err[-4000:]}")
    res = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and p.returncode != 0:
        raise CommandError(f"{' '.join(cmd)} failed (exit {p.returncode})\nstdout: {out[-4000:]}\nstderr: {err[-4000:]}")
    return res


def wait_for(cond, timeout: float, what: str, interval: float = 0.2):
    """Polls `cond()` until it returns a truthy value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except (OSError, AssertionError, http.client.HTTPException) as e:
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


# --------------------------------------------------------------------------- HTTP and metrics


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes
    complete: bool  # False: the connection ended before Content-Length bytes arrived


def http_get(host: str, port: int, path: str, timeout: float = 15.0, method: str = "GET") -> Response:
    """One request, no proxy (http.client ignores *_proxy). A body cut short is returned with
    complete=False rather than raised."""
    _check_addr(host)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Connection": "close"})
        r = conn.getresponse()
        headers = {k.lower(): v for k, v in r.getheaders()}
        try:
            body = r.read()
            complete = True
        except http.client.IncompleteRead as e:
            body, complete = e.partial, False
        except (ConnectionError, TimeoutError, OSError):
            body, complete = b"", False
        if complete and "content-length" in headers and method != "HEAD":
            complete = len(body) == int(headers["content-length"])
        return Response(r.status, headers, body, complete)
    finally:
        conn.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    def __init__(self, text: str):
        self.samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if not m:
                continue
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            self.samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))

    def get(self, name: str, **labels) -> float:
        return sum(v for n, l, v in self.samples if n == name and all(l.get(k) == str(x) for k, x in labels.items()))

    def names(self) -> set:
        return {n for n, _, _ in self.samples}


def metrics(host: str) -> Metrics:
    r = http_get(host, METRICS_PORT, "/metrics/prometheus", timeout=10)
    assert r.status == 200, f"metrics of {host}: HTTP {r.status}"
    return Metrics(r.body.decode())


def peers(host: str) -> float:
    return metrics(host).get("peerd_peers")


def ready(host: str) -> bool:
    return http_get(host, METRICS_PORT, "/readyz", timeout=5).status == 200


def served(host: str, source: str) -> float:
    return metrics(host).get("peerd_bytes_served_total", source=source)


# --------------------------------------------------------------------------- lab


@dataclass
class Image:
    ref: str
    repo: str
    tag: str
    layers: list
    layer_sizes: list
    config: str
    manifest: str

    @property
    def blobs(self):
        return self.layers + [self.config]

    @property
    def layer_bytes(self) -> int:
        return sum(self.layer_sizes)


class Lab:
    """Drives ci/lab.sh with a private copy of the peerd binary."""

    def __init__(self, peerd_bin: Path):
        self.peerd_bin = peerd_bin

    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        for k in ("NO_MEDIATYPE", "INDEX", "SEED", "POD_NAME", "POD_NAMESPACE", "KUBECONFIG",
                  "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            env.pop(k, None)
        env["PEERD_BIN"] = str(self.peerd_bin)
        env["LAB_DIR"] = str(LAB_DIR)
        env.update(extra or {})
        return env

    def run(self, *args, timeout: float = 300, env: dict | None = None, check: bool = True):
        return run(["bash", LAB_SH, *args], timeout=timeout, env=self.env(env), check=check)

    def up(self):
        self.run("down", timeout=180)
        self.run("up", NODES, timeout=300)

    def down(self):
        self.run("down", timeout=180, check=False)

    def start_peerd(self, i: int, *flags: str, env: dict | None = None):
        self.run("start-peerd", i, *flags, timeout=60, env=env)

    def stop_peerd(self, i: int, sig: str = "TERM", check: bool = True):
        self.run("stop-peerd", i, sig, timeout=60, check=check)

    def stop_all(self):
        for i in range(1, NODES + 1):
            if self.peerd_pid(i) is not None:
                self.stop_peerd(i, "TERM", check=False)

    def peerd_pid(self, i: int) -> int | None:
        try:
            pid = int(Path(f"/run/peerd-lab/node{i}/peerd.pid").read_text().strip())
            st = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError):
            return None
        return None if st.rsplit(")", 1)[1].split()[0] in ("Z", "X") else pid

    def log(self, i: int) -> str:
        try:
            return (LAB_DIR / f"node{i}" / "peerd.log").read_text(errors="replace")
        except OSError:
            return ""

    def snapshotter(self) -> str:
        try:
            return Path("/run/peerd-lab/snapshotter").read_text().strip() or "overlayfs"
        except OSError:
            return "overlayfs"

    def push_random(self, name: str, layers: int, size_mib: float, tag: str = "v1") -> Image:
        repo = f"k8stest/{name}-{uuid.uuid4().hex[:8]}"
        layout = CACHE_DIR / "images" / f"{repo.replace('/', '_')}_{tag}"
        try:
            out = self.run("push-random", f"{repo}:{tag}", layers, size_mib, timeout=300).stdout
            got = {"layer": []}
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 2:
                    if parts[0] == "layer":
                        got["layer"].append(parts[1])
                    else:
                        got[parts[0]] = parts[1]
            blobs = layout / "blobs" / "sha256"
            sizes = [(blobs / d.split(":", 1)[1]).stat().st_size for d in got["layer"]]
            return Image(f"{REGISTRY}/{repo}:{tag}", repo, tag, got["layer"], sizes, got["config"], got["manifest"])
        finally:
            shutil.rmtree(layout, ignore_errors=True)

    def pull(self, i: int, img: Image, timeout: float = 180):
        return self.run("pull", i, img.ref, timeout=timeout)

    def pull_from_registry(self, i: int, img: Image, timeout: float = 180):
        """Pulls on node i straight from the registry, past peerd (no hosts.toml that names it),
        so that no peerd's pull-through cache holds the image: node i is its only holder."""
        # ctr takes the last --hosts-dir given: this empty one, after lab.sh's own; the registry is
        # then asked directly (over plain HTTP, as the lab's registry speaks).
        hosts_dir = LAB_DIR / f"node{i}" / "certs.registry-only"
        hosts_dir.mkdir(parents=True, exist_ok=True)
        return self.run("pull", i, img.ref, "--hosts-dir", str(hosts_dir), "--plain-http", timeout=timeout)

    def check(self, i: int, img: Image):
        res = self.run("check", i, img.ref, timeout=120, check=False)
        assert res.returncode == 0 and "check-ok" in res.stdout, f"check {img.ref} on node {i}:\n{res.stdout}\n{res.stderr[-2000:]}"

    def registry_log_count(self, digest: str) -> int:
        return int(self.run("registry-log-count", digest).stdout.strip())

    def content_file(self, i: int, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return LAB_DIR / f"node{i}" / "root" / "io.containerd.content.v1.content" / "blobs" / algo / hexd

    def content_dir(self, i: int) -> Path:
        return LAB_DIR / f"node{i}" / "root" / "io.containerd.content.v1.content"

    def wait_advertised(self, i: int, at_least: float, timeout: float = 30):
        wait_for(lambda: metrics(node_ip(i)).get("peerd_advertised_keys") >= at_least, timeout,
                 f"node {i} to advertise >= {at_least} keys")


# --------------------------------------------------------------------------- the chart


def render_chart(*args: str) -> list[dict]:
    """`helm template peerd k8s/peerd-helm ARGS...` as a list of objects."""
    import yaml

    out = run([HELM, "template", "peerd", CHART, *args], timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"want exactly one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def flag_values(args: list[str]) -> dict[str, str]:
    """`--name=value` / `--name value` / `--switch` -> {name: value}."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a[2:].split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                k, v = a[2:], args[i + 1]
                i += 1
            else:
                k, v = a[2:], "true"
            out[k] = v
        i += 1
    return out


# --------------------------------------------------------------------------- API server


def control_plane(*args, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """ci/k8s/control-plane.sh on the tests' own instance (CP_ENV)."""
    return run(["bash", CONTROL_PLANE_SH, *args], timeout=timeout, env={**os.environ, **CP_ENV}, check=check)


def control_plane_install():
    """`control-plane.sh install` (cached). It sometimes dies of SIGPIPE (exit 141) after the
    work is done (`etcd --version | head -1` under pipefail): retried."""
    for attempt in range(4):
        res = run(["bash", CONTROL_PLANE_SH, "install"], timeout=3600, check=False)
        if res.returncode == 0:
            return res
        if res.returncode != 141 or attempt == 3:
            raise CommandError(f"control-plane.sh install failed (exit {res.returncode})\n{res.stderr[-4000:]}")
    return res


class Cluster:
    """The control plane of ci/k8s/control-plane.sh, driven through its kubectl."""

    def __init__(self, kubeconfig: str, server: str, workdir: Path):
        self.kubeconfig = kubeconfig
        self.server = server
        self.workdir = workdir
        self.namespaces: list[str] = []

    def kubectl(self, *args, input: str | None = None, timeout: float = 60, check: bool = True):
        return run([KUBECTL, "--kubeconfig", self.kubeconfig, *args], input=input, timeout=timeout, check=check)

    def get_json(self, *args) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, obj: dict | list, server_side: bool = True):
        docs = obj if isinstance(obj, list) else [obj]
        text = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
        args = ["apply", "-f", "-"] + (["--server-side", "--field-manager", "peerd-k8s-tests"] if server_side else [])
        return self.kubectl(*args, input=text)

    def namespace(self, prefix: str) -> str:
        """A fresh namespace (with its default ServiceAccount), removed at the end of the session."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        control_plane("namespace", name, timeout=60)
        self.namespaces.append(name)
        return name

    def create_peerd_pod(self, ns: str, i: int, running: bool = True) -> str:
        """The Pod object a DaemonSet would create for lab node i (label app=peerd), with the
        status a kubelet would write once the container runs (not Ready: a peerd pod becomes
        ready only when it has peers). Returns its uid."""
        name = pod_name(i)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "peerd", "lab-node": str(i)}},
            "spec": {
                "nodeName": f"lab-node{i}",
                "hostNetwork": True,
                "containers": [{"name": "peerd", "image": "localhost/peerd:0.1.0", "args": ["run"]}],
            },
        }
        self.kubectl("create", "-f", "-", input=json.dumps(pod))
        if running:
            self.set_pod_running(ns, i)
        return self.get_json("pod", "-n", ns, name)["metadata"]["uid"]

    def set_pod_running(self, ns: str, i: int):
        ip = node_ip(i)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        cond = lambda t, s: {"type": t, "status": s, "lastTransitionTime": now}  # noqa: E731
        status = {
            "status": {
                "phase": "Running",
                "hostIP": ip,
                "hostIPs": [{"ip": ip}],
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now,
                "conditions": [cond("PodScheduled", "True"), cond("Initialized", "True"),
                               cond("ContainersReady", "False"), cond("Ready", "False")],
                "containerStatuses": [{
                    "name": "peerd", "image": "localhost/peerd:0.1.0", "imageID": "", "ready": False,
                    "restartCount": 0, "started": True, "state": {"running": {"startedAt": now}},
                }],
            }
        }
        self.kubectl("patch", "pod", pod_name(i), "-n", ns, "--subresource=status", "--type=merge",
                     "-p", json.dumps(status))

    def delete_pod(self, ns: str, i: int):
        # A bound pod is deleted gracefully: it keeps existing, with a deletionTimestamp, until
        # its kubelet confirms. There is no kubelet here, so peerd sees exactly that state.
        self.kubectl("delete", "pod", pod_name(i), "-n", ns, "--wait=false")

    def peerd_env(self, ns: str, i: int, kubeconfig: str | None = None) -> dict:
        return {"KUBECONFIG": kubeconfig or self.kubeconfig, "POD_NAME": pod_name(i), "POD_NAMESPACE": ns}

    def install_chart_rbac(self, ns: str) -> list[dict]:
        """The chart's ServiceAccount, Role and RoleBinding, rendered into namespace `ns`."""
        objs = render_chart("--set", f"peerd.namespace.k8s={ns}")
        rbac = [o for o in objs if o["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
        assert {o["kind"] for o in rbac} == {"ServiceAccount", "Role", "RoleBinding"}, rbac
        self.apply(rbac)
        return rbac

    def service_account_token(self, ns: str, sa: str = "peerd") -> str:
        return self.kubectl("create", "token", sa, "-n", ns, "--duration", "1h").stdout.strip()

    def ca_pem(self) -> bytes:
        import base64

        import yaml

        kc = yaml.safe_load(Path(self.kubeconfig).read_text())
        return base64.b64decode(kc["clusters"][0]["cluster"]["certificate-authority-data"])

    def service_account_kubeconfig(self, ns: str, sa: str = "peerd") -> str:
        """A kubeconfig that acts as ServiceAccount `sa` of `ns` (what peerd is in the chart's pods)."""
        import base64

        token = self.service_account_token(ns, sa)
        path = self.workdir / f"kubeconfig-{ns}-{sa}"
        ca = base64.b64encode(self.ca_pem()).decode()
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "c", "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa, "namespace": ns}}],
        }))
        path.chmod(0o600)
        return str(path)

    def remove_namespace(self, ns: str):
        """Best effort: there is no namespace controller, so empty it ourselves, then delete it
        without finalizers."""
        self.kubectl("delete", "pods", "--all", "-n", ns, "--grace-period=0", "--force", "--wait=false",
                     check=False, timeout=60)
        self.kubectl("delete", "events.events.k8s.io,daemonsets,roles,rolebindings,serviceaccounts,configmaps",
                     "--all", "-n", ns, "--wait=false", check=False, timeout=60)
        self.drop_namespace(ns)

    def drop_namespace(self, ns: str):
        """Deletes a namespace without the namespace controller: mark it terminating, clear its
        finalizers (what the controller does once the namespace is empty), delete it again."""
        self.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
        res = self.kubectl("get", "namespace", ns, "-o", "json", check=False)
        if res.returncode != 0:
            return
        doc = json.loads(res.stdout)
        doc.setdefault("spec", {})["finalizers"] = []
        self.kubectl("replace", "--raw", f"/api/v1/namespaces/{ns}/finalize", "-f", "-",
                     input=json.dumps(doc), check=False)
        self.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)

    def remove_stale_namespaces(self):
        """This control plane is the tests' own: any namespace but the system ones is left over
        from an earlier session that could not clean up."""
        names = self.kubectl("get", "namespaces", "-o", "name").stdout.split()
        for n in (x.split("/", 1)[1] for x in names):
            if n not in ("default", "kube-system", "kube-public", "kube-node-lease"):
                self.remove_namespace(n)
