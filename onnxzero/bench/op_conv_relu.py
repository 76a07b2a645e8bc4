"""Bench case for ConvRelu (`onnxzero bench ops`): the dense no-skip baseline, skip 0 only."""

from __future__ import annotations

import numpy as np

from onnxzero.bench.common import BenchCase, Layer, he_weights, realistic_input
from onnxzero.ops import conv_relu as cr
from onnxzero.ops import single_op_model

OP = cr.OP
SKIPS = [0.0]  # ConvRelu never skips


def build(layer: Layer, skip: float, rng: np.random.Generator) -> BenchCase:
    if skip > 0:
        raise ValueError("ConvRelu is dense: only skip 0")
    x = realistic_input(layer, rng)
    w = he_weights(layer, rng)
    b = (0.01 * rng.standard_normal(layer.K)).astype(np.float32)
    node, extra = cr.make_node("X", "W", "B", "Y", macs_output="macs", **layer.conv_attrs())
    model = single_op_model(node, {"W": w, "B": b, **extra}, layer.x_shape, outputs=["Y", "macs"])
    return BenchCase(model=model, feeds={"X": x}, setting="dense")
