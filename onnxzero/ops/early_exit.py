"""EarlyExitConv: Conv(+bias)+ReLU with SnaPEA's early exit (Akhlaghi et al.; summarized in section
3.2.1 of ../shared/papers/spatial-prediction-greedy-optimizer.txt).

Semantics (this module's `reference` defines them; the C++ kernel follows it). Design, decisions
and measurements: docs/design-early-exit.md.

* Exact mode (`mode` = "exact", the default): Y = ReLU(Conv(X) + bias [+ other]), exactly what
  onnxruntime's Conv(+Add)+Relu computes (same zero set, non-zeros within float rounding; an inf or
  NaN input gives what Conv gives: 0 * inf = NaN, NaN through the ReLU). The work skipped is the
  one that is provably 0 for EVERY output on its own: the terms whose input value is 0 (after a
  ReLU 33-69 % of them on the zoo's ResNet), or SnaPEA's per-output stop. Three paths (attribute
  `skip_zeros`: -1 = by the kernel's cost model (default), 1 = sparse, 2 = stop, 0 = dense):
  - sparse: for each output position its nonzero inputs are listed once (8 positions at a time,
    vectorized), and every filter multiplies only those (8 filters per SIMD lane group);
  - stop: each filter's nonzero weights in the term order below, outputs in SIMD lanes; after the
    positive terms a vector of 8 outputs stops as soon as all its partial sums are <= 0 (x >= 0:
    only negative terms remain), and the still-running outputs are re-packed into full vectors.
    On the zoo's ResNets even a perfect per-output stop skips only 6-16 % of the terms (the zero
    inputs: 31-54 %), so the cost model never picks it (docs/design-early-exit.md);
  - dense: MLAS's direct convolution (or the packed GEMM core), every term, when listing would cost
    more than it saves (few filters, few zeros, or weights too big for L2).
  Attribute `nonneg_input` = 1 (the default in mode "exact") declares the site's input non-negative;
  the kernel checks it (one pass over X, which also counts its zeros for the cost model) and refuses
  a negative input with an error naming the op and input 'X'.
* Term order (the stop path and predictive mode). Each filter's nonzero weights are ordered once, at
  session creation: the positive weights first, in increasing flattened (c, kh, kw) position, then the
  negative weights by decreasing magnitude, in bands: the largest 1/4 of them, the next 1/4, the last
  1/2 (NEG_BAND_EDGES), each band in increasing position (SnaPEA orders negatives strictly by
  magnitude; the bands keep most of that with better locality). Zero weights are never multiplied in
  these modes. T_k = nonzero weights of filter k, P_k = positive ones. S_j = bias + other + (sum of the
  first j terms) is the partial sum after j terms (S_0 = bias + other; other = 0 at a plain site).
* Residual sites: optional last input 5 `other` (float, (N, K, OH, OW), a run-time tensor: the
  identity shortcut or a projection's output); Y = ReLU(conv + bias + other). The shortcut value is
  known before the first term, so it starts the partial sum and the exact stop stays exact; other
  may have any sign. Predictive thresholds are fitted on that sum (`calibrate_predictive(other=)`).
* Predictive mode (`mode` = "predictive", SnaPEA's speculation): runtime inputs 3 `n_terms` (int64,
  (K,), values in [0, C/group*KH*KW]) and 4 `threshold` (float, (K,), not NaN). After the first
  N = min(n_terms[k], T_k) terms, if S_N < threshold[k] the output is predicted 0 and the rest is
  skipped; otherwise the computation goes on, with SnaPEA's exact stop when the whole input X of
  the run is non-negative: from j >= P_k on, as soon as S_j <= 0 the output is 0 and the remaining
  (negative) terms are skipped. Inputs 3 and 4 are runtime inputs so the optimizer can change them
  without rebuilding a session.
* Output 1 `macs` (int64 scalar): the multiply-accumulates actually performed. Exact mode: on the
  sparse path, per output, the reduction rows whose input is not 0 (zero weights included: they
  sit in the filter lanes), what `reference` counts; on the stop path, per output, the terms computed
  while it sat in a vector (>= `reference(..., snapea_count=True)`, SnaPEA's ideal, where no output
  lies within rounding of 0); on the dense path every term. Predictive mode (the stop kernel): the
  reference counts per output element its stop index; the kernel stops vectors of 8 outputs (cut or
  exactly stopped lanes wait for their vector, or for a re-pack), and checks after the positives,
  every <= 8 terms and at N, so reference macs <= kernel macs <= dense macs there, and y is the same.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxzero.ops.spec import CONSTANTS, OPS
from onnxzero.ops.conv_relu import conv2d
from onnxzero.ops.conv_relu import im2col as _im2col
from onnxzero.ops.session import conv_geometry

OP = "EarlyExitConv"
MODES = ("exact", "predictive")
# Negative terms, ranked by decreasing magnitude, are cut into bands at these fractions of their count;
# each band is taken in increasing position (the kernel sweeps a band chunk by chunk over its im2col).
NEG_BAND_EDGES = CONSTANTS["early_exit_neg_band_edges"]
# Exact mode's paths (attribute skip_zeros): -1 the kernel's cost model, 0 dense, 1 sparse (zero inputs
# skipped), 2 stop (each 8-output vector stops once its sign-ordered partial sums prove ReLU = 0).
SKIP_ZEROS = OPS[OP].attributes["skip_zeros"].values  # -1 cost model, 0 dense, 1 zero inputs skipped, 2 stop kernel
# Predictive calibration defaults (calibrate_predictive, the early-exit rule): the check after this
# fraction of each filter's terms, cutting at most about this quantile of the outputs that end positive.
DEFAULT_FRACTION = 0.25
DEFAULT_QUANTILE = 0.05

__all__ = ["DEFAULT_FRACTION", "DEFAULT_QUANTILE", "NEG_BAND_EDGES", "OP", "MODES", "SKIP_ZEROS", "calibrate_predictive", "conv_relu_reference", "im2col", "make_node", "reference",
           "term_order"]


# ------------------------------------------------------------------------------------------ numpy conv
def im2col(x: np.ndarray, w_shape, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
           auto_pad: str = "NOTSET") -> tuple[np.ndarray, object]:
    """cols (N, group, C/group*KH*KW, OH*OW) float64 with rows in (c, kh, kw) order, and the geometry:
    conv_relu.im2col (the one numpy convolution every op reference builds on), split by group."""
    x = np.asarray(x, dtype=np.float64)
    geo = conv_geometry(x.shape, w_shape, strides=strides, pads=pads, dilations=dilations, group=group,
                        auto_pad=auto_pad)
    return _im2col(x, geo).reshape(x.shape[0], group, -1, geo.OH * geo.OW), geo


def conv_relu_reference(x, w, b=None, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
                        auto_pad: str = "NOTSET", other=None) -> np.ndarray:
    """ReLU(Conv(x, w) + b [+ other]) in float64 (im2col + matmul); other: a residual site's (N, K, OH, OW)."""
    y = conv2d(np.asarray(x, np.float64), w, b, strides=strides, pads=pads, dilations=dilations, group=group,
               auto_pad=auto_pad)
    if other is not None:
        other = np.asarray(other, np.float64)
        if other.shape != y.shape:
            raise ValueError(f"other has shape {other.shape}, expected {y.shape} (the conv output's shape)")
        y = y + other
    return np.where(y <= 0, 0.0, y)  # ReLU that keeps a NaN, like onnxruntime's


# ------------------------------------------------------------------------------------------ semantics
def term_order(w_k: np.ndarray) -> tuple[np.ndarray, int]:
    """(order, P): flattened positions of filter k's nonzero weights in the op's order, and how many are > 0.

    Positives in increasing position; then the negatives ranked by decreasing magnitude (ties: position)
    and cut into bands at NEG_BAND_EDGES of their count (edge = floor(f * count + 0.5)), each band in
    increasing position.
    """
    f = np.asarray(w_k, np.float32).ravel()
    pos = np.flatnonzero(f > 0)
    neg = np.flatnonzero(f < 0)
    neg = neg[np.argsort(f[neg], kind="stable")]  # most negative first; stable keeps position order on ties
    edges = [int(np.floor(e * neg.size + 0.5)) for e in NEG_BAND_EDGES]
    bands = [np.sort(neg[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    return np.concatenate([pos, *bands]).astype(np.int64), int(pos.size)


def _partial_sums(cols_g: np.ndarray, w_k: np.ndarray, bias):
    """S (T+1, P) partial sums in term order for one filter and one image's group cols (CRS, P).

    bias: a scalar, or (P,) = bias + that output's residual value at a residual site."""
    order, npos = term_order(w_k)
    wf = np.asarray(w_k, np.float32).ravel().astype(np.float64)
    contrib = wf[order][:, None] * cols_g[order]
    S = np.empty((order.size + 1, cols_g.shape[1]))
    S[0] = bias
    np.cumsum(contrib, axis=0, out=S[1:])
    S[1:] += bias
    return S, npos


def _start(bias: np.ndarray, other: np.ndarray | None, shape) -> np.ndarray:
    """S_0 (N, K, P) in float64: bias, plus the residual input at a residual site."""
    N, K, P = shape
    s0 = np.broadcast_to(bias.reshape(1, K, 1), (N, K, P)).astype(np.float64)
    if other is not None:
        other = np.asarray(other, np.float32)
        if other.ndim != 4 or other.shape[:2] != (N, K) or int(np.prod(other.shape[2:])) != P:
            raise ValueError(f"{OP}: other has shape {other.shape}, expected (N, K, OH, OW) with N*K*OH*OW = "
                             f"{N}*{K}*{P} (the conv output's shape)")
        s0 = s0 + other.reshape(N, K, P).astype(np.float64)
    return s0


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, mode: str = "exact",
              n_terms: np.ndarray | None = None, threshold: np.ndarray | None = None,
              other: np.ndarray | None = None,
              strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
              auto_pad: str = "NOTSET", return_elementwise: bool = False, snapea_count: bool = False):
    """(y, macs) of EarlyExitConv, macs counted per output element.

    Exact mode: y = ReLU(Conv + b [+ other]) and an element's MACs = the rows of its reduction whose
    input is not 0 (what the exact kernel multiplies). Predictive mode: an element's MACs = its own
    stop index in the SnaPEA term order. snapea_count=True gives that per-output stop count for
    exact mode too (SnaPEA's ideal exact skipping, for comparison).
    return_elementwise=True returns (y, macs, macs_per_element (N, K, OH, OW)).
    """
    if mode not in MODES:
        raise ValueError(f"{OP}: mode is {mode!r}, expected one of {MODES}")
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    K = w.shape[0]
    cols, geo = im2col(x, w.shape, strides=strides, pads=pads, dilations=dilations, group=group, auto_pad=auto_pad)
    N, P = x.shape[0], geo.OH * geo.OW
    kg = K // group
    if mode == "exact" and not snapea_count:
        y = conv_relu_reference(x, w, b, strides=strides, pads=pads, dilations=dilations, group=group,
                                auto_pad=auto_pad, other=other).astype(np.float32)
        macs = np.repeat(np.count_nonzero(cols, axis=2), kg, axis=1).reshape(y.shape)  # NaN / inf count
        return (y, int(macs.sum()), macs) if return_elementwise else (y, int(macs.sum()))
    bias = np.zeros(K) if b is None else np.asarray(b, np.float32).astype(np.float64)
    predictive = mode == "predictive"
    if predictive:
        n_terms = np.asarray(n_terms, np.int64)
        threshold = np.asarray(threshold, np.float32).astype(np.float64)
    exits = bool(np.all(x >= 0))
    s0 = _start(bias, other, (N, K, P))
    y = np.zeros((N, K, P))
    macs = np.zeros((N, K, P), np.int64)
    for k in range(K):
        g = k // kg
        for n in range(N):
            S, npos = _partial_sums(cols[n, g], w[k], s0[n, k])
            T = S.shape[0] - 1
            final = np.where(S[T] <= 0, 0.0, S[T])  # ReLU that keeps a NaN, like onnxruntime's
            big = T + 1
            exit_at = np.full(P, big, np.int64)  # first j >= npos with S_j <= 0: the exact stop
            if exits:
                le = S[npos:] <= 0  # j = npos .. T
                exit_at = np.where(le.any(axis=0), npos + np.argmax(le, axis=0), big)
            count = np.minimum(exit_at, T)
            out = final  # an output that stops exactly ends <= 0 anyway
            if predictive:
                nn = int(min(n_terms[k], T))
                killed = (exit_at > nn) & (S[nn] < threshold[k])
                out = np.where(killed, 0.0, out)
                count = np.where(killed, nn, count)
            y[n, k] = out
            macs[n, k] = count
    y = y.reshape(N, K, geo.OH, geo.OW).astype(np.float32)
    macs = macs.reshape(N, K, geo.OH, geo.OW)
    if return_elementwise:
        return y, int(macs.sum()), macs
    return y, int(macs.sum())


def calibrate_predictive(x_calib: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *,
                         fraction: float = DEFAULT_FRACTION, quantile: float = DEFAULT_QUANTILE, other: np.ndarray | None = None,
                         strides=(1, 1), pads=(0, 0, 0, 0),
                         dilations=(1, 1), group: int = 1, auto_pad: str = "NOTSET") -> tuple[np.ndarray, np.ndarray]:
    """(n_terms (K,) int64, threshold (K,) float32) for predictive mode, from calibration inputs.

    Rule, per filter k: N_k = ceil(fraction * T_k) (T_k = its nonzero weights, in SnaPEA order);
    v_k = the `quantile` quantile (an actual sample, numpy method "lower") of the partial sums S_N
    over the calibration outputs whose final pre-activation is > 0 (those that end positive), and
    Th_k = halfway between v_k and the next lower S_N of any calibration output (so no calibration
    output sits on the threshold). So at most about `quantile` of the outputs that should be
    positive get predicted 0 on the calibration data, and every output whose partial sum after N
    terms is below that is cut. A filter with no positive calibration output gets Th = +inf
    (always predicted 0 after N terms). At a residual site `other` holds the calibration outputs'
    residual values: partial sums and final values are those of conv + bias + other.
    """
    if not 0.0 <= fraction <= 1.0 or not 0.0 <= quantile <= 1.0:
        raise ValueError(f"{OP}: fraction {fraction} and quantile {quantile} must be in [0, 1]")
    x = np.asarray(x_calib, np.float32)
    w = np.asarray(w, np.float32)
    K = w.shape[0]
    cols, geo = im2col(x, w.shape, strides=strides, pads=pads, dilations=dilations, group=group, auto_pad=auto_pad)
    bias = np.zeros(K) if b is None else np.asarray(b, np.float32).astype(np.float64)
    s0 = _start(bias, other, (x.shape[0], K, geo.OH * geo.OW))
    n_terms = np.zeros(K, np.int64)
    threshold = np.full(K, np.inf, np.float32)
    # Only S_N and the final sum matter: both are one matmul over all filters (the first N terms of
    # each filter's order kept in `first`), not a cumulative sum over every term of every filter.
    wf = w.reshape(K, -1).astype(np.float64)
    first = np.zeros_like(wf)
    for k in range(K):
        order, _ = term_order(w[k])
        nn = int(np.ceil(fraction * order.size))
        n_terms[k] = nn
        first[k, order[:nn]] = wf[k, order[:nn]]
    partial, final = _sums(cols, first, s0, group), _sums(cols, wf, s0, group)
    for k in range(K):
        p, f = partial[:, k].ravel(), final[:, k].ravel()
        alive = p[f > 0]
        if alive.size:
            v = np.quantile(alive, quantile, method="lower")
            below = p[p < v]
            # halfway to the next lower partial sum: no calibration output sits on the threshold
            threshold[k] = np.float32((v + below.max()) / 2 if below.size else v - max(1.0, abs(v)) * 1e-3)
    return n_terms, threshold


def _sums(cols: np.ndarray, wmat: np.ndarray, s0: np.ndarray, group: int, chunk: int = 8) -> np.ndarray:
    """(N, K, P) float64: s0 + wmat (K, CRS) applied to each image's group cols (N, G, CRS, P)."""
    N, K = cols.shape[0], wmat.shape[0]
    kg = K // group
    out = np.array(s0, np.float64, copy=True)
    for n0 in range(0, N, chunk):
        c = cols[n0:n0 + chunk].astype(np.float64)
        for g in range(group):
            out[n0:n0 + chunk, g * kg:(g + 1) * kg] += np.matmul(wmat[g * kg:(g + 1) * kg], c[:, g])
    return out


# ------------------------------------------------------------------------------------------ node
def make_node(x: str, w_name: str, b_name: str | None, y: str, *, macs_output: str | None = None,
              mode: str = "exact", nonneg_input: int | None = None,
              n_terms: np.ndarray | str | None = None, threshold: np.ndarray | str | None = None,
              other: str | None = None, skip_zeros: int | None = None, kernel_shape=None, strides=(1, 1),
              pads=None, dilations=(1, 1), group: int = 1,
              auto_pad: str = "NOTSET", name: str | None = None) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """The EarlyExitConv node and the extra initializers it needs.

    Predictive mode: n_terms / threshold are either arrays (stored as initializers named
    f"{w_name}_n_terms" / f"{w_name}_threshold") or the names of runtime graph inputs.
    nonneg_input: None = the mode's default (1 in exact mode, 0 in predictive mode).
    other: the residual operand's tensor name at a residual site (input 5), or None.
    skip_zeros (exact mode): 1 = the sparse path (only nonzero inputs multiplied), 2 = the stop path
    (sign-ordered terms, each 8-output vector stops on its own), 0 = the dense path, None = the
    kernel's cost model decides per run (attribute absent, -1).
    """
    if mode not in MODES:
        raise ValueError(f"{OP}: mode is {mode!r}, expected one of {MODES}")
    inits: dict[str, np.ndarray] = {}
    inputs = {"X": x, "W": w_name, "B": b_name, "other": other}
    if mode == "predictive":
        if n_terms is None or threshold is None:
            raise ValueError(f"{OP}: predictive mode needs n_terms and threshold")
        for value, suffix, dtype in ((n_terms, "n_terms", np.int64), (threshold, "threshold", np.float32)):
            if isinstance(value, str):
                inputs[suffix] = value
            else:
                nm = f"{w_name}_{suffix}"
                inits[nm] = np.asarray(value, dtype)
                inputs[suffix] = nm
    elif n_terms is not None or threshold is not None:
        raise ValueError(f"{OP}: n_terms / threshold are only used in predictive mode")
    attrs: dict = {"strides": list(strides), "dilations": list(dilations), "group": int(group), "mode": mode}
    if kernel_shape is not None:
        attrs["kernel_shape"] = list(kernel_shape)
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads) if pads is not None else [0, 0, 0, 0]
    if nonneg_input is not None:
        attrs["nonneg_input"] = int(nonneg_input)
    if skip_zeros is not None:
        if skip_zeros not in SKIP_ZEROS:
            raise ValueError(f"{OP}: skip_zeros is {skip_zeros!r}, expected one of {SKIP_ZEROS}")
        attrs["skip_zeros"] = int(skip_zeros)
    outputs = [y] + ([macs_output] if macs_output else [])
    node = OPS[OP].node(inputs, outputs, name=name or f"{OP}_{y}", **attrs)
    return node, inits


def onnx_conv_add_relu_model(w: np.ndarray, b: np.ndarray | None, x_shape, *, other_first: bool = False,
                             **conv_attrs) -> onnx.ModelProto:
    """onnxruntime's own Conv(+B) -> Add(conv, O) -> Relu (a residual site; graph inputs X and O): what
    the ops must equal with `other`. other_first puts O as the Add's first operand."""
    from onnx import TensorProto

    from onnxzero.ops.conv_relu import onnx_conv_relu_model

    m = onnx_conv_relu_model(w, b, x_shape, **conv_attrs)
    g = m.graph
    conv, relu = g.node[0], g.node[1]
    add = helper.make_node("Add", ["O", "C"] if other_first else ["C", "O"], ["S"])
    relu.input[0] = "S"
    g.node.insert(1, add)
    g.input.append(helper.make_tensor_value_info("O", TensorProto.FLOAT, ["N", int(w.shape[0]), "OH", "OW"]))
    assert conv.output[0] == "C"
    return m
