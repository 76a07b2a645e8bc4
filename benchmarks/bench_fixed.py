"""Whole-model ratio of fixed rewrites of one zoo model against the original (no search).

    python benchmarks/bench_fixed.py --model resnet18-mnist --runs 200 --batches 1 8

Rows: every site exact early exit (lossless), every site lazy at 0.5 (calibrated on the held-out digits'
first 256), every site spatial with the 2x2 diagonal layer mask. Each row: held-out top-1, MACs per digit
(the ops' own counters), and optimized / original latency measured by the search's own OrtMeasurer
(onnxruntime default optimizations, 2 intra-op threads, spinning off, interleaved, median of per-pair
ratios) at each batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import numpy as np
import onnx
import onnxruntime as ort

from onnxzero.evaluate import Evaluator, top1
from onnxzero.passes.rewrite import rewrite
from onnxzero.search.latency import OrtMeasurer
from onnxzero.zoo import path as zoo_path

ROWS = {
    "early-exit exact": {"default": {"technique": "early-exit", "mode": "exact"}},
    "lazy 0.5": {"default": {"technique": "lazy", "ratio": 0.5}},
    "spatial 2x2 diagonal": {"default": {"technique": "spatial", "patch": 2}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18-mnist")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--json")
    a = ap.parse_args()
    model = onnx.load(zoo_path(a.model))
    with np.load(zoo_path("mnist")) as z:
        x, y = z["inputs"], z["labels"]
    base = Evaluator(model).run(x)
    out = {"model": a.model, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
           "machine": f"{platform.processor() or platform.machine()}, onnxruntime {ort.__version__}",
           "original": {"top1": top1(base.logits, y)}, "rows": {}}
    print(f"{a.model}: original top-1 {out['original']['top1']:.3f}")
    measurer = OrtMeasurer()
    for name in a.rows:
        m, rep = rewrite(model, config=ROWS[name], inputs=x[:256], labels=y[:256], runtime_settings=False)
        r = Evaluator(m).run(x)
        row = {"sites": len(rep.rewritten), "top1": top1(r.logits, y), "macs_per_digit": r.macs,
               "site_macs_dense": sum(s.site.macs for s in rep.rewritten)}
        for b in a.batches:
            ms, base_ms = measurer.compare(m, model, x[:b], runs=a.runs)
            row[f"ratio_b{b}"], row[f"original_ms_b{b}"] = ms / base_ms, base_ms
        out["rows"][name] = row
        print(name, json.dumps(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
