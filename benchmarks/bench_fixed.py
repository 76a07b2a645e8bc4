"""Whole-model ratio of fixed rewrites of one zoo model against the original (no search).

    python benchmarks/bench_fixed.py --model resnet18-mnist --runs 200 --batches 1 8
    python benchmarks/bench_fixed.py --rows "lazy 0.5" conv-relu --chains   # with / without apply_chains

Rows: every site exact early exit (lossless), every site lazy at 0.5 (calibrated on the held-out digits'
first 256), every site spatial with the 2x2 diagonal layer mask. Each row: held-out top-1, MACs per digit
(the ops' own counters), and optimized / original latency measured by the search's own OrtMeasurer
(onnxruntime default optimizations, 2 intra-op threads, spinning off, interleaved, median of per-pair
ratios) at each batch.

Row conv-relu: every site a dense ConvRelu (passes/chain_layout.conv_relu_sites). --chains: each row
also with passes/chain_layout.apply_chains (the Convs next to onnxzero ops become ConvRelu, blocked
tensors inside chains); then the original, the row and the row with chains run round robin in one
loop (the order rotating each round), and each ratio is the median of per-round ratios to the original.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import numpy as np
import onnx
import onnxruntime as ort

from onnxzero.evaluate import Evaluator, fit_batch, session, top1
from onnxzero.passes.chain_layout import apply_chains, conv_relu_sites
from onnxzero.passes.rewrite import rewrite
from onnxzero.search.latency import OrtMeasurer, batch_sample, input_name
from onnxzero.zoo import path as zoo_path

ROWS = {
    "early-exit exact": {"default": {"technique": "early-exit", "mode": "exact"}},
    "lazy 0.5": {"default": {"technique": "lazy", "ratio": 0.5}},
    "spatial 2x2 diagonal": {"default": {"technique": "spatial", "patch": 2}},
    "conv-relu": None,  # conv_relu_sites
}


def round_robin(models: list[onnx.ModelProto], sample: np.ndarray, runs: int, threads: int = 2) -> list[float]:
    """Median per-round ratio of each model to models[0] (run in the same round; order rotates)."""
    sess = [session(m, threads=threads, library=i > 0) for i, m in enumerate(models)]
    feeds = [fit_batch({input_name(m): sample}, s) for m, s in zip(models, sess)]
    for s, f in zip(sess, feeds):
        for _ in range(3):
            s.run(None, f)
    t = np.zeros((runs, len(models)))
    for r in range(runs):
        for j in range(len(models)):
            i = (r + j) % len(models)
            t0 = time.perf_counter()
            sess[i].run(None, feeds[i])
            t[r, i] = time.perf_counter() - t0
    return [float(np.median(t[:, i] / t[:, 0])) for i in range(len(models))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18-mnist")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--chains", action="store_true", help="also each row with apply_chains, timed round robin")
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
        if ROWS[name] is None:
            m = conv_relu_sites(model)
            r = Evaluator(m).run(x)
            row = {"sites": sum(n.op_type == "ConvRelu" for n in m.graph.node)}
        else:
            m, rep = rewrite(model, config=ROWS[name], inputs=x[:256], labels=y[:256], runtime_settings=False)
            r = Evaluator(m).run(x)
            row = {"sites": len(rep.rewritten), "site_macs_dense": sum(s.site.macs for s in rep.rewritten)}
        row.update({"top1": top1(r.logits, y), "macs_per_digit": r.macs})
        if a.chains:
            mc, crep = apply_chains(m)
            row["chains"] = {"converted": len(crep["converted"]), "blocked": len(crep["blocked"]),
                             "edges": len(crep["edges"])}
            for b in a.batches:
                _, plain, chained = round_robin([model, m, mc], batch_sample(x, b), a.runs)
                row[f"ratio_b{b}"], row[f"ratio_chains_b{b}"] = plain, chained
        else:
            for b in a.batches:
                ms, base_ms = measurer.compare(m, model, x[:b], runs=a.runs)
                row[f"ratio_b{b}"], row[f"original_ms_b{b}"] = ms / base_ms, base_ms
        out["rows"][name] = row
        print(name, json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
