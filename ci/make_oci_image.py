#!/usr/bin/env python3
"""Build OCI image layouts for the peerd test lab (stdlib only).

Two producers:

  random   N layers of random bytes, each layer an uncompressed tar
           (application/vnd.oci.image.layer.v1.tar) holding one file.
  tar      one layer made from an existing root filesystem tarball
           (.tar or .tar.gz); with --gzip the layer is stored gzip-compressed
           (application/vnd.oci.image.layer.v1.tar+gzip) and its diff_id is
           the sha256 of the uncompressed tar.

The result is an OCI image layout (oci-layout, index.json, blobs/sha256/...)
that `skopeo copy oci:DIR:REF docker://...` can push.  Everything is streamed:
a 1 GiB layer needs a few MiB of memory.

Output on stdout, one line each:
    layer sha256:<hex>        (one per layer, bottom first)
    config sha256:<hex>
    manifest sha256:<hex>
    index sha256:<hex>        (only with --index)

Options may also come from the environment: SEED, NO_MEDIATYPE=1, INDEX=1.

As a library: build_random_image(...) and build_tar_image(...) return a dict
with the digests (see ImageResult).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"

CHUNK = 1 << 20
MIB = 1 << 20
FIXED_CREATED = "2024-01-01T00:00:00Z"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


class HashingWriter(io.RawIOBase):
    """File-like sink that hashes and counts everything written to it."""

    def __init__(self, fileobj):
        super().__init__()
        self._f = fileobj
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self):
        return True

    def write(self, b):
        mv = memoryview(b)
        self._f.write(mv)
        self.sha.update(mv)
        self.size += len(mv)
        return len(mv)

    def digest(self):
        return "sha256:" + self.sha.hexdigest()


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.blobs = os.path.join(self.path, "blobs", "sha256")

    def reset(self):
        if os.path.isdir(self.path):
            shutil.rmtree(self.path)
        os.makedirs(self.blobs)
        with open(os.path.join(self.path, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def temp(self):
        fd, name = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        return os.fdopen(fd, "wb", buffering=CHUNK), name

    def commit(self, tmpname, digest):
        os.chmod(tmpname, 0o644)
        os.replace(tmpname, os.path.join(self.blobs, digest.split(":", 1)[1]))

    def put_bytes(self, data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, digest.split(":", 1)[1]), "wb") as f:
            f.write(data)
        return digest, len(data)

    def write_index_json(self, desc, ref):
        desc = dict(desc)
        if ref:
            desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [desc]}
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump(index, f, indent=2)


def canonical(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


def _write_random_layer(layout, rng, size, name, mtime):
    f, tmp = layout.temp()
    try:
        hw = HashingWriter(f)
        ti = tarfile.TarInfo(name)
        ti.size = size
        ti.mode = 0o644
        ti.mtime = mtime
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        # Written by hand (header, data, padding, end blocks) so the data is
        # streamed in 1 MiB chunks: the same bytes tarfile itself would write.
        hw.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        left = size
        while left > 0:
            n = min(CHUNK, left)
            hw.write(rng.randbytes(n))
            left -= n
        if size % tarfile.BLOCKSIZE:
            hw.write(b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))
        hw.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        if hw.size % tarfile.RECORDSIZE:
            hw.write(b"\0" * (tarfile.RECORDSIZE - hw.size % tarfile.RECORDSIZE))
        f.close()
        digest = hw.digest()
        layout.commit(tmp, digest)
        # Uncompressed layer: diff_id == digest.
        return {"mediaType": MT_LAYER_TAR, "digest": digest, "size": hw.size}, digest
    except BaseException:
        f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finish(layout, layers, diff_ids, ref, cfg_extra, created, no_mediatype, index,
            history_cmd):
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": cfg_extra,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": history_cmd}
                    for _ in layers],
    }
    cfg_digest, cfg_size = layout.put_bytes(canonical(config))
    manifest = {"schemaVersion": 2}
    if not no_mediatype:
        manifest["mediaType"] = MT_MANIFEST
    manifest["config"] = {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": cfg_size}
    manifest["layers"] = layers
    man_digest, man_size = layout.put_bytes(canonical(manifest))
    man_desc = {"mediaType": MT_MANIFEST, "digest": man_digest, "size": man_size}
    result = {
        "layers": [l["digest"] for l in layers],
        "layer_sizes": [l["size"] for l in layers],
        "diff_ids": diff_ids,
        "config": cfg_digest,
        "manifest": man_digest,
        "index": None,
        "layout": layout.path,
        "ref": ref,
    }
    if index:
        idx = {"schemaVersion": 2}
        if not no_mediatype:
            idx["mediaType"] = MT_INDEX
        d = dict(man_desc)
        d["platform"] = {"architecture": "amd64", "os": "linux"}
        idx["manifests"] = [d]
        idx_digest, idx_size = layout.put_bytes(canonical(idx))
        result["index"] = idx_digest
        layout.write_index_json({"mediaType": MT_INDEX, "digest": idx_digest,
                                 "size": idx_size}, ref)
    else:
        layout.write_index_json(man_desc, ref)
    return result


def build_random_image(out, ref="latest", layers=1, size_bytes=MIB, seed=None,
                       no_mediatype=False, index=False):
    """Write an image of `layers` random layers totalling `size_bytes`."""
    if layers < 1:
        raise ValueError("need at least one layer")
    layout = Layout(out)
    layout.reset()
    if seed is None or seed == "":
        rng = random.Random(int.from_bytes(os.urandom(32), "big"))
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        mtime = int(time.time())
    else:
        rng = random.Random("peerd-lab:" + str(seed))
        created = FIXED_CREATED
        mtime = 1704067200
    per = size_bytes // layers
    descs, diff_ids = [], []
    for i in range(layers):
        size = per if i < layers - 1 else size_bytes - per * (layers - 1)
        desc, diff_id = _write_random_layer(layout, rng, size,
                                            "random/layer-%d.bin" % i, mtime)
        descs.append(desc)
        diff_ids.append(diff_id)
    cfg = {"Env": list(DEFAULT_ENV), "Cmd": ["/bin/sh"]}
    return _finish(layout, descs, diff_ids, ref, cfg, created, no_mediatype, index,
                   "peerd-lab random layer")


def _is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def build_tar_image(out, tar_path, ref="latest", gzip_layer=True, cmd=None,
                    no_mediatype=False, index=False):
    """Write a one-layer image from a root filesystem tarball (.tar or .tar.gz).

    With gzip_layer, a .tar.gz input is used byte-for-byte as the layer blob (so
    the layer digest is stable across runs) and a plain .tar is compressed.
    """
    layout = Layout(out)
    layout.reset()
    src_gz = _is_gzip(tar_path)
    f, tmp = layout.temp()
    try:
        blob_hw = HashingWriter(f)
        diff_sha = hashlib.sha256()
        if gzip_layer and src_gz:
            with open(tar_path, "rb") as src:
                while True:
                    b = src.read(CHUNK)
                    if not b:
                        break
                    blob_hw.write(b)
            with gzip.open(tar_path, "rb") as src:
                while True:
                    b = src.read(CHUNK)
                    if not b:
                        break
                    diff_sha.update(b)
        else:
            opener = gzip.open if src_gz else open
            if gzip_layer:
                sink = gzip.GzipFile(fileobj=blob_hw, mode="wb", mtime=0,
                                     compresslevel=6)
            else:
                sink = blob_hw
            with opener(tar_path, "rb") as src:
                while True:
                    b = src.read(CHUNK)
                    if not b:
                        break
                    diff_sha.update(b)
                    sink.write(b)
            if gzip_layer:
                sink.close()
        f.close()
        digest = blob_hw.digest()
        layout.commit(tmp, digest)
    except BaseException:
        f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    diff_id = "sha256:" + diff_sha.hexdigest()
    desc = {"mediaType": MT_LAYER_TGZ if gzip_layer else MT_LAYER_TAR,
            "digest": digest, "size": blob_hw.size}
    cfg = {"Env": list(DEFAULT_ENV), "Cmd": list(cmd or ["/bin/bash"])}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                            time.gmtime(int(os.path.getmtime(tar_path))))
    return _finish(layout, [desc], [diff_id], ref, cfg, created, no_mediatype, index,
                   "peerd-lab rootfs " + os.path.basename(tar_path))


def print_result(res, out=sys.stdout):
    for d in res["layers"]:
        print("layer", d, file=out)
    print("config", res["config"], file=out)
    print("manifest", res["manifest"], file=out)
    if res["index"]:
        print("index", res["index"], file=out)
    out.flush()


def _env_flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--out", required=True, help="OCI layout directory (recreated)")
        sp.add_argument("--ref", default="latest", help="ref name inside the layout")
        sp.add_argument("--no-mediatype", action="store_true",
                        default=_env_flag("NO_MEDIATYPE"),
                        help="omit the optional top-level mediaType field")
        sp.add_argument("--index", action="store_true", default=_env_flag("INDEX"),
                        help="wrap the manifest in an OCI image index (linux/amd64)")

    r = sub.add_parser("random", help="random-bytes layers")
    common(r)
    r.add_argument("--layers", type=int, required=True)
    r.add_argument("--size-mib", type=float, required=True,
                   help="total random bytes over all layers, in MiB")
    r.add_argument("--seed", default=os.environ.get("SEED"),
                   help="deterministic content (default: fresh randomness)")

    t = sub.add_parser("tar", help="one layer from a rootfs tarball")
    common(t)
    t.add_argument("--tar", required=True, help=".tar or .tar.gz root filesystem")
    t.add_argument("--no-gzip", action="store_true", help="store the layer uncompressed")
    t.add_argument("--cmd", default='["/bin/bash"]', help="config Cmd as JSON list")

    a = p.parse_args(argv)
    if a.cmd == "random":
        res = build_random_image(a.out, a.ref, a.layers, int(a.size_mib * MIB), a.seed,
                                 a.no_mediatype, a.index)
    else:
        res = build_tar_image(a.out, a.tar, a.ref, not a.no_gzip, json.loads(a.cmd),
                              a.no_mediatype, a.index)
    print_result(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
