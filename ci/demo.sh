#!/usr/bin/env bash
# peerd's main job, on one machine: a three-node cluster of network namespaces, each with its
# own real containerd and peerd, and a real registry behind a 100 Mbit/s link. Every pull goes
# through peerd: a layer nobody has leaves the registry once, fetched by its home node, and every
# other node gets it from its peers -- pulled node by node, or by all nodes at the same moment.
#
#   ci/demo.sh                 random 4-layer images (DEMO_MIB, default 256) and a Debian image
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
wait_advertised() { # node
    for _ in $(seq 1 100); do
        [[ $(metric "$1" '^peerd_advertised_keys$') -gt 0 ]] && return 0
        sleep 0.05
    done
    echo "node $1 did not announce its content" >&2
    return 1
}

served() { # node, peer|upstream → MiB this node got from its peers / fetched from the registry so far
    case $2 in
    peer) echo "$(metric "$1" '^peerd_bytes_served_total\{.*source="peer"') / 1048576" | bc -l ;;
    upstream) echo "$(metric "$1" '^peerd_bytes_fetched_total\{from="upstream"') / 1048576" | bc -l ;;
    esac
}

report() { # "before" file, seconds per node...
    local before=$1
    shift
    printf '\n%-6s %10s %16s %20s\n' node pull-s via-peers-MiB from-registry-MiB
    local i=0
    for secs in "$@"; do
        i=$((i + 1))
        read -r p0 u0 < <(sed -n "${i}p" "$before")
        printf '%-6s %10.2f %16.1f %20.1f\n' "$i" "$secs" \
            "$(echo "$(served "$i" peer) - $p0" | bc -l)" "$(echo "$(served "$i" upstream) - $u0" | bc -l)"
    done
}

snapshot() { # → file with "peer upstream" MiB per node
    for i in $(seq 1 "$nodes"); do echo "$(served "$i" peer) $(served "$i" upstream)"; done >"$1"
}

gets_per_layer() { # push-output-file
    echo "registry GETs per layer (each should be 1):"
    awk '/^layer/ { print $2 }' "$1" | while read -r d; do
        printf '  %s  %s\n' "${d:0:19}" "$(lab registry-log-count "$d")"
    done
}

one_by_one() { # image-ref, push-output-file
    local image=$1 pushed=$2 secs=()
    snapshot "$work/before"
    for i in $(seq 1 "$nodes"); do
        secs+=("$(lab pull "$i" "$image" | awk '/^pull-seconds/ { print $2 }')")
        lab check "$i" "$image" >/dev/null
        [[ $i == 1 ]] && wait_advertised 1
    done
    report "$work/before" "${secs[@]}"
    gets_per_layer "$pushed"
}

all_at_once() { # image-ref, push-output-file
    local image=$1 pushed=$2 secs=()
    snapshot "$work/before"
    for i in $(seq 1 "$nodes"); do
        lab pull "$i" "$image" >"$work/pull$i" &
    done
    wait
    for i in $(seq 1 "$nodes"); do
        lab check "$i" "$image" >/dev/null
        secs+=("$(awk '/^pull-seconds/ { print $2 }' "$work/pull$i")")
    done
    report "$work/before" "${secs[@]}"
    gets_per_layer "$pushed"
}

work=$(mktemp -d)
trap 'lab down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
echo "== a random image (4 layers, $mib MiB), pulled node by node"
lab push-random demo/random:v1 4 "$mib" >"$work/random.txt" 2>/dev/null
one_by_one 198.18.0.2:5000/demo/random:v1 "$work/random.txt"
echo
echo "== another random image, pulled by all $nodes nodes at the same moment"
SEED=$((RANDOM + 7)) lab push-random demo/random:v2 4 "$mib" >"$work/random2.txt" 2>/dev/null
all_at_once 198.18.0.2:5000/demo/random:v2 "$work/random2.txt"
if [[ ${DEMO_DEBIAN:-1} != 0 ]]; then
    echo
    echo "== a Debian image made with debootstrap (cached after the first run), node by node"
    lab push-debian demo/debian:bookworm >"$work/debian.txt" 2>/dev/null
    one_by_one 198.18.0.2:5000/demo/debian:bookworm "$work/debian.txt"
fi
echo
echo "Each layer left the registry once (from-registry: fetched by the node that is the layer's"
echo "home in the DHT, for the whole cluster); every node got the rest from its peers (via-peers)."
