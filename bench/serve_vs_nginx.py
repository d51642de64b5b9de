#!/usr/bin/env python3
"""peerd (one shard) against nginx (one worker), both serving blobs with sendfile from a page-cache
warm content directory over loopback.

For each cell (blob size x concurrent streams) and server, measures
  - throughput: body MiB received by the clients / wall seconds of the load;
  - MiB per server CPU-second: body MiB / (utime+stime of the server processes over the load):
    the whole peerd process (shard, control thread, timer thread), nginx master + worker;
and reports peerd/nginx ratios, for both of peerd's io engines.

The machine is shared and noisy, so the servers take turns in short slices: one repetition of a
cell is SLICES rounds of (nginx, peerd io_uring, peerd epoll), the order rotating every slice, and
each server's bytes and CPU time are summed over its slices. A repetition thus yields one
peerd/nginx ratio measured under the same background load; the table shows medians over the
repetitions (of each server's figures, and of the per-repetition ratios).

Servers are pinned to CPU 0 and the load (bench/lib/httpload.py: one process per stream, keep-alive,
1 MiB recv_into buffer) to CPU 1, unless --no-pin. "other on CPU 0" is the time CPU 0 spent on
anything but the measured server during its slices: the noise of the run.

    bench/serve_vs_nginx.py [--reps 5] [--slices 4] [--slice-seconds 1] [--profile] [--quick]

Writes bench/results/serve_vs_nginx.json. Numbers are ratios against nginx measured in the same
invocation, not pass/fail thresholds.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import benchlib as B  # noqa: E402

MiB = B.MiB
BIG = 64 * MiB  # blobs from this size on are downloaded whole, a number of times per stream


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each cell (medians reported)")
    ap.add_argument("--slices", type=int, default=4, help="turns per server within one repetition")
    ap.add_argument("--sizes-mib", default="4,512", help="blob sizes in MiB, comma-separated")
    ap.add_argument("--streams", default="1,4", help="concurrent client streams, comma-separated")
    ap.add_argument("--engines", default="io-uring,epoll", help="peerd --io-engine values to compare")
    ap.add_argument("--peerd-bins", default="",
                    help="compare several peerd builds: LABEL=PATH,LABEL=PATH (each run with every engine); "
                         "default: the one binary (PEERD_BIN or $CARGO_TARGET_DIR/release/peerd)")
    ap.add_argument("--slice-seconds", type=float, default=1.0,
                    help="seconds of load per slice for blobs under 64 MiB (repeated keep-alive GETs)")
    ap.add_argument("--slice-mib", type=int, default=1024,
                    help="for blobs of 64 MiB and more: MiB per slice, as whole downloads split over the streams "
                         "(at least one download per stream)")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each repetition of a cell, wait up to this many seconds for the rest of the "
                         "machine to use under 0.3 cores (0: do not wait)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin servers to CPU 0 and clients to CPU 1")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, profile each server (perf record, else strace -c -f) on 4 MiB x 4 streams "
                         "and on the largest blob x 1 stream")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 rep, 1 slice, 64 MiB big blob, no wait")
    ap.add_argument("--name", default="serve_vs_nginx", help="results file name (bench/results/NAME.json)")
    a = ap.parse_args()
    if a.quick:
        if a.name == "serve_vs_nginx":
            a.name = "serve_vs_nginx-quick"  # a smoke test never replaces the real results
        a.reps, a.slices, a.slice_seconds, a.slice_mib, a.quiet_wait = 1, 1, 0.5, 256, 0
        a.sizes_mib = ",".join("64" if int(s) >= 64 else s for s in a.sizes_mib.split(","))
    a.sizes = [int(s) * MiB for s in a.sizes_mib.split(",")]
    a.streams = [int(s) for s in a.streams.split(",")]
    a.engines = [e for e in a.engines.split(",") if e]
    a.bins = []
    for item in filter(None, a.peerd_bins.split(",")):
        label, sep, path = item.partition("=")
        if not sep or not label or not os.access(path, os.X_OK):
            ap.error(f"--peerd-bins: want LABEL=EXECUTABLE, got {item!r}")
        a.bins.append((label, os.path.abspath(path)))
    if a.reps < 1 or a.slices < 1 or any(s < 1 for s in a.streams) or any(s < 1 for s in a.sizes):
        ap.error("reps, slices, streams and sizes must be >= 1")
    return a


def load_of(size, streams, a):
    if size < BIG:
        return dict(duration=a.slice_seconds)
    return dict(requests_per_stream=max(1, round(a.slice_mib * MiB / (streams * size))))


def run_slice(server, hexd, size, streams, a, client_cpu, pinned):
    """One measured slice of load against one server."""
    is_peerd = server.name.startswith("peerd")
    threads0 = B.threads_cpu_s(server.pid) if is_peerd else {}
    sys0 = B.cpu_times()
    c0 = server.cpu_s()
    res = B.httpload(server.url(hexd), streams, expect_size=size, cpu=client_cpu, **load_of(size, streams, a))
    c1 = server.cpu_s()
    sys1 = B.cpu_times()
    threads1 = B.threads_cpu_s(server.pid) if is_peerd else {}
    s = {"bytes": res["bytes"], "requests": res["requests"], "errors": res["errors"], "wall_s": res["wall_s"],
         "server_cpu_s": c1 - c0, "client_cpu_s": res["client_cpu_s"]}
    if pinned:
        s["other_on_cpu0_s"] = max(0.0, (sys1["cpu0"][0] - sys0["cpu0"][0]) - (c1 - c0))
    if threads1:
        s["threads_cpu_s"] = {k: threads1[k] - threads0.get(k, 0.0) for k in threads1}
    return s


def aggregate(slices):
    """One repetition of one server: its slices summed."""
    tot = {k: sum(x[k] for x in slices) for k in ("bytes", "requests", "errors", "wall_s", "server_cpu_s",
                                                  "client_cpu_s")}
    if "other_on_cpu0_s" in slices[0]:
        tot["other_on_cpu0_s"] = sum(x["other_on_cpu0_s"] for x in slices)
    th = {}
    for x in slices:
        for k, v in x.get("threads_cpu_s", {}).items():
            th[k] = th.get(k, 0.0) + v
    if th:
        tot["threads_cpu_s"] = {k: round(v, 3) for k, v in th.items()}
    mib = tot["bytes"] / MiB
    tot["mib_per_s"] = mib / tot["wall_s"] if tot["wall_s"] > 0 else None
    tot["mib_per_cpu_s"] = mib / tot["server_cpu_s"] if tot["server_cpu_s"] > 0 else None
    for k in ("wall_s", "server_cpu_s", "client_cpu_s", "other_on_cpu0_s"):
        if k in tot:
            tot[k] = round(tot[k], 3)
    tot["slices"] = len(slices)
    return tot


def profile(servers, blobs, a, client_cpu):
    """Flat profiles (self time) of each server: where the CPU goes."""
    perf, strace = shutil.which("perf"), shutil.which("strace")
    if not perf and not strace:
        B.log("neither perf nor strace found: no profile (apt-get install linux-perf)")
        return None
    cases = []
    small = [b for b in blobs if b[1] < BIG]
    if small:
        cases.append((small[0], 4, dict(duration=4.0)))
    big = max(blobs, key=lambda b: b[1])
    cases.append((big, 1, dict(requests_per_stream=max(1, round(2048 * MiB / big[1])))))
    out = {}
    for (hexd, size), streams, load in cases:
        case = f"{size // MiB} MiB x {streams}"
        for s in servers:
            target = s.pids()[-1]  # nginx: the worker; peerd: the process
            pdir = os.path.join(os.path.dirname(s.log), "profile")
            os.makedirs(pdir, exist_ok=True)
            data = os.path.join(pdir, f"{size}-{streams}.{'perf' if perf else 'strace'}")
            if perf:
                argv = [perf, "record", "-q", "-F", "1999", "-p", str(target), "-o", data]
            else:
                argv = [strace, "-c", "-f", "-o", data, "-p", str(target)]
            p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            B._procs.append(("profiler", p))
            time.sleep(0.5)
            c0 = s.cpu_s()
            res = B.httpload(s.url(hexd), streams, expect_size=size, cpu=client_cpu, **load)
            cpu = s.cpu_s() - c0
            B.stop(p, "profiler", timeout=30)
            B._procs.remove(("profiler", p))
            if perf:
                rep = subprocess.run([perf, "report", "-i", data, "--no-children", "--sort", "sym", "--stdio",
                                      "--percent-limit", "0.7"], capture_output=True, text=True, timeout=300).stdout
                lines = [ln.strip() for ln in rep.splitlines() if ln.strip() and not ln.startswith("#")]
                tool = "perf record -F 1999, self time by symbol, >= 0.7%"
            else:
                with open(data) as f:
                    lines = f.read().splitlines()
                tool = "strace -c -f"
            out.setdefault(case, {})[s.name] = {
                "tool": tool, "top": lines[:30],
                "mib_per_cpu_s_while_profiled": round(res["bytes"] / MiB / cpu, 1) if cpu > 0 else None}
    return out


def main():
    a = parse()
    B.install_cleanup()
    if not a.bins and not os.access(B.peerd_bin(), os.X_OK):
        sys.exit(f"peerd binary not found: {B.peerd_bin()} (cargo build --release, or set PEERD_BIN)")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        sys.exit("nginx not found: apt-get install nginx-light")
    pinned = not a.no_pin and (os.cpu_count() or 1) >= 2
    server_cpu, client_cpu = (0, 1) if pinned else (None, None)
    host = B.host_info()

    work = B.tempdir("peerd-bench-serve.")
    # Copies of the binaries: others may rebuild the shared target dir while this runs.
    bins = []
    for label, path in (a.bins or [(None, B.peerd_bin())]):
        os.makedirs(os.path.join(work, f"bin-{label or 'peerd'}"))
        copy = os.path.join(work, f"bin-{label or 'peerd'}", "peerd")  # the process keeps the name peerd
        shutil.copy2(path, copy)
        bins.append((label, copy, path, (B.file_sha256(copy) or "")[:16]))
    content = os.path.join(work, "content")
    blobs = []
    for size in a.sizes:
        t = time.monotonic()
        blobs.append((B.make_blob(content, size), size))
        B.log(f"blob of {size // MiB} MiB written in {time.monotonic() - t:.1f} s")
    os.chmod(work, 0o755)  # nginx's worker runs unprivileged
    B.chmod_path_readable(content)

    servers = [B.Nginx(work, content, cpu=server_cpu)]
    for label, copy, _, _ in bins:
        for e in a.engines:
            p = B.Peerd(work, content, shards=1, engine=e, cpu=server_cpu, bin=copy, label=label)
            if p.engine.replace("_", "-") != e:
                B.log(f"WARNING: {p.name}: --io-engine {e} runs on {p.engine}")
            servers.append(p)
    B.log("servers: " + ", ".join(f"{s.name} (pid {s.pid}, engine {s.engine})" for s in servers))

    # The page cache warm for everyone, then one unmeasured download per server and blob.
    for hexd, size in blobs:
        B.warm(os.path.join(content, "blobs", "sha256", hexd))
    for s in servers:
        for hexd, size in blobs:
            B.httpload(s.url(hexd), 1, expect_size=size, requests_per_stream=1, cpu=client_cpu)

    cells = [(hexd, size, st) for hexd, size in blobs for st in a.streams]
    reps = {}  # (size, streams, server) -> [aggregate per repetition]
    t_start = time.monotonic()
    n = len(servers)
    for rep in range(a.reps):
        for hexd, size, st in cells:
            B.warm(os.path.join(content, "blobs", "sha256", hexd))  # a no-op read unless evicted
            waited, bg = B.wait_quiet(a.quiet_wait) if a.quiet_wait > 0 else (0.0, None)
            sl = {s.name: [] for s in servers}
            for i in range(a.slices):
                k = (rep * a.slices + i) % n
                order = servers[k:] + servers[:k]
                if (rep + i) % 2:
                    order.reverse()
                for s in order:
                    sl[s.name].append(run_slice(s, hexd, size, st, a, client_cpu, pinned))
            line = []
            for s in servers:
                agg = aggregate(sl[s.name])
                agg["background_cores_before"], agg["quiet_waited_s"] = bg, waited
                if agg["errors"]:
                    raise RuntimeError(f"{s.name}: {agg['errors']} failed requests ({size // MiB} MiB x{st})")
                reps.setdefault((size, st, s.name), []).append(agg)
                line.append(f"{s.name} {agg['mib_per_s']:.0f} MiB/s {agg['mib_per_cpu_s']:.0f} MiB/CPU-s"
                            + (f" (other {agg['other_on_cpu0_s']:.1f}s)" if pinned else ""))
            B.log(f"rep {rep + 1}/{a.reps} {size // MiB} MiB x{st}: " + "; ".join(line))
    B.log(f"measured in {time.monotonic() - t_start:.0f} s")
    for s in servers:
        if s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} died during the benchmark; log: {s.log}")

    prof = profile(servers, blobs, a, client_cpu) if a.profile else None

    # ---- summary
    cells_out, rows = [], []
    for hexd, size, st in cells:
        ref = reps[(size, st, "nginx")]
        for s in servers:
            xs = reps[(size, st, s.name)]
            tp = B.median([x["mib_per_s"] for x in xs])
            eff = B.median([x["mib_per_cpu_s"] for x in xs if x["mib_per_cpu_s"]])
            r_tp = [x["mib_per_s"] / y["mib_per_s"] for x, y in zip(xs, ref)]
            r_eff = [x["mib_per_cpu_s"] / y["mib_per_cpu_s"] for x, y in zip(xs, ref)
                     if x["mib_per_cpu_s"] and y["mib_per_cpu_s"]]
            cell = {
                "size_mib": size // MiB, "streams": st, "server": s.name, "engine": s.engine,
                "median_mib_per_s": round(tp, 1), "median_mib_per_cpu_s": round(eff, 1) if eff else None,
                "ratio_throughput_vs_nginx": round(B.median(r_tp), 3),
                "ratio_per_cpu_s_vs_nginx": round(B.median(r_eff), 3) if r_eff else None,
                "ratios_throughput_per_rep": [round(x, 3) for x in r_tp],
                "ratios_per_cpu_s_per_rep": [round(x, 3) for x in r_eff],
                "reps": xs,
            }
            if pinned:
                cell["median_other_on_cpu0_s"] = round(B.median([x["other_on_cpu0_s"] for x in xs]), 2)
            cells_out.append(cell)
            spread = lambda v: f" [{min(v):.2f}-{max(v):.2f}]" if len(v) > 1 else ""
            rows.append([f"{size // MiB} MiB", st, s.name, f"{tp:.0f}", f"{eff:.0f}" if eff else "-",
                         "ref" if s.name == "nginx" else f"{B.median(r_tp):.2f}x{spread(r_tp)}",
                         "ref" if s.name == "nginx" else f"{B.median(r_eff):.2f}x{spread(r_eff)}",
                         f"{B.median([x['server_cpu_s'] for x in xs]):.2f}",
                         f"{cell['median_other_on_cpu0_s']:.2f}" if pinned else "-"])
    print()
    print(f"serve_vs_nginx: peerd --shards 1 vs nginx worker_processes 1, sendfile, page cache warm; "
          f"median of {a.reps} repetitions x {a.slices} interleaved slices; "
          f"{'servers on CPU 0, clients on CPU 1' if pinned else 'unpinned'}; ratios: median [min-max] of the "
          f"per-repetition peerd/nginx ratios")
    print(B.table(rows, ["blob", "streams", "server", "MiB/s", "MiB/CPU-s", "throughput vs nginx",
                         "per CPU-s vs nginx", "server CPU s/rep", "other on CPU 0 s/rep"]))
    if prof:
        for case, per in prof.items():
            for name, p in per.items():
                print(f"\nprofile of {name}, {case} ({p['tool']}; {p['mib_per_cpu_s_while_profiled']} MiB/CPU-s):")
                for ln in p["top"][:14]:
                    print("   " + ln)

    nginx_v = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    path = B.write_json(a.name, {
        "benchmark": "serve_vs_nginx",
        "command": " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), B.REPO)] + sys.argv[1:]),
        "host": host, "nginx": nginx_v,
        "params": {"reps": a.reps, "slices": a.slices, "slice_seconds": a.slice_seconds, "slice_mib": a.slice_mib,
                   "quiet_wait_s": a.quiet_wait, "pinned": pinned,
                   "client": "bench/lib/httpload.py (keep-alive, 1 MiB recv_into, one process per stream)",
                   "argv": {s.name: getattr(s, "argv", None) for s in servers},
                   "peerd_bins": [{"label": lb, "path": src, "sha256_16": h} for lb, _, src, h in bins]},
        "cells": cells_out, "profile": prof,
    })
    print(f"\nwrote {os.path.relpath(path, B.REPO)}")


if __name__ == "__main__":
    try:
        main()
    finally:
        B.cleanup()
