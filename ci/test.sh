#!/usr/bin/env bash
# The test command: unit tests, lints, then the integration suite on the real lab (containerd,
# registry, peers) once with io_uring and once with the epoll fallback.
#
#   ci/test.sh               everything
#   ci/test.sh unit          unit tests and lints only
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"
bash "$here/install-deps.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/peerd/target}

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --release --all-targets --quiet -- -D warnings
echo "== unit tests"
cargo test --release --quiet
[[ ${1:-all} == unit ]] && exit 0

echo "== building peerd"
cargo build --release --quiet
status=0
for engine in io-uring epoll; do
    echo "== integration tests, engine $engine"
    PEERD_IO_ENGINE=$engine python3 -m pytest tests/integration -q -p no:cacheprovider || status=1
done
echo "== Kubernetes: control plane (kube-apiserver, etcd, helm built from the Go module proxy; cached)"
bash "$here/k8s/control-plane.sh" install
echo "== Kubernetes tests"
python3 -m pytest tests/k8s -q -p no:cacheprovider || status=1
exit $status
