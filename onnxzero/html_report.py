"""One self-contained HTML page per report (`optimize --html`, `profile --html`).

The page opens offline: CSS and the few lines of JS (a hover tooltip) are inline, every plot is inline
SVG drawn here, nothing is fetched. Every piece of text from the model or the report (node names are
user data) goes through `_e` (html.escape), so a name like `<script>` shows as text.

Reports are read tolerantly: a missing key leaves its section out, unknown keys are ignored, and a
top-level list of points with "accuracy" and "macs"/"latency_ms" that this module does not know (a
new front) is shown as an extra table and plot series. Keys read:

* optimize (onnxzero.search.greedy.optimize's report): eps, objective, split.validation, labels,
  baseline/optimized {accuracy, macs, latency_ms}, latency_ratio, mac_reduction, validation_loss,
  sites[] {node, technique, setting, macs_before, macs_after}, pareto[] {accuracy, macs, latency_ms,
  label}, explored/combined[] (same keys, or pass `explored=`), search {...}, met_eps, note;
* profile (ProfileReport.to_json(), or the ProfileReport itself for class x filter maps): model {...},
  nodes[] {name, op_type, output_shape, params, macs, latency_ms, time_share}, activations[] {node,
  output_shape, zero_rate, per_channel, per_class_channel?}, sites[], notes[], and optional
  "effectual" (EffectualReport.to_json()) and "compare" (Comparison.to_json()).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from onnxzero.emit import atomic_write_bytes
from onnxzero.errors import UserError
from onnxzero.load import check_output_path

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
 padding:0 16px;color:#1b1f24;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px;word-break:break-all}
.sub{color:#57606a;margin:0 0 12px}.note{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;margin:6px 0}
.bad{background:#ffebe9;border-color:#cf222e}
table{border-collapse:collapse;margin:6px 0 10px}th,td{border:1px solid #d0d7de;padding:3px 8px;vertical-align:top}
th{background:#f6f8fa;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{word-break:break-all;min-width:12em;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px}
td.code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all;max-width:28em}
.plots{display:flex;flex-wrap:wrap;gap:16px}.scroll{overflow-x:auto}
svg text{font:11px system-ui,sans-serif;fill:#24292f}svg .axis{stroke:#57606a}svg .grid{stroke:#eaeef2}
svg .explored{fill:#8c959f;fill-opacity:.55}svg .front{fill:#0969da}svg .frontline{stroke:#0969da;fill:none;stroke-width:1.5}
svg .base{fill:#cf222e}svg .opt{fill:#1a7f37}svg .extra{fill:#8250df}svg .bar{fill:#0969da}
svg [data-tip]:hover{stroke:#000;stroke-width:1.5}
#oz-tip{position:fixed;pointer-events:none;background:#24292f;color:#fff;padding:4px 8px;border-radius:4px;font-size:12px;
 white-space:pre;display:none;z-index:10;max-width:600px}
.legend span{display:inline-block;margin-right:14px}.sw{display:inline-block;width:10px;height:10px;margin-right:4px;
 vertical-align:middle;border-radius:2px}
"""

_JS = """
(function(){var tip=document.getElementById('oz-tip');
document.addEventListener('mouseover',function(ev){var t=ev.target.closest&&ev.target.closest('[data-tip]');
 if(!t){tip.style.display='none';return;}tip.textContent=t.getAttribute('data-tip');tip.style.display='block';});
document.addEventListener('mousemove',function(ev){tip.style.left=(ev.clientX+12)+'px';tip.style.top=(ev.clientY+12)+'px';});
})();
"""

_SERIES_CLASS = {"explored": "explored", "front": "front", "base": "base", "opt": "opt", "extra": "extra"}
_SWATCH = {"explored": "#8c959f", "front": "#0969da", "base": "#cf222e", "opt": "#1a7f37", "extra": "#8250df"}


def _e(s: Any) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


def _int(v: Any) -> str:
    f = _num(v)
    return "-" if f is None else f"{f:,.0f}"


def _pct(v: Any, digits: int = 2) -> str:
    f = _num(v)
    return "-" if f is None else f"{f * 100:.{digits}f}%"


def _ms(v: Any) -> str:
    f = _num(v)
    return "-" if f is None else f"{f:.4f}"


def _page(title: str, subtitle: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"sub\">{_e(subtitle)}</p>{body}"
            f"<div id=\"oz-tip\"></div><script>{_JS}</script></body></html>\n")


def _table(headers: list[str], rows: list[list[tuple[str, str]]], *, id: str = "", cls: str = "") -> str:
    """rows of (css class, already-escaped cell html)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class=\"{c}\">{v}</td>" for c, v in r) + "</tr>" for r in rows)
    attrs = (f" id=\"{_e(id)}\"" if id else "") + (f" class=\"{_e(cls)}\"" if cls else "")
    return f"<div class=\"scroll\"><table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt_tick(v: float) -> str:
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:.6g}"


def _scatter(series: list[dict], xkey: str, xlabel: str, *, id: str) -> str:
    """Accuracy (y, %) against xkey; series: {name, kind, points, line}. Each point has a hover tip."""
    pts = [(p, s) for s in series for p in s["points"] if _num(p.get(xkey)) is not None and _num(p.get("accuracy")) is not None]
    if not pts:
        return f"<p id=\"{_e(id)}\">no points with {_e(xkey)} and accuracy</p>"
    W, H, L, R, T, B = 540, 340, 64, 16, 14, 46
    xs = [float(p[xkey]) for p, _ in pts]
    ys = [float(p["accuracy"]) * 100 for p, _ in pts]

    def span(lo, hi):
        pad = (hi - lo) * 0.06 or max(abs(hi) * 0.05, 1e-3)
        return lo - pad, hi + pad
    x0, x1 = span(min(xs), max(xs))
    y0, y1 = span(min(ys), max(ys))

    def px(x):
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def py(y):
        return H - B - (y - y0) / (y1 - y0) * (H - T - B)
    out = [f"<svg id=\"{_e(id)}\" class=\"plot\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" "
           f"viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"accuracy vs {_e(xlabel)}\">"]
    for t in _ticks(x0, x1):
        out.append(f"<line class=\"grid\" x1=\"{px(t):.1f}\" x2=\"{px(t):.1f}\" y1=\"{T}\" y2=\"{H - B}\"/>"
                   f"<text x=\"{px(t):.1f}\" y=\"{H - B + 15}\" text-anchor=\"middle\">{_e(_fmt_tick(t))}</text>")
    for t in _ticks(y0, y1):
        out.append(f"<line class=\"grid\" x1=\"{L}\" x2=\"{W - R}\" y1=\"{py(t):.1f}\" y2=\"{py(t):.1f}\"/>"
                   f"<text x=\"{L - 6}\" y=\"{py(t) + 4:.1f}\" text-anchor=\"end\">{_e(_fmt_tick(t))}</text>")
    out.append(f"<line class=\"axis\" x1=\"{L}\" x2=\"{W - R}\" y1=\"{H - B}\" y2=\"{H - B}\"/>"
               f"<line class=\"axis\" x1=\"{L}\" x2=\"{L}\" y1=\"{T}\" y2=\"{H - B}\"/>"
               f"<text x=\"{(L + W - R) / 2:.0f}\" y=\"{H - 8}\" text-anchor=\"middle\">{_e(xlabel)}</text>"
               f"<text transform=\"translate(14 {(T + H - B) / 2:.0f}) rotate(-90)\" text-anchor=\"middle\">top-1 (%)</text>")
    for s in series:
        cls = _SERIES_CLASS.get(s["kind"], "extra")
        good = [p for p in s["points"] if _num(p.get(xkey)) is not None and _num(p.get("accuracy")) is not None]
        if s.get("line") and len(good) > 1:
            path = sorted(good, key=lambda p: float(p[xkey]))
            d = " ".join(f"{'M' if i == 0 else 'L'}{px(float(p[xkey])):.1f},{py(float(p['accuracy']) * 100):.1f}"
                         for i, p in enumerate(path))
            out.append(f"<path class=\"frontline\" d=\"{d}\"/>")
        for p in good:
            tip = _point_tip(s["name"], p)
            x, y = px(float(p[xkey])), py(float(p["accuracy"]) * 100)
            if s["kind"] in ("base", "opt"):
                out.append(f"<rect class=\"pt {cls}\" x=\"{x - 5:.1f}\" y=\"{y - 5:.1f}\" width=\"10\" height=\"10\" "
                           f"transform=\"rotate(45 {x:.1f} {y:.1f})\" data-tip=\"{_e(tip)}\"><title>{_e(tip)}</title></rect>")
            else:
                r = 4.5 if s["kind"] != "explored" else 3.5
                out.append(f"<circle class=\"pt {cls}\" cx=\"{x:.1f}\" cy=\"{y:.1f}\" r=\"{r}\" data-tip=\"{_e(tip)}\">"
                           f"<title>{_e(tip)}</title></circle>")
    out.append("</svg>")
    return "".join(out)


def _point_tip(series: str, p: dict) -> str:
    lines = [f"{series}: {p.get('label', '')}".rstrip(": "), f"top-1 {_pct(p.get('accuracy'))}",
             f"MACs {_int(p.get('macs'))}", f"latency {_ms(p.get('latency_ms'))} ms"]
    cfg = p.get("config")
    if isinstance(cfg, dict):
        for site, c in cfg.items():
            lines.append(f"{site}: {c.get('technique', '?') if isinstance(c, dict) else c}")
    return "\n".join(lines)


def _legend(series: list[dict]) -> str:
    return "<div class=\"legend\">" + "".join(
        f"<span><i class=\"sw\" style=\"background:{_SWATCH.get(s['kind'], '#8250df')}\"></i>{_e(s['name'])}</span>"
        for s in series) + "</div>"


def _setting_text(setting: Any) -> str:
    if not setting:
        return "-"
    if isinstance(setting, dict):
        shown = {k: (f"{len(v)}x{len(v[0]) if v and isinstance(v[0], list) else ''} mask" if k == "mask" and isinstance(v, list) else v)
                 for k, v in setting.items()}
        return json.dumps(shown, separators=(", ", ": "), default=str)
    return str(setting)


def _point_lists(report: dict, known: set[str]) -> dict[str, list[dict]]:
    """Top-level lists of points (dicts with accuracy and macs or latency_ms) this module has no section for."""
    out = {}
    for k, v in report.items():
        if k in known:
            continue
        if isinstance(v, dict) and isinstance(v.get("points"), list):
            v = v["points"]
        if (isinstance(v, list) and v and all(isinstance(p, dict) for p in v)
                and all("accuracy" in p and ("macs" in p or "latency_ms" in p) for p in v)):
            out[k] = v
    return out


def _points_table(points: list[dict], id: str) -> str:
    rows = []
    for i, p in enumerate(points):
        rows.append([("n", str(i)), ("name", _e(p.get("label", p.get("speed", "")))), ("n", _pct(p.get("accuracy"))),
                     ("n", _int(p.get("macs"))), ("n", _ms(p.get("latency_ms")))])
    return _table(["#", "point", "top-1", "MACs / sample", "latency (ms)"], rows, id=id)


# ---------------------------------------------------------------------------------------------- optimize
def render_optimize_html(report: dict, *, explored: list[dict] | None = None) -> str:
    """The optimize report as one page. explored: every measured combination ({accuracy, macs,
    latency_ms, label?, config?}, e.g. [c.to_json() for c in OptimizeResult.combined]); by default the
    report's own "explored" or "combined" list, if any."""
    b, o = report.get("baseline") or {}, report.get("optimized") or None
    split = report.get("split") or {}
    sub = (f"eps = {_num(report.get('eps')) or 0:g} points of top-1, objective = {report.get('objective', '?')}, "
           f"mode = {report.get('mode', '?')}; figures on {split.get('validation', '?')} held-out samples "
           f"({report.get('labels', 'labels')})")
    parts = []
    if report.get("note"):
        parts.append(f"<p class=\"note\">{_e(report['note'])}</p>")
    elif report.get("met_eps") is False:
        parts.append(f"<p class=\"note bad\">no configuration met eps = {_e(report.get('eps'))} on the calibration split</p>")

    rows = [[("name", "original"), ("n", _pct(b.get("accuracy"))), ("n", _int(b.get("macs"))), ("n", _ms(b.get("latency_ms"))),
             ("n", "1.00")]]
    if o:
        ratio = _num(report.get("latency_ratio"))
        rows.append([("name", "optimized"), ("n", _pct(o.get("accuracy"))), ("n", _int(o.get("macs"))),
                     ("n", _ms(o.get("latency_ms"))), ("n", "-" if ratio is None else f"{ratio:.3f}")])
        loss, red = _num(report.get("validation_loss")), _num(report.get("mac_reduction"))
        rows.append([("name", "change"), ("n", "-" if loss is None else f"{-loss:+.2f} pts"),
                     ("n", "-" if red is None else f"-{red * 100:.1f}%"), ("n", ""), ("n", "")])
    parts.append("<h2>Summary</h2>" + _table(["", "top-1", "MACs / sample", "latency (ms, batch 1)",
                                                "latency ratio (optimized / original)"], rows, id="summary"))

    site_rows = []
    for s in report.get("sites") or []:
        before, after = _num(s.get("macs_before")), _num(s.get("macs_after"))
        saved = "-" if not before or after is None else f"{(1 - after / before) * 100:.1f}%"
        site_rows.append([("name", _e(s.get("node"))), ("", _e(s.get("technique") or "dense")),
                          ("code", _e(_setting_text(s.get("setting")))), ("n", _int(before)), ("n", _int(after)),
                          ("n", saved)])
    parts.append(f"<h2>Sites ({len(site_rows)})</h2>" + _table(
        ["site", "technique", "setting", "MACs before", "MACs after", "saved"], site_rows, id="sites"))

    pareto = [p for p in report.get("pareto") or [] if isinstance(p, dict)]
    pts = explored if explored is not None else (report.get("explored") or report.get("combined") or [])
    pts = [p for p in pts if isinstance(p, dict)]
    extra = _point_lists(report, {"pareto", "explored", "combined", "sites", "baseline", "optimized"})
    series = []
    if pts:
        series.append({"name": f"explored ({len(pts)}, calibration split)", "kind": "explored", "points": pts})
    if pareto:
        series.append({"name": f"Pareto front ({len(pareto)}, calibration split)", "kind": "front", "points": pareto})
    for k, v in extra.items():
        series.append({"name": f"{k} ({len(v)})", "kind": "extra", "points": v, "line": True})
    if b:
        series.append({"name": "original (validation split)", "kind": "base", "points": [{**b, "label": "original"}]})
    if o:
        series.append({"name": "optimized (validation split)", "kind": "opt", "points": [{**o, "label": "optimized"}]})
    parts.append("<h2>Explored settings: accuracy vs latency and MACs</h2>" + _legend(series)
                 + "<div class=\"plots\">" + _scatter(series, "latency_ms", "latency (ms, batch 1)", id="plot-latency")
                 + _scatter(series, "macs", "MACs / sample", id="plot-macs") + "</div>"
                 + "<p class=\"sub\">Hover a point for its figures. Not dominated in (higher top-1, fewer MACs, lower "
                 "latency) = on the Pareto front.</p>")
    if pareto:
        parts.append("<h3>Pareto front</h3>" + _points_table(pareto, "pareto"))
    for k, v in extra.items():
        parts.append(f"<h3>{_e(k)}</h3>" + _points_table(v, f"points-{k}"))
    sr = report.get("search") or {}
    if sr:
        parts.append("<h2>Search</h2>" + _table(["", "value"], [[("name", _e(k)), ("n", _e(f"{v:.1f}" if isinstance(v, float) else v))]
                                                                for k, v in sr.items()], id="search"))
    return _page("onnxzero optimize report", sub, "".join(parts))


# ---------------------------------------------------------------------------------------------- profile
def render_profile_html(profile_report: Any = None, *, effectual: Any = None, compare: Any = None) -> str:
    """A profile report (ProfileReport or its to_json() dict, or None) as one page: summary, per-node
    latency bars, per-filter zero-rate heat maps, tables; plus the effectual-MACs table (EffectualReport
    or its JSON; or the report's "effectual" key) and the side-by-side table (Comparison or its JSON;
    or the report's "compare" key)."""
    class_maps: dict[str, Any] = {}
    if hasattr(profile_report, "to_json"):  # the object carries the class x filter rates the JSON leaves out
        class_maps = {a.output: (a.per_class_channel, profile_report.classes) for a in profile_report.activations
                      if a.per_class_channel is not None}
        profile_report = profile_report.to_json()
    r = dict(profile_report or {})
    for key, v in (("effectual", effectual), ("compare", compare)):
        if v is not None:
            r[key] = v.to_json() if hasattr(v, "to_json") else v
    m = r.get("model") or {}
    lat = m.get("latency_ms") or {}
    parts = []
    if m:
        parts.append("<h2>Summary</h2>" + _table(
            ["model", "data", "samples", "top-1", "params", "MACs / sample", "latency median (ms)", "p90 (ms)"],
            [[("name", _e(m.get("name"))), ("name", _e(m.get("data"))), ("n", _int(m.get("samples"))),
              ("n", _pct(m.get("accuracy")) if m.get("accuracy") is not None else "n/a"), ("n", _int(m.get("params"))),
              ("n", _int(m.get("macs"))), ("n", _ms(lat.get("median"))), ("n", _ms(lat.get("p90")))]], id="summary"))
    nodes = [n for n in r.get("nodes") or [] if isinstance(n, dict)]
    if nodes:
        parts.append("<h2>Per-layer latency</h2><p class=\"sub\">mean onnxruntime kernel time per node, batch 1, graph "
                     "optimizations off</p>" + _bars(nodes))
        parts.append("<h3>Nodes</h3>" + _table(
            ["#", "node", "op", "output shape", "params", "MACs", "latency (ms)", "share"],
            [[("n", str(i)), ("name", _e(n.get("name"))), ("", _e(n.get("op_type"))), ("", _e(n.get("output_shape"))),
              ("n", _int(n.get("params"))), ("n", _int(n.get("macs"))), ("n", _ms(n.get("latency_ms"))),
              ("n", _pct(n.get("time_share"), 1))] for i, n in enumerate(nodes)], id="nodes"))
    acts = [a for a in r.get("activations") or [] if isinstance(a, dict)]
    if acts:
        parts.append("<h2>Per-filter zero rates</h2><p class=\"sub\">share of each filter's ReLU outputs that are exactly "
                     "0 over the data" + (", per class (rows) when the data has labels" if class_maps else "")
                     + "; darker = more zeros</p>" + _heat_legend())
        for i, a in enumerate(acts):
            rows = a.get("per_class_channel")
            labels = None
            if rows is None and a.get("output") in class_maps:
                arr, classes = class_maps[a["output"]]
                rows, labels = [list(map(float, row)) for row in arr], [str(c) for c in classes]
            parts.append(f"<h3>{_e(a.get('node'))} &mdash; {_pct(a.get('zero_rate'), 1)} zero</h3>"
                         + _heatmap(a.get("per_channel") or [], rows, labels, id=f"heat-{i}"))
    sites = [s for s in r.get("sites") or [] if isinstance(s, dict)]
    if sites:
        parts.append("<h2>Conv+ReLU sites</h2>" + _table(
            ["conv", "relu", "MACs", "zero rate", "MACs zeroed", "time share", "est. time saved"],
            [[("name", _e(s.get("node"))), ("name", _e(s.get("relu"))), ("n", _int(s.get("macs"))),
              ("n", _pct(s.get("zero_rate"), 1)), ("n", _int(s.get("macs_zero"))), ("n", _pct(s.get("time_share"), 1)),
              ("n", _pct(s.get("est_time_saved"), 1))] for s in sites], id="profile-sites"))
    eff = r.get("effectual")
    if isinstance(eff, dict) and eff.get("layers") is not None:
        parts.append("<h2>Effectual MACs (weight and input both non-zero)</h2>" + _table(
            ["layer", "op", "MACs", "effectual MACs", "%ACT", "weights != 0", "inputs != 0"],
            [[("name", _e(x.get("node"))), ("", _e(x.get("op_type"))), ("n", _int(x.get("macs"))),
              ("n", _int(x.get("effectual_macs"))), ("n", _pct(x.get("effectual_share"), 1)),
              ("n", _pct(x.get("weight_nonzero"), 1)), ("n", _pct(x.get("input_nonzero"), 1))] for x in eff["layers"]]
            + [[("name", "<b>model</b>"), ("", ""), ("n", _int(eff.get("macs"))), ("n", _int(eff.get("effectual_macs"))),
                ("n", _pct(eff.get("effectual_share"), 1)), ("n", ""), ("n", "")]], id="effectual"))
    cmp_ = r.get("compare")
    if isinstance(cmp_, dict) and cmp_.get("models"):
        parts.append("<h2>Models side by side</h2>" + _table(
            ["model", "data", "params", "MACs", "latency median (ms)", "top-1 (labels)", "peak activation memory (bytes)",
             "energy estimate (uJ)"],
            [[("name", _e(x.get("name"))), ("name", _e(x.get("data"))), ("n", _int(x.get("params"))),
              ("n", _int(x.get("macs"))), ("n", _ms((x.get("latency_ms") or {}).get("median"))),
              ("n", "n/a" if x.get("accuracy") is None else _pct(x.get("accuracy"))),
              ("n", _int(x.get("peak_activation_bytes"))), ("n", f"{_num(x.get('energy_estimate_uj')) or 0:.3f}")]
             for x in cmp_["models"]], id="compare")
            + f"<p class=\"sub\">energy: {_e(cmp_.get('energy_estimate', 'estimate'))}; not measured</p>")
    for note in r.get("notes") or []:
        parts.append(f"<p class=\"note\">{_e(note)}</p>")
    title = (f"onnxzero profile: {m.get('name', '')}" if m
             else "onnxzero profile: " + ", ".join(str(x.get("name")) for x in (cmp_ or {}).get("models", [])))
    return _page(title, "self-contained report; hover bars and cells for values", "".join(parts))


def _bars(nodes: list[dict]) -> str:
    vals = [(_num(n.get("latency_ms")) or 0.0) for n in nodes]
    names = [f"{i}  {n.get('name', '')}  ({n.get('op_type', '')})" for i, n in enumerate(nodes)]
    left = min(900, 12 + 6.4 * max(len(s) for s in names))  # full names; the page scrolls sideways if needed
    bw, row = 420, 18
    W, H = int(left + bw + 90), row * len(nodes) + 10
    top = max(vals) or 1.0
    out = [f"<div class=\"scroll\"><svg id=\"latency-bars\" class=\"plot\" xmlns=\"http://www.w3.org/2000/svg\" "
           f"width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">"]
    for i, (n, v, label) in enumerate(zip(nodes, vals, names, strict=True)):
        y = 5 + i * row
        w = max(0.5, v / top * bw)
        tip = f"{n.get('name')} ({n.get('op_type')})\n{_ms(v)} ms, {_pct(n.get('time_share'), 1)} of node time\nMACs {_int(n.get('macs'))}"
        out.append(f"<text x=\"{left - 6:.0f}\" y=\"{y + 12}\" text-anchor=\"end\">{_e(label)}</text>"
                   f"<rect class=\"bar\" x=\"{left:.0f}\" y=\"{y + 2}\" width=\"{w:.1f}\" height=\"{row - 5}\" "
                   f"data-tip=\"{_e(tip)}\"><title>{_e(tip)}</title></rect>"
                   f"<text x=\"{left + w + 4:.0f}\" y=\"{y + 12}\">{_e(_ms(v))}</text>")
    out.append("</svg></div>")
    return "".join(out)


def _color(z: float) -> str:
    """White (no zeros) to dark blue (all zeros)."""
    z = min(1.0, max(0.0, z))
    lo, hi = (247, 251, 255), (8, 48, 107)
    return "#" + "".join(f"{round(a + (b - a) * z):02x}" for a, b in zip(lo, hi, strict=True))


def _heat_legend() -> str:
    stops = "".join(f"<rect x=\"{i * 20}\" y=\"0\" width=\"20\" height=\"12\" fill=\"{_color(i / 10)}\"/>" for i in range(11))
    return (f"<svg class=\"legend-bar\" xmlns=\"http://www.w3.org/2000/svg\" width=\"300\" height=\"28\">{stops}"
            "<text x=\"0\" y=\"25\">0%</text><text x=\"200\" y=\"25\" text-anchor=\"middle\">100% zero</text></svg>")


def _heatmap(per_channel: list, rows: list[list[float]] | None, labels: list[str] | None, *, id: str) -> str:
    """One row per class (when known) plus an "all" row; one cell per filter."""
    grid = [(lab, r) for lab, r in zip(labels or [], rows or [], strict=False)] + [("all", per_channel)]
    k = max((len(r) for _, r in grid), default=0)
    if not k:
        return "<p>no per-filter rates (this activation does not keep channels on axis 1)</p>"
    cell = max(4, min(18, 720 // k))
    ch = max(cell, 12)  # rows stay tall enough for their class label
    L, T = 34, 16
    W, H = L + k * cell + 4, T + len(grid) * ch + 4
    out = [f"<div class=\"scroll\"><svg id=\"{_e(id)}\" class=\"heatmap\" xmlns=\"http://www.w3.org/2000/svg\" "
           f"width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\"><text x=\"{L}\" y=\"11\">filter 0..{k - 1}</text>"]
    for ri, (lab, vals) in enumerate(grid):
        y = T + ri * ch
        out.append(f"<text x=\"{L - 4}\" y=\"{y + ch - 2}\" text-anchor=\"end\">{_e(lab)}</text>")
        for c, v in enumerate(vals):
            f = _num(v)
            tip = f"filter {c}, {'class ' + lab if lab != 'all' else 'all samples'}: " + ("n/a" if f is None else f"{f * 100:.1f}% zero")
            out.append(f"<rect class=\"cell\" x=\"{L + c * cell}\" y=\"{y}\" width=\"{cell}\" height=\"{ch}\" "
                       f"fill=\"{'#ddd' if f is None else _color(f)}\" data-tip=\"{_e(tip)}\"><title>{_e(tip)}</title></rect>")
    out.append("</svg></div>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------- write
def check_html_path(path: str | Path, protect: tuple[Path, ...] = ()) -> Path:
    """Refuse, before any work, an --html path that cannot be written (one-line UserError)."""
    out = check_output_path(path, protect)
    anc = out.parent if str(out.parent) else Path(".")
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"--html {out}: cannot write there ({anc} is not a writable directory), "
                        "expected a writable file path")
    return out


def write_html(path: str | Path, page: str, *, protect: tuple[Path, ...] = ()) -> Path:
    """Write the page atomically (emit.py), refusing to overwrite an input file."""
    check_html_path(path, protect)
    try:
        return atomic_write_bytes(path, page.encode("utf-8"), protect=protect)
    except OSError as e:
        raise UserError(f"--html {path}: {e.strerror or e}, expected a writable file path") from None
