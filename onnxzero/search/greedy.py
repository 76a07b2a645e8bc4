"""The multi-level greedy search (spatial-prediction paper, section 5.2 and Appendix 1), generalized
from spatial masks to any technique per site, and held to one promise with objective latency: the
emitted model is faster than the original where it is deployed, or nothing is written.

0. With objective latency, each (site, technique)'s boldest setting is first timed in the whole
   model (and each technique on every site at once, for ops that pay only as a chain); pairs that
   cannot speed the model up get no accuracy runs at all (_probe).
1. First level: every remaining (site, technique, setting) candidate is measured alone (the paper's
   targets are assumed uncorrelated): accuracy loss and MACs on the calibration split, running only
   the network from the site on, fed the float model's cached activations there. With objective
   latency, a candidate within eps is then timed in the WHOLE model (only its site rewritten, as
   deployed) against the original, interleaved (search/latency.py); per site and technique the
   most aggressive setting goes first, and once a setting buys no whole-model time the gentler ones
   of that technique are not timed (they skip less). Sites whose MAC share bounds their possible
   gain below `min_share` are not timed at all.
2. Per site, the top M options within eps that buy time (latency) or MACs, best first.
3. Network level (LayerQuantizier): every site takes its best option; while the combination loses
   more than eps on the calibration split, the site whose option costs the most accuracy backs off
   to its next option (Appendix 1's iterative scheme), or to dense when none is left; where the
   overshoot is larger than that site's first-level loss, the next worst backs off in the same step.
4. Decision: the original model is a candidate; among combinations within eps the fastest wins
   (ratios within `tie` of the fastest are ties, and ties go to the smaller accuracy loss); then each
   rewritten site is reverted once if the model without it is no slower (accuracy is not spent for
   nothing). The choice must hold on the validation split the search never saw, else the search
   backs off to the next combination that does; the last word is a final interleaved check of the
   emitted model against the original (`final_runs` runs): it is emitted only if faster by `margin`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxzero.errors import UserError
from onnxzero.evaluate import Evaluator, top1
from onnxzero.passes.normalize import normalize
from onnxzero.passes.rules import TECHNIQUES
from onnxzero.passes.sites import find_sites
from onnxzero.search import report as reporting
from onnxzero.search.candidates import search_space
from onnxzero.search.cluster import Cluster
from onnxzero.search.combine import Combined, Combiner, choose, rank, seeds  # noqa: F401 (choose: public here)
from onnxzero.search.engine import Engine, Measured
from onnxzero.search.latency import Measurer, OrtMeasurer, batch_sample
from onnxzero.search.measure import CACHE_VERSION, Cache, Measurements, cache_key, load_cache  # noqa: F401
from onnxzero.search.report import pareto  # noqa: F401 (public here)

MODES = ("uniform-layer", "uniform-filter", "uniform-patch", "max-granularity")
OBJECTIVES = ("latency", "macs")
_candidates = search_space  # the name the tests know


@dataclass
class SearchOptions:
    eps: float
    techniques: tuple[str, ...] = TECHNIQUES
    objective: str = "latency"
    mode: str = "uniform-layer"
    patch_sizes: tuple[int, ...] = (2,)
    ones_range: tuple[int, int] = (1, 3)
    granularity_threshold: float = 0.05
    top_m: int = 3
    jobs: int = 1
    val_fraction: float = 0.5
    latency_runs: int = 40      # interleaved runs per side for a search-time comparison
    final_runs: int = 300       # interleaved runs per side for the final emitted-vs-original check
    batch: int = 1              # batch of the latency measurements
    margin: float = 0.03        # the emitted model must be at least this much faster (latency objective)
    tie: float = 0.01           # latency ratios within this relative distance count as equal
    min_share: float = 0.002    # a site whose best saving bounds its gain below this share is not timed
    max_rounds: int = 64

    def validate(self) -> None:
        if not 0 <= self.eps <= 100:
            raise UserError(f"--eps is {self.eps:g}, expected a value in [0, 100] (percentage points of top-1)")
        bad = [t for t in self.techniques if t not in TECHNIQUES]
        if bad or not self.techniques:
            raise UserError(f"--techniques has {bad[0] if bad else 'nothing'!r}, expected some of {', '.join(TECHNIQUES)}")
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective is {self.objective!r}, expected latency or macs")
        if self.mode not in MODES:
            raise UserError(f"--mode is {self.mode!r}, expected one of {', '.join(MODES)}")
        if any(p not in (2, 3, 4) for p in self.patch_sizes):
            raise UserError(f"--patch-size {self.patch_sizes}, expected 2, 3 or 4")
        lo, hi = self.ones_range
        if not 1 <= lo <= hi:
            raise UserError(f"--ones-range {lo}-{hi}, expected 1 <= low <= high")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"validation fraction {self.val_fraction}, expected in (0, 1)")
        if self.top_m < 1 or self.jobs < 1:
            raise UserError("--top-m and --jobs must be >= 1")
        if self.batch < 1 or self.latency_runs < 1 or self.final_runs < 1:
            raise UserError("--batch and the latency run counts must be >= 1")
        if not 0 <= self.margin < 1:
            raise UserError(f"--margin is {self.margin * 100:g} %, expected a value in [0, 100)")


@dataclass
class OptimizeResult:
    model: onnx.ModelProto | None  # None when the original is kept (or nothing met eps) and best_effort is off
    met_eps: bool
    report: dict[str, Any]
    first_level: list[Measured] = field(default_factory=list)
    combined: list[Combined] = field(default_factory=list)


class Progress:
    """Callbacks the CLI turns into a progress bar; the library stays UI-free."""

    def start(self, total: int, what: str) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def note(self, text: str) -> None: ...


def split(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (calibration, validation) index split."""
    idx = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


# ---- the search: orchestration of the parts -----------------------------------------------------
def optimize(model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray | None, options: SearchOptions, *,
             cache_path: Path | None = None, resume: bool = False, progress: Progress | None = None,
             threads: int = 0, measurer: Measurer | None = None, cluster: Cluster | None = None) -> OptimizeResult:
    """The search: search space (candidates.py), measurer and cache (measure.py, on Ray workers with
    `cluster`: cluster.py), combiner and decision (combine.py), report (report.py)."""
    options.validate()
    progress = progress or Progress()
    t0 = time.time()
    base, _ = normalize(model)
    sites = [s for s in find_sites(base) if s.macs]
    if not sites:
        raise UserError("the model has no eligible Conv+ReLU site (see `onnxzero rewrite MODEL --explain`); nothing to optimize")
    if len(inputs) < 20:
        raise UserError(f"the data has {len(inputs)} samples, expected at least 20 to split into calibration and validation")
    float_ev = Evaluator(base, threads=threads)
    ref_all = labels if labels is not None else np.argmax(float_ev.run(inputs).logits, axis=1)
    cal, val = split(len(inputs), options.val_fraction)
    engine = Engine(base, sites, inputs[cal], ref_all[cal], threads=threads)
    if options.jobs > 1:
        engine.threads = max(1, (threads or 2) // options.jobs)
    latency = options.objective == "latency"

    cache = Cache(cache_path, cache_key(model, inputs, labels, cal, options))
    if resume:
        cache.resume(progress)
    ms = Measurements(engine, measurer or OrtMeasurer(), base, batch_sample(inputs, options.batch), options, cache,
                      progress)
    with contextlib.ExitStack() as stack:
        # 0-1. search space, latency probes (objective latency), first level
        cands = search_space(engine, sites, options)
        cand_by_key = {c.key: c for c in cands}
        base_macs = dense_model_macs(base)
        hopeless, chains = ms.probe(cands, base_macs) if latency else (set(), set())
        cands = [c for c in cands if (c.site, c.technique) not in hopeless]
        if cluster is not None:  # started after the probes: no worker competes with their timing
            ms.remote = cluster.pool(base, sites, inputs[cal], ref_all[cal])
            stack.callback(ms.remote.close)
        measured = ms.first_level(cands)
        if latency:
            ms.time_first_level(measured, cand_by_key, base_macs)

        # 2-3. per-site options, network level with back-off
        ranked = rank(measured, sites, options)
        site_dense = {s.name: int(s.macs) for s in sites}
        original = Combined({}, engine.base_accuracy, 0.0, base_macs, 1.0, 1.0)  # always a candidate
        combiner = Combiner(lambda cfg: ms.combination(cfg, base_macs, site_dense), original, options, cache.combined,
                            progress)
        many = (lambda cfgs: ms.combinations(cfgs, base_macs, site_dense)) if ms.remote is not None else None
        combiner.network_level(seeds(ranked, measured, sites, chains, options), cand_by_key, many)

        # 4. decision, held to the validation split; the report (with the final latency check)
        base_val_acc = top1(float_ev.run(inputs[val]).logits, ref_all[val])
        held_out = combiner.hold_out(engine, inputs[val], ref_all[val], base_val_acc, threads, measured, cand_by_key)
        cache.save()
    report, out_model, met_eps = reporting.build(
        o=options, engine=engine, measurements=ms, combiner=combiner, sites=sites, site_dense=site_dense,
        base_macs=base_macs, measured=measured, ranked=ranked, hopeless=hopeless, chains=chains,
        split_sizes=(int(len(cal)), int(len(val))), labelled=labels is not None, base_val_acc=base_val_acc,
        x_val=inputs[val], ref_val=ref_all[val], threads=threads, held_out=held_out, t0=t0)
    return OptimizeResult(out_model, met_eps, report, list(measured.values()), combiner.combined)


def dense_model_macs(model: onnx.ModelProto) -> int:
    """Per-sample MACs of the float model (Conv, Gemm, MatMul), as `onnxzero profile` counts them."""
    from onnxzero.profile.cost import node_macs
    from onnxzero.profile.prepare import prepare

    m = onnx.ModelProto()
    m.CopyFrom(model)
    prep = prepare(m)
    return int(sum(node_macs(n, prep.shapes, prep.analysis_batch) or 0 for n in prep.nodes))
