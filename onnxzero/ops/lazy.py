"""LazyConv: lazy evaluation of convolutional filters (Leroux et al., "Lazy Evaluation of
Convolutional Filters"), as an onnxruntime custom op.

Per sample, the op predicts each filter's Activation Strength (the sum of |output| over the feature
map) from the input's per-channel strengths with a linear model, computes only the top
n = ceil(ratio * K) filters by prediction and outputs 0 for the others:

    s_prev[c] = sum_{h,w} |x[n, c, h, w]|                (C,)
    s         = s_prev @ pred_W + pred_b                  (K,)   pred_W: (C, K), pred_b: (K,)
    chosen    = the n largest s (ties: lower index first)
    y[n, k]   = ReLU(conv(x, W)[n, k] + B[k]) if k in chosen else 0

Residual sites (Conv -> Add(other) -> Relu): the optional last input `other` (N, K, OH, OW), a run-time
tensor. The op then predicts the strengths of the SUM conv + B + other, from the input's AND other's
per-channel strengths: pred_W is (C + K, K), rows 0..C-1 weigh activation_strength(x), rows C..C+K-1
weigh activation_strength(other). Chosen channels output ReLU(conv + B + other); the skipped ones
output ReLU(other), NOT 0 (their conv term is what is skipped; the shortcut still flows), so at
ratio 1 the op equals Conv+Add+Relu. `other` adds no MACs.

`ratio` is the paper's n_l: an optional run-time scalar input (so a deployment trades accuracy for
time without editing the model) or, when that input is absent, the node's `ratio` attribute. Grouped
and depthwise convs pick the top n over all K. The MAC counter is N * n * OH*OW * (C/group)*KH*KW.
n = max(1, ceil(ratio * K - 1e-4)): the tolerance forgives float32 rounding (0.3 of 10 filters is 3).

A rank-r predictor (the optional input pred_V, (r, K)): pred_W is then (C [+ K], r) and
s = (s_prev @ pred_W) @ pred_V + pred_b. A full predictor reads (C + K) * K weights per image, more
than a 1x1 conv's own weights on ResNet50's last stage (2560 x 2048 against 512 x 2048), where it
cost 10x the conv; `factor_predictor` finds the smallest rank that ranks the filters as well.

Preparing the predictor: collect (s_prev, s) pairs by running the float model on data
(`activation_strength` of the layer's input and of its ReLU output), fit with `fit_predictor`
(mean absolute error, the paper's criterion) and check it with `top_n_hit_rate` (the paper reports
about 90% of the true top-N% filters predicted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from onnxzero.ops.spec import CONSTANTS, OPS
from onnxzero.ops.conv_relu import check_other, conv2d, conv_attributes, geometry, layout_attributes

OP = "LazyConv"


def filters_computed(ratio: float, K: int) -> int:
    """How many of K filters the op computes at `ratio` (in (0, 1])."""
    ratio = float(np.float32(ratio))  # the kernel sees a float32
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio {ratio} outside (0, 1]")
    return int(min(K, max(1, math.ceil(ratio * K - CONSTANTS["lazy_ratio_tolerance"]))))


def activation_strength(t: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, C): sum over H, W of |t| (float64)."""
    return np.abs(np.asarray(t, np.float64)).sum(axis=(2, 3))


def predictor_input(x: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """The predictor's features: (N, C) strengths of x, then (with other) other's (N, K)."""
    s = activation_strength(x)
    return s if other is None else np.concatenate([s, activation_strength(other)], axis=1)


def predict(s_prev: np.ndarray, pred_w: np.ndarray, pred_b: np.ndarray, pred_v: np.ndarray | None = None) -> np.ndarray:
    """(N, K) predicted strengths from the predictor's features (N, C [+ K]), in float64 as the kernel."""
    t = np.asarray(s_prev, np.float64) @ np.asarray(pred_w, np.float64)
    if pred_v is not None:
        t = t @ np.asarray(pred_v, np.float64)
    return t + np.asarray(pred_b, np.float64)


def predicted_strengths(x: np.ndarray, pred_w: np.ndarray, pred_b: np.ndarray,
                        other: np.ndarray | None = None, pred_v: np.ndarray | None = None) -> np.ndarray:
    """(N, K) predicted activation strengths of the op's filters for input x (and residual other)."""
    return predict(predictor_input(x, other), pred_w, pred_b, pred_v)


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """(N, K) scores -> (N, n) indices of the n largest per row, ties to the lower index, ascending.

    NaN scores rank last, as in the kernel.
    """
    s = np.where(np.isnan(scores), -np.inf, np.asarray(scores, np.float64))
    order = np.argsort(-s, axis=1, kind="stable")[:, :n]
    return np.sort(order, axis=1)


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pred_w: np.ndarray, pred_b: np.ndarray, *,
              ratio: float = 1.0, other: np.ndarray | None = None, pred_v: np.ndarray | None = None, **conv_attrs) -> tuple[np.ndarray, int]:
    """LazyConv's semantics in numpy: (y float32, macs). Skipped channels: 0, or ReLU(other)."""
    x = np.asarray(x, np.float32)
    g = geometry(x.shape, np.shape(w), **conv_attrs)
    n = filters_computed(ratio, g.K)
    conv = conv2d(x, w, b, **conv_attrs)
    o = check_other(other, conv.shape, OP)
    base = np.zeros_like(conv) if o is None else o
    y = np.maximum(conv + base, 0)
    if n < g.K:
        chosen = top_n(predicted_strengths(x, pred_w, pred_b, other, pred_v), n)
        keep = np.zeros((x.shape[0], g.K), bool)
        np.put_along_axis(keep, chosen, True, axis=1)
        y = np.where(keep[:, :, None, None], y, np.maximum(base, 0))
    return y.astype(np.float32), x.shape[0] * n * g.OH * g.OW * (g.C // g.group) * g.KH * g.KW


def top_n_hit_rate(pred: np.ndarray, true: np.ndarray, ratio: float) -> float:
    """Mean over samples of |predicted top-n  ∩  true top-n| / n, n = filters_computed(ratio, K).

    pred, true: (S, K) predicted and measured activation strengths.
    """
    pred = np.atleast_2d(np.asarray(pred, np.float64))
    true = np.atleast_2d(np.asarray(true, np.float64))
    if pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} and true {true.shape} differ")
    n = filters_computed(ratio, pred.shape[1])
    p, t = top_n(pred, n), top_n(true, n)
    hits = [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(p, t)]
    return float(np.mean(hits) / n)


def fit_predictor(s_prev_samples: np.ndarray, s_samples: np.ndarray, *, iters: int = 30,
                  ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Fit s = s_prev @ W + b minimizing the mean absolute error (the paper's criterion).

    s_prev_samples: (S, C) input strengths, s_samples: (S, K) output strengths. Returns
    (pred_W (C, K), pred_b (K,)) as float32. Deterministic, numpy only: columns are scaled to unit
    mean |value|, a least-squares fit starts iteratively reweighted least squares (weights
    1 / max(|residual|, delta)), which converges to the least-absolute-deviation fit; every output
    filter is its own regression, solved in one batched call per iteration. `ridge` (relative to
    the Gram matrix's trace) keeps rank-deficient inputs (dead channels, few samples) solvable.
    Problems too large for batched solves fall back to full-batch subgradient descent from the
    least-squares start.
    """
    X = np.asarray(s_prev_samples, np.float64)
    Y = np.asarray(s_samples, np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"expected (S, C) and (S, K) with the same S >= 1, got {X.shape} and {Y.shape}")
    S, C = X.shape
    K = Y.shape[1]
    xs = np.abs(X).mean(axis=0)
    xs[xs == 0] = 1.0
    ys = max(float(np.abs(Y).mean()), 1e-30)
    A = np.hstack([X / xs, np.ones((S, 1))])  # (S, C+1), intercept last
    T = Y / ys

    def solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        d = gram.shape[-1]
        lam = ridge * (np.trace(gram, axis1=-2, axis2=-1) / d + 1e-12)
        eye = np.eye(d)
        reg = gram + (lam[..., None, None] * eye if np.ndim(lam) else lam * eye)
        return np.linalg.solve(reg, rhs[..., None])[..., 0] if reg.ndim == 3 else np.linalg.solve(reg, rhs)

    theta = solve(A.T @ A, A.T @ T)  # (C+1, K) least squares
    d = C + 1
    if S * K * d * d <= 2e9:
        delta = 1e-6
        chunk = max(1, int(4e6 // (S * d)))  # outputs per batched solve (bounds the (chunk, d, S) temporary)
        for _ in range(iters):
            Wt = 1.0 / np.maximum(np.abs(A @ theta - T), delta)  # (S, K) IRLS weights
            new = np.empty_like(theta)
            for k0 in range(0, K, chunk):
                wk = Wt[:, k0:k0 + chunk].T  # (k, S)
                aw = A.T[None, :, :] * wk[:, None, :]  # (k, d, S)
                new[:, k0:k0 + chunk] = solve(aw @ A, np.einsum("kds,sk->kd", aw, T[:, k0:k0 + chunk])).T
            done = np.max(np.abs(new - theta)) < 1e-9
            theta = new
            if done:
                break
    else:  # subgradient descent on the MAE with a decaying, per-output normalized step
        best, best_err = theta.copy(), np.abs(A @ theta - T).mean(axis=0)
        step0 = 0.1 * np.abs(theta).mean(axis=0) + 1e-3
        for it in range(max(iters, 1) * 5):
            G = A.T @ np.sign(A @ theta - T) / S
            norm = np.linalg.norm(G, axis=0) + 1e-12
            theta = theta - (step0 / math.sqrt(it + 1)) * G / norm
            err = np.abs(A @ theta - T).mean(axis=0)
            better = err < best_err
            best[:, better], best_err[better] = theta[:, better], err[better]
        theta = best
    w = theta[:C] / xs[:, None] * ys
    b = theta[C] * ys
    return w.astype(np.float32), b.astype(np.float32)


def factor_predictor(pred_w: np.ndarray, pred_b: np.ndarray, s_prev: np.ndarray, s: np.ndarray, *,
                     ratios: Sequence[float] = (0.25, 0.5, 0.75), tolerance: float = 0.005
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """(pred_W (C, r), pred_V (r, K)) of the smallest rank r in 4, 8, 16, ... whose predictions rank the
    filters as well as the full pred_w on the calibration samples (s_prev, s): top-n hit rate at each
    of `ratios` within `tolerance` of the full predictor's. None where no such rank halves the
    predictor's weights ((C + K) * r <= C * K / 2).

    Why: the kernel reads its whole predictor for every image, and a full one can outweigh the conv
    it serves (a residual 1x1 site of ResNet50's last stage: 2560 x 2048 predictor weights against
    512 x 2048 conv weights, 6 ms of 6.1 ms). A fit on S samples has rank at most S + 1 anyway. The
    SVD is taken with each feature scaled by its mean strength, so large-valued features do not
    decide the basis alone."""
    pred_w = np.asarray(pred_w, np.float64)
    R, K = pred_w.shape
    ranks = [r for r in (2 ** i for i in range(2, 32)) if (R + K) * r <= R * K // 2]
    if not ranks:
        return None
    xs = np.abs(np.asarray(s_prev, np.float64)).mean(axis=0)
    xs[xs == 0] = 1.0
    U, S, Vt = np.linalg.svd(xs[:, None] * pred_w, full_matrices=False)
    base = [top_n_hit_rate(predict(s_prev, pred_w, pred_b), s, q) for q in ratios]
    for r in ranks:
        u = (U[:, :r] * S[:r] / xs[:, None]).astype(np.float32)
        v = np.ascontiguousarray(Vt[:r], np.float32)
        p = predict(s_prev, u, pred_b, v)
        if all(top_n_hit_rate(p, s, q) >= b - tolerance for q, b in zip(ratios, base)):
            return u, v
    return None


def make_node(x: str, w_name: str, b_name: str | None, y: str, *, pred_w: np.ndarray, pred_b: np.ndarray,
              ratio: float = 1.0, ratio_input: str | None = None, macs_output: str | None = None,
              kernel_shape: Sequence[int] | None = None, strides: Sequence[int] | None = None,
              pads: Sequence[int] | None = None, dilations: Sequence[int] | None = None, group: int | None = None,
              auto_pad: str | None = None, name: str | None = None,
              other: str | None = None, x_blocked: bool = False, other_blocked: bool = False,
              y_blocked: bool = False, pred_v: np.ndarray | None = None) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """A LazyConv node plus its predictor initializers {'<y>__pred_W': (C, K), '<y>__pred_b': (K,)}
    (and '<y>__pred_V' (r, K) for a rank-r predictor, pred_w then (C, r)).

    x_blocked / other_blocked / y_blocked: those tensors in the blocked layout (conv_relu.blocked_io).

    ratio: the attribute (used when no run-time ratio is fed); ratio_input: name of an optional
    run-time float scalar input that overrides it (a graph input, so it can change per run).
    other: the residual operand's tensor name (a residual site; the last input); pred_w is then
    (C + K, K) (see the module docstring).
    """
    pred_w = np.ascontiguousarray(pred_w, np.float32)
    pred_b = np.ascontiguousarray(pred_b, np.float32).reshape(-1)
    K = pred_b.shape[0]
    inits = {}
    pw_name, pb_name, pv_name = f"{y}__pred_W", f"{y}__pred_b", None
    if pred_v is not None:
        pred_v = np.ascontiguousarray(pred_v, np.float32)
        if pred_v.ndim != 2 or pred_v.shape[1] != K or pred_w.ndim != 2 or pred_w.shape[1] != pred_v.shape[0]:
            raise ValueError(f"pred_w {pred_w.shape}, pred_v {np.shape(pred_v)} and pred_b {pred_b.shape} "
                             "do not match (C, r) / (r, K) / (K,)")
        pv_name = f"{y}__pred_V"
        inits[pv_name] = pred_v
    elif pred_w.ndim != 2 or pred_w.shape[1] != K:
        raise ValueError(f"pred_w {pred_w.shape} and pred_b {pred_b.shape} do not match (C, K) / (K,)")
    filters_computed(ratio, K)  # validates ratio
    if other and pred_w.shape[0] <= K:
        raise ValueError(f"pred_w {pred_w.shape}: with other, expected (C + K, K) rows (input channels, then other's)")
    outputs = [y] + ([macs_output] if macs_output else [])
    node = OPS[OP].node({"X": x, "W": w_name, "B": b_name, "pred_W": pw_name, "pred_b": pb_name, "ratio": ratio_input,
                         "other": other, "pred_V": pv_name}, outputs, name=name, ratio=float(ratio),
                            **conv_attributes(kernel_shape=kernel_shape, strides=strides, pads=pads,
                                              dilations=dilations, group=group, auto_pad=auto_pad),
                            **layout_attributes(x_blocked, other_blocked, y_blocked))
    return node, {pw_name: pred_w, pb_name: pred_b, **inits}
