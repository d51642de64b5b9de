#!/usr/bin/env bash
# A real Kubernetes control plane (etcd + kube-apiserver, no scheduler, no
# controller-manager, no kubelet) for peerd's tests. Everything is built from
# the Go module proxy, so it needs neither Docker nor release downloads.
#
#   control-plane.sh install   build/refresh helm, kube-apiserver, kubectl, etcd
#                              into the cache (fast no-op when already there)
#   control-plane.sh up        start etcd + kube-apiserver, wait for /readyz
#   control-plane.sh down      stop both (keeps the cache and the state dir)
#   control-plane.sh status    show what runs and whether /readyz answers
#   control-plane.sh namespace NAME   create NAME and its "default" ServiceAccount
#   control-plane.sh env       print shell exports (KUBECONFIG, PATH, ...)
#   control-plane.sh selftest  up, exercise the API (pods, events, helm, SSA), down
#   control-plane.sh reset     down, then wipe the state dir (etcd data, certs)
#
# Nothing here ever talks to a cluster IP: --service-cluster-ip-range is only a
# value the apiserver allocates Service IPs from. Pods stay Pending forever.
#
# Knobs (environment):
#   PEERD_K8S_VERSION      k8s.io/kubernetes module version   (default below)
#   PEERD_HELM_VERSION     helm.sh/helm/v3 module version     (default below)
#   PEERD_K8S_CACHE        cache dir     (default /root/.cache/peerd/k8s)
#   PEERD_K8S_STATE        state dir     (default /var/lib/peerd-k8s)
#   PEERD_K8S_ADDR         apiserver address (default 198.18.0.1 if that
#                          address is configured here, else 127.0.0.1)
#   PEERD_K8S_PORT         apiserver secure port (default 6443)
#   PEERD_K8S_ETCD_PORT    etcd client port (default 2379; peer port = +1)
#   PEERD_K8S_READY_TIMEOUT seconds to wait for /readyz (default 240)
#   PEERD_K8S_APISERVER_ARGS extra kube-apiserver flags (word-split)
set -euo pipefail

K8S_VERSION="${PEERD_K8S_VERSION:-v1.35.4}"
HELM_VERSION="${PEERD_HELM_VERSION:-v3.20.2}"
CACHE="${PEERD_K8S_CACHE:-/root/.cache/peerd/k8s}"
BIN="$CACHE/bin"
SRC="$CACHE/src"
STATE="${PEERD_K8S_STATE:-/var/lib/peerd-k8s}"
PKI="$STATE/pki"
RUN="$STATE/run"
LOGS="$STATE/logs"
BRIDGE_ADDR=198.18.0.1
PORT="${PEERD_K8S_PORT:-6443}"
ETCD_PORT="${PEERD_K8S_ETCD_PORT:-2379}"
ETCD_PEER_PORT=$((ETCD_PORT + 1))
READY_TIMEOUT="${PEERD_K8S_READY_TIMEOUT:-240}"
KUBECONFIG_PATH="$STATE/admin.kubeconfig"
SERVICE_CIDR=10.96.0.0/24
SERVICE_IP=10.96.0.1 # first IP of SERVICE_CIDR: the "kubernetes" Service

export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=mod"

# grep -q in a pipeline may exit before the writer is done, and the writer's
# SIGPIPE then fails the pipeline under pipefail: read all input instead.
has() { grep "$@" >/dev/null; }

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# k8s "v1.35.4" -> staging "v0.35.4"
staging_version() { printf 'v0.%s\n' "${K8S_VERSION#v1.}"; }

go_build_env() {
	command -v go >/dev/null || die "go is not installed"
	mkdir -p "$BIN" "$SRC"
}

# ---------------------------------------------------------------- install --

helm_ok() {
	[[ -x "$BIN/helm" ]] &&
		[[ "$("$BIN/helm" version --template '{{.Version}}' 2>/dev/null)" == "$HELM_VERSION" ]]
}

install_helm() {
	if helm_ok; then
		log "helm $HELM_VERSION already in $BIN"
		return
	fi
	go_build_env
	# k8s minor that this helm release is built against, for .Capabilities.
	local mod minor
	go mod download "helm.sh/helm/v3@$HELM_VERSION"
	mod="$(go env GOMODCACHE)/helm.sh/helm/v3@$HELM_VERSION/go.mod"
	minor="$(awk '$1 == "k8s.io/client-go" { split($2, v, "."); print v[2] }' "$mod")"
	[[ -n "$minor" ]] || minor=35
	log "building helm $HELM_VERSION (go install) ..."
	local t0=$SECONDS
	GOBIN="$BIN" nice -n 10 go install -trimpath -ldflags "-s -w \
-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
-X helm.sh/helm/v3/internal/version.gitTreeState=clean \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor" \
		"helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
	helm_ok || die "helm build did not produce $HELM_VERSION"
	log "helm $HELM_VERSION built in $((SECONDS - t0))s"
}

# etcd server version that k8s.io/kubernetes itself pins (its test deps).
etcd_version() {
	local mod
	mod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
	[[ -f "$mod" ]] || go mod download "k8s.io/kubernetes@$K8S_VERSION"
	awk '$1 == "go.etcd.io/etcd/server/v3" { print $2 }' "$mod"
}

k8s_ok() {
	[[ -x "$BIN/kube-apiserver" && -x "$BIN/kubectl" && -x "$BIN/etcd" && -f "$BIN/.k8s-version" ]] &&
		[[ "$(cat "$BIN/.k8s-version")" == "$K8S_VERSION" ]] &&
		[[ "$("$BIN/kube-apiserver" --version 2>/dev/null)" == "Kubernetes $K8S_VERSION" ]] &&
		"$BIN/kubectl" version --client 2>/dev/null | has -F "Client Version: $K8S_VERSION" &&
		"$BIN/etcd" --version 2>/dev/null | has '^etcd Version: '
}

# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces ~30 staging
# modules (k8s.io/api, k8s.io/apiserver, ...) with ./staging/src/... paths.
# A wrapper module requires it and replaces every staging module by its
# published v0.Y.Z release instead; kubectl and etcd come along in the same
# module so that all three share one dependency graph and one compile.
write_wrapper_module() {
	local kmod="$1" etcd_ver="$2" sv
	sv="$(staging_version)"
	local go_directive godebug
	go_directive="$(awk '$1 == "go" { print $2; exit }' "$kmod")"
	godebug="$(awk '$1 == "godebug" { print; exit }' "$kmod")"
	mkdir -p "$SRC/cmd/kube-apiserver" "$SRC/cmd/kubectl" "$SRC/cmd/etcd"
	{
		echo "// Generated by ci/k8s/control-plane.sh; do not edit."
		echo "module peerd.test/k8s-control-plane"
		echo
		echo "go $go_directive"
		[[ -z "$godebug" ]] || {
			echo
			echo "$godebug"
		}
		echo
		echo "require ("
		echo "	k8s.io/kubernetes $K8S_VERSION"
		echo "	k8s.io/kubectl $sv"
		echo "	k8s.io/component-base $sv"
		echo "	k8s.io/client-go $sv"
		echo "	go.etcd.io/etcd/server/v3 $etcd_ver"
		echo ")"
		echo
		echo "replace ("
		# Every `k8s.io/x => ./staging/src/k8s.io/x` line of kubernetes' go.mod.
		awk '$2 == "=>" && $3 ~ /^\.\/staging\// { printf "\t%s => %s '"$sv"'\n", $1, $1 }' "$kmod"
		echo ")"
	} >"$SRC/go.mod.new"
	if ! cmp -s "$SRC/go.mod.new" "$SRC/go.mod.in" 2>/dev/null; then
		mv "$SRC/go.mod.new" "$SRC/go.mod.in"
		cp "$SRC/go.mod.in" "$SRC/go.mod"
		rm -f "$SRC/go.sum"
	else
		rm -f "$SRC/go.mod.new"
	fi

	# Same mains as kubernetes' cmd/kube-apiserver/apiserver.go,
	# cmd/kubectl/kubectl.go and etcd's server/main.go.
	cat >"$SRC/cmd/kube-apiserver/main.go" <<'EOF'
// Generated by ci/k8s/control-plane.sh: kubernetes' cmd/kube-apiserver main.
package main

import (
	"os"
	_ "time/tzdata" // for timeZone support in CronJob

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	command := app.NewAPIServerCommand()
	code := cli.Run(command)
	os.Exit(code)
}
EOF
	cat >"$SRC/cmd/kubectl/main.go" <<'EOF'
// Generated by ci/k8s/control-plane.sh: kubernetes' cmd/kubectl main.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"

	_ "k8s.io/client-go/plugin/pkg/client/auth" // client auth plugins
)

func main() {
	logs.GlogSetter(cmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
EOF
	cat >"$SRC/cmd/etcd/main.go" <<'EOF'
// Generated by ci/k8s/control-plane.sh: etcd's server/main.go.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
EOF
}

install_k8s() {
	if k8s_ok; then
		log "kube-apiserver/kubectl $K8S_VERSION and etcd already in $BIN"
		return
	fi
	go_build_env
	log "fetching k8s.io/kubernetes@$K8S_VERSION from the module proxy ..."
	go mod download "k8s.io/kubernetes@$K8S_VERSION"
	local kmod etcd_ver
	kmod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
	etcd_ver="$(etcd_version)"
	[[ -n "$etcd_ver" ]] || die "no go.etcd.io/etcd/server/v3 in $kmod"
	write_wrapper_module "$kmod" "$etcd_ver"

	local t0=$SECONDS
	if [[ ! -s "$SRC/go.sum" ]]; then
		log "resolving the wrapper module (go mod tidy) ..."
		(cd "$SRC" && nice -n 10 go mod tidy)
	fi
	local minor date ld="" pkg
	minor="${K8S_VERSION#v1.}"
	minor="${minor%%.*}"
	date="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "${kmod%.mod}.info" 2>/dev/null || true)"
	for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
		ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
		ld+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean -X $pkg.buildDate=${date:-1970-01-01T00:00:00Z}"
	done
	log "building kube-apiserver, kubectl ($K8S_VERSION) and etcd ($etcd_ver); a first build takes 10+ minutes ..."
	rm -f "$BIN/.k8s-version"
	(cd "$SRC" && nice -n 10 go build -trimpath -ldflags "-s -w$ld" -o "$BIN/" \
		./cmd/kube-apiserver ./cmd/kubectl ./cmd/etcd)
	echo "$K8S_VERSION" >"$BIN/.k8s-version"
	k8s_ok || die "built binaries do not report $K8S_VERSION"
	log "kube-apiserver, kubectl, etcd built in $((SECONDS - t0))s"
}

cmd_install() {
	mkdir -p "$CACHE"
	# Two concurrent installs would race on $SRC/go.mod and the binaries.
	exec 9>"$CACHE/.install.lock"
	flock 9
	install_helm
	install_k8s
	exec 9>&-
	"$BIN/kube-apiserver" --version
	"$BIN/etcd" --version | sed -n 1p
	"$BIN/helm" version --short
	log "binaries in $BIN"
}


# --------------------------------------------------------------------- up --

apiserver_addr() {
	if [[ -n "${PEERD_K8S_ADDR:-}" ]]; then
		echo "$PEERD_K8S_ADDR"
	elif command -v ip >/dev/null && ip -4 -o addr show 2>/dev/null | has -F " $BRIDGE_ADDR/"; then
		echo "$BRIDGE_ADDR" # the lab bridge: reachable from the lab's netns
	else
		echo 127.0.0.1
	fi
}

# The address the running apiserver was started on (the bridge may have come
# or gone since), else the one `up` would pick now.
running_addr() {
	if [[ -s "$RUN/kube-apiserver.addr" ]] && pid_of kube-apiserver >/dev/null; then
		cat "$RUN/kube-apiserver.addr"
	else
		apiserver_addr
	fi
}

# sign_cert NAME SUBJECT EXTENSIONS: a key + cert signed by the local CA.
sign_cert() {
	local name="$1" subj="$2" ext="$3"
	openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" \
		-out "$PKI/$name.csr" -subj "$subj" 2>/dev/null
	printf '%s\n' "$ext" >"$PKI/$name.ext"
	openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
		-set_serial "0x$(openssl rand -hex 16)" -days 3650 -sha256 \
		-extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
	rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

gen_pki() {
	local addr="$1"
	command -v openssl >/dev/null || die "openssl is not installed"
	mkdir -p "$PKI"
	chmod 700 "$PKI"
	if [[ ! -s "$PKI/ca.crt" || ! -s "$PKI/ca.key" ]]; then
		log "creating a CA in $PKI"
		rm -f "$PKI"/*.crt
		openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
			-days 3650 -sha256 -subj "/CN=peerd-k8s-ca" \
			-addext "basicConstraints=critical,CA:TRUE" \
			-addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
	fi
	if [[ ! -s "$PKI/apiserver.crt" ]] ||
		! openssl x509 -in "$PKI/apiserver.crt" -noout -ext subjectAltName 2>/dev/null |
		has -E "IP Address:${addr//./\\.}(,|$)"; then
		local sans="DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
		sans+=",DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$BRIDGE_ADDR,IP:$SERVICE_IP"
		[[ "$addr" == 127.0.0.1 || "$addr" == "$BRIDGE_ADDR" ]] || sans+=",IP:$addr"
		sign_cert apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans"
	fi
	if [[ ! -s "$PKI/admin.crt" ]]; then
		sign_cert admin "/O=system:masters/CN=peerd-admin" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
	fi
	if [[ ! -s "$PKI/sa.key" || ! -s "$PKI/sa.pub" ]]; then
		openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
		openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
	fi
	chmod 600 "$PKI"/*.key
}

b64() { base64 -w0 <"$1"; }

write_kubeconfig() {
	local server="$1"
	cat >"$KUBECONFIG_PATH.tmp" <<EOK
apiVersion: v1
kind: Config
clusters:
- name: peerd
  cluster:
    server: $server
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: peerd-admin
  user:
    client-certificate-data: $(b64 "$PKI/admin.crt")
    client-key-data: $(b64 "$PKI/admin.key")
contexts:
- name: peerd
  context:
    cluster: peerd
    user: peerd-admin
current-context: peerd
EOK
	chmod 600 "$KUBECONFIG_PATH.tmp"
	mv "$KUBECONFIG_PATH.tmp" "$KUBECONFIG_PATH"
}

# pid NAME: the pid of our running NAME (etcd|kube-apiserver), or fail.
pid_of() {
	local name="$1" pid exe
	[[ -s "$RUN/$name.pid" ]] || return 1
	pid="$(cat "$RUN/$name.pid")"
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
	# "(deleted)" when the binary was rebuilt under the running process.
	[[ "${exe% (deleted)}" == "$(realpath -m "$BIN/$name")" ]] || return 1
	echo "$pid"
}

# Processes of our binaries started with our state dir but not in a pidfile
# (e.g. a pidfile lost to a crash). Identified by exact exe and cmdline.
strays() {
	local d exe name want
	for name in etcd kube-apiserver; do
		want="$(realpath -m "$BIN/$name")"
		for d in /proc/[0-9]*; do
			exe="$(readlink "$d/exe" 2>/dev/null)" || continue
			[[ "${exe% (deleted)}" == "$want" ]] || continue
			if tr '\0' ' ' 2>/dev/null <"$d/cmdline" | has -F -- "$STATE/"; then
				echo "${d#/proc/}"
			fi
		done
	done
	return 0
}

stop_pid() {
	local pid="$1" what="$2" i
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 150; i++)); do
		kill -0 "$pid" 2>/dev/null || {
			log "stopped $what (pid $pid)"
			return 0
		}
		sleep 0.2
	done
	log "$what (pid $pid) ignored SIGTERM for 30s; killing"
	kill -KILL "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	log "warning: $what (pid $pid) is still there"
}

stop_one() {
	local name="$1" pid
	if pid="$(pid_of "$name")"; then
		stop_pid "$pid" "$name"
	fi
	rm -f "$RUN/$name.pid"
}

# fresh_log NAME: keep the previous run's log as NAME.log.1; print the path.
fresh_log() {
	[[ ! -f "$LOGS/$1.log" ]] || mv -f "$LOGS/$1.log" "$LOGS/$1.log.1"
	echo "$LOGS/$1.log"
}

port_busy() { # port_busy ADDR PORT
	(exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

etcd_healthy() {
	curl -fsS --max-time 3 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | has '"health":"true"'
}

apiserver_ready() {
	[[ "$(curl -fsS --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" \
		--key "$PKI/admin.key" "https://$1:$PORT/readyz" 2>/dev/null)" == ok ]]
}

kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# A namespace plus its "default" ServiceAccount (normally made by the
# controller-manager, which does not run here; the ServiceAccount admission
# plugin rejects pods in a namespace without it).
ensure_namespace() {
	local ns="$1"
	kc get namespace "$ns" >/dev/null 2>&1 || kc create namespace "$ns" >/dev/null
	kc -n "$ns" get serviceaccount default >/dev/null 2>&1 ||
		kc -n "$ns" create serviceaccount default >/dev/null
}

STARTED=()
UP_DONE=0
up_cleanup() {
	[[ "$UP_DONE" == 1 ]] && return 0
	local name
	for name in "${STARTED[@]}"; do
		log "up failed: stopping $name; last lines of $LOGS/$name.log:"
		tail -n 25 "$LOGS/$name.log" >&2 || true
		stop_one "$name"
	done
}

start_etcd() {
	if pid_of etcd >/dev/null; then
		log "etcd already running (pid $(pid_of etcd))"
	else
		port_busy 127.0.0.1 "$ETCD_PORT" && die "127.0.0.1:$ETCD_PORT is taken by another process"
		log "starting etcd on 127.0.0.1:$ETCD_PORT (data $STATE/etcd)"
		mkdir -p "$STATE/etcd"
		chmod 700 "$STATE/etcd"
		"$BIN/etcd" --name peerd-k8s --data-dir "$STATE/etcd" \
			--listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
			--advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
			--listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
			--initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
			--initial-cluster "peerd-k8s=http://127.0.0.1:$ETCD_PEER_PORT" \
			--initial-cluster-state new --unsafe-no-fsync \
			--log-level warn >"$(fresh_log etcd)" 2>&1 </dev/null &
		echo "$!" >"$RUN/etcd.pid"
		STARTED+=(etcd)
	fi
	local deadline=$((SECONDS + 60))
	until etcd_healthy; do
		pid_of etcd >/dev/null || die "etcd exited (see $LOGS/etcd.log)"
		((SECONDS < deadline)) || die "etcd not healthy after 60s"
		sleep 0.5
	done
}

start_apiserver() {
	local addr="$1" reconciler=lease
	# The "kubernetes" Service's Endpoints may not hold a loopback address.
	[[ "$addr" == 127.* ]] && reconciler=none
	if pid_of kube-apiserver >/dev/null; then
		log "kube-apiserver already running (pid $(pid_of kube-apiserver))"
	else
		port_busy "$addr" "$PORT" && die "$addr:$PORT is taken by another process"
		log "starting kube-apiserver on https://$addr:$PORT"
		local extra=()
		# shellcheck disable=SC2206 # word-splitting is the point
		[[ -z "${PEERD_K8S_APISERVER_ARGS:-}" ]] || extra=($PEERD_K8S_APISERVER_ARGS)
		"$BIN/kube-apiserver" \
			--etcd-servers "http://127.0.0.1:$ETCD_PORT" \
			--bind-address "$addr" --advertise-address "$addr" --secure-port "$PORT" \
			--cert-dir "$STATE/apiserver-certs" \
			--tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
			--client-ca-file "$PKI/ca.crt" \
			--service-account-key-file "$PKI/sa.pub" \
			--service-account-signing-key-file "$PKI/sa.key" \
			--service-account-issuer https://kubernetes.default.svc.cluster.local \
			--authorization-mode RBAC \
			--service-cluster-ip-range "$SERVICE_CIDR" \
			--endpoint-reconciler-type "$reconciler" \
			--allow-privileged=true \
			--profiling=false \
			"${extra[@]}" >"$(fresh_log kube-apiserver)" 2>&1 </dev/null &
		echo "$!" >"$RUN/kube-apiserver.pid"
		echo "$addr" >"$RUN/kube-apiserver.addr"
		STARTED+=(kube-apiserver)
	fi
	local deadline=$((SECONDS + READY_TIMEOUT))
	until apiserver_ready "$addr"; do
		pid_of kube-apiserver >/dev/null || die "kube-apiserver exited (see $LOGS/kube-apiserver.log)"
		((SECONDS < deadline)) || die "kube-apiserver not ready after ${READY_TIMEOUT}s"
		sleep 1
	done
}

cmd_up() {
	[[ -x "$BIN/kube-apiserver" && -x "$BIN/etcd" && -x "$BIN/kubectl" ]] || cmd_install
	local addr
	if pid_of kube-apiserver >/dev/null; then
		addr="$(running_addr)"
	else
		addr="$(apiserver_addr)"
	fi
	mkdir -p "$STATE" "$RUN" "$LOGS"
	chmod 700 "$STATE"
	trap up_cleanup EXIT
	trap 'exit 130' INT TERM
	gen_pki "$addr"
	write_kubeconfig "https://$addr:$PORT"
	local t0=$SECONDS
	start_etcd
	start_apiserver "$addr"
	# The system namespaces appear shortly after /readyz; give them their
	# "default" ServiceAccount like the controller-manager would.
	local ns deadline=$((SECONDS + 30))
	for ns in default kube-system kube-public; do
		until kc get namespace "$ns" >/dev/null 2>&1; do
			((SECONDS < deadline)) || die "namespace $ns did not appear"
			sleep 0.5
		done
		ensure_namespace "$ns"
	done
	UP_DONE=1
	trap - EXIT INT TERM
	log "control plane ready in $((SECONDS - t0))s"
	echo "kubeconfig $KUBECONFIG_PATH"
	echo "server https://$addr:$PORT"
}

cmd_down() {
	stop_one kube-apiserver
	stop_one etcd
	local pid
	for pid in $(strays); do
		stop_pid "$pid" "stray $(readlink "/proc/$pid/exe" 2>/dev/null || echo process)"
	done
	rm -f "$RUN"/*.pid "$RUN"/*.addr 2>/dev/null || true
}

cmd_status() {
	local name pid rc=0 addr
	addr="$(running_addr)"
	for name in etcd kube-apiserver; do
		if pid="$(pid_of "$name")"; then
			echo "$name running (pid $pid)"
		else
			echo "$name stopped"
			rc=1
		fi
	done
	if [[ -s "$PKI/admin.crt" ]] && apiserver_ready "$addr"; then
		echo "readyz ok https://$addr:$PORT"
		echo "kubeconfig $KUBECONFIG_PATH"
	else
		echo "readyz unreachable https://$addr:$PORT"
		rc=1
	fi
	return "$rc"
}

cmd_env() {
	echo "export KUBECONFIG=$KUBECONFIG_PATH"
	echo "export PATH=$BIN:\$PATH"
	echo "export PEERD_K8S_SERVER=https://$(running_addr):$PORT"
	echo "export PEERD_K8S_CA=$PKI/ca.crt"
}

cmd_reset() {
	cmd_down
	[[ "$STATE" == /* && "$STATE" != / ]] || die "refusing to remove '$STATE'"
	rm -rf "$STATE"
	log "removed $STATE"
}

namespace_cmd() {
	[[ -n "${1:-}" ]] || die "usage: $0 namespace NAME"
	[[ -s "$KUBECONFIG_PATH" ]] || die "not up (no $KUBECONFIG_PATH)"
	ensure_namespace "$1"
	echo "namespace $1"
}

# --------------------------------------------------------------- selftest --

ST_PASS=0
ST_FAIL=0
ST_NS="peerd-selftest-$(date +%s)"
ST_ADDR=""
ST_TMP=""

# check NAME FUNCTION: run FUNCTION under `set -e` in a subshell (not in an
# `if`, where bash would ignore -e), and print PASS/FAIL.
check() {
	local name="$1" rc
	shift
	set +e
	(
		set -e
		"$@"
	) >"$ST_TMP/out" 2>&1
	rc=$?
	set -e
	if [[ "$rc" == 0 ]]; then
		ST_PASS=$((ST_PASS + 1))
		printf 'PASS %s%s\n' "$name" "$(tail -n 1 "$ST_TMP/out" | sed 's/^./: &/')"
	else
		ST_FAIL=$((ST_FAIL + 1))
		printf 'FAIL %s (exit %s)\n' "$name" "$rc"
		tail -n 15 "$ST_TMP/out" | sed 's/^/    /'
	fi
}

kcurl() {
	curl -sS --max-time 15 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$@"
}

st_up() {
	cmd_up
}

st_version() {
	local v
	v="$(kcurl "https://$ST_ADDR:$PORT/version")"
	has -F "\"gitVersion\": \"$K8S_VERSION\"" <<<"$v"
	kc version | tail -n 1
}

st_helm_version() { "$BIN/helm" version; }

st_namespace() {
	ensure_namespace "$ST_NS"
	kc get namespace "$ST_NS" -o jsonpath='{.status.phase}' | has -x Active
	kc -n "$ST_NS" get serviceaccount default -o name
}

st_pod() {
	kc -n "$ST_NS" apply -f - <<'EOY'
apiVersion: v1
kind: Pod
metadata:
  name: selftest-pod
  labels: {app: peerd-selftest}
spec:
  containers:
  - name: main
    image: registry.k8s.io/pause:3.10
EOY
	local phase sa
	phase="$(kc -n "$ST_NS" get pod selftest-pod -o jsonpath='{.status.phase}')"
	sa="$(kc -n "$ST_NS" get pod selftest-pod -o jsonpath='{.spec.serviceAccountName}')"
	[[ "$phase" == Pending && "$sa" == default ]]
	echo "pod phase=$phase serviceAccountName=$sa"
}

st_event() {
	local uid now
	uid="$(kc -n "$ST_NS" get pod selftest-pod -o jsonpath='{.metadata.uid}')"
	now="$(date -u +%Y-%m-%dT%H:%M:%S.000000Z)"
	kc -n "$ST_NS" create -f - <<EOY
apiVersion: events.k8s.io/v1
kind: Event
metadata:
  name: selftest-pod.peerd
eventTime: "$now"
type: Normal
reason: PeerdSelftest
action: Pulled
note: layer served by a peer
reportingController: peerd.test/selftest
reportingInstance: selftest-1
regarding:
  apiVersion: v1
  kind: Pod
  name: selftest-pod
  namespace: $ST_NS
  uid: $uid
EOY
	kc -n "$ST_NS" get events.v1.events.k8s.io selftest-pod.peerd -o jsonpath='{.note}' |
		has -x 'layer served by a peer'
	# The same object through core/v1, as `kubectl describe pod` finds it.
	local reason
	reason="$(kc get --raw \
		"/api/v1/namespaces/$ST_NS/events?fieldSelector=involvedObject.name%3Dselftest-pod")"
	has '"reason": *"PeerdSelftest"' <<<"$reason"
	reason=PeerdSelftest
	echo "event read back via events.k8s.io/v1 and core/v1 (reason=$reason)"
}

st_rbac() {
	local token code i
	token="$(kc -n "$ST_NS" create token default --duration 10m)"
	code="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 15 --cacert "$PKI/ca.crt" \
		-H "Authorization: Bearer $token" "https://$ST_ADDR:$PORT/api/v1/namespaces/$ST_NS/pods")"
	[[ "$code" == 403 ]] || {
		echo "unbound ServiceAccount got HTTP $code, want 403"
		return 1
	}
	# Not the "view" ClusterRole: it is an aggregated role whose rules the
	# controller-manager fills in, and there is no controller-manager here.
	kc -n "$ST_NS" create role pod-reader --verb get,list,watch --resource pods
	kc -n "$ST_NS" create rolebinding pod-reader --role pod-reader --serviceaccount "$ST_NS:default"
	for ((i = 0; i < 40; i++)); do
		code="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 15 --cacert "$PKI/ca.crt" \
			-H "Authorization: Bearer $token" "https://$ST_ADDR:$PORT/api/v1/namespaces/$ST_NS/pods")"
		[[ "$code" == 200 ]] && break
		sleep 0.5
	done
	[[ "$code" == 200 ]]
	echo "ServiceAccount token: 403 before RoleBinding, 200 after"
}

st_make_chart() {
	mkdir -p "$ST_TMP/chart/templates"
	cat >"$ST_TMP/chart/Chart.yaml" <<'EOY'
apiVersion: v2
name: peerd-selftest
version: 0.1.0
EOY
	echo 'message: hello' >"$ST_TMP/chart/values.yaml"
	cat >"$ST_TMP/chart/templates/configmap.yaml" <<'EOY'
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-config
data:
  message: {{ .Values.message | quote }}
  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}
EOY
	cat >"$ST_TMP/chart/templates/service.yaml" <<'EOY'
apiVersion: v1
kind: Service
metadata:
  name: {{ .Release.Name }}-svc
spec:
  selector: {app: peerd-selftest}
  ports:
  - port: 5000
    targetPort: 5000
EOY
}

st_helm_template_ssa() {
	st_make_chart
	"$BIN/helm" template tmpl "$ST_TMP/chart" --namespace "$ST_NS" --set message=from-template \
		>"$ST_TMP/rendered.yaml"
	kc -n "$ST_NS" apply --server-side --field-manager helm-selftest -f "$ST_TMP/rendered.yaml"
	local msg ip mgr
	msg="$(kc -n "$ST_NS" get configmap tmpl-config -o jsonpath='{.data.message}')"
	mgr="$(kc -n "$ST_NS" get configmap tmpl-config --show-managed-fields \
		-o jsonpath='{.metadata.managedFields[0].manager}/{.metadata.managedFields[0].operation}')"
	ip="$(kc -n "$ST_NS" get service tmpl-svc -o jsonpath='{.spec.clusterIP}')"
	[[ "$msg" == from-template && "$mgr" == helm-selftest/Apply && "$ip" == 10.96.0.* ]]
	echo "configmap message=$msg managedFields=$mgr service clusterIP=$ip"
}

st_curl_ssa() {
	local out
	out="$(kcurl -X PATCH -H 'Content-Type: application/apply-patch+yaml' \
		--data-binary @- \
		"https://$ST_ADDR:$PORT/api/v1/namespaces/$ST_NS/configmaps/curl-ssa?fieldManager=test" <<'EOY'
apiVersion: v1
kind: ConfigMap
metadata:
  name: curl-ssa
data:
  key: value
EOY
	)"
	has '"manager": *"test"' <<<"$out"
	has '"operation": *"Apply"' <<<"$out"
	[[ "$(kc -n "$ST_NS" get configmap curl-ssa -o jsonpath='{.data.key}')" == value ]]
	echo "curl apply-patch+yaml created configmap curl-ssa (fieldManager=test)"
}

st_helm_install() {
	"$BIN/helm" --kubeconfig "$KUBECONFIG_PATH" install inst "$ST_TMP/chart" \
		--namespace "$ST_NS" --set message=from-install
	"$BIN/helm" --kubeconfig "$KUBECONFIG_PATH" status inst --namespace "$ST_NS" -o json |
		has '"status": *"deployed"'
	local status=deployed
	[[ "$(kc -n "$ST_NS" get configmap inst-config -o jsonpath='{.data.message}')" == from-install ]]
	echo "helm install: release inst $status"
}

st_down() {
	cmd_down
	local name
	for name in etcd kube-apiserver; do
		if pid_of "$name" >/dev/null; then return 1; fi
	done
	[[ -z "$(strays)" ]]
	if port_busy "$ST_ADDR" "$PORT" || port_busy 127.0.0.1 "$ETCD_PORT"; then return 1; fi
	echo "no etcd/kube-apiserver left, ports $PORT and $ETCD_PORT closed"
}

st_cleanup() {
	cmd_down >/dev/null 2>&1 || true
	[[ -z "$ST_TMP" ]] || rm -rf "$ST_TMP"
}

cmd_selftest() {
	ST_TMP="$(mktemp -d /tmp/peerd-k8s-selftest.XXXXXX)"
	trap st_cleanup EXIT
	trap 'exit 130' INT TERM
	# The selftest owns the control plane's whole life: do not take over (and
	# then stop) one that tests are using.
	if pid_of etcd >/dev/null || pid_of kube-apiserver >/dev/null; then
		trap - EXIT
		rm -rf "$ST_TMP"
		die "the control plane is up; run '$0 down' before the selftest"
	fi
	cmd_install >/dev/null
	check "up" st_up
	ST_ADDR="$(running_addr)" # check runs st_up in a subshell
	if [[ "$ST_FAIL" == 0 ]]; then
		check "version $K8S_VERSION" st_version
		check "helm version" st_helm_version
		check "namespace + default ServiceAccount" st_namespace
		check "pod object (Pending)" st_pod
		check "events.k8s.io/v1 Event read back" st_event
		check "RBAC + ServiceAccount token" st_rbac
		check "helm template | kubectl apply --server-side" st_helm_template_ssa
		check "curl server-side apply (apply-patch+yaml)" st_curl_ssa
		check "helm install" st_helm_install
	fi
	ST_ADDR="${ST_ADDR:-$(running_addr)}"
	check "down leaves no process" st_down
	echo "selftest: $ST_PASS passed, $ST_FAIL failed"
	[[ "$ST_FAIL" == 0 ]]
}

case "${1:-}" in
install) cmd_install ;;
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
namespace) namespace_cmd "${2:-}" ;;
env) cmd_env ;;
selftest) cmd_selftest ;;
reset) cmd_reset ;;
*) die "usage: $0 install|up|down|status|namespace NAME|env|selftest|reset" ;;
esac
