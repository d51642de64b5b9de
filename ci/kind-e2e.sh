#!/usr/bin/env bash
# peerd end to end on a real cluster: kind (Kubernetes in Docker), the helm chart, the image.
# For machines with Docker; the lab tests (tests/k8s) cover the same ground without a kubelet.
#
#   ci/kind-e2e.sh
#
# Steps (each failure stops the run, prints diagnostics and deletes the cluster):
#   1. kind cluster of $NODES nodes (1 control-plane + workers) whose containerd reads registry
#      hosts from /etc/containerd/certs.d (config_path: kind's default since v0.21; with
#      CONTAINERD_PATCH=1 also set by a containerdConfigPatches entry, for older kind), checked
#      with `containerd config dump` on every node;
#   2. `docker build` of the repository's Dockerfile as $IMAGE, `kind load docker-image`;
#   3. `helm install --wait peerd ./k8s/peerd-helm --set peerd.image.ref=$IMAGE`;
#   4. every peerd pod reports P2PConnected (tests/k8s/events.py, the same check as the tests);
#   5. pull load: a Job per node runs $LOAD_IMAGE (pulled through containerd -> hosts.toml ->
#      peerd), first on one node, then on all the others at once, so that they can get the
#      layers from the first node's peerd;
#   6. a peerd pod reports P2PActive (content served from a peer), and every event sits on the
#      pod that reported it (events.py verify); peerd's byte counters per node are printed;
#   7. `helm uninstall --wait`: the preStop hook gives containerd its hosts.toml files back.
#
# Environment:
#   CLUSTER          kind cluster name                        (peerd-e2e)
#   NODES            nodes, >= 2                              (3)
#   KIND_NODE_IMAGE  kind node image                          (kind's default)
#   IMAGE            peerd image to build and load            (localhost/peerd:e2e)
#   LOAD_IMAGE       image the Jobs pull                      (docker.io/library/nginx:1.27)
#   LOAD_CMD         command of the Jobs' container (JSON)    (["sh","-c","exit 0"])
#   TIMEOUT          seconds for each wait                    (300)
#   ANNOUNCE_WAIT    seconds between the first pull and the others (5)
#   CONTAINERD_PATCH=1  patch config_path into containerd's config (kind < v0.21)
#   KEEP=1           keep the cluster at the end
# Needs: docker, kind, kubectl, helm, python3.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
CLUSTER=${CLUSTER:-peerd-e2e}
NODES=${NODES:-3}
IMAGE=${IMAGE:-localhost/peerd:e2e}
LOAD_IMAGE=${LOAD_IMAGE:-docker.io/library/nginx:1.27}
LOAD_CMD=${LOAD_CMD:-'["sh","-c","exit 0"]'}
TIMEOUT=${TIMEOUT:-300}
ANNOUNCE_WAIT=${ANNOUNCE_WAIT:-5}
KEEP=${KEEP:-0}
PEERD_NS=peerd-ns
CONTEXT=kind-$CLUSTER
EVENTS=(python3 "$repo/tests/k8s/events.py" --context "$CONTEXT" -n "$PEERD_NS")

log() { printf '[kind-e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}
kc() { kubectl --context "$CONTEXT" "$@"; }

for cmd in docker kind kubectl helm python3; do
    command -v "$cmd" >/dev/null || die "$cmd is not installed"
done
if ! [[ $NODES =~ ^[0-9]+$ ]] || ((NODES < 2)); then
    die "NODES must be a number >= 2 (peerd needs a peer to be ready)"
fi

CREATED=0
OK=0
diagnostics() {
    log "diagnostics"
    kc get nodes -o wide || true
    kc get pods -A -o wide || true
    kc -n "$PEERD_NS" describe daemonset peerd || true
    local p
    for p in $(kc -n "$PEERD_NS" get pods -l app=peerd -o name 2>/dev/null); do
        echo "---- $p"
        kc -n "$PEERD_NS" logs "$p" --all-containers --tail 60 || true
    done
    "${EVENTS[@]}" list --selector app=peerd || true
}
cleanup() {
    local rc=$?
    if ((rc != 0 && CREATED)); then diagnostics >&2 || true; fi
    if ((CREATED)) && [[ $KEEP != 1 ]]; then
        log "deleting cluster $CLUSTER"
        kind delete cluster --name "$CLUSTER" >&2 || true
    fi
    if ((OK)); then log "PASSED"; fi
    exit "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------- 1. cluster

kind_config() {
    echo "kind: Cluster"
    echo "apiVersion: kind.x-k8s.io/v1alpha4"
    if [[ ${CONTAINERD_PATCH:-0} == 1 ]]; then
        cat <<'EOF'
containerdConfigPatches:
  - |-
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "/etc/containerd/certs.d"
EOF
    fi
    echo "nodes:"
    echo "  - role: control-plane"
    local i
    for ((i = 1; i < NODES; i++)); do echo "  - role: worker"; done
}

# (grep without -q: it must read all its input, or the writer dies of SIGPIPE under pipefail)
if kind get clusters 2>/dev/null | grep -x "$CLUSTER" >/dev/null; then
    die "a kind cluster named $CLUSTER exists already (delete it, or set CLUSTER)"
fi
log "creating kind cluster $CLUSTER ($NODES nodes)"
node_image=()
[[ -n ${KIND_NODE_IMAGE:-} ]] && node_image=(--image "$KIND_NODE_IMAGE")
CREATED=1
kind_config | kind create cluster --name "$CLUSTER" "${node_image[@]}" --config - --wait "${TIMEOUT}s"
node_list=$(kind get nodes --name "$CLUSTER")
mapfile -t nodes < <(sort <<<"$node_list")
((${#nodes[@]} == NODES)) || die "kind made ${#nodes[@]} nodes, want $NODES"
for n in "${nodes[@]}"; do
    docker exec "$n" containerd config dump | grep -E "config_path *= *[\"']/etc/containerd/certs.d[\"']" >/dev/null ||
        die "containerd on $n does not read /etc/containerd/certs.d (config_path); with kind < v0.21 set CONTAINERD_PATCH=1"
done

# ---------------------------------------------------------------- 2. image

log "building $IMAGE from $repo/Dockerfile"
docker build -t "$IMAGE" -f "$repo/Dockerfile" "$repo"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# ---------------------------------------------------------------- 3. chart

log "helm install peerd ($IMAGE)"
helm --kube-context "$CONTEXT" install --wait --timeout "${TIMEOUT}s" peerd "$repo/k8s/peerd-helm" \
    --set peerd.image.ref="$IMAGE"
kc -n "$PEERD_NS" rollout status daemonset/peerd --timeout "${TIMEOUT}s"
ready=$(kc -n "$PEERD_NS" get daemonset peerd -o jsonpath='{.status.numberReady}')
((ready == NODES)) || die "$ready of $NODES peerd pods are ready"
for n in "${nodes[@]}"; do
    docker exec "$n" grep -rqs 'localhost:30000' /etc/containerd/certs.d ||
        die "the init container wrote no hosts.toml pointing at peerd on $n"
done

# ---------------------------------------------------------------- 4. joined

log "waiting for P2PConnected on every peerd pod"
"${EVENTS[@]}" wait --selector app=peerd --min-pods "$NODES" --reason P2PConnected --type Normal \
    --timeout "$TIMEOUT"

# ---------------------------------------------------------------- 5. pull load

pull_job() { # pull_job NAME NODE: a Job that runs $LOAD_IMAGE on NODE
    cat <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: $1
  namespace: default
  labels: {app: peerd-e2e-pull}
spec:
  backoffLimit: 0
  template:
    metadata:
      labels: {app: peerd-e2e-pull}
    spec:
      nodeName: $2
      restartPolicy: Never
      tolerations: [{operator: Exists}]
      containers:
        - name: pull
          image: $LOAD_IMAGE
          imagePullPolicy: Always
          command: $LOAD_CMD
EOF
}

wait_job() { # wait_job NAME: until the Job succeeded; dies with its logs if it failed
    local deadline=$((SECONDS + TIMEOUT)) state
    while ((SECONDS < deadline)); do
        state=$(kc get job "$1" -o jsonpath='{.status.succeeded}/{.status.failed}')
        [[ $state == 1/* ]] && return 0
        if [[ ${state#*/} =~ ^[1-9] ]]; then
            kc logs "job/$1" --tail 30 >&2 || true
            kc describe job "$1" >&2 || true
            die "job $1 failed"
        fi
        sleep 2
    done
    die "job $1 did not finish in ${TIMEOUT}s"
}

first=${nodes[0]}
log "pulling $LOAD_IMAGE on $first (from upstream)"
pull_job pull-0 "$first" | kc apply -f -
wait_job pull-0
# Let the first node's peerd announce the new content before the others ask for it.
sleep "$ANNOUNCE_WAIT"
log "pulling $LOAD_IMAGE on the other $((NODES - 1)) node(s) at once (from peers)"
for ((i = 1; i < NODES; i++)); do
    pull_job "pull-$i" "${nodes[$i]}" | kc apply -f -
done
for ((i = 1; i < NODES; i++)); do wait_job "pull-$i"; done

# ---------------------------------------------------------------- 6. served from peers

log "waiting for P2PActive"
"${EVENTS[@]}" wait --selector app=peerd --any --reason P2PActive --type Normal --timeout 120
"${EVENTS[@]}" verify --selector app=peerd
for n in "${nodes[@]}"; do
    # Best effort: kind's node image may lack curl.
    bytes=$(docker exec "$n" curl -fsS --max-time 5 http://127.0.0.1:5004/metrics/prometheus 2>/dev/null |
        awk '/^peerd_bytes_served_total/ { s[$1 ~ /source="peer"/ ? "peer" : $1 ~ /source="local"/ ? "local" : "upstream"] += $NF }
             END { printf "local=%d peer=%d upstream=%d", s["local"], s["peer"], s["upstream"] }') || bytes="(no curl)"
    log "$n: peerd bytes served: $bytes"
done
kc delete jobs -l app=peerd-e2e-pull --wait=false >/dev/null

# ---------------------------------------------------------------- 7. uninstall

log "helm uninstall: containerd gets its hosts.toml back"
helm --kube-context "$CONTEXT" uninstall --wait --timeout "${TIMEOUT}s" peerd
for n in "${nodes[@]}"; do
    if docker exec "$n" grep -rqs 'localhost:30000' /etc/containerd/certs.d; then
        die "hosts.toml on $n still points at peerd after uninstall"
    fi
done
OK=1
