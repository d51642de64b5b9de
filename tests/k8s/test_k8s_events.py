"""Pod events: what `kubectl describe pod` shows an operator about each node's peerd.

Lab nodes 1-3 run peerd as pods peerd-node1..3 (env POD_NAME / POD_NAMESPACE / KUBECONFIG, the
lab's static bootstrap); pod peerd-node4 exists and runs no peerd, so nothing may land on it.
Each event must be on the pod whose peerd saw the thing happen, and nowhere else.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import pytest

import events
from k8slib import (EVENTS_PY, KUBECTL, REGISTRY, http_get, metrics, node_ip, peers, pod_name, served,
                    wait_for)

PEERD_NODES = (1, 2, 3)
BYSTANDER = 4


def _wait(kube, ns, reason, type_, nodes, timeout=60):
    return events.wait_for_event(kube, ns, reason, type_, pods=[pod_name(i) for i in nodes], timeout=timeout,
                                 interval=0.5)


def _on(kube, ns, uids, i, reason):
    return events.matching(events.list_events(kube, ns), pod_name(i), reason, uid=uids[i])


def _cli(cluster, ns, *args):
    res = subprocess.run([sys.executable, str(EVENTS_PY), "-n", ns, "--kubeconfig", cluster.kubeconfig,
                          "--kubectl", str(KUBECTL), *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"events.py {' '.join(args)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def test_pod_events(env):
    lab, cluster = env.lab, env.cluster
    ns = cluster.namespace("peerd-events")
    uids = {i: cluster.create_peerd_pod(ns, i) for i in (*PEERD_NODES, BYSTANDER)}
    kube = events.Kube(str(KUBECTL), cluster.kubeconfig)
    for i in PEERD_NODES:
        lab.start_peerd(i, env=cluster.peerd_env(ns, i))

    # Start-up: every pod says it is initializing, then that it joined the network.
    _wait(kube, ns, "P2PInitializing", "Normal", PEERD_NODES)
    _wait(kube, ns, "P2PConnected", "Normal", PEERD_NODES)
    # The same checks through the CLI that ci/kind-e2e.sh uses.
    cli = _cli(cluster, ns, "wait", *[a for i in PEERD_NODES for a in ("--pod", pod_name(i))],
               "--reason", "P2PConnected", "--type", "Normal", "--timeout", "30")
    assert sorted(line.split()[1] for line in cli.stdout.splitlines()) == [pod_name(i) for i in PEERD_NODES], cli.stdout
    for i in PEERD_NODES:
        evs = _on(kube, ns, uids, i, "P2PConnected")
        reg = evs[-1]["regarding"]
        assert reg["uid"] == uids[i] and reg["namespace"] == ns and reg["apiVersion"] == "v1", reg
        assert evs[-1]["reportingInstance"] == pod_name(i)

    # Content from a peer: node 2 pulls what node 1 has.
    img = lab.push_random("events-active", 2, 2)
    keys = metrics(node_ip(1)).get("peerd_advertised_keys")
    lab.pull_from_registry(1, img)  # node 1 alone holds it, in no pull-through cache
    lab.wait_advertised(1, keys + len(img.blobs) + 1)
    before = served(node_ip(2), "peer")
    lab.pull(2, img)
    assert served(node_ip(2), "peer") - before >= img.layer_bytes, "node 2's pull did not come from node 1"
    _wait(kube, ns, "P2PActive", "Normal", [2], timeout=30)
    # Every layer came from a peer, yet one event says so: rate-limited (30 s).
    active = _on(kube, ns, uids, 2, "P2PActive")
    assert sum(events.event_count(e) for e in active) == 1, [events.summary(e) for e in active]

    # A failed request: node 1 announced a layer, then its copy went bad (same length); node 2,
    # asked for it, gets bad bytes from node 1, must not complete the response, and says so.
    bad = lab.push_random("events-failed", 1, 1)
    keys = metrics(node_ip(1)).get("peerd_advertised_keys")
    lab.pull_from_registry(1, bad)
    lab.wait_advertised(1, keys + len(bad.blobs) + 1)
    layer = bad.layers[0]
    path = lab.content_file(1, layer)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for k in range(0, len(data), 4096):
            data[k] ^= 0xFF
        f.seek(0)
        f.write(data)
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() != layer
    url = f"/v2/{bad.repo}/blobs/{layer}?ns={REGISTRY}"

    def attempt():
        r = http_get(node_ip(2), 5000, url, timeout=30)
        if r.status == 404:  # the DHT lookup did not answer in time: not a failure, ask again
            return None
        if r.complete and r.status == 200 and "sha256:" + hashlib.sha256(r.body).hexdigest() == layer:
            return None  # the same, with pull-through: the exact bytes came from the registry, not node 1
        return r

    r = wait_for(attempt, 30, f"node 2 to fetch {layer} from node 1", interval=0.5)
    if r.complete and r.status == 200:
        got = "sha256:" + hashlib.sha256(r.body).hexdigest()
        assert got == layer, f"node 2 completed a 200 with bytes that hash to {got}, not {layer}"
    assert r.status >= 500 or not r.complete, f"HTTP {r.status}, complete={r.complete}: node 2 hid the failure"
    assert metrics(node_ip(2)).get("peerd_digest_mismatch_total", **{"from": "peer"}) >= 1
    _wait(kube, ns, "P2PFailed", "Warning", [2], timeout=30)

    # Node 2 loses every peer.
    lab.stop_peerd(1)
    lab.stop_peerd(3)
    _wait(kube, ns, "P2PDisconnected", "Warning", [2], timeout=30)

    # Nothing of this on pods that did not see it, and every event on the pod that reported it.
    all_events = events.list_events(kube, ns)
    for e in all_events:
        print(events.summary(e))
    pods = events.list_pods(kube, ns)
    assert not events.misattributed(all_events, pods), [events.summary(e) for e in events.misattributed(all_events, pods)]
    on_bystander = [events.summary(e) for e in all_events if (e.get("regarding") or {}).get("name") == pod_name(BYSTANDER)]
    assert not on_bystander, f"events on a pod that runs no peerd: {on_bystander}"
    for reason in ("P2PActive", "P2PFailed", "P2PDisconnected"):
        assert not _on(kube, ns, uids, 3, reason), f"{reason} on {pod_name(3)}, which saw no such thing"
    assert "verify-ok" in _cli(cluster, ns, "verify", "--selector", "app=peerd").stdout
    for i in PEERD_NODES:
        for reason, type_ in (("P2PInitializing", "Normal"), ("P2PConnected", "Normal")):
            evs = _on(kube, ns, uids, i, reason)
            assert evs and all(e["type"] == type_ for e in evs), [events.summary(e) for e in evs]
        first_init = min(events.event_time(e) for e in _on(kube, ns, uids, i, "P2PInitializing"))
        first_conn = min(events.event_time(e) for e in _on(kube, ns, uids, i, "P2PConnected"))
        assert first_init <= first_conn, f"{pod_name(i)}: P2PConnected ({first_conn}) before P2PInitializing ({first_init})"


def test_failed_start_is_reported(env):
    """A peerd that cannot start (its HTTP port is taken: with host networking, another process on
    the node may hold it) says so on its pod with P2PFailed before it exits."""
    lab, cluster = env.lab, env.cluster
    ns = cluster.namespace("peerd-startfail")
    i = BYSTANDER
    cluster.create_peerd_pod(ns, i)
    blocker = subprocess.Popen(
        ["ip", "netns", "exec", f"pd-node{i}", sys.executable, "-c",
         "import socket, time\n"
         "s = socket.socket()\n"
         "s.bind(('0.0.0.0', 5000))\n"
         "s.listen()\n"
         "print('listening', flush=True)\n"
         "time.sleep(300)\n"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    peerd = None
    try:
        assert blocker.stdout.readline().strip() == "listening"
        data = env.tmp / f"startfail-{ns}"
        data.mkdir()
        log = open(data / "peerd.log", "w")
        peerd = subprocess.Popen(
            ["ip", "netns", "exec", f"pd-node{i}", str(env.peerd_bin), "run",
             "--http-addr", "0.0.0.0:5000", "--router-addr", "0.0.0.0:5003", "--prom-addr", "0.0.0.0:5004",
             "--containerd-socket", f"/run/peerd-lab/node{i}/containerd.sock",
             "--content-dir", str(lab.content_dir(i)), "--hosts", f"http://{REGISTRY}",
             "--data-dir", str(data), "--bootstrap", f"static:{node_ip(1)}:5003"],
            stdout=log, stderr=subprocess.STDOUT, env=lab.env(cluster.peerd_env(ns, i)), start_new_session=True)
        try:
            rc = peerd.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        text = (data / "peerd.log").read_text(errors="replace")
        assert rc not in (None, 0), f"peerd kept running (or exited 0) without its HTTP port:\n{text[-3000:]}"
        kube = events.Kube(str(KUBECTL), cluster.kubeconfig)
        try:
            _wait(kube, ns, "P2PFailed", "Warning", [i], timeout=20)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n---- peerd output (exit {rc})\n{text[-3000:]}") from None
    finally:
        for p in (peerd, blocker):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)



def test_rejoin_after_transient_loss_is_reported(env):
    """A short loss of every peer: the pod's events end with the node connected again, not with
    the loss (rate limiting may merge or delay transitions, but must not leave the wrong state)."""
    lab, cluster = env.lab, env.cluster
    ns = cluster.namespace("peerd-rejoin")
    uids = {i: cluster.create_peerd_pod(ns, i) for i in (1, 2)}
    kube = events.Kube(str(KUBECTL), cluster.kubeconfig)
    for i in (1, 2):
        lab.start_peerd(i, env=cluster.peerd_env(ns, i))
    _wait(kube, ns, "P2PConnected", "Normal", [2])
    lab.stop_peerd(1)
    _wait(kube, ns, "P2PDisconnected", "Warning", [2], timeout=30)
    lab.start_peerd(1, env=cluster.peerd_env(ns, 1))
    wait_for(lambda: peers(node_ip(2)) >= 1, 30, "node 2 to have its peer back")

    def latest_transition():
        evs = _on(kube, ns, uids, 2, "P2PConnected") + _on(kube, ns, uids, 2, "P2PDisconnected")
        return max(evs, key=events.event_time)["reason"] == "P2PConnected"

    wait_for(latest_transition, 30, f"{pod_name(2)}'s latest connection event to be P2PConnected again",
             interval=0.5)
