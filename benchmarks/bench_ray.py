"""First-level candidates per second on a local Ray with 1 and 2 workers, in the same run.

    python benchmarks/bench_ray.py --model resnet-mnist --samples 500 --repeats 3

One Ray instance (num_cpus = --cpus); the candidate list is the search's own (every site, the given
techniques). Each round measures the whole list with a 1-worker pool, then a 2-worker pool, then again
(alternating, so load drift on a shared machine hits both alike); a pool's start (actors, each worker's
Engine and first sessions) is timed separately from the steady rate. The in-process Engine (no Ray,
one intra-op thread) is timed the same way as the baseline a worker should match. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

from onnxzero import zoo
from onnxzero.data import load_dataset
from onnxzero.load import load_model
from onnxzero.passes.normalize import normalize
from onnxzero.passes.sites import find_sites
from onnxzero.search import SearchOptions
from onnxzero.search.cluster import Cluster
from onnxzero.search.engine import Engine
from onnxzero.search.greedy import _candidates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet-mnist")
    ap.add_argument("--samples", type=int, default=500, help="calibration samples each candidate runs")
    ap.add_argument("--techniques", default="lazy,sparse-quant,early-exit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()

    import ray

    ds = load_dataset(zoo.path("mnist"))
    base, _ = normalize(load_model(f"zoo:{a.model}"))
    sites = [s for s in find_sites(base) if s.macs]
    x, y = ds.inputs[:a.samples], ds.labels[:a.samples]
    techniques = tuple(a.techniques.split(","))

    t = time.perf_counter()
    engine = Engine(base, sites, x, y, threads=1)
    cands = _candidates(engine, sites, SearchOptions(eps=3, techniques=techniques))
    warm = [next(c for c in cands if c.technique == tq) for tq in techniques]
    for c in warm:  # the sessions every technique builds once
        engine.measure(c)
    local_start = time.perf_counter() - t

    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows: dict[str, dict[str, list[float]]] = {k: {"start_s": [], "candidates_per_s": []} for k in ("1 worker", "2 workers")}
    rows["in-process Engine"] = {"start_s": [local_start], "candidates_per_s": []}
    for _ in range(a.repeats):
        t = time.perf_counter()
        for c in cands:
            engine.measure(c)
        rows["in-process Engine"]["candidates_per_s"].append(len(cands) / (time.perf_counter() - t))
        for w, name in ((1, "1 worker"), (2, "2 workers")):
            t = time.perf_counter()
            pool = Cluster(workers=w).pool(base, sites, x, y)
            # each worker builds its Engine and every technique's sessions before the clock starts
            ray.get([getattr(actor, "measure").remote(pool.data, c) for actor in pool.actors for c in warm])
            rows[name]["start_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            n = sum(1 for _ in pool.measure(cands))
            rows[name]["candidates_per_s"].append(n / (time.perf_counter() - t))
            pool.close()
    ray.shutdown()

    med = {k: {f: float(np.median(v)) for f, v in r.items()} for k, r in rows.items()}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "model": a.model, "sites": len(sites), "samples": a.samples, "techniques": list(techniques),
        "candidates": len(cands), "repeats": a.repeats, "runs": rows, "median": med,
        "speedup_2_vs_1": med["2 workers"]["candidates_per_s"] / med["1 worker"]["candidates_per_s"],
        "ray_1_vs_in_process": med["1 worker"]["candidates_per_s"] / med["in-process Engine"]["candidates_per_s"],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
