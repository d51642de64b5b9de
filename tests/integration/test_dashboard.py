"""The live dashboard (`/dashboard` on the metrics port) in a real browser: headless Chromium
renders a lab node's page before and after that node pulls an image through its peers, and the
numbers a person watches must move. A screenshot is kept as an artefact."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from conftest import METRICS_PORT, node_ip

ARTIFACTS = Path("/tmp/peerd-itest-artifacts")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed (ci/install-deps.sh installs it)"
    return exe


def _render(url: str, *extra: str) -> str:
    """Loads the page, lets its script poll the metrics a few times, returns the DOM."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=4500", *extra, url],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _card(dom: str, ident: str) -> str:
    m = re.search(rf'id="{ident}">([^<]*)<', dom)
    assert m, f"card {ident} missing from the rendered page"
    return m.group(1)


def _mib(text: str) -> float:
    m = re.match(r"([0-9.]+) MiB", text)
    assert m, f"not a MiB value: {text!r}"
    return float(m.group(1))


def test_dashboard_shows_a_pull_from_peers(lab):
    img = lab.push_random("dashboard", layers=2, size_mib=32)
    lab.seed(1, img)  # node 1 alone holds it: node 2 pulls all of it from a peer
    url = f"http://{node_ip(2)}:{METRICS_PORT}/dashboard"

    before = _render(url, "--dump-dom")
    peers_before = _mib(_card(before, "peer"))
    assert _card(before, "peers") not in ("–", "0"), "the page does not show node 2's peers"
    # One row per shard, filled from the per-shard metrics.
    assert len(re.findall(r"<tr><td>\d+</td>", before)) >= 1, "no per-core rows on the page"

    lab.pull(2, img)
    after = _render(url, "--dump-dom")
    peers_after = _mib(_card(after, "peer"))
    assert peers_after - peers_before >= 32 * 0.99, (peers_before, peers_after)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    _render(url, f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot was written"
