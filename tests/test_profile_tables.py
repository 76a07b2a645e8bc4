"""Profile's seed tables: effectual MACs (pruning paper, Table III) and models side by side (Table I).

Expected values are counted by hand in the comments on 1-layer models with known zeros, and on
LeNet-5's layer shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxzero import zoo
from onnxzero.data import Dataset
from onnxzero.errors import UserError
from onnxzero.ops import sparse_quant
from onnxzero.profile.compare import (PJ_DRAM32, PJ_FADD32, PJ_FMUL32, PJ_SRAM32_8KB, activation_bytes_moved,
                                      compare_models, peak_activation_bytes)
from onnxzero.profile.effectual import effectual_macs

# two 3x3 images: one with zeros, one without
X = np.array([[[[1, 0, 3], [0, 5, 0], [7, 0, 9]]], [[[1, 1, 1], [1, 1, 1], [1, 1, 1]]]], np.float32)
# filter 0 has non-zeros at offsets (0,0) and (1,1); filter 1 is all zero
W = np.array([[[[1, 0], [0, 2]]], [[[0, 0], [0, 0]]]], np.float32)


def _conv_model(w: np.ndarray, pads=(0, 0, 0, 0)) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[2, 2], pads=list(pads), name="conv")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _ds(x: np.ndarray) -> Dataset:
    return Dataset(inputs=x, labels=None, path=Path("hand"))


def test_conv_effectual_by_hand():
    # sample 0, filter 0, output (i, j) counts x[i][j] != 0 and x[i+1][j+1] != 0:
    #   (0,0): 1,5 -> 2   (0,1): 0,0 -> 0   (1,0): 0,0 -> 0   (1,1): 5,9 -> 2    = 4
    # sample 1 (all ones): 2 per output x 4 outputs = 8; filter 1 never counts.   mean = (4 + 8) / 2 = 6
    # dense MACs per sample: K*OH*OW*C*KH*KW = 2*2*2*1*2*2 = 32
    r = effectual_macs(_conv_model(W), data=_ds(X))
    (layer,) = r.layers
    assert (layer.node, layer.op_type, layer.macs, layer.effectual) == ("conv", "Conv", 32, 6.0)
    assert layer.share == 6 / 32 and r.share == 6 / 32
    assert layer.weight_nonzero == 2 / 8
    assert layer.input_nonzero == (5 + 9) / 18


def test_padding_counts_as_zero_input():
    # pads 1: output 4x4 over the all-ones image placed at rows/cols 1..3 of a 5x5 padded input.
    # offset (0,0) is non-zero where i, j in 1..3 (9 outputs); offset (1,1) where i, j in 0..2 (9): 18.
    # dense MACs: 2 filters * 16 outputs * 4 = 128 (padding included, as profile counts them)
    r = effectual_macs(_conv_model(W, pads=(1, 1, 1, 1)), data=_ds(X[1:]))
    assert (r.layers[0].macs, r.layers[0].effectual) == (128, 18.0)


def test_dense_weights_differ_from_pruned():
    # all four weights of filter 0 non-zero: every output counts the non-zero inputs of its window.
    # sample 0: windows (1,0,0,5) (0,3,5,0) (0,5,7,0) (5,0,0,9) -> 2 each = 8; sample 1: 4*4 = 16; mean 12
    w = W.copy()
    w[0, 0] = [[1.0, 0.01], [0.02, 2.0]]
    assert effectual_macs(_conv_model(w), data=_ds(X)).layers[0].effectual == 12.0


def test_sparse_quant_counts_the_decompressed_weights():
    # threshold 0.5 prunes 0.01 and 0.02: the kernel's weights have filter 0's pattern of W -> 6 as by hand
    w = W.copy()
    w[0, 0] = [[1.0, 0.01], [0.02, 2.0]]
    c = sparse_quant.compress(w, threshold=0.5)
    node, inits = sparse_quant.make_node("x", "w", None, "y", compressed=c, kernel_shape=(2, 2), name="sq")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    from onnxzero import DOMAIN, OP_VERSION

    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])
    (layer,) = effectual_macs(m, data=_ds(X)).layers
    assert (layer.op_type, layer.macs, layer.effectual, layer.weight_nonzero) == ("SparseQuantConv", 32, 6.0, 2 / 8)


def test_gemm_by_hand():
    # x = [1, 0, 2]; B = [[1, 0], [3, 0], [0, 4]]: output 0 pairs k=0 only, output 1 pairs k=2 only -> 2 of 6
    b = np.array([[1, 0], [3, 0], [0, 4]], np.float32)
    node = helper.make_node("Gemm", ["x", "b"], ["y"], name="fc")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    (layer,) = effectual_macs(m, data=_ds(np.array([[1, 0, 2]], np.float32))).layers
    assert (layer.macs, layer.effectual, layer.weight_nonzero) == (6, 2.0, 3 / 6)


def test_effectual_on_zoo_model_and_its_json():
    r = effectual_macs("zoo:lenet5")
    assert [x.op_type for x in r.layers] == ["Conv", "Conv", "Gemm", "Gemm", "Gemm"]
    assert [x.macs for x in r.layers] == [86_400, 153_600, 30_720, 10_080, 840]  # profile's (cost.py) counts
    assert r.layers[0].share == 1.0  # normalized MNIST pixels and float weights are never exactly 0
    assert 0 < r.layers[1].share < 1
    # a Gemm with no zero weight uses every input equally often: its share is its inputs' non-zero share
    # (not so for a conv without padding, whose border inputs meet fewer weights)
    for x in r.layers[2:]:
        assert x.weight_nonzero == 1.0 and x.share == pytest.approx(x.input_nonzero)
    j = r.to_json()
    assert j["macs"] == 281_640 and j["layers"][1]["effectual_share"] == r.layers[1].share


def test_effectual_needs_data():
    with pytest.raises(UserError, match=r"^effectual MACs need data: expected --data FILE.npz"):
        effectual_macs(_conv_model(W))


def _lenet_expected():
    # LeNet-5 at batch 1, float32 (4 bytes): conv1 6x24x24, conv2 16x8x8, pools 6x12x12 and 16x4x4, fc 120/84/10
    macs = 24 * 24 * 6 * 25 + 8 * 8 * 16 * 150 + 256 * 120 + 120 * 84 + 84 * 10
    params = (6 * 25 + 6) + (16 * 150 + 16) + (256 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    x, c1, p1, c2, p2 = 784 * 4, 3456 * 4, 864 * 4, 1024 * 4, 256 * 4
    # peak: conv1's output and its Relu output are live together (the input was freed after conv1)
    peak = 2 * c1
    moved = ((x + c1) + 2 * c1 + (c1 + p1) + (p1 + c2) + 2 * c2 + (c2 + p2) + 2 * p2
             + (p2 + 480) + 2 * 480 + (480 + 336) + 2 * 336 + (336 + 40))
    return macs, params, peak, moved


def test_compare_two_zoo_models():
    from onnxzero.profile import profile_model

    c = compare_models(["zoo:lenet5", "zoo:alexnet-mnist"], runs=5)
    lenet, alex = c.models
    macs, params, peak, moved = _lenet_expected()
    assert (lenet.macs, lenet.params, lenet.peak_activation_bytes, lenet.activation_bytes_moved) == (macs, params, peak, moved)
    assert lenet.weight_bytes == 4 * params
    parts = lenet.energy_pj
    assert parts["compute"] == pytest.approx(macs * (PJ_FMUL32 + PJ_FADD32))
    assert parts["dram"] == pytest.approx(params * PJ_DRAM32) and parts["sram"] == pytest.approx(moved / 4 * PJ_SRAM32_8KB)
    assert lenet.energy_uj == pytest.approx(sum(parts.values()) / 1e6)
    p = profile_model("zoo:alexnet-mnist", runs=1).model
    assert (alex.macs, alex.params, alex.accuracy) == (p.macs, p.params, p.accuracy)  # profile's own figures
    assert alex.macs > lenet.macs and alex.peak_activation_bytes > lenet.peak_activation_bytes
    assert lenet.latency_ms > 0 and alex.latency_ms > 0
    j = c.to_json()
    assert [m["name"] for m in j["models"]] == ["zoo:lenet5", "zoo:alexnet-mnist"]
    assert "estimate" in j["energy_estimate"] and "Horowitz" in j["energy_estimate"]


def test_compare_counts_the_ops_own_macs(tmp_path):
    # a rewritten model: its SparseQuantConv does fewer MACs than the dense conv, and stores fewer weight bytes
    from onnxzero.data import load_dataset
    from onnxzero.load import load_model
    from onnxzero.passes.rewrite import rewrite

    base = load_model("zoo:lenet5")
    ds = load_dataset(zoo.default_data("zoo:lenet5"))
    m, _ = rewrite(base, config={"sites": {"/features/features.3/Conv": {"technique": "sparse-quant", "prune": 0.5}}},
                   inputs=ds.inputs[:100], labels=ds.labels[:100])
    path = tmp_path / "sq.onnx"
    onnx.save(m, path)
    c = compare_models(["zoo:lenet5", str(path)], runs=2)  # the file is measured on the zoo model's data
    dense, sq = c.models
    assert c.notes == ["sq.onnx: no data given, measured on the zoo models' mnist-heldout.npz"]
    assert (sq.data, sq.samples) == (dense.data, dense.samples) and sq.accuracy is not None
    assert sq.macs < dense.macs and sq.weight_bytes < dense.weight_bytes
    assert sq.peak_activation_bytes <= dense.peak_activation_bytes


def test_peak_walk_frees_after_last_use():
    # x -> A -> a ; x -> B -> b ; (a, b) -> C -> y : x lives until B, a until C
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g)
    sizes = {"x": 100, "a": 10, "b": 1000, "y": 1}
    # after A: x+a = 110; after B: x+a+b = 1110 (then x freed: 1010); after C: a+b+y = 1011
    assert peak_activation_bytes(m, sizes) == 1110
    assert activation_bytes_moved(m, sizes) == (100 + 10) + (100 + 1000) + (10 + 1000 + 1)


def test_compare_bad_input():
    with pytest.raises(UserError, match=r"^compare needs at least one model, got none$"):
        compare_models([])
    with pytest.raises(UserError, match=r"^runs is 0, expected a positive integer$"):
        compare_models(["zoo:lenet5"], runs=0)
