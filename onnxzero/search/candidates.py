"""The settings the search tries for each site and technique (the first-level options)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxzero.passes.rules.sparse_quant import PRUNE_FRACTIONS as RULE_PRUNE_FRACTIONS
from onnxzero.passes.sites import Site

# The paper's 2^(p^2) - 2 singleton patterns are filtered by --ones-range.
LAZY_RATIOS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)
# The search's pruning levels: five points of the rewrite rule's finer sensitivity grid (the rule
# bisects a loss bound; the search pays an accuracy run per level and site, so it samples fewer),
# each pruning at least half of a site's weights, and all on the grid (asserted here).
PRUNE_FRACTIONS = (0.5, 0.7, 0.8, 0.9, 0.95)
assert set(PRUNE_FRACTIONS) <= set(RULE_PRUNE_FRACTIONS)
PREDICTIVE = ((0.5, 0.02), (0.5, 0.1), (0.25, 0.05), (0.25, 0.15))  # (fraction of terms N, quantile for Th)


@dataclass(frozen=True)
class Candidate:
    site: str
    technique: str
    setting: dict[str, Any] = field(hash=False, compare=False)
    key: str = ""  # stable id: site|technique|setting, the resume cache's key

    @staticmethod
    def make(site: str, technique: str, setting: dict[str, Any]) -> "Candidate":
        s = ",".join(f"{k}={_short(v)}" for k, v in sorted(setting.items()))
        return Candidate(site, technique, setting, f"{site}|{technique}|{s}")


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return "".join(str(int(x)) for x in np.asarray(v).ravel()) if np.asarray(v).size <= 64 else f"array{np.shape(v)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def spatial_patterns(p: int, ones_range: tuple[int, int]) -> list[np.ndarray]:
    """Every p x p 0/1 pattern whose number of ones is in ones_range (never all-zero or all-ones)."""
    lo, hi = max(1, ones_range[0]), min(p * p - 1, ones_range[1])
    out = []
    for ones in range(lo, hi + 1):
        for pos in itertools.combinations(range(p * p), ones):
            m = np.zeros(p * p, np.uint8)
            m[list(pos)] = 1
            out.append(m.reshape(p, p))
    return out


def first_level(site: Site, technique: str, *, patch_sizes: tuple[int, ...], ones_range: tuple[int, int]) -> list[Candidate]:
    if technique == "spatial":
        return [Candidate.make(site.name, "spatial", {"patch": p, "mask": m.tolist()})
                for p in patch_sizes for m in spatial_patterns(p, ones_range)]
    if technique == "lazy":
        return [Candidate.make(site.name, "lazy", {"ratio": r}) for r in LAZY_RATIOS]
    if technique == "sparse-quant":
        return [Candidate.make(site.name, "sparse-quant", {"prune": f}) for f in PRUNE_FRACTIONS]
    if technique == "early-exit":
        out = [Candidate.make(site.name, "early-exit", {"mode": "exact"})] if site.input_nonneg else []
        out += [Candidate.make(site.name, "early-exit", {"mode": "predictive", "fraction": f, "quantile": q})
                for f, q in PREDICTIVE]
        return out
    raise ValueError(technique)


def search_space(engine, sites: list[Site], o) -> list[Candidate]:
    """Every first-level candidate of the search: each site x enabled technique x setting. The finer
    spatial modes derive their masks from the calibration split's activations (engine.calibration)."""
    from onnxzero.search.spatial_modes import layer_mask  # spatial_modes builds on spatial_patterns above

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


def site_config(c: Candidate) -> dict[str, Any]:
    """A candidate as one site's entry of a rewrite config ({"technique", setting...})."""
    setting = dict(c.setting)
    setting.pop("granularity", None)
    return {"technique": c.technique, **setting}


def aggressiveness(c: Candidate) -> float:
    """Orders a (site, technique)'s settings by how much work they may skip (higher skips more)."""
    if c.technique == "lazy":
        return -float(c.setting["ratio"])
    if c.technique == "sparse-quant":
        return float(c.setting["prune"])
    if c.technique == "spatial":
        return -float(np.mean(c.setting["mask"]))  # fewer positions computed first
    if c.setting.get("mode") == "exact":
        return 0.0
    return float(c.setting["quantile"]) + 1.0 - float(c.setting["fraction"])  # earlier and bolder prediction
