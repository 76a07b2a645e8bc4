"""Every technique at its no-skip setting equals onnxruntime's own Conv+Relu, on any conv geometry.

Hypothesis draws the geometry (stride, asymmetric padding, dilation, groups, batch), ReLU inputs
with many exact zeros and He-normal weights (the shared strategies in conftest.py); the model is
x -> Relu -> Conv -> Relu, so the site's input is provably non-negative and exact early exit
applies. The reference is onnxruntime's Conv+Relu with graph optimizations off (ort_run), the
MAC count's reference is the definition: output elements of the reference times C/group*KH*KW.
"""

import numpy as np
import onnx
from conftest import activations, conv_geometries, he_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxzero.evaluate import Evaluator
from onnxzero.passes.rewrite import rewrite

# technique -> the config of its setting that skips nothing
NO_SKIP = {
    "lazy": {"default": {"ratio": 1.0}},
    "spatial": {"default": {"patch": 2, "mask": [[1, 1], [1, 1]]}},
    "early-exit": {"default": {"mode": "exact"}},
}


def relu_conv_relu(g: dict, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = he_weights(rng, (g["k"], g["c"] // g["group"], g["kh"], g["kw"]))
    b = (rng.standard_normal(g["k"]) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["rx"], name="pre"),
        helper.make_node("Conv", ["rx", "w", "b"], ["c"], name="conv", kernel_shape=[g["kh"], g["kw"]],
                         strides=list(g["strides"]), pads=list(g["pads"]), dilations=list(g["dilations"]),
                         group=g["group"]),
        helper.make_node("Relu", ["c"], ["y"], name="post"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", g["c"], g["h"], g["w"]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(g=conv_geometries(), technique=st.sampled_from(sorted(NO_SKIP)), seed=st.integers(0, 2**16), data=st.data())
def test_no_skip_setting_equals_conv_relu_and_counts_what_ran(g, technique, seed, data, ort_run):
    model = relu_conv_relu(g, seed)
    x = data.draw(activations((g["n"], g["c"], g["h"], g["w"])))
    out, report = rewrite(model, technique=technique, config=NO_SKIP[technique], inputs=x)
    assert [s.technique for s in report.sites] == [technique], [s.reason for s in report.sites]

    (want,) = ort_run(model, {"x": x})
    got = Evaluator(out).run(x)
    np.testing.assert_allclose(got.logits, want, rtol=1e-4, atol=1e-4)
    dense = want[0].size * (g["c"] // g["group"]) * g["kh"] * g["kw"]  # per sample
    if technique == "early-exit":  # the op counts what ran: its sparse path skips zero-input terms
        assert 0 <= got.macs <= dense
    else:
        assert got.macs == dense


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(g=conv_geometries(), seed=st.integers(0, 2**16), data=st.data())
def test_site_shapes_and_macs_are_onnxruntimes(g, seed, data, ort_run):
    """The site finder's output shape and MACs per sample against the shape onnxruntime's Conv gives."""
    from onnxzero.passes.sites import find_sites

    model = relu_conv_relu(g, seed)
    x = data.draw(activations((g["n"], g["c"], g["h"], g["w"])))
    (want,) = ort_run(model, {"x": x})
    (site,) = find_sites(model)
    assert site.y_shape == want.shape[1:] and site.x_shape == (g["c"], g["h"], g["w"])
    assert site.macs == want[0].size * (g["c"] // g["group"]) * g["kh"] * g["kw"]
    assert site.input_nonneg  # behind the Relu
