#!/usr/bin/env bash
# Installs everything peerd's build, demo, tests and benchmarks need, from Debian's packages.
# Idempotent, and quick when all is present.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have containerd || need+=(containerd)
have runc || need+=(runc)
have docker-registry || need+=(docker-registry)
have skopeo || need+=(skopeo)
have nginx || need+=(nginx-light)
have protoc || need+=(protobuf-compiler)
have ip || need+=(iproute2)
have tc || need+=(iproute2)
have debootstrap || need+=(debootstrap)
have jq || need+=(jq)
have curl || need+=(curl)
have bc || need+=(bc)
have wrk || need+=(wrk)
have flock || need+=(util-linux)
have python3 || need+=(python3)
have chromium || need+=(chromium)
have shellcheck || need+=(shellcheck)
have openssl || need+=(openssl)
have prometheus || need+=(prometheus)
# The lab's token server (ci/token_server.py) signs JWTs with it; the lab runs Debian's python.
py=python3
[[ -x /usr/bin/python3 ]] && py=/usr/bin/python3
"$py" -c 'import cryptography' >/dev/null 2>&1 || need+=(python3-cryptography)
if [[ ${#need[@]} -gt 0 ]]; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! python3 -m pytest --version >/dev/null 2>&1; then
    python3 -m pip install --quiet pytest || {
        apt-get install -y -qq python3-pytest >/dev/null
    }
fi
if ! have cargo; then
    echo "cargo is missing: install Rust (rustup) first" >&2
    exit 1
fi
