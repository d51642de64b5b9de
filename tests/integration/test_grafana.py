"""The Grafana dashboard against a real Prometheus (Debian's) that scraped the lab while images
were pulled through peers: every query of every panel must return data."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from conftest import METRICS_PORT, NODES, REPO_ROOT, node_ip, wait_for

DASHBOARD = REPO_ROOT / "k8s" / "peerd-grafana" / "dashboard.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _panel_queries():
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$__rate_interval", "20s")
                .replace("$__range", "10m")
                .replace('"$instance"', '".*"')
            )
            yield panel["title"], expr


def test_every_panel_query_returns_data(lab):
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed (ci/install-deps.sh installs it)"
    port = _free_port()
    with tempfile.TemporaryDirectory() as work:
        cfg = Path(work) / "prometheus.yml"
        targets = [f"{node_ip(i)}:{METRICS_PORT}" for i in range(1, NODES + 1)]
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: peerd\n    metrics_path: /metrics/prometheus\n"
            f"    static_configs:\n      - targets: {json.dumps(targets)}\n"
        )
        proc = subprocess.Popen(
            [prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={work}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(Path(work) / "prometheus.log", "w"),
        )
        try:
            wait_for(lambda: len(_query(port, "up == 1")) == NODES, 30, "prometheus scraping every node")
            img = lab.push_random("grafana", layers=2, size_mib=24)
            lab.pull_and_advertise(1, img)
            lab.pull(2, img)
            lab.pull(3, img)
            # A few scrapes after the pulls so that rates and increases have two samples.
            time.sleep(4)
            empty = [(title, expr) for title, expr in _panel_queries() if not _query(port, expr)]
            assert not empty, "panels whose query returned no data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
