"""Measure candidates by real onnxruntime runs: accuracy and MACs from the ops' own counters on the
calibration split; latency only ever of the whole model as deployed (search/latency.py), never of
an op alone, which hid the reorders and lost fusions a custom op costs in context.

Sessions are built once per technique with every site's setting as a run-time input (spatial
masks, lazy ratios, predictive (N, Th)), so trying a setting is a forward pass, not a rebuild.
Sparse-quant is the exception: its compressed weights are decoded when the session is created
(that is where the kernel lays them out), so each pruning level of a site gets its own small model.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzero.evaluate import Evaluator, expose_macs, fixed_batch, session, top1
from onnxzero.emit import jsonable
from onnxzero.passes.rewrite import RewriteReport, SiteResult, rewrite
from onnxzero.passes.rules import Calibration
from onnxzero.passes.rules.early_exit import EarlyExitRule
from onnxzero.passes.sites import Site
from onnxzero.search.candidates import Candidate

NO_SKIP_FEEDS = {"spatial": "mask", "lazy": "ratio", "early-exit": "threshold"}


@dataclass
class Measured:
    key: str
    site: str
    technique: str
    setting: dict[str, Any]
    accuracy: float         # calibration split, only this site changed
    loss: float             # percentage points vs the float model on the same split
    macs: int               # this site's MACs per sample, from its op's counter
    dense_macs: int
    latency_ms: float | None = None        # the whole model with only this site rewritten (frozen settings)
    dense_latency_ms: float | None = None  # the original model, interleaved with it in the same measurement

    def saved(self, objective: str) -> float:
        """Latency: the share of whole-model time this site's rewrite saves; MACs: the MACs it saves."""
        if objective == "latency":
            if self.latency_ms is None or not self.dense_latency_ms:
                return 0.0
            return 1.0 - self.latency_ms / self.dense_latency_ms
        return float(self.dense_macs - self.macs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Engine:
    def __init__(self, base: onnx.ModelProto, sites: list[Site], calib_x: np.ndarray, calib_ref: np.ndarray,
                 *, threads: int = 0):
        self.base, self.sites = base, {s.name: s for s in sites}
        self.x, self.ref = calib_x, calib_ref
        self.threads = threads
        self.calibration = Calibration(base, calib_x, calib_ref)
        self.base_accuracy = top1(Evaluator(base, threads=threads).run(calib_x).logits, calib_ref)
        self._tech: dict[str, tuple[onnx.ModelProto, Evaluator, dict[str, np.ndarray]]] = {}
        self._suffix: dict[tuple, Suffix | None] = {}
        self._acts: dict[str, np.ndarray] = {}  # the float model's activations on the calibration split
        self._base_names = {self._input_name(base)} | {o for n in base.graph.node for o in n.output}
        self._ops: dict[tuple, dict[str, SiteResult]] = {}  # technique model -> site -> its op
        self._lock = threading.Lock()

    @staticmethod
    def _input_name(model: onnx.ModelProto) -> str:
        init = {t.name for t in model.graph.initializer}
        return next(i.name for i in model.graph.input if i.name not in init)

    # -- technique models: every site rewritten, settings fed at run time -----------------------
    def technique_model(self, technique: str, variant: tuple = ()):
        """(model, evaluator, runtime defaults) with every site on `technique` at its no-skip setting.

        variant: for spatial, (patch, mask rank): a session's patch size and mask rank are fixed.
        """
        key = (technique, *variant)
        with self._lock:
            if key not in self._tech:
                cfg: dict[str, Any] = {"sites": {}}
                for s in self.sites.values():
                    k = s.w_shape[0]
                    if technique == "spatial":
                        p, rank = variant
                        ones = np.ones((p, p) if rank == 2 else (k, p, p), np.uint8)
                        cfg["sites"][s.name] = {"technique": "spatial", "patch": p, "mask": ones}
                    elif technique == "lazy":
                        cfg["sites"][s.name] = {"technique": "lazy", "ratio": 1.0}
                    elif technique == "early-exit":
                        cfg["sites"][s.name] = {"technique": "early-exit", "mode": "predictive",
                                                "n_terms": np.zeros(k, np.int64), "threshold": np.full(k, -np.inf, np.float32)}
                model, rep = rewrite(self.base, config=cfg, calibration=self.calibration, normalized=True)
                defaults = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                            if t.name in {i.name for i in model.graph.input}}
                self._tech[key] = (model, Evaluator(model, threads=self.threads), defaults)
                self._ops[key] = site_ops(rep)
            return self._tech[key]

    @staticmethod
    def variant(c: Candidate) -> tuple:
        if c.technique != "spatial":
            return ()
        return (int(c.setting["patch"]), np.ndim(c.setting["mask"]))

    def _feeds(self, c: Candidate, defaults: dict[str, np.ndarray], op: SiteResult) -> dict[str, np.ndarray]:
        """All runtime settings at their no-skip defaults except candidate c's site (op: its op in the
        technique model, whose `settings` name the graph inputs that carry them)."""
        feeds = dict(defaults)
        s = self.sites[c.site]
        if c.technique == "spatial":
            feeds[op.settings["mask"]] = np.asarray(c.setting["mask"], np.uint8)
        elif c.technique == "lazy":
            feeds[op.settings["ratio"]] = np.asarray(c.setting["ratio"], np.float32)
        elif c.technique == "early-exit":
            nt, th = self.predictive(s, c.setting)
            feeds[op.settings["n_terms"]], feeds[op.settings["threshold"]] = nt, th
        return feeds

    def predictive(self, s: Site, setting: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(n_terms, threshold) for an early-exit setting; exact = never predicted (Th = -inf).
        Fitted by the early-exit rule's own calibration (once per site and setting)."""
        k = s.w_shape[0]
        if setting.get("mode", "exact") == "exact":
            return np.zeros(k, np.int64), np.full(k, -np.inf, np.float32)
        fit = self.calibration.fit(EarlyExitRule(self.base, has_data=True), s,
                                   {"mode": "predictive", "fraction": float(setting["fraction"]),
                                    "quantile": float(setting["quantile"])})
        return fit["n_terms"], fit["threshold"]

    # -- one candidate ------------------------------------------------------------------------
    def measure(self, c: Candidate) -> Measured:
        """Accuracy and MACs on the calibration split with only c's site changed (settings fed at run time)."""
        s = self.sites[c.site]
        if c.technique == "sparse-quant":
            # pruned weights are constants: one model per candidate (the OBS fit is memoized per site and fraction)
            model, rep = rewrite(self.base, config={"sites": {c.site: {"technique": "sparse-quant", "prune": c.setting["prune"]}}},
                                 calibration=self.calibration, normalized=True)
            op = site_ops(rep)[c.site]
            feeds, key, ev = {}, None, None
        else:
            model, ev, defaults = self.technique_model(c.technique, self.variant(c))
            op = self._ops[(c.technique, *self.variant(c))][c.site]
            feeds, key = self._feeds(c, defaults, op), (c.technique, *self.variant(c), c.site)
        node = next(n for n in model.graph.node if n.name == op.op)
        suffix = self.suffix(model, node, key)
        if suffix is not None:
            logits, site_macs = suffix.run(feeds)
        else:
            r = (ev or Evaluator(model, threads=self.threads)).run(self.x, feeds=feeds)
            logits, site_macs = r.logits, r.site_macs
        macs = site_macs[op.macs_output]
        acc = top1(logits, self.ref)
        return Measured(c.key, c.site, c.technique, jsonable(c.setting), acc, 100.0 * (self.base_accuracy - acc),
                        int(macs), int(s.macs or 0))

    def suffix(self, model: onnx.ModelProto, node: onnx.NodeProto, key: tuple | None) -> "Suffix | None":
        """The part of `model` from the site's op on, fed the float model's cached activations at the cut,
        so a candidate's accuracy run does not recompute the unchanged layers before its site.
        None when the cut needs a tensor the float model does not have (then the whole model runs)."""
        with self._lock:
            if key is not None and key in self._suffix:
                return self._suffix[key]
        nodes = list(model.graph.node)
        i = next(j for j, n in enumerate(nodes) if n.name == node.name)
        inits = {t.name: t for t in model.graph.initializer}
        before = {x.name for x in model.graph.input} | {o for n in nodes[:i] for o in n.output}
        used = {x for n in nodes[i:] for x in n.input if x}
        cut = sorted(x for x in used & before if x not in inits)
        out = None
        # a fixed-batch export may bake its batch into later nodes (Reshape to (B, -1)): it runs whole,
        # in the Evaluator's padded chunks, so MACs stay exact
        if fixed_batch(self.base) is None and all(x in self._base_names for x in cut):
            with self._lock:
                missing = [x for x in cut if x not in self._acts and x != self._input_name(self.base)]
                if missing:
                    self._acts.update(Evaluator(self.base, extra_outputs=missing, threads=self.threads).run(self.x).extras)
                acts = {x: self.x if x == self._input_name(self.base) else self._acts[x] for x in cut}
            if all(a.dtype == np.float32 and len(a) == len(self.x) for a in acts.values()):
                settings = [i for i in model.graph.input if i.name in used and i.name in inits]
                g = helper.make_graph(nodes[i:], "suffix",
                                      [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", *acts[x].shape[1:]])
                                       for x in cut] + settings,
                                      list(model.graph.output), [inits[x] for x in sorted(used) if x in inits])
                m = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
                out = Suffix(m, acts, threads=self.threads)
        if key is not None:
            with self._lock:
                self._suffix[key] = out
        return out

    def materialize(self, site: str, c: dict[str, Any]) -> dict[str, Any]:
        """Early-exit settings become explicit (n_terms, threshold) so a model is self-contained."""
        if c["technique"] == "early-exit" and c.get("mode") == "predictive" and "n_terms" not in c:
            nt, th = self.predictive(self.sites[site], c)
            return {**c, "n_terms": nt, "threshold": th}
        return c

    def deployed(self, config: dict[str, dict[str, Any]]):
        """(model, rewrite report) as `optimize` would emit it for `config` (site -> setting): settings frozen."""
        cfg = {s: self.materialize(s, c) for s, c in config.items()}
        # the calibration's fits (lazy predictors, sparse-quant's pruned weights) are made once per site
        # and setting and reused by every combination
        return rewrite(self.base, config={"sites": cfg}, calibration=self.calibration, normalized=True,
                       runtime_settings=False)

    def combination(self, config: dict[str, dict[str, Any]]) -> tuple[onnx.ModelProto, float, int]:
        """(deployed model, calibration accuracy, MACs per sample of the rewritten sites' ops) of a
        network-level combination, measured as it will be deployed."""
        model, rep = self.deployed(config)
        r = Evaluator(model, threads=self.threads).run(self.x)
        return model, top1(r.logits, self.ref), site_macs(rep, r.site_macs)


class Suffix:
    """One session over the rest of a model, run on cached activations in batches."""

    def __init__(self, model: onnx.ModelProto, acts: dict[str, np.ndarray], *, threads: int, batch_size: int = 250):
        counted, self.macs_outputs = expose_macs(model)
        self.session = session(counted, threads=threads)
        self.acts, self.batch_size = acts, batch_size
        self.logits_name = model.graph.output[0].name
        self.n = len(next(iter(acts.values())))
        self.inputs = {i.name for i in (*self.session.get_inputs(), *self.session.get_overridable_initializers())}

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
        names = [self.logits_name, *self.macs_outputs]
        feeds = {k: v for k, v in feeds.items() if k in self.inputs}  # earlier sites' settings are cut off
        logits, macs = [], dict.fromkeys(self.macs_outputs, 0)
        for i in range(0, self.n, self.batch_size):
            chunk = {**{k: v[i:i + self.batch_size] for k, v in self.acts.items()}, **feeds}
            try:
                out = self.session.run(names, chunk)
            except Exception:
                if self.batch_size == 1 or i > 0:
                    raise
                # a batch declared dynamic that the graph does not honour: one sample at a time, as Evaluator
                self.batch_size = 1
                return self.run(feeds)
            logits.append(out[0])
            for k, v in zip(self.macs_outputs, out[1:]):
                macs[k] += int(v)
        return np.concatenate(logits), {k: v // max(1, self.n) for k, v in macs.items()}


def site_ops(rep: RewriteReport) -> dict[str, SiteResult]:
    """Site name -> where the rewrite put its op (node, MAC output, run-time settings)."""
    return {r.site.name: r for r in rep.rewritten}


def macs_by_site(rep: RewriteReport, site_macs: dict[str, int]) -> dict[str, int]:
    """Per-sample MACs each rewritten site's op reported (its counter output)."""
    return {r.site.name: site_macs.get(r.macs_output, 0) for r in rep.rewritten}


def site_macs(rep: RewriteReport, site_macs: dict[str, int]) -> int:
    return sum(macs_by_site(rep, site_macs).values())
