"""lazy: Conv+ReLU -> LazyConv, with its strength predictor fitted on calibration data."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxzero.ops.spec import setting_input
from onnxzero.ops import lazy as op
from onnxzero.passes.rules.base import Replacement, SiteRule, conv_kwargs
from onnxzero.passes.sites import Site


class LazyRule(SiteRule):
    technique = "lazy"
    residual = True
    keys = ("ratio",)
    needs_data = True

    def default_setting(self, site: Site, given: dict[str, Any]) -> dict[str, Any]:
        return {"ratio": 0.75}

    def check(self, site: Site, setting: dict[str, Any]) -> str | None:
        reason = super().check(site, setting)
        if reason:
            return reason
        r = setting.get("ratio", 0.75)
        if not isinstance(r, (int, float)) or not 0 < r <= 1:
            return f"lazy ratio {r!r} is outside (0, 1]"
        return None

    def calibrate(self, site: Site, setting: dict[str, Any], calibration) -> dict[str, Any]:
        ratio = float(setting.get("ratio", 0.75))
        # A residual site predicts the strengths of the sum from the input's and the shortcut's
        # strengths (the op's pred_W is then (C + K, K)).
        names = [site.x, site.y] + ([site.residual] if site.residual else [])

        def fit():  # independent of the ratio: one fit per site
            t = calibration.tensors(names)
            s_prev = op.predictor_input(t[site.x], t[site.residual] if site.residual else None)
            s = op.activation_strength(t[site.y])
            pred_w, pred_b = op.fit_predictor(s_prev, s, iters=10)  # IRLS converges to ~1e-3 MAE by then
            pred_v = None
            # The kernel reads the predictor per image: a low rank that ranks as well replaces it.
            low = op.factor_predictor(pred_w, pred_b, s_prev, s)
            if low is not None:
                pred_w, pred_v = low
            return pred_w, pred_b, pred_v, op.predict(s_prev, pred_w, pred_b, pred_v), s

        pred_w, pred_b, pred_v, predicted, s = calibration.memo(("lazy predictor", site.name), fit)
        return {"pred_w": pred_w, "pred_b": pred_b, "pred_v": pred_v,
                "top_n_hit_rate": op.top_n_hit_rate(predicted, s, ratio)}

    def rewrite(self, site: Site, setting: dict[str, Any], fit: dict[str, Any], out_name: str) -> Replacement:
        ratio = float(setting.get("ratio", 0.75))
        ratio_name = setting_input(site.name, "ratio")
        node, inits = op.make_node(site.x, site.w, site.b, out_name, pred_w=fit["pred_w"], pred_b=fit["pred_b"],
                                   ratio=ratio, ratio_input=ratio_name, name=f"{site.name}__lazy", other=site.residual,
                                   pred_v=fit.get("pred_v"), **conv_kwargs(site))
        return Replacement([node], inits, runtime_inputs={ratio_name: np.asarray(ratio, np.float32)},
                           setting={"ratio": ratio},
                           stats={"top_n_hit_rate": fit["top_n_hit_rate"],
                                  **({} if fit.get("pred_v") is None else {"predictor_rank": len(fit["pred_v"])})})
