"""EarlyExitConv (both exact paths and the cost model's choice) and SparseQuantConv (0 / 50 / 90 % pruned,
both paths) vs onnxruntime's Conv+Relu on the bench layers, as CPU time of one intra-op thread.

    python benchmarks/early_exit_cpu.py [--reps 7]

On a shared machine wall time swings with the other processes; the CPU time a run takes on one
thread does much less. Per cell: median over --reps of (op CPU time / onnxruntime CPU time), the two
measured alternately, each over enough runs to last ~50 ms.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onnxzero.bench.common import LAYERS, he_weights, realistic_input
from onnxzero.ops import early_exit as ee
from onnxzero.ops import make_session, single_op_model
from onnxzero.ops import sparse_quant as sq
from onnxzero.ops.conv_relu import onnx_conv_relu_model


def cpu_ms(sess, feeds, n):
    t = time.process_time()
    for _ in range(n):
        sess.run(None, feeds)
    return (time.process_time() - t) / n * 1e3


def ratio(a, b, feeds, reps):
    a.run(None, feeds), b.run(None, feeds)
    t0 = time.perf_counter()
    b.run(None, feeds)
    n = max(2, int(0.05 / max(1e-5, time.perf_counter() - t0)))
    rs = []
    for _ in range(reps):
        rs.append(cpu_ms(a, feeds, n) / cpu_ms(b, feeds, n))
    return float(np.median(rs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'layer':22} {'EE auto':>14} {'EE sparse':>14} {'EE dense':>9} {'SQ 0%':>7} {'SQ 50% d/s':>12} {'SQ 90%':>7}")
    for layer in LAYERS:
        x = realistic_input(layer, rng)
        w = he_weights(layer, rng)
        b = (0.01 * rng.standard_normal(layer.K)).astype(np.float32)
        attrs = layer.conv_attrs()
        feeds = {"X": x}
        ref = make_session(onnx_conv_relu_model(w, b, layer.x_shape, **attrs), threads=1, library=False)
        cells = []
        dense = x.shape[0] * w.size * int(np.prod(ref.run(None, feeds)[0].shape[2:]))
        for sz in (None, 1, 0):
            node, _ = ee.make_node("X", "W", "B", "Y", macs_output="macs", skip_zeros=sz, **attrs)
            s = make_session(single_op_model(node, {"W": w, "B": b}, layer.x_shape, outputs=["Y", "macs"]), threads=1)
            macs = int(s.run(["macs"], feeds)[0])
            r = ratio(s, ref, feeds, args.reps)
            cells.append(f"{r:.2f} ({1 - macs / dense:.0%})" if sz != 0 else f"{r:.2f}")
        for prune, paths in ((0.0, (None,)), (0.5, (0, 1)), (0.9, (None,))):
            c = sq.compress(w, threshold=float(np.quantile(np.abs(w), prune)) if prune else 0.0)
            rs = []
            for sp in paths:
                node, inits = sq.make_node("X", "W", "B", "Y", compressed=c, sparse_path=sp, **attrs)
                s = make_session(single_op_model(node, {**inits, "B": b}, layer.x_shape), threads=1)
                rq = make_session(onnx_conv_relu_model(sq.decompress(c), b, layer.x_shape, **attrs), threads=1,
                                  library=False)
                rs.append(f"{ratio(s, rq, feeds, args.reps):.2f}")
            cells.append("/".join(rs))
        print(f"{layer.name:22} {cells[0]:>14} {cells[1]:>14} {cells[2]:>9} {cells[3]:>7} {cells[4]:>12} {cells[5]:>7}",
              flush=True)


if __name__ == "__main__":
    main()
