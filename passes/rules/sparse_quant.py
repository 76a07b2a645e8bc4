"""sparse-quant: Conv+ReLU -> SparseQuantConv (pruned, 8-bit dynamic fixed point, relative index).

The pruned fraction comes from the setting, or from a per-layer sensitivity analysis on the
calibration data: the largest fraction whose top-1 loss, with only this layer pruned and quantized,
stays within `max_loss` percentage points.

Which weights go, and what the survivors become: the paper prunes by magnitude and then retrains for
up to 10 epochs to win the accuracy back. The deployed model has no training loop, so with calibration
data the rule does the retraining's job layer by layer instead: Optimal Brain Surgeon pruning as
SparseGPT runs it (Frantar & Alistarh 2023, Algorithm 1), which removes the weights whose loss in the
layer's own output (||W X - W' X||^2 over the calibration inputs X) is smallest and updates the
remaining weights of each filter to compensate. On resnet18-mnist, 80 % of every 3x3 site's weights
pruned this way costs 0.4 points of top-1 where magnitude pruning leaves 20 % (docs/design.md). Without
data, or with an explicit `threshold`, it is the paper's magnitude pruning (`method: magnitude`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from onnxzero.ops import sparse_quant as op
from onnxzero.ops.early_exit import im2col
from onnxzero.passes.rules.base import Replacement, SiteRule, conv_kwargs
from onnxzero.passes.sites import Site

METHODS = ("obs", "magnitude")
# compress's threshold for weights already pruned to exact zeros: every nonzero is kept
KEEP_NONZERO = float(np.finfo(np.float32).tiny)
# Candidate pruned fractions for the sensitivity analysis, most aggressive first.
PRUNE_FRACTIONS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


class SparseQuantRule(SiteRule):
    technique = "sparse-quant"
    residual = True
    keys = ("threshold", "prune", "max_loss", "method")

    def default_setting(self, site: Site, given: dict[str, Any]) -> dict[str, Any]:
        return {"max_loss": 1.0}

    def check(self, site: Site, setting: dict[str, Any]) -> str | None:
        for k, lo, hi in (("threshold", 0, float("inf")), ("prune", 0, 1), ("max_loss", 0, 100)):
            v = setting.get(k)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi):
                return f"sparse-quant {k} is {v!r}, expected a number in [{lo}, {hi}]"
        method = setting.get("method")
        if method is not None and method not in METHODS:
            return f"sparse-quant method is {method!r}, expected one of {', '.join(METHODS)}"
        if method == "obs" and "threshold" in setting:
            return "sparse-quant method obs takes a prune fraction or max_loss, not a magnitude threshold"
        if method == "obs" and not self.has_data:
            return "sparse-quant method obs needs calibration data (--data) for the layer's inputs"
        if "threshold" not in setting and "prune" not in setting and not self.has_data:
            return "sparse-quant needs calibration data (--data) for its sensitivity analysis, or a threshold/prune setting"
        return None

    def calibrate(self, site: Site, setting: dict[str, Any], calibration) -> dict[str, Any]:
        """magnitude: the pruning threshold (given, at a pruned fraction, or from the sensitivity
        analysis); obs: the pruned and updated weights (at the fraction, or from the analysis)."""
        if "threshold" in setting:
            return {"threshold": float(setting["threshold"])}
        w = self.weight(site.w)
        method = setting.get("method") or ("obs" if calibration is not None else "magnitude")
        if method == "obs":
            def pruned(f: float) -> np.ndarray:
                return calibration.memo(("obs prune", site.name, f),
                                        lambda: obs_prune(w, input_gram(site, calibration), f, group=site.group))

            def fit_at(f: float) -> dict[str, Any]:
                return {"weights": pruned(f), "method": "obs", "prune": f}

            def transform(f: float) -> np.ndarray:
                return op.decompress(op.compress(pruned(f), threshold=KEEP_NONZERO))
        else:
            mags = np.sort(np.abs(w).ravel())

            def fit_at(f: float) -> dict[str, Any]:
                return {"threshold": _threshold_at(mags, f)}

            def transform(f: float) -> np.ndarray:
                return op.decompress(op.compress(w, threshold=_threshold_at(mags, f)))
        if "prune" in setting:
            return fit_at(float(setting["prune"]))
        max_loss = float(setting.get("max_loss", 1.0))
        # Least aggressive first, stopping at the first fraction over the bound: loss grows with
        # the pruned fraction, so this finds the largest passing fraction in few forward passes.
        sens = calibration.sensitivity(site.w, [(f, f) for f in sorted(PRUNE_FRACTIONS)], transform,
                                       stop_above=max_loss)
        passing = [f for f, _, loss in sens if loss <= max_loss]
        return {**fit_at(passing[-1] if passing else 0.0),
                "stats": {"method": method, "sensitivity": [[f, lo] for f, _, lo in sens], "max_loss": max_loss}}

    def rewrite(self, site: Site, setting: dict[str, Any], fit: dict[str, Any], out_name: str) -> Replacement:
        w = self.weight(site.w)
        pruned = fit.get("weights")
        thr = KEEP_NONZERO if pruned is not None else fit["threshold"]
        comp = op.compress(w if pruned is None else pruned, threshold=thr)
        # initializers named after the site, not the weight: two sites may share one weight
        node, inits = op.make_node(site.x, f"{site.name}__w", site.b, out_name, compressed=comp, other=site.residual,
                                   name=f"{site.name}__sparse_quant", **conv_kwargs(site))
        # what the kernel multiplies per output position: the nonzeros, or every weight when it takes
        # the dense path (above op.dense_above(positions, ...) nonzeros, where that is faster)
        oh, ow = site.y_shape[1:]
        positions = oh * ow if isinstance(oh, int) and isinstance(ow, int) else None
        stats = {**op.compression_stats(w, comp), "macs_per_position": op.kernel_macs_per_position(comp, positions=positions)}
        return Replacement([node], inits, drop_initializers=[site.w],
                           setting={"threshold": thr, "frac_bits": comp["frac_bits"]} if pruned is None else
                           {"prune": fit["prune"], "method": fit["method"], "frac_bits": comp["frac_bits"]},
                           stats={**stats, **fit.get("stats", {})})


def input_gram(site: Site, calibration) -> list[np.ndarray]:
    """Per group, H = X X^T / n over the calibration inputs' im2col columns X (C/group*KH*KW rows):
    the layer's output error ||(W - W') X||^2 is (W - W') H (W - W')^T, all OBS needs of the data."""
    def compute() -> list[np.ndarray]:
        x = calibration.tensors([site.x])[site.x]
        K, cg, kh, kw = site.w_shape
        d = cg * kh * kw
        grams = [np.zeros((d, d)) for _ in range(site.group)]
        n = 0
        for i in range(0, len(x), 16):  # im2col of a whole calibration set would not fit in memory
            cols, _ = im2col(x[i:i + 16], site.w_shape, strides=site.strides, pads=site.pads or (0, 0, 0, 0),
                             dilations=site.dilations, group=site.group, auto_pad=site.auto_pad)
            for g in range(site.group):
                c = cols[:, g].transpose(0, 2, 1).reshape(-1, d)
                grams[g] += c.T @ c
            n += cols.shape[0] * cols.shape[3]
        return [h / max(n, 1) for h in grams]

    return calibration.memo(("input gram", site.name), compute)


def obs_prune(w: np.ndarray, grams: list[np.ndarray], fraction: float, *, group: int = 1,
              block: int = 128, damp: float = 0.01) -> np.ndarray:
    """w (K, C/group, KH, KW) with `fraction` of its weights zeroed and the rest updated to keep the
    layer's output on the calibration inputs: SparseGPT's Algorithm 1 (OBS with one shared inverse
    Hessian, columns left to right, the mask chosen per block of `block` columns by w^2 / [H^-1]_jj^2).
    A weight whose input is always zero goes first, at no cost."""
    K = w.shape[0]
    flat = np.asarray(w, np.float64).reshape(K, -1).copy()
    if fraction <= 0:
        return np.asarray(w, np.float32).copy()
    kg = K // group
    for g in range(group):
        flat[g * kg:(g + 1) * kg] = _obs_rows(flat[g * kg:(g + 1) * kg], grams[g], fraction, block, damp)
    return flat.reshape(w.shape).astype(np.float32)


def _obs_rows(W: np.ndarray, H: np.ndarray, fraction: float, block: int, damp: float) -> np.ndarray:
    d = W.shape[1]
    H = H.copy()
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(d)] += damp * max(float(np.mean(np.diag(H))), 1e-12)
    # U: the upper Cholesky factor of H^-1 (H^-1 = U^T U); row j of U from j on is what removing
    # column j propagates to the columns after it. With J the reversal, J H J = M M^T gives
    # U = J M^-1 J: one Cholesky and one triangular inverse, 2.8x faster than inverting H first (d = 4608).
    M = np.linalg.cholesky(H[::-1, ::-1])
    Minv, info = scipy.linalg.lapack.dtrtri(M, lower=1)
    if info != 0:
        raise RuntimeError(f"sparse-quant obs: the damped input Gram matrix is singular (dtrtri info {info})")
    U = np.ascontiguousarray(Minv[::-1, ::-1])
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        W1, U1 = W[:, i1:i2].copy(), U[i1:i2, i1:i2]
        score = W1 ** 2 / np.diag(U1)[None, :] ** 2
        score[:, dead[i1:i2]] = -1.0
        mask = np.zeros(score.shape, bool)
        k = int(round(fraction * score.size))
        if k > 0:
            mask.ravel()[np.argpartition(score.ravel(), k - 1)[:k]] = True
        err = np.zeros_like(W1)
        for j in range(i2 - i1):
            q = np.where(mask[:, j], 0.0, W1[:, j])
            err[:, j] = (W1[:, j] - q) / U1[j, j]
            W1[:, j:] -= np.outer(err[:, j], U1[j, j:])
            W1[:, j] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return W


def _threshold_at(sorted_mags: np.ndarray, fraction: float) -> float:
    """The magnitude threshold that prunes about `fraction` of the weights (0 prunes none)."""
    if fraction <= 0:
        return 0.0
    i = min(len(sorted_mags) - 1, int(round(fraction * len(sorted_mags))))
    return float(np.nextafter(sorted_mags[i - 1], np.inf)) if i > 0 else 0.0
