"""early-exit: Conv+ReLU -> EarlyExitConv (SnaPEA), exact or predictive."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxzero.ops.spec import setting_input
from onnxzero.ops import early_exit as op
from onnxzero.passes.rules.base import Replacement, SiteRule, conv_kwargs
from onnxzero.passes.sites import Site


class EarlyExitRule(SiteRule):
    technique = "early-exit"
    residual = True
    keys = ("mode", "fraction", "quantile", "n_terms", "threshold", "skip_zeros")

    def default_setting(self, site: Site, given: dict[str, Any]) -> dict[str, Any]:
        return {"mode": "exact"}

    def check(self, site: Site, setting: dict[str, Any]) -> str | None:
        mode = setting.get("mode", "exact")
        if mode not in op.MODES:
            return f"early-exit mode {mode!r} is not one of {', '.join(op.MODES)}"
        sz = setting.get("skip_zeros")
        if sz is not None and (mode != "exact" or sz not in op.SKIP_ZEROS or isinstance(sz, bool)):
            return (f"early-exit skip_zeros is {sz!r}, expected -1 (cost model), 0 (dense), 1 (sparse) or 2 (stop), "
                    "in exact mode")
        if mode == "exact" and not site.input_nonneg:
            return f"exact early exit needs a non-negative input, and this one may be negative ({site.nonneg_reason})"
        if mode != "predictive":
            return None
        explicit = [k for k in ("n_terms", "threshold") if k in setting]
        if len(explicit) == 1:
            missing = ({"n_terms", "threshold"} - set(explicit)).pop()
            return f"predictive early exit got {explicit[0]} without {missing}: expected both or neither"
        k = site.w_shape[0]
        if explicit:
            for name in explicit:
                if np.shape(setting[name]) != (k,):
                    return f"predictive {name} has shape {np.shape(setting[name])}, expected ({k},): one per filter"
            return None
        for name in ("fraction", "quantile"):
            v = setting.get(name, op.DEFAULT_FRACTION if name == "fraction" else op.DEFAULT_QUANTILE)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                return f"predictive {name} is {v!r}, expected a number in [0, 1]"
        if not self.has_data:
            return "predictive early exit needs calibration data (--data) or explicit n_terms/threshold"
        return None

    def calibrate(self, site: Site, setting: dict[str, Any], calibration) -> dict[str, Any]:
        if setting.get("mode", "exact") != "predictive" or "n_terms" in setting:
            return {}
        fraction = float(setting.get("fraction", op.DEFAULT_FRACTION))
        quantile = float(setting.get("quantile", op.DEFAULT_QUANTILE))
        # at a residual site the thresholds are fitted on conv + bias + shortcut, what the ReLU sees
        names = [site.x] + ([site.residual] if site.residual else [])
        t = calibration.tensors(names)
        x = t[site.x][:64]
        other = t[site.residual][:64] if site.residual else None
        cal_kw = {k: v for k, v in conv_kwargs(site).items() if k != "kernel_shape"}
        n_terms, threshold = op.calibrate_predictive(x, self.weight(site.w), self.weight(site.b),
                                                     fraction=fraction, quantile=quantile, other=other, **cal_kw)
        return {"n_terms": n_terms, "threshold": threshold}

    def rewrite(self, site: Site, setting: dict[str, Any], fit: dict[str, Any], out_name: str) -> Replacement:
        mode = setting.get("mode", "exact")
        kw = conv_kwargs(site)
        if mode == "exact":
            # skip_zeros: None lets the kernel's cost model pick its sparse or dense path per run
            sz = setting.get("skip_zeros")
            node, inits = op.make_node(site.x, site.w, site.b, out_name, mode="exact", other=site.residual,
                                       skip_zeros=sz, name=f"{site.name}__early_exit", **kw)
            return Replacement([node], inits, setting={"mode": "exact", **({"skip_zeros": sz} if sz is not None else {})})
        if "n_terms" in setting:
            n_terms, threshold = setting["n_terms"], setting["threshold"]
            recorded = {"mode": "predictive", "n_terms": np.asarray(n_terms).tolist(), "threshold": np.asarray(threshold).tolist()}
        else:
            n_terms, threshold = fit["n_terms"], fit["threshold"]
            recorded = {"mode": "predictive", "fraction": float(setting.get("fraction", op.DEFAULT_FRACTION)),
                        "quantile": float(setting.get("quantile", op.DEFAULT_QUANTILE))}
        # n_terms / threshold are runtime inputs with defaults so the optimizer can move them per run
        nt_name, th_name = setting_input(site.name, "n_terms"), setting_input(site.name, "threshold")
        node, inits = op.make_node(site.x, site.w, site.b, out_name, mode="predictive",
                                   nonneg_input=int(site.input_nonneg), n_terms=nt_name, threshold=th_name,
                                   other=site.residual, name=f"{site.name}__early_exit", **kw)
        return Replacement([node], inits,
                           runtime_inputs={nt_name: np.asarray(n_terms, np.int64), th_name: np.asarray(threshold, np.float32)},
                           setting=recorded)
