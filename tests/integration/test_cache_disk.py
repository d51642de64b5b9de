"""A node whose pull-through cache has no room: the pull must still succeed, byte for byte, and
peerd must not start a download it cannot keep (it answers 404, containerd goes to the registry).

The full disk is real: node 3's data directory is a small tmpfs for the length of the test."""

import re
import shutil
import subprocess

from conftest import LAB_DIR, metrics

NODE = 3


def _registry_bytes_sent(lab, digest) -> list:
    """Bytes the registry sent in each 200 answer to a GET of `digest`, in log order (combined
    log format: `"GET /v2/<name>/blobs/<digest> HTTP/1.1" 200 <bytes>`)."""
    pat = re.compile(r'"GET /v2/\S+/blobs/' + re.escape(digest) + r'(\?\S*)? HTTP/[\d.]+" 200 (\d+)')
    return [int(m.group(2)) for m in pat.finditer(lab.registry_access_log())]
# peerd keeps 512 MiB free beyond a blob; 600 MiB of tmpfs leaves room for blobs under ~88 MiB only.
TMPFS_MIB = 600


def test_a_blob_that_does_not_fit_the_cache_goes_to_the_registry_directly(lab):
    img = lab.push_random("fulldisk", layers=1, size_mib=128)
    data = LAB_DIR / f"node{NODE}" / "peerd"
    saved = LAB_DIR / f"node{NODE}" / "peerd-identity.saved"
    for other in (1, 2):
        lab.stop_peerd(other)  # node 3 alone: it is the home of every blob
    lab.stop_peerd(NODE)
    shutil.copy(data / "identity.key", saved)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs", str(data)], check=True)
    try:
        shutil.copy(saved, data / "identity.key")
        lab.start_peerd(NODE, wait_mesh=False)
        before = metrics(NODE)
        big = max(img.blobs, key=lambda d: lab.registry_blob_file(d).stat().st_size)
        size = lab.registry_blob_file(big).stat().st_size
        answers_before = len(_registry_bytes_sent(lab, big))

        lab.pull(NODE, img)
        lab.check(NODE, img)

        after = metrics(NODE)
        fetched = after.get("peerd_bytes_fetched_total", **{"from": "upstream"}) - before.get(
            "peerd_bytes_fetched_total", **{"from": "upstream"}
        )
        sent = _registry_bytes_sent(lab, big)[answers_before:]
        # The layer did not fit: peerd asked, read the size from the response head and let go of
        # it; containerd then downloaded it whole, once.
        assert sent.count(size) == 1, f"registry responses for the 128 MiB layer (bytes sent each): {sent}"
        assert sum(sent) < size + (32 << 20), f"the registry sent {sum(sent)} bytes of a {size}-byte layer: {sent}"
        assert fetched < 1 << 20, f"peerd fetched {fetched:.0f} bytes upstream into a cache with no room"
        assert "do not fit the cache" in lab.log(NODE), "peerd did not say why it refused the pull-through"
        assert not list((data / "cache" / "sha256").glob("*.partial")), "a partial download was left behind"
    finally:
        lab.stop_peerd(NODE)
        subprocess.run(["umount", str(data)], check=False)
        lab.rmi(NODE, img)
        lab.restore()
