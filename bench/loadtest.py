#!/usr/bin/env python3
"""Cluster load test of peerd in the lab (ci/lab.sh): N nodes pull a fresh image, with and without
peerd, under the scenarios people measure.

    python3 bench/loadtest.py [--nodes 8] [--rate 100mbit] [--sizes 10,100] [--layers 1,4]
                              [--scenarios rolling,simultaneous] [--out bench/results/loadtest]

Scenarios (each for every image size x layer count):
  rolling       nodes in batches of ceil(--batch-fraction x N) (20 %, as Spegel's benchmark); the
                pulls of a batch start together, the next batch starts when the previous finished
                (a DaemonSet/Deployment rollout with maxUnavailable 20 %).
  simultaneous  all N nodes pull at once.
Modes (both in the same invocation, each with its own freshly pushed random image):
  peerd         peerd running on every node (containerd's mirror is the node-local peerd).
  baseline      peerd stopped on every node: containerd's mirror dial is refused and it pulls
                straight from the registry.
The order of the two modes alternates from one case to the next (one peerd start/stop per case).

Measured per scenario run: pull seconds per node (`lab.sh pull`, i.e. `ctr images pull` with
unpack) and their p50/p90/max (linear interpolation between ranks), bytes served to containerd
from peers (delta of peerd_bytes_served_total{source="peer"} over the nodes) and from peerd's
pull-through ({source="upstream"}) versus bytes the registry sent to the nodes (its access log:
blob GETs answered 200/206 from node IPs, split by User-Agent into peerd's pull-through and
containerd's own GETs), registry GETs per blob (deltas of `lab.sh registry-log-count`, max, mean
and how many beyond the first), and the ratio of p50 (and p90, max) through peerd to the
baseline's. peerd runs are verified byte for byte (`lab.sh check`).

Output: progress on stderr, a summary table on stdout, <out>.json, <out>.svg (and <out>.png when
chromium or rsvg-convert can render it). Targets are reported, never asserted: the exit status
says only whether the harness ran (0), a pull failed or a check failed (1), or it was interrupted.

The lab is shared: the whole run holds /var/lock/peerd-lab-session.lock (flock; it waits as long
as another session holds it), starts from `lab.sh down`, and takes the lab down at the end and on
failure or interruption. The peerd binary ($PEERD_BIN, else $CARGO_TARGET_DIR/release/peerd) is
copied aside first, so that a rebuild during the run changes nothing.
"""
import argparse
import datetime
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
LAB_SH = os.path.join(REPO, "ci", "lab.sh")
sys.path.insert(0, os.path.join(BENCH, "loadtest"))
import ltlib  # noqa: E402
import ltplot  # noqa: E402
from ltlib import MIB, fmt_bytes, fmt_dur, fmt_s  # noqa: E402

SESSION_LOCK = os.environ.get("PEERD_LAB_SESSION_LOCK", "/var/lock/peerd-lab-session.lock")
LAB_DIR = os.environ.get("LAB_DIR", "/var/lib/peerd-lab")
REGISTRY = "198.18.0.2:5000"
T0 = time.monotonic()
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def node_ip(i):
    return f"198.18.0.{10 + i}"


def rel(path):
    """The path relative to the repository when inside it, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def log(msg):
    el = time.monotonic() - T0
    print(f"[{time.strftime('%H:%M:%S')} +{fmt_dur(el)}] {msg}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    pass


class LabError(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


# ---------------------------------------------------------------- arguments and plan

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (head -n 40 bench/loadtest.py).")
    p.add_argument("--nodes", type=int, default=8, help="lab nodes (default 8)")
    p.add_argument("--rate", default="100mbit", help="registry egress cap, tc syntax or none (default 100mbit)")
    p.add_argument("--sizes", default="10,100",
                   help="image sizes in MiB, comma-separated (default 10,100; add 1000 for ~1 GiB)")
    p.add_argument("--layers", default="1,4", help="layer counts, comma-separated (default 1,4)")
    p.add_argument("--scenarios", default="rolling,simultaneous", help="rolling,simultaneous")
    p.add_argument("--modes", default="peerd,baseline", help="peerd,baseline (default both)")
    p.add_argument("--batch-fraction", type=float, default=0.2,
                   help="rolling update batch: ceil(fraction x nodes) (default 0.2)")
    p.add_argument("--out", default=os.path.join("bench", "results", "loadtest"),
                   help="output prefix: <out>.json, <out>.svg, <out>.png (default bench/results/loadtest)")
    p.add_argument("--verify", choices=["peerd", "all", "none"], default="peerd",
                   help="byte-for-byte check of every pulled image: in peerd runs (default), all, none")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between progress lines during pulls")
    p.add_argument("--peerd-flag", action="append", default=[], metavar="FLAG",
                   help="extra flag for `peerd run` (repeatable, e.g. --peerd-flag=--lookup-timeout-ms=200)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate, touch nothing")
    a = p.parse_args(argv)

    def ints(s, what):
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            p.error(f"--{what}: comma-separated integers expected, got {s!r}")
        if not v or any(x < 1 for x in v):
            p.error(f"--{what}: values must be >= 1")
        return v

    a.sizes = ints(a.sizes, "sizes")
    a.layers = ints(a.layers, "layers")
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    a.modes = [s.strip() for s in a.modes.split(",") if s.strip()]
    if not a.scenarios or any(s not in ("rolling", "simultaneous") for s in a.scenarios):
        p.error("--scenarios: rolling and/or simultaneous")
    if not a.modes or any(m not in ("peerd", "baseline") for m in a.modes):
        p.error("--modes: peerd and/or baseline")
    if not 1 <= a.nodes <= 99:
        p.error("--nodes: 1..99")
    if not 0 < a.batch_fraction <= 1:
        p.error("--batch-fraction: in (0, 1]")
    try:
        a.rate_bps = ltlib.rate_bytes_per_s(a.rate)
    except ValueError as e:
        p.error(str(e))
    for s in a.sizes:
        for lay in a.layers:
            if s * MIB // lay < 1024:
                p.error(f"{s} MiB in {lay} layers: layers too small")
    a.batch_size = max(1, math.ceil(a.batch_fraction * a.nodes - 1e-9))
    return a


def batches_of(scenario, nodes, batch_size):
    ids = list(range(1, nodes + 1))
    if scenario == "simultaneous":
        return [ids]
    return [ids[i:i + batch_size] for i in range(0, nodes, batch_size)]


def estimate(a):
    """Rough seconds for the whole run and per case (a model calibrated on the 2-core lab)."""
    reg = a.rate_bps or 150e6          # registry egress, bytes/s
    peer = 80e6                        # aggregate peer-to-peer throughput on a small box
    unpack = 200e6                     # ctr unpack of uncompressed random layers
    total = 10.0                       # lab up + down
    per_case = {}
    for scen in a.scenarios:
        for size in a.sizes:
            for lay in a.layers:
                s = size * MIB
                t = 0.0
                for mode in a.modes:
                    bs = batches_of(scen, a.nodes, a.batch_size)
                    for bi, b in enumerate(bs):
                        if mode == "baseline":
                            t += len(b) * s / reg
                        elif bi == 0:
                            t += s / reg + len(b) * s / peer   # one registry fetch, shared as it arrives
                        else:
                            t += len(b) * s / peer
                        t += 0.25 + 0.05 * lay + len(b) * s / unpack / 2
                    t += 0.4 + s / 100e6                # generate + push
                    t += 0.1 * a.nodes + 0.2            # rmi
                    if a.verify == "all" or (a.verify == "peerd" and mode == "peerd"):
                        t += a.nodes * (0.1 + s / 300e6)
                if "peerd" in a.modes and len(a.modes) > 1:
                    t += a.nodes * 0.2 + 0.5           # start or stop peerd everywhere, mesh
                per_case[(scen, size, lay)] = t
                total += t
    return total, per_case


# ---------------------------------------------------------------- the harness

class Harness:
    def __init__(self, a):
        self.a = a
        self.children = set()
        self.tmp = tempfile.mkdtemp(prefix="peerd-loadtest.")
        self.env = dict(os.environ)
        self.peerd_on = False
        self.lab_touched = False
        self.runid = f"{time.strftime('%H%M%S')}-{os.getpid()}"
        self.out = a.out if os.path.isabs(a.out) else os.path.join(REPO, a.out)
        self.doc = None
        self.anomalies = []

    # ---- subprocesses

    def _spawn(self, argv, stdout, stderr, env=None):
        p = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                             env=env or self.env, start_new_session=True, cwd=REPO)
        self.children.add(p)
        return p

    def _kill(self, p, sig=signal.SIGTERM):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_children(self):
        for p in list(self.children):
            if p.poll() is None:
                self._kill(p)
        deadline = time.monotonic() + 5
        for p in list(self.children):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(p, signal.SIGKILL)
                try:
                    p.wait(2)
                except subprocess.TimeoutExpired:
                    pass
            self.children.discard(p)

    def lab(self, *args, timeout=300, check=True, env=None):
        """Runs ci/lab.sh; returns (rc, stdout, stderr)."""
        p = self._spawn([LAB_SH, *map(str, args)], subprocess.PIPE, subprocess.PIPE, env=env)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(p, signal.SIGKILL)
            out, err = p.communicate()
            self.children.discard(p)
            raise LabError(f"lab.sh {' '.join(map(str, args))}: no answer after {timeout} s")
        self.children.discard(p)
        out, err = out.decode(errors="replace"), err.decode(errors="replace")
        if check and p.returncode != 0:
            tail = "\n".join(err.strip().splitlines()[-15:])
            raise LabError(f"lab.sh {' '.join(map(str, args))} failed (exit {p.returncode}):\n{tail}")
        return p.returncode, out, err

    # ---- observations

    def scrape(self, i):
        try:
            with OPENER.open(f"http://{node_ip(i)}:5004/metrics/prometheus", timeout=3) as r:
                return ltlib.prom_parse(r.read().decode(errors="replace"))
        except Exception:
            return None

    def scrape_all(self):
        return {i: self.scrape(i) for i in range(1, self.a.nodes + 1)}

    @staticmethod
    def netdev(name, field):
        try:
            with open(f"/sys/class/net/{name}/statistics/{field}") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    def net(self):
        """Bytes each node received (host side of its veth sent) and the registry sent."""
        d = {i: self.netdev(f"pdv-n{i}", "tx_bytes") for i in range(1, self.a.nodes + 1)}
        d["registry"] = self.netdev("pdv-reg", "rx_bytes")
        d.update({f"sent{i}": self.netdev(f"pdv-n{i}", "rx_bytes") for i in range(1, self.a.nodes + 1)})
        return d

    def access_log(self):
        return os.path.join(LAB_DIR, "registry", "access.log")

    def access_offset(self):
        try:
            return os.path.getsize(self.access_log())
        except OSError:
            return 0

    def reglog_count(self, digest):
        _, out, _ = self.lab("registry-log-count", digest, timeout=60)
        try:
            return int(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise LabError(f"registry-log-count {digest}: unexpected output {out!r}")

    def peerd_log(self, i):
        return os.path.join(LAB_DIR, f"node{i}", "peerd.log")

    # ---- peerd on/off

    def set_peerd(self, on):
        if on == self.peerd_on:
            return
        n = self.a.nodes
        if on:
            log(f"[peerd] starting peerd on {n} nodes")
            for i in range(1, n + 1):
                self.lab("start-peerd", i, *self.a.peerd_flag, timeout=90)
            self.peerd_on = True
        else:
            log(f"[peerd] stopping peerd on {n} nodes")
            for i in range(1, n + 1):
                t = time.monotonic()
                rc, _, err = self.lab("stop-peerd", i, timeout=90, check=False)
                if rc == 2:
                    self.anomaly(f"peerd on node {i} did not exit within 15 s of SIGTERM (killed)")
                elif rc != 0:
                    raise LabError(f"stop-peerd {i} failed (exit {rc}): {err.strip()[-500:]}")
                elif time.monotonic() - t > 5:
                    self.anomaly(f"peerd on node {i} took {time.monotonic() - t:.1f} s to stop")
            self.peerd_on = False

    def wait_mesh(self):
        """Until every node's peerd_peers >= N-1 (up to 30 s). Returns (seconds, min peers)."""
        n = self.a.nodes
        t = time.monotonic()
        want = n - 1
        low = 0
        while True:
            peers = []
            for i in range(1, n + 1):
                s = self.scrape(i)
                peers.append(ltlib.prom_sum(s, "peerd_peers") if s is not None else -1)
            low = min(peers)
            if low >= want:
                break
            if time.monotonic() - t > 30:
                self.anomaly(f"peer mesh incomplete after 30 s: peerd_peers per node {peers} (want {want})")
                break
            time.sleep(0.25)
        return round(time.monotonic() - t, 2), int(low)

    def anomaly(self, msg):
        log(f"[warn] {msg}")
        self.anomalies.append(msg)

    # ---- images

    def push(self, ref, layers, size_mib):
        cache = os.path.join(self.tmp, "cache")
        env = dict(self.env, PEERD_CACHE=cache)
        env.pop("SEED", None)
        t = time.monotonic()
        _, out, _ = self.lab("push-random", ref, layers, size_mib, timeout=900, env=env)
        repo, tag = ref.rsplit(":", 1)
        layout = os.path.join(cache, "images", f"{repo.replace('/', '_')}_{tag}")
        blobs = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in ("layer", "config"):
                path = os.path.join(layout, "blobs", "sha256", parts[1].split(":", 1)[1])
                try:
                    size = os.path.getsize(path)
                except OSError:
                    size = None
                blobs.append({"digest": parts[1], "kind": parts[0], "bytes": size})
        shutil.rmtree(layout, ignore_errors=True)
        if sum(1 for b in blobs if b["kind"] == "layer") != layers:
            raise LabError(f"push-random {ref}: expected {layers} layers, got output {out!r}")
        return blobs, round(time.monotonic() - t, 2)

    def rmi_all(self, image):
        procs = {}
        nodes = list(range(1, self.a.nodes + 1))
        errors = []
        while nodes or procs:
            while nodes and len(procs) < 4:
                i = nodes.pop(0)
                procs[i] = self._spawn([LAB_SH, "rmi", str(i), image], subprocess.PIPE, subprocess.PIPE)
            for i, p in list(procs.items()):
                if p.poll() is not None:
                    out, err = p.communicate()
                    self.children.discard(p)
                    if p.returncode != 0:
                        errors.append(f"node {i}: {err.decode(errors='replace').strip()[-300:]}")
                    del procs[i]
            time.sleep(0.05)
        if errors:
            raise LabError(f"rmi {image} failed: " + "; ".join(errors))

    def verify(self, image, nodes):
        res = {"checked": 0, "ok": 0, "failures": []}
        todo = list(nodes)
        procs = {}
        while todo or procs:
            while todo and len(procs) < 2:
                i = todo.pop(0)
                procs[i] = self._spawn([LAB_SH, "check", str(i), image], subprocess.PIPE, subprocess.PIPE)
            for i, p in list(procs.items()):
                if p.poll() is not None:
                    out, err = p.communicate()
                    self.children.discard(p)
                    res["checked"] += 1
                    if p.returncode == 0 and b"check-ok" in out:
                        res["ok"] += 1
                    else:
                        msg = (out + err).decode(errors="replace").strip().splitlines()[-3:]
                        res["failures"].append({"node": i, "output": msg})
                    del procs[i]
            time.sleep(0.05)
        return res

    # ---- pulls

    def run_batch(self, label, batch, image, image_bytes, timeout):
        """Starts `lab.sh pull` on every node of the batch at once; waits for all.
        Returns {node: {...}}."""
        net0 = self.net()
        procs = {}
        t0 = time.monotonic()
        for i in batch:
            o = open(os.path.join(self.tmp, f"pull{i}.out"), "w+b")
            e = open(os.path.join(self.tmp, f"pull{i}.err"), "w+b")
            procs[i] = (self._spawn([LAB_SH, "pull", str(i), image], o, e), o, e, time.monotonic())
        res = {}
        next_beat = t0 + self.a.heartbeat
        while len(res) < len(procs):
            time.sleep(0.05)
            now = time.monotonic()
            for i, (p, o, e, ts) in procs.items():
                if i in res:
                    continue
                rc = p.poll()
                if rc is None and now - ts > timeout:
                    self._kill(p, signal.SIGKILL)
                    p.wait()
                    rc = "timeout"
                if rc is None:
                    continue
                wall = now - ts
                self.children.discard(p)
                o.seek(0)
                e.seek(0)
                out = o.read().decode(errors="replace")
                err = e.read().decode(errors="replace")
                o.close()
                e.close()
                m = re.search(r"^pull-seconds ([0-9.]+)", out, re.M)
                r = {"node": i, "ok": rc == 0 and m is not None, "wall_seconds": round(wall, 3)}
                if r["ok"]:
                    r["seconds"] = float(m.group(1))
                else:
                    r["seconds"] = None
                    r["error"] = f"timeout after {timeout:.0f} s" if rc == "timeout" else \
                        f"exit {rc}: " + " | ".join(err.strip().splitlines()[-4:])
                    log(f"[pull] FAILED {label} node {i}: {r['error']}")
                res[i] = r
            if now >= next_beat and len(res) < len(procs):
                next_beat = now + self.a.heartbeat
                n1 = self.net()
                got = sum(n1[i] - net0[i] for i in batch)
                regb = n1["registry"] - net0["registry"]
                want = image_bytes * len(batch)
                running = [str(i) for i in batch if i not in res]
                log(f"[pull] {label}: {now - t0:.0f} s, {len(res)}/{len(batch)} done "
                    f"(running: {','.join(running)}), received {fmt_bytes(got)}/{fmt_bytes(want)} "
                    f"({min(100, 100 * got / max(1, want)):.0f}%), registry sent {fmt_bytes(regb)}")
        return res, round(time.monotonic() - t0, 3)

    def run_mode(self, case, mode, case_label):
        a = self.a
        scen, size, layers = case
        tag = f"{mode}-{self.runid}"
        repo = f"loadtest/{scen}-{size}m-{layers}l"
        image = f"{REGISTRY}/{repo}:{tag}"
        label0 = f"scenario={scen} size={ltlib.size_label(size)} layers={layers} mode={mode}"
        log(f"[push] {label0}: pushing a fresh random image {repo}:{tag}")
        blobs, push_s = self.push(f"{repo}:{tag}", layers, size)
        image_bytes = sum(b["bytes"] or 0 for b in blobs)
        self.set_peerd(mode == "peerd")
        rec = {"mode": mode, "image": image, "blobs": blobs, "image_bytes": image_bytes,
               "push_seconds": push_s, "started_at": datetime.datetime.now().isoformat(timespec="seconds")}
        if mode == "peerd":
            mesh_s, low = self.wait_mesh()
            rec["peerd"] = {"mesh_wait_seconds": mesh_s, "peers_min": low}
        bs = batches_of(scen, a.nodes, a.batch_size)
        timeout = 180 + 4 * a.nodes * image_bytes / (a.rate_bps or 50e6)

        # before
        counts0 = {b["digest"]: self.reglog_count(b["digest"]) for b in blobs}
        off0 = self.access_offset()
        net0 = self.net()
        m0 = self.scrape_all() if mode == "peerd" else {}
        log_off = {}
        if mode == "peerd":
            for i in range(1, a.nodes + 1):
                try:
                    log_off[i] = os.path.getsize(self.peerd_log(i))
                except OSError:
                    log_off[i] = 0

        t0 = time.monotonic()
        pulls = []
        batches = []
        done_nodes = []
        for bi, batch in enumerate(bs):
            label = f"{label0} batch {bi + 1}/{len(bs)} nodes {','.join(map(str, batch))}"
            b = {"index": bi + 1, "nodes": batch, "start_offset_seconds": round(time.monotonic() - t0, 3)}
            if mode == "peerd" and done_nodes:
                # How much the nodes that finished already announce (no waiting: the rollout
                # goes on as soon as the previous batch is done).
                adv = {}
                for i in done_nodes:
                    s = self.scrape(i)
                    adv[i] = int(ltlib.prom_sum(s, "peerd_advertised_keys")) if s is not None else None
                b["advertised_keys_of_done_nodes"] = adv
            log(f"[pull] {label}: start")
            res, wall = self.run_batch(label, batch, image, image_bytes, timeout)
            b["wall_seconds"] = wall
            secs = [res[i]["seconds"] for i in batch if res[i]["ok"]]
            log(f"[pull] {label}: done in {wall:.1f} s (pull s: "
                + ", ".join(f"n{i}={fmt_s(res[i]['seconds'], 2)}" for i in batch) + ")")
            for i in batch:
                res[i]["batch"] = bi + 1
                pulls.append(res[i])
            b["pull_seconds"] = ltlib.summarize(secs)
            batches.append(b)
            done_nodes += batch
        rec["wall_seconds"] = round(time.monotonic() - t0, 3)

        # after
        m1 = self.scrape_all() if mode == "peerd" else {}
        net1 = self.net()
        lines, _ = ltlib.read_from(self.access_log(), off0)
        gets = ltlib.parse_access(lines)
        counts1 = {b["digest"]: self.reglog_count(b["digest"]) for b in blobs}
        ip2node = {node_ip(i): i for i in range(1, a.nodes + 1)}
        digests = {b["digest"] for b in blobs}
        per_node = {i: {"registry_blob_bytes": 0, "registry_blob_gets": 0, "registry_manifest_gets": 0,
                        "registry_other_gets": 0, "registry_blob_bytes_to_peerd": 0}
                    for i in range(1, a.nodes + 1)}
        foreign = 0
        for ip, kind, ref, nbytes, by_peerd in gets:
            i = ip2node.get(ip)
            if i is None:
                foreign += 1
                continue
            if kind == "blob":
                per_node[i]["registry_blob_bytes"] += nbytes
                per_node[i]["registry_blob_gets"] += 1
                if by_peerd:
                    per_node[i]["registry_blob_bytes_to_peerd"] += nbytes
                if ref not in digests:
                    per_node[i]["registry_other_gets"] += 1
            elif kind == "manifest":
                per_node[i]["registry_manifest_gets"] += 1
            else:
                per_node[i]["registry_other_gets"] += 1
        for p in pulls:
            i = p["node"]
            p.update(per_node[i])
            p["net_received_bytes"] = net1[i] - net0[i]
            p["net_sent_bytes"] = net1[f"sent{i}"] - net0[f"sent{i}"]
            if mode == "peerd":
                s0, s1 = m0.get(i), m1.get(i)
                if s0 is not None and s1 is not None:
                    p["peer_bytes"] = int(ltlib.prom_sum(s1, "peerd_bytes_served_total", source="peer")
                                          - ltlib.prom_sum(s0, "peerd_bytes_served_total", source="peer"))
                    p["upstream_served_bytes"] = int(
                        ltlib.prom_sum(s1, "peerd_bytes_served_total", source="upstream")
                        - ltlib.prom_sum(s0, "peerd_bytes_served_total", source="upstream"))
                    p["served_to_peers_bytes"] = int(
                        ltlib.prom_sum(s1, "peerd_bytes_served_total", source="local")
                        - ltlib.prom_sum(s0, "peerd_bytes_served_total", source="local"))
                    p["fetched_from_peers_bytes"] = int(
                        ltlib.prom_sum(s1, "peerd_bytes_fetched_total", **{"from": "peer"})
                        - ltlib.prom_sum(s0, "peerd_bytes_fetched_total", **{"from": "peer"}))
                    c0 = ltlib.prom_by(s0, "peerd_requests_total", "code")
                    c1 = ltlib.prom_by(s1, "peerd_requests_total", "code")
                    p["peerd_requests_by_code"] = {k: int(v - c0.get(k, 0)) for k, v in c1.items()
                                                   if v - c0.get(k, 0) > 0}
                    mm0 = ltlib.prom_sum(s0, "peerd_digest_mismatch_total")
                    mm1 = ltlib.prom_sum(s1, "peerd_digest_mismatch_total")
                    if mm1 > mm0:
                        self.anomaly(f"{label0}: node {i} counted {int(mm1 - mm0)} digest mismatches")
                else:
                    p["peer_bytes"] = None
                    self.anomaly(f"{label0}: no metrics from peerd on node {i} "
                                 f"({'before' if s0 is None else 'after'} the run): did it die?")
        rec["pulls"] = pulls
        rec["batches"] = batches
        ok_secs = [p["seconds"] for p in pulls if p["ok"]]
        rec["pull_seconds"] = ltlib.summarize(ok_secs)
        rec["failed"] = sum(1 for p in pulls if not p["ok"])

        per_blob = {d: counts1[d] - counts0[d] for d in counts0}
        # GETs a blob took beyond its first: what peerd exists to avoid. (Attributed by request,
        # not by node: with pull-through the node that fetches a blob for the cluster is the
        # blob's home, which need not be one of the nodes pulling at that moment.)
        redundant = sum(max(0, v - 1) for v in per_blob.values())
        by_containerd = sum(1 for _, kind, ref, _, by_peerd in gets if kind == "blob" and ref in digests
                            and not by_peerd)
        rec["registry_gets_per_blob"] = {
            "per_blob": per_blob,
            "max": max(per_blob.values()) if per_blob else None,
            "mean": round(sum(per_blob.values()) / len(per_blob), 2) if per_blob else None,
            "redundant_total": redundant,
            "from_containerd_directly": by_containerd,
        }
        upstream = sum(per_node[i]["registry_blob_bytes"] for i in per_node)
        upstream_via_peerd = sum(per_node[i]["registry_blob_bytes_to_peerd"] for i in per_node)
        peer = sum(p.get("peer_bytes") or 0 for p in pulls) if mode == "peerd" else 0
        upstream_served = sum(p.get("upstream_served_bytes") or 0 for p in pulls) if mode == "peerd" else 0
        rec["bytes"] = {
            "expected_total": image_bytes * a.nodes,
            "upstream": upstream,
            "upstream_via_peerd": upstream_via_peerd,
            "served_from_upstream_by_peerd": upstream_served,
            "upstream_manifest_gets": sum(per_node[i]["registry_manifest_gets"] for i in per_node),
            "peer": peer,
            "peer_share": round(peer / (peer + upstream), 4) if peer + upstream else None,
            "registry_net_sent": net1["registry"] - net0["registry"],
            "foreign_registry_gets": foreign,
        }
        if mode == "peerd":
            rec["bytes"]["served_to_peers"] = sum(p.get("served_to_peers_bytes") or 0 for p in pulls)
            rec["bytes"]["fetched_from_peers"] = sum(p.get("fetched_from_peers_bytes") or 0 for p in pulls)
        if foreign:
            self.anomaly(f"{label0}: {foreign} registry GETs from addresses that are not lab nodes")
        # Every pulled byte came from the registry directly (containerd's own GETs), from peerd's
        # pull-through (served with source="upstream" by the node that fetched it), or from peers.
        delivered = (upstream - upstream_via_peerd) + upstream_served + peer
        if not rec["failed"] and delivered < 0.98 * image_bytes * a.nodes:
            self.anomaly(f"{label0}: direct registry + pull-through + peer bytes {delivered} < the "
                         f"{a.nodes} x {image_bytes} bytes the nodes pulled (accounting gap)")

        # peerd's log during the run: warnings and errors
        if mode == "peerd":
            warn = err = 0
            samples = []
            for i in range(1, a.nodes + 1):
                lines_i, _ = ltlib.read_from(self.peerd_log(i), log_off.get(i, 0))
                for line in lines_i:
                    if re.search(r"\s(WARN|ERROR)\s", line):
                        if " ERROR " in line:
                            err += 1
                        else:
                            warn += 1
                        short = re.sub(r"^\S+\s+", "", line)[:240]
                        if len(samples) < 12 and short not in [s.split(": ", 1)[1] for s in samples]:
                            samples.append(f"node {i}: {short}")
            rec["peerd"].update({"log_warnings": warn, "log_errors": err, "log_samples": samples})
            if err or warn:
                self.anomaly(f"{label0}: peerd logged {warn} warning(s) and {err} error(s), e.g. "
                             + (samples[0] if samples else ""))
            # With pull-through, the registry should serve each blob once, whatever the scenario.
            if redundant:
                self.anomaly(f"{label0}: the registry served blobs {redundant} time(s) more than once each "
                             f"({by_containerd} GET(s) came from containerd directly, not through peerd)")

        # verify, clean up
        if a.verify == "all" or (a.verify == "peerd" and mode == "peerd"):
            ok_nodes = [p["node"] for p in pulls if p["ok"]]
            v = self.verify(image, ok_nodes)
            rec["verify"] = v
            if v["failures"]:
                self.anomaly(f"{label0}: byte-for-byte check FAILED on {len(v['failures'])} node(s): "
                             f"{v['failures'][:2]}")
            else:
                log(f"[check] {label0}: {v['ok']}/{v['checked']} nodes verified byte for byte")
        self.rmi_all(image)
        if mode == "peerd":
            # peerd should stop announcing what containerd removed.
            base = {i: ltlib.prom_sum(m0[i], "peerd_advertised_keys") if m0.get(i) else 0
                    for i in range(1, a.nodes + 1)}
            t = time.monotonic()
            while True:
                cur = {i: self.scrape(i) for i in range(1, a.nodes + 1)}
                cur = {i: (ltlib.prom_sum(s, "peerd_advertised_keys") if s is not None else None)
                       for i, s in cur.items()}
                stale = {i: v for i, v in cur.items() if v is not None and v > base[i]}
                if not stale or time.monotonic() - t > 10:
                    break
                time.sleep(0.25)
            rec["peerd"]["advertised_keys_after_rmi"] = {str(i): v for i, v in cur.items()}
            rec["peerd"]["withdraw_seconds"] = round(time.monotonic() - t, 2) if not stale else None
            if stale:
                self.anomaly(f"{label0}: 10 s after the image was removed everywhere, peerd still "
                             f"advertises more keys than before the run: {stale} (before: "
                             f"{ {i: base[i] for i in stale} })")
        st = rec["pull_seconds"]
        log(f"[done] {label0}: p50 {fmt_s(st['p50'], 2)} s, p90 {fmt_s(st['p90'], 2)} s, "
            f"max {fmt_s(st['max'], 2)} s, registry {fmt_bytes(upstream)}, peers {fmt_bytes(peer)}, "
            f"registry GETs/blob max {rec['registry_gets_per_blob']['max']}"
            + (f", {rec['failed']} FAILED" if rec["failed"] else ""))
        return rec

    # ---- the whole run

    def host_info(self, bin_src, bin_copy):
        def sh(*cmd):
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip()
            except Exception:
                return ""
        rev = sh("git", "rev-parse", "--short", "HEAD")
        if sh("git", "status", "--porcelain", "--untracked-files=no"):
            rev += "+dirty"
        with open(bin_copy, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        cpu = ""
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            pass
        return {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "git": rev, "peerd_bin": bin_src,
            "peerd_bin_mtime": datetime.datetime.fromtimestamp(os.path.getmtime(bin_src)).isoformat(timespec="seconds"),
            "peerd_bin_sha256": digest, "peerd_version": sh(bin_copy, "--version"),
        }

    def write_json(self):
        os.makedirs(os.path.dirname(self.out) or ".", exist_ok=True)
        tmp = self.out + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.out + ".json")

    def save_failure_logs(self):
        d = self.out + "-failure"
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d, exist_ok=True)
        for i in range(1, self.a.nodes + 1):
            for name in ("peerd.log", "peerd.log.prev", "pull.log", "containerd.log"):
                src = os.path.join(LAB_DIR, f"node{i}", name)
                if os.path.exists(src):
                    with open(src, "rb") as f:
                        data = f.read()[-60000:]
                    with open(os.path.join(d, f"node{i}-{name}"), "wb") as g:
                        g.write(data)
        if os.path.exists(self.access_log()):
            with open(self.access_log(), "rb") as f:
                data = f.read()[-60000:]
            with open(os.path.join(d, "registry-access.log"), "wb") as g:
                g.write(data)
        try:
            _, out, err = self.lab("status", timeout=30, check=False)
            with open(os.path.join(d, "status"), "w") as g:
                g.write(out + err)
        except Exception:
            pass
        log(f"logs of the failed run saved in {rel(d)}")

    def run(self):
        a = self.a
        total_est, per_case = estimate(a)
        cases = [(s, z, lay) for s in a.scenarios for z in a.sizes for lay in a.layers]
        log(f"plan: {len(cases)} case(s) x modes {','.join(a.modes)} on {a.nodes} nodes, registry {a.rate}, "
            f"rolling batches of {a.batch_size}; estimated {fmt_dur(total_est)} once the lab lock is held")
        if a.dry_run:
            for c in cases:
                bs = batches_of(c[0], a.nodes, a.batch_size)
                print(f"{c[0]:<12} {ltlib.size_label(c[1]):>8} {c[2]} layer(s): batches "
                      f"{' '.join(','.join(map(str, b)) for b in bs)}  ~{fmt_dur(per_case[c])}")
            print(f"estimated total: {fmt_dur(total_est)}")
            shutil.rmtree(self.tmp, ignore_errors=True)
            return 0

        src = os.environ.get("PEERD_BIN") or os.path.join(
            os.environ.get("CARGO_TARGET_DIR", "/root/.cache/peerd/target"), "release", "peerd")
        if "peerd" in a.modes and not os.access(src, os.X_OK):
            raise SystemExit(f"peerd binary not found: {src} (cargo build --release, or set PEERD_BIN)")

        # ---- the session lock (flock(2), like `flock` in the shell scripts)
        fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited (PEP 446)
        tl = time.monotonic()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for the lab session lock {SESSION_LOCK} (another session holds it; this can take minutes)")
            last = time.monotonic()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(1)
                    if time.monotonic() - last > 60:
                        last = time.monotonic()
                        log(f"still waiting for the lab session lock ({fmt_dur(time.monotonic() - tl)})")
        lock_wait = round(time.monotonic() - tl, 1)
        log(f"got the lab session lock after {lock_wait} s")
        t_start = time.monotonic()

        copy = os.path.join(self.tmp, "peerd")
        if os.path.exists(src):
            shutil.copy2(src, copy)
        else:
            open(copy, "wb").close()
        self.env["PEERD_BIN"] = copy
        cmdline = "python3 bench/loadtest.py " + " ".join(sys.argv[1:])
        self.doc = {
            "benchmark": "loadtest", "command": cmdline.strip(), "complete": False,
            "host": self.host_info(src, copy),
            "params": {"nodes": a.nodes, "registry_rate": a.rate, "registry_rate_bytes_per_s": a.rate_bps,
                       "sizes_mib": a.sizes, "layers": a.layers, "scenarios": a.scenarios, "modes": a.modes,
                       "batch_fraction": a.batch_fraction, "batch_size": a.batch_size, "verify": a.verify,
                       "peerd_flags": a.peerd_flag, "lock_wait_seconds": lock_wait,
                       "estimated_seconds": round(total_est)},
            "method": {
                "pull_seconds": "lab.sh pull (ctr images pull incl. unpack), per node",
                "percentiles": "linear interpolation between closest ranks (numpy default)",
                "upstream": "bytes of blob GETs answered 200/206 in the registry access log from node IPs",
                "peer": "delta of peerd_bytes_served_total{source=\"peer\"} summed over nodes",
                "registry_gets_per_blob": "delta of lab.sh registry-log-count per blob (layers + config)",
            },
            "cases": [], "anomalies": self.anomalies,
        }
        failed = False
        try:
            self.lab_touched = True
            self.lab("down", timeout=300, check=False)  # a clean slate
            up_args = ["up", a.nodes] + (["--registry-rate", a.rate] if a.rate_bps else [])
            _, out, _ = self.lab(*up_args, timeout=600)
            log(f"[lab] up: {a.nodes} nodes, registry egress {a.rate} ({out.strip()})")
            order = list(a.modes)
            if self.peerd_on is False and order[0] == "peerd" and len(order) > 1:
                order = order[::-1]            # begin with what needs no peerd start
            for ci, case in enumerate(cases):
                scen, size, layers = case
                done_s = time.monotonic() - t_start
                rest = sum(per_case[c] for c in cases[ci:])
                log(f"[case {ci + 1}/{len(cases)}] scenario={scen} size={ltlib.size_label(size)} "
                    f"layers={layers} modes {'/'.join(order)}; elapsed {fmt_dur(done_s)}, "
                    f"~{fmt_dur(rest)} to go")
                crec = {"scenario": scen, "size_mib": size, "layers": layers, "batch_size": a.batch_size,
                        "batches": [len(b) for b in batches_of(scen, a.nodes, a.batch_size)],
                        "order": list(order), "modes": {}}
                self.doc["cases"].append(crec)
                for mode in order:
                    crec["modes"][mode] = self.run_mode(case, mode, "")
                    self.finish_case(crec)
                    self.write_json()
                order = order[::-1]
            self.doc["complete"] = True
        except Interrupted as e:
            failed = True
            log(f"interrupted ({e}); cleaning up")
            self.doc["error"] = f"interrupted ({e})"
        except (LabError, OSError, ValueError) as e:
            failed = True
            log(f"ERROR: {e}")
            self.doc["error"] = str(e)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self.kill_children()
            if self.lab_touched:
                if failed:
                    try:
                        self.save_failure_logs()
                    except Exception as e:  # noqa: BLE001
                        log(f"could not save logs: {e}")
                log("[lab] taking the lab down")
                try:
                    rc, _, err = self.lab("down", timeout=300, check=False)
                    if rc != 0:
                        log(f"lab down failed (exit {rc}): {err.strip()[-500:]}")
                except Exception as e:  # noqa: BLE001
                    log(f"lab down failed: {e}")
            os.close(fd)  # releases the session lock
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.doc["run_seconds"] = round(time.monotonic() - t_start, 1)
        self.doc["host"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        self.write_json()
        self.report()
        if failed and self.doc.get("error", "").startswith("interrupted"):
            return 130
        pulls_failed = sum(m.get("failed", 0) for c in self.doc["cases"] for m in c["modes"].values())
        checks_failed = sum(len((m.get("verify") or {}).get("failures", []))
                            for c in self.doc["cases"] for m in c["modes"].values())
        return 1 if failed or pulls_failed or checks_failed else 0

    def finish_case(self, c):
        pe, ba = c["modes"].get("peerd"), c["modes"].get("baseline")
        for q in ("p50", "p90", "max"):
            v = None
            if pe and ba and pe["pull_seconds"][q] and ba["pull_seconds"][q]:
                v = round(pe["pull_seconds"][q] / ba["pull_seconds"][q], 3)
            c[f"{q}_ratio"] = v
        c["target_met"] = (c["p50_ratio"] <= 0.15) if (c["scenario"] == "rolling" and c["p50_ratio"] is not None) \
            else None

    # ---- report

    def report(self):
        doc = self.doc
        a = self.a
        svg = ltplot.render(doc)
        with open(self.out + ".svg", "w") as f:
            f.write(svg)
        png = self.to_png(self.out + ".svg", self.out + ".png")
        doc["plot"] = {"svg": rel(self.out + ".svg"), "png": rel(png) if png else None}
        self.write_json()

        rows = []
        for c in doc["cases"]:
            for mode in ("peerd", "baseline"):
                m = c["modes"].get(mode)
                if not m:
                    continue
                st = m["pull_seconds"]
                g = m["registry_gets_per_blob"]
                gtxt = f"{g['max']} ({g['mean']:g})" if g["max"] is not None else "-"
                ratio = ""
                if mode == "peerd" and c.get("p50_ratio") is not None:
                    ratio = f"{c['p50_ratio']:.2f}x / {c['p90_ratio']:.2f}x"
                rows.append([c["scenario"], ltlib.size_label(c["size_mib"]), c["layers"], mode,
                             fmt_s(st["p50"], 2), fmt_s(st["p90"], 2), fmt_s(st["max"], 2),
                             m["failed"] or "", fmt_bytes(m["bytes"]["upstream"]),
                             fmt_bytes(m["bytes"]["peer"]) if mode == "peerd" else "-",
                             gtxt, ratio])
        print()
        print(f"peerd load test: {a.nodes} nodes, registry {a.rate}, rolling batches of {a.batch_size}, "
              f"git {doc['host']['git']}, {doc['host']['date']}"
              + ("" if doc["complete"] else f"  ** INCOMPLETE: {doc.get('error', '')} **"))
        print(ltlib.table(rows, ["scenario", "size", "layers", "mode", "p50 s", "p90 s", "max s", "failed",
                                 "registry", "peers", "reg GETs/blob max (mean)", "p50/p90 vs baseline"],
                          "lllrrrrrrrlr"))
        print()
        for c in doc["cases"]:
            if c["scenario"] != "rolling" or c.get("p50_ratio") is None:
                continue
            pe = c["modes"]["peerd"]
            g = pe["registry_gets_per_blob"]
            tgt = "MET" if c["target_met"] else "NOT MET"
            print(f"target rolling {ltlib.size_label(c['size_mib'])} {c['layers']}L: p50 peerd/baseline "
                  f"{c['p50_ratio']:.3f} (<= 0.15: {tgt}); p90 ratio {c['p90_ratio']:.3f}; registry GETs per "
                  f"blob max {g['max']} (target 1: {'MET' if g['max'] == 1 else 'NOT MET'}; "
                  f"{g['redundant_total']} redundant GET(s), {g['from_containerd_directly']} from containerd directly)")
        for c in doc["cases"]:
            if c["scenario"] != "simultaneous" or c.get("p50_ratio") is None:
                continue
            g = c["modes"]["peerd"]["registry_gets_per_blob"]
            print(f"simultaneous {ltlib.size_label(c['size_mib'])} {c['layers']}L: p50 peerd/baseline "
                  f"{c['p50_ratio']:.3f}, p90 {c['p90_ratio']:.3f}; registry GETs per blob max {g['max']}")
        if self.anomalies:
            print("\nanomalies:")
            for x in self.anomalies:
                print(f"  - {x}")
        print(f"\nrun time {fmt_dur(doc.get('run_seconds', 0))} (estimate {fmt_dur(doc['params']['estimated_seconds'])},"
              f" lock wait {fmt_dur(doc['params']['lock_wait_seconds'])})")
        print(f"json: {rel(self.out + '.json')}")
        print(f"plot: {doc['plot']['svg']}" + (f"  {doc['plot']['png']}" if doc["plot"]["png"] else ""))

    def to_png(self, svg, png):
        """PNG next to the SVG if a renderer is at hand (rsvg-convert, else headless chromium)."""
        try:
            os.unlink(png)
        except OSError:
            pass
        m = re.search(r'width="(\d+)" height="(\d+)"', open(svg).read(400))
        w, h = (int(m.group(1)), int(m.group(2))) if m else (1300, 800)
        cmds = []
        if shutil.which("rsvg-convert"):
            cmds.append(["rsvg-convert", "-o", png, svg])
        chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if chrome:
            prof = tempfile.mkdtemp(prefix="peerd-loadtest-chrome.")
            cmds.append([chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                         f"--user-data-dir={prof}", f"--screenshot={png}", f"--window-size={w},{h}",
                         "file://" + os.path.abspath(svg)])
        for cmd in cmds:
            try:
                subprocess.run(cmd, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, NO_PROXY="*", no_proxy="*"))
            except Exception:  # noqa: BLE001
                continue
            if os.path.exists(png) and os.path.getsize(png) > 0:
                break
        if chrome:
            shutil.rmtree(prof, ignore_errors=True)
        return png if os.path.exists(png) and os.path.getsize(png) > 0 else None


def main(argv=None):
    a = parse_args(argv)
    if os.geteuid() != 0 and not a.dry_run:
        raise SystemExit("must run as root (the lab uses network namespaces)")
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    h = Harness(a)
    try:
        return h.run()
    except Interrupted as e:
        log(f"interrupted ({e}) before the lab was touched")
        shutil.rmtree(h.tmp, ignore_errors=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
