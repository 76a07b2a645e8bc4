"""Fixtures for the rules' own tests (each rule's test sits beside it, as in onnxscript's rewriter)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxzero.passes.rules.base import Calibration
from onnxzero.passes.sites import Site, find_sites


def conv_relu_model(*, c: int = 3, k: int = 8, h: int = 8, residual: bool = False, seed: int = 0) -> onnx.ModelProto:
    """X (N, c, h, h) >= 0 -> Relu -> Conv(k, 3x3, pad 1) [+ shortcut Conv] -> Relu -> Y: one site 'conv'."""
    rng = np.random.default_rng(seed)
    inits = {"W": rng.standard_normal((k, c, 3, 3)).astype(np.float32) / 3,
             "B": rng.standard_normal(k).astype(np.float32) * 0.1}
    nodes = [helper.make_node("Relu", ["X"], ["xr"], name="relu_in"),
             helper.make_node("Conv", ["xr", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    if residual:
        inits["Ws"] = rng.standard_normal((k, c, 1, 1)).astype(np.float32)
        nodes += [helper.make_node("Conv", ["xr", "Ws"], ["sc"], name="shortcut"),
                  helper.make_node("Add", ["c", "sc"], ["s"], name="add"),
                  helper.make_node("Relu", ["s"], ["Y"], name="relu")]
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["Y"], name="relu"))
    graph = helper.make_graph(nodes, "one_site", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", c, h, h])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", k, h, h])],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def plain():
    """(model, its site, a Calibration on 32 random samples)."""
    model = conv_relu_model()
    (site,) = find_sites(model)
    x = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    return model, site, Calibration(model, x)


@pytest.fixture
def residual():
    model = conv_relu_model(residual=True)
    (site,) = find_sites(model)
    x = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    return model, site, Calibration(model, x)


__all__ = ["Site", "conv_relu_model"]
