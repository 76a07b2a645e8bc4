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
    for col in ("", "top-1", "MACs / sample", "latency (ms, batch 1)"):
        t.add_column(col, justify="right")
    t.add_row("original", f"{b['accuracy'] * 100:.2f}%", f"{b['macs']:,}", f"{b['latency_ms']:.3f}")
    if o:
        t.add_row("optimized", f"{o['accuracy'] * 100:.2f}%", f"{o['macs']:,}", f"{o['latency_ms']:.3f}")
        t.add_row("change", f"{-report['validation_loss']:+.2f} pts", f"-{report['mac_reduction'] * 100:.1f}%",
                  f"x{report['latency_ratio']:.2f}")
    console.print(t)
    st = Table(title="sites")
    for col in ("site", "technique", "setting", "MACs before", "MACs after"):
        st.add_column(col, justify="right" if col.startswith("MACs") else "left")
    for s in report["sites"]:
        st.add_row(s["node"], s["technique"] or "dense", _setting(s["setting"]), f"{s['macs_before']:,}", f"{s['macs_after']:,}")
    console.print(st)
    sr = report["search"]
    console.print(f"search: {sr['candidates_evaluated']} candidates measured ({sr['first_level']} first-level, "
                  f"{sr['combinations']} combinations) in {sr['seconds']:.0f} s; "
                  f"{len(report['pareto'])} points on the accuracy/MACs/latency Pareto front", highlight=False)
    if "note" in report:
        console.print(f"[bold yellow]{report['note']}[/]")
    elif not report["met_eps"]:
        console.print(f"[bold red]no configuration met eps = {report['eps']:g} on the calibration split[/]")
