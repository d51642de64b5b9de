"""Helpers of bench/loadtest.py (stdlib only): statistics, Prometheus text, the registry's access
log, rate strings and formatting."""
import math
import re
import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "lib"))
import prom as _prom  # noqa: E402

MIB = 1 << 20


# ---------------------------------------------------------------- statistics

def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default, 'linear'): with n values the
    q-quantile sits at position (n - 1) * q of the sorted list. None for no values."""
    v = sorted(values)
    if not v:
        return None
    pos = (len(v) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(values):
    if not values:
        return {"n": 0, "p50": None, "p90": None, "max": None, "min": None, "mean": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.5), 3),
        "p90": round(percentile(values, 0.9), 3),
        "max": round(max(values), 3),
        "min": round(min(values), 3),
        "mean": round(sum(values) / len(values), 3),
    }


# ---------------------------------------------------------------- Prometheus text format

# One parser for the whole bench: bench/lib/prom.py.
prom_parse = _prom.parse


def prom_sum(samples, name, **match):
    """Sum of a metric's samples whose labels include `match` (0 if none)."""
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == str(x) for k, x in match.items()))


def prom_by(samples, name, label):
    """{label value: sum} of a metric."""
    out = {}
    for n, l, v in samples:
        if n == name:
            out[l.get(label, "")] = out.get(l.get(label, ""), 0.0) + v
    return out


# ---------------------------------------------------------------- registry access log

# Combined format: IP - - [date] "METHOD PATH PROTO" STATUS BYTES "referer" "agent"
_ACCESS = re.compile(r'^(\S+) \S+ \S+ \[[^\]]*\] "(\S+) (\S+)[^"]*" (\d{3}) (\d+|-)(?: "[^"]*" "([^"]*)")?')
_BLOB = re.compile(r'^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})(\?.*)?$')
_MANIFEST = re.compile(r'^/v2/(.+)/manifests/([^?]+)(\?.*)?$')


def parse_access(lines):
    """Registry GETs answered 200/206: [(ip, kind 'blob'|'manifest'|'other', digest or ref, bytes, by_peerd)].

    `by_peerd`: the request came from peerd's pull-through (its User-Agent), not from containerd."""
    out = []
    for line in lines:
        m = _ACCESS.match(line)
        if not m or m.group(2) != "GET" or m.group(4) not in ("200", "206"):
            continue
        ip, path, nbytes = m.group(1), m.group(3), m.group(5)
        nbytes = 0 if nbytes == "-" else int(nbytes)
        by_peerd = (m.group(6) or "").startswith("peerd/")
        b = _BLOB.match(path)
        if b:
            out.append((ip, "blob", b.group(2), nbytes, by_peerd))
            continue
        mf = _MANIFEST.match(path)
        if mf:
            out.append((ip, "manifest", mf.group(2), nbytes, by_peerd))
        else:
            out.append((ip, "other", path, nbytes, by_peerd))
    return out


def read_from(path, offset):
    """(lines after byte `offset`, new offset); complete lines only."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", "replace").splitlines(), offset + end


# ---------------------------------------------------------------- rates and formatting

_RATE_UNITS = {
    "bit": 1 / 8, "": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
    "kibit": 1024 / 8, "mibit": 1048576 / 8, "gibit": 1073741824 / 8,
    "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "kibps": 1024, "mibps": 1048576, "gibps": 1073741824,
}


def rate_bytes_per_s(rate):
    """tc rate string ('100mbit', '50mbps', ...) -> bytes/s; None for 'none'."""
    r = rate.strip().lower()
    if r in ("none", "off", ""):
        return None
    m = re.match(r'^([0-9.]+)([a-z]*)$', r)
    if not m or m.group(2) not in _RATE_UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"bad rate {rate!r} (e.g. 100mbit, 1gbit, 50mbps, none)")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]


def fmt_s(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def fmt_dur(s):
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_bytes(b):
    if b is None:
        return "-"
    if b >= 10 * (1 << 30):
        return f"{b / (1 << 30):.0f}G"
    if b >= 1 << 30:
        return f"{b / (1 << 30):.1f}G"
    if b >= 10 * MIB:
        return f"{b / MIB:.0f}M"
    if b >= MIB:
        return f"{b / MIB:.1f}M"
    return f"{b / 1024:.0f}K"


def size_label(mib):
    if mib >= 1000 and mib % 1000 == 0:
        return f"{mib // 1000}GiB" if mib % 1024 == 0 else f"{mib}MiB"
    return f"{mib:g}MiB"


def table(rows, header, align=None):
    """Plain-text table; align: string of 'l'/'r' per column."""
    cols = len(header)
    align = align or "l" * cols
    w = [max(len(str(r[i])) for r in [header] + rows) for i in range(cols)]

    def line(r):
        return "  ".join(str(r[i]).ljust(w[i]) if align[i] == "l" else str(r[i]).rjust(w[i]) for i in range(cols)).rstrip()

    return "\n".join([line(header), "  ".join("-" * x for x in w)] + [line(r) for r in rows])
