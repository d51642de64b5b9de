#!/usr/bin/env bash
# Resident memory of peerd, serving straight from a content directory (no containerd, no peers).
#
#   bench/memory.sh                       # engines io-uring and epoll, shards 1 and $(nproc)
#   ENGINES=io-uring SHARDS=2 bench/memory.sh
#
# For each (engine, shards): start `peerd run --bootstrap none --containerd-socket /nonexistent ...`,
#   idle:    wait 5 s after it answers /healthz, read VmRSS, VmHWM, RssAnon, RssFile, threads;
#   serving: 4 concurrent streams (bench/lib/httpload.py) each downloading a 512 MiB blob
#            DOWNLOADS (2) times; sample VmRSS every 100 ms, report the max and VmHWM afterwards.
# Targets (from the issue): idle <= 30 MiB, serving <= 64 MiB. Values are reported, not judged.
#
# Environment: PEERD_BIN (default $CARGO_TARGET_DIR/release/peerd, CARGO_TARGET_DIR defaulting to
# /root/.cache/peerd/target), ENGINES, SHARDS, BLOB_MIB (512), STREAMS (4), DOWNLOADS (2),
# IDLE_SECONDS (5), BENCH_TMPDIR (/tmp).
# Output: a table on stdout, bench/results/memory.json.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH/.." && pwd)
PEERD_BIN=${PEERD_BIN:-${CARGO_TARGET_DIR:-/root/.cache/peerd/target}/release/peerd}
ENGINES=${ENGINES:-io-uring epoll}
SHARDS=${SHARDS:-1 $(nproc)}
BLOB_MIB=${BLOB_MIB:-512}
STREAMS=${STREAMS:-4}
DOWNLOADS=${DOWNLOADS:-2}
IDLE_SECONDS=${IDLE_SECONDS:-5}
LOAD_TIMEOUT=${LOAD_TIMEOUT:-300}
CMDLINE="$(printf '%q ' "${0#"$REPO"/}" "$@")"
export BLOB_MIB STREAMS DOWNLOADS IDLE_SECONDS CMDLINE BENCH_LIB=$BENCH/lib

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -x $PEERD_BIN ]] || die "peerd binary not found: $PEERD_BIN (cargo build --release, or set PEERD_BIN)"
command -v python3 >/dev/null || die "python3 is required"

TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/peerd-bench-memory.XXXXXX")
PEERD_PID=""
LOAD_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ -n $LOAD_PID ]] && kill -0 "$LOAD_PID" 2>/dev/null; then
        kill -TERM "$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
    fi
    stop_peerd
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

stop_peerd() {
    [[ -n $PEERD_PID ]] || return 0
    if kill -0 "$PEERD_PID" 2>/dev/null; then
        kill -TERM "$PEERD_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do
            kill -0 "$PEERD_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$PEERD_PID" 2>/dev/null; then
            log "peerd (pid $PEERD_PID) ignored SIGTERM for 10 s; killing it"
            kill -KILL "$PEERD_PID" 2>/dev/null || true
        fi
    fi
    wait "$PEERD_PID" 2>/dev/null || true
    PEERD_PID=""
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
kib() { awk -v k="$2:" '$1 == k { print $2; f = 1 } END { if (!f) print 0 }' "/proc/$1/status"; }

# A copy of the binary: others may rebuild the shared target dir while this runs.
cp -p "$PEERD_BIN" "$TMP/peerd"
log "peerd binary $PEERD_BIN (built $(date -r "$PEERD_BIN" +%FT%T))"
export PEERD_BIN=$TMP/peerd

# ---- content: one random blob named by its sha256
log "writing a ${BLOB_MIB} MiB random blob"
HEX=$(python3 -c '
import os, sys
sys.path.insert(0, os.environ["BENCH_LIB"])
import benchlib
print(benchlib.make_blob(sys.argv[1], int(sys.argv[2]) << 20))
' "$TMP/content" "$BLOB_MIB")
BLOB=$TMP/content/blobs/sha256/$HEX
SIZE=$((BLOB_MIB << 20))
cat "$BLOB" >/dev/null # page cache warm for every run

RESULTS=()
run_one() {
    local engine=$1 shards=$2 d http prom router deadline url t0 max=0 samples=0 rss hwm_idle rss_idle
    local anon_idle file_idle threads_idle hwm_serve anon_serve file_serve load_json real_engine
    d=$TMP/run-$engine-$shards
    mkdir -p "$d/data"
    http=$(free_port); prom=$(free_port); router=$(free_port)
    "$PEERD_BIN" run --content-dir "$TMP/content" --bootstrap none \
        --http-addr "127.0.0.1:$http" --prom-addr "127.0.0.1:$prom" --router-addr "127.0.0.1:$router" \
        --data-dir "$d/data" --containerd-socket /nonexistent --shards "$shards" --io-engine "$engine" \
        >"$d/peerd.log" 2>&1 </dev/null &
    PEERD_PID=$!
    deadline=$((SECONDS + 20))
    until curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$prom/healthz" 2>/dev/null; do
        kill -0 "$PEERD_PID" 2>/dev/null || { tail -n 20 "$d/peerd.log" >&2; die "peerd exited during start-up"; }
        ((SECONDS < deadline)) || { tail -n 20 "$d/peerd.log" >&2; die "peerd: no /healthz after 20 s"; }
        sleep 0.1
    done
    real_engine=$(grep -o 'engine="[a-z_]*"' "$d/peerd.log" | head -n1 | cut -d'"' -f2)
    sleep "$IDLE_SECONDS"
    rss_idle=$(kib "$PEERD_PID" VmRSS); hwm_idle=$(kib "$PEERD_PID" VmHWM)
    anon_idle=$(kib "$PEERD_PID" RssAnon); file_idle=$(kib "$PEERD_PID" RssFile)
    threads_idle=$(kib "$PEERD_PID" Threads)

    url="http://127.0.0.1:$http/v2/bench/blob/blobs/sha256:$HEX"
    t0=$EPOCHREALTIME
    python3 "$BENCH/lib/httpload.py" "$url" --streams "$STREAMS" --requests-per-stream "$DOWNLOADS" \
        --expect-size "$SIZE" >"$d/load.json" 2>"$d/load.err" &
    LOAD_PID=$!
    deadline=$((SECONDS + LOAD_TIMEOUT))
    while kill -0 "$LOAD_PID" 2>/dev/null; do
        rss=$(kib "$PEERD_PID" VmRSS 2>/dev/null || echo 0)
        ((rss > max)) && max=$rss
        samples=$((samples + 1))
        if ((SECONDS >= deadline)); then
            kill -TERM "$LOAD_PID" 2>/dev/null || true
            die "load did not finish in ${LOAD_TIMEOUT} s"
        fi
        sleep 0.1
    done
    if ! wait "$LOAD_PID"; then
        LOAD_PID=""
        cat "$d/load.err" >&2
        die "load failed against peerd ($engine, $shards shards)"
    fi
    LOAD_PID=""
    kill -0 "$PEERD_PID" 2>/dev/null || die "peerd died while serving; log: $(tail -n 20 "$d/peerd.log")"
    hwm_serve=$(kib "$PEERD_PID" VmHWM)
    anon_serve=$(kib "$PEERD_PID" RssAnon); file_serve=$(kib "$PEERD_PID" RssFile)
    load_json=$(cat "$d/load.json")
    stop_peerd
    log "$engine/$shards shards: idle VmRSS ${rss_idle} KiB, serving max VmRSS ${max} KiB ($samples samples), VmHWM ${hwm_serve} KiB"
    RESULTS+=("$engine $real_engine $shards $rss_idle $hwm_idle $anon_idle $file_idle $threads_idle $max $hwm_serve $anon_serve $file_serve $samples $load_json")
}

for engine in $ENGINES; do
    for shards in $SHARDS; do
        run_one "$engine" "$shards"
    done
done

mkdir -p "$BENCH/results"
printf '%s\n' "${RESULTS[@]}" | python3 -c '
import json, os, sys, time, platform
rows, out = [], []
for line in sys.stdin:
    p = line.split(" ", 13)
    eng, real, shards = p[0], p[1], int(p[2])
    v = [int(x) for x in p[3:13]]
    load = json.loads(p[13])
    mib = lambda k: round(k / 1024, 1)
    r = {"engine": eng, "engine_in_use": real, "shards": shards,
         "idle": {"vmrss_mib": mib(v[0]), "vmhwm_mib": mib(v[1]), "rss_anon_mib": mib(v[2]),
                  "rss_file_mib": mib(v[3]), "threads": v[4]},
         "serving": {"max_vmrss_mib": mib(v[5]), "vmhwm_mib": mib(v[6]), "rss_anon_mib_after": mib(v[7]),
                     "rss_file_mib_after": mib(v[8]), "samples": v[9], "load": load,
                     "mib_per_s": round(load["bytes"] / 1048576 / load["wall_s"], 1)}}
    out.append(r)
    rows.append([eng if eng == real.replace("_", "-") else f"{eng} ({real})", shards, mib(v[0]), mib(v[2]), mib(v[3]),
                 mib(v[5]), mib(v[6]), v[9], r["serving"]["mib_per_s"]])
hdr = ["engine", "shards", "idle VmRSS", "idle anon", "idle file", "serving max VmRSS", "VmHWM", "samples", "MiB/s"]
w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
print("memory (MiB; targets: idle <= 30, serving <= 64); serving = %s streams x %s downloads of a %s MiB blob"
      % (os.environ["STREAMS"], os.environ["DOWNLOADS"], os.environ["BLOB_MIB"]))
print("  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)))
print("  ".join("-" * x for x in w))
for r in rows:
    print("  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r)))
sys.path.insert(0, os.environ["BENCH_LIB"])
import benchlib
path = benchlib.write_json("memory", {
    "benchmark": "memory", "command": os.environ["CMDLINE"], "host": benchlib.host_info(),
    "params": {"blob_mib": int(os.environ["BLOB_MIB"]), "streams": int(os.environ["STREAMS"]),
               "downloads_per_stream": int(os.environ["DOWNLOADS"]), "idle_seconds": float(os.environ["IDLE_SECONDS"]),
               "sample_interval_s": 0.1},
    "targets_mib": {"idle": 30, "serving": 64}, "runs": out})
print("\nwrote", os.path.relpath(path, benchlib.REPO))
' || die "summary failed"
