"""`--bootstrap kubernetes`: five nodes find each other through the API server alone.

Every lab node runs peerd with `--bootstrap kubernetes` and nothing else to go on, as the chart's
ServiceAccount (a token, bound by the chart's own Role: the RBAC must be enough); the API server
lists the Pod objects labelled app=peerd (phase Running, podIP = the node's IP, not Ready). Then
the node that was first in the pod list and the node the others dialled most die (SIGKILL) and
their pods are deleted; the rest stay connected and keep sharing content.
"""

from __future__ import annotations

import events
from k8slib import (KUBECTL, NODES, metrics, node_ip, peers, pod_name, ready, served, wait_for)


def _inbound(i: int) -> float:
    """Connections other nodes dialled to node i (libp2p's own counter)."""
    return metrics(node_ip(i)).get("libp2p_swarm_connections_established_total", role="Listener")


def test_bootstrap_through_api_server(env):
    lab, cluster = env.lab, env.cluster
    ns = cluster.namespace("peerd-bootstrap")
    nodes = list(range(1, NODES + 1))
    cluster.install_chart_rbac(ns)
    kubeconfig = cluster.service_account_kubeconfig(ns)
    for i in nodes:
        cluster.create_peerd_pod(ns, i)
    for i in nodes:
        lab.start_peerd(i, "--bootstrap", "kubernetes", env=cluster.peerd_env(ns, i, kubeconfig))
    for i in nodes:
        wait_for(lambda: peers(node_ip(i)) >= 1, 60, f"node {i} to find a peer through the API server")
        wait_for(lambda: ready(node_ip(i)), 30, f"node {i} /readyz")
    kube = events.Kube(str(KUBECTL), cluster.kubeconfig)
    events.wait_for_event(kube, ns, "P2PConnected", "Normal", pods=[pod_name(i) for i in nodes], timeout=30)
    for i in nodes:
        log = lab.log(i)
        assert "needs POD_NAME" not in log
        assert "Forbidden" not in log and "forbidden" not in log, f"node {i} lacks a permission:\n{log[-3000:]}"

    # The pod the API server lists first, and the node the others dialled most.
    listed = cluster.get_json("pods", "-n", ns, "-l", "app=peerd")["items"]
    first = int(listed[0]["metadata"]["name"].removeprefix("peerd-node"))
    inbound = {i: _inbound(i) for i in nodes if i != first}
    hub = max(inbound, key=lambda i: (inbound[i], -i))
    doomed = {first, hub}
    survivors = [i for i in nodes if i not in doomed]
    seed, fresh = survivors[0], survivors[1]

    # Content that survives the loss: on a survivor before the kills.
    img = lab.push_random("bootstrap", 2, 4)
    keys = metrics(node_ip(seed)).get("peerd_advertised_keys")
    lab.pull_from_registry(seed, img)  # the seed alone holds it, in no pull-through cache
    lab.wait_advertised(seed, keys + len(img.blobs) + 1)

    for i in sorted(doomed):
        lab.stop_peerd(i, "KILL")
        cluster.delete_pod(ns, i)
    for i in survivors:
        wait_for(lambda: peers(node_ip(i)) >= 1 and ready(node_ip(i)), 30,
                 f"node {i} to stay connected after nodes {sorted(doomed)} died")
    # Deleted pods are terminating (no kubelet confirms): peerd must not count on them.
    for i in doomed:
        pod = cluster.get_json("pod", "-n", ns, pod_name(i))
        assert pod["metadata"].get("deletionTimestamp"), pod["metadata"]

    before = served(node_ip(fresh), "peer")
    lab.pull(fresh, img)
    lab.check(fresh, img)
    got = served(node_ip(fresh), "peer") - before
    assert got >= img.layer_bytes, f"node {fresh} served {got} bytes from peers, want >= {img.layer_bytes}"
    counts = {d: lab.registry_log_count(d) for d in img.layers}
    assert all(n == 1 for n in counts.values()), f"registry GETs per layer (want 1 each): {counts}"

    # A node comes back as a new pod (same name, new uid, as a DaemonSet recreates it): it finds
    # the survivors through the API server, and its events go to the new pod.
    back = first
    cluster.kubectl("delete", "pod", pod_name(back), "-n", ns, "--grace-period=0", "--force")
    cluster.create_peerd_pod(ns, back)
    lab.start_peerd(back, "--bootstrap", "kubernetes", env=cluster.peerd_env(ns, back, kubeconfig))
    wait_for(lambda: peers(node_ip(back)) >= 1 and ready(node_ip(back)), 60, f"node {back} to rejoin")
    events.wait_for_event(kube, ns, "P2PConnected", "Normal", pods=[pod_name(back)], timeout=30)
    for i in survivors:
        assert lab.peerd_pid(i) is not None, f"peerd on node {i} died:\n{lab.log(i)[-3000:]}"
