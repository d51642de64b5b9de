"""ci/kind-e2e.sh needs Docker and kind, so it cannot run here. What can be checked is: it passes
shellcheck, refuses to start without its tools, calls tests/k8s/events.py with arguments events.py
takes, and runs start to end against fake docker/kind/kubectl/helm that act like a healthy cluster."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

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


FAKE_TOOLS = r'''#!/usr/bin/env python3
"""docker, kind, kubectl and helm as ci/kind-e2e.sh sees them on a healthy 3-node cluster."""
import json, os, sys
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
state = os.environ["FAKE_STATE"]
stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
with open(os.path.join(state, "calls"), "a") as f:
    f.write(json.dumps([tool, args, stdin]) + "\n")
nodes = ["peerd-e2e-control-plane", "peerd-e2e-worker", "peerd-e2e-worker2"]
installed = os.path.exists(os.path.join(state, "installed"))
pods = [f"peerd-{n[-4:]}" for n in nodes]
def out(x):
    sys.stdout.write(x)
    sys.exit(0)
if tool == "kind":
    if args[:2] == ["get", "nodes"]:
        out("\n".join(nodes) + "\n")
    sys.exit(0)
if tool == "docker":
    if args[:1] == ["exec"] and "config" in args:
        out('[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n' * 200)
    if args[:1] == ["exec"] and "grep" in args:
        sys.exit(0 if installed else 1)
    if args[:1] == ["exec"]:
        sys.exit(1)  # no curl on the node
    sys.exit(0)
if tool == "helm":
    if "install" in args:
        open(os.path.join(state, "installed"), "w").close()
    if "uninstall" in args:
        os.unlink(os.path.join(state, "installed"))
    sys.exit(0)
if tool == "kubectl":
    if "--raw" in args:
        path = args[args.index("--raw") + 1]
        if "/pods" in path:
            out(json.dumps({"items": [{"metadata": {"name": p, "uid": "u-" + p}} for p in pods]}))
        evs = []
        for p in pods:
            for reason in ("P2PInitializing", "P2PConnected", "P2PActive"):
                evs.append({"metadata": {"name": p + reason}, "reason": reason, "type": "Normal",
                            "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "peerd",
                            "reportingInstance": p, "regarding": {"kind": "Pod", "name": p, "uid": "u-" + p}})
        out(json.dumps({"items": evs, "metadata": {}}))
    if "jsonpath={.status.numberReady}" in args:
        out("3")
    if "jsonpath={.status.succeeded}/{.status.failed}" in args:
        out("1/")
    sys.exit(0)
sys.exit(3)
'''


def test_runs_through_against_fake_tools(tmp_path):
    """The whole script, start to end, against fakes of docker, kind, kubectl and helm that act
    like a healthy cluster: every step is reached, in order, with the arguments it should have."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fake-tool"
    fake.write_text(FAKE_TOOLS.replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1))
    fake.chmod(0o755)
    for tool in ("docker", "kind", "kubectl", "helm"):
        (bin_dir / tool).symlink_to(fake)
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_STATE": str(tmp_path),
           "TIMEOUT": "20", "ANNOUNCE_WAIT": "0", "IMAGE": "localhost/peerd:fake"}
    res = subprocess.run(["bash", str(KIND_E2E)], capture_output=True, text=True, timeout=120, env=env,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}"
    assert "PASSED" in res.stderr, res.stderr[-2000:]
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    seq = [f"{t} {' '.join(a)}" for t, a, _ in calls]

    def index(pattern):
        hits = [k for k, c in enumerate(seq) if re.search(pattern, c)]
        assert hits, f"no call matching {pattern!r} in:\n" + "\n".join(seq)
        return hits[0]

    create = index(r"^kind create cluster --name peerd-e2e")
    kind_cfg = yaml.safe_load(calls[create][2])
    assert [n["role"] for n in kind_cfg["nodes"]] == ["control-plane", "worker", "worker"], kind_cfg
    build = index(r"^docker build -t localhost/peerd:fake -f \S+/Dockerfile")
    load = index(r"^kind load docker-image localhost/peerd:fake --name peerd-e2e")
    install = index(r"^helm .*install --wait .*peerd \S+/k8s/peerd-helm --set peerd.image.ref=localhost/peerd:fake")
    connected = index(r"^kubectl .*get --raw /apis/events.k8s.io/v1/namespaces/peerd-ns/events")
    jobs = [yaml.safe_load(stdin) for t, a, stdin in calls if t == "kubectl" and "apply" in a]
    assert sorted(j["spec"]["template"]["spec"]["nodeName"] for j in jobs) == sorted(
        ["peerd-e2e-control-plane", "peerd-e2e-worker", "peerd-e2e-worker2"]), jobs
    first_job = index(r"^kubectl .*apply -f -")
    uninstall = index(r"^helm .*uninstall --wait")
    delete = index(r"^kind delete cluster --name peerd-e2e")
    assert create < build < load < install < connected < first_job < uninstall < delete, seq
