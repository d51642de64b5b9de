#!/usr/bin/env bash
# peerd test lab: network namespaces on one machine, each "node" with its own
# containerd, one distribution registry, and peerd started on demand.
#
#   ci/lab.sh install
#   ci/lab.sh up N [--registry-rate RATE]     e.g. RATE=100mbit
#   ci/lab.sh set-registry-rate RATE|none
#   ci/lab.sh down [--keep]                   --keep: leave $LAB_DIR state/logs
#   ci/lab.sh start-peerd I [extra peerd flags...]
#   ci/lab.sh stop-peerd I [SIGNAL]
#   ci/lab.sh pull I IMAGE [extra ctr pull flags...]
#   ci/lab.sh check I IMAGE
#   ci/lab.sh rmi I IMAGE
#   ci/lab.sh exec I CMD...
#   ci/lab.sh registry-log-count DIGEST
#   ci/lab.sh push-random REPO:TAG LAYERS SIZE_MIB    (env SEED, NO_MEDIATYPE=1, INDEX=1)
#   ci/lab.sh push-debian REPO:TAG                    (env NO_MEDIATYPE=1, INDEX=1)
#   ci/lab.sh tls-registry up|down [--keep]|tokens MODE|env
#   ci/lab.sh status
#
# Addresses (RFC 2544 only): bridge pdbr0 198.18.0.1/24 in the root namespace,
# registry pd-reg 198.18.0.2:5000, node I pd-nodeI 198.18.0.(10+I).
# The namespaces have no default route: they can reach 198.18.0.0/24 only.
#
# The TLS registry (optional, after `up`: `tls-registry up`) is what real
# registries are: HTTPS with bearer tokens. Namespace pd-tlsreg, registry
# https://198.18.0.3:5443, token server https://198.18.0.3:5444/token, both
# with certificates of a lab CA made with openssl; state in $LAB_DIR/tls-registry:
#   ca.crt          the CA (each node's hosts.toml names it as `ca`)
#   ca-bundle.pem   the system's roots plus the CA: SSL_CERT_FILE for peerd
#   credentials     user:password that gets push tokens (skopeo pushes with it)
#   access.log      the registry's access log; token.log one JSON line per token request
# Anyone gets a pull token, as on Docker Hub. `tokens MODE` switches that:
# anonymous (default), users (only the credentials get tokens), none (403).
# `env` prints the paths as NAME=value lines. With env TLS_REGISTRY=1,
# push-random, push-debian, registry-log-count and set-registry-rate act on the
# TLS registry, and start-peerd adds `--hosts https://198.18.0.3:5443` and runs
# peerd with SSL_CERT_FILE=ca-bundle.pem; TLS_REGISTRY=untrusted adds the host
# but peerd gets no SSL_CERT_FILE/SSL_CERT_DIR (it does not trust the CA).
#
# Output (stdout; progress and errors go to stderr):
#   up                   up-seconds <float>
#   start-peerd          peerd-pid <pid>
#   stop-peerd           nothing; exit 2 if it outlived SIGNAL for $STOP_TIMEOUT (15) s
#   pull                 pull-seconds <float>          (ctr output: $LAB_DIR/nodeI/pull.log)
#   check                check-ok <image> <target digest> blobs=<n> bytes=<n>
#                        or `missing|bad <digest> ...` lines and check-failed <image> ...
#   rmi                  rmi-ok <image> blobs-removed <n>
#   registry-log-count   <n>   (GETs of /v2/<name>/blobs/<digest> answered 200 or 206)
#   push-*               layer sha256:<hex>  (one per layer, bottom first)
#                        config sha256:<hex>
#                        manifest sha256:<hex>
#                        index sha256:<hex>  (INDEX=1 only; the tag points at the index)
#   tls-registry up      tls-registry <url> ca <path>     (the CA to trust)
#   status               lab-dir, bridge, registry, tls-registry, one `node I ...` line
#                        each, snapshotter
# Failures exit non-zero.
#
# Environment: LAB_DIR (default /var/lib/peerd-lab), PEERD_BIN,
# CARGO_TARGET_DIR, PEERD_CACHE (default /root/.cache/peerd),
# DEBIAN_MIRROR (default: read from /etc/apt/sources.list*), LAB_VERBOSE=1,
# TLS_REGISTRY (see above).
set -euo pipefail

LAB_DIR=${LAB_DIR:-/var/lib/peerd-lab}
RUN_DIR=/run/peerd-lab
LOCK_FILE=/run/peerd-lab.lock
CACHE_DIR=${PEERD_CACHE:-/root/.cache/peerd}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

BRIDGE=pdbr0
BRIDGE_IP=198.18.0.1
REG_NS=pd-reg
REG_IP=198.18.0.2
REG_PORT=5000
REG_ADDR=$REG_IP:$REG_PORT
REG_HOSTIF=pdv-reg
TREG_NS=pd-tlsreg
TREG_IP=198.18.0.3
TREG_PORT=5443
TREG_ADDR=$TREG_IP:$TREG_PORT
TREG_HOSTIF=pdv-tlsreg
TOKEN_PORT=5444
TOKEN_SERVICE=peerd-lab-tls-registry
TOKEN_ISSUER=peerd-lab-token-server
K8S_NS=k8s.io
MAX_NODES=99
MARKER=.peerd-lab

# Lab traffic never goes through a proxy; apt and debootstrap keep whatever
# proxy settings the environment had.
SAVED_PROXY_ENV=()
for _v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY; do
    if [[ -n ${!_v:-} ]]; then SAVED_PROXY_ENV+=("$_v=${!_v}"); fi
    unset "$_v"
done
export NO_PROXY='*' no_proxy='*'

log() { printf 'lab: %s\n' "$*" >&2; }
die() { printf 'lab: ERROR: %s\n' "$*" >&2; exit 1; }
now() { printf '%s' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
with_proxy() { env "${SAVED_PROXY_ENV[@]}" "$@"; }

python_bin() {
    if [[ -n ${PYTHON:-} ]]; then printf '%s' "$PYTHON"
    elif [[ -x /usr/bin/python3 ]]; then printf '/usr/bin/python3'
    else command -v python3; fi
}

# ---------------------------------------------------------------- packages

APT_UPDATED=0
# ensure_cmds CMD:PKG ... installs the packages of the missing commands.
ensure_cmds() {
    local spec cmd pkg missing=()
    for spec in "$@"; do
        cmd=${spec%%:*}
        pkg=${spec#*:}
        if ! command -v "$cmd" >/dev/null 2>&1 && ! [[ -x /usr/sbin/$cmd || -x /sbin/$cmd ]]; then
            missing+=("$pkg")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [[ $APT_UPDATED -eq 0 ]]; then
        with_proxy apt-get update -q >&2
        APT_UPDATED=1
    fi
    with_proxy apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

BASE_CMDS=(containerd:containerd ctr:containerd runc:runc docker-registry:docker-registry
    skopeo:skopeo ip:iproute2 tc:iproute2 jq:jq curl:curl python3:python3
    setsid:util-linux flock:util-linux awk:mawk tar:tar gzip:gzip)

cmd_install() {
    ensure_cmds "${BASE_CMDS[@]}" debootstrap:debootstrap
    log "all lab packages present"
}

# ---------------------------------------------------------------- helpers

check_lab_dir() {
    [[ $LAB_DIR == /* ]] || die "LAB_DIR must be absolute: $LAB_DIR"
    LAB_DIR=$(realpath -m "$LAB_DIR")
    case $LAB_DIR in
        / | /root | /home | /var | /var/lib | /tmp | /usr | /etc | /run | /opt | /srv | /boot | /mnt | /work)
            die "refusing LAB_DIR=$LAB_DIR" ;;
    esac
}

node_ns() { printf 'pd-node%s' "$1"; }
node_ip() { printf '198.18.0.%s' "$((10 + $1))"; }
node_dir() { printf '%s/node%s' "$LAB_DIR" "$1"; }
node_run() { printf '%s/node%s' "$RUN_DIR" "$1"; }
node_sock() { printf '%s/node%s/containerd.sock' "$RUN_DIR" "$1"; }
node_content() { printf '%s/node%s/root/io.containerd.content.v1.content' "$LAB_DIR" "$1"; }
node_count() { cat "$RUN_DIR/nodes" 2>/dev/null || echo 0; }
snapshotter() { cat "$RUN_DIR/snapshotter" 2>/dev/null || echo overlayfs; }

check_index() {
    if ! [[ $1 =~ ^[0-9]+$ ]] || (($1 < 1 || $1 > MAX_NODES)); then die "bad node index: $1"; fi
}
need_node() {
    check_index "$1"
    [[ -e /run/netns/$(node_ns "$1") ]] || die "node $1 is not up (run: lab.sh up N)"
}

ns_exists() { [[ -e /run/netns/$1 ]]; }

# pid_alive PID: a live (non-zombie) process.
pid_alive() {
    local st
    [[ -n $1 && -r /proc/$1/stat ]] || return 1
    st=$(awk '{ sub(/^.*\) /, ""); print substr($0, 1, 1) }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# ns_inode NS: the inode of a named network namespace.
ns_inode() { stat -L -c %i "/run/netns/$1" 2>/dev/null; }

# lab_pid PIDFILE [NS]: print the pid if it is alive and one of ours: inside
# network namespace NS (when given and present), else its command line
# mentions the lab's directories.
lab_pid() {
    local pid ino want
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    pid_alive "$pid" || return 1
    if [[ -n ${2:-} ]] && want=$(ns_inode "$2"); then
        ino=$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) || return 1
        [[ $ino == "$want" ]] || return 1
    else
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -e "$LAB_DIR" -e "$RUN_DIR" || return 1
    fi
    printf '%s' "$pid"
}

# wait_gone PID SECONDS
wait_gone() {
    local pid=$1 deadline
    deadline=$(($(date +%s) + $2))
    while pid_alive "$pid"; do
        (($(date +%s) >= deadline)) && return 1
        sleep 0.1
    done
}

# spawn NS LOGFILE PIDFILE CMD...: start CMD in namespace NS in its own
# session, detached from the caller.
spawn() {
    local ns=$1 logf=$2 pidf=$3
    shift 3
    # fd 9 (the lab lock) must not leak into long-lived daemons.
    setsid ip netns exec "$ns" "$@" >>"$logf" 2>&1 </dev/null 9>&- &
    echo $! >"$pidf"
}

take_lock() {
    exec 9>"$LOCK_FILE"
    flock -w 120 9 || die "another lab.sh holds $LOCK_FILE"
}

# ---------------------------------------------------------------- network

setup_bridge() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
    fi
    ip addr replace "$BRIDGE_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
}

# setup_ns NS HOSTIF IP: namespace with lo up and eth0 (veth to the bridge).
setup_ns() {
    local ns=$1 hostif=$2 addr=$3
    ns_exists "$ns" || ip netns add "$ns"
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
        ip link del "$hostif" >/dev/null 2>&1 || true
        ip link add "$hostif" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$hostif" master "$BRIDGE"
    ip link set "$hostif" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr replace "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
}

# rate_burst RATE: a tbf burst in bytes (20 ms of traffic, at least 128 KiB).
rate_burst() {
    awk -v r="$1" 'BEGIN {
        n = r + 0; u = tolower(r); sub(/^[0-9.]+/, "", u)
        m["bit"] = 1 / 8; m[""] = 1 / 8; m["kbit"] = 1e3 / 8; m["mbit"] = 1e6 / 8
        m["gbit"] = 1e9 / 8; m["tbit"] = 1e12 / 8; m["kibit"] = 1024 / 8
        m["mibit"] = 1048576 / 8; m["gibit"] = 1073741824 / 8; m["bps"] = 1
        m["kbps"] = 1e3; m["mbps"] = 1e6; m["gbps"] = 1e9; m["kibps"] = 1024
        m["mibps"] = 1048576; m["gibps"] = 1073741824
        if (!(u in m) || n <= 0) { exit 1 }
        b = n * m[u] / 50; if (b < 131072) b = 131072
        printf "%d", b }'
}

# The registry that push-*, registry-log-count and set-registry-rate act on:
# plain, or tls (env TLS_REGISTRY=1; main sets it).
TARGET=plain

cmd_set_registry_rate() {
    local rate=${1:-none} burst ns=$REG_NS ratef=$RUN_DIR/registry-rate what=registry
    if [[ $TARGET == tls ]]; then ns=$TREG_NS ratef=$RUN_DIR/tls-registry-rate what="TLS registry"; fi
    ns_exists "$ns" || die "$what namespace not up"
    if [[ $rate == none || $rate == off ]]; then
        ip netns exec "$ns" tc qdisc del dev eth0 root >/dev/null 2>&1 || true
        rm -f "$ratef"
        log "$what egress: unlimited"
        return 0
    fi
    burst=$(rate_burst "$rate") || die "bad rate: $rate (e.g. 100mbit, 1gbit, 50mbps)"
    ip netns exec "$ns" tc qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency 100ms
    echo "$rate" >"$ratef"
    log "$what egress: tbf rate $rate burst $burst"
}

# ---------------------------------------------------------------- registry

# write_registry_config DIR SERVICE PORT: a distribution registry on the filesystem under DIR,
# with its access log on (the tests count GETs in it). It ends inside `http:`, so that a caller
# can append to that block.
write_registry_config() {
    local d=$1
    mkdir -p "$d/storage"
    cat >"$d/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  fields:
    service: $2
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $d/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 0.0.0.0:$3
  headers:
    X-Content-Type-Options: [nosniff]
EOF
}

# start_registry NAME NETNS DIR: runs docker-registry with DIR/config.yml in NETNS unless it
# already runs (pid in $RUN_DIR/NAME.pid). The access log (Apache combined format, every request)
# goes to DIR/access.log, the application log to DIR/registry.log.
start_registry() {
    local name=$1 ns=$2 d=$3 pid
    if pid=$(lab_pid "$RUN_DIR/$name.pid" "$ns"); then
        log "$name already running (pid $pid)"
    else
        setsid ip netns exec "$ns" docker-registry serve "$d/config.yml" \
            >>"$d/access.log" 2>>"$d/registry.log" </dev/null 9>&- &
        echo $! >"$RUN_DIR/$name.pid"
    fi
}

setup_registry() {
    local d=$LAB_DIR/registry
    write_registry_config "$d" peerd-lab-registry "$REG_PORT"
    setup_ns "$REG_NS" "$REG_HOSTIF" "$REG_IP"
    start_registry registry "$REG_NS" "$d"
}

wait_registry() {
    local deadline
    deadline=$(($(date +%s) + 20))
    until curl -fsS -o /dev/null --max-time 2 "http://$REG_ADDR/v2/" 2>/dev/null; do
        if ! lab_pid "$RUN_DIR/registry.pid" "$REG_NS" >/dev/null || (($(date +%s) >= deadline)); then
            tail -n 20 "$LAB_DIR/registry/registry.log" >&2 || true
            die "registry did not come up on $REG_ADDR"
        fi
        sleep 0.1
    done
}

# ---------------------------------------------------------------- TLS registry

treg_dir() { printf '%s/tls-registry' "$LAB_DIR"; }
tls_running() { lab_pid "$RUN_DIR/tls-registry.pid" "$TREG_NS" >/dev/null; }

# ensure_py_module MODULE PKG: the lab's python can import MODULE (else apt installs PKG).
ensure_py_module() {
    "$(python_bin)" -c "import $1" 2>/dev/null && return 0
    log "installing $2"
    export DEBIAN_FRONTEND=noninteractive
    if [[ $APT_UPDATED -eq 0 ]]; then
        with_proxy apt-get update -q >&2
        APT_UPDATED=1
    fi
    with_proxy apt-get install -y -q --no-install-recommends "$2" >&2
    "$(python_bin)" -c "import $1" || die "python module $1 still missing after installing $2"
}

# make_tls_material DIR: the lab CA, the registry's server certificate (signed
# by the CA), the token signing certificate (self-signed; the registry's
# rootcertbundle), the CA bundle for peerd, the push credentials. Kept if present.
make_tls_material() {
    local d=$1 ext
    mkdir -p "$d"
    ext=$d/openssl-ext.cnf
    cat >"$ext" <<EOF
[req]
distinguished_name = dn

[dn]

[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:$TREG_IP
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[signer]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
EOF
    if ! [[ -s $d/ca.crt && -s $d/ca.key ]]; then
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=peerd lab CA" \
            -keyout "$d/ca.key" -out "$d/ca.crt" -config "$ext" -extensions ca \
            >/dev/null 2>&1 || die "openssl could not make the lab CA"
        rm -f "$d/server.crt"
    fi
    if ! [[ -s $d/server.crt && -s $d/server.key ]]; then
        openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$TREG_IP" \
            -keyout "$d/server.key" -out "$d/server.csr" -config "$ext" >/dev/null 2>&1 ||
            die "openssl could not make the server key"
        openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
            -sha256 -days 3650 -extfile "$ext" -extensions server -out "$d/server.crt" \
            >/dev/null 2>&1 || die "openssl could not sign the server certificate"
        rm -f "$d/server.csr"
    fi
    if ! [[ -s $d/token-signer.crt && -s $d/token-signer.key ]]; then
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=peerd lab token signer" \
            -keyout "$d/token-signer.key" -out "$d/token-signer.crt" -config "$ext" \
            -extensions signer >/dev/null 2>&1 ||
            die "openssl could not make the token signing certificate"
    fi
    chmod 600 "$d/ca.key" "$d/server.key" "$d/token-signer.key"
    # peerd's SSL_CERT_FILE: the roots it would trust anyway, plus the lab CA.
    { cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true; cat "$d/ca.crt"; } >"$d/ca-bundle.pem.tmp"
    mv -f "$d/ca-bundle.pem.tmp" "$d/ca-bundle.pem"
    # skopeo's --dest-cert-dir: a directory of CA files.
    mkdir -p "$d/certs"
    cp -f "$d/ca.crt" "$d/certs/ca.crt"
    if ! [[ -s $d/credentials ]]; then
        (umask 077 && printf 'lab:%s\n' "$(openssl rand -hex 12)" >"$d/credentials")
    fi
}

write_tls_registry_config() {
    local d=$1
    write_registry_config "$d" peerd-lab-tls-registry "$TREG_PORT"
    cat >>"$d/config.yml" <<EOF
  tls:
    certificate: $d/server.crt
    key: $d/server.key
auth:
  token:
    realm: https://$TREG_IP:$TOKEN_PORT/token
    service: $TOKEN_SERVICE
    issuer: $TOKEN_ISSUER
    rootcertbundle: $d/token-signer.crt
EOF
}

# write_tls_hosts I: node I's containerd goes to peerd first, then to the TLS
# registry itself, trusting the lab CA.
write_tls_hosts() {
    local d
    d=$(node_dir "$1")
    mkdir -p "$d/certs.d/$TREG_ADDR"
    cat >"$d/certs.d/$TREG_ADDR/hosts.toml" <<EOF
server = "https://$TREG_ADDR"
ca = "$(treg_dir)/ca.crt"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
EOF
}

wait_tls_registry() {
    local d deadline code
    d=$(treg_dir)
    deadline=$(($(date +%s) + 20))
    while :; do
        # Without a token the registry answers 401 (and names the token realm).
        code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$d/ca.crt" \
            "https://$TREG_ADDR/v2/" 2>/dev/null || true)
        if [[ $code == 401 ]] && curl -fsS -o /dev/null --max-time 2 --cacert "$d/ca.crt" \
            "https://$TREG_IP:$TOKEN_PORT/token?service=$TOKEN_SERVICE" 2>/dev/null; then
            return 0
        fi
        if ! lab_pid "$RUN_DIR/tls-registry.pid" "$TREG_NS" >/dev/null ||
            ! lab_pid "$RUN_DIR/token-server.pid" "$TREG_NS" >/dev/null || (($(date +%s) >= deadline)); then
            tail -n 20 "$d/registry.log" "$d/token-server.log" >&2 || true
            die "TLS registry did not come up on $TREG_ADDR (last /v2/ answer: ${code:-none})"
        fi
        sleep 0.1
    done
}

tls_registry_up() {
    local d pid i n t0
    t0=$(now)
    if ! ns_exists "$REG_NS" || ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        die "the lab is not up (run: lab.sh up N)"
    fi
    ensure_cmds "${BASE_CMDS[@]}" openssl:openssl
    ensure_py_module cryptography python3-cryptography
    d=$(treg_dir)
    take_lock
    make_tls_material "$d"
    write_tls_registry_config "$d"
    [[ -f $d/token-mode ]] || echo anonymous >"$d/token-mode"
    setup_ns "$TREG_NS" "$TREG_HOSTIF" "$TREG_IP"
    start_registry tls-registry "$TREG_NS" "$d"
    if pid=$(lab_pid "$RUN_DIR/token-server.pid" "$TREG_NS"); then
        log "token server already running (pid $pid)"
    else
        touch "$d/token.log"
        spawn "$TREG_NS" "$d/token-server.log" "$RUN_DIR/token-server.pid" \
            "$(python_bin)" "$SCRIPT_DIR/token_server.py" --listen "$TREG_IP:$TOKEN_PORT" \
            --tls-cert "$d/server.crt" --tls-key "$d/server.key" \
            --sign-cert "$d/token-signer.crt" --sign-key "$d/token-signer.key" \
            --issuer "$TOKEN_ISSUER" --service "$TOKEN_SERVICE" \
            --credentials "$d/credentials" --mode-file "$d/token-mode" --log "$d/token.log"
    fi
    wait_tls_registry
    n=$(node_count)
    for ((i = 1; i <= n; i++)); do write_tls_hosts "$i"; done
    log "TLS registry up: https://$TREG_ADDR, tokens https://$TREG_IP:$TOKEN_PORT/token" \
        "($(cat "$d/token-mode")), CA $d/ca.crt, $(elapsed "$t0") s"
    echo "tls-registry https://$TREG_ADDR ca $d/ca.crt"
}

# stop_tls_registry: processes, namespace, link, the nodes' hosts.toml for it.
stop_tls_registry() {
    local d
    stop_pidfile "$RUN_DIR/token-server.pid" "token server" "$TREG_NS"
    stop_pidfile "$RUN_DIR/tls-registry.pid" "TLS registry" "$TREG_NS"
    kill_ns "$TREG_NS"
    if ns_exists "$TREG_NS"; then ip netns del "$TREG_NS"; fi
    ip link del "$TREG_HOSTIF" >/dev/null 2>&1 || true
    rm -f "$RUN_DIR/tls-registry-rate"
    for d in "$LAB_DIR"/node*/certs.d/"$TREG_ADDR"; do
        [[ -d $d ]] && rm -rf "$d"
    done
    return 0
}

cmd_tls_registry() {
    local sub=${1:-} mode d
    check_lab_dir
    d=$(treg_dir)
    case $sub in
        up) tls_registry_up ;;
        down)
            take_lock
            stop_tls_registry
            if [[ ${2:-} != --keep && -e $LAB_DIR/$MARKER && -d $d ]]; then
                rm -rf --one-file-system "$d"
            fi
            log "TLS registry down${2:+ (state kept in $d)}"
            ;;
        tokens)
            mode=${2:-}
            [[ $mode =~ ^(anonymous|users|none)$ ]] || die "usage: tls-registry tokens anonymous|users|none"
            [[ -d $d ]] || die "no TLS registry (run: lab.sh tls-registry up)"
            echo "$mode" >"$d/token-mode.tmp"
            mv -f "$d/token-mode.tmp" "$d/token-mode"
            log "token server: $mode"
            ;;
        env)
            [[ -s $d/ca.crt ]] || die "no TLS registry (run: lab.sh tls-registry up)"
            echo "TLS_REGISTRY_ADDR=$TREG_ADDR"
            echo "TLS_REGISTRY_URL=https://$TREG_ADDR"
            echo "TLS_TOKEN_URL=https://$TREG_IP:$TOKEN_PORT/token"
            echo "TLS_CA=$d/ca.crt"
            echo "TLS_CA_BUNDLE=$d/ca-bundle.pem"
            echo "TLS_CREDENTIALS=$d/credentials"
            echo "TLS_ACCESS_LOG=$d/access.log"
            echo "TLS_TOKEN_LOG=$d/token.log"
            ;;
        *) die "usage: tls-registry up|down [--keep]|tokens anonymous|users|none|env" ;;
    esac
}

# ---------------------------------------------------------------- nodes

write_node_config() {
    local i=$1 d r
    d=$(node_dir "$i")
    r=$(node_run "$i")
    mkdir -p "$d/root" "$d/opt" "$d/peerd" "$d/certs.d/$REG_ADDR" "$r"
    cat >"$d/containerd.toml" <<EOF
version = 2
root = "$d/root"
state = "$r"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "$r/containerd.sock"

[ttrpc]
  address = "$r/containerd.sock.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"
EOF
    cat >"$d/certs.d/$REG_ADDR/hosts.toml" <<EOF
server = "http://$REG_ADDR"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
EOF
    if tls_running; then write_tls_hosts "$i"; fi
}

setup_node() {
    local i=$1 ns d r pid
    ns=$(node_ns "$i")
    d=$(node_dir "$i")
    r=$(node_run "$i")
    write_node_config "$i"
    setup_ns "$ns" "pdv-n$i" "$(node_ip "$i")"
    if pid=$(lab_pid "$r/containerd.pid" "$ns"); then
        log "node $i: containerd already running (pid $pid)"
    else
        spawn "$ns" "$d/containerd.log" "$r/containerd.pid" \
            containerd --config "$d/containerd.toml" --root "$d/root" --state "$r" \
            --address "$r/containerd.sock"
    fi
}

ctr_node() {
    local i=$1
    shift
    ip netns exec "$(node_ns "$i")" ctr --address "$(node_sock "$i")" -n "$K8S_NS" "$@"
}

wait_containerd() {
    local i=$1 deadline
    deadline=$(($(date +%s) + 30))
    until ctr --address "$(node_sock "$i")" version >/dev/null 2>&1; do
        if ! lab_pid "$(node_run "$i")/containerd.pid" "$(node_ns "$i")" >/dev/null || (($(date +%s) >= deadline)); then
            tail -n 20 "$(node_dir "$i")/containerd.log" >&2 || true
            die "containerd of node $i did not answer"
        fi
        sleep 0.1
    done
}

detect_snapshotter() {
    local snap=native
    if ctr --address "$(node_sock 1)" plugins ls 2>/dev/null |
        awk '$1 == "io.containerd.snapshotter.v1" && $2 == "overlayfs" && $NF == "ok" { f = 1 } END { exit !f }'; then
        snap=overlayfs
    fi
    echo "$snap" >"$RUN_DIR/snapshotter"
}

# stop_pidfile PIDFILE NAME [NS]: TERM, then KILL after 10 s.
stop_pidfile() {
    local pid
    pid=$(lab_pid "$1" "${3:-}") || { rm -f "$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 10; then
        log "$2 (pid $pid) ignored TERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || log "$2 (pid $pid) still alive"
    fi
    rm -f "$1"
}

# kill_ns NS: stop every process left in the namespace.
kill_ns() {
    local ns=$1 pids pid
    ns_exists "$ns" || return 0
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
    [[ ${#pids[@]} -eq 0 ]] && return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for pid in "${pids[@]}"; do
        wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do wait_gone "$pid" 5 || log "pid $pid in $ns survived KILL"; done
}

remove_node() {
    local i=$1 ns r
    ns=$(node_ns "$i")
    r=$(node_run "$i")
    stop_pidfile "$r/peerd.pid" "peerd node $i" "$ns"
    stop_pidfile "$r/containerd.pid" "containerd node $i" "$ns"
    kill_ns "$ns"
    if ns_exists "$ns"; then ip netns del "$ns"; fi
    ip link del "pdv-n$i" >/dev/null 2>&1 || true
    rm -rf "$r"
}

# ---------------------------------------------------------------- up / down

UP_OK=0
on_up_exit() {
    local rc=$?
    if [[ $rc -ne 0 && $UP_OK -eq 0 ]]; then
        log "up failed (exit $rc); tearing the lab down, keeping logs in $LAB_DIR"
        do_down keep || true
    fi
}

cmd_up() {
    local n=${1:-} rate="" i t0
    if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 1 || n > MAX_NODES)); then
        die "usage: up N [--registry-rate RATE] (1 <= N <= $MAX_NODES)"
    fi
    shift
    while [[ $# -gt 0 ]]; do
        case $1 in
            --registry-rate) rate=${2:?--registry-rate needs a value}; shift 2 ;;
            --registry-rate=*) rate=${1#*=}; shift ;;
            *) die "unknown up option: $1" ;;
        esac
    done
    t0=$(now)
    ensure_cmds "${BASE_CMDS[@]}"
    check_lab_dir
    mkdir -p "$RUN_DIR"
    take_lock
    trap on_up_exit EXIT
    mkdir -p "$LAB_DIR"
    touch "$LAB_DIR/$MARKER"
    modprobe -q overlay 2>/dev/null || true
    setup_bridge
    setup_registry
    # Nodes beyond N from an earlier, larger lab go away.
    for i in $(seq "$((n + 1))" "$MAX_NODES"); do
        if ns_exists "$(node_ns "$i")" || [[ -d $RUN_DIR/node$i ]]; then remove_node "$i"; fi
    done
    for i in $(seq 1 "$n"); do setup_node "$i"; done
    echo "$n" >"$RUN_DIR/nodes"
    if [[ -n $rate ]]; then cmd_set_registry_rate "$rate"; else cmd_set_registry_rate none; fi
    wait_registry
    for i in $(seq 1 "$n"); do wait_containerd "$i"; done
    detect_snapshotter
    UP_OK=1
    log "lab up: $n node(s), registry $REG_ADDR, snapshotter $(snapshotter), $(elapsed "$t0") s"
    echo "up-seconds $(elapsed "$t0")"
}

do_down() {
    local keep=${1:-} ns i link m d
    # peerd first (it talks to containerd), then containerd, then the registry.
    for d in "$RUN_DIR"/node*; do
        [[ -d $d ]] || continue
        stop_pidfile "$d/peerd.pid" "peerd ${d##*/}" "pd-${d##*/}"
    done
    for d in "$RUN_DIR"/node*; do
        [[ -d $d ]] || continue
        stop_pidfile "$d/containerd.pid" "containerd ${d##*/}" "pd-${d##*/}"
    done
    stop_pidfile "$RUN_DIR/registry.pid" registry "$REG_NS"
    stop_pidfile "$RUN_DIR/token-server.pid" "token server" "$TREG_NS"
    stop_pidfile "$RUN_DIR/tls-registry.pid" "TLS registry" "$TREG_NS"
    # Whatever else still runs inside the lab's namespaces, then the namespaces.
    while read -r ns _; do
        [[ $ns =~ ^pd-(reg|tlsreg|node[0-9]+)$ ]] || continue
        kill_ns "$ns"
        ip netns del "$ns" 2>/dev/null || true
    done < <(ip netns list 2>/dev/null)
    while read -r link; do
        if [[ $link =~ ^pdv-(reg|tlsreg|n[0-9]+)$ ]]; then ip link del "$link" 2>/dev/null || true; fi
    done < <(ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }')
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    # Unmount anything left mounted under the lab's directories (deepest first).
    while read -r m; do
        umount -l "$m" 2>/dev/null || log "could not unmount $m"
    done < <(awk -v a="$LAB_DIR/" -v b="$RUN_DIR/" \
        'index($2 "/", a) == 1 || index($2 "/", b) == 1 { print $2 }' /proc/self/mounts | sort -r)
    rm -rf --one-file-system "$RUN_DIR"
    if [[ $keep != keep && -e $LAB_DIR/$MARKER ]]; then
        for i in "$LAB_DIR"/node* "$LAB_DIR/registry" "$LAB_DIR/tls-registry"; do
            [[ -e $i ]] && rm -rf --one-file-system "$i"
        done
    fi
    return 0
}

cmd_down() {
    local keep=""
    [[ ${1:-} == --keep ]] && keep=keep
    check_lab_dir
    take_lock
    do_down "$keep"
    log "lab down${keep:+ (state kept in $LAB_DIR)}"
}

# ---------------------------------------------------------------- peerd

peerd_bin() {
    if [[ -n ${PEERD_BIN:-} ]]; then printf '%s' "$PEERD_BIN"
    elif [[ -n ${CARGO_TARGET_DIR:-} ]]; then printf '%s/release/peerd' "$CARGO_TARGET_DIR"
    else printf '%s/target/release/peerd' "$REPO_ROOT"; fi
}

cmd_start_peerd() {
    local i=${1:-} bin n j peers=() d r pid ip deadline t0 port
    [[ -n $i ]] || die "usage: start-peerd I [extra peerd flags...]"
    shift
    need_node "$i"
    check_lab_dir
    bin=$(peerd_bin)
    [[ -x $bin ]] || die "peerd binary not found or not executable: $bin (set PEERD_BIN)"
    bin=$(realpath "$bin")
    d=$(node_dir "$i")
    r=$(node_run "$i")
    ip=$(node_ip "$i")
    take_lock
    if pid=$(lab_pid "$r/peerd.pid" "$(node_ns "$i")"); then
        die "peerd already running on node $i (pid $pid); stop-peerd $i first"
    fi
    for port in 5000 5003 5004; do
        if ip netns exec "$(node_ns "$i")" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
            die "node $i: something already listens on port $port (a stray peerd?)"
        fi
    done
    n=$(node_count)
    for ((j = 1; j <= n; j++)); do
        ((j == i)) || peers+=("$(node_ip "$j"):5003")
    done
    local bootstrap arg
    local -a bootstrap_flag tls_flags=() tls_env=()
    # TLS_REGISTRY=1: mirror the TLS registry too, trusting its CA; =untrusted: without the CA.
    if env_flag TLS_REGISTRY; then
        tls_running || die "TLS_REGISTRY=$TLS_REGISTRY but the TLS registry is not up (run: lab.sh tls-registry up)"
        tls_flags=(--hosts "https://$TREG_ADDR")
        if [[ $TLS_REGISTRY == untrusted ]]; then
            tls_env=(-u SSL_CERT_FILE -u SSL_CERT_DIR)
        else
            tls_env=("SSL_CERT_FILE=$(treg_dir)/ca-bundle.pem")
        fi
    fi
    bootstrap=$(IFS=,; printf '%s' "${peers[*]}")
    bootstrap_flag=(--bootstrap "static:$bootstrap")
    # An explicit --bootstrap among the extra flags replaces the lab's static list.
    for arg in "$@"; do
        [[ $arg == --bootstrap || $arg == --bootstrap=* ]] && bootstrap_flag=()
    done
    mkdir -p "$d/peerd"
    [[ -f $d/peerd.log ]] && mv -f "$d/peerd.log" "$d/peerd.log.prev"
    t0=$(now)
    spawn "$(node_ns "$i")" "$d/peerd.log" "$r/peerd.pid" \
        env "${tls_env[@]}" RUST_BACKTRACE="${RUST_BACKTRACE:-1}" "$bin" run \
        --http-addr 0.0.0.0:5000 \
        --router-addr 0.0.0.0:5003 \
        --prom-addr 0.0.0.0:5004 \
        --containerd-socket "$r/containerd.sock" \
        --content-dir "$(node_content "$i")" \
        --containerd-namespace "$K8S_NS" \
        --hosts "http://$REG_ADDR" \
        "${tls_flags[@]}" \
        --data-dir "$d/peerd" \
        "${bootstrap_flag[@]}" \
        "$@"
    pid=$(cat "$r/peerd.pid")
    deadline=$(($(date +%s) + 20))
    until curl -fsS -o /dev/null --max-time 1 "http://$ip:5004/healthz" 2>/dev/null; do
        if ! pid_alive "$pid" || (($(date +%s) >= deadline)); then
            if pid_alive "$pid"; then
                log "peerd node $i: no healthz after 20 s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
            else
                log "peerd node $i exited during start-up"
            fi
            rm -f "$r/peerd.pid"
            log "---- tail of $d/peerd.log"
            tail -n 40 "$d/peerd.log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    pid_alive "$pid" || die "peerd node $i exited right after answering healthz"
    log "peerd node $i up (pid $pid) in $(elapsed "$t0") s"
    echo "peerd-pid $pid"
}

cmd_stop_peerd() {
    local i=${1:-} sig=${2:-TERM} r pid t0 timeout=${STOP_TIMEOUT:-15}
    [[ -n $i ]] || die "usage: stop-peerd I [SIGNAL]"
    check_index "$i"
    check_lab_dir
    r=$(node_run "$i")
    sig=${sig#SIG}
    take_lock
    if ! pid=$(lab_pid "$r/peerd.pid" "$(node_ns "$i")"); then
        rm -f "$r/peerd.pid"
        log "peerd node $i not running"
        return 0
    fi
    t0=$(now)
    kill -s "$sig" "$pid"
    if ! wait_gone "$pid" "$timeout"; then
        log "peerd node $i (pid $pid) still running ${timeout} s after SIG$sig; sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || true
        rm -f "$r/peerd.pid"
        exit 2
    fi
    rm -f "$r/peerd.pid"
    log "peerd node $i stopped (SIG$sig) in $(elapsed "$t0") s"
}

# ---------------------------------------------------------------- images on nodes

image_target() {
    # image_target I IMAGE: the image's target digest on node I, or nothing.
    ctr_node "$1" images ls "name==$2" 2>/dev/null | awk 'NR > 1 { print $3; exit }'
}

cmd_pull() {
    local i=${1:-} image=${2:-} d t0 rc=0 secs
    [[ -n $i && -n $image ]] || die "usage: pull I IMAGE [ctr pull flags...]"
    shift 2
    need_node "$i"
    check_lab_dir
    d=$(node_dir "$i")
    t0=$(now)
    # ctr's progress output goes to a log (the last pull's is $d/pull.log).
    ctr_node "$i" images pull --hosts-dir "$d/certs.d" --snapshotter "$(snapshotter)" \
        "$@" "$image" >"$d/pull.$$.log" 2>&1 || rc=$?
    secs=$(elapsed "$t0")
    mv -f "$d/pull.$$.log" "$d/pull.log"
    if [[ ${LAB_VERBOSE:-0} == 1 ]]; then cat "$d/pull.log" >&2; fi
    if [[ $rc -ne 0 ]]; then
        log "pull of $image on node $i failed (exit $rc) after $secs s; tail of $d/pull.log:"
        tail -n 20 "$d/pull.log" >&2 || true
        exit 1
    fi
    echo "pull-seconds $secs"
}

cmd_check() {
    local i=${1:-} image=${2:-} target status
    [[ -n $i && -n $image ]] || die "usage: check I IMAGE"
    need_node "$i"
    check_lab_dir
    target=$(image_target "$i" "$image")
    [[ -n $target ]] || { echo "check-failed $image: not present on node $i"; exit 1; }
    status=$(ctr_node "$i" images check --snapshotter "$(snapshotter)" "name==$image" |
        awk 'NR > 1 { print $4; exit }')
    if [[ $status != complete ]]; then
        echo "check-failed $image: ctr images check says '${status:-?}'"
        exit 1
    fi
    local out
    if ! out=$("$(python_bin)" "$SCRIPT_DIR/oci_content.py" verify "$(node_content "$i")" "$target"); then
        printf '%s\n' "$out"
        echo "check-failed $image"
        exit 1
    fi
    echo "check-ok $image $target ${out#verify-ok }"
}

cmd_rmi() {
    local i=${1:-} image=${2:-} target blobs=() keep=() other b removed=0 c
    [[ -n $i && -n $image ]] || die "usage: rmi I IMAGE"
    need_node "$i"
    check_lab_dir
    c=$(node_content "$i")
    target=$(image_target "$i" "$image")
    if [[ -n $target ]]; then
        mapfile -t blobs < <("$(python_bin)" "$SCRIPT_DIR/oci_content.py" list "$c" "$target")
        ctr_node "$i" images rm --sync "$image" >/dev/null
    fi
    # Blobs the GC left behind: remove them unless another image needs them.
    while read -r other; do
        [[ -n $other ]] || continue
        other=$(image_target "$i" "$other")
        [[ -n $other ]] || continue
        mapfile -t -O "${#keep[@]}" keep < <("$(python_bin)" "$SCRIPT_DIR/oci_content.py" list "$c" "$other")
    done < <(ctr_node "$i" images ls -q)
    for b in "${blobs[@]}"; do
        [[ -e $c/blobs/${b/://} ]] || { removed=$((removed + 1)); continue; }
        if printf '%s\n' "${keep[@]}" | grep -qxF "$b"; then continue; fi
        ctr_node "$i" content rm "$b" >/dev/null && removed=$((removed + 1))
    done
    if [[ -n $(image_target "$i" "$image") ]]; then die "image $image still present on node $i"; fi
    echo "rmi-ok $image blobs-removed $removed"
}

cmd_exec() {
    local i=${1:-}
    [[ -n $i && $# -ge 2 ]] || die "usage: exec I CMD..."
    shift
    need_node "$i"
    exec ip netns exec "$(node_ns "$i")" "$@"
}

cmd_registry_log_count() {
    local digest=${1:-} f
    [[ -n $digest ]] || die "usage: registry-log-count DIGEST"
    [[ $digest == *:* ]] || digest=sha256:$digest
    [[ $digest =~ ^[a-z0-9]+:[a-f0-9]+$ ]] || die "bad digest: $digest"
    check_lab_dir
    f=$LAB_DIR/registry/access.log
    [[ $TARGET == tls ]] && f=$(treg_dir)/access.log
    [[ -f $f ]] || { echo 0; return 0; }
    # Combined log format: ... "GET /v2/<name>/blobs/<digest>[?query] HTTP/1.1" 200 <bytes> ...
    grep -cE "\"GET /v2/[^ \"]+/blobs/$digest(\\?[^ \"]*)? HTTP/[0-9.]+\" (200|206) " "$f" || true
}

# ---------------------------------------------------------------- pushing images

# split_ref REPO:TAG -> sets REF_REPO REF_TAG
split_ref() {
    local ref=$1
    if [[ ${ref##*/} == *:* ]]; then
        REF_REPO=${ref%:*}
        REF_TAG=${ref##*:}
    else
        REF_REPO=$ref
        REF_TAG=latest
    fi
    [[ $REF_REPO =~ ^[a-z0-9]+([._/-][a-z0-9]+)*$ ]] || die "bad repository name: $REF_REPO"
    [[ $REF_TAG =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "bad tag: $REF_TAG"
}

env_flag() { [[ -n ${!1:-} && ${!1} != 0 && ${!1} != false && ${!1} != no ]]; }

# push_addr: where push-* push to.
push_addr() { if [[ $TARGET == tls ]]; then printf '%s' "$TREG_ADDR"; else printf '%s' "$REG_ADDR"; fi; }

# skopeo_push LAYOUT TAG: push oci:LAYOUT:TAG to the lab registry as REF_REPO:REF_TAG
# (to the TLS registry with TARGET=tls: verified against the lab CA, with the push credentials).
skopeo_push() {
    local layout=$1 all=() dest=() d
    env_flag INDEX && all=(--all)
    if [[ $TARGET == tls ]]; then
        check_lab_dir
        d=$(treg_dir)
        if ! tls_running || ! [[ -s $d/credentials ]]; then
            die "the TLS registry is not up (run: lab.sh tls-registry up)"
        fi
        dest=(--dest-cert-dir "$d/certs" --dest-creds "$(cat "$d/credentials")")
    else
        curl -fsS -o /dev/null --max-time 2 "http://$REG_ADDR/v2/" 2>/dev/null ||
            die "registry $REG_ADDR is not reachable (run: lab.sh up N)"
        dest=(--dest-tls-verify=false)
    fi
    skopeo copy --quiet --preserve-digests "${dest[@]}" "${all[@]}" \
        "oci:$layout:$REF_TAG" "docker://$(push_addr)/$REF_REPO:$REF_TAG" >&2
}

cmd_push_random() {
    local ref=${1:-} layers=${2:-} size=${3:-} layout out t0 args=()
    [[ -n $ref && $layers =~ ^[0-9]+$ && $size =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
        die "usage: push-random REPO:TAG LAYERS SIZE_MIB"
    ((layers >= 1)) || die "LAYERS must be >= 1"
    split_ref "$ref"
    ensure_cmds skopeo:skopeo python3:python3 curl:curl
    layout=$CACHE_DIR/images/${REF_REPO//\//_}_$REF_TAG
    mkdir -p "$CACHE_DIR/images"
    [[ -n ${SEED:-} ]] && args+=(--seed "$SEED")
    env_flag NO_MEDIATYPE && args+=(--no-mediatype)
    env_flag INDEX && args+=(--index)
    t0=$(now)
    out=$("$(python_bin)" "$SCRIPT_DIR/make_oci_image.py" random --out "$layout" --ref "$REF_TAG" \
        --layers "$layers" --size-mib "$size" "${args[@]}")
    log "generated $layout in $(elapsed "$t0") s"
    t0=$(now)
    skopeo_push "$layout"
    log "pushed $(push_addr)/$REF_REPO:$REF_TAG in $(elapsed "$t0") s"
    printf '%s\n' "$out"
}

debian_mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then printf '%s' "$DEBIAN_MIRROR"; return 0; fi
    "$(python_bin)" - <<'EOF'
import glob, re, sys
cands = []
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb" and line[2] == "bookworm":
            cands.append(line[1])
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        text = open(path).read()
    except OSError:
        continue
    for stanza in re.split(r"\n\s*\n", text):
        f = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            k, v = line.split(":", 1)
            f[k.strip().lower()] = v.split()
        if "deb" in f.get("types", []) and "bookworm" in f.get("suites", []) \
                and f.get("enabled", ["yes"])[0].lower() != "no":
            cands.extend(f.get("uris", []))
cands = [c for c in cands if c.startswith(("http://", "https://", "file:/"))]
if not cands:
    sys.exit("no bookworm mirror in /etc/apt/sources.list*")
print(cands[0], end="")
EOF
}

build_debian_rootfs() {
    local tgz=$CACHE_DIR/debian-rootfs.tar.gz build=$CACHE_DIR/debian-rootfs.build mirror t0
    [[ -s $tgz ]] && return 0
    ensure_cmds debootstrap:debootstrap tar:tar gzip:gzip
    mirror=$(debian_mirror)
    log "building Debian bookworm minbase rootfs from $mirror (cached in $tgz)"
    t0=$(now)
    cleanup_build
    mkdir -p "$build"
    trap cleanup_build EXIT
    if ! with_proxy debootstrap --variant=minbase bookworm "$build" "$mirror" \
        >"$CACHE_DIR/debootstrap.log" 2>&1; then
        tail -n 30 "$CACHE_DIR/debootstrap.log" >&2
        die "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"
    fi
    umount_under "$build"
    rm -rf "${build:?}"/var/cache/apt/archives/*.deb "${build:?}"/var/lib/apt/lists/* \
        "${build:?}"/dev/* "${build:?}"/proc/* "${build:?}"/sys/* "${build:?}"/tmp/* "${build:?}"/run/*
    tar --numeric-owner --sort=name -C "$build" -cf - . | gzip -6 >"$tgz.tmp"
    mv -f "$tgz.tmp" "$tgz"
    cleanup_build
    trap - EXIT
    log "rootfs built in $(elapsed "$t0") s ($(du -h "$tgz" | cut -f1))"
}

umount_under() {
    local m
    while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(
        awk -v a="$1/" 'index($2 "/", a) == 1 { print $2 }' /proc/self/mounts | sort -r)
}

cleanup_build() {
    local build=$CACHE_DIR/debian-rootfs.build
    [[ -d $build ]] || return 0
    umount_under "$build"
    rm -rf --one-file-system "$build"
    rm -f "$CACHE_DIR/debian-rootfs.tar.gz.tmp"
}

cmd_push_debian() {
    local ref=${1:-} layout out t0 args=()
    [[ -n $ref ]] || die "usage: push-debian REPO:TAG"
    split_ref "$ref"
    ensure_cmds skopeo:skopeo python3:python3 curl:curl
    mkdir -p "$CACHE_DIR/images"
    t0=$(now)
    build_debian_rootfs
    env_flag NO_MEDIATYPE && args+=(--no-mediatype)
    env_flag INDEX && args+=(--index)
    layout=$CACHE_DIR/images/${REF_REPO//\//_}_$REF_TAG
    out=$("$(python_bin)" "$SCRIPT_DIR/make_oci_image.py" tar --out "$layout" --ref "$REF_TAG" \
        --tar "$CACHE_DIR/debian-rootfs.tar.gz" --cmd '["/bin/bash"]' "${args[@]}")
    log "image layout ready in $(elapsed "$t0") s"
    t0=$(now)
    skopeo_push "$layout"
    log "pushed $(push_addr)/$REF_REPO:$REF_TAG in $(elapsed "$t0") s"
    printf '%s\n' "$out"
}

# ---------------------------------------------------------------- status

proc_state() {
    local pid
    if pid=$(lab_pid "$1" "$2"); then printf 'pid %s running' "$pid"; else printf 'stopped'; fi
}

cmd_status() {
    local n i rate
    check_lab_dir
    echo "lab-dir $LAB_DIR"
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        echo "bridge $BRIDGE $BRIDGE_IP/24 up"
    else
        echo "bridge $BRIDGE absent"
        return 0
    fi
    rate=$(cat "$RUN_DIR/registry-rate" 2>/dev/null || echo none)
    echo "registry $REG_NS $REG_ADDR $(proc_state "$RUN_DIR/registry.pid" "$REG_NS") rate $rate"
    if ns_exists "$TREG_NS"; then
        rate=$(cat "$RUN_DIR/tls-registry-rate" 2>/dev/null || echo none)
        echo "tls-registry $TREG_NS https://$TREG_ADDR $(proc_state "$RUN_DIR/tls-registry.pid" "$TREG_NS")" \
            "token-server https://$TREG_IP:$TOKEN_PORT/token $(proc_state "$RUN_DIR/token-server.pid" "$TREG_NS")" \
            "tokens $(cat "$(treg_dir)/token-mode" 2>/dev/null || echo anonymous) rate $rate ca $(treg_dir)/ca.crt"
    else
        echo "tls-registry absent"
    fi
    n=$(node_count)
    for ((i = 1; i <= n; i++)); do
        echo "node $i $(node_ns "$i") $(node_ip "$i") containerd $(proc_state "$(node_run "$i")/containerd.pid" "$(node_ns "$i")")" \
            "peerd $(proc_state "$(node_run "$i")/peerd.pid" "$(node_ns "$i")")"
    done
    echo "snapshotter $(snapshotter)"
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

main() {
    [[ $# -ge 1 ]] || usage
    [[ $EUID -eq 0 ]] || die "must run as root"
    local sub=$1
    shift
    case $sub in
        push-random | push-debian | registry-log-count | set-registry-rate)
            if env_flag TLS_REGISTRY; then TARGET=tls; fi ;;
    esac
    case $sub in
        install) cmd_install ;;
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        set-registry-rate) cmd_set_registry_rate "$@" ;;
        start-peerd) cmd_start_peerd "$@" ;;
        stop-peerd) cmd_stop_peerd "$@" ;;
        pull) cmd_pull "$@" ;;
        check) cmd_check "$@" ;;
        rmi) cmd_rmi "$@" ;;
        exec) cmd_exec "$@" ;;
        registry-log-count) cmd_registry_log_count "$@" ;;
        push-random) cmd_push_random "$@" ;;
        push-debian) cmd_push_debian "$@" ;;
        tls-registry) cmd_tls_registry "$@" ;;
        status) cmd_status ;;
        -h | --help | help) usage ;;
        *) die "unknown subcommand: $sub (see lab.sh help)" ;;
    esac
}

main "$@"
