"""First-level candidates per second on a local Ray with 1 and 2 workers, in the same run.

    python benchmarks/bench_ray.py --model resnet-mnist --samples 500 --repeats 3

One Ray instance (num_cpus = --cpus); the candidate list is the search's own (every site, the given
techniques). Each round measures the whole list in-process (a fresh Engine, no Ray, one intra-op
thread: what one worker does), then with a 1-worker pool, then a 2-worker pool (alternating rounds, so
load drift on a shared machine hits all alike). Each starts fresh: its start (actors, each worker's
Engine and one candidate per technique) is timed apart; then the list is measured twice: the first pass
builds the per-site sessions and cached activations as a search does, the second runs on warm caches.
Prints a JSON report.
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

    probe = Engine(base, sites, x, y, threads=1)
    cands = _candidates(probe, sites, SearchOptions(eps=3, techniques=techniques))
    warm = [next(c for c in cands if c.technique == tq) for tq in techniques]
    del probe

    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    names = ("in-process Engine", "1 worker", "2 workers")
    rows = {k: {"start_s": [], "first_pass_per_s": [], "second_pass_per_s": []} for k in names}
    for _ in range(a.repeats):
        for name in names:
            t = time.perf_counter()
            if name == "in-process Engine":
                engine = Engine(base, sites, x, y, threads=1)
                for c in warm:
                    engine.measure(c)

                def run(cs):
                    return sum(1 for c in cs if engine.measure(c))
            else:
                pool = Cluster(workers=1 if name == "1 worker" else 2).pool(base, sites, x, y)
                # each worker builds its Engine and every technique's sessions before the clock starts
                ray.get([actor.measure.remote(pool.data, c) for actor in pool.actors for c in warm])

                def run(cs):
                    return sum(1 for _ in pool.measure(cs))
            rows[name]["start_s"].append(time.perf_counter() - t)
            for key in ("first_pass_per_s", "second_pass_per_s"):  # cold caches as in a search, then warm
                t = time.perf_counter()
                n = run(cands)
                rows[name][key].append(n / (time.perf_counter() - t))
            if name != "in-process Engine":
                pool.close()
    ray.shutdown()

    med = {k: {f: float(np.median(v)) for f, v in r.items()} for k, r in rows.items()}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "model": a.model, "sites": len(sites), "samples": a.samples, "techniques": list(techniques),
        "candidates": len(cands), "repeats": a.repeats, "runs": rows, "median": med,
        "speedup_2_vs_1": {k: med["2 workers"][k] / med["1 worker"][k] for k in ("first_pass_per_s", "second_pass_per_s")},
        "ray_1_vs_in_process": {k: med["1 worker"][k] / med["in-process Engine"][k] for k in ("first_pass_per_s", "second_pass_per_s")},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
