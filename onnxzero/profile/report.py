"""The profile report: dataclasses, JSON, rich tables (plots live in plots.py).

Units and conventions (also the JSON's):

* ``macs``: true multiply-accumulates per sample (batch 1), see cost.py;
* ``params``: element count of constant (non-index) inputs;
* ``nodes[].latency_ms``: mean onnxruntime kernel time of the node at batch 1
  with graph optimizations disabled (so nodes are the model's own), from
  onnxruntime's profiler, over ``runs`` runs after one warmup run;
  ``time_share`` is its share of the summed node time; ``latency_median_ms``
  is the median over the same runs (a run the OS preempted moves the mean,
  not the median);
* ``model.latency_ms``: wall-clock latency of one inference at
  ``batch_size`` (1 unless the model fixes its batch) with onnxruntime's
  default optimizations: median and 90th percentile over ``runs`` runs after
  one warmup run;
* ``zero_rate``: fraction of activation elements exactly equal to 0 over the
  whole data set; ``per_channel`` is over axis 1, ``per_class`` keys are the
  labels as strings (JSON object keys) and null without labels;
* ``sites[].est_time_saved``: the LeNet paper's Section III.C estimate, the
  share of node time the Conv (+ its ReLU) takes times the fraction of its
  outputs that the ReLU zeroes: an upper bound on what skipping those outputs
  can save, as ``macs_zero`` is for the multiplications.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


@dataclass
class NodeProfile:
    name: str
    op_type: str
    output_shape: list[int | None]  # first output, at batch 1
    params: int
    macs: int  # per sample
    latency_ms: float  # mean kernel time per run
    time_share: float  # of summed node time
    latency_median_ms: float = math.nan  # median kernel time per run: robust to a run the OS preempted


@dataclass
class ActivationProfile:
    node: str  # the Relu / Clip node
    op_type: str
    output: str  # its output value
    output_shape: list[int | None]
    zero_rate: float
    per_channel: list[float]
    per_class: dict[int, float] | None
    per_class_channel: np.ndarray | None = field(default=None, repr=False)  # [classes, channels], not in JSON


@dataclass
class SiteProfile:
    node: str  # the Conv
    relu: str
    macs: int
    zero_rate: float
    macs_zero: float  # macs * zero_rate: multiplications whose result the ReLU zeroes
    time_share: float  # Conv + ReLU node time over summed node time
    est_time_saved: float  # time_share * zero_rate


@dataclass
class ModelSummary:
    name: str
    input_name: str
    input_shape: list[int | None]  # at batch 1
    data: str  # a path, or "random"
    samples: int
    params: int
    macs: int
    latency_median_ms: float
    latency_p90_ms: float
    latency_batch_size: int
    latency_runs: int
    accuracy: float | None  # top-1 over the data, None without labels


@dataclass
class ProfileReport:
    model: ModelSummary
    nodes: list[NodeProfile]
    activations: list[ActivationProfile]
    sites: list[SiteProfile]
    notes: list[str]
    classes: list[int] = field(default_factory=list)

    # JSON ---------------------------------------------------------------------
    def to_json(self) -> dict:
        m = self.model
        return {
            "model": {
                "name": m.name,
                "input": {"name": m.input_name, "shape": list(m.input_shape)},
                "data": m.data,
                "samples": int(m.samples),
                "params": int(m.params),
                "macs": int(m.macs),
                "latency_ms": {"median": _f(m.latency_median_ms), "p90": _f(m.latency_p90_ms),
                               "batch_size": int(m.latency_batch_size), "runs": int(m.latency_runs)},
                "accuracy": _f(m.accuracy),
            },
            "nodes": [
                {"name": n.name, "op_type": n.op_type, "output_shape": list(n.output_shape), "params": int(n.params),
                 "macs": int(n.macs), "latency_ms": _f(n.latency_ms), "time_share": _f(n.time_share),
                 "latency_median_ms": _f(n.latency_median_ms)}
                for n in self.nodes
            ],
            "activations": [
                {"node": a.node, "op_type": a.op_type, "output": a.output, "output_shape": list(a.output_shape),
                 "zero_rate": _f(a.zero_rate), "per_channel": [_f(v) for v in a.per_channel],
                 "per_class": None if a.per_class is None else {str(k): _f(v) for k, v in a.per_class.items()}}
                for a in self.activations
            ],
            "sites": [
                {"node": s.node, "relu": s.relu, "macs": int(s.macs), "zero_rate": _f(s.zero_rate),
                 "macs_zero": _f(s.macs_zero), "time_share": _f(s.time_share),
                 "est_time_saved": _f(s.est_time_saved)}
                for s in self.sites
            ],
            "notes": list(self.notes),
        }

    # terminal -----------------------------------------------------------------
    def render(self, console: Console, *, max_nodes: int | None = 60) -> None:
        """Print the summary (Table I layout), node, activation and site tables, and notes.

        With more than `max_nodes` nodes, the node table shows the slowest
        `max_nodes` (in graph order) and says how many it left out; None shows all.
        """
        console.print(self._summary_table())
        console.print(self._node_table(max_nodes))
        if self.activations:
            console.print(self._activation_table())
        if self.sites:
            console.print(self._site_table())
        for note in self.notes:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)

    def _summary_table(self) -> Table:
        m = self.model
        t = Table(title="Model summary (layout of Table I, cnn-hardware-cost-analysis)",
                  caption=(f"per sample; latency: batch size {m.latency_batch_size}, {m.latency_runs} runs after "
                           f"1 warmup, onnxruntime default optimizations, CPU; data: {m.data} ({m.samples} samples)"))
        for col in ("Model", "Top-1 Acc", "Number of parameters (M)", "GMACs", "Inference Time (ms)", "p90 (ms)"):
            t.add_column(col, justify="left" if col == "Model" else "right", **_fit(col in ("Model",)))
        t.add_row(m.name, "n/a" if m.accuracy is None else f"{m.accuracy * 100:.2f}%", f"{m.params / 1e6:.4g}",
                  f"{m.macs / 1e9:.4g}", f"{m.latency_median_ms:.3f}", f"{m.latency_p90_ms:.3f}")
        return t

    def _node_table(self, max_nodes: int | None) -> Table:
        shown = list(enumerate(self.nodes))
        left_out = 0
        if max_nodes is not None and len(shown) > max_nodes:
            keep = {i for i, _ in sorted(shown, key=lambda p: -p[1].latency_ms)[:max_nodes]}
            left_out = len(shown) - max_nodes
            shown = [p for p in shown if p[0] in keep]
        total_ms = sum(n.latency_ms for n in self.nodes)
        t = Table(title="Per-node profile (batch 1, graph optimizations off)",
                  caption=(f"{left_out} faster nodes not shown; " if left_out else "")
                  + f"summed node time {total_ms:.3f} ms; MACs per sample")
        for col in ("#", "node", "op", "output shape", "params", "MACs", "latency (ms)", "share"):
            t.add_column(col, justify="right" if col in ("#", "params", "MACs", "latency (ms)", "share") else "left",
                         **_fit(col == "node"))
        for i, n in shown:
            t.add_row(str(i), n.name, n.op_type, _shape(n.output_shape), f"{n.params:,}", f"{n.macs:,}",
                      f"{n.latency_ms:.4f}", f"{n.time_share * 100:.1f}%")
        t.add_row("", "total", "", "", f"{self.model.params:,}", f"{self.model.macs:,}", f"{total_ms:.4f}", "100%",
                  style="bold")
        return t

    def _activation_table(self) -> Table:
        t = Table(title="ReLU activations: exact zero rates",
                  caption=f"over {self.model.samples} samples of {self.model.data}")
        cols = ["node", "op", "shape", "zero rate", "min channel", "max channel"]
        if self.classes:
            cols += ["min class", "max class"]
        for col in cols:
            t.add_column(col, justify="left" if col in ("node", "op", "shape") else "right", **_fit(col == "node"))
        for a in self.activations:
            row = [a.node, a.op_type, _shape(a.output_shape), _pct(a.zero_rate),
                   _pct(min(a.per_channel)) if a.per_channel else "-",
                   _pct(max(a.per_channel)) if a.per_channel else "-"]
            if self.classes:
                pc = a.per_class or {}
                if pc:
                    lo = min(pc, key=pc.__getitem__)
                    hi = max(pc, key=pc.__getitem__)
                    row += [f"{_pct(pc[lo])} ({lo})", f"{_pct(pc[hi])} ({hi})"]
                else:
                    row += ["-", "-"]
            t.add_row(*row)
        return t

    def _site_table(self) -> Table:
        t = Table(title="Conv+ReLU sites: what zero-skipping could save (upper bounds)",
                  caption="est. time saved = time share x zero rate (LeNet paper, Sec. III.C), of summed node time")
        for col in ("conv", "relu", "MACs", "zero rate", "MACs zeroed", "time share", "est. time saved"):
            t.add_column(col, justify="left" if col in ("conv", "relu") else "right", **_fit(col in ("conv", "relu")))
        for s in self.sites:
            t.add_row(s.node, s.relu, f"{s.macs:,}", _pct(s.zero_rate), f"{s.macs_zero:,.0f}", _pct(s.time_share),
                      _pct(s.est_time_saved))
        macs = sum(s.macs for s in self.sites)
        zeroed = sum(s.macs_zero for s in self.sites if not math.isnan(s.macs_zero))
        t.add_row("total", "", f"{macs:,}", _pct(zeroed / macs) if macs else "-", f"{zeroed:,.0f}",
                  _pct(sum(s.time_share for s in self.sites)),
                  _pct(sum(s.est_time_saved for s in self.sites if not math.isnan(s.est_time_saved))), style="bold")
        return t

    # plots --------------------------------------------------------------------
    def write_plots(self, out_dir: Path) -> list[Path]:
        """Write PNGs into `out_dir` (created if needed), each atomically; return their paths."""
        from onnxzero.profile.plots import write_plots

        return write_plots(self, Path(out_dir))


def _f(v: float | None) -> float | None:
    """A JSON-safe python float (NaN and None become None)."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


def _fit(is_name: bool) -> dict:
    """Column options: nothing is cut with an ellipsis ("/features/featur…"); in a terminal too narrow
    for the table, a cell folds onto more lines. Users copy node names into --config files."""
    return {"overflow": "fold"}


def _pct(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v * 100:.1f}%"


def _shape(s: list[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in s) + ")"
