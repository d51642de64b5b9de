"""ci/kind-e2e.sh (needs Docker and kind, so it cannot run here): it passes shellcheck, parses,
refuses to start without its tools, and calls tests/k8s/events.py with arguments events.py takes."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import events
from k8slib import KIND_E2E


def _shellcheck() -> str:
    path = shutil.which("shellcheck")
    if path is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        res = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "shellcheck"],
                             env=env, capture_output=True, text=True, timeout=600)
        path = shutil.which("shellcheck")
        assert path, f"shellcheck is missing and apt could not install it:\n{res.stderr[-2000:]}"
    return path


def test_shellcheck():
    res = subprocess.run([_shellcheck(), "--external-sources", str(KIND_E2E)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_parses_and_is_executable():
    assert os.access(KIND_E2E, os.X_OK), f"{KIND_E2E} is not executable"
    res = subprocess.run(["bash", "-n", str(KIND_E2E)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_refuses_to_start_without_docker(tmp_path):
    """No side effects when a tool is missing: it stops before creating anything."""
    for tool in ("dirname", "sort"):
        os.symlink(shutil.which(tool), tmp_path / tool)
    res = subprocess.run(["/bin/bash", str(KIND_E2E)], capture_output=True, text=True, timeout=30,
                         env={"PATH": str(tmp_path), "HOME": str(tmp_path)})
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "docker is not installed" in res.stderr, res.stderr


def _events_calls(script: str) -> list[list[str]]:
    """The argument lists the script passes to events.py (after its common prefix)."""
    text = script.replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        m = re.match(r'\s*"\$\{EVENTS\[@\]\}"\s+(.*?)(\|\||$)', line)
        if m:
            args = re.sub(r'"?\$\{?([A-Z_]+)\}?"?', lambda v: {"NODES": "3", "TIMEOUT": "300"}.get(v.group(1), "x"),
                          m.group(1))
            calls.append(shlex.split(args))
    return calls


def test_events_cli_usage_matches_events_py():
    script = KIND_E2E.read_text()
    m = re.search(r"^EVENTS=\((.*)\)$", script, re.M)
    assert m and "tests/k8s/events.py" in m.group(1), "kind-e2e.sh does not use tests/k8s/events.py"
    calls = _events_calls(script)
    subs = {c[0] for c in calls}
    assert {"wait", "verify"} <= subs, calls
    reasons = {c[c.index("--reason") + 1] for c in calls if "--reason" in c}
    assert {"P2PConnected", "P2PActive"} <= reasons, reasons
    parser = events._parser()
    for c in calls:
        try:
            parser.parse_args(["--context", "kind-x", "-n", "peerd-ns", *c])
        except SystemExit:
            pytest.fail(f"events.py rejects the arguments kind-e2e.sh gives it: {c}")
    res = subprocess.run([sys.executable, events.__file__, "-n", "x", "wait", "--help"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and "--reason" in res.stdout, res.stderr
