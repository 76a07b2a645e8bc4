"""EarlyExitConv (SnaPEA): kernel vs the numpy reference (exact and predictive), vs onnxruntime's Conv+Relu,
the macs counter (bounds, exact counts, must-not-fire cases), calibration, and every error message."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxzero import DOMAIN, OP_VERSION
from onnxzero.ops import early_exit as ee
from onnxzero.ops import make_session, single_op_model
from onnxzero.ops.conv_relu import onnx_conv_relu_model

EXAMPLES = int(os.environ.get("ONNXZERO_HYPOTHESIS_EXAMPLES", "30"))
ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.RuntimeException, ort.capi.onnxruntime_pybind11_state.InvalidGraph)


def _session(w, b, x_shape, *, mode="exact", nonneg_input=None, threads=2, residual=False, skip_zeros=1, **conv):
    """skip_zeros=1 (exact mode's sparse path) unless told: its MAC count is the reference's."""
    pred = mode == "predictive"
    node, inits = ee.make_node("X", "W", "B" if b is not None else None, "Y", macs_output="macs", mode=mode,
                               nonneg_input=nonneg_input, n_terms="NT" if pred else None,
                               threshold="TH" if pred else None, other="O" if residual else None,
                               skip_zeros=None if pred else skip_zeros, **conv)
    inits["W"] = np.asarray(w, np.float32)
    if b is not None:
        inits["B"] = np.asarray(b, np.float32)
    rt = {"NT": (TensorProto.INT64, [w.shape[0]]), "TH": (TensorProto.FLOAT, [w.shape[0]])} if pred else {}
    if residual:
        rt["O"] = (TensorProto.FLOAT, None)  # any shape reaches the op: it checks it itself
    return make_session(single_op_model(node, inits, x_shape, runtime_inputs=rt, outputs=["Y", "macs"]), threads=threads)


def _run(x, w, b, *, mode="exact", n_terms=None, threshold=None, nonneg_input=None, threads=2, other=None,
         skip_zeros=1, **conv):
    s = _session(w, b, x.shape, mode=mode, nonneg_input=nonneg_input, threads=threads, residual=other is not None,
                 skip_zeros=skip_zeros, **conv)
    feeds = {"X": x} if other is None else {"X": x, "O": np.asarray(other, np.float32)}
    if mode == "predictive":
        feeds.update(NT=np.asarray(n_terms, np.int64), TH=np.asarray(threshold, np.float32))
    y, macs = s.run(None, feeds)
    return y, int(macs)


def _dense(x_shape, w_shape, y_shape):
    return x_shape[0] * w_shape[0] * y_shape[2] * y_shape[3] * int(np.prod(w_shape[1:]))


def _close(y, y_ref):
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(y_ref).max())))


@st.composite
def conv_cases(draw):
    depthwise = draw(st.booleans())
    n = draw(st.integers(1, 2))
    if depthwise:
        c = draw(st.integers(1, 8))
        group, k = c, c * draw(st.integers(1, 2))
    else:
        group = draw(st.sampled_from([1, 1, 2]))
        c = group * draw(st.integers(1, 10))
        k = group * draw(st.integers(1, 12))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4)) if auto_pad == "NOTSET" else (0, 0, 0, 0)
    ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    h = draw(st.integers(max(1, ekh - pads[0] - pads[2]), 16))
    w = draw(st.integers(max(1, ekw - pads[1] - pads[3]), 16))
    shift = draw(st.sampled_from([-3.0, -1.0, -0.3, 0.0, 0.5, 3.0]))
    zeros = draw(st.sampled_from([0.0, 0.0, 0.3]))   # fraction of zero weights
    seed = draw(st.integers(0, 2**31))
    return dict(x_shape=(n, c, h, w), w_shape=(k, c // group, kh, kw), conv=dict(
        strides=(sh, sw), pads=pads, dilations=(dh, dw), group=group, auto_pad=auto_pad), shift=shift,
        zeros=zeros, seed=seed)


def _data(case, *, nonneg=True):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal(case["x_shape"]).astype(np.float32)
    if nonneg:
        x = np.maximum(x, 0)
    fan = int(np.prod(case["w_shape"][1:]))
    w = (rng.standard_normal(case["w_shape"]) / np.sqrt(fan)).astype(np.float32)
    w[rng.random(w.shape) < case["zeros"]] = 0
    b = (rng.standard_normal(case["w_shape"][0]) * 0.3 + case["shift"]).astype(np.float32)
    return x, w, b


# ------------------------------------------------------------------------------------------ exact mode
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_exact_matches_reference(case):
    x, w, b = _data(case)
    y, macs = _run(x, w, b, **case["conv"])
    y_ref, macs_ref = ee.reference(x, w, b, **case["conv"])
    _close(y, y_ref)
    assert macs == macs_ref  # the rows with a nonzero input, for every filter
    assert macs <= x.shape[0] * w.size * y.shape[2] * y.shape[3]


@settings(max_examples=max(5, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_exact_with_signed_input_never_stops(case):
    """nonneg_input=0 and an input with negative values: zero inputs are still skipped, nothing else."""
    x, w, b = _data(case, nonneg=False)
    if np.all(x >= 0):
        x[0, 0, 0, 0] = -1.0
    y, macs = _run(x, w, b, nonneg_input=0, **case["conv"])
    y_ref, macs_ref = ee.reference(x, w, b, **case["conv"])
    _close(y, y_ref)
    assert macs == macs_ref


@pytest.mark.parametrize("x_shape,w_shape,conv", [
    ((1, 16, 23, 19), (24, 16, 3, 3), dict(pads=(1, 1, 1, 1))),                     # several blocks, tail block
    ((1, 40, 6, 6), (96, 40, 3, 3), dict(pads=(1, 1, 1, 1))),                       # one block, shared im2col
    ((2, 3, 30, 30), (16, 3, 7, 7), dict(strides=(2, 2), pads=(3, 3, 3, 3))),       # strided stem
    ((1, 32, 12, 12), (16, 32, 1, 1), {}),                                          # 1x1
    ((1, 300, 4, 4), (8, 300, 3, 3), dict(pads=(1, 1, 1, 1))),                      # long reduction, small blocks
    ((1, 8, 9, 9), (8, 1, 3, 3), dict(pads=(2, 2, 2, 2), dilations=(2, 2), group=8)),  # depthwise dilated
])
@pytest.mark.parametrize("shift", [-2.0, 0.0, 5.0])
def test_exact_equals_onnxruntime_conv_relu(x_shape, w_shape, conv, shift):
    """Exact mode is Conv+ReLU on non-negative inputs, however much it skips."""
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal(x_shape), 0).astype(np.float32)
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
    b = (rng.standard_normal(w_shape[0]) * 0.3 + shift).astype(np.float32)
    for threads in (1, 2):
        y, macs = _run(x, w, b, threads=threads, **conv)
        (y_ort,) = make_session(onnx_conv_relu_model(w, b, x_shape, **conv), threads=threads, library=False).run(None, {"X": x})
        _close(y, y_ort)
        _, macs_ref = ee.reference(x, w, b, **conv)
        assert macs == macs_ref  # the bias does not matter: only zero inputs are skipped


def test_exact_macs_counts():
    """Exact counts: every (position, filter) multiplies the rows whose input is not 0, no more, no fewer."""
    rng = np.random.default_rng(2)
    x = (rng.random((2, 6, 10, 10)) + 0.1).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    P = 100
    for b in (np.full(5, -1e4, np.float32), np.full(5, 1e4, np.float32)):
        y, macs = _run(x, w, b)  # no padding, no zero input: dense, whatever the bias
        assert macs == 2 * 64 * w.size
    y, macs = _run(x, w, np.zeros(5, np.float32), pads=(1, 1, 1, 1))
    inside = (3 * 3 * 64 + 2 * 3 * 4 * 8 + 4 * 4)  # taps inside the image over the 10x10 outputs (pads 1)
    assert macs == 2 * 5 * 6 * inside
    x[1, 2] = 0  # one channel of the second image dead: its 9 taps are skipped at every position
    x[0, :, :5] = 0  # the top half of the first image dead
    y, macs = _run(x, w, np.zeros(5, np.float32), pads=(1, 1, 1, 1))
    _, macs_ref = ee.reference(x, w, np.zeros(5, np.float32), pads=(1, 1, 1, 1))
    assert macs == macs_ref < 2 * 5 * 6 * inside - 5 * 9 * 64
    assert P == 100


@pytest.mark.parametrize("x_shape,w_shape,conv", [
    ((2, 16, 13, 11), (24, 16, 3, 3), dict(pads=(1, 1, 1, 1))),
    ((1, 8, 9, 9), (8, 1, 3, 3), dict(pads=(2, 2, 2, 2), dilations=(2, 2), group=8)),
    ((2, 3, 30, 30), (16, 3, 7, 7), dict(strides=(2, 2), pads=(3, 3, 3, 3))),
])
def test_exact_paths_agree(x_shape, w_shape, conv):
    """The dense path (skip_zeros=0) counts every term; the sparse path (1) only nonzero inputs; the cost
    model (None) picks one of the two per run: the sparse one on a mostly-zero input of a wide layer,
    the dense one on an input without zeros. All equal Conv+Relu, with and without a shortcut."""
    rng = np.random.default_rng(31)
    x = np.maximum(rng.standard_normal(x_shape) - 0.8, 0).astype(np.float32)  # ~79% zeros
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
    b = (rng.standard_normal(w_shape[0]) * 0.1).astype(np.float32)
    (y_ort,) = make_session(onnx_conv_relu_model(w, b, x_shape, **conv), threads=2, library=False).run(None, {"X": x})
    y_ref, sparse_macs = ee.reference(x, w, b, **conv)
    dense_macs = x_shape[0] * w.size * y_ort.shape[2] * y_ort.shape[3]
    for sz, want in ((0, dense_macs), (1, sparse_macs)):
        y, macs = _run(x, w, b, skip_zeros=sz, **conv)
        _same_as_ort(y, y_ort)
        assert macs == want
    y, macs = _run(x, w, b, skip_zeros=None, **conv)
    _same_as_ort(y, y_ort)
    assert macs in (sparse_macs, dense_macs)
    o = rng.standard_normal(y_ort.shape).astype(np.float32)
    y_res = ee.reference(x, w, b, other=o, **conv)[0]
    for sz in (0, 1, None):
        y, _ = _run(x, w, b, other=o, skip_zeros=sz, **conv)
        _close(y, y_res)
    assert sparse_macs < dense_macs


def test_exact_cost_model_fires_and_does_not():
    """Auto: a 64-filter layer on a 90%-zero input lists the nonzero inputs; an 8-filter layer on an input
    without zeros runs the dense GEMM (listing would cost more than it saves)."""
    rng = np.random.default_rng(32)
    x = np.maximum(rng.standard_normal((1, 32, 12, 12)) - 1.3, 0).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    _, macs = _run(x, w, None, skip_zeros=None, pads=(1, 1, 1, 1))
    assert macs == ee.reference(x, w, None, pads=(1, 1, 1, 1))[1] < 144 * w.size
    x = (rng.random((1, 32, 12, 12)) + 0.5).astype(np.float32)
    w = rng.standard_normal((8, 32, 3, 3)).astype(np.float32)
    _, macs = _run(x, w, None, skip_zeros=None, pads=(1, 1, 1, 1))
    assert macs == 144 * w.size


def test_zero_inputs_are_never_multiplied_zero_weights_are():
    """All-zero input: no MAC at all, output ReLU(bias). Zero weights sit in the filter lanes: multiplied."""
    w = np.zeros((3, 2, 3, 3), np.float32)
    w[0, 0, 1, 1] = 1.0
    w[2] = -0.5
    b = np.array([0.5, 0.25, 20.0], np.float32)
    y, macs = _run(np.zeros((1, 2, 4, 4), np.float32), w, b, pads=(1, 1, 1, 1))
    assert macs == 0 and np.array_equal(y, np.broadcast_to(np.maximum(b, 0).reshape(1, 3, 1, 1), y.shape))
    x = np.zeros((1, 2, 4, 4), np.float32)
    x[0, 1, 2, 2] = 2.0  # one nonzero input: it reaches the 9 outputs around it, for each of the 3 filters
    y, macs = _run(x, w, b, pads=(1, 1, 1, 1))
    _close(y, ee.reference(x, w, b, pads=(1, 1, 1, 1))[0])
    assert macs == 3 * 9
    assert np.all(y[0, 1] == 0.25)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_exact_nonfinite_input_is_conv_relu(bad):
    """An inf / NaN input gives what Conv+Relu gives: NaN through the ReLU, 0*inf = NaN for zero weights,
    -inf through negative weights to 0; neighbouring outputs untouched."""
    rng = np.random.default_rng(21)
    x = np.maximum(rng.standard_normal((2, 4, 9, 9)), 0).astype(np.float32)
    x[1, 2, 4, 4] = bad
    x[0, 0, 0, 8] = bad
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w[1] = 0  # a zero filter: 0 * inf = NaN
    w[2] = -np.abs(w[2])
    b = (rng.standard_normal(6)).astype(np.float32)
    for conv, sz in ((dict(pads=(1, 1, 1, 1)), 1), (dict(strides=(2, 2)), 0), ({}, None), (dict(pads=(1, 1, 1, 1)), 2)):
        y, _ = _run(x, w, b, nonneg_input=0, skip_zeros=sz, **conv)  # any path: a non-finite input takes the sparse one
        (y_ort,) = make_session(onnx_conv_relu_model(w, b, x.shape, **conv), threads=2, library=False).run(None, {"X": x})
        np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ort))
        np.testing.assert_array_equal(np.isinf(y), np.isinf(y_ort))
        ok = np.isfinite(y_ort)
        np.testing.assert_allclose(y[ok], y_ort[ok], rtol=1e-5, atol=1e-5)
        assert (~ok).any()


# ------------------------------------------------------------------------------------------ exact stop path
def _stop_bounds(x, w, b, conv, other=None):
    """(SnaPEA's ideal: every output stopping on its own at its first S_j <= 0 after the positives, the
    stop path's ceiling: every nonzero-weight term of every output)."""
    _, ideal = ee.reference(x, w, b, snapea_count=True, other=other, **conv)
    _, geo = ee.im2col(x, w.shape, **conv)
    return ideal, x.shape[0] * geo.OH * geo.OW * int(np.count_nonzero(w))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.booleans(), st.sampled_from([1, 2]))
def test_stop_path_equals_conv_relu(case, residual, threads):
    """skip_zeros=2 (each 8-output vector stops once its sign-ordered partial sums prove ReLU = 0) is
    Conv(+Add)+Relu: vs the numpy reference and onnxruntime's own ops, plain and residual, batch 1-2; its
    MACs lie between SnaPEA's per-output ideal and every nonzero-weight term."""
    x, w, b = _data(case)
    conv = case["conv"]
    o = _other(case, x, w) if residual else None
    y, macs = _run(x, w, b, other=o, skip_zeros=2, threads=threads, **conv)
    y_ref, _ = ee.reference(x, w, b, other=o, **conv)
    _close(y, y_ref)
    if residual:
        m = ee.onnx_conv_add_relu_model(w, b, x.shape, **_explicit_pads(x, w, conv))
        (y_ort,) = make_session(m, threads=2, library=False).run(None, {"X": x, "O": o})
    else:
        (y_ort,) = make_session(onnx_conv_relu_model(w, b, x.shape, **_explicit_pads(x, w, conv)), threads=2,
                                library=False).run(None, {"X": x})
    _same_as_ort(y, y_ort)
    ideal, ceiling = _stop_bounds(x, w, b, conv, other=o)
    s_final = ee.conv_relu_reference(x, w, b, other=o, **conv)
    if not np.any(np.abs(s_final[s_final != 0]) < 1e-4):  # no output within rounding of the ReLU's kink
        assert ideal <= macs <= ceiling


def test_stop_path_counts():
    """Exact counts: a very negative start (bias or shortcut) stops every vector right after its positive
    terms; a very positive one stops none (every nonzero-weight term); the ideal and the stop path agree
    then. A real case skips: between the ideal and the ceiling, strictly below the ceiling."""
    rng = np.random.default_rng(41)
    x = rng.random((2, 6, 10, 10)).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    w[0, 0] = 0  # zero weights are never multiplied on this path
    P, npos, nz = 100, int((w > 0).sum()), int(np.count_nonzero(w))
    pads = dict(pads=(1, 1, 1, 1))
    y, macs = _run(x, w, np.full(5, -1e4, np.float32), skip_zeros=2, **pads)
    assert np.all(y == 0) and macs == 2 * P * npos
    y, macs = _run(x, w, np.zeros(5, np.float32), other=np.full((2, 5, 10, 10), -1e4, np.float32), skip_zeros=2, **pads)
    assert np.all(y == 0) and macs == 2 * P * npos
    b = np.full(5, 1e4, np.float32)
    y, macs = _run(x, w, b, skip_zeros=2, **pads)
    assert macs == 2 * P * nz
    _close(y, ee.reference(x, w, b, **pads)[0])
    x = np.maximum(rng.standard_normal((1, 16, 16, 16)), 0).astype(np.float32)
    w = (rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32)
    b = (rng.standard_normal(32) * 0.3).astype(np.float32)
    y, macs = _run(x, w, b, skip_zeros=2, **pads)
    _close(y, ee.reference(x, w, b, **pads)[0])
    ideal, ceiling = _stop_bounds(x, w, b, pads)
    assert ideal <= macs < ceiling


def test_stop_path_signed_input_never_stops():
    """nonneg_input=0 and a negative input: the stop path cannot prove anything, computes every term."""
    rng = np.random.default_rng(42)
    x = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    b = np.full(6, -1e4, np.float32)
    y, macs = _run(x, w, b, nonneg_input=0, skip_zeros=2)
    assert np.all(y == 0) and macs == 49 * w.size


# ------------------------------------------------------------------------------------------ predictive mode
def _partial_at(x, w, b, n_terms, conv):
    """S_N (N, K, P) of the reference, to leave out outputs that sit on a threshold."""
    cols, geo = ee.im2col(x, w.shape, **conv)
    K = w.shape[0]
    kg = K // conv.get("group", 1)
    out = np.zeros((x.shape[0], K, geo.OH * geo.OW))
    for k in range(K):
        for n in range(x.shape[0]):
            S, _ = ee._partial_sums(cols[n, k // kg], w[k], float(b[k]))
            out[n, k] = S[min(int(n_terms[k]), S.shape[0] - 1)]
    return out.reshape(x.shape[0], K, geo.OH, geo.OW)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.sampled_from([0.02, 0.3]), st.booleans())
def test_predictive_matches_reference(case, fraction, quantile, nonneg):
    x, w, b = _data(case, nonneg=nonneg)
    conv = case["conv"]
    n_terms, threshold = ee.calibrate_predictive(x, w, b, fraction=fraction, quantile=quantile, **conv)
    y, macs = _run(x, w, b, mode="predictive", n_terms=n_terms, threshold=threshold, **conv)
    y_ref, macs_ref, per = ee.reference(x, w, b, mode="predictive", n_terms=n_terms, threshold=threshold,
                                        return_elementwise=True, **conv)
    # outputs whose S_N is within float32 rounding of the threshold may be decided either way
    s_n = _partial_at(x, w, b, n_terms, conv)
    near = np.abs(s_n - threshold.reshape(1, -1, 1, 1)) <= 1e-4 * (1 + np.abs(s_n))
    ok = ~near
    np.testing.assert_allclose(y[ok], y_ref[ok], rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(y_ref).max())))
    if not near.any():
        assert macs_ref <= macs <= _dense(x.shape, w.shape, y.shape)


def test_predictive_counts_and_runtime_inputs():
    """Threshold +inf cuts every output after N terms; -inf never cuts (then exact stops still apply).
    n_terms / threshold are runtime inputs: one session, several settings."""
    rng = np.random.default_rng(4)
    x = rng.random((1, 8, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    b = np.full(6, 100.0, np.float32)  # nothing stops exactly
    s = _session(w, b, x.shape, mode="predictive", pads=(1, 1, 1, 1))
    P = 81
    n = np.array([0, 1, 10, 36, 71, 72], np.int64)
    y, macs = s.run(None, {"X": x, "NT": n, "TH": np.full(6, np.inf, np.float32)})
    assert np.all(y == 0) and int(macs) == P * int(n.sum())
    y, macs = s.run(None, {"X": x, "NT": n, "TH": np.full(6, -np.inf, np.float32)})
    _close(y, ee.reference(x, w, b, pads=(1, 1, 1, 1))[0])
    assert int(macs) == P * w.size
    th = np.array([np.inf, -np.inf] * 3, np.float32)
    y, macs = s.run(None, {"X": x, "NT": n, "TH": th})
    assert int(macs) == P * (int(n[0::2].sum()) + 3 * 72)


def test_calibration_rule():
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((2, 8, 10, 10)), 0).astype(np.float32)
    w = (rng.standard_normal((4, 8, 3, 3)) / 8).astype(np.float32)
    b = np.zeros(4, np.float32)
    n_terms, threshold = ee.calibrate_predictive(x, w, b, fraction=0.25, quantile=0.1, pads=(1, 1, 1, 1))
    assert n_terms.dtype == np.int64 and threshold.dtype == np.float32
    np.testing.assert_array_equal(n_terms, np.ceil(0.25 * np.count_nonzero(w.reshape(4, -1), axis=1)))
    y_exact, _ = ee.reference(x, w, b, pads=(1, 1, 1, 1))
    y_pred, _ = ee.reference(x, w, b, mode="predictive", n_terms=n_terms, threshold=threshold, pads=(1, 1, 1, 1))
    lost = ((y_exact > 0) & (y_pred == 0)).sum(axis=(0, 2, 3)) / np.maximum(1, (y_exact > 0).sum(axis=(0, 2, 3)))
    assert np.all(lost <= 0.1 + 1e-9)


def test_concurrent_runs_on_one_session():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(6)
    w = (rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32)
    b = (rng.standard_normal(32) * 0.5 - 0.5).astype(np.float32)
    s = _session(w, b, (1, 16, 20, 20), pads=(1, 1, 1, 1))
    xs = [np.maximum(rng.standard_normal((1, 16, 20, 20)), 0).astype(np.float32) for _ in range(8)]
    with ThreadPoolExecutor(4) as ex:
        ys = list(ex.map(lambda x: s.run(None, {"X": x})[0], xs))
    for x, y in zip(xs, ys):
        _close(y, ee.reference(x, w, b, pads=(1, 1, 1, 1))[0])


# ------------------------------------------------------------------------------------------ residual sites
def _other(case, x, w, seed_shift=1):
    """A residual input of the conv output's shape: a post-ReLU-like shortcut or a signed projection."""
    y = ee.conv_relu_reference(x, w, None, **case["conv"])
    rng = np.random.default_rng(case["seed"] + seed_shift)
    o = rng.standard_normal(y.shape)
    if rng.random() < 0.5:
        o = np.maximum(o, 0)
    return o.astype(np.float32)


def _explicit_pads(x, w, conv):
    """The same conv with auto_pad resolved to pads (onnxruntime refuses SAME_* with dilations)."""
    _, geo = ee.im2col(x, w.shape, **conv)
    return {**conv, "auto_pad": "NOTSET", "pads": tuple(geo.pads)}


def _same_as_ort(y, y_ort):
    """Exactness: the same zero set and non-zero values within 1e-5 relative (or 1e-5 of the scale)."""
    scale = max(1.0, float(np.abs(y_ort).max()))
    near_zero = np.abs(y_ort) <= 1e-6 * scale  # may legitimately round to either side of the ReLU
    assert np.array_equal((y == 0)[~near_zero], (y_ort == 0)[~near_zero])
    np.testing.assert_allclose(y, y_ort, rtol=1e-5, atol=2e-6 * scale)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.booleans())
def test_residual_exact_matches_reference_and_onnxruntime(case, other_first):
    x, w, b = _data(case)
    o = _other(case, x, w)
    y, macs = _run(x, w, b, other=o, **case["conv"])
    y_ref, macs_ref = ee.reference(x, w, b, other=o, **case["conv"])
    _close(y, y_ref)
    assert macs_ref <= macs <= _dense(x.shape, w.shape, y_ref.shape)
    m = ee.onnx_conv_add_relu_model(w, b, x.shape, other_first=other_first, **_explicit_pads(x, w, case["conv"]))
    (y_ort,) = make_session(m, threads=2, library=False).run(None, {"X": x, "O": o})
    _same_as_ort(y, y_ort)
    # the shortcut is really added: without it the output differs wherever it moves the sum
    y_plain, _ = _run(x, w, b, **case["conv"])
    moved = np.abs(y_ref - ee.reference(x, w, b, **case["conv"])[0]) > 1e-3
    if moved.any():
        assert not np.allclose(y_plain[moved], y[moved])


def test_residual_shortcut_starts_the_partial_sum():
    """Predictive mode's kernel with a threshold that never cuts (-inf), so only the exact stop acts: a
    very negative shortcut stops every output right after its positive terms; a very positive one
    stops nothing (the bias alone would stop them all); a zero shortcut is the plain op."""
    rng = np.random.default_rng(12)
    x = rng.random((2, 6, 10, 10)).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    P, npos = 100, int((w > 0).sum())
    pred = dict(mode="predictive", n_terms=np.full(5, 54, np.int64), threshold=np.full(5, -np.inf, np.float32),
                pads=(1, 1, 1, 1))
    y, macs = _run(x, w, np.zeros(5, np.float32), other=np.full((2, 5, 10, 10), -1e4, np.float32), **pred)
    assert np.all(y == 0) and macs == 2 * P * npos
    b = np.full(5, -1e4, np.float32)
    o = np.full((2, 5, 10, 10), 2e4, np.float32)
    y, macs = _run(x, w, b, other=o, **pred)
    assert macs == 2 * P * w.size
    _close(y, ee.reference(x, w, b, other=o, pads=(1, 1, 1, 1))[0])
    assert np.all(y > 0)
    y0, macs0 = _run(x, w, b, other=np.zeros_like(o), **pred)
    y1, macs1 = _run(x, w, b, **pred)
    np.testing.assert_array_equal(y0, y1)
    assert macs0 == macs1 == 2 * P * npos


def test_residual_nan_and_inf_in_other_propagate():
    """Conv+Add+Relu lets a NaN through and keeps +inf; -inf gives 0. The op does the same."""
    rng = np.random.default_rng(13)
    x = rng.random((1, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    o = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    o[0, 0, 1, 1], o[0, 1, 2, 2], o[0, 2, 3, 3] = np.nan, np.inf, -np.inf
    (y_ort,) = make_session(ee.onnx_conv_add_relu_model(w, b, x.shape, pads=(1, 1, 1, 1)), threads=1,
                            library=False).run(None, {"X": x, "O": o})
    for sz in (1, 0, 2):  # sparse, dense, stop paths
        y, _ = _run(x, w, b, other=o, skip_zeros=sz, pads=(1, 1, 1, 1))
        assert np.isnan(y[0, 0, 1, 1]) and np.isnan(y_ort[0, 0, 1, 1])
        assert y[0, 1, 2, 2] == np.inf and y[0, 2, 3, 3] == 0
        ok = ~np.isnan(y_ort)
        np.testing.assert_allclose(y[ok], y_ort[ok], rtol=1e-5, atol=1e-5)


@settings(max_examples=max(5, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.sampled_from([0.1, 0.5]), st.booleans())
def test_residual_predictive_matches_reference(case, fraction, nonneg):
    x, w, b = _data(case, nonneg=nonneg)
    o = _other(case, x, w)
    conv = case["conv"]
    n_terms, threshold = ee.calibrate_predictive(x, w, b, fraction=fraction, quantile=0.1, other=o, **conv)
    y, macs = _run(x, w, b, mode="predictive", n_terms=n_terms, threshold=threshold, other=o, **conv)
    y_ref, macs_ref = ee.reference(x, w, b, mode="predictive", n_terms=n_terms, threshold=threshold, other=o, **conv)
    s_n = _partial_at(x, w, b, n_terms, conv) + o  # partial sums on the residual sum
    near = np.abs(s_n - threshold.reshape(1, -1, 1, 1)) <= 1e-4 * (1 + np.abs(s_n))
    np.testing.assert_allclose(y[~near], y_ref[~near], rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(y_ref).max())))


def test_residual_calibration_fits_the_sum():
    """Thresholds fitted with the shortcut differ from the plain ones and lose at most `quantile` of the
    residual sum's positive outputs."""
    rng = np.random.default_rng(14)
    x = np.maximum(rng.standard_normal((2, 8, 10, 10)), 0).astype(np.float32)
    w = (rng.standard_normal((4, 8, 3, 3)) / 8).astype(np.float32)
    b = np.zeros(4, np.float32)
    o = (rng.standard_normal((2, 4, 10, 10)) * 0.5 + 0.3).astype(np.float32)
    conv = dict(pads=(1, 1, 1, 1))
    nt, th = ee.calibrate_predictive(x, w, b, fraction=0.25, quantile=0.1, other=o, **conv)
    _, th_plain = ee.calibrate_predictive(x, w, b, fraction=0.25, quantile=0.1, **conv)
    assert not np.allclose(th, th_plain)
    y_exact, _ = ee.reference(x, w, b, other=o, **conv)
    y_pred, _ = ee.reference(x, w, b, mode="predictive", n_terms=nt, threshold=th, other=o, **conv)
    lost = ((y_exact > 0) & (y_pred == 0)).sum(axis=(0, 2, 3)) / np.maximum(1, (y_exact > 0).sum(axis=(0, 2, 3)))
    assert np.all(lost <= 0.1 + 1e-9)


def test_residual_wrong_shape_is_refused():
    w = np.ones((3, 2, 3, 3), np.float32)
    x = np.ones((2, 2, 5, 5), np.float32)
    s = _session(w, None, x.shape, residual=True, pads=(1, 1, 1, 1))
    for bad in [(2, 3, 5, 4), (1, 3, 5, 5), (2, 4, 5, 5), (2, 3, 25)]:
        with pytest.raises(ORT_ERRORS) as ei:
            s.run(None, {"X": x, "O": np.zeros(bad, np.float32)})
        msg = str(ei.value)
        want = f"EarlyExitConv: input 'other' has shape ({', '.join(map(str, bad))}), expected (2, 3, 5, 5)"
        assert want in msg, msg
    s.run(None, {"X": x, "O": np.zeros((2, 3, 5, 5), np.float32)})  # the right shape runs
    with pytest.raises(ValueError, match="other has shape"):
        ee.reference(x, w, other=np.zeros((2, 3, 5, 4), np.float32), pads=(1, 1, 1, 1))


def test_residual_make_node_inputs():
    node, _ = ee.make_node("X", "W", None, "Y", other="sc")
    assert list(node.input) == ["X", "W", "", "", "", "sc"]
    node, _ = ee.make_node("X", "W", "B", "Y", mode="predictive", n_terms="NT", threshold="TH", other="sc")
    assert list(node.input) == ["X", "W", "B", "NT", "TH", "sc"]
    node, _ = ee.make_node("X", "W", "B", "Y")
    assert list(node.input) == ["X", "W", "B"]


# ------------------------------------------------------------------------------------------ errors
def _raw_model(w, b=None, attrs=None, *, x_shape=(1, 2, 5, 5), extra=None, runtime=("X",), w_runtime=False):
    names = ["X", "W", "B" if b is not None else ""] + list((extra or {}).keys())
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(ee.OP, names, ["Y", "macs"], domain=DOMAIN, **(attrs or {}))
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))]
    inits = []
    arrays = {"W": w, **({"B": b} if b is not None else {}), **(extra or {})}
    for k, v in arrays.items():
        if (k == "W" and w_runtime) or (k in (extra or {}) and k in runtime):
            ins.append(helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        else:
            inits.append(numpy_helper.from_array(v, k))
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                                                 helper.make_tensor_value_info("macs", TensorProto.INT64, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])


def _expect_error(model, match, feeds):
    with pytest.raises(ORT_ERRORS) as ei:
        make_session(model, threads=1).run(None, feeds)
    msg = str(ei.value)
    for m in ([match] if isinstance(match, str) else match):
        assert m in msg, msg


def test_errors_creation():
    w = np.ones((3, 2, 3, 3), np.float32)
    x = {"X": np.ones((1, 2, 5, 5), np.float32)}
    _expect_error(_raw_model(w, attrs={"mode": "fast"}), ["EarlyExitConv", "attribute 'mode' is 'fast', expected 'exact' or 'predictive'"], x)
    _expect_error(_raw_model(w, attrs={"nonneg_input": 2}), ["attribute 'nonneg_input' is 2, expected 0 or 1"], x)
    _expect_error(_raw_model(w, attrs={"skip_zeros": 3}), ["attribute 'skip_zeros' is 3, expected -1 (auto), 0, 1 or 2"], x)
    _expect_error(_raw_model(w, attrs={"mode": "predictive"}), ["mode 'predictive' needs inputs 'n_terms' (3) and 'threshold' (4)"], x)
    _expect_error(_raw_model(w, extra={"NT": np.zeros(3, np.int64), "TH": np.zeros(3, np.float32)}),
                  ["only used in mode 'predictive'"], x)
    _expect_error(_raw_model(w, w_runtime=True), ["input 'W' (1) must be a constant initializer"], {**x, "W": w})
    _expect_error(_raw_model(w.reshape(3, 2, 9)), ["input 'W' has shape (3, 2, 9), expected rank 4"], x)
    _expect_error(_raw_model(w, np.zeros(4, np.float32)), ["input 'B' has shape (4,), expected (3,)"], x)
    _expect_error(_raw_model(w, attrs={"group": 2}), ["expected a multiple of group=2"], x)
    _expect_error(_raw_model(w, attrs={"kernel_shape": [2, 2]}), ["attribute 'kernel_shape' (2, 2) does not match input 'W'"], x)
    big = np.ones((1, 65537, 1, 1), np.float32)
    _expect_error(_raw_model(big, x_shape=(1, 65537, 1, 1)), ["reduction length C/group*KH*KW = 65537, expected at most 65536"],
                  {"X": np.ones((1, 65537, 1, 1), np.float32)})


def test_errors_run_time():
    w = np.ones((3, 2, 3, 3), np.float32)
    x = np.ones((1, 2, 5, 5), np.float32)
    neg = x.copy()
    neg[0, 1, 2, 3] = -0.5
    _expect_error(_raw_model(w), ["EarlyExitConv", "input 'X' has a negative value (-0.5 at flat index 38)",
                                  "expected a non-negative input", "nonneg_input=1"], {"X": neg})
    _expect_error(_raw_model(w, x_shape=(1, 3, 5, 5)), ["input 'X' has 3 channels, expected 2"], {"X": np.ones((1, 3, 5, 5), np.float32)})
    _expect_error(_raw_model(w, x_shape=(2, 5, 5)), ["input 'X' has shape (2, 5, 5), expected rank 4"], {"X": np.ones((2, 5, 5), np.float32)})
    _expect_error(_raw_model(w, x_shape=(1, 2, 2, 2)), ["smaller than the dilated kernel"], {"X": np.ones((1, 2, 2, 2), np.float32)})
    pred = {"mode": "predictive"}
    nt, th = np.array([1, 2, 3], np.int64), np.zeros(3, np.float32)

    def model(nt_arr, th_arr):
        return _raw_model(w, attrs=pred, extra={"NT": nt_arr, "TH": th_arr}, runtime=("NT", "TH"))

    _expect_error(model(nt[:2], th), ["input 'n_terms' has shape (2,), expected (3,)"], {"X": x, "NT": nt[:2], "TH": th})
    _expect_error(model(nt, th[:1]), ["input 'threshold' has shape (1,), expected (3,)"], {"X": x, "NT": nt, "TH": th[:1]})
    bad = np.array([1, 19, 3], np.int64)
    _expect_error(model(bad, th), ["input 'n_terms' entry 1 is 19, expected a value in [0, 18]"], {"X": x, "NT": bad, "TH": th})
    bad = np.array([-1, 1, 3], np.int64)
    _expect_error(model(bad, th), ["input 'n_terms' entry 0 is -1, expected a value in [0, 18]"], {"X": x, "NT": bad, "TH": th})
    nan = np.array([0, np.nan, 0], np.float32)
    _expect_error(model(nt, nan), ["input 'threshold' entry 1 is NaN"], {"X": x, "NT": nt, "TH": nan})
    # predictive + nonneg_input=1 declared: a negative input is refused too
    m = _raw_model(w, attrs={**pred, "nonneg_input": 1}, extra={"NT": nt, "TH": th}, runtime=("NT", "TH"))
    _expect_error(m, ["input 'X' has a negative value"], {"X": neg, "NT": nt, "TH": th})
    # ... but not by default in predictive mode: it just runs without the exact stop
    y, macs = make_session(model(nt, np.full(3, -np.inf, np.float32)), threads=1).run(
        None, {"X": neg, "NT": nt, "TH": np.full(3, -np.inf, np.float32)})
    assert int(macs) == 3 * 9 * 18  # 3x3 outputs, every term


# ------------------------------------------------------------------------------------------ real models
@pytest.mark.parametrize("model", ["lenet5", "alexnet-mnist", "resnet-mnist", "resnet18-mnist"])
def test_exact_on_zoo_models(model):
    """Every Conv(+Add)+ReLU site of the zoo models whose input is non-negative, fed the activations the
    model computes on real held-out digits (batch 3 and 1): all three exact paths equal onnxruntime's own
    Conv(+Add)+Relu, and the sparse path skips exactly the zero inputs; so does the stop path (2)."""
    from onnxzero import zoo
    from onnxzero.bench.op_early_exit import capture, conv_sites, site_models
    from onnxzero.load import load_model
    from onnxzero.passes.normalize import normalize

    if model not in zoo.ENTRIES:
        pytest.skip(f"zoo model {model} not in this checkout")
    m, _ = normalize(load_model(f"zoo:{model}"))
    digits = np.load(zoo.path("mnist"))["inputs"][:3].astype(np.float32)
    sites = conv_sites(m)
    acts = capture(m, sites, digits)
    checked = residual = 0
    for s in sites:
        x = acts[s["x"]]
        if not np.all(x >= 0):
            assert s is sites[0] or model == "resnet18-mnist"  # only a stem reads the signed image
            continue
        feeds = {"X": x} | ({"O": acts[s["other"]]} if s["other"] else {})
        (y_ort,) = make_session(site_models(s, x.shape)[1], threads=2, library=False).run(None, feeds)
        for sz in (0, 1, 2):
            sess = make_session(site_models(s, x.shape, skip_zeros=sz)[0], threads=2)
            for n in (3, 1):
                y, macs = sess.run(None, {k: v[:n] for k, v in feeds.items()})
                _same_as_ort(y, y_ort[:n])
                if sz == 1 and n == 3:
                    assert macs == ee.reference(x, s["w"], s["b"], **s["conv"])[1]
        checked += 1
        residual += s["other"] is not None
    assert checked >= (1 if model == "lenet5" else 4)
    if model.startswith("resnet"):
        assert residual >= 2
