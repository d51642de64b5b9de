"""Minimal Prometheus text-format reading (stdlib only): counters summed over labels, histogram
deltas between two scrapes, quantiles interpolated from buckets as PromQL's histogram_quantile does.
"""
import math
import re

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """[(name, {label: value}, float)] of every sample."""
    out = []
    for line in (text or "").splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        try:
            v = float(m.group(4))
        except ValueError:
            continue
        out.append((m.group(1), labels, v))
    return out


def read(path):
    try:
        with open(path) as f:
            return parse(f.read())
    except OSError:
        return []


def total(samples, name, **match):
    """Sum of a metric's samples whose labels include `match`; None when there is none."""
    vals = [v for n, l, v in samples if n == name and all(l.get(k) == str(x) for k, x in match.items())]
    return sum(vals) if vals else None


def histogram(samples, name, **match):
    """{'buckets': [(le, cumulative count)], 'sum': s, 'count': c} of the series whose labels include
    `match` (summed), or None."""
    b = {}
    for n, l, v in samples:
        if n == name + "_bucket" and "le" in l and all(l.get(k) == str(x) for k, x in match.items()):
            le = math.inf if l["le"] in ("+Inf", "Inf") else float(l["le"])
            b[le] = b.get(le, 0.0) + v
    if not b:
        return None
    return {"buckets": sorted(b.items()), "sum": total(samples, name + "_sum", **match) or 0.0,
            "count": total(samples, name + "_count", **match) or 0.0}


def hist_delta(before, after):
    if after is None:
        return None
    if before is None:
        return after
    bb = dict(before["buckets"])
    return {"buckets": [(le, c - bb.get(le, 0.0)) for le, c in after["buckets"]],
            "sum": after["sum"] - before["sum"], "count": after["count"] - before["count"]}


def quantile(h, q):
    """histogram_quantile(q) with linear interpolation inside the bucket; None if empty."""
    if not h or h["count"] <= 0:
        return None
    buckets = h["buckets"]
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == math.inf:
                return prev_le  # as PromQL: the highest finite bound
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def mean(h):
    if not h or h["count"] <= 0:
        return None
    return h["sum"] / h["count"]
