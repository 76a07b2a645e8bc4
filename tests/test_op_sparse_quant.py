"""SparseQuantConv: the compressed format, the kernel vs the numpy reference and vs onnxruntime's Conv+Relu
on the dequantized weights, the macs counter, and every refusal of a malformed stream or node."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxzero import DOMAIN, OP_VERSION
from onnxzero.ops import make_session, single_op_model
from onnxzero.ops import early_exit as ee
from onnxzero.ops import sparse_quant as sq
from onnxzero.ops.conv_relu import onnx_conv_relu_model

EXAMPLES = int(os.environ.get("ONNXZERO_HYPOTHESIS_EXAMPLES", "30"))


def _session(c, b=None, x_shape=(1, 1, 1, 1), *, threads=2, residual=False, sparse_path=1, **conv):
    """sparse_path=1 unless told: the sparse kernel, whose MAC count is the reference's."""
    node, inits = sq.make_node("X", "W", "B" if b is not None else None, "Y", compressed=c, macs_output="macs",
                               other="O" if residual else None, sparse_path=sparse_path, **conv)
    if b is not None:
        inits["B"] = np.asarray(b, np.float32)
    rt = {"O": (TensorProto.FLOAT, None)} if residual else None  # any shape reaches the op: it checks it
    return make_session(single_op_model(node, inits, x_shape, runtime_inputs=rt, outputs=["Y", "macs"]), threads=threads)


def _run(x, c, b=None, *, other=None, threads=2, sparse_path=1, **conv):
    feeds = {"X": x} if other is None else {"X": x, "O": np.asarray(other, np.float32)}
    y, macs = _session(c, b, x.shape, residual=other is not None, threads=threads, sparse_path=sparse_path,
                       **conv).run(None, feeds)
    return y, int(macs)


def _raw_model(inputs: dict, attrs: dict, x_shape=(1, 2, 5, 5), *, runtime=()) -> onnx.ModelProto:
    """A SparseQuantConv model from raw arrays (bypassing make_node), to feed malformed streams."""
    names = ["X"] + [k if v is not None else "" for k, v in inputs.items()]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(sq.OP, names, ["Y", "macs"], domain=DOMAIN, **attrs)
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))]
    inits = []
    for k, v in inputs.items():
        if v is None:
            continue
        if k in runtime:
            graph_inputs.append(helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        else:
            inits.append(numpy_helper.from_array(v, k))
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("macs", TensorProto.INT64, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])


def _good_stream():
    w = np.array([[[[0.5, 0, -0.25], [0, 0, 1.0], [0, 0, 0]], [[0, 0, 0], [0, 0.75, 0], [0, 0, -1.0]]]], np.float32)
    return w, sq.compress(w, threshold=0.0)


def _attrs(c, **over):
    K, Cg, KH, KW = c["weight_shape"]
    a = {"kernel_shape": [KH, KW], "weight_shape": [K, Cg, KH, KW], "frac_bits": c["frac_bits"], "pads": [1, 1, 1, 1]}
    a.update(over)
    return {k: v for k, v in a.items() if v is not None}


def _expect_error(model, match, x_shape=(1, 2, 5, 5), feeds=None):
    with pytest.raises((ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                        ort.capi.onnxruntime_pybind11_state.RuntimeException, ort.capi.onnxruntime_pybind11_state.InvalidGraph)) as ei:
        s = make_session(model, threads=1)
        s.run(None, feeds or {"X": np.ones(x_shape, np.float32)})
    msg = str(ei.value)
    for m in ([match] if isinstance(match, str) else match):
        assert m in msg, msg


# ------------------------------------------------------------------------------------------ format
def test_format_round_trip_and_fillers():
    rng = np.random.default_rng(1)
    w = np.zeros((3, 300, 1, 2), np.float32)  # CRS = 600
    w[0, 0, 0, 0] = 0.9           # position 0: first gap 1
    w[0, 200, 0, 1] = -0.3        # position 401: gap 401 -> one filler (255) + 146
    w[1, 299, 0, 1] = 0.5         # position 599: gap 600 -> two fillers + 90
    w[2] = rng.standard_normal((300, 1, 2)) * 0.1
    c = sq.compress(w, threshold=0.05)
    assert c["values"].dtype == np.int8 and c["index"].dtype == np.uint8 and c["row_ptr"].dtype == np.int64
    assert c["index"].min() >= 1
    assert np.all(c["index"][c["values"] == 0] == 255)
    v0 = c["values"][c["row_ptr"][0]:c["row_ptr"][1]]
    i0 = c["index"][c["row_ptr"][0]:c["row_ptr"][1]]
    assert list(i0) == [1, 255, 146] and v0[1] == 0
    i1 = c["index"][c["row_ptr"][1]:c["row_ptr"][2]]
    assert list(i1) == [255, 255, 90]
    fl = c["frac_bits"]
    assert np.round(0.9 * 2.0 ** fl) <= 127 < np.round(0.9 * 2.0 ** (fl + 1))
    kept = np.where(np.abs(w) >= 0.05, w, 0)
    expect = np.clip(np.round(kept * 2.0 ** fl), -128, 127) * 2.0 ** -fl
    np.testing.assert_array_equal(sq.decompress(c), expect.astype(np.float32))
    stats = sq.compression_stats(w, c)
    assert stats["fillers"] == 3 and stats["entries"] == len(c["values"])
    assert stats["nonzeros"] == np.count_nonzero(expect)
    assert stats["%W_Z"] == pytest.approx(100 * stats["entries"] / w.size)
    assert stats["CR"] == pytest.approx(100 / (stats["%W_Z"] * 16 / 32))


def test_compression_rate_is_the_papers_equation():
    w = np.ones((4, 8, 3, 3), np.float32)
    w[:, :4] = 0  # half kept, no fillers
    stats = sq.compression_stats(w, sq.compress(w, threshold=0.5))
    assert stats["%W_Z"] == pytest.approx(50.0) and stats["CR"] == pytest.approx(4.0)


def test_frac_bits_rule():
    assert sq.frac_bits_for(1.0) == 6       # 64 <= 127 < 128
    assert sq.frac_bits_for(0.99) == 7      # 0.99*128 = 126.7 -> 127
    assert sq.frac_bits_for(200.0) == -1    # 100 fits, 200 does not
    assert sq.frac_bits_for(0.0) == 0


# ------------------------------------------------------------------------------------------ kernel vs reference
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
    prune = draw(st.sampled_from([0.0, 0.3, 0.7, 0.95]))
    seed = draw(st.integers(0, 2**31))
    return dict(x_shape=(n, c, h, w), w_shape=(k, c // group, kh, kw), conv=dict(
        strides=(sh, sw), pads=pads, dilations=(dh, dw), group=group, auto_pad=auto_pad), prune=prune, seed=seed)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_kernel_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal(case["x_shape"]).astype(np.float32)
    w = rng.standard_normal(case["w_shape"]).astype(np.float32)
    b = rng.standard_normal(case["w_shape"][0]).astype(np.float32)
    th = float(np.quantile(np.abs(w), case["prune"])) if case["prune"] else 0.0
    c = sq.compress(w, threshold=th)
    y, macs = _run(x, c, b, **case["conv"])
    y_ref, macs_ref = sq.reference(x, c, b, **case["conv"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(y_ref).max())))
    assert macs == macs_ref


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.booleans())
def test_residual_matches_reference_and_onnxruntime(case, other_first):
    """Residual site: ReLU(compressed conv + b + other), equal to onnxruntime's Conv+Add+Relu on the
    dequantized weights (same zero set, non-zeros within 1e-5 relative); macs do not change."""
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal(case["x_shape"]).astype(np.float32)
    w = rng.standard_normal(case["w_shape"]).astype(np.float32)
    b = rng.standard_normal(case["w_shape"][0]).astype(np.float32)
    th = float(np.quantile(np.abs(w), case["prune"])) if case["prune"] else 0.0
    c = sq.compress(w, threshold=th)
    y0, macs0 = _run(x, c, b, **case["conv"])
    o = (rng.standard_normal(y0.shape) * 3).astype(np.float32)
    y, macs = _run(x, c, b, other=o, **case["conv"])
    y_ref, macs_ref = sq.reference(x, c, b, other=o, **case["conv"])
    scale = max(1.0, float(np.abs(y_ref).max()))
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * scale)
    assert macs == macs_ref == macs0
    _, geo = ee.im2col(x, w.shape, **case["conv"])
    conv = {**case["conv"], "auto_pad": "NOTSET", "pads": tuple(geo.pads)}  # onnxruntime: no SAME_* with dilations
    m = ee.onnx_conv_add_relu_model(sq.decompress(c), b, x.shape, other_first=other_first, **conv)
    (y_ort,) = make_session(m, threads=2, library=False).run(None, {"X": x, "O": o})
    near_zero = np.abs(y_ort) <= 1e-6 * scale
    assert np.array_equal((y == 0)[~near_zero], (y_ort == 0)[~near_zero])
    np.testing.assert_allclose(y, y_ort, rtol=1e-5, atol=2e-6 * scale)
    moved = np.abs(y_ref - y0) > 1e-3  # the shortcut is really added (must not equal the plain op there)
    assert not np.allclose(y[moved], y0[moved]) or not moved.any()


@pytest.mark.parametrize("prune", [0.0, 0.3, 0.5, 0.9])
def test_dense_and_sparse_paths_agree(prune):
    """sparse_path=0 (the GEMM on the dequantized weights) and 1 give the same outputs, with and without a
    shortcut; their MAC counts are the dense and the nonzero count; auto takes the dense path above 60%
    nonzeros and the sparse one below."""
    rng = np.random.default_rng(41)
    x = np.maximum(rng.standard_normal((2, 16, 11, 13)), 0).astype(np.float32)
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    c = sq.compress(w, threshold=float(np.quantile(np.abs(w), prune)) if prune else 0.0)
    conv = dict(pads=(1, 1, 1, 1))
    y_ref, nnz_macs = sq.reference(x, c, b, **conv)
    dense_macs = 2 * 11 * 13 * w.size
    o = rng.standard_normal(y_ref.shape).astype(np.float32)
    y_res = sq.reference(x, c, b, other=o, **conv)[0]
    auto = dense_macs if nnz_macs > sq.dense_above(11 * 13, 16 * 9) * dense_macs else nnz_macs
    assert sq.kernel_macs_per_position(c, positions=11 * 13) * 2 * 11 * 13 == auto
    for sp, want in ((0, dense_macs), (1, nnz_macs), (None, auto)):
        y, macs = _run(x, c, b, sparse_path=sp, **conv)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
        assert macs == want
        y, _ = _run(x, c, b, other=o, sparse_path=sp, **conv)
        np.testing.assert_allclose(y, y_res, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw,prune,cin,dense", [
    ((7, 7), 0.5, 16, False),    # 49 positions: the sparse kernel at 50 % nonzeros
    ((4, 4), 0.5, 16, True),     # 16 positions: a tiny map goes dense from 30 % nonzeros
    ((4, 4), 0.9, 16, False),    # ... and stays sparse at 10 %
    ((16, 16), 0.9, 1, True),    # a stem (reduction 1x3x3 = 9 < 32): always dense
])
def test_auto_path_size_term(hw, prune, cin, dense):
    """The automatic choice depends on the density, the map size and the reduction length, per run; the
    Python mirror (kernel_macs_per_position) agrees with the kernel's count."""
    rng = np.random.default_rng(43)
    x = np.maximum(rng.standard_normal((1, cin, *hw)), 0).astype(np.float32)
    w = rng.standard_normal((16, cin, 3, 3)).astype(np.float32)
    c = sq.compress(w, threshold=float(np.quantile(np.abs(w), prune)))
    y_ref, nnz_macs = sq.reference(x, c, None, pads=(1, 1, 1, 1))
    y, macs = _run(x, c, None, sparse_path=None, pads=(1, 1, 1, 1))
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    P = hw[0] * hw[1]
    assert macs == (P * w.size if dense else nnz_macs)
    assert macs == P * sq.kernel_macs_per_position(c, positions=P)


@pytest.mark.parametrize("x_shape,k,group,stride", [
    ((1, 64, 4, 4), 128, 1, 1),   # 16 positions: one block of 2 accumulators
    ((2, 48, 3, 3), 96, 2, 1),    # 9 positions, two groups, two images
    ((1, 40, 5, 6), 64, 1, 2),    # stride 2: 3x3 = 9 positions
    ((3, 32, 2, 3), 64, 1, 1),    # 6 positions: one accumulator
])
@pytest.mark.parametrize("residual", [False, True])
def test_small_maps_whole_filter_path(x_shape, k, group, stride, residual):
    """Maps of <= 16 positions with many filters read each filter's terms over the whole reduction
    against the shared im2col (no chunks): the same outputs as the reference, and the same MACs."""
    rng = np.random.default_rng(47)
    x = np.maximum(rng.standard_normal(x_shape), 0).astype(np.float32)
    w = rng.standard_normal((k, x_shape[1] // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    c = sq.compress(w, threshold=float(np.quantile(np.abs(w), 0.9)))
    conv = dict(pads=(1, 1, 1, 1), group=group, strides=(stride, stride))
    y0, _ = sq.reference(x, c, b, **conv)
    o = rng.standard_normal(y0.shape).astype(np.float32) if residual else None
    y_ref, macs_ref = sq.reference(x, c, b, other=o, **conv)
    for sp in (1, None):  # forced sparse, and the automatic choice (sparse at 10 % nonzeros)
        y, macs = _run(x, c, b, other=o, sparse_path=sp, **conv)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
        assert macs == macs_ref


def test_residual_nan_propagates_and_wrong_shape_is_refused():
    w, c = _good_stream()
    x = np.ones((2, 2, 5, 5), np.float32)
    o = np.zeros((2, 1, 5, 5), np.float32)
    o[0, 0, 2, 2], o[1, 0, 0, 0], o[1, 0, 4, 4] = np.nan, np.inf, -np.inf
    y, _ = _run(x, c, other=o, pads=(1, 1, 1, 1))
    assert np.isnan(y[0, 0, 2, 2]) and y[1, 0, 0, 0] == np.inf and y[1, 0, 4, 4] == 0
    ok = np.isfinite(o)
    y_ref, _ = sq.reference(x, c, other=np.where(ok, o, 0), pads=(1, 1, 1, 1))
    np.testing.assert_allclose(y[ok], y_ref[ok], rtol=1e-5)
    s = _session(c, None, x.shape, residual=True, pads=(1, 1, 1, 1))
    for bad in [(2, 1, 5, 4), (1, 1, 5, 5), (2, 2, 5, 5), (2, 25)]:
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument) as ei:
            s.run(None, {"X": x, "O": np.zeros(bad, np.float32)})
        want = f"SparseQuantConv: input 'other' has shape ({', '.join(map(str, bad))}), expected (2, 1, 5, 5)"
        assert want in str(ei.value), str(ei.value)
    node, _ = sq.make_node("X", "W", None, "Y", compressed=c, other="sc")
    assert list(node.input) == ["X", "W_values", "W_index", "W_row_ptr", "", "sc"]
    node, _ = sq.make_node("X", "W", None, "Y", compressed=c)
    assert list(node.input) == ["X", "W_values", "W_index", "W_row_ptr"]


@pytest.mark.parametrize("x_shape,w_shape,conv", [
    ((1, 16, 23, 19), (24, 16, 3, 3), dict(pads=(1, 1, 1, 1))),                      # several position blocks, tail
    ((1, 40, 6, 6), (96, 40, 3, 3), dict(pads=(1, 1, 1, 1))),                        # one block, filter blocks (shared im2col)
    ((2, 3, 30, 30), (16, 3, 7, 7), dict(strides=(2, 2), pads=(3, 3, 3, 3))),        # strided stem
    ((1, 32, 12, 12), (16, 32, 1, 1), {}),                                           # 1x1
    ((1, 600, 3, 3), (8, 600, 1, 1), {}),                                            # reduction > 256: several chunks
    ((1, 8, 9, 9), (8, 1, 3, 3), dict(pads=(2, 2, 2, 2), dilations=(2, 2), group=8)),  # depthwise dilated
])
@pytest.mark.parametrize("threads", [1, 2])
def test_no_pruning_matches_onnxruntime(x_shape, w_shape, conv, threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32) * 0.1
    c = sq.compress(w, threshold=0.0)
    y, macs = _session(c, b, x_shape, threads=threads, **conv).run(None, {"X": x})
    wq = sq.decompress(c)
    ref = make_session(onnx_conv_relu_model(wq, b, x_shape, **conv), threads=threads, library=False)
    (y_ort,) = ref.run(None, {"X": x})
    np.testing.assert_allclose(y, y_ort, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(y_ort).max())))
    oh, ow = y.shape[2:]
    assert int(macs) == x_shape[0] * oh * ow * np.count_nonzero(wq)


def test_macs_exact_and_nothing_skipped_when_nothing_pruned():
    w = np.full((4, 3, 3, 3), 0.5, np.float32)
    w[1] = -0.25
    c = sq.compress(w, threshold=0.0)
    x = np.ones((2, 3, 8, 8), np.float32)
    y, macs = _run(x, c, None, pads=(1, 1, 1, 1))
    assert macs == 2 * 8 * 8 * w.size  # every weight kept, every position
    c = sq.compress(w, threshold=0.3)  # filter 1 pruned away entirely
    y, macs = _run(x, c, None, pads=(1, 1, 1, 1))
    assert macs == 2 * 8 * 8 * 3 * 27 and np.all(y[:, 1] == 0)


def test_all_pruned_gives_relu_bias():
    w = np.full((3, 2, 3, 3), 0.01, np.float32)
    c = sq.compress(w, threshold=1.0)
    assert c["values"].size == 0
    b = np.array([1.0, -1.0, 0.5], np.float32)
    y, macs = _run(np.ones((1, 2, 5, 5), np.float32), c, b)
    assert macs == 0
    np.testing.assert_array_equal(y[0, :, 0, 0], [1.0, 0.0, 0.5])


def test_concurrent_runs_on_one_session():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    c = sq.compress(w, threshold=0.5)
    s = _session(c, None, (1, 16, 20, 20), pads=(1, 1, 1, 1))
    xs = [rng.standard_normal((1, 16, 20, 20)).astype(np.float32) for _ in range(8)]
    with ThreadPoolExecutor(4) as ex:
        ys = list(ex.map(lambda x: s.run(None, {"X": x})[0], xs))
    for x, y in zip(xs, ys):
        np.testing.assert_allclose(y, sq.reference(x, c, None, pads=(1, 1, 1, 1))[0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ errors
def _inputs(c, **over):
    d = {"values": c["values"], "index": c["index"], "row_ptr": c["row_ptr"], "B": None}
    d.update(over)
    return d


def test_errors_node():
    w, c = _good_stream()
    _expect_error(_raw_model(_inputs(c), _attrs(c, kernel_shape=None)), ["SparseQuantConv", "'kernel_shape' is required"])
    _expect_error(_raw_model(_inputs(c), _attrs(c, weight_shape=None)), ["'channels' (C/group) or 'weight_shape' is required"])
    _expect_error(_raw_model(_inputs(c), _attrs(c, frac_bits=None)), ["'frac_bits' is required"])
    _expect_error(_raw_model(_inputs(c), _attrs(c, frac_bits=99)), ["'frac_bits' is 99, expected a value in [-64, 64]"])
    _expect_error(_raw_model(_inputs(c), _attrs(c, weight_shape=[2, 2, 3, 3])), ["'weight_shape'", "K=2, expected 1"])
    _expect_error(_raw_model(_inputs(c), _attrs(c, weight_shape=[1, 2, 3, 2])), ["does not match attribute 'kernel_shape'"])
    _expect_error(_raw_model(_inputs(c), _attrs(c, channels=3)), ["'channels' is 3, expected 2"])
    _expect_error(_raw_model(_inputs(c), _attrs(c, sparse_path=3)), ["attribute 'sparse_path' is 3, expected -1 (auto), 0 or 1"])
    _expect_error(_raw_model(_inputs(c), _attrs(c, strides=[1, 1, 1])), ["'strides'", "expected 2"])
    _expect_error(_raw_model(_inputs(c), _attrs(c, group=2, weight_shape=[1, 1, 3, 3])), ["K=1 filters, expected a multiple of group=2"])
    _expect_error(_raw_model(_inputs(c, B=np.zeros(2, np.float32)), _attrs(c)), ["input 'B' has shape (2,), expected (1,)"])
    _expect_error(_raw_model(_inputs(c), _attrs(c), runtime=("values",)), ["input 'values'", "must be a constant initializer"])
    _expect_error(_raw_model(_inputs(c, B=np.zeros(1, np.float32)), _attrs(c), runtime=("B",)),
                  ["input 'B'", "must be a constant initializer"])


def test_errors_run_time_shapes():
    w, c = _good_stream()
    m = _raw_model(_inputs(c), _attrs(c), x_shape=(1, 3, 5, 5))
    _expect_error(m, ["SparseQuantConv", "input 'X' has 3 channels, expected 2"], x_shape=(1, 3, 5, 5))
    m = _raw_model(_inputs(c), _attrs(c), x_shape=(2, 5, 5))
    _expect_error(m, ["input 'X' has shape (2, 5, 5), expected rank 4"], x_shape=(2, 5, 5))


def test_errors_malformed_stream():
    w, c = _good_stream()
    v, i, r = c["values"], c["index"], c["row_ptr"]
    cases = [
        (dict(index=i[:-1]), ["input 'index' has", "entries, expected", "length of input 'values'"]),
        (dict(values=v.reshape(1, -1), index=i.reshape(1, -1)), ["input 'values' has shape", "expected rank 1"]),
        (dict(row_ptr=np.array([0], np.int64)), ["input 'row_ptr' has shape (1,), expected (K+1,)"]),
        (dict(row_ptr=np.array([1, len(v)], np.int64)), ["input 'row_ptr' starts at 1, expected 0"]),
        (dict(row_ptr=np.array([0, len(v) + 1], np.int64)), ["input 'row_ptr' entry 1 is", "expected a value in [0,"]),
        (dict(row_ptr=np.array([0, len(v) - 1], np.int64)), ["input 'row_ptr' ends at", "expected"]),
        (dict(index=np.where(np.arange(len(i)) == 1, 0, i).astype(np.uint8)), ["input 'index' entry 1", "is 0, expected a gap in [1, 255]"]),
        (dict(index=np.full(len(i), 200, np.uint8)), ["input 'index'", "expected positions < C/group*KH*KW = 18"]),
        (dict(values=np.where(np.arange(len(v)) == 2, 0, v).astype(np.int8)),
         ["input 'values' entry 2", "is 0 with gap", "(0 only in fillers, whose gap is 255)"]),
    ]
    for over, match in cases:
        _expect_error(_raw_model(_inputs(c, **over), _attrs(c)), match)
    # non-monotone row_ptr over two filters
    w2 = np.concatenate([w, w])
    c2 = sq.compress(w2, threshold=0.0)
    bad = c2["row_ptr"].copy()
    bad[1] = bad[2] + 1
    _expect_error(_raw_model(_inputs(c2, row_ptr=bad), _attrs(c2)), ["input 'row_ptr' entry 1 is", "non-decreasing"])


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31))
def test_random_streams_are_refused_or_correct(n, seed):
    """Arbitrary (values, index) streams: the kernel either refuses them with a message or agrees with
    the reference; never a crash or an out-of-bounds read (the ASan target runs this too)."""
    rng = np.random.default_rng(seed)
    K, Cg, KH, KW = 2, 2, 3, 3
    values = rng.integers(-128, 128, n).astype(np.int8)
    index = rng.choice([0, 1, 2, 5, 9, 17, 255], n).astype(np.uint8)
    cut = int(rng.integers(0, n + 1))
    row_ptr = np.array([0, cut, n], np.int64)
    c = {"values": values, "index": index, "row_ptr": row_ptr, "frac_bits": 7, "weight_shape": (K, Cg, KH, KW)}
    model = _raw_model(_inputs(c), {**_attrs(c), "sparse_path": 1})  # the sparse kernel reads the stream
    try:
        valid_ref = sq._positions(c) is not None
    except ValueError:
        valid_ref = False
    if not valid_ref:
        _expect_error(model, "SparseQuantConv")
        return
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    y, macs = make_session(model, threads=2).run(None, {"X": x})
    y_ref, macs_ref = sq.reference(x, c, None, pads=(1, 1, 1, 1))
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    assert int(macs) == macs_ref
