"""SpatialConv kernel vs its numpy reference, onnxruntime's Conv+Relu, its MAC counter and its errors."""

from __future__ import annotations

import os

import numpy as np
from conftest import run_concurrently
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxzero import DOMAIN
from onnxzero.bench import op_spatial
from onnxzero.bench.common import LAYERS
from onnxzero.ops import conv_geometry, make_session, single_op_model
from onnxzero.ops import spatial as sp

# the ASan target (runtime_ops/asan/run.sh) lowers this
EXAMPLES = int(os.environ.get("ONNXZERO_HYPOTHESIS_EXAMPLES", "150"))

# ----------------------------------------------------------------------------------------- helpers


def _session(w, b, *, patch, mask=None, runtime_mask=False, x_shape, macs=True, threads=1, other=False, **attrs):
    """A one-node SpatialConv session; the mask is a constant, or a graph input 'M' when runtime_mask;
    other=True: a residual graph input 'O'."""
    inits = {"W": w}
    if b is not None:
        inits["B"] = b
    node, extra = sp.make_node("X", "W", "B" if b is not None else None, "Y", patch=patch,
                               mask=None if runtime_mask else mask, mask_name="M" if runtime_mask else None,
                               macs_output="macs" if macs else None, other="O" if other else None, **attrs)
    inits.update(extra)
    rt = {"M": (TensorProto.UINT8, None)} if runtime_mask else {}
    if other:
        rt["O"] = (TensorProto.FLOAT, None)
    outputs = ["Y", "macs"] if macs else ["Y"]
    return make_session(single_op_model(node, inits, x_shape, runtime_inputs=rt, outputs=outputs), threads=threads)


def _run(sess, x, mask=None, other=None):
    feeds = {"X": x}
    if mask is not None:
        feeds["M"] = mask
    if other is not None:
        feeds["O"] = other
    y, macs = sess.run(None, feeds)
    return y, int(macs)


def _ort_conv_relu(x, w, b, other=None, other_first=False, **attrs):
    """onnxruntime's own Conv(+Add other)+Relu (default graph optimizations: its fused kernels)."""
    inputs = ["X", "W"] + (["B"] if b is not None else [])
    nodes = [helper.make_node("Conv", inputs, ["C"], **attrs)]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))]
    feeds = {"X": x}
    if other is not None:
        nodes.append(helper.make_node("Add", ["O", "C"] if other_first else ["C", "O"], ["S"]))
        graph_inputs.append(helper.make_tensor_value_info("O", TensorProto.FLOAT, list(other.shape)))
        feeds["O"] = other
    nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], ["Y"]))
    graph = helper.make_graph(
        nodes, "ref", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in (("W", w), ("B", b)) if a is not None])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return make_session(model, library=False).run(None, feeds)[0]


def _ambiguous(z, full_mask, tol=1e-3):
    """Masked pre-activations so close to 0 that float32 vs float64 could decide 'alive' differently."""
    sel = np.broadcast_to(full_mask.astype(bool)[None], z.shape)
    near = (np.abs(z) < tol) & (z != 0)
    return bool((near & sel).any())


def _check_against_reference(x, w, b, mask, *, patch, runtime_mask, other=None, **attrs):
    y_ref, macs_ref, z = sp.reference(x, w, b, mask, patch=patch, return_preact=True, other=other, **attrs)
    K, OH, OW = y_ref.shape[1:]
    assume(not _ambiguous(z, sp.expand_mask(mask, K, OH, OW, patch)))
    sess = _session(w, b, patch=patch, mask=mask, runtime_mask=runtime_mask, x_shape=x.shape,
                    other=other is not None, **attrs)
    y, macs = _run(sess, x, mask if runtime_mask else None, other)
    scale = max(1.0, float(np.abs(y_ref).max()))
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * scale)
    assert macs == macs_ref  # the kernel skips at the reference's (channel, patch) granularity


def _random_mask(rng, form, patch, K, OH, OW, density):
    shape = {"layer": (patch, patch), "filter": (K, patch, patch), "full": (K, OH, OW)}[form]
    return (rng.random(shape) < density).astype(np.uint8)


# ------------------------------------------------------------------------------ hypothesis vs numpy


@st.composite
def conv_cases(draw):
    depthwise = draw(st.booleans())
    C = draw(st.sampled_from([1, 3, 4, 8, 9, 16]))
    if depthwise:
        group, K = C, C * draw(st.sampled_from([1, 2]))
    else:
        group, K = 1, draw(st.integers(1, 20))
    KH, KW = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = draw(st.integers(2, 13)), draw(st.integers(2, 13))
    strides = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    dilations = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = [draw(st.integers(0, 2)) for _ in range(4)] if auto_pad == "NOTSET" else None
    g = conv_geometry((1, C, H, W), (K, C // group, KH, KW), strides=strides, dilations=dilations,
                      pads=pads or (0, 0, 0, 0), group=group, auto_pad=auto_pad)
    assume(g.OH >= 1 and g.OW >= 1)
    attrs = dict(strides=strides, dilations=dilations, group=group, auto_pad=auto_pad)
    if pads is not None:
        attrs["pads"] = pads
    return dict(N=draw(st.integers(1, 2)), C=C, K=K, H=H, W=W, KH=KH, KW=KW, group=group, OH=g.OH, OW=g.OW,
                attrs=attrs)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=conv_cases(), form=st.sampled_from(["layer", "filter", "full"]), patch=st.integers(2, 4),
       density=st.sampled_from([0.2, 0.4, 0.7]), runtime_mask=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_reference(case, form, patch, density, runtime_mask, bias, seed):
    rng = np.random.default_rng(seed)
    c = case
    x = rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(np.float32)
    w = rng.standard_normal((c["K"], c["C"] // c["group"], c["KH"], c["KW"])).astype(np.float32)
    b = rng.standard_normal(c["K"]).astype(np.float32) if bias else None
    mask = _random_mask(rng, form, patch, c["K"], c["OH"], c["OW"], density)
    _check_against_reference(x, w, b, mask, patch=patch, runtime_mask=runtime_mask, **c["attrs"])


@settings(max_examples=max(10, EXAMPLES // 2), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=conv_cases(), form=st.sampled_from(["layer", "filter", "full"]), patch=st.integers(2, 4),
       density=st.sampled_from([0.2, 0.4, 0.7]), runtime_mask=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_residual_kernel_matches_reference(case, form, patch, density, runtime_mask, bias, seed):
    """Residual sites: prediction, skipping and MACs on the sum conv + B + other."""
    rng = np.random.default_rng(seed)
    c = case
    x = rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(np.float32)
    w = rng.standard_normal((c["K"], c["C"] // c["group"], c["KH"], c["KW"])).astype(np.float32)
    b = rng.standard_normal(c["K"]).astype(np.float32) if bias else None
    other = (2 * rng.standard_normal((c["N"], c["K"], c["OH"], c["OW"]))).astype(np.float32)
    mask = _random_mask(rng, form, patch, c["K"], c["OH"], c["OW"], density)
    _check_against_reference(x, w, b, mask, patch=patch, runtime_mask=runtime_mask, other=other, **c["attrs"])


@settings(max_examples=max(10, EXAMPLES // 6), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=conv_cases(), form=st.sampled_from(["layer", "filter", "full"]), bias=st.booleans(),
       other_first=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_residual_all_ones_matches_onnxruntime_conv_add_relu(case, form, bias, other_first, seed):
    """Any geometry, no prediction (all-ones mask of any form): onnxruntime's Conv+Add+Relu."""
    rng = np.random.default_rng(seed)
    c = case
    # onnxruntime's Conv: "Dilation not supported for AutoPadType::SAME_UPPER or AutoPadType::SAME_LOWER"
    assume(not (c["attrs"]["auto_pad"].startswith("SAME") and c["attrs"]["dilations"] != [1, 1]))
    x = rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(np.float32)
    w = rng.standard_normal((c["K"], c["C"] // c["group"], c["KH"], c["KW"])).astype(np.float32)
    b = rng.standard_normal(c["K"]).astype(np.float32) if bias else None
    other = (2 * rng.standard_normal((c["N"], c["K"], c["OH"], c["OW"]))).astype(np.float32)
    mask = np.ones({"layer": (2, 2), "filter": (c["K"], 2, 2), "full": (c["K"], c["OH"], c["OW"])}[form], np.uint8)
    attrs = {**c["attrs"], "kernel_shape": [c["KH"], c["KW"]]}
    y, macs = _run(_session(w, b, patch=2, mask=mask, x_shape=x.shape, other=True, **attrs), x, other=other)
    ref = _ort_conv_relu(x, w, b, other=other, other_first=other_first, **attrs)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    assert macs == c["N"] * c["K"] * c["OH"] * c["OW"] * (c["C"] // c["group"]) * c["KH"] * c["KW"]


@pytest.mark.parametrize("form", ["layer", "filter", "full"])
@pytest.mark.parametrize("shape", [(2, 32, 24, 15, 17, 3), (1, 24, 40, 9, 9, 1), (1, 64, 16, 7, 7, 3)])
def test_kernel_matches_reference_wide_channels(form, shape):
    """Channel counts that fill whole 16-channel panels, several blocks and odd output sizes."""
    N, C, K, H, W, k = shape
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((N, C, H, W)), 0).astype(np.float32)
    w = (rng.standard_normal((K, C, k, k)) / np.sqrt(C * k * k)).astype(np.float32)
    b = (0.3 * rng.standard_normal(K)).astype(np.float32)
    attrs = dict(pads=[k // 2] * 4)
    OH, OW = H, W
    for patch in (2, 3, 4):
        mask = _random_mask(rng, form, patch, K, OH, OW, 0.3)
        y_ref, macs_ref, z = sp.reference(x, w, b, mask, patch=patch, return_preact=True, **attrs)
        if _ambiguous(z, sp.expand_mask(mask, K, OH, OW, patch)):
            continue
        y, macs = _run(_session(w, b, patch=patch, mask=mask, x_shape=x.shape, **attrs), x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
        assert macs == macs_ref


# ------------------------------------------------------------------------- no-skip == ORT Conv+Relu


@pytest.mark.parametrize("attrs,shape", [
    (dict(pads=[1, 1, 1, 1]), (2, 16, 32, 14, 14, 3)),
    (dict(strides=[2, 2], pads=[3, 3, 3, 3]), (1, 3, 16, 30, 30, 7)),
    (dict(), (1, 40, 24, 12, 12, 1)),
    (dict(pads=[1, 0, 2, 1], dilations=[2, 1]), (1, 8, 20, 11, 13, 3)),
    (dict(group=16, pads=[1, 1, 1, 1]), (2, 16, 16, 10, 10, 3)),
    (dict(auto_pad="SAME_UPPER", strides=[2, 1]), (1, 5, 7, 9, 8, 3)),
])
@pytest.mark.parametrize("mask_kind", ["ones-layer", "ones-filter", "ones-full", "zeros"])
def test_all_ones_mask_equals_onnxruntime_conv_relu(attrs, shape, mask_kind):
    N, C, K, H, W, k = shape
    group = attrs.get("group", 1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((K, C // group, k, k)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    ref = _ort_conv_relu(x, w, b, kernel_shape=[k, k], **attrs)
    OH, OW = ref.shape[2:]
    patch = 3
    mask = {"ones-layer": np.ones((patch, patch), np.uint8), "ones-filter": np.ones((K, patch, patch), np.uint8),
            "ones-full": np.ones((K, OH, OW), np.uint8), "zeros": np.zeros((patch, patch), np.uint8)}[mask_kind]
    y, macs = _run(_session(w, b, patch=patch, mask=mask, x_shape=x.shape, kernel_shape=[k, k], **attrs), x)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * scale)
    assert macs == N * K * OH * OW * (C // group) * k * k  # nothing can be skipped


@pytest.mark.parametrize("attrs,shape", [
    (dict(pads=[1, 1, 1, 1]), (2, 16, 32, 14, 14, 3)),
    (dict(pads=[1, 1, 1, 1]), (1, 64, 64, 7, 7, 3)),
    (dict(strides=[2, 2]), (2, 16, 24, 9, 9, 1)),  # a projection-like 1x1 stride 2
    (dict(pads=[1, 1, 1, 1]), (1, 1, 20, 12, 12, 3)),  # stem-like: row-merged layout
    (dict(group=8, pads=[1, 1, 1, 1]), (1, 8, 16, 8, 8, 3)),
])
@pytest.mark.parametrize("mask_kind", ["ones-layer", "ones-filter", "half-filter"])
def test_residual_all_ones_mask_equals_onnxruntime_conv_add_relu(attrs, shape, mask_kind):
    """No prediction (all-ones mask, or per-filter all-ones / all-zeros patterns that run the dot tiles
    instead of the panels): exactly onnxruntime's Conv+Add+Relu, either operand order of the Add."""
    N, C, K, H, W, k = shape
    group = attrs.get("group", 1)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((K, C // group, k, k)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    OH, OW = _ort_conv_relu(x, w, b, kernel_shape=[k, k], **attrs).shape[2:]
    other = (3 * rng.standard_normal((N, K, OH, OW))).astype(np.float32)
    patch = 2
    mask = {"ones-layer": np.ones((patch, patch), np.uint8), "ones-filter": np.ones((K, patch, patch), np.uint8),
            "half-filter": np.repeat((np.arange(K) % 2).astype(np.uint8), patch * patch).reshape(K, patch, patch)}[mask_kind]
    sess = _session(w, b, patch=patch, mask=mask, x_shape=x.shape, kernel_shape=[k, k], other=True, **attrs)
    y, macs = _run(sess, x, other=other)
    for first in (False, True):
        ref = _ort_conv_relu(x, w, b, other=other, other_first=first, kernel_shape=[k, k], **attrs)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    assert macs == N * K * OH * OW * (C // group) * k * k
    assert (y > 0).mean() > 0.2 and (y == 0).mean() > 0.2  # the residual really moved outputs across 0
    # the same session without `other` (input omitted) is plain Conv+Relu
    plain = _session(w, b, patch=patch, mask=mask, x_shape=x.shape, kernel_shape=[k, k], **attrs)
    np.testing.assert_allclose(_run(plain, x)[0], _ort_conv_relu(x, w, b, kernel_shape=[k, k], **attrs),
                               rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_residual_decides_the_prediction_and_the_macs():
    """The residual alone flips patches: alive where conv + B <= 0 but the sum is > 0, and dead where
    conv + B > 0 but the sum is <= 0 (both must happen, with exact MAC counts)."""
    x = np.ones((1, 1, 4, 4), np.float32)
    w = np.ones((2, 1, 1, 1), np.float32)
    b = np.array([-2.0, 1.0], np.float32)  # conv + B: channel 0 is -1 everywhere, channel 1 is +2
    mask = sp.uniform_layer_mask(2, [(0, 0)])
    other = np.zeros((1, 2, 4, 4), np.float32)
    other[0, 0, 0, 0] = 3.0   # channel 0, patch (0, 0): masked sum 2 > 0 -> whole patch computed
    other[0, 0, 1, 1] = 5.0   # channel 0, patch (0, 0) unmasked position: sum 4
    other[0, 0, 2, 3] = 9.0   # channel 0, patch (1, 1) unmasked: positive, but the patch is predicted dead
    other[0, 1, 2, 2] = -4.0  # channel 1, patch (1, 1) masked sum -2 -> patch predicted dead
    other[0, 1, 0, 0] = -2.0  # channel 1, patch (0, 0) masked sum exactly 0 -> dead (<= 0)
    sess = _session(w, b, patch=2, mask=mask, x_shape=x.shape, other=True)
    y, macs = _run(sess, x, other=other)
    expect = np.zeros((2, 4, 4), np.float32)
    expect[0, 0:2, 0:2] = np.maximum(-1 + other[0, 0, 0:2, 0:2], 0)
    expect[1] = 2.0
    expect[1, 2:4, 2:4] = 0
    expect[1, 0:2, 0:2] = 0
    np.testing.assert_array_equal(y[0], expect)
    # channel 0: 4 masked + 3 rest of patch (0, 0); channel 1: 4 masked + 3 rest of the 2 alive patches
    assert macs == (4 + 3) + (4 + 3 + 3)
    assert sp.reference(x, w, b, mask, patch=2, other=other)[1] == macs
    np.testing.assert_array_equal(sp.reference(x, w, b, mask, patch=2, other=other)[0], y)
    # without the residual the same session predicts from conv + B alone
    y0, macs0 = _run(_session(w, b, patch=2, mask=mask, x_shape=x.shape), x)
    assert macs0 == 4 + 16 and (y0[0, 0] == 0).all() and (y0[0, 1] == 2).all()


def test_error_residual_shape_names_the_expected_shape():
    x = np.ones((2, 3, 8, 8), np.float32)
    w = np.ones((5, 3, 3, 3), np.float32)
    sess = _session(w, None, patch=2, mask=sp.diagonal_mask(2), x_shape=x.shape, other=True)
    expected = r"SpatialConv: input 'other' has shape \(2, 5, 6, 7\), expected \(N, K, OH, OW\)=\(2, 5, 6, 6\)"
    _expect_error(expected, lambda: _run(sess, x, other=np.ones((2, 5, 6, 7), np.float32)))
    _expect_error(r"input 'other' has shape \(1, 5, 6, 6\), expected \(N, K, OH, OW\)=\(2, 5, 6, 6\)",
                  lambda: _run(sess, x, other=np.ones((1, 5, 6, 6), np.float32)))
    _expect_error(r"input 'other' has shape \(5, 6, 6\)", lambda: _run(sess, x, other=np.ones((5, 6, 6), np.float32)))
    with pytest.raises(ValueError, match=r"SpatialConv: input 'other' has shape \(1, 5, 6, 6\), expected "
                                         r"\(N, K, OH, OW\)=\(2, 5, 6, 6\)"):
        sp.reference(x, w, None, sp.diagonal_mask(2), patch=2, other=np.ones((1, 5, 6, 6), np.float32))


# ----------------------------------------------------------------------------- NaN / Inf in the input


def _nan_inf_input(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, 6, replace=False)
    flat[idx[:2]] = np.inf
    flat[idx[2:4]] = -np.inf
    flat[idx[4:]] = np.nan
    return x


def _assert_same_nan_and_values(y, ref):
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    fin = ~np.isnan(ref)
    np.testing.assert_array_equal(np.isinf(y[fin]), np.isinf(ref[fin]))
    both = fin & np.isfinite(ref)
    scale = max(1.0, float(np.abs(ref[both]).max(initial=0.0)))  # a small map can be NaN/inf everywhere
    np.testing.assert_allclose(y[both], ref[both], rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("C,K,hw,k,pads", [
    (12, 8, 10, 3, [1, 1, 1, 1]),   # 36-float kernel rows: the dot tiles' last chunk is partial
    (3, 16, 12, 3, [1, 1, 1, 1]),   # row-merged layout: 27 floats in a 32-float chunk
    (20, 24, 7, 3, [0, 0, 0, 0]),
    (5, 8, 9, 1, [0, 0, 0, 0]),
])
@pytest.mark.parametrize("mask_kind", ["ones-layer", "half-filter"])
def test_nan_inf_input_gives_what_onnxruntime_conv_relu_gives(C, K, hw, k, pads, mask_kind):
    """Inf/NaN reach exactly the outputs whose receptive field holds them (NaN where Conv is NaN,
    identical finite values elsewhere): no over-read times a zero weight leaks into a neighbour. The
    half-filter mask (per-filter all-ones / all-zeros: no prediction) runs the dot tiles."""
    rng = np.random.default_rng(31)
    for trial in range(4):
        x = _nan_inf_input(rng, (2, C, hw, hw))
        w = rng.standard_normal((K, C, k, k)).astype(np.float32)
        b = rng.standard_normal(K).astype(np.float32)
        mask = np.ones((2, 2), np.uint8) if mask_kind == "ones-layer" else \
            np.repeat((np.arange(K) % 2).astype(np.uint8), 4).reshape(K, 2, 2)
        y, _ = _run(_session(w, b, patch=2, mask=mask, x_shape=x.shape, pads=pads), x)
        ref = _ort_conv_relu(x, w, b, pads=pads)
        assert np.isnan(ref).any() and (np.isfinite(ref) & (ref > 0)).any()
        _assert_same_nan_and_values(y, ref)


def test_nan_inf_input_with_prediction_matches_reference():
    """With a predicting mask, NaN/Inf follow the reference: NaN counts as not alive, and outputs
    outside an Inf's receptive field stay finite."""
    rng = np.random.default_rng(32)
    for form in ("layer", "filter", "full"):
        x = _nan_inf_input(rng, (1, 12, 11, 11))
        w = rng.standard_normal((16, 12, 3, 3)).astype(np.float32)
        b = rng.standard_normal(16).astype(np.float32)
        mask = _random_mask(rng, form, 2, 16, 11, 11, 0.4)
        y, macs = _run(_session(w, b, patch=2, mask=mask, x_shape=x.shape, pads=[1, 1, 1, 1]), x)
        with np.errstate(invalid="ignore"):
            y_ref, macs_ref = sp.reference(x, w, b, mask, patch=2, pads=[1, 1, 1, 1])
        _assert_same_nan_and_values(y, y_ref)
        assert macs == macs_ref


def test_bench_layer_shapes_dense_equal_onnxruntime():
    """The six bench layers at the no-skip setting (batch 1): exactly Conv+Relu."""
    rng = np.random.default_rng(3)
    for layer in LAYERS:
        case = op_spatial.build(layer, 0.0, rng)
        y, macs = make_session(case.model).run(None, case.feeds)
        w = [i for i in case.model.graph.initializer if i.name == "W"][0]
        b = [i for i in case.model.graph.initializer if i.name == "B"][0]
        from onnx import numpy_helper
        ref = _ort_conv_relu(case.feeds["X"], numpy_helper.to_array(w), numpy_helper.to_array(b), **layer.conv_attrs())
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
        assert int(macs) == layer.K * layer.C * layer.KH * layer.KW * ref.shape[2] * ref.shape[3]


# --------------------------------------------------------------------------------------- MAC counter


def test_macs_counts_exactly_the_computed_outputs():
    """Hand-built case: 1 channel, 4x4 output, p=2, mask (0,0); bias decides which patches die."""
    x = np.ones((1, 1, 4, 4), np.float32)
    w = np.ones((2, 1, 1, 1), np.float32)
    mask = sp.uniform_layer_mask(2, [(0, 0)])
    # channel 0: x*1 + b = 1 - 2 < 0 everywhere -> every patch predicted dead: 4 patches x 1 pixel
    # channel 1: 1 + 1 > 0 -> every patch computed in full: 16 pixels
    b = np.array([-2.0, 1.0], np.float32)
    y, macs = _run(_session(w, b, patch=2, mask=mask, x_shape=x.shape), x)
    assert macs == (4 + 16) * 1
    assert (y[0, 0] == 0).all() and (y[0, 1] == 2).all()
    assert sp.reference(x, w, b, mask, patch=2)[1] == macs


def test_prediction_can_be_wrong_and_that_is_the_semantics():
    """A patch whose masked pixel is dead is zeroed even where the true output is positive."""
    x = np.zeros((1, 1, 2, 2), np.float32)
    x[0, 0, 1, 1] = 5.0
    w = np.ones((1, 1, 1, 1), np.float32)
    mask = sp.uniform_layer_mask(2, [(0, 0)])
    y, macs = _run(_session(w, None, patch=2, mask=mask, x_shape=x.shape), x)
    assert (y == 0).all() and macs == 1
    diag = sp.diagonal_mask(2)  # (1,1) is masked now: computed first, alive, the patch is computed
    y, macs = _run(_session(w, None, patch=2, mask=diag, x_shape=x.shape), x)
    assert y[0, 0, 1, 1] == 5.0 and macs == 4


def test_nothing_skipped_when_every_output_is_positive():
    rng = np.random.default_rng(4)
    x = rng.random((2, 4, 9, 9)).astype(np.float32)
    w = rng.random((6, 4, 3, 3)).astype(np.float32)
    b = np.ones(6, np.float32)
    for mask in (sp.uniform_layer_mask(3, [(1, 1)]), (rng.random((6, 3, 3)) < 0.5).astype(np.uint8),
                 (rng.random((6, 7, 7)) < 0.5).astype(np.uint8)):
        y, macs = _run(_session(w, b, patch=3, mask=mask, x_shape=x.shape), x)
        assert macs == 2 * 6 * 7 * 7 * 4 * 9
        np.testing.assert_allclose(y, _ort_conv_relu(x, w, b), rtol=1e-4, atol=1e-5)


def test_patch_with_no_selected_pixel_is_computed_in_full():
    """Margin patches whose 1s fall outside the output, and all-zero patterns, are not predicted."""
    x = -np.ones((1, 1, 5, 5), np.float32)  # every output negative
    w = np.ones((1, 1, 1, 1), np.float32)
    mask = sp.uniform_layer_mask(3, [(2, 2)])  # 5x5 output: patches 3,2 wide; (2,2) missing in margins
    y, macs = _run(_session(w, None, patch=3, mask=mask, x_shape=x.shape), x)
    # interior patch: 1 pixel computed, dead; the 3 margin patches (6 + 6 + 4 pixels) in full
    assert macs == 1 + 6 + 6 + 4
    assert sp.reference(x, w, None, mask, patch=3)[1] == macs


# ----------------------------------------------------------------------------- runtime mask, threads


def test_mask_changed_at_run_time_without_a_new_session():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((10, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    sess = _session(w, b, patch=2, runtime_mask=True, x_shape=x.shape, pads=[1, 1, 1, 1])
    seen = set()
    for mask in (np.ones((2, 2), np.uint8), sp.uniform_layer_mask(2, [(0, 0)]), sp.diagonal_mask(2),
                 (rng.random((10, 2, 2)) < 0.5).astype(np.uint8), (rng.random((10, 12, 12)) < 0.3).astype(np.uint8),
                 np.ones((2, 2), np.uint8)):
        y, macs = _run(sess, x, mask)
        y_ref, macs_ref = sp.reference(x, w, b, mask, patch=2, pads=[1, 1, 1, 1])
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
        assert macs == macs_ref
        seen.add(macs)
    assert len(seen) >= 4  # the masks really changed the work done


def test_concurrent_runs_on_one_session():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((24, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    sess = _session(w, b, patch=2, runtime_mask=True, x_shape=(1, 8, 20, 20), pads=[1, 1, 1, 1], threads=2)
    jobs = []
    for i in range(8):
        x = rng.standard_normal((1, 8, 20, 20)).astype(np.float32)
        mask = (rng.random((24, 2, 2)) < 0.3 + 0.05 * i).astype(np.uint8)
        jobs.append((x, mask, sp.reference(x, w, b, mask, patch=2, pads=[1, 1, 1, 1])))

    def check(job):
        x, mask, (y_ref, macs_ref) = job
        for _ in range(5):
            y, macs = _run(sess, x, mask)
            assert macs == macs_ref
            np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)

    run_concurrently(jobs, check)


def test_macs_output_is_optional():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    sess = _session(w, None, patch=2, mask=sp.diagonal_mask(2), x_shape=x.shape, macs=False)
    (y,) = sess.run(None, {"X": x})
    np.testing.assert_allclose(y, sp.reference(x, w, None, sp.diagonal_mask(2), patch=2)[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors


def _expect_error(match, fn):
    with pytest.raises(Exception, match=match):
        fn()


def test_error_mask_shape_names_the_expected_shapes():
    x = np.ones((1, 3, 8, 8), np.float32)
    w = np.ones((5, 3, 3, 3), np.float32)
    sess = _session(w, None, patch=2, runtime_mask=True, x_shape=x.shape)
    expected = r"SpatialConv: input 'mask' has shape \(3, 3\), expected \(p, p\)=\(2, 2\), \(K, p, p\)=\(5, 2, 2\) " \
               r"or \(K, OH, OW\)=\(5, 6, 6\)"
    _expect_error(expected, lambda: _run(sess, x, np.ones((3, 3), np.uint8)))
    _expect_error(r"input 'mask' has shape \(4, 6, 6\)", lambda: _run(sess, x, np.ones((4, 6, 6), np.uint8)))
    _expect_error(r"input 'mask' has shape \(2,\)", lambda: _run(sess, x, np.ones((2,), np.uint8)))
    _expect_error(r"input 'mask' has shape \(1, 2, 2\)", lambda: _run(sess, x, np.ones((1, 2, 2), np.uint8)))
    _expect_error(r"input 'mask' has shape \(5, 6, 6\)",  # full mask for another input size
                  lambda: _run(_session(w, None, patch=2, runtime_mask=True, x_shape=(1, 3, 9, 9)),
                               np.ones((1, 3, 9, 9), np.float32), np.ones((5, 6, 6), np.uint8)))


def test_error_mask_values_and_type():
    x = np.ones((1, 3, 8, 8), np.float32)
    w = np.ones((5, 3, 3, 3), np.float32)
    sess = _session(w, None, patch=2, runtime_mask=True, x_shape=x.shape)
    bad = np.ones((2, 2), np.uint8)
    bad[1, 0] = 7
    _expect_error(r"SpatialConv: input 'mask' has value 7 at flat index 2, expected 0 or 1", lambda: _run(sess, x, bad))
    _expect_error(r"expected: \(tensor\(uint8\)\)", lambda: _run(sess, x, np.ones((2, 2), np.float32)))
    # a constant mask is checked when the session is created
    node = helper.make_node("SpatialConv", ["X", "W", "", "M"], ["Y"], domain=DOMAIN, patch=2)
    _expect_error(r"SpatialConv: input 'mask' has value 2 at flat index 3",
                  lambda: make_session(single_op_model(node, {"W": w, "M": np.array([[1, 0], [0, 2]], np.uint8)},
                                                       x.shape)))
    _expect_error(r"SpatialConv: input 'mask' has shape \(3, 3\), expected \(p, p\)=\(2, 2\)",
                  lambda: make_session(single_op_model(node, {"W": w, "M": np.ones((3, 3), np.uint8)}, x.shape)))
    with pytest.raises(ValueError, match="input 'mask' has value 3"):
        sp.validate_mask(np.full((2, 2), 3, np.uint8), 5, 6, 6, 2)


@pytest.mark.parametrize("patch,match", [(None, "attribute 'patch' is missing, expected 2, 3 or 4"),
                                         (1, "attribute 'patch' is 1, expected 2, 3 or 4"),
                                         (5, "attribute 'patch' is 5, expected 2, 3 or 4")])
def test_error_patch_attribute(patch, match):
    attrs = {} if patch is None else {"patch": patch}
    node = helper.make_node("SpatialConv", ["X", "W", "", "M"], ["Y"], domain=DOMAIN, **attrs)
    model = single_op_model(node, {"W": np.ones((2, 1, 1, 1), np.float32), "M": np.ones((2, 2), np.uint8)},
                            (1, 1, 4, 4))
    _expect_error("SpatialConv: " + match, lambda: make_session(model))


def test_error_weights_bias_and_input():
    mask = np.ones((2, 2), np.uint8)
    node = helper.make_node("SpatialConv", ["X", "W", "B", "M"], ["Y"], domain=DOMAIN, patch=2)
    w = np.ones((4, 3, 3, 3), np.float32)
    # W fed at run time
    model = single_op_model(node, {"B": np.ones(4, np.float32), "M": mask}, (1, 3, 6, 6),
                            runtime_inputs={"W": (TensorProto.FLOAT, [4, 3, 3, 3])})
    _expect_error(r"SpatialConv: input 'W' \(1\) must be a constant initializer", lambda: make_session(model))
    # B fed at run time, B of the wrong shape
    model = single_op_model(node, {"W": w, "M": mask}, (1, 3, 6, 6), runtime_inputs={"B": (TensorProto.FLOAT, [4])})
    _expect_error(r"SpatialConv: input 'B' \(2\) must be a constant initializer", lambda: make_session(model))
    model = single_op_model(node, {"W": w, "B": np.ones(3, np.float32), "M": mask}, (1, 3, 6, 6))
    _expect_error(r"SpatialConv: input 'B' has shape \(3,\), expected \(4,\)", lambda: make_session(model))
    # W of the wrong rank, kernel_shape disagreeing, 3-D conv, unknown auto_pad
    model = single_op_model(node, {"W": np.ones((4, 3, 3), np.float32), "B": np.ones(4, np.float32), "M": mask},
                            (1, 3, 6, 6))
    _expect_error(r"SpatialConv: input 'W' has shape \(4, 3, 3\), expected rank 4", lambda: make_session(model))
    bad = helper.make_node("SpatialConv", ["X", "W", "B", "M"], ["Y"], domain=DOMAIN, patch=2, kernel_shape=[2, 2])
    model = single_op_model(bad, {"W": w, "B": np.ones(4, np.float32), "M": mask}, (1, 3, 6, 6))
    _expect_error(r"SpatialConv: attribute 'kernel_shape' \(2, 2\) does not match input 'W'", lambda: make_session(model))
    bad = helper.make_node("SpatialConv", ["X", "W", "B", "M"], ["Y"], domain=DOMAIN, patch=2, auto_pad="FOO")
    model = single_op_model(bad, {"W": w, "B": np.ones(4, np.float32), "M": mask}, (1, 3, 6, 6))
    _expect_error(r"SpatialConv: attribute 'auto_pad' is 'FOO'", lambda: make_session(model))
    # X: wrong rank, channel mismatch, smaller than the kernel (X declared without a shape, so the op checks)
    model = single_op_model(node, {"W": w, "B": np.ones(4, np.float32), "M": mask}, (1, 3, 6, 6))
    model.graph.input[0].type.tensor_type.ClearField("shape")
    sess = make_session(model)
    _expect_error(r"SpatialConv: input 'X' has shape \(1, 3, 6\), expected rank 4",
                  lambda: sess.run(None, {"X": np.ones((1, 3, 6), np.float32)}))
    _expect_error(r"SpatialConv: input 'X' has 2 channels, expected 3",
                  lambda: sess.run(None, {"X": np.ones((1, 2, 6, 6), np.float32)}))
    _expect_error(r"SpatialConv: input 'X' of spatial size 2x2 .* smaller than the dilated kernel 3x3",
                  lambda: sess.run(None, {"X": np.ones((1, 3, 2, 2), np.float32)}))


def test_empty_batch():
    w = np.ones((4, 3, 3, 3), np.float32)
    sess = _session(w, None, patch=2, mask=sp.diagonal_mask(2), x_shape=(1, 3, 6, 6))
    y, macs = _run(sess, np.ones((0, 3, 6, 6), np.float32))
    assert y.shape == (0, 4, 4, 4) and macs == 0


# ------------------------------------------------------------------------------- python-side helpers


def test_mask_helpers():
    assert (sp.uniform_layer_mask(2, [(0, 0), (1, 1)]) == sp.diagonal_mask(2)).all()
    f = sp.uniform_filter_mask([[(0, 0)], [(1, 1)], np.array([[0, 1], [1, 0]], np.uint8)], p=2)
    assert f.shape == (3, 2, 2) and f.dtype == np.uint8 and f[1, 1, 1] == 1 and f[2, 0, 1] == 1
    full = sp.expand_mask(f, 3, 5, 5, 2)
    assert full.shape == (3, 5, 5) and (full[:, 0:2, 2:4] == f).all() and (full[:, 4, 4] == f[:, 0, 0]).all()
    assert (sp.expand_mask(full, 3, 5, 5, 2) == full).all()
    lay = sp.expand_mask(sp.diagonal_mask(3), 2, 4, 7, 3)
    assert lay.shape == (2, 4, 7) and lay[1, 3, 3] == 1 and lay[1, 3, 4] == 0
    pats = np.random.default_rng(8).integers(0, 2, (3, 3, 3, 2, 2)).astype(np.uint8)
    pm = sp.per_patch_mask(pats, (5, 6))
    assert pm.shape == (3, 5, 6) and (pm[:, 2:4, 4:6] == pats[:, 1, 2]).all() and (pm[:, 4, 0:2] == pats[:, 2, 0, 0]).all()
    assert sp.mask_form((2, 2), 3, 5, 5, 2) == "layer" and sp.mask_form((3, 5, 5), 3, 5, 5, 2) == "full"
    with pytest.raises(ValueError, match=r"expected \(p, p\)=\(2, 2\), \(K, p, p\)=\(3, 2, 2\) or \(K, OH, OW\)=\(3, 5, 5\)"):
        sp.mask_form((3, 3), 3, 5, 5, 2)
    with pytest.raises(ValueError, match="patch is 5"):
        sp.uniform_layer_mask(5, [])


def test_make_node_attributes_and_initializers():
    node, inits = sp.make_node("X", "W", None, "Y", patch=3, mask=sp.diagonal_mask(3), macs_output="m",
                               strides=[2, 2], pads=[1, 1, 1, 1])
    assert node.op_type == "SpatialConv" and node.domain == DOMAIN
    assert list(node.input) == ["X", "W", "", "Y_spatial_mask"] and list(node.output) == ["Y", "m"]
    assert set(inits) == {"Y_spatial_mask"}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["patch"] == 3 and attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    node, inits = sp.make_node("X", "W", "B", "Y", patch=2, mask_name="M")
    assert inits == {} and node.input[3] == "M" and len(node.input) == 4
    node, _ = sp.make_node("X", "W", None, "Y", patch=2, mask_name="M", other="S")
    assert list(node.input) == ["X", "W", "", "M", "S"]  # the residual is the last input
    with pytest.raises(ValueError):
        sp.make_node("X", "W", "B", "Y", patch=2)


@pytest.mark.parametrize("name", ["3x3 256x14x14", "3x3 512x7x7"])
def test_bench_case_reaches_its_skip_target(name):
    layer = [lay for lay in LAYERS if lay.name == name][0]
    for skip in (0.25, 0.5, 0.75, 0.9):
        case = op_spatial.build(layer, skip, np.random.default_rng(9))
        y, macs = make_session(case.model).run(None, case.feeds)
        dense = layer.K * layer.C * layer.KH * layer.KW * y.shape[2] * y.shape[3]
        assert abs((1 - int(macs) / dense) - skip) < 0.01, (skip, 1 - int(macs) / dense)


def test_rule_passes_the_residual_as_the_last_input():
    """passes/rules/spatial.py: a residual site's `other` operand becomes input 4; a plain site has 4 inputs."""
    from onnxzero.passes.rules.spatial import SpatialRule
    from onnxzero.passes.sites import Site

    base = dict(name="conv1", conv="conv1", activation="relu1", activation_op="Relu", clip_max=None, x="X", w="W",
                b="B", conv_output="C", y="Y", x_shape=(8, 6, 6), w_shape=(4, 8, 3, 3), y_shape=(4, 6, 6),
                strides=(1, 1), pads=(1, 1, 1, 1), auto_pad="NOTSET", dilations=(1, 1), group=1,
                macs=4 * 8 * 9 * 36, input_nonneg=True, nonneg_reason="test")
    import onnx

    rule = SpatialRule(onnx.ModelProto())  # rewrite() reads no weights, and spatial fits nothing
    rep = rule.rewrite(Site(**base, residual="S", add="add1"), {"patch": 2}, {}, "Y")
    assert list(rep.nodes[0].input) == ["X", "W", "B", "conv1__mask", "S"]
    rep = rule.rewrite(Site(**base), {"patch": 2}, {}, "Y")
    assert list(rep.nodes[0].input) == ["X", "W", "B", "conv1__mask"]


# ------------------------------------------------- the NCHWc path (layer-wide masks, spatial_nchwc.cc)


@st.composite
def nchwc_cases(draw):
    """Shapes the NCHWc path serves (group 1, C and K whole blocks): any geometry, several filter sets."""
    C, K = draw(st.sampled_from([16, 32, 48])), draw(st.sampled_from([16, 32, 80]))
    KH, KW = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    strides = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    dilations = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    pads = [draw(st.integers(0, 2)) for _ in range(4)]
    g = conv_geometry((1, C, H, W), (K, C, KH, KW), strides=strides, dilations=dilations, pads=pads)
    assume(g.OH >= 1 and g.OW >= 1)
    return dict(N=draw(st.integers(1, 2)), C=C, K=K, H=H, W=W, KH=KH, KW=KW, OH=g.OH, OW=g.OW,
                attrs=dict(strides=strides, dilations=dilations, pads=pads))


@settings(max_examples=max(10, EXAMPLES // 3), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=nchwc_cases(), patch=st.integers(2, 4), density=st.floats(0.1, 0.9), shift=st.floats(-1.5, 1.0),
       residual=st.booleans(), runtime_mask=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_nchwc_layer_mask_matches_reference(case, patch, density, shift, residual, runtime_mask, seed):
    """Layer-wide masks on whole-block channel counts (MLAS for the masked positions and for blocks
    alive in every lane, dot tiles on the padded NCHWc input for the rest): the reference's values and
    its exact MAC count. `shift` moves the biases so that patches range from all dead to all alive."""
    c = case
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((c["N"], c["C"], c["H"], c["W"])), 0).astype(np.float32)
    w = (rng.standard_normal((c["K"], c["C"], c["KH"], c["KW"])) / np.sqrt(c["C"] * c["KH"] * c["KW"])).astype(
        np.float32)
    b = (shift + 0.5 * rng.standard_normal(c["K"])).astype(np.float32)
    mask = _random_mask(rng, "layer", patch, c["K"], c["OH"], c["OW"], density)
    other = rng.standard_normal((c["N"], c["K"], c["OH"], c["OW"])).astype(np.float32) if residual else None
    _check_against_reference(x, w, b, mask, patch=patch, runtime_mask=runtime_mask, other=other, **c["attrs"])


@settings(max_examples=max(10, EXAMPLES // 4), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(C=st.sampled_from([16, 32]), K=st.sampled_from([16, 48]), hw=st.integers(3, 11), k=st.sampled_from([1, 3]),
       residual=st.booleans(), nan_in_other=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_nchwc_nan_inf_match_onnxruntime_and_reference(C, K, hw, k, residual, nan_in_other, seed):
    """Inf/-Inf/NaN in X (and in `other`): with an all-ones mask exactly onnxruntime's Conv(+Add)+Relu
    (NaN where it is NaN, the same finite values elsewhere: nothing leaks into a neighbour), and with
    the 2x2 diagonal mask exactly the reference (NaN at a masked position does not make a patch alive)."""
    rng = np.random.default_rng(seed)
    x = _nan_inf_input(rng, (2, C, hw, hw))
    w = rng.standard_normal((K, C, k, k)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    pads = [k // 2] * 4
    other = None
    if residual:
        other = rng.standard_normal((2, K, hw, hw)).astype(np.float32)
        if nan_in_other:
            other.reshape(-1)[rng.choice(other.size, 3, replace=False)] = [np.nan, np.inf, -np.inf]
    y, _ = _run(_session(w, b, patch=2, mask=np.ones((2, 2), np.uint8), x_shape=x.shape, pads=pads,
                         other=residual), x, other=other)
    _assert_same_nan_and_values(y, _ort_conv_relu(x, w, b, other=other, pads=pads))
    y, macs = _run(_session(w, b, patch=2, mask=sp.diagonal_mask(2), x_shape=x.shape, pads=pads, other=residual),
                   x, other=other)
    with np.errstate(invalid="ignore"):
        y_ref, macs_ref = sp.reference(x, w, b, sp.diagonal_mask(2), patch=2, pads=pads, other=other)
    _assert_same_nan_and_values(y, y_ref)
    assert macs == macs_ref


@settings(max_examples=max(10, EXAMPLES // 4), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(C=st.sampled_from([3, 16, 32]), K=st.sampled_from([16, 32]), hw=st.integers(3, 10),
       mask_kind=st.sampled_from(["diagonal", "ones", "filter"]), residual=st.booleans(),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans()), seed=st.integers(0, 2**31 - 1))
def test_blocked_layouts_equal_nchw(C, K, hw, mask_kind, residual, flags, seed):
    """x_blocked / other_blocked / y_blocked as ConvRelu reads them: bit-identical to the NCHW op (to
    float rounding with a residual), on
    the NCHWc paths (diagonal, all ones) and on the channels-last fallback (per-filter mask)."""
    from onnxzero.ops import conv_relu as cr

    xb, ob, yb = flags
    allowed = cr.blocked_io((K, C, 3, 3))
    xb, ob, yb = xb and allowed[0], ob and allowed[1] and residual, yb and allowed[2]
    B = cr.block_size()
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((2, C, hw, hw)), 0).astype(np.float32)
    w = (rng.standard_normal((K, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    b = (0.3 * rng.standard_normal(K) - 0.2).astype(np.float32)
    other = rng.standard_normal((2, K, hw, hw)).astype(np.float32) if residual else None
    mask = {"diagonal": sp.diagonal_mask(2), "ones": np.ones((2, 2), np.uint8),
            "filter": np.stack([sp.diagonal_mask(2)] * K)}[mask_kind]

    def run(xb, ob, yb):
        sess = _session(w, b, patch=2, mask=mask, x_shape=cr.to_blocked(x, B).shape if xb else x.shape,
                        other=residual, pads=[1, 1, 1, 1], x_blocked=xb, other_blocked=ob, y_blocked=yb)
        feeds = {"X": cr.to_blocked(x, B) if xb else x}
        if residual:
            feeds["O"] = cr.to_blocked(other, B) if ob else other
        y, macs = sess.run(None, feeds)
        return (cr.from_blocked(y) if yb else y), int(macs)

    y0, m0 = run(False, False, False)
    y1, m1 = run(xb, ob, yb)
    if residual:
        # a dense block adds onto a blocked residual in onnxruntime's Conv+Add order (nchwc.cc), which
        # rounds the sum differently from adding it after the conv: equal to float rounding
        np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(y1, y0)
    assert m1 == m0


def test_blocked_attribute_refused_where_the_rule_forbids_it():
    w = np.zeros((24, 32, 3, 3), np.float32)
    with pytest.raises(Exception, match=r"SpatialConv: attribute 'y_blocked' is 1, but weights of 24 filters x 32 "
                                        r"input channels, group 1 cannot write a blocked Y"):
        _session(w, None, patch=2, mask=sp.diagonal_mask(2), x_shape=(1, 32, 6, 6), y_blocked=True)
