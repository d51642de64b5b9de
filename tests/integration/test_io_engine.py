"""The data plane's I/O engine: the session's engine is really in use, and a kernel that forbids
io_uring makes `--io-engine auto` fall back to epoll and still serve."""

import re
import subprocess

from conftest import NODES, metrics

ENGINE_NAMES = {"io-uring": "io_uring", "epoll": "epoll"}
SYSCTL = "kernel.io_uring_disabled"


def _engine_in_log(log: str):
    found = re.findall(r'data plane listening.*engine="?([a-z_]+)"?', log)
    return found[-1] if found else None


def test_session_engine_is_in_use(lab):
    want = ENGINE_NAMES.get(lab.engine)
    for i in range(1, NODES + 1):
        got = _engine_in_log(lab.log(i))
        assert got is not None, f"node {i}: no 'data plane listening ... engine=' line in peerd.log"
        if want:
            assert got == want, f"node {i} runs {got}, the session asked for {want}"


def _sysctl_get() -> str:
    return subprocess.run(["sysctl", "-n", SYSCTL], check=True, capture_output=True, text=True).stdout.strip()


def _sysctl_set(value: str):
    subprocess.run(["sysctl", "-q", "-w", f"{SYSCTL}={value}"], check=True, capture_output=True, text=True)


def test_auto_falls_back_to_epoll_when_io_uring_is_disabled(lab):
    img = lab.push_random("nouring", layers=2, size_mib=8)
    lab.seed(1, img)  # node 1 alone holds it: node 3 serves it from a peer
    node = 3
    previous = _sysctl_get()
    try:
        _sysctl_set("2")
        lab.stop_peerd(node)
        lab.start_peerd(node, "--io-engine", "auto")
        log = lab.log(node)
        assert _engine_in_log(log) == "epoll", f"peerd with io_uring disabled runs {_engine_in_log(log)}"
        assert re.search(r"io_uring.*(unavailable|disabled).*epoll", log), "the log does not say why it fell back to epoll"
        served = metrics(node).get("peerd_bytes_served_total", source="peer")
        lab.pull(node, img)
        lab.check(node, img)
        assert metrics(node).get("peerd_bytes_served_total", source="peer") - served >= img.layer_bytes
    finally:
        _sysctl_set(previous)
    assert _sysctl_get() == previous
