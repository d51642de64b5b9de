#!/usr/bin/env python3
"""Walk an image in a containerd content store and verify it byte for byte.

    oci_content.py verify CONTENT_DIR DIGEST [--platform linux/amd64]
    oci_content.py list   CONTENT_DIR DIGEST [--platform linux/amd64]

CONTENT_DIR is containerd's io.containerd.content.v1.content directory (blobs
live at CONTENT_DIR/blobs/sha256/<hex>).  DIGEST is the image's target digest
(a manifest or an index).  Children of an index are required when their
platform matches (or has none); others are checked only if present.

verify: re-hashes every required blob and compares size and digest with its
descriptor; prints `verify-ok blobs=N bytes=M` and exits 0, or prints one
`missing`/`bad` line per problem and exits 1.
list:   prints the digests the image references that are present locally,
one per line (used by `lab.sh rmi`).
"""

import argparse
import hashlib
import json
import os
import sys

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}


def blob_path(content_dir, digest):
    algo, hexd = digest.split(":", 1)
    return os.path.join(content_dir, "blobs", algo, hexd)


def hash_file(path):
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
    return "sha256:" + h.hexdigest(), n


def guess_type(doc):
    mt = doc.get("mediaType")
    if mt:
        return mt
    if "manifests" in doc:
        return "application/vnd.oci.image.index.v1+json"
    if "config" in doc and "layers" in doc:
        return "application/vnd.oci.image.manifest.v1+json"
    return ""


def platform_matches(desc, want):
    p = desc.get("platform")
    if not p:
        return True
    os_, _, arch = want.partition("/")
    return p.get("os") == os_ and p.get("architecture") == arch


def walk(content_dir, root, platform, check_hash):
    """Yield (kind, digest, message) for each referenced blob.

    kind: ok | missing | bad | skipped (optional and absent)."""
    todo = [(root, None, True)]  # (descriptor-ish, media type hint, required)
    seen = set()
    while todo:
        desc, hint, required = todo.pop(0)
        if isinstance(desc, str):
            desc = {"digest": desc}
        digest = desc["digest"]
        if digest in seen:
            continue
        seen.add(digest)
        path = blob_path(content_dir, digest)
        if not os.path.exists(path):
            yield ("missing" if required else "skipped", digest, path)
            continue
        if check_hash:
            got, size = hash_file(path)
            if got != digest:
                yield ("bad", digest, "content hashes to %s" % got)
                continue
            if "size" in desc and desc["size"] != size:
                yield ("bad", digest, "size %d, descriptor says %d" % (size, desc["size"]))
                continue
        else:
            size = os.path.getsize(path)
        yield ("ok", digest, size)
        mt = desc.get("mediaType") or hint
        if mt in INDEX_TYPES or mt in MANIFEST_TYPES or mt is None:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                if mt is None:
                    continue
                yield ("bad", digest, "not JSON")
                continue
            mt = guess_type(doc) if mt is None else mt
            if mt in INDEX_TYPES:
                for child in doc.get("manifests", []):
                    req = platform_matches(child, platform)
                    todo.append((child, child.get("mediaType") or "application/"
                                 "vnd.oci.image.manifest.v1+json", req))
            elif mt in MANIFEST_TYPES:
                todo.append((doc["config"], "config", True))
                for layer in doc.get("layers", []):
                    todo.append((layer, "layer", True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["verify", "list"])
    p.add_argument("content_dir")
    p.add_argument("digest")
    p.add_argument("--platform", default="linux/amd64")
    a = p.parse_args(argv)
    if a.action == "list":
        for kind, digest, _ in walk(a.content_dir, a.digest, a.platform, False):
            if kind == "ok":
                print(digest)
        return 0
    problems = 0
    blobs = 0
    total = 0
    for kind, digest, info in walk(a.content_dir, a.digest, a.platform, True):
        if kind == "ok":
            blobs += 1
            total += info
        elif kind in ("missing", "bad"):
            problems += 1
            print(kind, digest, info)
    if problems:
        print("verify-failed problems=%d" % problems)
        return 1
    print("verify-ok blobs=%d bytes=%d" % (blobs, total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
