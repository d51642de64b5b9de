#!/usr/bin/env python3
"""peerd's pod events, read back from the API server (events.k8s.io/v1) through kubectl.

One implementation for the pytest suite (`tests/k8s`, imported as a module) and for
`ci/kind-e2e.sh` (the CLI). Python 3 stdlib only; it needs a `kubectl` that can reach the cluster.

    events.py [GLOBAL] list   [--pod NAME]... [--selector SEL] [--reason R] [--type T]
    events.py [GLOBAL] wait   --reason R [--type T] (--pod NAME... | --selector SEL)
                              [--any] [--min-pods N] [--timeout SECONDS]
    events.py [GLOBAL] verify [--pod NAME]... [--selector SEL]

    GLOBAL: -n/--namespace NS (required), --kubeconfig FILE, --context NAME,
            --kubectl BIN (default: $KUBECTL or `kubectl`), --controller NAME (default peerd)

`list` prints one JSON object per event (oldest first). `wait` polls until every selected pod
(or, with --any, one of them) has an event of that reason (and type) reported by peerd about that
very pod, prints `event POD REASON TYPE` per pod, and exits 1 with what it saw on timeout.
`verify` exits 1 if an event that peerd reported is attached to a pod other than the one that
reported it (reportingInstance, which peerd sets to its pod name), or to another incarnation of
that pod (uid). Events are matched on `regarding` (kind Pod, name, uid when both sides have one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONTROLLER = "peerd"


class Kube:
    """A kubectl invocation: binary, kubeconfig, context."""

    def __init__(self, kubectl: str | None = None, kubeconfig: str | None = None, context: str | None = None):
        self.kubectl = kubectl or os.environ.get("KUBECTL") or "kubectl"
        self.kubeconfig = kubeconfig
        self.context = context

    def run(self, *args: str, timeout: float = 30) -> str:
        cmd = [self.kubectl]
        if self.kubeconfig:
            cmd += ["--kubeconfig", self.kubeconfig]
        if self.context:
            cmd += ["--context", self.context]
        cmd += ["--request-timeout", f"{max(1, int(timeout))}s", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def get_json(self, path: str) -> dict:
        return json.loads(self.run("get", "--raw", path))


def list_events(kube: Kube, namespace: str) -> list[dict]:
    """Every events.k8s.io/v1 Event of the namespace, oldest first."""
    items, cont = [], ""
    while True:
        path = f"/apis/events.k8s.io/v1/namespaces/{namespace}/events?limit=500"
        if cont:
            path += f"&continue={cont}"
        doc = kube.get_json(path)
        items += doc.get("items", [])
        cont = doc.get("metadata", {}).get("continue", "")
        if not cont:
            break
    items.sort(key=event_time)
    return items


def list_pods(kube: Kube, namespace: str, selector: str | None = None, names: list[str] | None = None) -> dict[str, str]:
    """name -> uid of the selected pods (by label selector, by name, or both)."""
    path = f"/api/v1/namespaces/{namespace}/pods"
    if selector:
        path += "?labelSelector=" + selector.replace("=", "%3D").replace(",", "%2C")
    doc = kube.get_json(path)
    pods = {p["metadata"]["name"]: p["metadata"].get("uid", "") for p in doc.get("items", [])}
    if names:
        pods = {n: u for n, u in pods.items() if n in names}
    return pods


def event_time(ev: dict) -> str:
    series = ev.get("series") or {}
    return series.get("lastObservedTime") or ev.get("eventTime") or ev["metadata"].get("creationTimestamp") or ""


def event_count(ev: dict) -> int:
    series = ev.get("series") or {}
    return int(series.get("count") or ev.get("deprecatedCount") or 1)


def summary(ev: dict) -> dict:
    reg = ev.get("regarding") or {}
    return {
        "pod": reg.get("name"),
        "uid": reg.get("uid"),
        "kind": reg.get("kind"),
        "reason": ev.get("reason"),
        "type": ev.get("type"),
        "count": event_count(ev),
        "note": ev.get("note"),
        "reportingController": ev.get("reportingController"),
        "reportingInstance": ev.get("reportingInstance"),
        "time": event_time(ev),
        "name": ev["metadata"].get("name"),
    }


def by_controller(events: list[dict], controller: str = CONTROLLER) -> list[dict]:
    return [e for e in events if e.get("reportingController") == controller]


def about(ev: dict, pod: str, uid: str | None = None) -> bool:
    """The event's `regarding` is this pod (and this incarnation of it, when both know the uid)."""
    reg = ev.get("regarding") or {}
    if reg.get("kind") != "Pod" or reg.get("name") != pod:
        return False
    return not (uid and reg.get("uid") and reg["uid"] != uid)


def matching(events: list[dict], pod: str, reason: str, type_: str | None = None, uid: str | None = None,
             controller: str = CONTROLLER) -> list[dict]:
    return [
        e for e in by_controller(events, controller)
        if about(e, pod, uid) and e.get("reason") == reason and (type_ is None or e.get("type") == type_)
    ]


def misattributed(events: list[dict], pods: dict[str, str], controller: str = CONTROLLER) -> list[dict]:
    """peerd's events that sit on another pod than the one that reported them, or on a pod of
    `pods` (name -> uid) with another uid."""
    bad = []
    for e in by_controller(events, controller):
        reg = e.get("regarding") or {}
        name = reg.get("name")
        if reg.get("kind") != "Pod" or not name or e.get("reportingInstance") != name:
            bad.append(e)
        elif name in pods and pods[name] and reg.get("uid") and reg["uid"] != pods[name]:
            bad.append(e)
    return bad


def wait_for_event(kube: Kube, namespace: str, reason: str, type_: str | None = None, pods: list[str] | None = None,
                   selector: str | None = None, any_pod: bool = False, min_pods: int = 1, timeout: float = 120,
                   interval: float = 1.0, controller: str = CONTROLLER) -> dict[str, dict]:
    """Waits until every selected pod (or one with `any_pod`) has the event; returns pod -> the
    newest matching event. Raises TimeoutError with what was seen."""
    deadline = time.monotonic() + timeout
    last_err = None
    while True:
        found, selected, events = {}, {}, []
        try:
            selected = list_pods(kube, namespace, selector, pods) if (selector or pods) else {}
            if pods:  # named pods must exist: wait for them otherwise
                selected = {n: selected.get(n, "") for n in pods}
            events = list_events(kube, namespace)
            for name, uid in selected.items():
                hits = matching(events, name, reason, type_, uid or None, controller)
                if hits:
                    found[name] = hits[-1]
            last_err = None
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            last_err = e
        enough = len(selected) >= min_pods and (
            (any_pod and found) or (not any_pod and selected and len(found) == len(selected))
        )
        if enough:
            return found
        if time.monotonic() >= deadline:
            seen = sorted({(summary(e)["pod"], e.get("reason"), e.get("type")) for e in by_controller(events, controller)})
            missing = sorted(set(selected) - set(found))
            raise TimeoutError(
                f"no {reason}{'/' + type_ if type_ else ''} event from {controller} after {timeout:.0f} s on "
                + ("any of " if any_pod else "")
                + f"{missing or '(no pods selected)'} in namespace {namespace}; "
                + f"pods selected: {sorted(selected)}; events seen (pod, reason, type): {seen}"
                + (f"; last error: {last_err}" if last_err else "")
            )
        time.sleep(interval)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="peerd pod events (events.k8s.io/v1) via kubectl")
    p.add_argument("-n", "--namespace", required=True)
    p.add_argument("--kubeconfig")
    p.add_argument("--context")
    p.add_argument("--kubectl")
    p.add_argument("--controller", default=CONTROLLER, help="reportingController of the events (default: peerd)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def selection(sp):
        sp.add_argument("--pod", action="append", default=[], help="a pod name (repeatable)")
        sp.add_argument("--selector", "-l", help="a label selector, e.g. app=peerd")

    ls = sub.add_parser("list", help="print the events as JSON lines")
    selection(ls)
    ls.add_argument("--reason")
    ls.add_argument("--type", choices=["Normal", "Warning"])

    w = sub.add_parser("wait", help="wait for an event on every selected pod (or on one with --any)")
    selection(w)
    w.add_argument("--reason", required=True)
    w.add_argument("--type", choices=["Normal", "Warning"])
    w.add_argument("--any", action="store_true", help="one selected pod is enough")
    w.add_argument("--min-pods", type=int, default=1, help="at least this many pods must be selected (default 1)")
    w.add_argument("--timeout", type=float, default=120)
    w.add_argument("--interval", type=float, default=1.0)

    v = sub.add_parser("verify", help="every peerd event is attached to the pod that reported it")
    selection(v)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    kube = Kube(a.kubectl, a.kubeconfig, a.context)
    if a.cmd == "wait":
        if not a.pod and not a.selector:
            print("events.py wait: give --pod or --selector", file=sys.stderr)
            return 2
        try:
            found = wait_for_event(kube, a.namespace, a.reason, a.type, a.pod or None, a.selector, a.any,
                                   a.min_pods, a.timeout, a.interval, a.controller)
        except TimeoutError as e:
            print(f"events.py: {e}", file=sys.stderr)
            return 1
        for pod in sorted(found):
            print(f"event {pod} {found[pod].get('reason')} {found[pod].get('type')}")
        return 0

    events = list_events(kube, a.namespace)
    pods = list_pods(kube, a.namespace, a.selector, a.pod or None) if (a.selector or a.pod) else None
    if a.cmd == "list":
        for e in events:
            s = summary(e)
            if pods is not None and s["pod"] not in pods:
                continue
            if (a.reason and s["reason"] != a.reason) or (a.type and s["type"] != a.type):
                continue
            print(json.dumps(s, sort_keys=True))
        return 0
    # verify
    if pods is None:
        pods = list_pods(kube, a.namespace)
    bad = misattributed([e for e in events if (e.get("regarding") or {}).get("name") in pods
                         or e.get("reportingInstance") in pods], pods, a.controller)
    for e in bad:
        print(f"misattributed {json.dumps(summary(e), sort_keys=True)}")
    n = len(by_controller(events, a.controller))
    if bad:
        print(f"events.py: {len(bad)} of {n} {a.controller} event(s) are not on the pod that reported them",
              file=sys.stderr)
        return 1
    print(f"verify-ok {n} {a.controller} event(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
