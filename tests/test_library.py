"""The custom-op library: found, loadable, one domain shared by Python and C++."""

import ctypes

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import onnxzero
from onnxzero.ops import make_session, single_op_model


def test_library_path_and_domain_constant_shared_with_cpp():
    lib = ctypes.CDLL(onnxzero.get_library_path())
    lib.OnnxzeroDomain.restype = ctypes.c_char_p
    assert lib.OnnxzeroDomain().decode() == onnxzero.DOMAIN == "ai.onnxzero"


def test_library_registers_with_sessionoptions():
    """Without the library onnxruntime refuses an ai.onnxzero node; registered, the same bytes load and run."""
    node = helper.make_node("ConvRelu", ["X", "W"], ["Y", "macs"], domain=onnxzero.DOMAIN)
    model = single_op_model(node, {"W": np.ones((2, 1, 1, 1), np.float32)}, (1, 1, 2, 2)).SerializeToString()
    with pytest.raises(Exception, match="ConvRelu"):
        ort.InferenceSession(model, ort.SessionOptions(), providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.register_custom_ops_library(onnxzero.get_library_path())
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    y, macs = sess.run(None, {"X": np.array([[[[1.0, -2.0], [0.5, 0.0]]]], np.float32)})
    np.testing.assert_array_equal(y, [[[[1.0, 0.0], [0.5, 0.0]], [[1.0, 0.0], [0.5, 0.0]]]])  # both filters: ReLU(x)
    assert int(macs) == 2 * 2 * 2  # K * OH * OW, one input channel, 1x1 kernel


def test_missing_library_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXZERO_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(onnxzero.UserError, match="custom-op library not found"):
        onnxzero.get_library_path()


def test_conv_relu_runs_through_onnxruntime_and_matches_conv_relu():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    x = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    attrs = dict(pads=[1, 1, 1, 1], strides=[2, 2])
    ours = helper.make_node("ConvRelu", ["X", "W", "B"], ["Y", "macs"], domain=onnxzero.DOMAIN, **attrs)
    y, macs = make_session(single_op_model(ours, {"W": w, "B": b}, x.shape)).run(None, {"X": x})
    conv = helper.make_node("Conv", ["X", "W", "B"], ["Y"], **attrs)
    (ref,) = make_session(single_op_model(conv, {"W": w, "B": b}, x.shape), library=False).run(None, {"X": x})
    np.testing.assert_allclose(y, np.maximum(ref, 0), rtol=1e-4, atol=1e-5)
    assert int(macs) == 2 * 8 * 5 * 5 * 3 * 3 * 3  # N * K * OH * OW * C * KH * KW


def test_unknown_op_in_domain_is_refused_by_onnxruntime():
    node = helper.make_node("NoSuchOp", ["X", "W"], ["Y"], domain=onnxzero.DOMAIN)
    model = single_op_model(node, {"W": np.zeros((1, 1, 1, 1), np.float32)}, (1, 1, 2, 2))
    with pytest.raises(Exception, match="NoSuchOp"):
        make_session(model)
