"""Bench case for SpatialConv (`onnxzero bench ops`).

How a skip target is reached: a sparse layer-wide mask (one computed position per patch, at the
patch's top-left corner, which every margin patch also has) and a per-channel bias chosen from the
layer's own pre-activations, so that a fraction `dead` of the (channel, patch) pairs has its masked
output <= 0 and is predicted zero. The MACs skipped are then dead x (p*p - 1)/(p*p) of a patch's:

    skip 0      all-ones mask (no prediction: the exact Conv+ReLU path)
    otherwise   the smallest p in 2..4 whose 1-of-p*p mask can save 0.9x more than asked, and
                dead = skip / (1 - patches/positions), e.g. p = 2 and dead = 2/3 for 50% on 56x56.

The framework measures the skip actually reached from the op's `macs` output.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxzero.bench.common import BenchCase, Layer, he_weights, realistic_input
from onnxzero.ops import single_op_model
from onnxzero.ops import spatial as sp

OP = sp.OP


def _preact(layer: Layer, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Conv pre-activations without bias (onnxruntime's Conv: fast, and what the kernel computes)."""
    from onnxzero.ops import make_session

    attrs = layer.conv_attrs()
    node = helper.make_node("Conv", ["X", "W"], ["Y"], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (y,) = make_session(model, library=False).run(None, {"X": x})
    return y


def plan(skip: float, out_hw: tuple[int, int] = (56, 56)) -> tuple[int, float]:
    """(patch size, fraction of (channel, patch) pairs to predict dead) for a skip target.

    With one masked position per patch, a dead (channel, patch) saves the rest of its patch, so the
    largest skip at patch size p is 1 - patches/positions (margin patches hold fewer positions).
    """
    if skip <= 0:
        return 2, 0.0
    OH, OW = out_hw
    for p in (2, 3, 4):
        frac = 1.0 - (-(-OH // p)) * (-(-OW // p)) / (OH * OW)
        if skip <= 0.9 * frac or p == 4:
            return p, min(1.0, skip / frac)
    raise AssertionError


def _dead_bias(z: np.ndarray, p: int, skip: float) -> np.ndarray:
    """Per-channel bias that predicts dead the patches saving about `skip` of all outputs.

    z: (K, OH, OW) pre-activations without bias; the mask computes each patch's top-left pixel, so a
    dead patch saves its other in-range pixels. Channels pick how many of their lowest-scoring patches
    die, with the rounding error carried from channel to channel (few patches per channel on small
    outputs), and the threshold sits halfway between the last dead and the first alive patch, far
    from any output, so float32 rounding in the kernel cannot flip a decision.
    """
    K, OH, OW = z.shape
    first = z[:, ::p, ::p].reshape(K, -1).astype(np.float64)          # (K, patches)
    rows = np.minimum(p, OH - np.arange(0, OH, p))[:, None]
    cols = np.minimum(p, OW - np.arange(0, OW, p))[None, :]
    saved = (rows * cols - 1).reshape(-1)                               # pixels a dead patch saves
    target = skip * OH * OW                                             # per channel, in pixels
    bias = np.empty(K, np.float64)
    carry = 0.0
    for k in range(K):
        order = np.argsort(first[k], kind="stable")
        cum = np.concatenate([[0], np.cumsum(saved[order])])
        d = int(np.argmin(np.abs(carry + cum - target)))
        carry += cum[d] - target
        v = first[k][order]
        scale = 1e-3 * (np.abs(v).max() + 1e-6)
        if d == 0:
            bias[k] = -v[0] + scale
        elif d == len(v):
            bias[k] = -v[-1] - scale
        else:
            bias[k] = -(v[d - 1] + v[d]) / 2
    return bias.astype(np.float32)


def build(layer: Layer, skip: float, rng: np.random.Generator, x: np.ndarray | None = None) -> BenchCase:
    """x: the input the op will see (e.g. inside a chain); default a post-ReLU-like random one."""
    x = realistic_input(layer, rng) if x is None else np.asarray(x, np.float32)
    w = he_weights(layer, rng)
    g = sp.conv_geometry(layer.x_shape, layer.w_shape, strides=(layer.stride,) * 2, pads=(layer.pad,) * 4)
    p, dead = plan(skip, (g.OH, g.OW))
    if dead <= 0:
        mask = np.ones((p, p), np.uint8)
        bias = (0.01 * rng.standard_normal(layer.K)).astype(np.float32)
        setting = f"p={p}, all-ones mask (no prediction)"
    else:
        mask = sp.uniform_layer_mask(p, [(0, 0)])
        z = _preact(layer, x, w)[0]                       # (K, OH, OW)
        bias = _dead_bias(z, p, skip)
        setting = f"p={p}, mask 1/{p * p} at (0,0), per-channel bias: ~{dead:.0%} of (channel, patch) dead"
    node, inits = sp.make_node("X", "W", "B", "Y", patch=p, mask=mask, macs_output="macs", **layer.conv_attrs())
    model = single_op_model(node, {"W": w, "B": bias, **inits}, layer.x_shape, outputs=["Y", "macs"])
    return BenchCase(model=model, feeds={"X": x}, setting=setting,
                     extra={"patch": p, "dead_fraction": dead, "mask_form": "layer"})
