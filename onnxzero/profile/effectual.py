"""Effectual MACs: the share of multiply-accumulates whose weight AND input are both non-zero.

This is the "activation" of the pruning paper's Table III
(../shared/papers/pruning-quantization-sparsity-activation.txt: "the percentage of MAC operations
which output non-zero valued results among total MAC operations"), per Conv/Gemm layer and for the
model, counted exactly on a data set.

How it is counted: for a layer y = W (*) x, the number of effectual products behind every output is
(1[W != 0] (*) 1[x != 0]) at that output, the same operator applied to the two indicator tensors.
So each weighted node gets a side branch in the graph, Cast(x != 0) fed with a 0/1 copy of its
weights through the node's own op type and attributes (strides, pads, groups, transposes), summed in
float64. Every partial sum is a small integer (at most C/group*KH*KW), exact in float32, so the
counts are exact; onnxruntime does the convolutions, the data never leaves the session. Padding
positions are zeros of x: they count in the dense MACs (as profile's cost.py counts them) and never
as effectual.

A model rewritten with sparse-quant (onnxzero.ops.sparse_quant) is counted on the weights its
SparseQuantConv ops really use: `sparse_quant.decompress` of their stored values, so pruned and
quantized-to-zero weights are ineffectual. The other onnxzero ops keep the dense weights (their
input 1); their own savings come from skipping outputs, which their `macs` counters report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from onnxzero import DOMAIN, zoo
from onnxzero.data import Dataset, check_fits, image_input, load_dataset
from onnxzero.errors import UserError
from onnxzero.load import load_model
from onnxzero.ops import sparse_quant
from onnxzero.passes.naming import name_nodes
from onnxzero.profile.runtime import chunks

_CONV_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "group", "auto_pad")
_PREFIX = "__oz_eff"
BATCH = 100


@dataclass
class LayerEffectual:
    node: str
    op_type: str
    macs: int  # dense MACs per sample (every weight times every input position, padding included)
    effectual: float  # mean per sample of MACs whose weight and input are both non-zero
    weight_nonzero: float  # share of the layer's weights that are non-zero (after decompression)
    input_nonzero: float  # share of the layer's input elements that are non-zero, over the data

    @property
    def share(self) -> float:
        return self.effectual / self.macs if self.macs else math.nan


@dataclass
class EffectualReport:
    model: str
    data: str
    samples: int
    layers: list[LayerEffectual]
    notes: list[str] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def effectual(self) -> float:
        return sum(layer.effectual for layer in self.layers)

    @property
    def share(self) -> float:
        return self.effectual / self.macs if self.macs else math.nan

    def to_json(self) -> dict:
        def f(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {"model": self.model, "data": self.data, "samples": self.samples,
                "macs": int(self.macs), "effectual_macs": f(self.effectual), "effectual_share": f(self.share),
                "layers": [{"node": x.node, "op_type": x.op_type, "macs": int(x.macs), "effectual_macs": f(x.effectual),
                            "effectual_share": f(x.share), "weight_nonzero": f(x.weight_nonzero),
                            "input_nonzero": f(x.input_nonzero)} for x in self.layers],
                "notes": list(self.notes)}

    def table(self) -> Table:
        t = Table(title="Effectual MACs: weight and input both non-zero (pruning paper's Table III \"activation\")",
                  caption=f"per sample, mean over {self.samples} samples of {self.data}")
        for col in ("layer", "op", "MACs", "effectual MACs", "%ACT", "weights != 0", "inputs != 0"):
            t.add_column(col, justify="left" if col in ("layer", "op") else "right", overflow="fold")
        for x in self.layers:
            t.add_row(x.node, x.op_type, f"{x.macs:,}", f"{x.effectual:,.0f}", _pct(x.share), _pct(x.weight_nonzero),
                      _pct(x.input_nonzero))
        t.add_row("model", "", f"{self.macs:,}", f"{self.effectual:,.0f}", _pct(self.share), "", "", style="bold")
        return t

    def render(self, console: Console) -> None:
        console.print(self.table())
        for note in self.notes:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


def effectual_macs(model: str | Path | onnx.ModelProto, *, data: str | Path | Dataset | None = None,
                   batch_size: int = BATCH) -> EffectualReport:
    """Exact effectual MACs of every Conv / Gemm / MatMul-with-constant-weights layer over a data set.

    model: an .onnx path, ``zoo:NAME`` or a ModelProto (plain or rewritten by onnxzero). data: an .npz
    (or a Dataset); by default the zoo model's data set. Raises UserError without data, since
    effectual MACs of random inputs mean nothing.
    """
    from onnxzero.evaluate import session

    spec = model if isinstance(model, onnx.ModelProto) else str(model)
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    if isinstance(data, Dataset):
        ds = data
    else:
        path = Path(data) if data is not None else (zoo.default_data(spec) if isinstance(spec, str) else None)
        if path is None:
            raise UserError("effectual MACs need data: expected --data FILE.npz with 'inputs' "
                            "(zero inputs depend on the data)")
        ds = load_dataset(path)
    check_fits(ds, proto)

    m, layers, notes = _with_indicator_branches(proto)
    if not layers:
        return EffectualReport(_label(spec), str(ds.path), len(ds), [], notes + ["no Conv, Gemm or MatMul layer with constant weights"])
    sess = session(m)
    fetch = [o for lay in layers for o in lay["outputs"]]
    totals = np.zeros(len(fetch), np.float64)
    input_name, dims = image_input(proto)
    static = dims[0]
    inputs = ds.inputs
    if static and len(inputs) % static:  # zero-padded samples would count as real ones: drop the tail
        inputs = inputs[:len(inputs) - len(inputs) % static]
        if not len(inputs):
            raise UserError(f"model input '{input_name}' has a fixed batch of {static}; expected at least "
                            f"{static} samples for effectual MACs, got {len(ds)}")
        notes = notes + [f"fixed batch {static}: counted on the first {len(inputs)} of {len(ds)} samples"]
    for _, part, _ in chunks(inputs, batch_size, static):
        totals += np.asarray([float(v) for v in sess.run(fetch, {input_name: part})], np.float64)
    out = []
    for i, lay in enumerate(layers):
        eff, y_elems, x_nz, x_elems = totals[4 * i: 4 * i + 4]
        per_out = lay["per_output_macs"]
        out.append(LayerEffectual(node=lay["node"], op_type=lay["op_type"], macs=int(round(y_elems * per_out / len(inputs))),
                                  effectual=float(eff / len(inputs)), weight_nonzero=lay["weight_nonzero"],
                                  input_nonzero=float(x_nz / x_elems) if x_elems else math.nan))
    return EffectualReport(_label(spec), str(ds.path), len(inputs), out, notes)


def _label(spec) -> str:
    if isinstance(spec, onnx.ModelProto):
        return spec.graph.name or "model"
    return spec if spec.startswith(zoo.PREFIX) else Path(spec).name


def _with_indicator_branches(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict], list[str]]:
    """A copy of `model` whose outputs are, per weighted layer: effectual count, output elements,
    non-zero inputs and input elements, each summed over the batch (float64 / int64 scalars)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_nodes(m)  # layers are named as profile and `rewrite --config` name them
    names = [n.name for n in m.graph.node]
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}
    del g.output[:]
    layers: list[dict] = []
    notes: list[str] = []
    skipped: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    for idx, node in enumerate(model.graph.node):
        attrs, op, per_out = {}, node.op_type, 0
        name = names[idx]
        if node.domain == DOMAIN and node.op_type == sparse_quant.OP:
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            c = {"values": _value(node.input[1], inits, consts), "index": _value(node.input[2], inits, consts),
                 "row_ptr": _value(node.input[3], inits, consts), "weight_shape": tuple(a["weight_shape"]),
                 "frac_bits": a["frac_bits"]}
            w = sparse_quant.decompress(c)
            op, attrs = "Conv", {k: v for k, v in a.items() if k in _CONV_ATTRS}
        elif node.domain == DOMAIN and len(node.input) > 1 and _value(node.input[1], inits, consts) is not None:
            w = _value(node.input[1], inits, consts)
            if w.ndim < 3:
                skipped.append(name)
                continue
            op = "Conv"
            attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute if x.name in _CONV_ATTRS}
        elif node.domain in ("", "ai.onnx") and node.op_type in ("Conv", "Gemm", "MatMul"):
            w = _value(node.input[1], inits, consts)
            if w is None:
                skipped.append(name)
                continue
            attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute
                     if x.name in (_CONV_ATTRS if op == "Conv" else ("transA", "transB"))}
        else:
            continue
        if op == "Conv":
            per_out = int(np.prod(w.shape[1:]))
        elif op == "Gemm":
            per_out = int(w.shape[1] if attrs.get("transB", 0) else w.shape[0])
        else:
            per_out = int(w.shape[-2] if w.ndim >= 2 else w.shape[0])
        p = f"{_PREFIX}{len(layers)}"
        w_name = f"{p}_w"
        g.initializer.append(numpy_helper.from_array((w != 0).astype(np.float32), w_name))
        x = node.input[0]
        zero = f"{p}_zero"
        g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
        outs = [f"{p}_eff", f"{p}_yelems", f"{p}_xnz", f"{p}_xelems"]
        new_nodes += [
            helper.make_node("Equal", [x, zero], [f"{p}_xz"]),
            helper.make_node("Not", [f"{p}_xz"], [f"{p}_xnzb"]),
            helper.make_node("Cast", [f"{p}_xnzb"], [f"{p}_xi"], to=TensorProto.FLOAT),
            helper.make_node(op, [f"{p}_xi", w_name], [f"{p}_y"], **attrs),
            helper.make_node("Cast", [f"{p}_y"], [f"{p}_yd"], to=TensorProto.DOUBLE),
            helper.make_node("ReduceSum", [f"{p}_yd"], [outs[0]], keepdims=0),
            helper.make_node("Size", [f"{p}_y"], [outs[1]]),
            helper.make_node("Cast", [f"{p}_xnzb"], [f"{p}_xd"], to=TensorProto.DOUBLE),
            helper.make_node("ReduceSum", [f"{p}_xd"], [outs[2]], keepdims=0),
            helper.make_node("Size", [x], [outs[3]]),
        ]
        for o, t in zip(outs, (TensorProto.DOUBLE, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.INT64), strict=True):
            g.output.append(helper.make_tensor_value_info(o, t, []))
        layers.append({"node": name, "op_type": node.op_type, "outputs": outs, "per_output_macs": per_out,
                       "weight_nonzero": float(np.count_nonzero(w)) / w.size if w.size else math.nan})
    g.node.extend(new_nodes)
    if skipped:
        notes.append(f"{len(skipped)} weighted nodes have run-time (non-constant) weights and are not counted: "
                     + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return m, layers, notes


def _value(name: str, inits: dict[str, onnx.TensorProto], consts: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    if name in consts:
        a = next((x for x in consts[name].attribute if x.name == "value"), None)
        return numpy_helper.to_array(a.t) if a is not None else None
    return None


def _pct(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v * 100:.1f}%"
