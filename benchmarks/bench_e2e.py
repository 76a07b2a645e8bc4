"""The whole model, as deployed: onnxzero's model vs the original, in one process (issue 10 item 1).

    python benchmarks/bench_e2e.py                                   # every row (long: light models at 224)
    python benchmarks/bench_e2e.py --rows zoo --models lenet5 --eps 3 --runs 50 --batches 1   # a quick run

Both models run in onnxruntime with its default graph optimizations (ORT_ENABLE_ALL), 2 intra-op
threads, spinning off for both, interleaved A, B, A, B ... (search/latency.OrtMeasurer: the ratio
is the median of per-pair ratios), at batch 1 and 8, >= --runs runs each.

Rows:
- zoo models through `optimize` (default objective latency) at each --eps: the written model against
  the original. When optimize writes nothing (the original is the fastest), the deployed model IS the
  original (ratio 1 by construction) and the row also gives the best rewrite it found, measured the same way.
- the onnx wheel's light VGG19 and ResNet50 at 224x224 with He-normal weights (tests/conftest.py's
  he_normal_light_model), at fixed settings: every site lazy at ratio 0.5 (calibrated on random-ish
  inputs), and every site spatial with the 2x2 layer mask [[1, 0], [0, 0]]. The original is the
  normalized float model (BatchNorm folded, weights constant), so onnxruntime can fuse and pre-pack
  it as it would a deployed model.

Writes --json (every figure) and --md (a table with date and machine, for docs/results.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxzero import zoo
from onnxzero.data import load_dataset
from onnxzero.errors import UserError
from onnxzero.load import load_model
from onnxzero.passes.chain_layout import apply_chains
from onnxzero.passes.normalize import normalize
from onnxzero.passes.rewrite import rewrite
from onnxzero.search import SearchOptions, optimize
from onnxzero.search.greedy import dense_model_macs
from onnxzero.search.latency import OrtMeasurer, batch_sample

ZOO = ("resnet18-mnist", "resnet-mnist", "alexnet-mnist", "lenet5")
LIGHT = ("vgg19", "resnet50")
SPATIAL_MASK = [[1, 0], [0, 0]]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, onnxruntime {ort.__version__}, Python {platform.python_version()}"


def ratios(measurer: OrtMeasurer, model, original, inputs, batches, runs) -> dict[str, dict[str, float]]:
    out = {}
    for b in batches:
        lat, base = measurer.compare(model, original, batch_sample(inputs, b), runs=runs)
        out[str(b)] = {"ratio": lat / base, "ms": lat, "original_ms": base}
    return out


def zoo_rows(models, eps_list, batches, runs, measurer) -> list[dict]:
    rows = []
    for name in models:
        try:
            zoo.path(name)
        except UserError:
            print(f"{name}: not in this zoo, skipped", flush=True)
            continue
        model = load_model(f"zoo:{name}")
        ds = load_dataset(zoo.default_data(f"zoo:{name}"))
        original = normalize(model)[0]
        for eps in eps_list:
            t0 = time.time()
            r = optimize(model, ds.inputs, ds.labels, SearchOptions(eps=eps))
            secs = time.time() - t0
            rep = r.report
            written = rep["decision"]["written"]
            row = {"model": name, "setting": f"optimize --eps {eps:g}", "written": written, "search_s": secs,
                   "met_eps": rep["met_eps"], "decision": rep["decision"]["reason"],
                   "mac_reduction": rep.get("mac_reduction") if r.model is not None else 0.0,
                   "validation_loss": rep.get("validation_loss"), "sites_rewritten": sum(1 for s in rep["sites"] if s["technique"]),
                   "search_best_ratio": rep["decision"]["final_ratio"], "note": rep.get("note")}
            # the deployed model: what optimize wrote, else the original itself
            row["deployed"] = ratios(measurer, r.model, original, ds.inputs, batches, runs) if written else \
                {str(b): {"ratio": 1.0} for b in batches}
            if not written and r.model is not None:  # the best rewrite found, that optimize did not write
                row["best_found"] = ratios(measurer, r.model, original, ds.inputs, batches, runs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def light_rows(names, batches, runs, measurer, *, settings=("lazy", "spatial"), chains=False) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import he_normal_light_model  # the tests' He-normal light models, one definition

    rows = []
    rng = np.random.default_rng(0)
    for name in names:
        original = dynamic_batch(normalize(he_normal_light_model(name))[0])
        # random-ish: smooth positive images (low-frequency noise), not white noise
        x = rng.random((8, 3, 28, 28), dtype=np.float32)
        x = np.repeat(np.repeat(x, 8, axis=2), 8, axis=3)
        x = (x - 0.45) / 0.25
        base_macs = dense_model_macs(original)
        for setting, cfg in (("every site lazy 0.5", {"technique": "lazy", "default": {"ratio": 0.5}}),
                             ("every site spatial, 2x2 layer mask", {"technique": "spatial",
                                                                     "default": {"patch": 2, "mask": SPATIAL_MASK}})):
            if cfg["technique"] not in settings:
                continue
            labels = np.argmax(ort_logits(original, x), axis=1)
            model, rep = rewrite(original, config=cfg, inputs=x, labels=labels, normalized=True, runtime_settings=False)
            variants = [(setting, model, None)]
            if chains:  # the same rewrite with passes/chain_layout.apply_chains
                chained, crep = apply_chains(model)
                variants.append((setting + " + chains", chained, crep))
            for label, m, crep in variants:
                row = {"model": f"light {name} 224", "setting": label, "written": True, "fixed": True,
                       "sites_rewritten": len([s for s in rep.sites if s.technique]), "dense_macs": base_macs}
                if crep is not None:
                    row["chains"] = {"converted": len(crep["converted"]), "blocked": len(crep["blocked"])}
                row["deployed"] = ratios(measurer, m, original, x, batches, runs)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def dynamic_batch(model):
    """The wheel's light models fix batch 1; batch 8 needs the batch dimension symbolic."""
    init = {t.name for t in model.graph.initializer}
    for v in [*[i for i in model.graph.input if i.name not in init], *model.graph.output]:
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    del model.graph.value_info[:]
    for n in model.graph.node:  # a flatten written as Reshape(x, [1, -1]) keeps the batch
        if n.op_type == "Reshape" and n.input[1] in init:
            t = next(t for t in model.graph.initializer if t.name == n.input[1])
            shape = onnx.numpy_helper.to_array(t)
            if shape.size and shape[0] == 1:
                t.CopyFrom(onnx.numpy_helper.from_array(np.concatenate([[-1], shape[1:]]).astype(np.int64) if -1 not in shape[1:]
                                                        else np.concatenate([[0], shape[1:]]).astype(np.int64), t.name))
    return model


def ort_logits(model, x):
    from onnxzero.evaluate import Evaluator

    return Evaluator(model, batch_size=4).run(x).logits


def markdown(rows, batches, runs) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"End to end, onnxzero vs original (onnxruntime ORT_ENABLE_ALL, 2 intra-op threads, spinning off, "
             f"interleaved, median of per-pair ratios, >= {runs} runs each), {now}, {machine()}. "
             "optimize decides at batch 1 (its default --batch). Where it keeps the original, 'sites' and 'MACs' "
             "describe the best rewrite it found, timed in the last column (batch 1 / batch 8).", "",
             "| model | setting | written | sites | MACs | held-out loss (pts) | "
             + " | ".join(f"x batch {b}" for b in batches) + " | best rewrite found (not written) | search (s) |",
             "|---|---|---|---|---|---|" + "---|" * len(batches) + "---|---|"]
    for r in rows:
        best = r.get("best_found")
        sb = r.get("search_best_ratio")
        bf = (" / ".join(f"x{best[str(b)]['ratio']:.2f}" for b in batches) if best else
              f"x{sb:.2f} (batch 1, the search's figure)" if sb and not r["written"] else "-")
        search = f"{r['search_s']:.0f}" if "search_s" in r else "-"
        mr = r.get("mac_reduction")
        vl = r.get("validation_loss")
        lines.append(f"| {r['model']} | {r['setting']} | {'fixed rewrite' if r.get('fixed') else 'yes' if r['written'] else 'no (original kept)'} | "
                     f"{r.get('sites_rewritten', '-')} | {f'-{mr * 100:.0f} %' if mr else '-'} | "
                     f"{f'{vl:.2f}' if vl is not None and r['written'] else '-'} | "
                     + " | ".join(f"x{r['deployed'][str(b)]['ratio']:.2f}" for b in batches)
                     + f" | {bf} | {search} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="zoo,light", help="zoo, light or both")
    ap.add_argument("--models", default=",".join(ZOO), help="zoo models (absent ones are skipped)")
    ap.add_argument("--light", default=",".join(LIGHT), help="light models")
    ap.add_argument("--eps", default="0,3,5")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=200, help="interleaved runs per model and batch (>= 200 for the record)")
    ap.add_argument("--settings", default="lazy,spatial", help="light rows: lazy, spatial or both")
    ap.add_argument("--chains", action="store_true", help="light rows: each rewrite also with apply_chains")
    ap.add_argument("--json", default="bench_e2e.json")
    ap.add_argument("--md", default="bench_e2e.md")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    measurer = OrtMeasurer(threads=2)
    rows = []
    if "zoo" in a.rows:
        rows += zoo_rows([m for m in a.models.split(",") if m], [float(e) for e in a.eps.split(",")], batches, a.runs, measurer)
    if "light" in a.rows:
        rows += light_rows([m for m in a.light.split(",") if m], batches, a.runs, measurer,
                           settings=tuple(a.settings.split(",")), chains=a.chains)
    Path(a.json).write_text(json.dumps({"machine": machine(), "runs": a.runs, "batches": batches, "rows": rows}, indent=2))
    md = markdown(rows, batches, a.runs)
    Path(a.md).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
