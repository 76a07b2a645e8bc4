"""What every technique rule shares: the Replacement it returns, calibration data, conv attributes.

A rule works in three steps, each with its own inputs, so the expensive one can be reused:
check(site, setting) -> a reason it must not fire, or None (no data, no inference);
calibrate(site, setting, calibration) -> the fitted part of the site's plan (predictor weights,
thresholds: the only step that runs inference, memoized by Calibration per site and setting, so a
search that rewrites the same site with the same setting in many combinations fits it once);
rewrite(site, setting, fit, out_name) -> the Replacement (pure: the site, its weights, the fit).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import json
import threading
from collections.abc import Callable, Hashable

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxzero.passes.sites import Site


@dataclass
class Replacement:
    """What replaces one site's Conv and activation nodes."""

    nodes: list[onnx.NodeProto]
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    # graph inputs with a default value (initializer of the same name): settings a deployment or
    # the optimizer may change per run without editing the model
    runtime_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    drop_initializers: list[str] = field(default_factory=list)  # e.g. the dense W that sparse-quant replaces
    setting: dict[str, Any] = field(default_factory=dict)  # the resolved, JSON-able setting (provenance)
    stats: dict[str, Any] = field(default_factory=dict)  # per-site figures for the report


class Calibration:
    """Intermediate tensors of the normalized float model on calibration data, computed on demand."""

    def __init__(self, model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray | None = None,
                 *, max_samples: int = 256):
        self.model = model
        self.all_inputs, self.all_labels = inputs, labels
        self.inputs = inputs[:max_samples]  # for activations: enough to fit and calibrate
        self._cache: dict[str, np.ndarray] = {}
        self._reference: np.ndarray | None = None
        self._fits: dict[Hashable, Any] = {}
        self._lock = threading.RLock()  # the search's threads share one Calibration

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """compute() once per key for this model and data (fits depend on nothing else)."""
        with self._lock:
            if key not in self._fits:
                self._fits[key] = compute()
            return self._fits[key]

    def fit(self, rule: "SiteRule", site: Site, setting: dict[str, Any]) -> dict[str, Any]:
        """rule.calibrate(site, setting, self), once per (site, technique, setting)."""
        from onnxzero.emit import jsonable

        key = ("fit", site.name, rule.technique, json.dumps(jsonable(setting), sort_keys=True))
        return self.memo(key, lambda: rule.calibrate(site, setting, self))

    def tensors(self, names: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            missing = [n for n in names if n not in self._cache]
            if missing:
                from onnxzero.evaluate import Evaluator

                ev = Evaluator(self.model, extra_outputs=missing)
                self._cache.update(ev.run(self.inputs).extras)
            return {n: self._cache[n] for n in names}

    def reference_labels(self) -> np.ndarray:
        """Labels if the data has them, else the float model's own top-1 (eps then bounds disagreement)."""
        if self.all_labels is not None:
            return self.all_labels
        if self._reference is None:
            from onnxzero.evaluate import Evaluator

            self._reference = np.argmax(Evaluator(self.model).run(self.all_inputs).logits, axis=1)
        return self._reference

    def sensitivity(self, w_name: str, candidates: list[tuple[float, float]],
                    transform, *, stop_above: float | None = None,
                    max_samples: int = 500) -> list[tuple[float, float, float]]:
        """[(fraction, threshold, top-1 loss in points)] with only weight `w_name` = transform(threshold).

        The weight becomes a graph input of one session, so every candidate is one real forward
        pass of the data set, not a session rebuild.
        """
        from onnxzero.evaluate import Evaluator, top1

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        init = next(i for i in m.graph.initializer if i.name == w_name)
        m.graph.input.append(onnx.helper.make_tensor_value_info(w_name, init.data_type, list(init.dims)))
        m.graph.initializer.remove(init)
        ev = Evaluator(m)
        x, labels = self.all_inputs[:max_samples], self.reference_labels()[:max_samples]
        base = top1(ev.run(x, feeds={w_name: weight(self.model, w_name)}).logits, labels)
        out = []
        for fraction, thr in candidates:
            acc = top1(ev.run(x, feeds={w_name: transform(thr).astype(np.float32)}).logits, labels)
            out.append((fraction, thr, 100.0 * (base - acc)))
            if stop_above is not None and out[-1][2] > stop_above:
                break
        return out


def weight(model: onnx.ModelProto | ir.Model, name: str | None) -> np.ndarray | None:
    if not name:
        return None
    if isinstance(model, ir.Model):
        v = model.graph.initializers.get(name)
        if v is None or v.const_value is None:
            raise KeyError(name)
        return v.const_value.numpy()
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


def conv_kwargs(site: Site) -> dict[str, Any]:
    """The site's Conv attributes as the ops' make_node functions take them."""
    kw: dict[str, Any] = {"kernel_shape": list(site.kernel_shape), "strides": list(site.strides),
                          "dilations": list(site.dilations), "group": int(site.group)}
    if site.pads is not None:
        kw["pads"] = list(site.pads)
    else:
        kw["auto_pad"] = site.auto_pad
    return kw


class SiteRule(ABC):
    """A technique: `check` a site and setting, `calibrate` it (the data-dependent part of its plan),
    `rewrite` it. One instance per rewrite call; `model` (proto or IR) is read for its weights only."""

    technique: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ()  # the settings this technique understands
    needs_data: ClassVar[bool] = False
    # The rule passes a residual site's `other` tensor to its op (ReLU(conv + bias + other)).
    residual: ClassVar[bool] = False

    def __init__(self, model: onnx.ModelProto | ir.Model, *, has_data: bool = False):
        self.model = model
        self.has_data = has_data

    def weight(self, name: str | None) -> np.ndarray | None:
        return weight(self.model, name)

    def default_setting(self, site: Site, given: dict[str, Any]) -> dict[str, Any]:
        """Settings to fill in where `given` (the config's) is silent."""
        return {}

    def check(self, site: Site, setting: dict[str, Any]) -> str | None:
        """A one-line reason this rule must not rewrite `site` with `setting`, or None."""
        if self.needs_data and not self.has_data:
            return f"{self.technique} needs calibration data (--data FILE.npz)"
        return None

    def calibrate(self, site: Site, setting: dict[str, Any], calibration: Calibration | None) -> dict[str, Any]:
        """What rewrite needs beyond the site, its weights and its setting (check has passed;
        `calibration` is None where the rewrite has no data)."""
        return {}

    @abstractmethod
    def rewrite(self, site: Site, setting: dict[str, Any], fit: dict[str, Any], out_name: str) -> Replacement:
        """Nodes computing `out_name` = the site's activation (before any Clip upper bound)."""
