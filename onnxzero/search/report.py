"""The optimize report: a terminal table and the JSON written by --report."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table


def _setting(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    keep = {k: v for k, v in s.items() if k not in ("mask",)}
    return json.dumps(keep, separators=(",", ":"))[:48]


def render(report: dict[str, Any], console: Console) -> None:
    b, o = report["baseline"], report.get("optimized")
    t = Table(title=f"onnxzero optimize: eps = {report['eps']:g} points, objective = {report['objective']}, "
                    f"validated on {report['split']['validation']} held-out samples")
    for col in ("", "top-1", "MACs / sample", f"latency (ms, batch {report.get('batch', 1)})"):
        t.add_column(col, justify="right")
    lat = f"{b['latency_ms']:.3f}" if b.get("latency_ms") is not None else "-"
    t.add_row("original", f"{b['accuracy'] * 100:.2f}%", f"{b['macs']:,}", lat)
    if o:
        t.add_row("optimized", f"{o['accuracy'] * 100:.2f}%", f"{o['macs']:,}", f"{o['latency_ms']:.3f}")
        t.add_row("change", f"{-report['validation_loss']:+.2f} pts", f"-{report['mac_reduction'] * 100:.1f}%",
                  f"x{report['latency_ratio']:.2f}")
    console.print(t)
    st = Table(title="sites")
    for col in ("site", "technique", "setting", "MACs before", "MACs after"):
        st.add_column(col, justify="right" if col.startswith("MACs") else "left", overflow="fold")
    for s in report["sites"]:
        st.add_row(s["node"], s["technique"] or "dense", _setting(s["setting"]), f"{s['macs_before']:,}", f"{s['macs_after']:,}")
    console.print(st)
    sr = report["search"]
    console.print(f"search: {sr['candidates_evaluated']} candidates measured ({sr['first_level']} first-level, "
                  f"{sr.get('latency_timed', 0)} timed in the whole model, {sr['combinations']} combinations) in {sr['seconds']:.0f} s; "
                  f"{len(report['pareto'])} points on the accuracy/MACs/latency Pareto front", highlight=False)
    d = report.get("decision") or {}
    if report["objective"] == "latency" and o:
        console.print(f"final check: optimized x{d['final_ratio']:.3f} of the original, median of {d['final_runs']} "
                      f"interleaved runs each at batch {d['batch']}; written only if <= x{1 - d['margin']:.3f}", highlight=False)
    # the outcome itself (note, held-out back-off, no model) is printed by the caller, one line each

