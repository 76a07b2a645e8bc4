"""spatial: Conv+ReLU -> SpatialConv with a prediction mask per layer, per filter or per patch."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxzero.ops.spec import setting_input
from onnxzero.ops import spatial as op
from onnxzero.passes.rules.base import Replacement, SiteRule, conv_kwargs
from onnxzero.passes.sites import Site

# Without a mask in the config: 2x2 patches, predict from the diagonal (2 of 4 computed first).
DEFAULT_PATCH = 2


class SpatialRule(SiteRule):
    technique = "spatial"
    residual = True
    keys = ("patch", "mask")

    def default_setting(self, site: Site, given: dict[str, Any]) -> dict[str, Any]:
        p = given.get("patch", DEFAULT_PATCH)
        return {"patch": p, "mask": op.diagonal_mask(p).tolist()} if p in op.PATCH_SIZES else {"patch": p}

    def _mask(self, site: Site, setting: dict[str, Any]) -> np.ndarray:
        return np.asarray(setting.get("mask", op.diagonal_mask(int(setting.get("patch", DEFAULT_PATCH)))), np.uint8)

    def check(self, site: Site, setting: dict[str, Any]) -> str | None:
        p = setting.get("patch", DEFAULT_PATCH)
        if p not in op.PATCH_SIZES:
            return f"spatial patch {p!r} is not one of {op.PATCH_SIZES}"
        K, OH, OW = site.y_shape
        if not isinstance(OH, int) or not isinstance(OW, int):
            if np.ndim(setting.get("mask", [[1]])) == 3 and np.shape(setting["mask"])[1:] != (p, p):
                return "a per-patch spatial mask needs static output sizes"
            return None
        try:
            op.validate_mask(self._mask(site, setting), K, OH, OW, p)
        except (ValueError, TypeError) as e:
            return str(e)
        return None

    def rewrite(self, site: Site, setting: dict[str, Any], fit: dict[str, Any], out_name: str) -> Replacement:
        p = int(setting.get("patch", DEFAULT_PATCH))
        mask = self._mask(site, setting)
        mask_name = setting_input(site.name, "mask")
        node, inits = op.make_node(site.x, site.w, site.b, out_name, patch=p, mask_name=mask_name,
                                   name=f"{site.name}__spatial", other=site.residual, **conv_kwargs(site))
        return Replacement([node], inits, runtime_inputs={mask_name: mask},
                           setting={"patch": p, "mask_shape": list(mask.shape), "mask_ones": float(mask.mean())})
