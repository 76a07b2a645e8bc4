"""Spatial masks at finer granularity than a layer: the paper's uniform-filter, uniform-patch and
max-granularity modes.

Trying every pattern per filter or per patch by forward runs is the combinatorial explosion of
section 5.2.1, so the per-filter / per-patch choice is made from the float model's real activations
on the calibration split (which positions are non-zero after ReLU): for each group (a filter, a
patch position, or both) pick the pattern that skips the most while wrongly zeroing at most
`granularity_threshold` of that group's non-zero outputs. Each resulting layer mask is then a
candidate measured by real runs like any other.
"""

from __future__ import annotations

import numpy as np

from onnxzero.search.candidates import spatial_patterns


def _patches(alive: np.ndarray, p: int) -> np.ndarray:
    """(N, K, OH, OW) bool -> (N, K, PH, PW, p*p), zero-padded margins."""
    N, K, OH, OW = alive.shape
    PH, PW = -(-OH // p), -(-OW // p)
    a = np.zeros((N, K, PH * p, PW * p), bool)
    a[:, :, :OH, :OW] = alive
    return a.reshape(N, K, PH, p, PW, p).transpose(0, 1, 2, 4, 3, 5).reshape(N, K, PH, PW, p * p)


def layer_mask(alive: np.ndarray, p: int, mode: str, ones_range: tuple[int, int], threshold: float) -> np.ndarray:
    """A mask for one site: (K, p, p) for uniform-filter, (K, OH, OW) for the per-patch modes."""
    N, K, OH, OW = alive.shape
    pats = np.stack([m.ravel().astype(bool) for m in spatial_patterns(p, ones_range)])  # (P, p*p)
    a = _patches(alive, p)  # (N, K, PH, PW, q)
    q = p * p
    # per pattern: a patch is predicted dead when none of the pattern's positions is alive
    pred_dead = ~(a[..., None, :] & pats).any(-1)  # (N, K, PH, PW, P)
    lost = (pred_dead * a.sum(-1)[..., None]).astype(np.float64)  # alive outputs wrongly zeroed
    saved = pred_dead * (q - pats.sum(1))  # positions never computed
    axes = {"uniform-filter": (0, 2, 3), "uniform-patch": (0, 1), "max-granularity": (0,)}[mode]
    lost_g, saved_g = lost.sum(axis=axes), saved.sum(axis=axes).astype(np.float64)
    alive_g = a.sum(-1).sum(axis=axes).astype(np.float64)[..., None]
    ok = lost_g <= threshold * np.maximum(alive_g, 1)
    score = np.where(ok, saved_g, -1)
    best = score.argmax(-1)  # pattern index per group
    none = score.max(-1) <= 0  # nothing safe to skip: compute the group in full
    chosen = pats[best].astype(np.uint8)  # (..groups, q)
    chosen[none] = 1
    if mode == "uniform-filter":
        return chosen.reshape(K, p, p)
    PH, PW = a.shape[2], a.shape[3]
    if mode == "uniform-patch":
        chosen = np.broadcast_to(chosen, (K, PH, PW, q))
    full = chosen.reshape(K, PH, PW, p, p).transpose(0, 1, 3, 2, 4).reshape(K, PH * p, PW * p)
    return np.ascontiguousarray(full[:, :OH, :OW])
