"""Bench case for EarlyExitConv (`onnxzero bench ops`): skip s -> an input with a fraction s of zeros.

Exact mode skips, per output, the terms whose input is 0 (docs/design-early-exit.md). The input is
post-ReLU-like: normal values shifted so that a fraction s of them is 0 after the ReLU (s = 0: no
zero at all, the op's fixed costs). Weights He-normal. The op's cost model picks its sparse path
(only nonzero inputs multiplied) or the dense GEMM path per run, so the skip the table shows is the
one the op chose to take (0 % when the dense path runs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxzero.bench.common import BenchCase, Layer, he_weights
from onnxzero.evaluate import with_outputs
from onnxzero.ops import early_exit as ee
from onnxzero.ops import make_session, single_op_model
from onnxzero.ops.conv_relu import onnx_conv_relu_model

OP = ee.OP


def build(layer: Layer, skip: float, rng: np.random.Generator) -> BenchCase:
    x = rng.standard_normal(layer.x_shape).astype(np.float32)
    x = np.maximum(x - np.float32(np.quantile(x, skip)), 0) if skip > 0 else np.abs(x) + np.float32(0.01)
    w = he_weights(layer, rng)
    b = (0.01 * rng.standard_normal(layer.K)).astype(np.float32)
    node, inits = ee.make_node("X", "W", "B", "Y", macs_output="macs", mode="exact", **layer.conv_attrs())
    model = single_op_model(node, {"W": w, "B": b, **inits}, layer.x_shape, outputs=["Y", "macs"])
    return BenchCase(model=model, feeds={"X": x},
                     setting=f"exact, {np.mean(x == 0):.0%} zero inputs (the cost model picks the path)")


# ------------------------------------------------------------------------------ real activations
# (benchmarks/early_exit_real.py and the zoo exactness tests: each site fed what the model computes)
def conv_sites(model: onnx.ModelProto) -> list[dict]:
    """Conv -> Relu and Conv -> Add(other) -> Relu sites of a normalized model (BN folded): name, x (input
    tensor), w, b, other (the Add's other operand or None), conv attributes."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    sites = []
    for n in model.graph.node:
        if n.op_type != "Conv" or n.input[1] not in inits:
            continue
        nxt = users.get(n.output[0], [])
        if len(nxt) != 1:
            continue
        other = None
        if nxt[0].op_type == "Add":
            other = [i for i in nxt[0].input if i != n.output[0]][0]
            after = users.get(nxt[0].output[0], [])
            if len(after) != 1 or after[0].op_type != "Relu":
                continue
        elif nxt[0].op_type != "Relu":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        conv = {"strides": tuple(attrs.get("strides", (1, 1))), "pads": tuple(attrs.get("pads", (0, 0, 0, 0))),
                "dilations": tuple(attrs.get("dilations", (1, 1))), "group": int(attrs.get("group", 1))}
        b = inits[n.input[2]] if len(n.input) > 2 and n.input[2] else None
        sites.append({"name": n.name or n.output[0], "x": n.input[0], "w": inits[n.input[1]], "b": b,
                      "other": other, "conv": conv})
    return sites


def capture(model: onnx.ModelProto, sites: list[dict], images: np.ndarray) -> dict[str, np.ndarray]:
    """The sites' input and shortcut tensors on `images` (onnxruntime, the model as it is)."""
    names = sorted({s["x"] for s in sites} | {s["other"] for s in sites if s["other"]})
    m = with_outputs(model, names)
    sess = make_session(m, threads=2, library=False)
    outs = sess.run(names, {model.graph.input[0].name: images})
    return dict(zip(names, outs))


def site_models(s: dict, batch_shape, skip_zeros=None):
    """(EarlyExitConv exact model with inputs X [, O], onnxruntime's own Conv(+Add)+Relu on the same inputs)."""
    w, b, other = s["w"], s["b"], s["other"]
    node, inits = ee.make_node("X", "W", "B" if b is not None else None, "Y", macs_output="macs",
                               other="O" if other else None, skip_zeros=skip_zeros, **s["conv"])
    inits["W"] = w
    if b is not None:
        inits["B"] = b
    rt = {"O": (TensorProto.FLOAT, None)} if other else None
    op = single_op_model(node, inits, batch_shape, runtime_inputs=rt, outputs=["Y", "macs"])
    if other:
        ref = ee.onnx_conv_add_relu_model(w, b, batch_shape, **s["conv"])
    else:
        ref = onnx_conv_relu_model(w, b, batch_shape, **s["conv"])
    return op, ref
