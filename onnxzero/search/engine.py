"""Measure candidates by real onnxruntime runs: accuracy and MACs from the ops' own counters on the
calibration split, latency of the site's op in isolation on a real activation.

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

from onnxzero.evaluate import Evaluator, median_latency_ms, session, top1
from onnxzero.ops import early_exit
from onnxzero.passes.rewrite import rewrite
from onnxzero.passes.rules import Calibration
from onnxzero.passes.rules.base import weight
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
    latency_ms: float | None = None        # the site's op alone, batch 1, real activation
    dense_latency_ms: float | None = None  # onnxruntime's Conv+Relu on the same input

    def saved(self, objective: str) -> float:
        if objective == "latency" and self.latency_ms is not None and self.dense_latency_ms is not None:
            return self.dense_latency_ms - self.latency_ms
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
        self._predictive: dict[tuple[str, float, float], tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

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
                model, _ = rewrite(self.base, config=cfg, inputs=self.x, labels=self.ref, normalized=True)
                defaults = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                            if t.name in {i.name for i in model.graph.input}}
                self._tech[key] = (model, Evaluator(model, threads=self.threads), defaults)
            return self._tech[key]

    @staticmethod
    def variant(c: Candidate) -> tuple:
        if c.technique != "spatial":
            return ()
        return (int(c.setting["patch"]), np.ndim(c.setting["mask"]))

    def _feeds(self, c: Candidate, defaults: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All runtime settings at their no-skip defaults except candidate c's site."""
        feeds = dict(defaults)
        s = self.sites[c.site]
        if c.technique == "spatial":
            feeds[f"{s.name}__mask"] = np.asarray(c.setting["mask"], np.uint8)
        elif c.technique == "lazy":
            feeds[f"{s.name}__ratio"] = np.asarray(c.setting["ratio"], np.float32)
        elif c.technique == "early-exit":
            nt, th = self.predictive(s, c.setting)
            feeds[f"{s.name}__n_terms"], feeds[f"{s.name}__threshold"] = nt, th
        return feeds

    def predictive(self, s: Site, setting: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(n_terms, threshold) for an early-exit setting; exact = never predicted (Th = -inf)."""
        k = s.w_shape[0]
        if setting.get("mode", "exact") == "exact":
            return np.zeros(k, np.int64), np.full(k, -np.inf, np.float32)
        key = (s.name, float(setting["fraction"]), float(setting["quantile"]))
        with self._lock:
            if key not in self._predictive:
                x = self.calibration.tensors([s.x])[s.x][:32]
                kw = {"strides": s.strides, "dilations": s.dilations, "group": s.group}
                kw.update({"pads": s.pads} if s.pads is not None else {"auto_pad": s.auto_pad})
                self._predictive[key] = early_exit.calibrate_predictive(
                    x, weight(self.base, s.w), weight(self.base, s.b), fraction=key[1], quantile=key[2], **kw)
            return self._predictive[key]

    # -- one candidate ------------------------------------------------------------------------
    def measure(self, c: Candidate, *, latency: bool) -> Measured:
        s = self.sites[c.site]
        if c.technique == "sparse-quant":
            model, _ = rewrite(self.base, config={"sites": {c.site: {"technique": "sparse-quant", "prune": c.setting["prune"]}}},
                               normalized=True)
            ev, feeds = Evaluator(model, threads=self.threads), {}
        else:
            model, ev, defaults = self.technique_model(c.technique, self.variant(c))
            feeds = self._feeds(c, defaults)
        r = ev.run(self.x, feeds=feeds)
        node = _site_node(model, s)
        macs = r.site_macs[node.output[1]] if len(node.output) > 1 and node.output[1] in r.site_macs else \
            next(v for k, v in r.site_macs.items() if k.startswith(node.output[0]))
        acc = top1(r.logits, self.ref)
        m = Measured(c.key, c.site, c.technique, _jsonable(c.setting), acc, 100.0 * (self.base_accuracy - acc),
                     int(macs), int(s.macs or 0))
        if latency:
            m.latency_ms, m.dense_latency_ms = self.site_latency(model, s, feeds)
        return m

    def site_latency(self, model: onnx.ModelProto, s: Site, feeds: dict[str, np.ndarray],
                     *, runs: int = 15) -> tuple[float, float]:
        """(op, onnxruntime Conv+Relu) median latency of this site alone on a real batch-1 activation."""
        x = self.calibration.tensors([s.x])[s.x][:1]
        node = _site_node(model, s)
        op_model = _single_node_model(model, node, s, with_inputs=[n for n in node.input[1:] if n in feeds])
        op_sess = session(op_model, threads=self.threads)
        op_feeds = {s.x: x, **{n: feeds[n] for n in node.input[1:] if n in feeds}}
        conv = helper.make_node("Conv", [s.x, s.w] + ([s.b] if s.b else []), ["c"], strides=list(s.strides),
                                dilations=list(s.dilations), group=s.group,
                                **({"pads": list(s.pads)} if s.pads is not None else {"auto_pad": s.auto_pad}))
        relu = helper.make_node("Relu", ["c"], [s.y])
        inits = [numpy_helper.from_array(weight(self.base, n), n) for n in (s.w, s.b) if n]
        g = helper.make_graph([conv, relu], "dense", [helper.make_tensor_value_info(s.x, onnx.TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(s.y, onnx.TensorProto.FLOAT, None)], inits)
        dense = session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), threads=self.threads, library=False)
        a, b = [], []
        for _ in range(3):  # interleave so machine noise hits both alike
            a.append(median_latency_ms(op_sess, op_feeds, runs=runs))
            b.append(median_latency_ms(dense, {s.x: x}, runs=runs))
        return float(np.median(a)), float(np.median(b))


def _site_node(model: onnx.ModelProto, s: Site) -> onnx.NodeProto:
    prefix = f"{s.name}__"
    for n in model.graph.node:
        if n.name.startswith(prefix) and n.domain:
            return n
    raise KeyError(f"no op for site {s.name}")


def _single_node_model(model: onnx.ModelProto, node: onnx.NodeProto, s: Site, *, with_inputs: list[str]) -> onnx.ModelProto:
    inits = {t.name: t for t in model.graph.initializer}
    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.output[1:]
    graph_inputs = [helper.make_tensor_value_info(s.x, onnx.TensorProto.FLOAT, None)]
    consts = []
    for name in n.input[1:]:
        if not name:
            continue
        if name in with_inputs:
            t = inits[name]
            graph_inputs.append(helper.make_tensor_value_info(name, t.data_type, None))
        elif name in inits:
            consts.append(inits[name])
    g = helper.make_graph([n], "site", graph_inputs, [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)], consts)
    return helper.make_model(g, opset_imports=list(model.opset_import))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return np.asarray(v).tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None if np.isnan(v) else (1e308 if v > 0 else -1e308)  # strict JSON has no inf
    return v
