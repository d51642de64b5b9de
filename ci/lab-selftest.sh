#!/usr/bin/env bash
# Self-test of the peerd lab (no peerd needed): two nodes, a random 2-layer
# 8 MiB image and a Debian image, pulled on node 1 straight from the registry
# (the mirror 127.0.0.1:5000 refuses, containerd falls back to the server),
# checked byte for byte, one registry GET per layer, removed again. Then the
# TLS registry: a random image pushed with the push credentials, pulled over
# HTTPS with an anonymous token; with anonymous tokens off, a pull fails
# without credentials and succeeds with them.
#
#   ci/lab-selftest.sh            (KEEP_LAB=1 leaves the lab up at the end)
set -euo pipefail

LAB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lab.sh
REG=198.18.0.2:5000
RAND_IMG=$REG/selftest/rand:v1
DEB_IMG=$REG/selftest/debian:bookworm
IDX_IMG=$REG/selftest/index:v1
TLS_IMG=198.18.0.3:5443/selftest/tls:v1
LAB_STATE=${LAB_DIR:-/var/lib/peerd-lab}

passed=0
failed=0
pass() { printf 'PASS %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL %s\n' "$*"; failed=$((failed + 1)); }
timing() { printf 'TIME %-28s %8s s\n' "$1" "$2"; }
now() { printf '%s' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

finish() {
    local rc=$?
    if ((failed > 0 || rc != 0)); then
        echo "---- diagnostics"
        "$LAB" status 2>&1 || true
        for f in registry/registry.log node1/containerd.log node1/pull.log node2/pull.log; do
            [[ -f $LAB_STATE/$f ]] || continue
            echo "---- tail $f"
            tail -n 15 "$LAB_STATE/$f" || true
        done
    fi
    if [[ ${KEEP_LAB:-0} != 1 ]]; then
        if "$LAB" down >/dev/null 2>&1 && ! ip netns list | grep -qE '^pd-(reg|tlsreg|node[0-9]+)'; then
            echo "PASS down: no lab namespaces left"
            passed=$((passed + 1))
        else
            echo "FAIL down"
            failed=$((failed + 1))
        fi
    fi
    if ((rc != 0 && failed == 0)); then failed=1; fi
    echo "selftest: $passed passed, $failed failed"
    if ((failed > 0)); then exit 1; fi
    exit 0
}
trap finish EXIT

# field NAME OUTPUT: the values of lines "NAME value".
field() { awk -v k="$1" '$1 == k { print $2 }' <<<"$2"; }

# pull_check NODE IMAGE PUSH_OUTPUT LABEL
pull_check() {
    local node=$1 img=$2 out=$3 label=$4 res secs d n ok=1
    if res=$("$LAB" pull "$node" "$img"); then
        secs=$(field pull-seconds "$res")
        pass "pull $label on node $node (${secs} s)"
        timing "pull $label" "$secs"
    else
        fail "pull $label on node $node"
        return 0
    fi
    if res=$("$LAB" check "$node" "$img"); then pass "check $label: $res"; else fail "check $label: $res"; fi
    for d in $(field layer "$out") $(field config "$out"); do
        n=$("$LAB" registry-log-count "$d")
        if [[ $n != 1 ]]; then
            ok=0
            fail "registry GETs of $label blob $d: $n (want 1)"
        fi
    done
    ((ok)) && pass "registry GETs of each $label layer and config: 1"
    return 0
}

rmi_check() {
    local node=$1 img=$2 out=$3 label=$4 d left=0 c
    c=$LAB_STATE/node$node/root/io.containerd.content.v1.content/blobs/sha256
    if "$LAB" rmi "$node" "$img" >/dev/null; then pass "rmi $label"; else fail "rmi $label"; fi
    for d in $(field layer "$out") $(field config "$out") $(field manifest "$out"); do
        [[ -e $c/${d#sha256:} ]] && left=$((left + 1))
    done
    if ((left == 0)) && ! "$LAB" check "$node" "$img" >/dev/null 2>&1; then
        pass "$label gone from node $node (image and blobs)"
    else
        fail "$label still on node $node ($left blobs left)"
    fi
}

"$LAB" install >/dev/null
"$LAB" down >/dev/null 2>&1 || true

t0=$(now)
if "$LAB" up 2 >/dev/null; then pass "up 2"; else fail "up 2"; exit 1; fi
timing "up 2 nodes" "$(elapsed "$t0")"
t0=$(now)
if "$LAB" up 2 >/dev/null 2>&1; then pass "up 2 again (idempotent)"; else fail "up 2 again"; fi
timing "up 2 nodes (again)" "$(elapsed "$t0")"
for i in 1 2; do
    if "$LAB" exec "$i" ctr --address "/run/peerd-lab/node$i/containerd.sock" version >/dev/null; then
        pass "containerd node $i answers"
    else
        fail "containerd node $i"
    fi
done

t0=$(now)
if rand_out=$("$LAB" push-random selftest/rand:v1 2 8 2>/dev/null) &&
    [[ $(field layer "$rand_out" | wc -l) == 2 && -n $(field manifest "$rand_out") ]]; then
    pass "push-random 2 layers 8 MiB"
else
    fail "push-random"
    exit 1
fi
timing "push-random 8 MiB" "$(elapsed "$t0")"

t0=$(now)
cached=cached
[[ -s ${PEERD_CACHE:-/root/.cache/peerd}/debian-rootfs.tar.gz ]] || cached=first
if deb_out=$("$LAB" push-debian selftest/debian:bookworm 2>/dev/null) &&
    [[ $(field layer "$deb_out" | wc -l) == 1 ]]; then
    pass "push-debian"
else
    fail "push-debian"
    exit 1
fi
timing "push-debian ($cached)" "$(elapsed "$t0")"

t0=$(now)
if idx_out=$(INDEX=1 NO_MEDIATYPE=1 SEED=selftest "$LAB" push-random selftest/index:v1 1 1 2>/dev/null) &&
    [[ -n $(field index "$idx_out") ]]; then
    pass "push-random INDEX=1 NO_MEDIATYPE=1"
else
    fail "push-random INDEX=1 NO_MEDIATYPE=1"
fi
timing "push-random index 1 MiB" "$(elapsed "$t0")"

pull_check 1 "$RAND_IMG" "$rand_out" random
pull_check 1 "$DEB_IMG" "$deb_out" debian
pull_check 2 "$IDX_IMG" "$idx_out" index

# The Debian image's config must say Cmd ["/bin/bash"].
cfg=$(field config "$deb_out")
if [[ $(curl -fsS --noproxy '*' "http://$REG/v2/selftest/debian/blobs/$cfg" | jq -c .config.Cmd) == '["/bin/bash"]' ]]; then
    pass "debian config Cmd is [\"/bin/bash\"]"
else
    fail "debian config Cmd"
fi

rmi_check 1 "$RAND_IMG" "$rand_out" random
rmi_check 1 "$DEB_IMG" "$deb_out" debian
rmi_check 2 "$IDX_IMG" "$idx_out" index

# ---- the TLS registry
t0=$(now)
if "$LAB" tls-registry up >/dev/null && "$LAB" tls-registry up >/dev/null 2>&1; then
    pass "tls-registry up (twice)"
else
    fail "tls-registry up"
    exit 1
fi
timing "tls-registry up" "$(elapsed "$t0")"
st=$("$LAB" status)
if grep -q '^tls-registry pd-tlsreg .* running token-server .* running' <<<"$st"; then
    pass "status shows the TLS registry and its token server"
else
    fail "status: $(grep tls-registry <<<"$st")"
fi
if tls_out=$(TLS_REGISTRY=1 "$LAB" push-random selftest/tls:v1 2 4 2>/dev/null); then
    pass "push-random to the TLS registry (push token for the credentials)"
else
    fail "push-random to the TLS registry"
    exit 1
fi
TLS_REGISTRY=1 pull_check 2 "$TLS_IMG" "$tls_out" "TLS + anonymous token"
rmi_check 2 "$TLS_IMG" "$tls_out" "TLS image"
"$LAB" tls-registry tokens users >/dev/null 2>&1
if "$LAB" pull 1 "$TLS_IMG" >/dev/null 2>&1; then
    fail "pull without credentials succeeded with anonymous tokens off"
else
    pass "pull without credentials fails with anonymous tokens off"
fi
creds=$(cat "$LAB_STATE/tls-registry/credentials")
if "$LAB" pull 1 "$TLS_IMG" --user "$creds" >/dev/null && "$LAB" check 1 "$TLS_IMG" >/dev/null; then
    pass "pull with credentials with anonymous tokens off"
else
    fail "pull with credentials with anonymous tokens off"
fi
if "$LAB" tls-registry down >/dev/null 2>&1 && ! ip netns list | grep -q '^pd-tlsreg' &&
    ! [[ -e $LAB_STATE/node1/certs.d/198.18.0.3:5443 ]]; then
    pass "tls-registry down"
else
    fail "tls-registry down"
fi
