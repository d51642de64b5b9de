"""The API server is never on a pull's path.

The kube-apiserver is frozen (SIGSTOP: connections are accepted by the kernel and then nothing
answers, the worst case for a client) while peerd runs in Kubernetes mode with events queued and
`--bootstrap kubernetes` watching: pulls through peers, /readyz and a peerd starting meanwhile must
not wait for it. Once it answers again, the peerd that started during the freeze finds its peers
through it and reports on its pod.
"""

from __future__ import annotations

import os
import signal

import events
from k8slib import (CP_STATE, KUBECTL, metrics, node_ip, peers, pod_name, ready, served, wait_for)



def _apiserver_pid() -> int:
    pid = int((CP_STATE / "run" / "kube-apiserver.pid").read_text().strip())
    exe = os.readlink(f"/proc/{pid}/exe")
    assert exe.removesuffix(" (deleted)").endswith("/kube-apiserver"), exe
    return pid


def test_frozen_api_server_is_not_on_the_pull_path(env):
    lab, cluster = env.lab, env.cluster
    ns = cluster.namespace("peerd-outage")
    for i in (1, 2, 3):
        cluster.create_peerd_pod(ns, i)
    for i in (1, 2):
        lab.start_peerd(i, "--bootstrap", "kubernetes", env=cluster.peerd_env(ns, i))
    for i in (1, 2):
        wait_for(lambda: peers(node_ip(i)) >= 1 and ready(node_ip(i)), 60, f"node {i} to join")
    kube = events.Kube(str(KUBECTL), cluster.kubeconfig)
    events.wait_for_event(kube, ns, "P2PConnected", "Normal", pods=[pod_name(1), pod_name(2)], timeout=30)
    img = lab.push_random("outage", 2, 4)

    pid = _apiserver_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        # Node 3 starts while nobody answers: it comes up (lab.sh waits for /healthz), alone.
        lab.start_peerd(3, "--bootstrap", "kubernetes", env=cluster.peerd_env(ns, 3))
        keys = metrics(node_ip(1)).get("peerd_advertised_keys")
        lab.pull_from_registry(1, img, timeout=60)  # node 1 alone holds it, in no pull-through cache
        lab.wait_advertised(1, keys + len(img.blobs) + 1)
        before = served(node_ip(2), "peer")
        lab.pull(2, img, timeout=60)  # node 2 queues a P2PActive event that cannot be sent
        lab.check(2, img)
        got = served(node_ip(2), "peer") - before
        assert got >= img.layer_bytes, f"node 2 served {got} bytes from peers during the freeze, want >= {img.layer_bytes}"
        for i in (1, 2):
            assert ready(node_ip(i)), f"node {i} not ready while the API server is frozen"
    finally:
        os.kill(pid, signal.SIGCONT)

    # Back: node 3 finds its peers through the API server and says so on its pod.
    wait_for(lambda: peers(node_ip(3)) >= 1 and ready(node_ip(3)), 60, "node 3 to find peers once the API server answers")
    events.wait_for_event(kube, ns, "P2PConnected", "Normal", pods=[pod_name(3)], timeout=60)
    for i in (1, 2, 3):
        assert lab.peerd_pid(i) is not None, f"peerd on node {i} died:\n{lab.log(i)[-3000:]}"
