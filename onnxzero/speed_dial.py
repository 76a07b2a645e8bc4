"""The run-time speed dial: an accuracy vs latency Pareto front of run-time settings, behind one knob.

The lazy-filter paper explores per-layer ratios with NSGA-II (its Fig. 3) because the ratio can
move at run time ("based on the remaining battery capacity"). Here every setting the ops read from
an input rather than an attribute takes part: LazyConv's ratio, SpatialConv's mask and predictive
EarlyExitConv's (n_terms, threshold). Everything else of the greedy result (patch sizes, sparse-quant
weights, exact early exit, the techniques themselves) stays fixed: changing it means another model.

1. rewrite the float model with the greedy config and runtime_settings=True, and find each site's
   setting inputs by walking the custom-op nodes (input positions are the op contract);
2. per site a discrete list of options (computed once: lazy ratios, masks, predictive calibrations);
3. NSGA-II (pymoo) over the option indices, seeded with the greedy result, every candidate run on
   ONE session with its settings fed (no rebuilds): maximize accuracy on the calibration split,
   minimize whole-model latency, constraint loss <= eps; then the front's candidates are re-timed
   interleaved (median of several rounds) until the front holds only re-timed points;
4. the front's points ordered from most accurate to fastest become per-site constant tables, and the
   emitted model picks a row with its scalar input `speed`:
   index = floor(clip(speed, 0, 1) * (P - 1) + 0.5), i.e. the nearest point, a tie (exactly half
   way) going to the faster point; NaN selects point 0 (the most accurate).
5. the report's figures per point come from the emitted model fed that `speed`, on the held-out split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxzero import UserError
from onnxzero.evaluate import Evaluator, median_latency_ms, top1
from onnxzero.ops.spec import OPS
from onnxzero.passes.normalize import normalize
from onnxzero.passes.rewrite import provenance, rewrite
from onnxzero.passes.rules import RULES
from onnxzero.passes.rules.base import Calibration
from onnxzero.passes.rules.early_exit import EarlyExitRule
from onnxzero.passes.sites import find_sites

SPEED = "speed"
ROUNDING = ("index = floor(clip(speed, 0, 1) * (P - 1) + 0.5): the nearest point, exactly half way goes to the "
            "faster one; speed outside [0, 1] is clamped, NaN selects the most accurate point")
# The op spec's positions of the inputs a deployment may change per run.
SETTING_INPUTS: dict[str, dict[int, str]] = {op: {spec.index(x.name): x.name for x in spec.settings}
                                             for op, spec in OPS.items() if spec.settings}
LAZY_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
# (fraction of terms before the check, quantile of the positive outputs that may be cut)
PREDICTIVE = ((0.5, 0.02), (0.5, 0.1), (0.25, 0.05), (0.25, 0.15))

# measurer(session, feeds) -> milliseconds for one inference with these feeds
LatencyMeasurer = Callable[[ort.InferenceSession, dict[str, np.ndarray]], float]


def median_latency(runs: int = 20) -> LatencyMeasurer:
    """The default measurer: whole-model median wall-clock latency over `runs` runs."""
    return lambda sess, feeds: median_latency_ms(sess, feeds, runs=runs)


@dataclass
class Knob:
    """One site's run-time settings: the graph inputs it reads and the options the search may pick."""

    site: str
    technique: str
    inputs: dict[str, str]                  # kind ("ratio", "mask", ...) -> graph input name
    options: list[dict[str, np.ndarray]]    # each: kind -> value (one dtype and shape per kind)
    labels: list[dict[str, Any]]            # each option as JSON for the report
    seed: int = 0                           # index of the greedy result's setting


@dataclass
class Measured:
    genome: tuple[int, ...]
    accuracy: float
    loss: float        # percentage points below the float model, calibration split
    macs: int          # per sample, whole model
    latency_ms: float


@dataclass
class DialResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    front: list[Measured] = field(default_factory=list)
    evaluated: list[Measured] = field(default_factory=list)


def runtime_knobs(model: onnx.ModelProto, sites, *, graph_inputs_only: bool = True) -> dict[str, dict[str, str]]:
    """{site name: {kind: graph input name}} for every custom op fed a run-time setting.

    A node belongs to the site whose input and weight it reads; a setting input counts only when it
    is a graph input (with its default as an initializer), i.e. changeable per run, unless
    graph_inputs_only is off (then constants count too).
    """
    graph_inputs = {i.name for i in model.graph.input}
    if not graph_inputs_only:
        graph_inputs |= {t.name for t in model.graph.initializer}
    by_xw = {(s.x, s.w): s.name for s in sites}
    out: dict[str, dict[str, str]] = {}
    for n in model.graph.node:
        kinds = SETTING_INPUTS.get(n.op_type)
        if not kinds or len(n.input) < 2:
            continue
        site = by_xw.get((n.input[0], n.input[1]))
        found = {k: n.input[i] for i, k in kinds.items() if i < len(n.input) and n.input[i] in graph_inputs}
        if site and found:
            out[site] = found
    return out


def seed_from_model(optimized: onnx.ModelProto | None, base: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """The per-site config ({site: {"technique", setting...}}) that rewrites `base` (the normalized
    float model) into `optimized` (a model onnxzero rewrote, e.g. the greedy search's result), given
    the same calibration data (the lazy predictors are fitted on it; they are not settings).

    The techniques and fixed settings come from the model's provenance; the run-time-settable values
    (lazy ratio, spatial mask, predictive n_terms/threshold) are read from the ops' inputs, whether
    frozen as constants or graph inputs with defaults, so the seed is exactly what was deployed.
    """
    if optimized is None:
        raise UserError("--pareto needs the greedy result, and the search returned no model (nothing met eps)")
    prov = (provenance(optimized) or {}).get("sites") or {}
    if not prov:
        raise UserError("the optimized model has no onnxzero provenance (metadata 'onnxzero'): "
                        "expected a model written by onnxzero optimize or rewrite")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in prov.items():
        tech = entry["technique"]
        keys = RULES[tech].keys
        out[name] = {"technique": tech, **{k: v for k, v in (entry.get("setting") or {}).items() if k in keys}}
    values = _initializers(optimized)
    for name, kinds in runtime_knobs(optimized, find_sites(base), graph_inputs_only=False).items():
        if name not in out:
            continue
        got = {k: values[v] for k, v in kinds.items() if v in values}
        cfg = out[name]
        if "ratio" in got:
            cfg["ratio"] = float(got["ratio"])
        if "mask" in got:
            cfg["mask"] = got["mask"].tolist()
        if "n_terms" in got and "threshold" in got:
            cfg.pop("fraction", None)
            cfg.pop("quantile", None)
            cfg["n_terms"], cfg["threshold"] = got["n_terms"].tolist(), got["threshold"].tolist()
    return out


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _dense_macs(model: onnx.ModelProto) -> int:
    """Per-sample MACs of the float model (Conv, Gemm, MatMul), as `onnxzero profile` counts them."""
    from onnxzero.profile.cost import node_macs
    from onnxzero.profile.prepare import prepare

    m = onnx.ModelProto()
    m.CopyFrom(model)
    prep = prepare(m)
    return int(sum(node_macs(n, prep.shapes, prep.analysis_batch) or 0 for n in prep.nodes))


def _with_seed(options: list[dict[str, np.ndarray]], labels: list[dict[str, Any]], seed: dict[str, np.ndarray],
               seed_label: dict[str, Any]) -> int:
    for i, o in enumerate(options):
        if all(o[k].shape == seed[k].shape and np.array_equal(o[k], seed[k]) for k in seed):
            return i
    options.append(seed)
    labels.append(seed_label)
    return len(options) - 1


def _spatial_options(seed_mask: np.ndarray) -> tuple[list[dict[str, np.ndarray]], list[dict[str, Any]]]:
    """All-ones (exactly Conv+ReLU) first, then, for a per-layer (p, p) seed, one pattern per count of
    ones (evenly spread positions, so the count is what varies). A finer seed (per filter, per patch)
    keeps its shape: the table needs one shape per site, so only all-ones and the seed itself."""
    opts = [{"mask": np.ones_like(seed_mask, np.uint8)}]
    labels: list[dict[str, Any]] = [{"mask_ones": 1.0}]
    if seed_mask.ndim == 2:
        p = seed_mask.shape[0]
        for ones in range(p * p - 1, 0, -1):
            m = np.zeros(p * p, np.uint8)
            m[np.round(np.linspace(0, p * p - 1, ones)).astype(int)] = 1
            opts.append({"mask": m.reshape(p, p)})
            labels.append({"mask": m.reshape(p, p).tolist()})
    return opts, labels


def build_knobs(base: onnx.ModelProto, model_rt: onnx.ModelProto, sites, calib_x: np.ndarray,
                seed_config: Mapping[str, Mapping[str, Any]]) -> list[Knob]:
    """Per site with run-time settings, its options; the greedy setting (the rewritten model's
    defaults) is always one of them."""
    found = runtime_knobs(model_rt, sites)
    defaults = _initializers(model_rt)
    by_name = {s.name: s for s in sites}
    calibration = None
    knobs = []
    for name, inputs in found.items():
        tech = seed_config[name]["technique"]
        seed = {k: np.asarray(defaults[v]) for k, v in inputs.items()}
        if tech == "lazy":
            opts = [{"ratio": np.asarray(r, np.float32)} for r in LAZY_RATIOS]
            labels = [{"ratio": r} for r in LAZY_RATIOS]
            seed_label = {"ratio": float(seed["ratio"])}
        elif tech == "spatial":
            opts, labels = _spatial_options(seed["mask"])
            seed_label = {"mask": seed["mask"].tolist()} if seed["mask"].size <= 16 else {
                "mask_shape": list(seed["mask"].shape), "mask_ones": float(seed["mask"].mean())}
        elif tech == "early-exit":
            s = by_name[name]
            k = s.w_shape[0]
            # Th = -inf: never predicted zero, exactly Conv+ReLU
            opts = [{"n_terms": np.zeros(k, np.int64), "threshold": np.full(k, -np.inf, np.float32)}]
            labels = [{"fraction": 0.0, "quantile": 0.0, "prediction": "off"}]
            calibration = calibration or Calibration(base, calib_x)
            rule = EarlyExitRule(base, has_data=True)
            for f, q in PREDICTIVE:
                fit = calibration.fit(rule, s, {"mode": "predictive", "fraction": f, "quantile": q})
                nt, th = fit["n_terms"], fit["threshold"]
                opts.append({"n_terms": np.asarray(nt, np.int64), "threshold": np.asarray(th, np.float32)})
                labels.append({"fraction": f, "quantile": q})
            given = seed_config[name]
            seed_label = {k2: given[k2] for k2 in ("fraction", "quantile") if k2 in given} or {"calibration": "greedy"}
        else:  # an op with setting inputs this module does not know how to vary
            continue
        idx = _with_seed(opts, labels, seed, seed_label)
        knobs.append(Knob(name, tech, dict(inputs), opts, labels, idx))
    return knobs


def _feeds(knobs: list[Knob], genome: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {kn.inputs[k]: v for kn, g in zip(knobs, genome) for k, v in kn.options[g].items()}


def non_dominated(points: list[Measured], cost: Callable[[Measured], float] = lambda m: m.latency_ms) -> list[Measured]:
    """Points no other beats in (higher accuracy, lower cost); equal pairs keep the fewest MACs, then
    the lowest latency. Sorted from most accurate to cheapest."""
    best: dict[tuple[float, float], Measured] = {}
    for p in points:
        k = (p.accuracy, cost(p))
        if k not in best or (p.macs, p.latency_ms) < (best[k].macs, best[k].latency_ms):
            best[k] = p
    pts = list(best.values())
    front = [p for p in pts if not any(q.accuracy >= p.accuracy and cost(q) <= cost(p) and q is not p for q in pts)]
    return sorted(front, key=lambda p: (-p.accuracy, cost(p)))


def _interleaved(measure: LatencyMeasurer, runs: list[tuple[ort.InferenceSession, dict[str, np.ndarray]]],
                 rounds: int) -> list[float]:
    """The median of `rounds` measurements of each (session, feeds), taken round-robin so machine
    noise hits all of them alike."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for t, (sess, feeds) in zip(times, runs):
            t.append(float(measure(sess, feeds)))
    return [float(np.median(t)) for t in times]


def _retime(ev: Evaluator, sample: np.ndarray, knobs: list[Knob], measure: LatencyMeasurer, points: list[Measured],
            rounds: int) -> None:
    lat = _interleaved(measure, [(ev.session, {ev.input_name: sample, **_feeds(knobs, m.genome)}) for m in points], rounds)
    for m, v in zip(points, lat):
        m.latency_ms = v


def pick(front: list[Measured], points: int, cost: Callable[[Measured], float] = lambda m: m.latency_ms) -> list[Measured]:
    """At most `points` of the front (most accurate first): both ends always, then for each cost evenly
    spaced between them the nearest point not yet taken, so near-duplicates do not fill the dial."""
    if len(front) <= points:
        return list(front)
    taken = {0, len(front) - 1}
    for target in np.linspace(cost(front[0]), cost(front[-1]), points)[1:-1]:
        free = [i for i in range(len(front)) if i not in taken]
        taken.add(min(free, key=lambda i: (abs(cost(front[i]) - target), i)))
    return [front[i] for i in sorted(taken)]


RUNTIME_TECHNIQUES = ("lazy", "spatial", "early-exit")  # early-exit only in predictive mode


def check_pareto_options(points: int, techniques) -> None:
    """`optimize --pareto` checks, before the search runs: a one-line UserError, nothing written."""
    if not isinstance(points, int) or isinstance(points, bool) or points < 2:
        raise UserError(f"--points is {points!r}, expected an integer >= 2 (the most accurate and the fastest point)")
    if not set(techniques) & set(RUNTIME_TECHNIQUES):
        raise UserError(f"--pareto needs a run-time-settable technique (lazy, spatial or predictive early-exit) "
                        f"in --techniques, got {','.join(techniques) or 'none'}")


def speed_dial(model: onnx.ModelProto, calibration: tuple[np.ndarray, np.ndarray | None],
               validation: tuple[np.ndarray, np.ndarray | None], *, eps: float,
               seed_config: Mapping[str, Mapping[str, Any]], points: int = 8, pop_size: int = 16,
               generations: int = 10, latency: LatencyMeasurer | None = None, threads: int = 2,
               objective: str = "latency", rounds: int = 5, seed: int = 0, normalized: bool = False,
               progress=None) -> DialResult:
    """Search the run-time settings' accuracy vs latency front and emit one model with a `speed` input.

    model: the float model; calibration / validation: (inputs, labels or None: the float model's
    own top-1 then stands for the labels); eps: top-1 points the search may lose on the calibration
    split; seed_config: the greedy result {site: {"technique": ..., setting...}} (rewrite's
    config["sites"]); latency: measurer(session, feeds) -> ms (default: median of 20 runs);
    threads: the session's intra-op threads (spinning is off in every onnxzero session);
    objective: "latency" (the paper's) or "macs" (deterministic: whole-model MACs from the ops'
    counters); rounds: the front's candidates are re-timed interleaved this many times and keep the
    median, so one lucky run cannot put a point on the front (latency objective only);
    progress: an object with start(total, what) and advance(n=1) (e.g. the search's Progress), or None.
    """
    check_pareto_options(points, RUNTIME_TECHNIQUES)
    if not 0 <= eps <= 100:
        raise UserError(f"--eps is {eps:g}, expected a value in [0, 100] (percentage points of top-1)")
    if objective not in ("latency", "macs"):
        raise UserError(f"--objective is {objective!r}, expected latency or macs")
    if pop_size < 4 or generations < 1 or rounds < 1:
        raise UserError(f"NSGA-II population {pop_size} / generations {generations} / rounds {rounds}, "
                        "expected >= 4 / >= 1 / >= 1")
    if not isinstance(seed_config, Mapping) or not seed_config:
        raise UserError("--pareto needs the greedy result's per-site config, and it is empty: "
                        "no site was rewritten, so there is no run-time setting to dial")
    cal_x, cal_y = calibration
    val_x, val_y = validation
    base = model if normalized else normalize(model)[0]
    float_ev = Evaluator(base, threads=threads)
    cal_ref = cal_y if cal_y is not None else np.argmax(float_ev.run(cal_x).logits, axis=1)
    val_ref = val_y if val_y is not None else np.argmax(float_ev.run(val_x).logits, axis=1)
    model_rt, rep = rewrite(base, config={"sites": dict(seed_config)}, inputs=cal_x, labels=cal_ref, normalized=True,
                            runtime_settings=True)
    sites = [r.site for r in rep.sites]
    knobs = build_knobs(base, model_rt, sites, cal_x, seed_config)
    if not knobs:
        techs = sorted({str(v.get("technique")) for v in seed_config.values() if v})
        raise UserError(f"--pareto needs a run-time-settable technique in the greedy result (lazy, spatial or "
                        f"predictive early-exit), got only {', '.join(techs) or 'none'}")
    measure = latency or median_latency()
    rewritten = [r.site for r in rep.rewritten]
    base_macs = _dense_macs(base)
    dense_rest = base_macs - sum(int(s.macs or 0) for s in rewritten)
    base_acc = top1(float_ev.run(cal_x).logits, cal_ref)

    ev = Evaluator(model_rt, threads=threads)
    sample = cal_x[:1]
    cache: dict[tuple[int, ...], Measured] = {}

    def evaluate(genome: tuple[int, ...]) -> Measured:
        if genome not in cache:
            feeds = _feeds(knobs, genome)
            r = ev.run(cal_x, feeds=feeds)
            acc = top1(r.logits, cal_ref)
            lat = float(measure(ev.session, {ev.input_name: sample, **feeds}))
            cache[genome] = Measured(genome, acc, 100.0 * (base_acc - acc), dense_rest + r.macs, lat)
            if progress is not None:
                progress.advance()
        return cache[genome]

    if progress is not None:  # an upper bound: NSGA-II drops duplicate genomes
        progress.start(pop_size * generations, "NSGA-II run-time settings")
    cost = (lambda m: m.latency_ms) if objective == "latency" else (lambda m: float(m.macs))
    _nsga2(knobs, evaluate, cost, eps=eps, pop_size=pop_size, generations=generations, seed=seed)
    within = [m for m in cache.values() if m.loss <= eps]
    if not within:  # the all-accurate genome is always evaluated; it only fails eps if the seed ops do
        raise UserError(f"no run-time setting of the greedy result stays within --eps {eps:g} on the calibration split")
    retimed: set[tuple[int, ...]] = set()
    pool = within
    if objective == "latency":
        # until every point on the front has been re-timed (a few passes at most: each costs
        # rounds x candidates measurements): re-time the front and the rank behind it
        for _ in range(4):
            front = non_dominated(within)
            if all(m.genome in retimed for m in front):
                break
            on_front = {m.genome for m in front}
            rest = [m for m in within if m.genome not in on_front]
            todo = [m for m in front + non_dominated(rest) if m.genome not in retimed][:4 * points]
            _retime(ev, sample, knobs, measure, todo, rounds)
            retimed.update(m.genome for m in todo)
        else:  # not settled after the passes: only re-timed points may make the front
            pool = [m for m in within if m.genome in retimed]
    front = non_dominated(pool, cost)
    chosen = pick(front, points, cost)
    dial = emit(model_rt, knobs, [m.genome for m in chosen])

    # the report's figures: the emitted model, fed each point's speed, on the held-out split
    out_ev = Evaluator(dial, threads=threads)
    base_val = top1(float_ev.run(val_x).logits, val_ref)
    speeds = [speed_value(i, len(chosen)) for i in range(len(chosen))]
    # the float model (onnxruntime's own kernels) timed alongside the dial's points
    *lat, base_lat = _interleaved(measure, [(out_ev.session, {out_ev.input_name: sample, SPEED: np.asarray(s, np.float32)})
                                            for s in speeds] + [(float_ev.session, {float_ev.input_name: sample})], rounds)
    rows = []
    for m, s, ms in zip(chosen, speeds, lat):
        r = out_ev.run(val_x, feeds={SPEED: np.asarray(s, np.float32)})
        acc = top1(r.logits, val_ref)
        rows.append({"speed": s, "accuracy": acc, "loss": 100.0 * (base_val - acc), "macs": int(dense_rest + r.macs),
                     "op_macs": int(r.macs), "latency_ms": ms,
                     "settings": {kn.site: {"technique": kn.technique, **kn.labels[g]} for kn, g in zip(knobs, m.genome)},
                     "search": {"accuracy": m.accuracy, "loss": m.loss, "macs": int(m.macs), "latency_ms": m.latency_ms}})
    report = {"eps": eps, "objective": objective, "points": rows, "rounding": ROUNDING, "input": SPEED,
              "split": {"calibration": int(len(cal_x)), "validation": int(len(val_x))},
              "baseline": {"accuracy": base_val, "calibration_accuracy": base_acc, "macs": base_macs,
                           "latency_ms": base_lat},
              "sites": [{"node": kn.site, "technique": kn.technique, "inputs": sorted(kn.inputs.values()),
                         "options": len(kn.options), "greedy_option": kn.seed} for kn in knobs],
              "nsga2": {"library": "pymoo", "pop_size": pop_size, "generations": generations,
                        "evaluated": len(cache), "front": len(front), "within_eps": len(within),
                        "retimed": len(retimed), "rounds": rounds if objective == "latency" else 0},
              "explored": [{"accuracy": m.accuracy, "macs": int(m.macs), "latency_ms": m.latency_ms} for m in cache.values()]}
    if len(front) > len(chosen):
        report["note"] = f"the front has {len(front)} points; {len(chosen)} evenly spaced by {objective} are on the dial"
    elif len(chosen) < points:
        report["note"] = f"the front has only {len(chosen)} points, fewer than --points {points}"
    return DialResult(dial, report, chosen, list(cache.values()))


def speed_value(i: int, n: int) -> float:
    """The `speed` that selects point i of n (0 = most accurate, 1 = fastest)."""
    return 0.0 if n < 2 else i / (n - 1)


def _nsga2(knobs: list[Knob], evaluate: Callable[[tuple[int, ...]], Measured], cost: Callable[[Measured], float], *,
           eps: float, pop_size: int, generations: int, seed: int) -> None:
    """pymoo's NSGA-II over one integer (option index) per site, objectives (-accuracy, cost),
    constraint loss - eps <= 0. Results land in `evaluate`'s cache; sites with one option are fixed."""
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import ElementwiseProblem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.optimize import minimize
    except ImportError as e:  # a dependency of the package; this only happens in a broken install
        raise UserError(f"--pareto needs pymoo>=0.6.2 (NSGA-II), which is not importable: {e}") from e

    # a site with one option (e.g. an all-ones finer mask) is fixed at it: pymoo's operators divide by xu - xl
    free = [i for i, k in enumerate(knobs) if len(k.options) > 1]
    upper = np.array([len(knobs[i].options) - 1 for i in free])

    def genome(x) -> tuple[int, ...]:
        g = [knobs[i].seed for i in range(len(knobs))]
        for i, v in zip(free, np.clip(np.round(x), 0, upper)):
            g[i] = int(v)
        return tuple(g)

    if not free:
        evaluate(genome([]))
        return

    class Problem(ElementwiseProblem):
        def __init__(self):
            super().__init__(n_var=len(free), n_obj=2, n_ieq_constr=1, xl=np.zeros(len(free)), xu=upper, vtype=int)

        def _evaluate(self, x, out, *args, **kwargs):
            m = evaluate(genome(x))
            out["F"] = [-m.accuracy, cost(m)]
            out["G"] = [m.loss - eps]

    # seeds: the greedy result, every site at its most accurate option (0), every site at its last
    # option, then random genomes
    rng = np.random.default_rng(seed)
    init = [[knobs[i].seed for i in free], [0] * len(free), list(upper)]
    while len(init) < pop_size:
        init.append([int(rng.integers(0, u + 1)) for u in upper])
    algorithm = NSGA2(pop_size=pop_size, sampling=np.array(init[:pop_size], dtype=float),
                      crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                      mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    minimize(Problem(), algorithm, ("n_gen", generations), seed=seed, verbose=False)


def emit(model_rt: onnx.ModelProto, knobs: list[Knob], genomes: list[tuple[int, ...]]) -> onnx.ModelProto:
    """The rewritten model with its per-site setting inputs replaced by Gather(table, index(speed)).

    Each setting tensor keeps its name (the ops are untouched): it becomes the output of a Gather
    on a constant (P, ...) table, row i holding point i's value; its graph input and default go.
    """
    n = len(genomes)
    m = onnx.ModelProto()
    m.CopyFrom(model_rt)
    g = m.graph
    names = {v for kn in knobs for v in kn.inputs.values()}
    if SPEED in {i.name for i in g.input} | {t.name for t in g.initializer} | {o for nd in g.node for o in nd.output}:
        raise UserError(f"the model already has a tensor named {SPEED!r}; cannot add the speed input")
    keep_in = [i for i in g.input if i.name not in names]
    keep_init = [t for t in g.initializer if t.name not in names]
    del g.input[:]
    g.input.extend(keep_in)
    del g.initializer[:]
    g.initializer.extend(keep_init)

    c = f"{SPEED}__"
    consts = {f"{c}zero": np.asarray(0.0, np.float32), f"{c}one": np.asarray(1.0, np.float32),
              f"{c}last": np.asarray(float(n - 1), np.float32), f"{c}half": np.asarray(0.5, np.float32)}
    pre = [
        helper.make_node("IsNaN", [SPEED], [f"{c}nan"], name=f"{c}isnan"),
        helper.make_node("Where", [f"{c}nan", f"{c}zero", SPEED], [f"{c}num"], name=f"{c}nan_to_zero"),
        helper.make_node("Clip", [f"{c}num", f"{c}zero", f"{c}one"], [f"{c}clipped"], name=f"{c}clip"),
        helper.make_node("Mul", [f"{c}clipped", f"{c}last"], [f"{c}scaled"], name=f"{c}scale"),
        helper.make_node("Add", [f"{c}scaled", f"{c}half"], [f"{c}shifted"], name=f"{c}shift"),
        helper.make_node("Floor", [f"{c}shifted"], [f"{c}floor"], name=f"{c}floor"),
        helper.make_node("Cast", [f"{c}floor"], [f"{c}index"], to=TensorProto.INT64, name=f"{c}index"),
    ]
    for kn in knobs:
        for kind, name in kn.inputs.items():
            table = np.stack([kn.options[gen[knobs.index(kn)]][kind] for gen in genomes])
            consts[f"{name}__table"] = table
            pre.append(helper.make_node("Gather", [f"{name}__table", f"{c}index"], [name], axis=0,
                                        name=f"{name}__select"))
    nodes = pre + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    for k, v in consts.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(v), k))
    g.initializer.append(numpy_helper.from_array(np.asarray(0.0, np.float32), SPEED))
    g.input.append(helper.make_tensor_value_info(SPEED, TensorProto.FLOAT, []))
    m.metadata_props.add(key="onnxzero.speed_dial", value=f"{n} points; {ROUNDING}")
    onnx.checker.check_model(m, full_check=True)
    return m


def _setting_text(s: Mapping[str, Any]) -> str:
    if "ratio" in s:
        return f"ratio {s['ratio']:g}"
    if "mask" in s:
        return "mask " + "/".join("".join(str(v) for v in row) for row in s["mask"])
    if "mask_ones" in s:
        return f"mask {s['mask_ones']:.0%} ones"
    if s.get("prediction") == "off":
        return "no prediction"
    if "fraction" in s:
        return f"N {s['fraction']:g}, q {s['quantile']:g}"
    return "greedy's calibration"


def render(report: Mapping[str, Any], console) -> None:
    """The dial on the terminal (a rich Console): one row per speed value, then each site's setting
    per point on its own line, site names in full (never cut: soft wrap only)."""
    from rich.table import Table

    b = report["baseline"]
    t = Table(title=f"speed dial: {len(report['points'])} points within eps = {report['eps']:g} "
                    f"(objective {report['objective']}), held-out figures on {report['split']['validation']} samples")
    for col in ("speed", "top-1", "loss (pts)", "MACs / sample", "latency (ms)"):
        t.add_column(col, justify="right")
    t.add_row("float", f"{b['accuracy'] * 100:.2f}%", "", f"{b['macs']:,}", f"{b['latency_ms']:.3f}")
    for p in report["points"]:
        t.add_row(f"{p['speed']:.3g}", f"{p['accuracy'] * 100:.2f}%", f"{p['loss']:+.2f}", f"{p['macs']:,}",
                  f"{p['latency_ms']:.3f}")
    console.print(t)
    for site in report["sites"]:
        settings = " | ".join(_setting_text(p["settings"][site["node"]]) for p in report["points"])
        console.print(f"{site['node']} ({site['technique']}): {settings}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"speed -> point: {report['rounding']}", soft_wrap=True, highlight=False, markup=False)
    if "note" in report:
        console.print(report["note"], soft_wrap=True, highlight=False, markup=False)
