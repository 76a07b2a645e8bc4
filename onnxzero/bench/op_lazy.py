"""Bench case for LazyConv (`onnxzero bench ops`): skip s -> ratio = 1 - s of the filters computed.

The ratio is fed as the op's run-time scalar input (as a deployment would turn it); the predictor
is random (which filters win does not change the time). The skip measured from `macs` is
1 - ceil(ratio * K) / K, e.g. 89% for 90% on K = 64.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from onnxzero.bench.common import BenchCase, Layer, he_weights, realistic_input
from onnxzero.ops import lazy
from onnxzero.ops import single_op_model

OP = lazy.OP


def build(layer: Layer, skip: float, rng: np.random.Generator) -> BenchCase:
    ratio = float(np.clip(1.0 - skip, 1e-6, 1.0))
    x = realistic_input(layer, rng)
    w = he_weights(layer, rng)
    b = (0.01 * rng.standard_normal(layer.K)).astype(np.float32)
    pw = (rng.standard_normal((layer.C, layer.K)) * 0.1).astype(np.float32)
    pb = rng.standard_normal(layer.K).astype(np.float32)
    node, inits = lazy.make_node("X", "W", "B", "Y", pred_w=pw, pred_b=pb, ratio_input="ratio",
                                 macs_output="macs", **layer.conv_attrs())
    model = single_op_model(node, {"W": w, "B": b, **inits}, layer.x_shape,
                            runtime_inputs={"ratio": (TensorProto.FLOAT, [])}, outputs=["Y", "macs"])
    n = lazy.filters_computed(ratio, layer.K)
    return BenchCase(model=model, feeds={"X": x, "ratio": np.array(ratio, np.float32)},
                     setting=f"ratio {ratio:.2f}: {n} of {layer.K} filters", extra={"ratio": ratio})
