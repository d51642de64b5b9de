#!/usr/bin/env bash
# Builds peerd's container image without Docker: the release binary and exactly the shared
# libraries it loads, as an OCI image layout and an OCI archive that `ctr images import` takes.
#
#   ci/build-image.sh [OUT_DIR]      default: $CARGO_TARGET_DIR/image
# Prints: `layout DIR`, `archive FILE`, `ref NAME`, and the image's digests.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/peerd/target}
out=${1:-$CARGO_TARGET_DIR/image}
version=$(awk -F'"' '/^version/ { print $2; exit }' "$repo/Cargo.toml")
ref=${IMAGE_REF:-localhost/peerd:$version}

(cd "$repo" && PEERD_GIT_REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown) cargo build --release --quiet)
bin=$CARGO_TARGET_DIR/release/peerd

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -D -m 0755 "$bin" "$root/peerd"
# The dynamic loader and every library the binary needs, at the paths it looks for them.
ldd "$bin" | awk '/=> \// { print $3 } /^[[:space:]]*\/.*ld-linux/ { print $1 }' | sort -u | while read -r lib; do
    install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
mkdir -p "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"
echo 'root:x:0:0:root:/:/peerd' >"$root/etc/passwd"
tar --sort=name --mtime='2026-01-01 00:00Z' --owner=0 --group=0 --numeric-owner -C "$root" -cf "$root.tar" .
mkdir -p "$out"
python3 "$here/make_oci_image.py" tar --out "$out/layout" --ref "$ref" --tar "$root.tar" --cmd '["/peerd","run"]'
rm -f "$root.tar"
tar -C "$out/layout" -cf "$out/peerd-oci.tar" .
echo "layout $out/layout"
echo "archive $out/peerd-oci.tar"
echo "ref $ref"
