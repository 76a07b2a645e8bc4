"""The optimizer on the zoo models, laid out like the spatial-prediction paper's Table 1.

    python benchmarks/bench_zoo.py [--models lenet5,alexnet-mnist,resnet-mnist] [--json zoo.json]

Per model: MAC reduction found by the search at eps = 0, 3, 5 for each technique alone and for all
four combined (objective = MACs, so the figures do not depend on machine noise); exact early
exit's MAC savings with accuracy unchanged; the lazy-filter accuracy vs latency curve (the lazy
paper's Fig. 3) from one session fed different ratios; sparse-quant's %W_Z and CR per layer (the
pruning paper's Table II); and, for the combined search with objective = latency at eps = 3, the
end-to-end latency ratio optimized / original measured in one run, or optimize's note when the
original was the fastest (see bench_e2e.py for the deployed-model table).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from onnxzero import zoo
from onnxzero.data import load_dataset
from onnxzero.evaluate import Evaluator, median_latency_ms, top1
from onnxzero.load import load_model
from onnxzero.passes.normalize import normalize
from onnxzero.passes.rewrite import rewrite
from onnxzero.passes.rules import TECHNIQUES
from onnxzero.search import SearchOptions, optimize


def table1(model, ds, eps_list):
    rows = {}
    for tech in (*TECHNIQUES, "combined"):
        techs = TECHNIQUES if tech == "combined" else (tech,)
        rows[tech] = {}
        for eps in eps_list:
            r = optimize(model, ds.inputs, ds.labels, SearchOptions(eps=eps, techniques=techs, objective="macs"))
            rep = r.report
            rows[tech][eps] = {"mac_reduction": rep.get("mac_reduction", 0.0) if rep["optimized"] else 0.0,
                               "validation_loss": rep.get("validation_loss"), "met_eps": rep["met_eps"],
                               "seconds": rep["search"]["seconds"]}
            print(f"  {tech:13s} eps={eps:<3g} MACs -{rows[tech][eps]['mac_reduction'] * 100:5.1f}%  "
                  f"val loss {rows[tech][eps]['validation_loss']}  ({rep['search']['seconds']:.0f} s)", flush=True)
    return rows


def exact_early_exit(model, ds):
    out, rep = rewrite(model, technique="early-exit")
    base = Evaluator(normalize(model)[0]).run(ds.inputs)
    r = Evaluator(out).run(ds.inputs)
    dense = sum(s.site.macs for s in rep.rewritten)
    return {"sites": len(rep.rewritten), "site_macs_dense": dense, "site_macs_done": r.macs,
            "saved": 1 - r.macs / dense if dense else 0.0,
            "accuracy_before": top1(base.logits, ds.labels), "accuracy_after": top1(r.logits, ds.labels),
            "max_abs_diff": float(np.abs(r.logits - base.logits).max())}


def lazy_curve(model, ds, ratios=(1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3)):
    out, rep = rewrite(model, technique="lazy", config={"default": {"ratio": 1.0}}, inputs=ds.inputs[:500],
                       labels=ds.labels[:500])
    ev = Evaluator(out)
    base_sess = Evaluator(normalize(model)[0]).session
    ratio_inputs = [s.settings["ratio"] for s in rep.rewritten]
    x1 = ds.inputs[:1]
    rows = []
    for r in ratios:
        feeds = {n: np.asarray(r, np.float32) for n in ratio_inputs}
        res = ev.run(ds.inputs[500:], feeds=feeds)
        lat = ev.latency_ms(x1, runs=50, feeds=feeds)
        ref = median_latency_ms(base_sess, {ev.input_name: x1}, runs=50)
        rows.append({"ratio": r, "accuracy": top1(res.logits, ds.labels[500:]), "macs": res.macs,
                     "latency_ms": lat, "ort_latency_ms": ref, "latency_ratio": lat / ref})
        print(f"  lazy ratio {r:.2f}: top-1 {rows[-1]['accuracy'] * 100:.1f}%  latency x{lat / ref:.2f}", flush=True)
    return {"hit_rates": {s.site.name: s.stats.get("top_n_hit_rate") for s in rep.rewritten}, "curve": rows}


def sparse_table(model, ds):
    out, rep = rewrite(model, technique="sparse-quant", inputs=ds.inputs[:500], labels=ds.labels[:500])
    rows = [{"layer": s.site.name, "%W_Z": s.stats["%W_Z"], "CR": s.stats["CR"], "weights": s.stats["weights"]}
            for s in rep.rewritten]
    kept = sum(r["%W_Z"] * r["weights"] for r in rows) / max(1, sum(r["weights"] for r in rows))
    acc = top1(Evaluator(out).run(ds.inputs[500:]).logits, ds.labels[500:])
    return {"layers": rows, "model": {"%W_Z": kept, "CR": 100 / (kept * 16 / 32) if kept else None, "accuracy": acc}}


def end_to_end(model, ds, eps):
    r = optimize(model, ds.inputs, ds.labels, SearchOptions(eps=eps, objective="latency"))
    rep = r.report
    return {k: rep.get(k) for k in ("baseline", "optimized", "latency_ratio", "mac_reduction", "validation_loss", "met_eps",
                                    "decision", "note", "search")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="lenet5,alexnet-mnist,resnet-mnist")
    ap.add_argument("--eps", default="0,3,5")
    ap.add_argument("--json")
    a = ap.parse_args()
    ds = load_dataset(zoo.path("mnist"))
    eps_list = [float(e) for e in a.eps.split(",")]
    results = {"date": time.strftime("%Y-%m-%d"), "models": {}}
    for name in a.models.split(","):
        print(f"== {name}", flush=True)
        m = load_model(f"zoo:{name}")
        res = {"exact_early_exit": exact_early_exit(m, ds)}
        print(f"  exact early exit: {res['exact_early_exit']['saved'] * 100:.1f}% of site MACs skipped, "
              f"accuracy {res['exact_early_exit']['accuracy_before']:.3f} -> {res['exact_early_exit']['accuracy_after']:.3f}")
        res["sparse_quant"] = sparse_table(m, ds)
        print(f"  sparse-quant: model %W_Z {res['sparse_quant']['model']['%W_Z']:.1f}, CR {res['sparse_quant']['model']['CR']:.2f}")
        res["lazy"] = lazy_curve(m, ds)
        res["table1"] = table1(m, ds, eps_list)
        res["end_to_end_eps3"] = end_to_end(m, ds, 3.0)
        e = res["end_to_end_eps3"]
        if e["decision"]["written"]:
            print(f"  end to end (eps 3, objective latency): MACs -{e['mac_reduction'] * 100:.1f}%, latency x{e['latency_ratio']:.2f}")
        else:
            print(f"  end to end (eps 3, objective latency): {e['note']}")
        results["models"][name] = res
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
