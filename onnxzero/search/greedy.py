"""The multi-level greedy search (spatial-prediction paper, section 5.2 and Appendix 1), generalized
from spatial masks to any technique per site.

1. First level: every (site, technique, setting) candidate is measured alone (the paper's targets
   are assumed uncorrelated): accuracy loss and MACs on the calibration split, and with
   objective=latency the op's latency on a real activation against onnxruntime's Conv+Relu.
2. Per site, the top M candidates within eps, ranked by what they save (the PatchQuantizier /
   ChannelQuantizier passes for the finer spatial modes happen inside the candidate list; see
   spatial_modes).
3. Network level (LayerQuantizier): every site takes its best option; while the combination loses
   more than eps on the calibration split, the site whose option costs the most accuracy backs off
   to its next option (Appendix 1's iterative scheme), or to dense when none is left. Every
   combination is measured end to end; the fastest one within eps wins, not the first.
4. The winner is measured once more on the validation split the search never saw.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxzero.emit import atomic_write_json
from onnxzero.errors import UserError
from onnxzero.evaluate import Evaluator, median_latency_ms, session, top1
from onnxzero.passes.normalize import normalize
from onnxzero.passes.rewrite import rewrite
from onnxzero.passes.rules import TECHNIQUES
from onnxzero.passes.sites import Site, find_sites
from onnxzero.search.candidates import Candidate, first_level
from onnxzero.search.engine import Engine, Measured, _jsonable
from onnxzero.search.spatial_modes import layer_mask

MODES = ("uniform-layer", "uniform-filter", "uniform-patch", "max-granularity")
OBJECTIVES = ("latency", "macs")


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
    latency_runs: int = 50
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


@dataclass
class Combined:
    config: dict[str, dict[str, Any]]  # site -> {"technique", setting...}
    accuracy: float
    loss: float
    macs: int
    latency_ms: float

    def to_json(self) -> dict[str, Any]:
        return {"config": _jsonable(self.config), "accuracy": self.accuracy, "loss": self.loss, "macs": self.macs,
                "latency_ms": self.latency_ms}


@dataclass
class OptimizeResult:
    model: onnx.ModelProto | None  # None when nothing met eps and best_effort is off
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


def optimize(model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray | None, options: SearchOptions, *,
             cache_path: Path | None = None, resume: bool = False, progress: Progress | None = None,
             threads: int = 0) -> OptimizeResult:
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
    jobs_threads = threads if options.jobs == 1 else max(1, (threads or 2) // options.jobs)
    if options.jobs > 1:
        engine.threads = jobs_threads

    cache: dict[str, Any] = {"measured": {}, "combined": []}
    if resume and cache_path and cache_path.exists():
        cache = json.loads(cache_path.read_text())
        progress.note(f"resumed {len(cache['measured'])} measured candidates from {cache_path}")

    def save() -> None:
        if cache_path:
            atomic_write_json(cache_path, cache)

    # ---- 1. first level ----------------------------------------------------------------------
    cands = _candidates(engine, sites, options)
    todo = [c for c in cands if c.key not in cache["measured"]]
    progress.start(len(cands), "first-level candidates")
    progress.advance(len(cands) - len(todo))
    latency = options.objective == "latency"

    def run_one(c: Candidate) -> Measured:
        m = engine.measure(c, latency=False)
        if latency and m.loss <= options.eps and m.macs < m.dense_macs:  # only what can be chosen is timed
            m.latency_ms, m.dense_latency_ms = _latency(engine, c)
        return m

    try:
        if options.jobs > 1:
            with ThreadPoolExecutor(options.jobs) as pool:
                for m in pool.map(run_one, todo):
                    cache["measured"][m.key] = m.to_json()
                    progress.advance()
        else:
            for i, c in enumerate(todo):
                cache["measured"][c.key] = run_one(c).to_json()
                progress.advance()
                if i % 10 == 9:
                    save()
    except KeyboardInterrupt:
        save()
        raise
    save()
    measured = [Measured(**cache["measured"][c.key]) for c in cands]
    cand_by_key = {c.key: c for c in cands}

    # ---- 2. per-site options within eps, best first -----------------------------------------
    ranked: dict[str, list[Measured]] = {}
    for s in sites:
        ok = [m for m in measured if m.site == s.name and m.loss <= options.eps and m.saved(options.objective) > 0]
        ok.sort(key=lambda m: (-m.saved(options.objective), m.loss))
        if ok:
            ranked[s.name] = ok
    # Seeds for the network level: the best options over all techniques, and, when several are
    # enabled, each technique's own best options (a site's single best choice can combine worse
    # than a uniform technique; we want the fastest passing model, not the first).
    seeds = [{s: ms[:options.top_m] for s, ms in ranked.items()}]
    if len(options.techniques) > 1:
        for t in options.techniques:
            seed = {s: [m for m in ms if m.technique == t][:options.top_m] for s, ms in ranked.items()}
            seed = {s: v for s, v in seed.items() if v}
            if seed and seed not in seeds:
                seeds.append(seed)

    # ---- 3. network level with back-off -------------------------------------------------------
    base_lat = _model_latency(base, inputs[:1], library=False, runs=options.latency_runs, threads=threads)
    base_macs = dense_model_macs(base)
    site_dense = {s.name: int(s.macs) for s in sites}
    combined: list[Combined] = []
    progress.start(options.max_rounds * len(seeds), "network-level combinations")
    for options_by_site in seeds:
        choice = {s: 0 for s in options_by_site}
        for _ in range(options.max_rounds):
            if not choice:
                break
            cfg = {s: _site_config(options_by_site[s][i], cand_by_key) for s, i in choice.items()}
            c = _evaluate_combined(base, cfg, engine, base_macs, site_dense, inputs[:1], options, threads)
            combined.append(c)
            cache["combined"].append(c.to_json())
            progress.advance()
            if c.loss <= options.eps:
                break
            # back off the site whose current option costs the most accuracy on its own
            worst = max(choice, key=lambda s: (options_by_site[s][choice[s]].loss,
                                               -options_by_site[s][choice[s]].saved(options.objective)))
            choice[worst] += 1
            if choice[worst] >= len(options_by_site[worst]):
                del choice[worst]
    save()

    passing = [c for c in combined if c.loss <= options.eps]
    key = (lambda c: c.latency_ms) if options.objective == "latency" else (lambda c: c.macs)
    best = min(passing, key=key) if passing else (min(combined, key=lambda c: c.loss) if combined else None)

    # ---- 4. final figures on the validation split ---------------------------------------------
    report: dict[str, Any] = {"eps": options.eps, "objective": options.objective, "mode": options.mode,
                              "techniques": list(options.techniques), "split": {"calibration": int(len(cal)), "validation": int(len(val))},
                              "labels": "labels" if labels is not None else "the float model's own top-1 (no labels given)"}
    base_val_acc = top1(float_ev.run(inputs[val]).logits, ref_all[val])
    report["baseline"] = {"accuracy": base_val_acc, "macs": base_macs, "latency_ms": base_lat}
    out_model = None
    if best is not None:
        out_model, rep = rewrite(base, config={"sites": best.config}, inputs=inputs[cal], labels=ref_all[cal], normalized=True,
                                 runtime_settings=False)
        ev = Evaluator(out_model, threads=threads)
        r = ev.run(inputs[val])
        macs = base_macs - sum(site_dense[s] for s in best.config) + _site_macs(out_model, r.site_macs, best.config)
        lat_opt, lat_base = _interleaved_latency(out_model, base, inputs[:1], options.latency_runs, threads)
        acc = top1(r.logits, ref_all[val])
        report["optimized"] = {"accuracy": acc, "macs": int(macs), "latency_ms": lat_opt}
        report["baseline"]["latency_ms"] = lat_base
        report["latency_ratio"] = lat_opt / lat_base
        report["mac_reduction"] = 1 - macs / base_macs
        report["validation_loss"] = 100.0 * (base_val_acc - acc)
        by_site = _macs_by_site(out_model, r.site_macs, best.config)
        report["sites"] = [_site_row(s, best.config.get(s.name), rep, by_site.get(s.name)) for s in sites]
    else:
        report["optimized"] = None
        report["sites"] = [_site_row(s, None, None) for s in sites]
    report["met_eps"] = bool(passing)
    if not ranked:
        report["note"] = (f"no site setting saved {options.objective} within eps on its own: "
                          "the original model is the best this search found")
    report["search"] = {"candidates_evaluated": len(measured) + len(combined), "first_level": len(measured),
                        "combinations": len(combined), "seconds": time.time() - t0}
    report["pareto"] = pareto([{"accuracy": engine.base_accuracy, "macs": base_macs, "latency_ms": base_lat, "label": "float model"}]
                              + [{"accuracy": engine.base_accuracy - c.loss / 100, "macs": c.macs, "latency_ms": c.latency_ms,
                                  "label": f"{len(c.config)} sites"} for c in combined])
    return OptimizeResult(out_model, bool(passing), report, measured, combined)


def _candidates(engine: Engine, sites: list[Site], o: SearchOptions) -> list[Candidate]:
    out: list[Candidate] = []
    for s in sites:
        for t in o.techniques:
            if t == "spatial" and o.mode != "uniform-layer":
                y = engine.calibration.tensors([s.y])[s.y] > 0
                for p in o.patch_sizes:
                    for thr in sorted({o.granularity_threshold / 2, o.granularity_threshold, o.granularity_threshold * 2}):
                        m = layer_mask(y, p, o.mode, o.ones_range, thr)
                        out.append(Candidate.make(s.name, "spatial", {"patch": p, "mask": m.tolist(), "granularity": thr}))
            else:
                out.extend(first_level(s, t, patch_sizes=o.patch_sizes, ones_range=o.ones_range))
    return out


def _latency(engine: Engine, c: Candidate) -> tuple[float, float]:
    s = engine.sites[c.site]
    if c.technique == "sparse-quant":
        model, _ = rewrite(engine.base, config={"sites": {c.site: {"technique": "sparse-quant", "prune": c.setting["prune"]}}},
                           normalized=True)
        return engine.site_latency(model, s, {})
    model, _, defaults = engine.technique_model(c.technique, engine.variant(c))
    return engine.site_latency(model, s, engine._feeds(c, defaults))


def _site_config(m: Measured, cands: dict[str, Candidate]) -> dict[str, Any]:
    c = cands[m.key]
    setting = dict(c.setting)
    setting.pop("granularity", None)
    return {"technique": c.technique, **setting}


def _macs_by_site(model: onnx.ModelProto, site_macs: dict[str, int], config: dict[str, Any]) -> dict[str, int]:
    """Per-sample MACs each rewritten site's op reported (its counter output)."""
    out = {}
    for n in model.graph.node:
        site = n.name.rsplit("__", 1)[0]
        if n.domain and site in config:
            out[site] = next((v for k, v in site_macs.items() if k.startswith(n.output[0])), 0)
    return out


def _site_macs(model: onnx.ModelProto, site_macs: dict[str, int], config: dict[str, Any]) -> int:
    return sum(_macs_by_site(model, site_macs, config).values())


def _evaluate_combined(base, cfg, engine: Engine, base_macs, site_dense, sample, o: SearchOptions, threads) -> Combined:
    cfg = {s: _materialize(engine, s, c) for s, c in cfg.items()}
    model, _ = rewrite(base, config={"sites": cfg}, inputs=engine.x, labels=engine.ref, normalized=True,
                       runtime_settings=False)  # timed as it will be deployed
    ev = Evaluator(model, threads=threads)
    r = ev.run(engine.x)
    acc = top1(r.logits, engine.ref)
    macs = base_macs - sum(site_dense[s] for s in cfg) + _site_macs(model, r.site_macs, cfg)
    lat = ev.latency_ms(sample, runs=max(10, o.latency_runs // 2))
    return Combined(config=cfg, accuracy=acc, loss=100.0 * (engine.base_accuracy - acc), macs=int(macs), latency_ms=lat)


def _materialize(engine: Engine, site: str, c: dict[str, Any]) -> dict[str, Any]:
    """Early-exit settings become explicit (n_terms, threshold) so the emitted model is self-contained."""
    if c["technique"] == "early-exit" and c.get("mode") == "predictive" and "n_terms" not in c:
        nt, th = engine.predictive(engine.sites[site], c)
        return {**c, "n_terms": nt, "threshold": th}
    return c


def _model_latency(model, sample, *, library: bool, runs: int, threads: int) -> float:
    sess = session(model, threads=threads, library=library)
    name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    return median_latency_ms(sess, {name: sample}, runs=runs)


def _interleaved_latency(opt, base, sample, runs, threads) -> tuple[float, float]:
    """Median latencies of the optimized and original models, alternated so noise hits both alike."""
    so, sb = session(opt, threads=threads), session(base, threads=threads, library=False)
    name = next(i.name for i in base.graph.input if i.name not in {t.name for t in base.graph.initializer})
    a, b = [], []
    for _ in range(5):
        a.append(median_latency_ms(so, {name: sample}, runs=max(5, runs // 5)))
        b.append(median_latency_ms(sb, {name: sample}, runs=max(5, runs // 5)))
    return float(np.median(a)), float(np.median(b))


def dense_model_macs(model: onnx.ModelProto) -> int:
    """Per-sample MACs of the float model (Conv, Gemm, MatMul), as `onnxzero profile` counts them."""
    from onnxzero.profile.cost import node_macs
    from onnxzero.profile.prepare import prepare

    m = onnx.ModelProto()
    m.CopyFrom(model)
    prep = prepare(m)
    return int(sum(node_macs(n, prep.shapes, prep.analysis_batch) or 0 for n in prep.nodes))


def _site_row(s: Site, cfg: dict[str, Any] | None, rep, macs_after: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"node": s.name, "technique": None, "setting": None, "macs_before": int(s.macs or 0),
                           "macs_after": int(s.macs or 0) if macs_after is None else int(macs_after)}
    if cfg and rep is not None:
        r = next(x for x in rep.sites if x.site.name == s.name)
        row.update(technique=cfg["technique"], setting=r.to_json()["setting"], stats=r.to_json()["stats"])
    return row


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points not dominated in (higher accuracy, lower MACs, lower latency)."""
    def dominated(p, q):
        return (q["accuracy"] >= p["accuracy"] and q["macs"] <= p["macs"] and q["latency_ms"] <= p["latency_ms"]
                and (q["accuracy"], q["macs"], q["latency_ms"]) != (p["accuracy"], p["macs"], p["latency_ms"]))
    return [p for p in points if not any(dominated(p, q) for q in points)]
