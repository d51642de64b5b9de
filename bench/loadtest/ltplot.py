"""SVG chart of bench/loadtest.py's results, written by hand (no plotting library).

One panel per scenario (rows) x image size (columns); in each panel one group of bars per layer
count: pull time p50 and p90 through peerd and for the baseline (no peerd), each panel on its own
linear seconds axis, every bar labelled with its value. Under each group: p50 ratio
peerd/baseline, registry GETs per blob (max) and the share of bytes that came from peers.
"""
import math
from xml.sax.saxutils import escape

COLORS = {
    ("peerd", "p50"): "#1f5fa8",
    ("peerd", "p90"): "#8fb8e8",
    ("baseline", "p50"): "#d9631e",
    ("baseline", "p90"): "#f5b88f",
}
SCENARIO_TITLES = {"rolling": "Rolling update", "simultaneous": "Simultaneous create"}
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"


def _nice_step(span, ticks=5):
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(v):
    if v is None:
        return "n/a"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _text(x, y, s, size=12, anchor="middle", weight="normal", color="#222", extra="", halo=False):
    if halo:
        extra += ' stroke="white" stroke-width="3" stroke-linejoin="round" paint-order="stroke"'
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{color}" {extra}>{escape(str(s))}</text>')


def _size_label(mib):
    return f"{mib:g} MiB"


def render(doc):
    """doc: the loadtest JSON document. Returns SVG text."""
    cases = doc["cases"]
    scenarios = [s for s in doc["params"]["scenarios"] if any(c["scenario"] == s for c in cases)]
    sizes = [s for s in doc["params"]["sizes_mib"] if any(c["size_mib"] == s for c in cases)]
    layers_all = doc["params"]["layers"]
    if not scenarios or not sizes:
        scenarios = scenarios or ["rolling"]
        sizes = sizes or [0]

    pw, ph = 440, 250                # plot area of one panel
    ml, mr, mt_panel, mb_panel = 62, 20, 34, 96  # margins around each plot area
    cell_w, cell_h = ml + pw + mr, mt_panel + ph + mb_panel
    top = 118                        # title + legend
    width = max(cell_w * len(sizes) + 20, 1080)
    left = (width - cell_w * len(sizes)) / 2
    height = top + cell_h * len(scenarios) + 30

    p = doc["params"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="{FONT}">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    title = (f"peerd load test: image pull time, {p['nodes']} nodes, registry link {p['registry_rate']}"
             f" (lower is better)")
    out.append(_text(width / 2, 28, title, size=19, weight="bold"))
    sub = (f"rolling update: batches of {p['batch_size']} node(s), each starts when the previous finished"
           f" \u00b7 simultaneous: all {p['nodes']} nodes at once \u00b7 baseline: no peerd, direct registry pulls")
    out.append(_text(width / 2, 50, sub, size=12, color="#444"))
    meta = (f"{doc['host'].get('date', '')}  git {doc['host'].get('git', '?')}  "
            f"{doc['host'].get('cpus', '?')} CPUs  load {doc['host'].get('loadavg_start', '?')}"
            f"{'' if doc.get('complete') else '  (INCOMPLETE RUN)'}")
    out.append(_text(width / 2, 68, meta, size=11, color="#777"))

    # Legend
    items = [(COLORS[("peerd", "p50")], "peerd p50"), (COLORS[("peerd", "p90")], "peerd p90"),
             (COLORS[("baseline", "p50")], "baseline p50 (no peerd)"),
             (COLORS[("baseline", "p90")], "baseline p90")]
    lx = width / 2 - 390
    for color, label in items:
        out.append(f'<rect x="{lx:.1f}" y="84" width="16" height="16" fill="{color}"/>')
        out.append(_text(lx + 22, 97, label, size=13, anchor="start"))
        lx += 36 + 7.4 * len(label)
    if "rolling" in scenarios:
        out.append(f'<line x1="{lx:.1f}" y1="92" x2="{lx + 26:.1f}" y2="92" stroke="#2a9d3a" '
                   f'stroke-width="2.5" stroke-dasharray="5,3"/>')
        out.append(_text(lx + 32, 97, "target: peerd p50 \u2264 0.15\u00d7 baseline p50", size=13,
                         anchor="start"))

    for r, scen in enumerate(scenarios):
        for col, size in enumerate(sizes):
            x0 = left + col * cell_w + ml
            y0 = top + r * cell_h + mt_panel
            panel = [c for c in cases if c["scenario"] == scen and c["size_mib"] == size]
            panel.sort(key=lambda c: c["layers"])
            out.extend(_panel(x0, y0, pw, ph, scen, size, panel, layers_all))
    if "rolling" in scenarios:
        out.append(_text(width / 2, height - 12,
                         f"In the rolling update the first batch ({p['batch_size']} of {p['nodes']} nodes) has no "
                         f"peer to pull from: with peerd, p90 and max are that batch's registry pulls.",
                         size=12, color="#555"))
    out.append("</svg>")
    return "\n".join(out)


def _panel(x0, y0, pw, ph, scen, size, panel, layers_all):
    out = []
    out.append(_text(x0 + pw / 2, y0 - 14, f"{SCENARIO_TITLES.get(scen, scen)} \u00b7 {_size_label(size)} image",
                     size=15, weight="bold"))
    vals = []
    for c in panel:
        for mode in ("peerd", "baseline"):
            m = c["modes"].get(mode) or {}
            st = m.get("pull_seconds") or {}
            vals += [v for v in (st.get("p50"), st.get("p90")) if v is not None]
    vmax = max(vals) if vals else 1.0
    step = _nice_step(vmax * 1.15)
    ymax = step * math.ceil(vmax * 1.15 / step)

    def y(v):
        return y0 + ph - ph * (v / ymax)

    # Grid and y axis
    t = 0.0
    while t <= ymax + 1e-9:
        out.append(f'<line x1="{x0}" y1="{y(t):.1f}" x2="{x0 + pw}" y2="{y(t):.1f}" stroke="#e3e3e3"/>')
        tl = f"{t:.0f}" if step >= 1 else f"{t:.1f}" if step >= 0.1 else f"{t:.2f}"
        out.append(_text(x0 - 6, y(t) + 4, tl, size=11, anchor="end", color="#555"))
        t += step
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + ph}" stroke="#888"/>')
    out.append(f'<line x1="{x0}" y1="{y0 + ph}" x2="{x0 + pw}" y2="{y0 + ph}" stroke="#888"/>')
    out.append(_text(x0 - 44, y0 + ph / 2, "pull time (s)", size=12, color="#444",
                     extra=f'transform="rotate(-90 {x0 - 44} {y0 + ph / 2})"'))

    groups = [lay for lay in layers_all if any(c["layers"] == lay for c in panel)] or layers_all
    gw = pw / max(1, len(groups))
    bw = min(40.0, gw * 0.78 / 4.4)
    for gi, lay in enumerate(groups):
        c = next((c for c in panel if c["layers"] == lay), None)
        gx = x0 + gi * gw + gw / 2
        # 4 bars: peerd p50, peerd p90, gap, baseline p50, baseline p90
        offs = [-2.2 * bw, -1.2 * bw, 0.2 * bw, 1.2 * bw]
        if c and scen == "rolling":
            b50 = ((c["modes"].get("baseline") or {}).get("pull_seconds") or {}).get("p50")
            if b50:
                ty = y(0.15 * b50)
                out.append(f'<line x1="{gx + offs[0] - 6:.1f}" y1="{ty:.1f}" x2="{gx + offs[3] + bw + 4:.1f}" '
                           f'y2="{ty:.1f}" stroke="#2a9d3a" stroke-width="2.5" stroke-dasharray="5,3">'
                           f'<title>target: 0.15 x baseline p50 = {0.15 * b50:.2f} s</title></line>')
        labels = []
        k = 0
        for mode in ("peerd", "baseline"):
            m = (c or {}).get("modes", {}).get(mode) or {}
            st = m.get("pull_seconds") or {}
            for q in ("p50", "p90"):
                v = st.get(q)
                bx = gx + offs[k]
                k += 1
                if v is None:
                    out.append(_text(bx + bw / 2, y0 + ph - 6, "n/a", size=10, color="#999"))
                    continue
                out.append(f'<rect x="{bx:.1f}" y="{y(v):.1f}" width="{bw - 2:.1f}" '
                           f'height="{max(0.5, y0 + ph - y(v)):.1f}" fill="{COLORS[(mode, q)]}">'
                           f'<title>{escape(f"{mode} {q}: {v:.3f} s")}</title></rect>')
                labels.append(_text(bx + (bw - 2) / 2, y(v) - 4, _fmt(v), size=11, color="#222", halo=True))
            if m.get("failed"):
                out.append(_text(gx + offs[k - 2] + bw, y0 + 14, f"{m['failed']} FAILED", size=11,
                                 weight="bold", color="#c00"))
        out.extend(labels)
        # Annotations under the group
        ay = y0 + ph + 18
        out.append(_text(gx, ay, f"{lay} layer{'s' if lay != 1 else ''}", size=13, weight="bold"))
        if not c:
            continue
        ratio = c.get("p50_ratio")
        ok = c.get("target_met")
        rtxt = f"p50: {ratio:.2f}\u00d7 baseline" if ratio is not None else "p50: n/a"
        color = "#2a7d2a" if ok else ("#b22" if ok is False else "#222")
        out.append(_text(gx, ay + 17, rtxt, size=12, color=color, weight="bold" if ok is not None else "normal"))
        gp = ((c["modes"].get("peerd") or {}).get("registry_gets_per_blob") or {}).get("max")
        gb = ((c["modes"].get("baseline") or {}).get("registry_gets_per_blob") or {}).get("max")
        out.append(_text(gx, ay + 33, f"registry GETs/blob: peerd {gp if gp is not None else '-'}, "
                                      f"baseline {gb if gb is not None else '-'}", size=11, color="#444"))
        share = ((c["modes"].get("peerd") or {}).get("bytes") or {}).get("peer_share")
        out.append(_text(gx, ay + 48, "bytes from peers (peerd): "
                         + (f"{100 * share:.0f}%" if share is not None else "-"), size=11, color="#444"))
    return out
