"""resnet18-mnist with every site SpatialConv (2x2 diagonal layer mask) against the original, whole model.

    python benchmarks/bench_spatial_whole.py --runs 200 --batches 1 8

Rows: the rewritten model with blocked tensors between onnxzero ops (passes.chain_layout.block_chains with
SpatialConv as a producer; chain_layout does not list SpatialConv yet, so this script adds its `other`
index), the same with all-ones masks (no prediction: the dense ceiling), and the plain NCHW rewrite.
Each row: top-1 on the first 500 held-out digits, the ops' MAC counters, and optimized / original
latency from the search's own OrtMeasurer (onnxruntime default optimizations, 2 intra-op threads,
spinning off, interleaved, median of per-pair ratios). OZ_SPATIAL=legacy runs the NCHW row only, on the
channels-last kernels. docs/design-spatial.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import onnx
from onnx import numpy_helper

from onnxzero.evaluate import Evaluator, top1
from onnxzero.passes import chain_layout as cl
from onnxzero.passes.rewrite import rewrite
from onnxzero.search.latency import OrtMeasurer
from onnxzero.zoo import path as zoo_path

PRODUCERS = ("ConvRelu", "LazyConv", "SpatialConv")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    model = onnx.load(zoo_path("resnet18-mnist"))
    with np.load(zoo_path("mnist")) as z:
        x, y = z["inputs"], z["labels"]
    m, _ = rewrite(model, config={"default": {"technique": "spatial", "patch": 2}}, inputs=x[:256], labels=y[:256],
                   runtime_settings=False)
    cl.OTHER_INPUT.setdefault("SpatialConv", 4)
    blocked = cl.block_chains(m, producers=PRODUCERS)
    print("blocked tensors:", sum(v is None for v in cl.explain(m, producers=PRODUCERS).values()))
    ones = onnx.ModelProto()
    ones.CopyFrom(blocked)
    masks = {n.input[3] for n in ones.graph.node if n.op_type == "SpatialConv"}
    for init in ones.graph.initializer:
        if init.name in masks:
            init.CopyFrom(numpy_helper.from_array(np.ones(numpy_helper.to_array(init).shape, np.uint8), init.name))
    rows = {"spatial diag NCHW": m} if os.environ.get("OZ_SPATIAL") == "legacy" else {
        "spatial diag blocked": blocked, "spatial all-ones blocked": ones, "spatial diag NCHW": m}
    measurer = OrtMeasurer()
    for name, mm in rows.items():
        r = Evaluator(mm).run(x[:500])
        out = {"top1": round(top1(r.logits, y[:500]), 3), "macs": r.macs}
        for b in a.batches:
            ms, base = measurer.compare(mm, model, x[:b], runs=a.runs)
            out[f"ratio_b{b}"], out[f"original_ms_b{b}"] = round(ms / base, 3), round(base, 2)
        print(name, json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
