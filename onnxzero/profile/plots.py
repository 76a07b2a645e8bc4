"""PNG plots of a ProfileReport (matplotlib's Agg canvas, no pyplot global state).

* ``zero_rate_NNN_<node>.png`` per activation: a class x filter heat map of
  zero rates when the data has labels (like the LeNet paper's Figs. 2-3, which
  plot each filter's zero rate per input digit), else a bar per filter;
* ``zero_rate_per_class.png`` (labels only): class x layer heat map;
* ``zero_rate_per_layer.png``: overall zero rate per activation;
* ``latency_per_node.png``: kernel time per node (the slowest 40 when there
  are more), like the paper's Table I per-layer times.

Every file is written to a temporary file in the same folder and moved into
place with os.replace, so a reader never sees half a PNG.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from onnxzero.profile.report import ProfileReport

MAX_LATENCY_BARS = 40
MAX_BARS = 256


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")[:60] or "node"


def _save(fig: Figure, path: Path) -> Path:
    from onnxzero.emit import atomic_write

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def write_plots(report: ProfileReport, out_dir: Path) -> list[Path]:
    written: list[Path] = []
    classes = report.classes
    for i, a in enumerate(report.activations):
        if not a.per_channel:
            continue
        path = out_dir / f"zero_rate_{i:03d}_{_safe(a.node)}.png"
        if a.per_class_channel is not None and classes:
            fig = Figure(figsize=(max(6.0, min(20.0, 0.25 * len(a.per_channel) + 3)),
                                  max(3.0, 0.35 * len(classes) + 1.5)))
            ax = fig.add_subplot()
            im = ax.imshow(a.per_class_channel, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis",
                           interpolation="nearest")
            ax.set_yticks(range(len(classes)), [str(c) for c in classes])
            ax.set_xlabel("filter (output channel)")
            ax.set_ylabel("class")
            fig.colorbar(im, ax=ax, label="zero rate")
        else:
            fig = Figure(figsize=(max(6.0, min(20.0, 0.15 * len(a.per_channel) + 3)), 3.5))
            ax = fig.add_subplot()
            x = np.arange(len(a.per_channel))
            if len(x) <= MAX_BARS:
                ax.bar(x, a.per_channel, color="tab:blue")
            else:  # thousands of bar patches are slow to draw and unreadable anyway
                ax.fill_between(x, a.per_channel, step="mid", color="tab:blue")
            ax.set_xlim(-0.5, len(x) - 0.5)
            ax.set_ylim(0, 1)
            ax.set_xlabel("filter (output channel)")
            ax.set_ylabel("zero rate")
        ax.set_title(f"{a.node} ({a.op_type}): zero rate {a.zero_rate:.1%}")
        fig.subplots_adjust(left=0.08, right=0.98 if a.per_class_channel is None else 0.95, bottom=0.18, top=0.88)
        written.append(_save(fig, path))

    acts = [a for a in report.activations if not np.isnan(a.zero_rate)]
    if acts:
        names = [a.node for a in acts]
        if classes and all(a.per_class for a in acts):
            m = np.array([[a.per_class.get(c, np.nan) for a in acts] for c in classes])  # type: ignore[union-attr]
            fig = Figure(figsize=(max(6.0, min(24.0, 0.4 * len(acts) + 3)), max(3.0, 0.35 * len(classes) + 2.5)))
            ax = fig.add_subplot()
            im = ax.imshow(m, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(classes)), [str(c) for c in classes])
            ax.set_ylabel("class")
            ax.set_title("zero rate per class and layer")
            fig.colorbar(im, ax=ax, label="zero rate")
            fig.tight_layout()
            written.append(_save(fig, out_dir / "zero_rate_per_class.png"))
        fig = Figure(figsize=(max(6.0, min(24.0, 0.3 * len(acts) + 3)), 4.0))
        ax = fig.add_subplot()
        ax.bar(range(len(acts)), [a.zero_rate for a in acts], color="tab:orange")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("zero rate")
        ax.set_title("zero rate per layer")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "zero_rate_per_layer.png"))

    nodes = list(report.nodes)
    if nodes:
        title = "kernel time per node (batch 1)"
        if len(nodes) > MAX_LATENCY_BARS:
            keep = {id(n) for n in sorted(nodes, key=lambda n: -n.latency_ms)[:MAX_LATENCY_BARS]}
            nodes = [n for n in nodes if id(n) in keep]
            title += f", slowest {MAX_LATENCY_BARS} of {len(report.nodes)}"
        fig = Figure(figsize=(8.0, max(3.0, 0.22 * len(nodes) + 1.5)))
        ax = fig.add_subplot()
        y = np.arange(len(nodes))
        ax.barh(y, [n.latency_ms for n in nodes], color="tab:green")
        ax.set_yticks(y, [f"{n.name} ({n.op_type})" for n in nodes], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per run")
        ax.set_title(title)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "latency_per_node.png"))
    return written
