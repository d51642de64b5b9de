#!/usr/bin/env bash
# peerd's main job, on one machine: a three-node cluster of network namespaces, each with its
# own real containerd and peerd, and a real registry behind a 100 Mbit/s link. One node pulls
# from the registry; the others pull through peerd and get the layers from their peers.
#
#   ci/demo.sh                 random 4-layer image (DEMO_MIB, default 256) and a Debian image
#   DEMO_NODES=5 ci/demo.sh    more nodes
#   DEMO_DEBIAN=0 ci/demo.sh   skip the Debian image (its first build takes about a minute)
#
# Needs root (namespaces, containerd). Installs what it needs; tears the lab down on exit.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
nodes=${DEMO_NODES:-3}
mib=${DEMO_MIB:-256}
rate=${DEMO_RATE:-100mbit}
lab() { bash "$here/lab.sh" "$@"; }

bash "$here/install-deps.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/peerd/target}
echo "== building peerd"
(cd "$repo" && cargo build --release --quiet)

exec 9>/var/lock/peerd-lab-session.lock
flock 9
trap 'lab down >/dev/null 2>&1 || true' EXIT
lab down >/dev/null 2>&1 || true
echo "== starting $nodes nodes and a registry capped at $rate"
lab up "$nodes" --registry-rate "$rate" >/dev/null
for i in $(seq 1 "$nodes"); do lab start-peerd "$i" >/dev/null; done

metric() { # node, metric selector regex → summed value
    curl -s "http://198.18.0.$((10 + $1)):5004/metrics/prometheus" |
        awk -v re="$2" '$0 !~ /^#/ && $1 ~ re { s += $2 } END { printf "%d", s }'
}
upstream_bytes() { # node → bytes the registry sent to that node's address
    awk -v ip="198.18.0.$((10 + $1))" '$1 == ip && $6 ~ /GET/ && ($9 == 200 || $9 == 206) { s += $10 } END { printf "%d", s }' \
        /var/lib/peerd-lab/registry/access.log
}
wait_advertised() { # node
    for _ in $(seq 1 100); do
        [[ $(metric "$1" '^peerd_advertised_keys$') -gt 0 ]] && return 0
        sleep 0.05
    done
    echo "node $1 did not announce its content" >&2
    return 1
}

demo_image() { # image-ref, push-output-file
    local image=$1 pushed=$2
    printf '\n%-6s %10s %16s %16s\n' node pull-s from-peers-MiB from-registry-MiB
    for i in $(seq 1 "$nodes"); do
        local before_peer before_up secs
        before_peer=$(metric "$i" '^peerd_bytes_served_total\{.*source="peer"')
        before_up=$(upstream_bytes "$i")
        secs=$(lab pull "$i" "$image" | awk '/^pull-seconds/ { print $2 }')
        lab check "$i" "$image" >/dev/null
        printf '%-6s %10.2f %16.1f %16.1f\n' "$i" "$secs" \
            "$(echo "($(metric "$i" '^peerd_bytes_served_total\{.*source="peer"') - $before_peer) / 1048576" | bc -l)" \
            "$(echo "($(upstream_bytes "$i") - $before_up) / 1048576" | bc -l)"
        [[ $i == 1 ]] && wait_advertised 1
    done
    echo "registry GETs per layer (each should be 1):"
    awk '/^layer/ { print $2 }' "$pushed" | while read -r d; do
        printf '  %s  %s\n' "${d:0:19}" "$(lab registry-log-count "$d")"
    done
}

work=$(mktemp -d)
trap 'lab down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
echo "== pushing a random image: 4 layers, $mib MiB"
lab push-random demo/random:v1 4 "$mib" >"$work/random.txt" 2>/dev/null
demo_image 198.18.0.2:5000/demo/random:v1 "$work/random.txt"
if [[ ${DEMO_DEBIAN:-1} != 0 ]]; then
    echo
    echo "== pushing a Debian image made with debootstrap (cached after the first run)"
    lab push-debian demo/debian:bookworm >"$work/debian.txt" 2>/dev/null
    demo_image 198.18.0.2:5000/demo/debian:bookworm "$work/debian.txt"
fi
echo
echo "Node 1 pulled from the registry; every other node got the layers from its peers."
