"""ConvRelu (dense Conv+bias+ReLU on the packed GEMM core) vs numpy and vs onnxruntime's Conv+Relu."""

from __future__ import annotations

import os

import numpy as np
from conftest import run_concurrently
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxzero import DOMAIN, OP_VERSION
from onnxzero.ops import conv_relu as cr
from onnxzero.ops.session import make_session, single_op_model

# ASan runs (runtime_ops/asan/run.sh) set this to keep the suite cheap.
EXAMPLES = int(os.environ.get("ONNXZERO_HYPOTHESIS_EXAMPLES", "60"))


def _model(x_shape, w, b, *, macs=True, **attrs):
    node, extra = cr.make_node("X", "W", "B" if b is not None else None, "Y", macs_output="macs" if macs else None,
                               **attrs)
    inits = {"W": w, **({"B": b} if b is not None else {}), **extra}
    return single_op_model(node, inits, x_shape)


def _run(x, w, b=None, *, threads=2, **attrs):
    sess = make_session(_model(x.shape, w, b, **attrs), threads=threads)
    y, macs = sess.run(None, {"X": x})
    return y, int(macs)


def _close(y, ref, scale):
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, scale))


@st.composite
def conv_case(draw):
    n = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["dense", "dense", "depthwise", "grouped"]))
    if kind == "dense":
        group, cg, kg = 1, draw(st.integers(1, 9)), draw(st.integers(1, 20))
    elif kind == "depthwise":
        group, cg, kg = draw(st.integers(1, 8)), 1, draw(st.integers(1, 2))
    else:
        group, cg, kg = draw(st.integers(2, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 7))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4)) if auto_pad == "NOTSET" else None
    ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    lo_h = max(1, ekh - (0 if pads is None else pads[0] + pads[2]))
    lo_w = max(1, ekw - (0 if pads is None else pads[1] + pads[3]))
    h, w = draw(st.integers(lo_h, lo_h + 20)), draw(st.integers(lo_w, lo_w + 40))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    attrs = dict(strides=(sh, sw), dilations=(dh, dw), group=group, auto_pad=auto_pad)
    if pads is not None:
        attrs["pads"] = pads
    if draw(st.booleans()):
        attrs["kernel_shape"] = (kh, kw)
    return (n, cg * group, h, w), (kg * group, cg, kh, kw), bias, attrs, seed


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_case())
def test_matches_reference(case):
    x_shape, w_shape, bias, attrs, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32) if bias else None
    y, macs = _run(x, w, b, **attrs)
    ref, ref_macs = cr.reference(x, w, b, **attrs)
    assert y.shape == ref.shape
    _close(y, ref, np.sqrt(w_shape[1] * w_shape[2] * w_shape[3]))
    assert macs == ref_macs


@settings(max_examples=max(5, EXAMPLES // 3), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_case())
def test_matches_onnxruntime_conv_relu(case):
    x_shape, w_shape, bias, attrs, seed = case
    # onnxruntime's Conv refuses dilations with SAME_* auto_pad (the numpy reference covers those).
    assume(not (attrs["auto_pad"].startswith("SAME") and attrs["dilations"] != (1, 1)))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32) if bias else None
    y, _ = _run(x, w, b, **attrs)
    ref = make_session(cr.onnx_conv_relu_model(w, b, x_shape, **attrs), threads=2, library=False).run(None, {"X": x})[0]
    _close(y, ref, np.sqrt(w_shape[1] * w_shape[2] * w_shape[3]))


# The benchmark layers (cut to batch 1) and edge shapes of the GEMM core: row panels (K % 6),
# column panels (P % 16), several reduction blocks (CRS > 320), strided 7x7 stem, 1x1 fast path.
LAYERS = [
    ((1, 64, 56, 56), (64, 64, 3, 3), dict(pads=(1, 1, 1, 1))),
    ((1, 128, 28, 28), (128, 128, 3, 3), dict(pads=(1, 1, 1, 1))),
    ((1, 256, 14, 14), (256, 256, 3, 3), dict(pads=(1, 1, 1, 1))),
    ((1, 512, 7, 7), (512, 512, 3, 3), dict(pads=(1, 1, 1, 1))),
    ((1, 256, 56, 56), (64, 256, 1, 1), {}),
    ((1, 3, 224, 224), (64, 3, 7, 7), dict(strides=(2, 2), pads=(3, 3, 3, 3))),
    ((2, 37, 13, 11), (23, 37, 3, 3), dict(pads=(0, 1, 2, 0))),
    ((3, 70, 9, 17), (13, 70, 1, 1), {}),
    ((1, 8, 31, 33), (8, 1, 3, 3), dict(group=8, pads=(1, 1, 1, 1))),
    ((2, 12, 20, 20), (18, 4, 3, 3), dict(group=3, strides=(2, 2), auto_pad="SAME_UPPER")),
    ((1, 5, 40, 50), (7, 5, 3, 3), dict(strides=(3, 3), dilations=(2, 2), pads=(2, 2, 2, 2))),
    # packed tiles whose last 1..4 columns take the dot-product tail kernel (OH*OW % 16 = 4, 3, 2)
    ((1, 16, 6, 6), (64, 16, 3, 3), dict(pads=(1, 1, 1, 1))),
    ((2, 8, 5, 7), (48, 8, 3, 3), dict(pads=(1, 1, 1, 1))),
    ((1, 8, 2, 17), (60, 8, 3, 3), dict(pads=(1, 1, 1, 1))),
    # stride 2 (phase slab) and 1x1 with few rows (pack-free paths)
    ((2, 6, 23, 29), (5, 6, 3, 3), dict(strides=(2, 2), pads=(1, 0, 1, 2))),
    ((1, 40, 9, 9), (3, 40, 1, 1), {}),
    # MLAS's pointwise kernel (1x1, no padding): strided rows, 128-channel batches with a remainder,
    # and a padded 1x1 that must stay on the general kernel
    ((2, 512, 14, 14), (1024, 512, 1, 1), dict(strides=(2, 2))),
    ((1, 160, 7, 9), (32, 160, 1, 1), {}),
    ((1, 32, 5, 5), (16, 32, 1, 1), dict(pads=(1, 1, 1, 1))),
]


@pytest.mark.parametrize("x_shape,w_shape,attrs", LAYERS, ids=[f"{a[1]}-{a[0]}" for a in LAYERS])
def test_layers_match_onnxruntime(x_shape, w_shape, attrs):
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal(x_shape), 0).astype(np.float32)
    w = (rng.standard_normal(w_shape) * np.sqrt(2.0 / np.prod(w_shape[1:]))).astype(np.float32)
    b = (rng.standard_normal(w_shape[0]) * 0.1).astype(np.float32)
    y, macs = _run(x, w, b, **attrs)
    ref = make_session(cr.onnx_conv_relu_model(w, b, x_shape, **attrs), threads=2, library=False).run(None, {"X": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    assert macs == cr.reference(x[:1], w, b, **attrs)[1] * x_shape[0]


def test_no_bias_no_macs_output_and_single_thread():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 10, 12, 12)).astype(np.float32)
    w = rng.standard_normal((9, 10, 3, 3)).astype(np.float32)
    sess = make_session(_model(x.shape, w, None, macs=False, pads=(1, 1, 1, 1)), threads=1)
    (y,) = sess.run(None, {"X": x})
    _close(y, cr.reference(x, w, None, pads=(1, 1, 1, 1))[0], 10)


def test_batch_size_changes_between_runs_and_relu_zeros():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    b = np.full(16, -1e6, np.float32)  # every output negative before ReLU
    sess = make_session(_model((1, 4, 9, 9), w, b), threads=2)
    for n in (1, 3, 2):
        x = rng.standard_normal((n, 4, 9, 9)).astype(np.float32)
        y, macs = sess.run(None, {"X": x})
        assert y.shape == (n, 16, 7, 7) and not y.any()
        assert int(macs) == n * 16 * 49 * 36


def test_concurrent_runs_on_one_session():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((20, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    sess = make_session(_model((1, 8, "H", "W"), w, b, pads=(1, 1, 1, 1)), threads=2)
    xs = [rng.standard_normal((1 + i % 2, 8, 30 - i, 30 + i)).astype(np.float32) for i in range(6)]
    refs = [cr.reference(x, w, b, pads=(1, 1, 1, 1))[0] for x in xs]

    def worker(i):
        for _ in range(5):
            y, _ = sess.run(None, {"X": xs[i]})
            _close(y, refs[i], 10)

    run_concurrently(range(len(xs)), worker)


# --- errors: refused at session creation (attribute / constant problems) or at run time (input shapes)

def _session(model):
    return make_session(model, threads=1)


def _node(inputs, **attrs):
    return helper.make_node("ConvRelu", inputs, ["Y", "macs"], domain=DOMAIN, **attrs)


def _unshaped_x_model(node, inits):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("macs", TensorProto.INT64, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])


def test_error_x_rank():
    w = np.ones((4, 3, 3, 3), np.float32)
    sess = _session(_unshaped_x_model(_node(["X", "W"]), {"W": w}))
    with pytest.raises(Exception, match=r"ConvRelu: input 'X' has shape \(3, 8, 8\), expected rank 4"):
        sess.run(None, {"X": np.ones((3, 8, 8), np.float32)})


def test_error_channel_mismatch():
    w = np.ones((4, 3, 3, 3), np.float32)
    sess = _session(_model((1, "C", 8, 8), w, None))
    with pytest.raises(Exception, match=r"ConvRelu: input 'X' has 5 channels, expected 3"):
        sess.run(None, {"X": np.ones((1, 5, 8, 8), np.float32)})


def test_error_input_smaller_than_kernel():
    w = np.ones((4, 3, 5, 5), np.float32)
    sess = _session(_model((1, 3, "H", "W"), w, None))
    with pytest.raises(Exception, match=r"ConvRelu: input 'X' of spatial size 3x8 .* smaller than the dilated kernel 5x5"):
        sess.run(None, {"X": np.ones((1, 3, 3, 8), np.float32)})


def test_error_weight_not_constant():
    node = _node(["X", "W"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3, 3, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("macs", TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])
    with pytest.raises(Exception, match=r"ConvRelu: input 'W' \(1\) must be a constant initializer"):
        _session(model)


def test_error_bias_not_constant():
    node = _node(["X", "W", "B"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])
    with pytest.raises(Exception, match=r"ConvRelu: input 'B' \(2\) must be a constant initializer"):
        _session(model)


@pytest.mark.parametrize("w_shape,b_shape,attrs,message", [
    ((4, 3, 3), None, {}, r"input 'W' has shape \(4, 3, 3\), expected rank 4"),
    ((4, 3, 3, 3), (5,), {}, r"input 'B' has shape \(5,\), expected \(4,\)"),
    ((5, 3, 3, 3), None, dict(group=2), r"input 'W' has 5 output channels, expected a multiple of group=2"),
    ((4, 3, 3, 3), None, dict(kernel_shape=[3, 2]), r"attribute 'kernel_shape' \(3, 2\) does not match input 'W'"),
    ((4, 3, 3, 3), None, dict(kernel_shape=[3, 3, 3]), r"attribute 'kernel_shape' has 3 values, expected 2"),
    ((4, 3, 3, 3), None, dict(strides=[0, 1]), r"attribute 'strides' \(0, 1\), expected values >= 1"),
    ((4, 3, 3, 3), None, dict(pads=[1, -1, 1, 1]), r"attribute 'pads' \(1, -1, 1, 1\), expected values >= 0"),
    ((4, 3, 3, 3), None, dict(dilations=[1]), r"attribute 'dilations' has 1 values, expected 2"),
    ((4, 3, 3, 3), None, dict(auto_pad="SAME"), r"attribute 'auto_pad' is 'SAME', expected NOTSET, VALID"),
    ((4, 3, 3, 3), None, dict(group=0), r"attribute 'group' is 0, expected >= 1"),
])
def test_errors_at_session_creation(w_shape, b_shape, attrs, message):
    inits = {"W": np.ones(w_shape, np.float32)}
    inputs = ["X", "W"]
    if b_shape is not None:
        inits["B"] = np.ones(b_shape, np.float32)
        inputs.append("B")
    model = single_op_model(_node(inputs, **attrs), inits, (1, 3, 8, 8))
    with pytest.raises(Exception, match="ConvRelu: " + message):
        _session(model)


def test_error_weight_element_type():
    model = single_op_model(_node(["X", "W"]), {"W": np.ones((4, 3, 3, 3), np.float64)}, (1, 3, 8, 8))
    with pytest.raises(Exception, match=r"(?s)W.*double|double.*W"):
        _session(model)


def test_empty_batch():
    w = np.ones((4, 3, 3, 3), np.float32)
    sess = _session(_model((1, 3, 8, 8), w, None))
    y, macs = sess.run(None, {"X": np.ones((0, 3, 8, 8), np.float32)})
    assert y.shape == (0, 4, 6, 6) and int(macs) == 0


def test_bench_framework_smoke():
    """onnxzero.bench.ops end to end on one layer (no timing asserted: the ratio is only reported)."""
    import io

    from rich.console import Console

    from onnxzero.bench.ops import TARGETS, discover, missed_targets, render_table, run_ops_bench

    assert {"ConvRelu", "LazyConv"} <= set(discover())
    records = run_ops_bench(ops=["ConvRelu", "lazy"], layers=["512x7x7"], skips=[0.0, 0.5], runs=2, threads=1)
    by = {(r["op"], r["skip_target"]): r for r in records}
    assert set(by) == {("ConvRelu", 0.0), ("LazyConv", 0.0), ("LazyConv", 0.5)}  # ConvRelu: skip 0 only
    for r in records:
        assert "error" not in r, r
        assert {"op", "layer", "skip_target", "skip", "ratio", "op_ms", "ort_ms", "setting"} <= set(r)
        assert r["ratio"] > 0 and r["layer"] == "3x3 512x7x7"
    assert by[("ConvRelu", 0.0)]["skip"] == 0.0 and by[("LazyConv", 0.5)]["skip"] == 0.5
    out = io.StringIO()
    render_table(records, Console(file=out, width=160))
    assert "LazyConv" in out.getvalue() and "512x7x7" in out.getvalue()
    assert TARGETS["LazyConv"][0.9] == 0.25
    assert all(m["op"] in TARGETS for m in missed_targets(records))
    with pytest.raises(ValueError, match="unknown op"):
        run_ops_bench(ops=["nope"], runs=1)


# --- residual sites: Conv(+B) -> Add(other) -> Relu as one ConvRelu with the optional input `other`

def _res_model(x_shape, w, b, **attrs):
    node, extra = cr.make_node("X", "W", "B" if b is not None else None, "Y", macs_output="macs", other="O", **attrs)
    inits = {"W": w, **({"B": b} if b is not None else {}), **extra}
    return single_op_model(node, inits, x_shape, runtime_inputs={"O": (TensorProto.FLOAT, None)})


def _res_inputs(case):
    x_shape, w_shape, bias, attrs, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32) if bias else None
    g = cr.geometry(x_shape, w_shape, **attrs)
    # the shortcut at the conv output's scale, so the sum's sign varies
    o = (rng.standard_normal((x_shape[0], g.K, g.OH, g.OW)) * np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
    return x, w, b, o


@settings(max_examples=max(10, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_case())
def test_residual_matches_reference(case):
    x, w, b, o = _res_inputs(case)
    attrs = case[3]
    y, macs = make_session(_res_model(x.shape, w, b, **attrs), threads=2).run(None, {"X": x, "O": o})
    ref, ref_macs = cr.reference(x, w, b, other=o, **attrs)
    plain, plain_macs = cr.reference(x, w, b, **attrs)
    _close(y, ref, np.sqrt(np.prod(w.shape[1:])))
    assert int(macs) == ref_macs == plain_macs  # `other` adds no MACs
    if (o != 0).any() and (ref > 0).any():
        assert not np.array_equal(ref, plain)  # the case does exercise the residual


@settings(max_examples=max(5, EXAMPLES // 3), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_case())
def test_residual_matches_onnxruntime_conv_add_relu(case):
    attrs = case[3]
    assume(not (attrs["auto_pad"].startswith("SAME") and attrs["dilations"] != (1, 1)))
    x, w, b, o = _res_inputs(case)
    y, _ = make_session(_res_model(x.shape, w, b, **attrs), threads=2).run(None, {"X": x, "O": o})
    ref = make_session(cr.onnx_conv_relu_model(w, b, x.shape, residual=True, **attrs), threads=2,
                       library=False).run(None, {"X": x, "O": o})[0]
    _close(y, ref, np.sqrt(np.prod(w.shape[1:])))


@pytest.mark.parametrize("x_shape,w_shape,attrs", LAYERS[:4] + LAYERS[6:], ids=[f"{a[1]}-{a[0]}" for a in LAYERS[:4] + LAYERS[6:]])
def test_residual_layers_match_onnxruntime(x_shape, w_shape, attrs):
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal(x_shape), 0).astype(np.float32)
    w = (rng.standard_normal(w_shape) * np.sqrt(2.0 / np.prod(w_shape[1:]))).astype(np.float32)
    b = (rng.standard_normal(w_shape[0]) * 0.1).astype(np.float32)
    g = cr.geometry(x_shape, w_shape, **attrs)
    o = rng.standard_normal((x_shape[0], g.K, g.OH, g.OW)).astype(np.float32)
    y, macs = make_session(_res_model(x_shape, w, b, **attrs), threads=2).run(None, {"X": x, "O": o})
    ref = make_session(cr.onnx_conv_relu_model(w, b, x_shape, residual=True, **attrs), threads=2,
                       library=False).run(None, {"X": x, "O": o})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    assert int(macs) == x_shape[0] * g.macs


def test_residual_without_bias_and_node_layout():
    node, _ = cr.make_node("X", "W", None, "Y", other="O")
    assert list(node.input) == ["X", "W", "", "O"]  # `other` is always the last input
    node, _ = cr.make_node("X", "W", "B", "Y")
    assert list(node.input) == ["X", "W", "B"]
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    o = rng.standard_normal((2, 5, 6, 6)).astype(np.float32)
    y, _ = make_session(_res_model(x.shape, w, None, pads=(1, 1, 1, 1)), threads=1).run(None, {"X": x, "O": o})
    _close(y, cr.reference(x, w, None, other=o, pads=(1, 1, 1, 1))[0], 6)
    # a very negative shortcut zeroes everything, a very positive one passes through
    y, _ = make_session(_res_model(x.shape, w, None, pads=(1, 1, 1, 1)), threads=1).run(None, {"X": x, "O": o - 1e6})
    assert not y.any()


@pytest.mark.parametrize("o_shape,message", [
    ((1, 5, 6, 6), r"ConvRelu: input 'other' has shape \(1, 5, 6, 6\), expected \(2, 5, 6, 6\)"),
    ((2, 4, 6, 6), r"ConvRelu: input 'other' has shape \(2, 4, 6, 6\), expected \(2, 5, 6, 6\)"),
    ((2, 5, 6), r"ConvRelu: input 'other' has shape \(2, 5, 6\), expected \(2, 5, 6, 6\)"),
    ((2, 5, 4, 4), r"ConvRelu: input 'other' has shape \(2, 5, 4, 4\), expected \(2, 5, 6, 6\) \(the conv output's shape\)"),
])
def test_error_residual_shape(o_shape, message):
    w = np.ones((5, 3, 3, 3), np.float32)
    sess = _session(_res_model((2, 3, 6, 6), w, None, pads=(1, 1, 1, 1)))
    with pytest.raises(Exception, match=message):
        sess.run(None, {"X": np.ones((2, 3, 6, 6), np.float32), "O": np.ones(o_shape, np.float32)})
    with pytest.raises(ValueError, match=message):
        cr.reference(np.ones((2, 3, 6, 6), np.float32), w, None, other=np.ones(o_shape), pads=(1, 1, 1, 1))


def test_library_runs_no_code_at_load_time():
    """The CPUID check in RegisterCustomOps must run before any AVX2 code: the library may have no
    dynamic initializers (static constructors run at dlopen, before any check). Its .init_array holds
    only the toolchain's frame_dummy entry."""
    import struct

    from onnxzero import get_library_path

    data = open(get_library_path(), "rb").read()
    if b"__asan_init" in data:
        pytest.skip("an AddressSanitizer build: ASan adds its own module constructors")
    assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]

    def name(sec):
        end = data.index(b"\0", names_off + sec[0])
        return data[names_off + sec[0]:end].decode()

    sizes = {name(s): s[5] for s in sections}
    assert sizes.get(".init_array", 0) <= 8, f".init_array has {sizes['.init_array'] // 8} entries: a static initializer crept in"
    assert ".ctors" not in sizes or sizes[".ctors"] <= 16


# --- the MLAS direct-convolution path (K % 8 == 0, group 1, C % 8 == 0 or C < 8): its edges

NCHWC_LAYERS = [
    ((1, 1, 28, 28), (64, 1, 3, 3), dict(pads=(1, 1, 1, 1))),  # the stem: NCHW-input kernel
    ((2, 3, 17, 19), (16, 3, 5, 5), dict(strides=(2, 2), pads=(2, 1, 2, 3))),
    ((1, 512, 4, 4), (512, 512, 3, 3), dict(pads=(1, 1, 1, 1))),  # 16 filter sets, 4x4 maps
    ((1, 16, 9, 9), (40, 16, 3, 3), dict(pads=(1, 1, 1, 1))),  # 5 filter blocks: a set of 1 block
    ((2, 8, 12, 11), (24, 8, 3, 3), dict(strides=(2, 3), dilations=(2, 1), pads=(3, 0, 1, 2))),
    ((1, 24, 6, 7), (8, 24, 1, 1), dict(pads=(3, 3, 3, 3))),  # rows whose window is all padding
    ((1, 2, 5, 5), (8, 2, 1, 1), dict(pads=(2, 0, 2, 0), strides=(2, 1))),
    ((3, 64, 7, 7), (128, 64, 3, 3), dict(strides=(2, 2), pads=(1, 1, 1, 1))),
    ((1, 32, 1, 1), (16, 32, 3, 3), dict(pads=(1, 1, 1, 1))),
]


@pytest.mark.parametrize("x_shape,w_shape,attrs", NCHWC_LAYERS, ids=[f"{a[1]}-{a[0]}" for a in NCHWC_LAYERS])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, False), (True, True), (False, True)])
def test_nchwc_path_edges_match_reference(x_shape, w_shape, attrs, bias, residual):
    rng = np.random.default_rng(21)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32) if bias else None
    g = cr.geometry(x_shape, w_shape, **attrs)
    feeds = {"X": x}
    o = None
    if residual:
        o = (rng.standard_normal((x_shape[0], g.K, g.OH, g.OW)) * 3).astype(np.float32)
        feeds["O"] = o
        sess = make_session(_res_model(x_shape, w, b, **attrs), threads=2)
    else:
        sess = make_session(_model(x_shape, w, b, **attrs), threads=2)
    y, macs = sess.run(None, feeds)
    ref, ref_macs = cr.reference(x, w, b, other=o, **attrs)
    _close(y, ref, np.sqrt(np.prod(w_shape[1:])))
    assert int(macs) == ref_macs
    assert (y == 0).any() and (y > 0).any()  # ReLU did cut


@st.composite
def nchwc_case(draw):
    n = draw(st.integers(1, 2))
    c = draw(st.sampled_from([1, 2, 3, 5, 7, 8, 16, 24]))
    k = 8 * draw(st.integers(1, 6))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 4)) for _ in range(4))
    lo_h = max(1, (kh - 1) * dh + 1 - pads[0] - pads[2])
    lo_w = max(1, (kw - 1) * dw + 1 - pads[1] - pads[3])
    h, w = draw(st.integers(lo_h, lo_h + 14)), draw(st.integers(lo_w, lo_w + 30))
    attrs = dict(strides=(sh, sw), dilations=(dh, dw), pads=pads)
    return (n, c, h, w), (k, c, kh, kw), draw(st.booleans()), attrs, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nchwc_case(), st.booleans())
def test_nchwc_shapes_match_reference(case, residual):
    if residual:
        x, w, b, o = _res_inputs(case)
        y, macs = make_session(_res_model(x.shape, w, b, **case[3]), threads=2).run(None, {"X": x, "O": o})
    else:
        x, w, b, o = *_res_inputs(case)[:3], None
        y, macs = _run(x, w, b, **case[3])
    ref, ref_macs = cr.reference(x, w, b, other=o, **case[3])
    _close(y, ref, np.sqrt(np.prod(w.shape[1:])))
    assert int(macs) == ref_macs


def test_nchwc_concurrent_runs_on_one_session():
    """The direct-kernel path's scratch is per calling thread: concurrent runs of different sizes stay exact."""
    rng = np.random.default_rng(22)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    sess = make_session(_res_model((1, 16, "H", "W"), w, b, pads=(1, 1, 1, 1)), threads=2)
    xs = [rng.standard_normal((1 + i % 3, 16, 20 - i, 18 + 2 * i)).astype(np.float32) for i in range(6)]
    os_ = [rng.standard_normal((x.shape[0], 32, x.shape[2], x.shape[3])).astype(np.float32) for x in xs]
    refs = [cr.reference(x, w, b, other=o, pads=(1, 1, 1, 1))[0] for x, o in zip(xs, os_)]

    def check(i):
        for _ in range(5):
            y, _ = sess.run(None, {"X": xs[i], "O": os_[i]})
            _close(y, refs[i], 12)

    run_concurrently(range(len(xs)), check)


# --- Blocked layout (x_blocked / other_blocked / y_blocked): same values as the NCHW op, any mix.

@st.composite
def blocked_case(draw):
    """A shape the blocked attributes serve: K % 16 == 0, C % 16 == 0 (all three flags) or C < 8
    (a stem: other and Y only)."""
    stem = draw(st.booleans())
    C = draw(st.integers(1, 7)) if stem else 16 * draw(st.integers(1, 3))
    K = 16 * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    s = draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 1)) for _ in range(4))
    h = draw(st.integers(max(1, kh - pads[0] - pads[2]), 11))
    w = draw(st.integers(max(1, kw - pads[1] - pads[3]), 13))
    flags = (False if stem else draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
    return (draw(st.integers(1, 2)), C, K, h, w, kh, kw, s, pads, draw(st.booleans()), draw(st.booleans()), flags,
            draw(st.integers(0, 2**31 - 1)))


def blocked_run(make, inits, x, other, flags, attrs, extra_inputs=None, feeds=None):
    """Runs a one-node model whose node `make(**layout)` builds, with X / other / Y blocked per
    flags (x, other, y); returns (Y in NCHW, macs)."""
    B = cr.block_size()
    xb, ob, yb = flags
    node = make(x_blocked=xb, other_blocked=ob and other is not None, y_blocked=yb)
    runtime = dict(extra_inputs or {})
    feed = dict(feeds or {})
    feed["X"] = cr.to_blocked(x, B) if xb else x
    if other is not None:
        runtime["O"] = (TensorProto.FLOAT, None)
        feed["O"] = cr.to_blocked(other, B) if ob else other
    x_shape = feed["X"].shape
    model = single_op_model(node, inits, x_shape, runtime_inputs=runtime, outputs=["Y", "macs"])
    y, macs = make_session(model, threads=2).run(None, feed)
    if yb:
        assert y.ndim == 5 and y.shape[-1] == B and y.shape[1] * B == inits["W"].shape[0]
        y = cr.from_blocked(y)
    return y, int(macs)


def blocked_tensors(case):
    """(rng, X, W, B or None, conv attributes, geometry, other or None) of a blocked_case, from its seed."""
    n, C, K, h, w, kh, kw, s, pads, bias, residual, flags, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, C, h, w)).astype(np.float32)
    wt = rng.standard_normal((K, C, kh, kw)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32) if bias else None
    attrs = dict(strides=(s, s), pads=pads)
    g = cr.geometry(x.shape, wt.shape, **attrs)
    other = rng.standard_normal((n, K, g.OH, g.OW)).astype(np.float32) if residual else None
    return rng, x, wt, b, attrs, g, other


@given(blocked_case())
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_blocked_layouts_equal_nchw(case):
    n, C, K, h, w, kh, kw, s, pads, bias, residual, flags, seed = case
    rng, x, wt, b, attrs, g, other = blocked_tensors(case)
    inits = {"W": wt, **({"B": b} if b is not None else {})}

    def make(**layout):
        return cr.make_node("X", "W", "B" if bias else None, "Y", macs_output="macs", other="O" if residual else None,
                            **attrs, **layout)[0]

    plain, macs = blocked_run(make, inits, x, other, (False, False, False), attrs)
    y, macs_b = blocked_run(make, inits, x, other, flags, attrs)
    if residual and flags[1] and flags[2]:
        # blocked residual into blocked Y: the kernels accumulate onto the residual (onnxruntime's
        # Conv+Add order), so the sum is rounded in another order than conv-then-add
        np.testing.assert_allclose(y, plain, rtol=1e-5, atol=1e-6 * float(np.abs(plain).max(initial=1.0)))
    else:
        np.testing.assert_array_equal(y, plain)  # the same kernels on the same values
    assert macs_b == macs == n * g.macs
    ref, _ = cr.reference(x, wt, b, other=other, **attrs)
    _close(y, ref, float(np.abs(ref).max(initial=1.0)))


def test_block_size_is_the_cpus():
    with open("/proc/cpuinfo") as f:
        avx512 = " avx512f" in f.read()
    forced = os.environ.get("OZ_DENSE") == "fma3"
    assert cr.block_size() == (16 if avx512 and not forced else 8)


def test_blocked_io_rule():
    assert cr.blocked_io((64, 64, 3, 3)) == (True, True, True)
    assert cr.blocked_io((16, 3, 3, 3)) == (False, True, True)  # stem: reads NCHW
    assert cr.blocked_io((16, 8, 3, 3)) == (False, False, False)  # 8 <= C, C % 16 != 0
    assert cr.blocked_io((24, 32, 3, 3)) == (False, False, False)  # K % 16 != 0
    assert cr.blocked_io((32, 16, 3, 3), group=2) == (False, False, False)
    assert cr.blocked_io((32, 1, 3, 3), group=32) == (False, False, False)  # depthwise


@pytest.mark.parametrize("w_shape,group,attr,needs", [
    ((16, 24, 3, 3), 1, "x_blocked", "read a blocked X"),
    ((24, 32, 3, 3), 1, "y_blocked", "write a blocked Y"),
    ((32, 16, 3, 3), 2, "other_blocked", "read a blocked 'other'"),
])
def test_blocked_attribute_refused_where_the_rule_says_no(w_shape, group, attr, needs):
    K, cg = w_shape[0], w_shape[1]
    node, _ = cr.make_node("X", "W", None, "Y", group=group, **{attr: True})
    model = single_op_model(node, {"W": np.zeros(w_shape, np.float32)}, (1, cg * group, 5, 5))
    with pytest.raises(Exception) as e:
        make_session(model)
    tail = "C % 16 == 0)" if attr == "x_blocked" else "C % 16 == 0 or C < 8)"
    assert (f"ConvRelu: attribute '{attr}' is 1, but weights of {K} filters x {cg * group} input channels, group "
            f"{group} cannot {needs} (needs group 1, K % 16 == 0, {tail}") in str(e.value)


def test_blocked_input_shape_mismatch_names_op_and_input():
    B = cr.block_size()
    node, _ = cr.make_node("X", "W", None, "Y", x_blocked=True, other="O", other_blocked=True, pads=(1, 1, 1, 1))
    w = np.zeros((32, 16, 3, 3), np.float32)
    model = single_op_model(node, {"W": w}, (1, 16 // B, 5, 5, B), runtime_inputs={"O": (TensorProto.FLOAT, None)})
    model.graph.input[0].type.tensor_type.ClearField("shape")  # let any rank reach the kernel
    sess = make_session(model)
    o = np.zeros((1, 32 // B, 5, 5, B), np.float32)
    with pytest.raises(Exception) as e:  # an NCHW tensor fed where a blocked one is expected
        sess.run(None, {"X": np.zeros((1, 16, 5, 5), np.float32), "O": o})
    assert (f"ConvRelu: input 'X' has shape (1, 16, 5, 5), expected a blocked tensor (N, C/{B}, H, W, {B}) "
            f"(attribute x_blocked=1, block {B} on this CPU)") in str(e.value)
    other_b = 8 if B == 16 else 16  # the other CPU's block
    with pytest.raises(Exception) as e:
        sess.run(None, {"X": np.zeros((1, 16 // other_b, 5, 5, other_b), np.float32), "O": o})
    assert f"ConvRelu: input 'X' has shape (1, {16 // other_b}, 5, 5, {other_b}), expected a blocked tensor" in str(e.value)
    with pytest.raises(Exception) as e:
        sess.run(None, {"X": np.zeros((1, 16 // B, 5, 5, B), np.float32), "O": np.zeros((1, 32, 5, 5), np.float32)})
    assert (f"ConvRelu: input 'other' has shape (1, 32, 5, 5), expected the blocked (1, {32 // B}, 5, 5, {B}) "
            f"(attribute other_blocked=1, block {B} on this CPU)") in str(e.value)


@pytest.mark.parametrize("dense", ["gemm", "fma3"])
def test_blocked_layouts_on_other_paths(dense, tmp_path):
    """OZ_DENSE=gemm: the GEMM core converts blocked tensors in and out; OZ_DENSE=fma3: block 8.
    Both read once per process, hence a child process."""
    import subprocess
    import sys

    code = f'''
import numpy as np
from onnx import TensorProto
from onnxzero.ops import conv_relu as cr
from onnxzero.ops.session import make_session, single_op_model
B = cr.block_size()
assert B == (8 if "{dense}" == "fma3" else B), B
rng = np.random.default_rng(3)
x = rng.standard_normal((2, 32, 6, 7)).astype(np.float32)
w = rng.standard_normal((48, 32, 3, 3)).astype(np.float32)
b = rng.standard_normal(48).astype(np.float32)
o = rng.standard_normal((2, 48, 6, 7)).astype(np.float32)
node, _ = cr.make_node("X", "W", "B", "Y", pads=(1, 1, 1, 1), other="O", x_blocked=True, other_blocked=True,
                       y_blocked=True)
m = single_op_model(node, {{"W": w, "B": b}}, (2, 32 // B, 6, 7, B), runtime_inputs={{"O": (TensorProto.FLOAT, None)}})
y = make_session(m, threads=2).run(None, {{"X": cr.to_blocked(x, B), "O": cr.to_blocked(o, B)}})[0]
ref, _ = cr.reference(x, w, b, other=o, pads=(1, 1, 1, 1))
np.testing.assert_allclose(cr.from_blocked(y), ref, rtol=1e-4, atol=1e-4)
for stride in (1, 2):  # 1x1: the pointwise kernel (its FMA3 build under OZ_DENSE=fma3), 160 channels
    x1 = np.abs(rng.standard_normal((2, 160, 9, 7))).astype(np.float32)
    w1 = rng.standard_normal((32, 160, 1, 1)).astype(np.float32)
    node, _ = cr.make_node("X", "W", "B", "Y", strides=(stride, stride))
    y1 = make_session(single_op_model(node, {{"W": w1, "B": b[:32]}}, x1.shape), threads=2).run(None, {{"X": x1}})[0]
    ref1, _ = cr.reference(x1, w1, b[:32], strides=(stride, stride))
    np.testing.assert_allclose(y1, ref1, rtol=1e-4, atol=1e-4)
print("B", B)
'''
    env = dict(os.environ, OZ_DENSE=dense)
    r = subprocess.run([sys.executable, "-P", "-c", code], env=env,  # -P: the installed onnxzero, not the source tree
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    if dense == "fma3":
        assert r.stdout.strip() == "B 8"


# --- relu=0: the dense op for Convs that are not sites (projection shortcuts inside a chain).

def _onnx_conv_model(w, b, x_shape, *, residual=False, **attrs):
    """onnxruntime's own Conv(+B)(+Add O), no activation."""
    from onnx import numpy_helper as nh

    inits = [nh.from_array(w, "W")] + ([nh.from_array(b, "B")] if b is not None else [])
    nodes = [helper.make_node("Conv", ["X", "W"] + (["B"] if b is not None else []), ["C" if residual else "Y"],
                              **cr.conv_attributes(**attrs))]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))]
    if residual:
        nodes.append(helper.make_node("Add", ["C", "O"], ["Y"]))
        inputs.append(helper.make_tensor_value_info("O", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "conv", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# (x, w, attrs): the NCHWc kernels (C % 16 == 0), the stem kernel (C < 8), the GEMM core (group 2, K % 8 != 0),
# a strided 1x1 projection shortcut
RELU0 = [
    ((2, 32, 9, 9), (48, 32, 3, 3), dict(pads=(1, 1, 1, 1))),
    ((1, 3, 11, 10), (16, 3, 3, 3), dict(pads=(1, 0, 1, 2))),
    ((2, 12, 7, 7), (10, 6, 3, 3), dict(group=2, pads=(1, 1, 1, 1))),
    ((1, 64, 14, 14), (128, 64, 1, 1), dict(strides=(2, 2))),
]


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("x_shape,w_shape,attrs", RELU0, ids=[f"{a[1]}-{a[0]}" for a in RELU0])
def test_relu0_matches_onnxruntime_conv(x_shape, w_shape, attrs, residual):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) * np.sqrt(2.0 / np.prod(w_shape[1:]))).astype(np.float32)
    b = (rng.standard_normal(w_shape[0]) * 0.1).astype(np.float32)
    g = cr.geometry(x_shape, w_shape, **attrs)
    o = rng.standard_normal((x_shape[0], g.K, g.OH, g.OW)).astype(np.float32) if residual else None
    node, _ = cr.make_node("X", "W", "B", "Y", macs_output="macs", other="O" if residual else None, relu=False, **attrs)
    assert [(a.name, a.i) for a in node.attribute if a.name == "relu"] == [("relu", 0)]
    model = single_op_model(node, {"W": w, "B": b}, x_shape,
                            runtime_inputs={"O": (TensorProto.FLOAT, None)} if residual else None)
    feeds = {"X": x, **({"O": o} if residual else {})}
    y, macs = make_session(model, threads=2).run(None, feeds)
    ref = make_session(_onnx_conv_model(w, b, x_shape, residual=residual, **attrs), threads=2,
                       library=False).run(None, feeds)[0]
    assert (ref < 0).mean() > 0.2  # no ReLU: negative outputs stay negative
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    np.testing.assert_allclose(y, cr.reference(x, w, b, other=o, relu=False, **attrs)[0], rtol=1e-4, atol=1e-4)
    assert int(macs) == x_shape[0] * g.macs
    # the default (relu=1) on the same inputs is the ReLU of it
    relu_node, _ = cr.make_node("X", "W", "B", "Y", macs_output="macs", other="O" if residual else None, **attrs)
    assert not [a for a in relu_node.attribute if a.name == "relu"]
    y1 = make_session(single_op_model(relu_node, {"W": w, "B": b}, x_shape,
                                      runtime_inputs={"O": (TensorProto.FLOAT, None)} if residual else None),
                      threads=2).run(None, feeds)[0]
    np.testing.assert_array_equal(y1, np.maximum(y, 0))


def test_relu0_blocked_layouts_equal_nchw():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 32, 8, 9)).astype(np.float32)
    wt = rng.standard_normal((64, 32, 1, 1)).astype(np.float32)
    other = rng.standard_normal((2, 64, 8, 9)).astype(np.float32)
    inits = {"W": wt}

    def make(**layout):
        return cr.make_node("X", "W", None, "Y", macs_output="macs", other="O", relu=False, **layout)[0]

    plain, _ = blocked_run(make, inits, x, other, (False, False, False), {})
    for flags in [(True, True, True), (True, False, True), (False, True, False)]:
        y, _ = blocked_run(make, inits, x, other, flags, {})
        if flags == (True, True, True):  # accumulated onto the residual: another rounding order
            np.testing.assert_allclose(y, plain, rtol=1e-5, atol=1e-6 * float(np.abs(plain).max()))
        else:
            np.testing.assert_array_equal(y, plain)
    assert (plain < 0).any()
    np.testing.assert_allclose(plain, cr.reference(x, wt, None, other=other, relu=False)[0], rtol=1e-4, atol=1e-4)


def test_relu_attribute_refused():
    node, _ = cr.make_node("X", "W", None, "Y")
    node.attribute.append(helper.make_attribute("relu", 2))
    model = single_op_model(node, {"W": np.zeros((16, 1, 1, 1), np.float32)}, (1, 1, 1, 1))
    with pytest.raises(Exception) as e:
        make_session(model)
    assert "ConvRelu: attribute 'relu' is 2, expected 0 or 1" in str(e.value)
