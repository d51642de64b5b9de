"""The container image (ci/build-image.sh) run the way the DaemonSet runs it.

The image goes into lab node 1's containerd (`ctr images import`) and runs there under runc with
the DaemonSet's own container spec, taken from the rendered chart: its command line (only the HTTP
port and the upstream registry changed for the lab), its hostPath mounts (containerd's socket, the
content store read-only, the data dir, certs.d), host networking, a read-only root filesystem, the
default seccomp profile, and the pod's in-cluster API access: a token of the chart's `peerd`
ServiceAccount bound by the chart's Role. Node 2 (plain peerd) must find node 1's content on the
containerised peerd and pull it from there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

import events
from k8slib import (KUBECTL, REGISTRY, REPO_ROOT, flag_values, metrics, node_ip, one,
                    peers, pod_name, ready, render_chart, run, served, wait_for)

BUILD_IMAGE = REPO_ROOT / "ci" / "build-image.sh"
NODE = 1
OTHER = 2
SOCK = f"/run/peerd-lab/node{NODE}/containerd.sock"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def ctr(*args, timeout=120, check=True):
    return run(["ip", "netns", "exec", f"pd-node{NODE}", "ctr", "--address", SOCK, "-n", "k8s.io", *args],
               timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image(k8s_peerd_bin, tmp_path_factory):
    """ci/build-image.sh on a copy of the peerd binary: `cargo` is stubbed (the binary is already
    built, and a rebuild in the shared target dir would take minutes), the rest of the script is
    what runs. PEERD_K8S_IMAGE_CARGO=1 lets it build for real."""
    tmp = tmp_path_factory.mktemp("image")
    e = dict(os.environ)
    if os.environ.get("PEERD_K8S_IMAGE_CARGO") != "1":
        target = tmp / "target"
        (target / "release").mkdir(parents=True)
        shutil.copy2(k8s_peerd_bin, target / "release" / "peerd")
        shim = tmp / "shim"
        shim.mkdir()
        (shim / "cargo").write_text("#!/bin/sh\nexit 0\n")
        (shim / "cargo").chmod(0o755)
        e["PATH"] = f"{shim}:{e['PATH']}"
        e["CARGO_TARGET_DIR"] = str(target)
    res = run(["bash", BUILD_IMAGE, tmp / "out"], env=e, timeout=1800)
    got = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert Path(got["archive"]).is_file() and got["ref"], res.stdout
    got["binary"] = str(Path(e.get("CARGO_TARGET_DIR", "/root/.cache/peerd/target")) / "release" / "peerd")
    return got


def _interpreter(binary: str) -> str | None:
    """The ELF program interpreter (PT_INTERP) of a dynamically linked binary."""
    with open(binary, "rb") as f:
        head = f.read(64)
        assert head[:4] == b"\x7fELF" and head[4] == 2, "not a 64-bit ELF"
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        for k in range(phnum):
            f.seek(phoff + k * phentsize)
            ptype, = struct.unpack("<I", f.read(4))
            if ptype == 3:  # PT_INTERP
                f.seek(phoff + k * phentsize + 8)
                offset, = struct.unpack("<Q", f.read(8))
                f.seek(phoff + k * phentsize + 32)
                size, = struct.unpack("<Q", f.read(8))
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    return None


def test_image_has_the_binary_and_what_it_loads(image):
    layout = Path(image["layout"])
    index = json.loads((layout / "index.json").read_text())
    names = [m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in index["manifests"]]
    assert image["ref"] in names, names
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    config = json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    cmd = (config["config"].get("Entrypoint") or []) + (config["config"].get("Cmd") or [])
    assert cmd == ["/peerd", "run"], config["config"]
    files = set()
    for layer in manifest["layers"]:
        with tarfile.open(layout / "blobs" / "sha256" / layer["digest"].split(":")[1]) as t:
            files |= {"/" + n.lstrip("./") for n in t.getnames()}
    libs = re.findall(r"=> (/\S+)", run(["ldd", image["binary"]], timeout=30).stdout)
    interp = _interpreter(image["binary"])
    want = {"/peerd", *libs} | ({interp} if interp else set())
    assert want <= files, f"missing from the image: {sorted(want - files)}"


def _cgroups_for_runc():
    """ci/lab.sh starts each node's containerd under `ip netns exec`, which gives it a mount
    namespace with a fresh /sys and no cgroup mounts, so runc cannot create a container there
    ("no cgroup mount found in mountinfo"). Mount the host's cgroup hierarchies (same options, so
    the same hierarchies) in that mount namespace; it goes away with the lab."""
    pid = int(Path(f"/run/peerd-lab/node{NODE}/containerd.pid").read_text().strip())
    lines = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        dev, mp, fstype, opts = line.split()[:4]
        if fstype in ("cgroup", "cgroup2") and (mp == "/sys/fs/cgroup" or mp.startswith("/sys/fs/cgroup/")):
            lines.append((mp, fstype, opts))
    assert lines, "the host has no cgroup mounts under /sys/fs/cgroup"
    script = ["set -e", "if grep -q ' /sys/fs/cgroup[ /].* cgroup' /proc/self/mounts; then exit 0; fi"]
    if not any(mp == "/sys/fs/cgroup" for mp, _, _ in lines):
        script.append("mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup")
    for mp, fstype, opts in sorted(lines):
        script += [f"mkdir -p {mp}", f"mount -t {fstype} -o {opts} {fstype} {mp}"]
    run(["nsenter", "-t", pid, "-m", "--", "sh", "-c", "\n".join(script)], timeout=30)


def _sa_token_dir(cluster, ns: str, dest: Path) -> Path:
    """What the kubelet projects into a pod: a token of its ServiceAccount, the CA, the namespace."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "token").write_text(cluster.service_account_token(ns))
    (dest / "ca.crt").write_bytes(cluster.ca_pem())
    (dest / "namespace").write_text(ns)
    return dest


def test_image_serves_peers_as_the_daemonset_runs_it(env, image):
    lab, cluster = env.lab, env.cluster
    ns = cluster.namespace("peerd-image")
    # The chart's RBAC (ServiceAccount, Role, RoleBinding) in this namespace.
    cluster.install_chart_rbac(ns)
    objs = render_chart("--set", f"peerd.namespace.k8s={ns}", "--set", f"peerd.image.ref={image['ref']}")
    cluster.create_peerd_pod(ns, NODE)
    cluster.create_peerd_pod(ns, OTHER)

    snapshotter = lab.snapshotter()
    ctr("images", "import", "--snapshotter", snapshotter, image["archive"], timeout=300)
    listed = ctr("images", "ls", "-q").stdout.split()
    assert image["ref"] in listed, f"{image['ref']} not among the imported images: {listed}"

    ds = one(objs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    (main,) = spec["containers"]
    assert main["image"] == image["ref"]
    argv = main["command"] + main["args"]
    flags = flag_values(argv[2:])
    # Only what the lab differs in: its hosts.toml points at port 5000, its registry is local.
    argv = [a.replace(f"--http-addr={flags['http-addr']}", "--http-addr=0.0.0.0:5000")
             .replace(f"--hosts={flags['hosts']}", f"--hosts=http://{REGISTRY}") for a in argv]
    assert flag_values(argv[2:])["bootstrap"] == "kubernetes"

    work = env.tmp / f"container-{uuid.uuid4().hex[:6]}"
    host_paths = {
        "/run/containerd/containerd.sock": SOCK,
        "/var/lib/containerd/io.containerd.content.v1.content": str(lab.content_dir(NODE)),
        "/var/lib/peerd": str(work / "data"),
        "/etc/containerd/certs.d": str(work / "certs.d"),
    }
    (work / "data").mkdir(parents=True)
    (work / "certs.d").mkdir()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = []
    for m in main["volumeMounts"]:
        host = volumes[m["name"]]["hostPath"]["path"]
        assert host in host_paths, f"the lab has no stand-in for hostPath {host}"
        mode = "ro" if m.get("readOnly") else "rw"
        mounts += ["--mount", f"type=bind,src={host_paths[host]},dst={m['mountPath']},options=rbind:{mode}"]
    sa = _sa_token_dir(cluster, ns, work / "serviceaccount")
    mounts += ["--mount", f"type=bind,src={sa},dst={SA_DIR},options=rbind:ro"]
    server = re.match(r"https://([^:/]+):(\d+)", cluster.server)
    env_flags = []
    for k, v in {"POD_NAME": pod_name(NODE), "POD_NAMESPACE": ns, "NODE_NAME": f"lab-node{NODE}",
                 "KUBERNETES_SERVICE_HOST": server.group(1), "KUBERNETES_SERVICE_PORT": server.group(2)}.items():
        env_flags += ["--env", f"{k}={v}"]
    sec = main.get("securityContext", {})
    opts = ["--net-host"]
    if sec.get("readOnlyRootFilesystem"):
        opts.append("--read-only")
    if spec.get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault":
        opts.append("--seccomp")
    if sec.get("allowPrivilegeEscalation") is not False:
        opts.append("--allow-new-privs")

    _cgroups_for_runc()
    cid = f"peerd-k8s-test-{uuid.uuid4().hex[:6]}"
    log = work / "container.log"
    try:
        ctr("run", "-d", *opts, "--snapshotter", snapshotter, "--log-uri", f"file://{log}", *mounts, *env_flags,
            image["ref"], cid, *argv, timeout=120)

        def container_log():
            return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"

        def serving():
            if not re.search(rf"^{cid}\s+\d+\s+RUNNING", ctr("tasks", "ls").stdout, re.M):
                raise RuntimeError(f"the container is not running\n---- container log\n{container_log()}")
            return metrics(node_ip(NODE))

        try:
            wait_for(serving, 30, "the containerised peerd's metrics port")
        except AssertionError as e:
            raise AssertionError(f"{e}\n---- container log\n{container_log()}") from None
        lab.start_peerd(OTHER, env=cluster.peerd_env(ns, OTHER))
        for i in (NODE, OTHER):
            wait_for(lambda: peers(node_ip(i)) >= 1 and ready(node_ip(i)), 60, f"node {i} to have a peer and be ready")

        img = lab.push_random("image", 2, 4)
        keys = metrics(node_ip(NODE)).get("peerd_advertised_keys")
        lab.pull_from_registry(NODE, img)  # the containerised peerd's node alone holds it
        lab.wait_advertised(NODE, keys + len(img.blobs) + 1)
        before = served(node_ip(OTHER), "peer")
        local_before = served(node_ip(NODE), "local")
        lab.pull(OTHER, img)
        lab.check(OTHER, img)
        got = served(node_ip(OTHER), "peer") - before
        assert got >= img.layer_bytes, f"node {OTHER} served {got} bytes from peers, want >= {img.layer_bytes}"
        sent = served(node_ip(NODE), "local") - local_before
        assert sent >= img.layer_bytes, f"the containerised peerd served {sent} bytes of its content, want >= {img.layer_bytes}"
        counts = {d: lab.registry_log_count(d) for d in img.layers}
        assert all(n == 1 for n in counts.values()), f"registry GETs per layer (want 1 each): {counts}"

        # Through its ServiceAccount token and the chart's Role, the container reports on its pod.
        kube = events.Kube(str(KUBECTL), cluster.kubeconfig)
        try:
            events.wait_for_event(kube, ns, "P2PConnected", "Normal", pods=[pod_name(NODE)], timeout=30)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n---- container log\n{container_log()}") from None
        status = ctr("tasks", "ls").stdout
        assert re.search(rf"^{cid}\s+\d+\s+RUNNING", status, re.M), status
    finally:
        ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        for _ in range(50):
            if ctr("tasks", "rm", "-f", cid, check=False).returncode == 0 or \
                    cid not in ctr("tasks", "ls", check=False).stdout:
                break
            subprocess.run(["sleep", "0.2"])
        ctr("containers", "rm", cid, check=False)
        ctr("images", "rm", image["ref"], check=False)
        leftover = ctr("containers", "ls", "-q", check=False).stdout.split()
        assert cid not in leftover, f"container {cid} left behind"
