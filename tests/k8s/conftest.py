"""Fixtures of peerd's Kubernetes tests.

The lab is one machine-wide resource: a session that needs it holds an exclusive flock on
/var/lock/peerd-lab-session.lock from start to end, brings a fresh 5-node lab up, then a control
plane of its own (ci/k8s/control-plane.sh with its own state dir /var/lib/peerd-k8s-tests and
ports, 198.18.0.1:6543 on the lab bridge, so the lab comes first; see k8slib.CP_ENV), and takes
both down at the end (control plane first), also when something failed. Tests that need neither
(rendering the chart, shellcheck, the image's contents) never take the lock.

Each test that uses `env` starts with no peerd running and leaves none running; a failed test's
peerd, apiserver and registry logs are copied to $PEERD_K8S_ARTIFACTS (/tmp/peerd-k8s-artifacts).

    python3 -m pytest tests/k8s -q
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from k8slib import (CP_STATE, KUBECTL, LAB_DIR, NODES, SESSION_LOCK, TARGET_DIR, Cluster, Lab,
                    control_plane, control_plane_install, run)

ARTIFACTS = Path(os.environ.get("PEERD_K8S_ARTIFACTS", "/tmp/peerd-k8s-artifacts"))


def pytest_addoption(parser):
    parser.addoption("--lab-lock-wait", type=float, default=float(os.environ.get("PEERD_K8S_LOCK_WAIT", "3600")),
                     help="seconds to wait for the shared lab lock")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@dataclass
class Env:
    lab: Lab
    cluster: Cluster
    peerd_bin: Path
    tmp: Path


def _take_session_lock(wait: float) -> int:
    fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                pytest.exit(f"the lab is busy: could not lock {SESSION_LOCK} within {wait} s", returncode=3)
            if not told:
                sys.stderr.write(f"\nwaiting for the lab lock {SESSION_LOCK} (someone else uses the lab)...\n")
                told = True
            time.sleep(2)


def save_artifacts(label: str):
    dest = ARTIFACTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)[:80]}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for i in range(1, NODES + 1):
            for f in ("peerd.log", "peerd.log.prev", "pull.log"):
                src = LAB_DIR / f"node{i}" / f
                if src.exists():
                    shutil.copy(src, dest / f"node{i}-{f}")
        for f in ("access.log", "registry.log"):
            src = LAB_DIR / "registry" / f
            if src.exists():
                shutil.copy(src, dest / f"registry-{f}")
        src = CP_STATE / "logs" / "kube-apiserver.log"
        if src.exists():
            shutil.copy(src, dest / "kube-apiserver.log")
        sys.stderr.write(f"\npeerd k8s tests: logs saved in {dest}\n")
    except OSError as e:
        sys.stderr.write(f"\ncould not save logs: {e}\n")


@pytest.fixture(scope="session")
def k8s_session(request):
    if os.geteuid() != 0:
        pytest.exit("the peerd lab needs root", returncode=3)
    src = Path(os.environ.get("PEERD_BIN", TARGET_DIR / "release" / "peerd"))
    if not os.access(src, os.X_OK):
        pytest.exit(f"peerd binary not found: {src} (cargo build --release, or set PEERD_BIN)", returncode=3)
    t_lock = time.monotonic()
    lock_fd = _take_session_lock(request.config.getoption("--lab-lock-wait"))
    sys.stderr.write(f"\nlab lock taken after {time.monotonic() - t_lock:.1f} s\n")

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="peerd-k8s-"))
    lab = Lab(Path("/nonexistent"))
    cluster = None
    cp_started = False
    try:
        # A private copy: a rebuild during the session must not swap the binary under the tests.
        peerd_bin = tmp / "peerd"
        shutil.copy2(src, peerd_bin)
        run([peerd_bin, "version"], timeout=10)
        lab = Lab(peerd_bin)
        t0 = time.monotonic()
        lab.up()
        sys.stderr.write(f"lab up ({NODES} nodes) in {time.monotonic() - t0:.1f} s\n")
        t0 = time.monotonic()
        control_plane_install()
        # One left running (e.g. on loopback, from before the lab bridge existed) would be
        # unreachable from the lab: restart it so that it binds the lab bridge.
        control_plane("down", timeout=120)
        cp_started = True
        out = control_plane("up", timeout=600).stdout
        kubeconfig = re.search(r"^kubeconfig (\S+)$", out, re.M).group(1)
        server = re.search(r"^server (\S+)$", out, re.M).group(1)
        assert server.startswith("https://198.18.0.1:"), f"API server not on the lab bridge: {server}"
        sys.stderr.write(f"control plane up ({server}) in {time.monotonic() - t0:.1f} s\n")
        cluster = Cluster(kubeconfig, server, tmp)
        cluster.remove_stale_namespaces()
        yield Env(lab, cluster, peerd_bin, tmp)
    finally:
        try:
            if request.session.testsfailed:
                save_artifacts("session")
        finally:
            try:
                lab.stop_all()
            except Exception as e:  # noqa: BLE001 - teardown goes on whatever happened
                sys.stderr.write(f"stopping peerds: {e}\n")
            if cluster is not None:
                for ns in cluster.namespaces:
                    try:
                        cluster.remove_namespace(ns)
                    except Exception as e:  # noqa: BLE001
                        sys.stderr.write(f"removing namespace {ns}: {e}\n")
            if cp_started:
                control_plane("down", timeout=120, check=False)
            lab.down()
            shutil.rmtree(tmp, ignore_errors=True)
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
            signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def env(request, k8s_session):
    """The session's lab and API server, with no peerd running before and after the test."""
    k8s_session.lab.stop_all()
    yield k8s_session
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        save_artifacts(request.node.name)
    k8s_session.lab.stop_all()


@pytest.fixture(scope="session")
def k8s_peerd_bin():
    """The peerd binary, for tests that only read its --help (no lab, no lock)."""
    src = Path(os.environ.get("PEERD_BIN", TARGET_DIR / "release" / "peerd"))
    if not os.access(src, os.X_OK):
        pytest.skip(f"peerd binary not found: {src}")
    return src
