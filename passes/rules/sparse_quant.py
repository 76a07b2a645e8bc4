"""sparse-quant: Conv+ReLU -> SparseQuantConv (pruned, 8-bit dynamic fixed point, relative index).

The pruning threshold comes from the setting, or from a per-layer sensitivity analysis on the
calibration data: the largest magnitude threshold whose top-1 loss, with only this layer pruned
and quantized, stays within `max_loss` percentage points.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxzero.ops import sparse_quant as op
from onnxzero.passes.rules.base import Replacement, SiteRule, conv_kwargs
from onnxzero.passes.sites import Site

# Candidate pruned fractions for the sensitivity analysis, most aggressive first.
PRUNE_FRACTIONS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


class SparseQuantRule(SiteRule):
    technique = "sparse-quant"
    residual = True
    keys = ("threshold", "prune", "max_loss")

    def default_setting(self, site: Site, given: dict[str, Any]) -> dict[str, Any]:
        return {"max_loss": 1.0}

    def check(self, site: Site, setting: dict[str, Any]) -> str | None:
        for k, lo, hi in (("threshold", 0, float("inf")), ("prune", 0, 1), ("max_loss", 0, 100)):
            v = setting.get(k)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi):
                return f"sparse-quant {k} is {v!r}, expected a number in [{lo}, {hi}]"
        if "threshold" not in setting and "prune" not in setting and not self.has_data:
            return "sparse-quant needs calibration data (--data) for its sensitivity analysis, or a threshold/prune setting"
        return None

    def calibrate(self, site: Site, setting: dict[str, Any], calibration) -> dict[str, Any]:
        """The pruning threshold: given, at a pruned fraction, or from the sensitivity analysis."""
        if "threshold" in setting:
            return {"threshold": float(setting["threshold"])}
        w = self.weight(site.w)
        mags = np.sort(np.abs(w).ravel())
        if "prune" in setting:
            return {"threshold": _threshold_at(mags, float(setting["prune"]))}
        max_loss = float(setting.get("max_loss", 1.0))
        # Least aggressive first, stopping at the first fraction over the bound: loss grows with
        # the pruned fraction, so this finds the largest passing threshold in few forward passes.
        candidates = [(f, _threshold_at(mags, f)) for f in sorted(PRUNE_FRACTIONS)]
        sens = calibration.sensitivity(site.w, candidates, lambda thr: op.decompress(op.compress(w, threshold=thr)),
                                       stop_above=max_loss)
        passing = [(f, thr) for f, thr, loss in sens if loss <= max_loss]
        return {"threshold": passing[-1][1] if passing else 0.0,
                "stats": {"sensitivity": [[f, lo] for f, _, lo in sens], "max_loss": max_loss}}

    def rewrite(self, site: Site, setting: dict[str, Any], fit: dict[str, Any], out_name: str) -> Replacement:
        w = self.weight(site.w)
        thr = fit["threshold"]
        comp = op.compress(w, threshold=thr)
        # initializers named after the site, not the weight: two sites may share one weight
        node, inits = op.make_node(site.x, f"{site.name}__w", site.b, out_name, compressed=comp, other=site.residual,
                                   name=f"{site.name}__sparse_quant", **conv_kwargs(site))
        # what the kernel multiplies per output position: the nonzeros, or every weight when it takes
        # the dense path (above op.dense_above(positions, ...) nonzeros, where that is faster)
        oh, ow = site.y_shape[1:]
        positions = oh * ow if isinstance(oh, int) and isinstance(ow, int) else None
        stats = {**op.compression_stats(w, comp), "macs_per_position": op.kernel_macs_per_position(comp, positions=positions)}
        return Replacement([node], inits, drop_initializers=[site.w],
                           setting={"threshold": thr, "frac_bits": comp["frac_bits"]}, stats={**stats, **fit.get("stats", {})})


def _threshold_at(sorted_mags: np.ndarray, fraction: float) -> float:
    """The magnitude threshold that prunes about `fraction` of the weights (0 prunes none)."""
    if fraction <= 0:
        return 0.0
    i = min(len(sorted_mags) - 1, int(round(fraction * len(sorted_mags))))
    return float(np.nextafter(sorted_mags[i - 1], np.inf)) if i > 0 else 0.0
