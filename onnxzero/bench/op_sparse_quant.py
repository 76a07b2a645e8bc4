"""Bench case for SparseQuantConv (`onnxzero bench ops`): skip s -> prune that fraction of the weights.

He-normal weights are pruned by magnitude at the s quantile of |w| (s = 0: threshold 0, nothing
pruned), quantized to 8-bit dynamic fixed point and stored in the relative-index format. The skip
measured from `macs` is 1 - nonzeros / weights: s, plus the few weights that quantize to 0. The
reference is onnxruntime's Conv+Relu on the dequantized weights (same shapes, same outputs).
"""

from __future__ import annotations

import numpy as np

from onnxzero.bench.common import BenchCase, Layer, he_weights, realistic_input
from onnxzero.ops import single_op_model
from onnxzero.ops import sparse_quant as sq
from onnxzero.ops.conv_relu import onnx_conv_relu_model

OP = sq.OP


def build(layer: Layer, skip: float, rng: np.random.Generator) -> BenchCase:
    x = realistic_input(layer, rng)
    w = he_weights(layer, rng)
    b = (0.01 * rng.standard_normal(layer.K)).astype(np.float32)
    threshold = float(np.quantile(np.abs(w), skip)) if skip > 0 else 0.0
    c = sq.compress(w, threshold=threshold)
    attrs = layer.conv_attrs()
    node, inits = sq.make_node("X", "W", "B", "Y", compressed=c, macs_output="macs", **attrs)
    model = single_op_model(node, {**inits, "B": b}, layer.x_shape, outputs=["Y", "macs"])
    stats = sq.compression_stats(w, c)
    ref = onnx_conv_relu_model(sq.decompress(c), b, layer.x_shape, **attrs)
    setting = (f"|w| < {threshold:.3g} pruned, fl={c['frac_bits']}, %W_Z={stats['%W_Z']:.1f} "
               f"(fillers {stats['fillers']}), CR={stats['CR']:.2f}")
    return BenchCase(model=model, feeds={"X": x}, setting=setting,
                     extra={"reference_model": ref, "compression": stats})
