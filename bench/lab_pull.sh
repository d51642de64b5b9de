#!/usr/bin/env bash
# Pull times through peerd in the lab (ci/lab.sh): 3 nodes, registry egress capped.
#
#   bench/lab_pull.sh                 # ROUNDS=3 RATE=100mbit IMAGE_MIB=256 LAYERS=4
#
# Per round, with a fresh random image (LAYERS layers, IMAGE_MIB MiB in all):
#   p2p     peerd on nodes 1-3 (each bootstrapped to the two others). Pull on node 1 (nobody has
#           the image: peerd answers 404 and containerd goes to the registry), wait until node 1
#           advertises the content (peerd_advertised_keys > 0 and steady), then pull on node 2,
#           then on node 3.
#   direct  remove the image from nodes 2 and 3, stop every peerd, pull on node 2 and node 3
#           again: containerd straight from the registry, the baseline of the same invocation.
# Every pull is verified byte for byte (lab.sh check).
#
# Reported per pull: seconds, ratio to node 1's pull and to the mean direct pull (target for
# nodes 2 and 3: <= 0.2), bytes from the registry (its access log, by the node's IP), bytes from
# peers (peerd_bytes_fetched_total{from="peer"}), registry GETs of each layer, the peer lookup
# time (peerd_peer_discovery_duration_seconds: p50 from the buckets, and sum/count; peerd observes
# only lookups that found a provider), and for misses (node 1) the time peerd took to answer 404
# (peerd_request_duration_seconds{code="404"}). The summary gives medians over the rounds.
#
# The lab is shared: the whole run holds /var/lock/peerd-lab-session.lock (the script re-executes
# itself under `flock`, waiting as long as another session holds it), starts from `lab.sh down`,
# and takes the lab down at the end and on any failure or signal.
#
# Environment: ROUNDS (3), RATE (100mbit), IMAGE_MIB (256), LAYERS (4), NODES (3, >= 3),
# ADVERTISE_TIMEOUT (60 s), PEERD_BIN (default $CARGO_TARGET_DIR/release/peerd; copied aside for
# the run, so that a rebuild meanwhile changes nothing), PEERD_LAB_SESSION_LOCK.
# Output: a table on stdout, bench/results/lab_pull.json (on failure, logs in
# bench/results/lab_pull-failure/).
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH/.." && pwd)
SELF=$BENCH/$(basename "${BASH_SOURCE[0]}")
LAB=$REPO/ci/lab.sh
SESSION_LOCK=${PEERD_LAB_SESSION_LOCK:-/var/lock/peerd-lab-session.lock}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $EUID -eq 0 ]] || die "must run as root (the lab uses network namespaces)"
[[ -x $LAB ]] || die "lab script not found: $LAB"
command -v flock >/dev/null || die "flock (util-linux) is required"

# ---- one lab session at a time: re-exec under the session lock.
if [[ ${_PEERD_BENCH_LAB_LOCK:-} != "$SESSION_LOCK" ]]; then
    export _PEERD_BENCH_LAB_LOCK=$SESSION_LOCK _PEERD_BENCH_LOCK_T0=$EPOCHREALTIME
    log "waiting for the lab session lock $SESSION_LOCK (another session may hold it for minutes)"
    exec flock "$SESSION_LOCK" "$BASH" "$SELF" "$@"
fi
# The lock is held through the descriptor inherited from flock. Keep it on fd 8, so that the lock
# lasts until this script has taken the lab down even if flock dies first (Ctrl-C reaches both),
# and never hand it to the lab's daemons (every lab.sh call runs with fd 8 closed).
LOCK_PATH=$(realpath "$SESSION_LOCK")
lockfd=""
for f in /proc/$$/fd/*; do
    if [[ $(readlink "$f" 2>/dev/null) == "$LOCK_PATH" ]]; then lockfd=${f##*/}; break; fi
done
[[ -n $lockfd ]] || die "no descriptor of $SESSION_LOCK inherited from flock"
if [[ $lockfd != 8 ]]; then
    exec 8<&"$lockfd"
    exec {lockfd}<&-
fi
LOCK_WAIT=$(awk -v a="${_PEERD_BENCH_LOCK_T0:-$EPOCHREALTIME}" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
log "got the lab session lock after ${LOCK_WAIT} s"

ROUNDS=${ROUNDS:-3}
RATE=${RATE:-100mbit}
IMAGE_MIB=${IMAGE_MIB:-256}
LAYERS=${LAYERS:-4}
NODES=${NODES:-3}
ADVERTISE_TIMEOUT=${ADVERTISE_TIMEOUT:-60}
LAB_STATE=${LAB_DIR:-/var/lib/peerd-lab}
REG=198.18.0.2:5000
CMDLINE="$(printf '%q ' "bench/lab_pull.sh" "$@")ROUNDS=$ROUNDS RATE=$RATE IMAGE_MIB=$IMAGE_MIB LAYERS=$LAYERS"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "ROUNDS must be >= 1"
[[ $NODES =~ ^[0-9]+$ && $NODES -ge 3 ]] || die "NODES must be >= 3"

SRC_BIN=${PEERD_BIN:-${CARGO_TARGET_DIR:-/root/.cache/peerd/target}/release/peerd}
[[ -x $SRC_BIN ]] || die "peerd binary not found: $SRC_BIN (cargo build --release, or set PEERD_BIN)"

TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/peerd-bench-lab.XXXXXX")
REC=$TMP/records
: >"$REC"
FAILED_DIR=$BENCH/results/lab_pull-failure
LAB_TOUCHED=0

lab() { "$LAB" "$@" 8<&-; }

save_failure_logs() {
    local d f
    rm -rf "$FAILED_DIR"
    mkdir -p "$FAILED_DIR"
    for d in "$LAB_STATE"/node*; do
        [[ -d $d ]] || continue
        for f in peerd.log peerd.log.prev pull.log containerd.log; do
            [[ -f $d/$f ]] && tail -n 300 "$d/$f" >"$FAILED_DIR/${d##*/}-$f" 2>/dev/null || true
        done
    done
    [[ -f $LAB_STATE/registry/access.log ]] && tail -n 300 "$LAB_STATE/registry/access.log" >"$FAILED_DIR/registry-access.log" || true
    lab status >"$FAILED_DIR/status" 2>&1 || true
    log "logs of the failed run saved in ${FAILED_DIR#"$REPO"/}"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if ((LAB_TOUCHED)); then
        ((rc == 0)) || save_failure_logs
        log "taking the lab down"
        lab down >/dev/null 2>"$TMP/down.err" || { log "lab down failed:"; cat "$TMP/down.err" >&2; }
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# A copy of the binary: others may rebuild the shared target dir while we run.
cp "$SRC_BIN" "$TMP/peerd"
export PEERD_BIN=$TMP/peerd
BIN_MTIME=$(date -r "$SRC_BIN" +%FT%T)

field() { awk -v k="$1" '$1 == k { print $2 }' <<<"$2"; }
node_ip() { printf '198.18.0.%s' "$((10 + $1))"; }
scrape() { # scrape NODE FILE
    curl -fsS --noproxy '*' --max-time 5 "http://$(node_ip "$1"):5004/metrics/prometheus" >"$2" 2>/dev/null || : >"$2"
}
metric() { # metric FILE NAME: the sum of a metric over its labels (0 if absent)
    awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $NF; f = 1 } END { printf "%d", f ? s : 0 }' "$2"
}
access_lines() { wc -l <"$LAB_STATE/registry/access.log" 2>/dev/null || echo 0; }
# upstream_since LINE IP: "<bytes> <gets>" of blob GETs (200/206) from IP after line LINE of the access log.
upstream_since() {
    tail -n "+$(($1 + 1))" "$LAB_STATE/registry/access.log" 2>/dev/null | awk -v ip="$2" '
        $1 == ip && $6 == "\"GET" && $7 ~ /^\/v2\/.+\/blobs\/sha256:/ && ($9 == 200 || $9 == 206) {
            b += $10; n++ }
        END { printf "%d %d", b, n }'
}

wait_peers() { # every node with peerd sees at least one peer
    local i n deadline=$((SECONDS + 30))
    for ((i = 1; i <= NODES; i++)); do
        while :; do
            scrape "$i" "$TMP/m"
            n=$(metric peerd_peers "$TMP/m")
            ((n >= 1)) && break
            ((SECONDS < deadline)) || die "node $i: peerd_peers still 0 after 30 s"
            sleep 0.2
        done
    done
}

wait_advertised() { # wait_advertised NODE: keys > 0 and unchanged for 1 s; prints "<keys> <seconds>"
    local node=$1 t0=$EPOCHREALTIME last=-1 stable=0 k deadline=$((SECONDS + ADVERTISE_TIMEOUT))
    while :; do
        scrape "$node" "$TMP/m"
        k=$(metric peerd_advertised_keys "$TMP/m")
        if ((k > 0 && k == last)); then
            stable=$((stable + 1))
            ((stable >= 5)) && break
        else
            stable=0
        fi
        last=$k
        ((SECONDS < deadline)) || die "node $node: peerd_advertised_keys=$k, not steady after ${ADVERTISE_TIMEOUT} s"
        sleep 0.2
    done
    printf '%s %s' "$k" "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')"
}

# pull_one ROUND PHASE NODE IMAGE: pull, check, and record.
pull_one() {
    local round=$1 phase=$2 node=$3 image=$4 out secs line0 up mb ma chk
    mb=$TMP/m-$round-$phase-$node-before
    ma=$TMP/m-$round-$phase-$node-after
    if [[ $phase == p2p ]]; then scrape "$node" "$mb"; else : >"$mb"; fi
    line0=$(access_lines)
    out=$(lab pull "$node" "$image") || die "pull of $image on node $node ($phase) failed"
    secs=$(field pull-seconds "$out")
    if [[ $phase == p2p ]]; then scrape "$node" "$ma"; else : >"$ma"; fi
    up=$(upstream_since "$line0" "$(node_ip "$node")")
    chk=$(lab check "$node" "$image") || die "check of $image on node $node ($phase) failed: $chk"
    log "round $round $phase node $node: pull ${secs} s, from registry ${up% *} bytes in ${up#* } GETs; $chk"
    printf 'pull %s %s %s %s %s %s %s %s\n' "$round" "$phase" "$node" "$secs" "${up% *}" "${up#* }" "$mb" "$ma" >>"$REC"
}

# ---------------------------------------------------------------- the run
log "peerd binary $SRC_BIN (built $BIN_MTIME), copied to $PEERD_BIN"
LAB_TOUCHED=1
lab down >/dev/null 2>&1 || true # a clean slate: whatever a previous session left
out=$(lab up "$NODES" --registry-rate "$RATE")
log "lab up ($NODES nodes, registry egress $RATE) in $(field up-seconds "$out") s"

for ((round = 1; round <= ROUNDS; round++)); do
    image=$REG/bench/pull:r$round-$$
    log "round $round: pushing a random ${IMAGE_MIB} MiB, ${LAYERS}-layer image $image"
    push=$(lab push-random "bench/pull:r$round-$$" "$LAYERS" "$IMAGE_MIB")
    layers=$(field layer "$push" | tr '\n' ' ')
    config=$(field config "$push")
    printf 'image %s %s %s\n' "$round" "$image" "$config" >>"$REC"
    for l in $layers; do printf 'layer %s %s %s\n' "$round" "$l" "$(stat -c %s "${PEERD_CACHE:-/root/.cache/peerd}/images/bench_pull_r$round-$$/blobs/sha256/${l#sha256:}" 2>/dev/null || echo 0)" >>"$REC"; done
    rm -rf "${PEERD_CACHE:-/root/.cache/peerd}/images/bench_pull_r$round-$$" # the pushed layout (pushed now)

    # ---- p2p: peerd everywhere
    for ((i = 1; i <= NODES; i++)); do lab start-peerd "$i" >/dev/null; done
    wait_peers
    pull_one "$round" p2p 1 "$image"
    adv=$(wait_advertised 1)
    log "node 1 advertises ${adv% *} keys (${adv#* } s after its pull)"
    printf 'advertised %s %s\n' "$round" "$adv" >>"$REC"
    for ((i = 2; i <= NODES; i++)); do pull_one "$round" p2p "$i" "$image"; done
    for ((i = 1; i <= NODES; i++)); do
        scrape "$i" "$TMP/m-$round-node$i-end"
        printf 'nodeend %s %s %s\n' "$round" "$i" "$TMP/m-$round-node$i-end" >>"$REC"
    done
    for l in $layers $config; do
        printf 'gets %s p2p %s %s\n' "$round" "$l" "$(lab registry-log-count "$l")" >>"$REC"
    done

    # ---- direct: no peerd, the same image from the registry
    for ((i = 1; i <= NODES; i++)); do lab stop-peerd "$i" || log "stop-peerd $i: exit $?"; done
    for ((i = 2; i <= NODES; i++)); do lab rmi "$i" "$image" >/dev/null; done
    for ((i = 2; i <= NODES; i++)); do pull_one "$round" direct "$i" "$image"; done
    for l in $layers $config; do
        printf 'gets %s all %s %s\n' "$round" "$l" "$(lab registry-log-count "$l")" >>"$REC"
    done
    for ((i = 1; i <= NODES; i++)); do lab rmi "$i" "$image" >/dev/null; done
done

# ---------------------------------------------------------------- report
mkdir -p "$BENCH/results"
REC=$REC CMDLINE=$CMDLINE LOCK_WAIT=$LOCK_WAIT RATE=$RATE IMAGE_MIB=$IMAGE_MIB LAYERS=$LAYERS NODES=$NODES \
    BIN_MTIME=$BIN_MTIME python3 "$BENCH/lib/lab_report.py"
