"""early-exit: Conv+ReLU -> EarlyExitConv (SnaPEA), exact or predictive."""

from __future__ import annotations

from typing import Any

from onnxzero.ops import early_exit as op
from onnxzero.passes.rules.base import Replacement, SiteRule, conv_kwargs, weight
from onnxzero.passes.sites import Site


class EarlyExitRule(SiteRule):
    technique = "early-exit"

    def default_setting(self, site: Site) -> dict[str, Any]:
        return {"mode": "exact"}

    def check(self, site: Site, setting: dict[str, Any]) -> str | None:
        mode = setting.get("mode", "exact")
        if mode not in op.MODES:
            return f"early-exit mode {mode!r} is not one of {', '.join(op.MODES)}"
        if mode == "exact" and not site.input_nonneg:
            return f"exact early exit needs a non-negative input, and this one may be negative ({site.nonneg_reason})"
        if mode == "predictive" and self.calibration is None and "n_terms" not in setting:
            return "predictive early exit needs calibration data (--data) or explicit n_terms/threshold"
        return None

    def rewrite(self, site: Site, setting: dict[str, Any], out_name: str) -> Replacement:
        mode = setting.get("mode", "exact")
        kw = conv_kwargs(site)
        if mode == "exact":
            node, inits = op.make_node(site.x, site.w, site.b, out_name, mode="exact", name=f"{site.name}__early_exit", **kw)
            return Replacement([node], inits, setting={"mode": "exact"})
        fraction = float(setting.get("fraction", 0.25))
        quantile = float(setting.get("quantile", 0.05))
        if "n_terms" in setting:
            n_terms, threshold = setting["n_terms"], setting["threshold"]
        else:
            x = self.calibration.tensors([site.x])[site.x][:64]
            cal_kw = {k: v for k, v in kw.items() if k != "kernel_shape"}
            n_terms, threshold = op.calibrate_predictive(x, weight(self.model, site.w), weight(self.model, site.b),
                                                         fraction=fraction, quantile=quantile, **cal_kw)
        # n_terms / threshold are runtime inputs with defaults so the optimizer can move them per run
        nt_name, th_name = f"{site.name}__n_terms", f"{site.name}__threshold"
        node, inits = op.make_node(site.x, site.w, site.b, out_name, mode="predictive",
                                   nonneg_input=int(site.input_nonneg), n_terms=nt_name, threshold=th_name,
                                   name=f"{site.name}__early_exit", **kw)
        import numpy as np

        return Replacement([node], inits,
                           runtime_inputs={nt_name: np.asarray(n_terms, np.int64), th_name: np.asarray(threshold, np.float32)},
                           setting={"mode": "predictive", "fraction": fraction, "quantile": quantile})
