"""Bench case for EarlyExitConv (`onnxzero bench ops`): skip s -> a bias shift (and mode) reaching it.

Inputs are post-ReLU-like (non-negative), weights He-normal. Exact mode skips only negative terms
of outputs that end <= 0, so its skip is set by how many outputs end negative: a common bias shift
beta is searched (bisection on the op's own `macs` counter) so that the measured skip approaches s.
Exact mode cannot skip more than the share of negative weights (about half) and gets close to it
only when nearly every output is 0: targets above what it reaches (75%, 90%, and on some layers
50%) use predictive mode instead, with n_terms = 0.95 (1 - s) T_k (T_k: nonzero weights of filter
k), threshold 0 (an output whose partial sum after those terms is negative is predicted 0) and
again a bias shift searched for the skip. `setting` says which.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxzero.bench.common import BenchCase, Layer, he_weights, realistic_input
from onnxzero.evaluate import with_outputs
from onnxzero.ops import early_exit as ee
from onnxzero.ops import make_session, single_op_model
from onnxzero.ops.conv_relu import onnx_conv_relu_model

OP = ee.OP
_ITERS = 14


def _case(layer: Layer, w, b, mode: str, n_terms=None, threshold=None):
    node, inits = ee.make_node("X", "W", "B", "Y", macs_output="macs", mode=mode, n_terms=n_terms,
                               threshold=threshold, **layer.conv_attrs())
    return single_op_model(node, {"W": w, "B": b, **inits}, layer.x_shape, outputs=["Y", "macs"])


def _skip(model, x, dense: int) -> float:
    sess = make_session(model, threads=2)
    macs = int(np.asarray(sess.run(["macs"], {"X": x})[0]))
    return 1.0 - macs / dense


def _search(layer: Layer, x, w, b0, dense: int, target: float, mode: str, **pred):
    """Bias shift beta (bisection) whose measured skip is closest to target; returns (beta, skip)."""
    def skip_at(beta):
        return _skip(_case(layer, w, (b0 + beta).astype(np.float32), mode, **pred), x, dense)

    lo, hi = -30.0, 30.0  # skip(lo) is the largest, skip(hi) ~ 0: outputs have std ~1
    s_lo, s_hi = skip_at(lo), skip_at(hi)
    best = min(((lo, s_lo), (hi, s_hi)), key=lambda t: abs(t[1] - target))
    if target >= s_lo:
        return lo, s_lo
    if target <= s_hi:
        return hi, s_hi
    for _ in range(_ITERS):
        mid = 0.5 * (lo + hi)
        s = skip_at(mid)
        if abs(s - target) < abs(best[1] - target):
            best = (mid, s)
        if s > target:
            lo = mid
        else:
            hi = mid
        if abs(s - target) < 0.003:
            break
    return best


def build(layer: Layer, skip: float, rng: np.random.Generator) -> BenchCase:
    x = realistic_input(layer, rng)
    w = he_weights(layer, rng)
    b0 = (0.01 * rng.standard_normal(layer.K)).astype(np.float32)
    g = ee.conv_geometry(layer.x_shape, layer.w_shape, strides=(layer.stride,) * 2, pads=(layer.pad,) * 4)
    dense = g.macs
    if skip <= 0:
        beta = 30.0  # every output stays positive: nothing can stop early
        model = _case(layer, w, (b0 + beta).astype(np.float32), "exact")
        return BenchCase(model=model, feeds={"X": x}, setting=f"exact, bias shift +{beta:g} (no output stops)")
    beta, reached = _search(layer, x, w, b0, dense, skip, "exact")
    if reached >= skip - 0.02:
        model = _case(layer, w, (b0 + beta).astype(np.float32), "exact")
        return BenchCase(model=model, feeds={"X": x}, setting=f"exact, bias shift {beta:+.3g}")
    T = np.count_nonzero(w.reshape(layer.K, -1), axis=1)
    n_terms = np.floor(0.95 * (1.0 - skip) * T).astype(np.int64)
    threshold = np.zeros(layer.K, np.float32)
    pred = {"n_terms": n_terms, "threshold": threshold}
    beta_p, _ = _search(layer, x, w, b0, dense, skip, "predictive", **pred)
    model = _case(layer, w, (b0 + beta_p).astype(np.float32), "predictive", **pred)
    return BenchCase(model=model, feeds={"X": x},
                     setting=(f"predictive (exact reaches {reached:.0%} at most): n_terms=0.95(1-s)T, "
                              f"threshold 0, bias shift {beta_p:+.3g}"))


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
