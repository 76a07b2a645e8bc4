"""Several models side by side: the hardware-cost paper's Table I, plus memory and an energy estimate.

Per model: parameters and MACs (profile's own counting, cost.py; the MACs of onnxzero ops are the
counts their `macs` outputs report on the data, so a rewritten model shows the work it really does),
median latency (all models timed in alternating rounds in one process, so machine noise hits them
alike), top-1 accuracy against the data's labels, peak activation memory and an energy estimate.

Peak activation memory: the largest sum of live activation bytes over a walk of the graph in its
(topological) node order, at one inference (batch 1, or the model's fixed batch): a node's outputs
are allocated before its inputs are freed, a tensor is freed after its last consumer, the graph's
input and outputs are activations too, weights are not. Sizes are those of a real run.

Energy per inference (an ESTIMATE: this machine has no power counters), from the 45 nm per-operation
energies of M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014:
32-bit float multiply 3.7 pJ + add 0.9 pJ per MAC; every activation byte a node reads or writes moves
through an 8 KB SRAM, 5 pJ per 32-bit access; every weight byte the model stores is read once from
DRAM, 640 pJ per 32-bit access (at batch 1 no weight is reused across samples, and the weights of a
CNN do not fit in 8 KB). So a pruned, 8-bit model (sparse-quant) moves fewer weight bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from rich.console import Console
from rich.table import Table

from onnxzero import zoo
from onnxzero.data import Dataset, check_fits, image_input, load_dataset
from onnxzero.errors import UserError
from onnxzero.load import load_model
from onnxzero.profile.cost import model_params, node_macs
from onnxzero.profile.prepare import prepare
from onnxzero.profile.runtime import chunks

#: Horowitz, ISSCC 2014, 45 nm, picojoules.
PJ_FMUL32 = 3.7
PJ_FADD32 = 0.9
PJ_SRAM32_8KB = 5.0
PJ_DRAM32 = 640.0
ENERGY_SOURCE = "estimate from Horowitz, ISSCC 2014 (45 nm): MAC 3.7+0.9 pJ, SRAM 5 pJ/32 bit, DRAM 640 pJ/32 bit"


@dataclass
class ModelCost:
    name: str
    data: str
    samples: int
    params: int
    macs: int  # per sample
    latency_ms: float  # median, batch as below
    batch: int
    accuracy: float | None  # top-1 against the labels; None without labels
    peak_activation_bytes: int
    weight_bytes: int
    activation_bytes_moved: int

    @property
    def energy_pj(self) -> dict[str, float]:
        """The estimate's parts, per inference (one sample)."""
        return {"compute": self.macs * (PJ_FMUL32 + PJ_FADD32),
                "sram": self.activation_bytes_moved / 4 / self.batch * PJ_SRAM32_8KB,
                "dram": self.weight_bytes / 4 / self.batch * PJ_DRAM32}

    @property
    def energy_uj(self) -> float:
        return sum(self.energy_pj.values()) / 1e6

    def to_json(self) -> dict:
        return {"name": self.name, "data": self.data, "samples": self.samples, "params": int(self.params),
                "macs": int(self.macs), "latency_ms": {"median": float(self.latency_ms), "batch_size": self.batch},
                "accuracy": self.accuracy, "peak_activation_bytes": int(self.peak_activation_bytes),
                "weight_bytes": int(self.weight_bytes), "activation_bytes_moved": int(self.activation_bytes_moved),
                "energy_estimate_uj": float(self.energy_uj),
                "energy_estimate_parts_uj": {k: v / 1e6 for k, v in self.energy_pj.items()}}


@dataclass
class Comparison:
    models: list[ModelCost]
    runs: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"models": [m.to_json() for m in self.models], "latency_runs": self.runs,
                "energy_estimate": ENERGY_SOURCE, "notes": list(self.notes)}

    def table(self) -> Table:
        datas = {(m.data, m.samples) for m in self.models}
        same = len(datas) == 1
        data_note = f"data: {self.models[0].data} ({self.models[0].samples} samples); " if same and self.models else ""
        t = Table(title="Models side by side (layout of Table I, cnn-hardware-cost-analysis)",
                  caption=f"per sample; {data_note}latency: median of {self.runs} runs, models alternated; "
                          f"energy: {ENERGY_SOURCE}, not measured")
        cols = ["model"] + ([] if same else ["data"]) + ["params", "MACs", "latency (ms)", "top-1 (labels)",
                                                         "peak act. memory", "energy est. (uJ)"]
        name_w = min(40, max((len(m.name) for m in self.models), default=5))
        for col in cols:
            t.add_column(col, justify="left" if col in ("model", "data") else "right", overflow="fold",
                         min_width=name_w if col == "model" else None)
        for m in self.models:
            t.add_row(m.name, *([] if same else [f"{m.data} ({m.samples})"]), f"{m.params:,}", f"{m.macs:,}",
                      f"{m.latency_ms:.3f}", "n/a (no labels)" if m.accuracy is None else f"{m.accuracy * 100:.2f}%",
                      _bytes(m.peak_activation_bytes), f"{m.energy_uj:.3f}")
        return t

    def render(self, console: Console) -> None:
        console.print(self.table())
        for note in self.notes:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


def compare_models(specs: list[str | Path], *, data: str | Path | None = None, runs: int = 20,
                   threads: int = 0) -> Comparison:
    """Measure every model of `specs` (.onnx paths or zoo:NAME) and return them side by side.

    data: one .npz for all models; by default each zoo model's own data set, and one random
    normal(0, 1) input (no accuracy) for a file with no data.
    """
    from onnxzero.evaluate import Evaluator, top1

    if len(specs) < 1:
        raise UserError("compare needs at least one model, got none")
    if isinstance(runs, bool) or not isinstance(runs, (int, np.integer)) or runs < 1:
        raise UserError(f"runs is {runs!r}, expected a positive integer")
    notes: list[str] = []
    measured = []
    # a file compared with zoo models (typically the model `optimize` wrote from one) is measured on
    # their data set when they share one and it fits
    zoo_data = {zoo.default_data(str(s)) for s in specs if str(s).startswith(zoo.PREFIX)} - {None}
    shared = zoo_data.pop() if data is None and len(zoo_data) == 1 else None
    for spec in specs:
        spec = str(spec)
        proto = load_model(spec)
        ds, label = _dataset(spec, proto, data)
        if ds is None and shared is not None:
            try:
                ds, label = _dataset(spec, proto, shared)
                notes.append(f"{_name(spec)}: no data given, measured on the zoo models' {label}")
            except UserError:
                ds = None
        if ds is None:
            from onnxzero.profile.api import _random_dataset

            ds = _random_dataset(proto)
            notes.append(f"{_name(spec)}: no data, timed on one random normal(0, 1) input; no accuracy")
        ev = Evaluator(proto, threads=threads)
        r = ev.run(ds.inputs)
        accuracy = top1(r.logits, ds.labels) if ds.labels is not None else None
        static = _static_batch(proto)
        sample = next(chunks(ds.inputs, 1, static))[1]
        sizes, shapes = _tensor_sizes(proto, sample, threads)
        batch = len(sample)
        macs = sum(node_macs(n, shapes, batch) or 0 for n in proto.graph.node) + r.macs
        cp = onnx.ModelProto()
        cp.CopyFrom(proto)
        cost = ModelCost(name=_name(spec), data=label, samples=len(ds), params=model_params(prepare(cp)),
                         macs=int(macs), latency_ms=math.nan, batch=batch, accuracy=accuracy,
                         peak_activation_bytes=peak_activation_bytes(proto, sizes),
                         weight_bytes=weight_bytes(proto), activation_bytes_moved=activation_bytes_moved(proto, sizes))
        measured.append((cost, ev, sample))
    # alternate the models round by round so a slow moment of the machine hits all of them
    rounds = min(5, runs)
    times: list[list[float]] = [[] for _ in measured]
    for _ in range(rounds):
        for i, (_, ev, sample) in enumerate(measured):
            times[i].append(ev.latency_ms(sample, runs=max(1, runs // rounds)))
    for (cost, _, _), t in zip(measured, times, strict=True):
        cost.latency_ms = float(np.median(t))
    return Comparison([c for c, _, _ in measured], runs, notes)


def _name(spec: str) -> str:
    return spec if spec.startswith(zoo.PREFIX) else Path(spec).name


def _dataset(spec: str, proto: onnx.ModelProto, data) -> tuple[Dataset | None, str]:
    path = Path(data) if data is not None else zoo.default_data(spec)
    if path is None:
        return None, "random"
    ds = load_dataset(path)
    check_fits(ds, proto)
    return ds, path.name


def _static_batch(proto: onnx.ModelProto) -> int | None:
    return image_input(proto)[1][0]


def _tensor_sizes(proto: onnx.ModelProto, sample: np.ndarray, threads: int) -> tuple[dict[str, int], dict[str, tuple]]:
    """Bytes and shapes of every activation (graph input and node outputs) in one real run on `sample`."""
    from onnxzero.evaluate import session

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    init = {t.name for t in m.graph.initializer}
    have = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have:  # untyped outputs: onnxruntime takes the type the node produces
                m.graph.output.append(helper.make_empty_tensor_value_info(o))
                have.add(o)
    sess = session(m, threads=threads)
    inp = next(i.name for i in m.graph.input if i.name not in init)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, {inp: sample}), strict=True))
    values[inp] = sample
    sizes = {k: int(np.asarray(v).nbytes) for k, v in values.items()}
    shapes: dict[str, tuple] = {k: tuple(np.asarray(v).shape) for k, v in values.items()}
    shapes.update({t.name: tuple(t.dims) for t in m.graph.initializer})
    return sizes, shapes


def peak_activation_bytes(model: onnx.ModelProto, sizes: dict[str, int]) -> int:
    """Largest sum of live activation bytes walking the nodes in order (see the module docstring)."""
    nodes = list(model.graph.node)
    end = len(nodes)
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o in sizes:
                last.setdefault(o, i)  # an output nobody reads is freed right after its node
        for x in n.input:
            if x in sizes:
                last[x] = i
    for o in model.graph.output:
        last[o.name] = end
    live = sum(sizes[i.name] for i in model.graph.input if i.name in sizes)
    peak = live
    for i, n in enumerate(nodes):
        live += sum(sizes[o] for o in dict.fromkeys(n.output) if o in sizes)
        peak = max(peak, live)
        for x in dict.fromkeys([*n.input, *n.output]):
            if x in sizes and last.get(x) == i:
                live -= sizes[x]
    return int(peak)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the constants the nodes read (initializers and Constant nodes), each counted once."""
    used = {x for n in model.graph.node for x in n.input if x}
    total = 0
    for t in model.graph.initializer:
        if t.name in used:
            total += math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] in used:
            for a in n.attribute:
                if a.name == "value":
                    total += math.prod(a.t.dims) * helper.tensor_dtype_to_np_dtype(a.t.data_type).itemsize
    return total


def activation_bytes_moved(model: onnx.ModelProto, sizes: dict[str, int]) -> int:
    """Activation bytes every node reads and writes (weights excluded), summed over the nodes."""
    return int(sum(sizes.get(x, 0) for n in model.graph.node for x in (*n.input, *n.output) if x))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
