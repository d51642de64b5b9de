"""The helm chart (k8s/peerd-helm): lint, render, and the real API server accepts what it renders.

What an operator relies on: the DaemonSet reaches the node's containerd (socket, content store
read-only, certs.d), runs on every node (tolerations, system-node-critical, host network so that
`http://localhost:<port>` in hosts.toml is this node's peerd), its init container points containerd
at it, the probes hit /healthz and /readyz, the pods carry `app=peerd`, and the RBAC is namespaced
and no wider than what peerd uses.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from k8slib import CHART, HELM, control_plane_install, flag_values, one, render_chart, run

NAMESPACE = "peerd-ns"
IMAGE = "localhost:5000/peerd:k8s-test"
VARIANTS = {
    "defaults": [],
    "image-ref": ["--set", f"peerd.image.ref={IMAGE}"],
    "aks-auto-discovery": ["--set", "peerd.metrics.prometheus.aksAutoDiscovery=true"],
    "io-uring": ["--set", "peerd.ioUring=true"],
}
EXPECTED_RULES = {
    ("events.k8s.io", "events"): {"create", "patch"},
    ("", "pods"): {"get", "list", "watch"},
}


@pytest.fixture(scope="module")
def helm():
    # Cached: a no-op when the binaries are there (builds them from the Go proxy otherwise).
    control_plane_install()
    return HELM


def render(helm, *args) -> list[dict]:
    return render_chart(*args)


def rendered_text(helm, *args) -> str:
    return run([helm, "template", "peerd", CHART, *args], timeout=60).stdout


def peerd_flags(peerd_bin, *sub) -> set[str]:
    text = run([peerd_bin, *sub, "--help"], timeout=10).stdout
    return set(re.findall(r"--([a-z0-9-]+)", text))


def volume_of(pod_spec: dict, container: dict, mount_path: str) -> tuple[dict, dict]:
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert mounts, f"container {container['name']} mounts nothing at {mount_path}: {container.get('volumeMounts')}"
    vols = [v for v in pod_spec.get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert vols, f"no volume {mounts[0]['name']}"
    return mounts[0], vols[0]


def port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    raise AssertionError(f"no port named {port} in container {container['name']}")


def check_daemonset(objs: list[dict], peerd_bin, image: str | None = None) -> dict:
    ds = one(objs, "DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    assert ds["metadata"]["namespace"] == NAMESPACE
    spec = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert labels.get("app") == "peerd", f"pod labels {labels}"
    assert ds["spec"]["selector"]["matchLabels"].get("app") == "peerd", ds["spec"]["selector"]
    assert spec.get("hostNetwork") is True, "peerd must share the node's network (localhost mirror)"
    assert spec.get("dnsPolicy") == "ClusterFirstWithHostNet"
    assert spec.get("priorityClassName") == "system-node-critical"
    tol = spec.get("tolerations") or []
    assert {"operator": "Exists"} in tol, f"a node-level DaemonSet tolerates every taint: {tol}"
    sa = one(objs, "ServiceAccount")
    assert spec.get("serviceAccountName") == sa["metadata"]["name"]

    (main,) = [c for c in spec["containers"] if c["name"] == "peerd"]
    argv = main.get("command", []) + main.get("args", [])
    assert argv[:2] == ["/peerd", "run"], argv
    flags = flag_values(argv[2:])
    known = peerd_flags(peerd_bin, "run")
    assert set(flags) <= known, f"flags peerd run does not know: {set(flags) - known}"
    http_port = int(flags["http-addr"].rsplit(":", 1)[1])
    metrics_port = int(flags["prom-addr"].rsplit(":", 1)[1])
    mirror = flags["mirrors"]
    assert mirror == f"http://localhost:{http_port}", f"hosts.toml mirror {mirror} is not this node's peerd on :{http_port}"
    assert flags.get("bootstrap") == "kubernetes"
    env = {e["name"]: e for e in main.get("env", [])}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    # containerd's socket, its content store (read-only), peerd's data dir, certs.d.
    m, v = volume_of(spec, main, flags["containerd-socket"])
    assert v["hostPath"]["path"] == "/run/containerd/containerd.sock" and v["hostPath"].get("type") == "Socket", v
    m, v = volume_of(spec, main, flags["content-dir"])
    assert m.get("readOnly") is True, f"the content store is mounted read-write: {m}"
    assert v["hostPath"]["path"] == "/var/lib/containerd/io.containerd.content.v1.content", v
    m, v = volume_of(spec, main, flags["data-dir"])
    assert v["hostPath"]["path"] == "/var/lib/peerd", v

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = main[probe]["httpGet"]
        assert get["path"] == path, f"{probe}: {get}"
        assert port_number(main, get["port"]) == metrics_port, f"{probe} port {get['port']} is not the metrics port"

    inits = spec.get("initContainers") or []
    (init,) = [c for c in inits if c["name"] == "configure-containerd"]
    iargv = init.get("command", []) + init.get("args", [])
    assert iargv[:2] == ["/peerd", "configure-containerd"], iargv
    iflags = flag_values(iargv[2:])
    iknown = peerd_flags(peerd_bin, "configure-containerd")
    assert set(iflags) <= iknown, f"flags configure-containerd does not know: {set(iflags) - iknown}"
    assert iflags["mirrors"] == mirror
    m, v = volume_of(spec, init, iflags["containerd-hosts-config-path"])
    assert not m.get("readOnly"), "the init container writes hosts.toml"
    assert v["hostPath"]["path"] == "/etc/containerd/certs.d", v
    if image is not None:
        assert main["image"] == image and init["image"] == image, (main["image"], init["image"])
    return ds


def check_rbac(objs: list[dict]):
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, f"RBAC must be namespaced: {kinds}"
    role = one(objs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    rules = {}
    for r in role["rules"]:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                rules.setdefault((g, res), set()).update(r.get("verbs", []))
    assert rules == EXPECTED_RULES, f"Role rules {rules}, want exactly {EXPECTED_RULES}"
    rb = one(objs, "RoleBinding")
    sa = one(objs, "ServiceAccount")
    assert rb["metadata"]["namespace"] == NAMESPACE and sa["metadata"]["namespace"] == NAMESPACE
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]


# --------------------------------------------------------------------------- rendering only


def test_helm_lint(helm):
    res = run([helm, "lint", "--strict", CHART], timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in res.stdout, res.stdout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_template_daemonset(helm, k8s_peerd_bin, variant):
    objs = render(helm, *VARIANTS[variant])
    ds = check_daemonset(objs, k8s_peerd_bin, IMAGE if variant == "image-ref" else None)
    check_rbac(objs)
    seccomp = ds["spec"]["template"]["spec"].get("securityContext", {}).get("seccompProfile", {}).get("type")
    assert seccomp == ("Unconfined" if variant == "io-uring" else "RuntimeDefault"), seccomp
    aks = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("ama-metrics")]
    if variant == "aks-auto-discovery":
        assert len(aks) == 1, [o["metadata"]["name"] for o in objs]
        cm = aks[0]
        assert cm["metadata"]["namespace"] == "kube-system"
        cfg = yaml.safe_load(cm["data"]["prometheus-config"])
        (job,) = cfg["scrape_configs"]
        assert job["metrics_path"] == "/metrics/prometheus"
        assert "5004" in json.dumps(job), job
    else:
        assert not aks, "the AKS scrape ConfigMap is opt-in"


def test_helm_template_defaults_image(helm):
    objs = render(helm)
    ds = one(objs, "DaemonSet")
    for c in ds["spec"]["template"]["spec"]["containers"] + ds["spec"]["template"]["spec"]["initContainers"]:
        assert c["image"] and ":" in c["image"].rsplit("/", 1)[-1], f"image without a tag: {c['image']}"


def test_helm_template_values_keys(helm):
    """Peerd's value keys do what their names say."""
    objs = render(helm, "--set", "peerd.logLevel=debug", "--set", "peerd.configureMirrors=false",
                  "--set", "peerd.hosts=https://ghcr.io", "--set", "peerd.image.pullPolicy=Always",
                  "--set", "peerd.namespace.k8s=other-ns")
    for o in objs:
        if o["kind"] not in ("Namespace", "ConfigMap"):
            assert o["metadata"]["namespace"] == "other-ns", f"{o['kind']} {o['metadata']['name']} not in other-ns"
    ns = one(objs, "Namespace")
    assert ns["metadata"]["name"] == "other-ns"
    ds = one(objs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert not spec.get("initContainers"), "configureMirrors=false: no init container"
    (main,) = spec["containers"]
    flags = flag_values(main["args"][1:])
    assert flags["log-level"] == "debug" and flags["hosts"] == "https://ghcr.io", flags
    assert main["imagePullPolicy"] == "Always"


def test_helm_template_peerd_hosts_list(helm):
    """Azure Peerd's values give `peerd.hosts` as a list; a values file brought over works."""
    objs = render(helm, "--set-json", 'peerd.hosts=["https://mcr.microsoft.com","https://ghcr.io"]')
    ds = one(objs, "DaemonSet")
    for c in ds["spec"]["template"]["spec"]["containers"] + ds["spec"]["template"]["spec"]["initContainers"]:
        argv = c.get("command", []) + c.get("args", [])
        hosts = flag_values(argv[2:]).get("hosts")
        assert hosts == "https://mcr.microsoft.com,https://ghcr.io", f"{c['name']}: --hosts {hosts!r}"


def test_init_container_args_run(helm, k8s_peerd_bin, tmp_path):
    """The init container's exact command line, run with the real binary, points containerd at
    the node's peerd; the preStop command gives containerd its files back."""
    objs = render(helm)
    spec = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    original = 'server = "https://registry-1.docker.io"\n'
    (certs / "docker.io" / "hosts.toml").write_text(original)
    mount = volume_of(spec, init, flag_values(init["args"][1:])["containerd-hosts-config-path"])[0]["mountPath"]
    argv = [a.replace(mount, str(certs)) for a in init["command"][1:] + init["args"]]
    run([k8s_peerd_bin, *argv], timeout=30)
    for host in ("docker.io", "ghcr.io", "mcr.microsoft.com"):
        text = (certs / host / "hosts.toml").read_text()
        assert "http://localhost:30000" in text, f"{host}/hosts.toml:\n{text}"
    (main,) = spec["containers"]
    pre = main["lifecycle"]["preStop"]["exec"]["command"]
    run([k8s_peerd_bin, *[a.replace(mount, str(certs)) for a in pre[1:]]], timeout=30)
    assert (certs / "docker.io" / "hosts.toml").read_text() == original
    assert not (certs / "ghcr.io" / "hosts.toml").exists()


# --------------------------------------------------------------------------- the API server


def _reset_namespace(cluster, ns):
    if cluster.kubectl("get", "namespace", ns, check=False).returncode == 0:
        cluster.remove_namespace(ns)


def test_chart_accepted_by_api_server(env, helm):
    """Every object of every variant goes in with server-side apply; the RBAC grants exactly what
    peerd uses; a pod made from the DaemonSet's template passes admission (priority class,
    ServiceAccount, hostPath volumes)."""
    cluster = env.cluster
    _reset_namespace(cluster, NAMESPACE)
    cluster.namespaces.append(NAMESPACE)
    applied = []
    try:
        for variant, args in VARIANTS.items():
            text = rendered_text(helm, *args)
            res = cluster.kubectl("apply", "--server-side", "--field-manager", "helm-template", "-f", "-",
                                  input=text, check=False)
            assert res.returncode == 0, f"{variant}: server-side apply rejected:\n{res.stderr}"
            names = set(re.findall(r"^(\S+) serverside-applied$", res.stdout, re.M))
            objs = [o for o in yaml.safe_load_all(text) if o]
            assert len(names) == len(objs), f"{variant}: applied {names}, rendered {len(objs)} objects"
            applied.append(text)
        # The last variant applied (io-uring) is on the server, with the earlier ones' leftovers.
        ds = cluster.get_json("daemonset", "peerd", "-n", NAMESPACE)
        assert ds["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["type"] == "Unconfined"
        assert cluster.kubectl("get", "configmap", "-n", "kube-system", "-l", "app=peerd", "-o", "name").stdout.strip()

        sa = f"system:serviceaccount:{NAMESPACE}:peerd"

        def can(verb, resource, ns=NAMESPACE, *extra):
            r = cluster.kubectl("auth", "can-i", verb, resource, "--as", sa, *(["-n", ns] if ns else []), *extra,
                                check=False)
            return r.stdout.strip() == "yes"

        allowed = [("create", "events.events.k8s.io"), ("patch", "events.events.k8s.io"),
                   ("get", "pods"), ("list", "pods"), ("watch", "pods")]
        denied = [("delete", "pods"), ("create", "pods"), ("update", "pods/status"), ("list", "secrets"),
                  ("get", "configmaps"), ("create", "events"), ("delete", "events.events.k8s.io"),
                  ("list", "nodes", None), ("list", "pods", "default"), ("create", "events.events.k8s.io", "default")]
        got_allowed = {a: can(*a) for a in allowed}
        got_denied = {d: can(*d) for d in denied}
        assert all(got_allowed.values()), f"peerd's ServiceAccount lacks: {[a for a, ok in got_allowed.items() if not ok]}"
        assert not any(got_denied.values()), f"peerd's ServiceAccount may also: {[d for d, ok in got_denied.items() if ok]}"

        # The pod the DaemonSet controller would create (there is no controller here).
        tmpl = ds["spec"]["template"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "peerd-template-check", "namespace": NAMESPACE, "labels": tmpl["metadata"]["labels"]},
               "spec": dict(tmpl["spec"], nodeName="lab-node1")}
        res = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod), check=False)
        assert res.returncode == 0, f"a pod from the DaemonSet template is rejected:\n{res.stderr}"
        created = json.loads(res.stdout)
        assert created["spec"].get("priority", 0) >= 2000001000, f"priority {created['spec'].get('priority')}"
        assert created["metadata"]["labels"]["app"] == "peerd"
    finally:
        for text in applied:
            cluster.kubectl("delete", "--wait=false", "--ignore-not-found", "-f", "-", input=text, check=False)
        _reset_namespace(cluster, NAMESPACE)


def test_helm_install_against_api_server(env, helm):
    """`helm install` (the documented way) goes through against the real API server; without a
    kubelet the DaemonSet never gets pods, so no --wait here (ci/kind-e2e.sh waits)."""
    cluster = env.cluster
    _reset_namespace(cluster, NAMESPACE)
    cluster.namespaces.append(NAMESPACE)
    release_ns = cluster.namespace("peerd-helm")
    try:
        res = run([helm, "--kubeconfig", cluster.kubeconfig, "install", "peerd", CHART, "-n", release_ns,
                   "--set", f"peerd.image.ref={IMAGE}"], timeout=120, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        ds = cluster.get_json("daemonset", "peerd", "-n", NAMESPACE)
        assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
        res = run([helm, "--kubeconfig", cluster.kubeconfig, "uninstall", "peerd", "-n", release_ns],
                  timeout=120, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        subprocess.run([str(helm), "--kubeconfig", cluster.kubeconfig, "uninstall", "peerd", "-n", release_ns],
                       capture_output=True, timeout=120)
        _reset_namespace(cluster, NAMESPACE)
