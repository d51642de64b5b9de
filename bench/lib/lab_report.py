#!/usr/bin/env python3
"""The report of bench/lab_pull.sh: reads the records the script wrote (env REC) and the Prometheus
scrapes they name, prints the tables and writes bench/results/lab_pull.json.

Record lines (space-separated):
    image ROUND REF CONFIG_DIGEST
    layer ROUND DIGEST SIZE
    pull ROUND PHASE NODE SECONDS UPSTREAM_BYTES UPSTREAM_BLOB_GETS METRICS_BEFORE METRICS_AFTER
    advertised ROUND KEYS SECONDS_AFTER_PULL
    gets ROUND p2p|all DIGEST COUNT
    nodeend ROUND NODE METRICS_FILE
Environment: REC, CMDLINE, LOCK_WAIT, RATE, IMAGE_MIB, LAYERS, NODES, BIN_MTIME, RESULT_NAME (lab_pull).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import prom  # noqa: E402

pulls, gets, adv, images, nodeend, layer_sizes = [], {}, {}, {}, {}, {}
for line in open(os.environ["REC"]):
    p = line.split()
    if p[0] == "pull":
        pulls.append(dict(round=int(p[1]), phase=p[2], node=int(p[3]), secs=float(p[4]),
                          upstream_bytes=int(p[5]), upstream_blob_gets=int(p[6]), before=p[7], after=p[8]))
    elif p[0] == "gets":
        gets.setdefault(int(p[1]), {}).setdefault(p[2], {})[p[3]] = int(p[4])
    elif p[0] == "advertised":
        adv[int(p[1])] = {"keys": int(p[2]), "seconds_after_pull": float(p[3])}
    elif p[0] == "image":
        images[int(p[1])] = {"ref": p[2], "config": p[3]}
    elif p[0] == "layer":
        layer_sizes.setdefault(int(p[1]), {})[p[2]] = int(p[3])
    elif p[0] == "nodeend":
        nodeend.setdefault(int(p[1]), {})[int(p[2])] = p[3]

MiB = 1 << 20


def hsum(h):
    ok = bool(h and h["count"])
    return {"count": int(h["count"]) if h else 0,
            "p50_ms": round(prom.quantile(h, 0.5) * 1e3, 2) if ok else None,
            "p90_ms": round(prom.quantile(h, 0.9) * 1e3, 2) if ok else None,
            "mean_ms": round(prom.mean(h) * 1e3, 2) if ok else None}


rounds = sorted({x["round"] for x in pulls})
out_rounds, rows = [], []
for r in rounds:
    rp = [x for x in pulls if x["round"] == r]
    n1 = next(x for x in rp if x["phase"] == "p2p" and x["node"] == 1)["secs"]
    direct = [x["secs"] for x in rp if x["phase"] == "direct"]
    direct_mean = sum(direct) / len(direct) if direct else None
    recs = []
    for x in rp:
        b, a = prom.read(x["before"]), prom.read(x["after"])
        rec = {k: x[k] for k in ("phase", "node", "secs", "upstream_bytes", "upstream_blob_gets")}
        rec["ratio_vs_node1"] = round(x["secs"] / n1, 3)
        rec["ratio_vs_direct_mean"] = round(x["secs"] / direct_mean, 3) if direct_mean else None
        if x["phase"] == "p2p":
            d = lambda name, **m: (prom.total(a, name, **m) or 0) - (prom.total(b, name, **m) or 0)
            rec["peer_bytes_fetched"] = int(d("peerd_bytes_fetched_total", **{"from": "peer"}))
            rec["served_bytes"] = {s: int(d("peerd_bytes_served_total", source=s)) for s in ("local", "peer", "upstream")}
            h = prom.hist_delta(prom.histogram(b, "peerd_peer_discovery_duration_seconds"),
                                prom.histogram(a, "peerd_peer_discovery_duration_seconds"))
            rec["lookup"] = hsum(h)
            h404 = prom.hist_delta(prom.histogram(b, "peerd_request_duration_seconds", code=404),
                                   prom.histogram(a, "peerd_request_duration_seconds", code=404))
            rec["not_found_responses"] = hsum(h404)
            codes = {}
            for n, l, v in a:
                if n == "peerd_requests_total":
                    codes[l.get("code", "?")] = codes.get(l.get("code", "?"), 0) + v
            for n, l, v in b:
                if n == "peerd_requests_total":
                    codes[l.get("code", "?")] = codes.get(l.get("code", "?"), 0) - v
            rec["peerd_requests_by_code"] = {k: int(v) for k, v in sorted(codes.items()) if v}
        recs.append(rec)
        lk = rec.get("lookup") or {}
        nf = rec.get("not_found_responses") or {}
        rows.append([r, x["phase"], x["node"], f"{x['secs']:.2f}",
                     f"{rec['ratio_vs_node1']:.3f}",
                     f"{rec['ratio_vs_direct_mean']:.3f}" if direct_mean else "-",
                     f"{x['upstream_bytes'] / MiB:.1f}",
                     f"{rec.get('peer_bytes_fetched', 0) / MiB:.1f}" if x["phase"] == "p2p" else "-",
                     f"{lk['p50_ms']}" if lk.get("p50_ms") is not None else "-",
                     f"{lk['mean_ms']}" if lk.get("mean_ms") is not None else "-",
                     lk.get("count", "-"),
                     f"{nf['count']} / {nf['mean_ms']}" if nf.get("count") else "-"])
    ends = {n: prom.read(f) for n, f in nodeend.get(r, {}).items()}
    out_rounds.append({
        "round": r, "image": images.get(r), "layer_sizes": layer_sizes.get(r), "advertised": adv.get(r),
        "pulls": recs, "direct_mean_secs": round(direct_mean, 3) if direct_mean else None,
        "registry_gets_per_blob": gets.get(r),
        # peerd serves only peers from its own store in this lab (containerd asks for what it lacks)
        "served_from_store_bytes_by_node": {n: int(prom.total(m, "peerd_bytes_served_total", source="local") or 0)
                                            for n, m in sorted(ends.items())},
    })

print(f"\nlab_pull: {os.environ['NODES']} nodes, registry egress {os.environ['RATE']}, "
      f"random image {os.environ['IMAGE_MIB']} MiB in {os.environ['LAYERS']} layers")
print(benchlib.table(rows, ["round", "phase", "node", "pull s", "vs node1", "vs direct", "registry MiB",
                            "peer MiB", "lookup p50 ms", "lookup mean ms", "lookups", "404s / mean ms"]))
for ro in out_rounds:
    g = ro["registry_gets_per_blob"] or {}
    p2p = g.get("p2p", {})
    print(f"round {ro['round']}: registry GETs per blob after the p2p phase: "
          + ", ".join(f"{k[7:19]}={v}" for k, v in p2p.items())
          + f"  (after the direct pulls too: {sorted(set(g.get('all', {}).values()))})")
    if ro["advertised"]:
        print(f"round {ro['round']}: node 1 advertised {ro['advertised']['keys']} keys, "
              f"{ro['advertised']['seconds_after_pull']} s after its pull finished; "
              "MiB served to peers from each node's store: "
              + ", ".join(f"node {n}: {b / MiB:.0f}" for n, b in ro["served_from_store_bytes_by_node"].items()))

# medians over the rounds
summary = {}
for ph, node in sorted({(x["phase"], x["node"]) for x in pulls}, key=lambda t: (t[0] != "p2p", t[1])):
    recs = [p for ro in out_rounds for p in ro["pulls"] if p["phase"] == ph and p["node"] == node]
    med = lambda k: benchlib.median([p[k] for p in recs if p.get(k) is not None])
    summary[f"{ph}-node{node}"] = {"rounds": len(recs), "median_secs": med("secs"),
                                   "median_ratio_vs_node1": med("ratio_vs_node1"),
                                   "median_ratio_vs_direct_mean": med("ratio_vs_direct_mean")}
if len(out_rounds) > 1:
    print(f"\nmedians over {len(out_rounds)} rounds:")
    print(benchlib.table([[k, v["median_secs"], v["median_ratio_vs_node1"], v["median_ratio_vs_direct_mean"]]
                          for k, v in summary.items()], ["pull", "pull s", "vs node1", "vs direct"]))

host = benchlib.host_info()
host["peerd_bin_mtime"] = os.environ["BIN_MTIME"]
path = benchlib.write_json(os.environ.get("RESULT_NAME", "lab_pull"), {
    "benchmark": "lab_pull", "command": os.environ["CMDLINE"], "host": host,
    "params": {"nodes": int(os.environ["NODES"]), "registry_rate": os.environ["RATE"],
               "image_mib": float(os.environ["IMAGE_MIB"]), "layers": int(os.environ["LAYERS"]),
               "lock_wait_s": float(os.environ["LOCK_WAIT"])},
    "target": "p2p pulls on nodes 2.. take <= 0.2 x node 1's pull",
    "summary": summary, "rounds": out_rounds})
print("\nwrote", os.path.relpath(path, benchlib.REPO))
