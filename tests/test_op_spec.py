"""The op spec (onnxzero/ops/spec.json) is the one declaration of every op: the library registers
exactly its inputs, every make_node builds nodes through it, and misuse fails where a node is made."""

import ctypes

import numpy as np
import onnx
import pytest

import onnxzero
from onnxzero.ops import conv_relu, early_exit, lazy, sparse_quant, spatial
from onnxzero.ops.spec import CONSTANTS, OPS, setting_input

_ONNX_ELEM = {"float": 1, "uint8": 2, "int8": 3, "int64": 7}  # ONNXTensorElementDataType values


def _registered() -> dict[str, list[tuple[int, bool]]]:
    lib = ctypes.CDLL(onnxzero.get_library_path())
    lib.OnnxzeroOpTable.restype = ctypes.c_char_p
    out = {}
    for line in lib.OnnxzeroOpTable().decode().splitlines():
        name, rest = line.split(":")
        out[name] = [(int(t), o == "1") for t, o in (x.split(",") for x in rest.split(";") if x)]
    return out


def test_library_registers_exactly_the_spec():
    reg = _registered()
    assert sorted(reg) == sorted(OPS) == ["ConvRelu", "EarlyExitConv", "LazyConv", "SparseQuantConv", "SpatialConv"]
    for name, op in OPS.items():
        assert reg[name] == [(_ONNX_ELEM[x.dtype], x.optional) for x in op.inputs], name
    # hand-checked anchors, so a spec edit that breaks the op contract shows up here too
    assert [x.name for x in OPS["LazyConv"].inputs] == ["X", "W", "B", "pred_W", "pred_b", "ratio", "other", "pred_V"]
    assert reg["SparseQuantConv"][:4] == [(1, False), (3, False), (2, False), (7, False)]
    assert OPS["EarlyExitConv"].index("other") == 5


def test_settings_and_constants():
    assert {n: [x.name for x in o.settings] for n, o in OPS.items()} == {
        "ConvRelu": [], "LazyConv": ["ratio"], "EarlyExitConv": ["n_terms", "threshold"], "SparseQuantConv": [],
        "SpatialConv": ["mask"]}
    assert setting_input("layer1.0/conv1", "ratio") == "layer1.0/conv1__ratio"
    assert CONSTANTS["early_exit_neg_band_edges"] == early_exit.NEG_BAND_EDGES == (0.0, 0.25, 0.5, 1.0)
    assert CONSTANTS["lazy_ratio_tolerance"] == 1e-4
    # the tolerance at work: 0.3 of 10 filters is 3 although 0.3 * 10 rounds above 3 in float32
    assert lazy.filters_computed(0.3, 10) == 3


def test_node_orders_inputs_and_trims_absent_trailing_ones():
    op = OPS["LazyConv"]
    n = op.node({"X": "x", "W": "w", "pred_W": "pw", "pred_b": "pb"}, ["y"], name="n")
    assert list(n.input) == ["x", "w", "", "pw", "pb"]
    n = op.node({"X": "x", "W": "w", "pred_W": "pw", "pred_b": "pb", "other": "o"}, ["y", "m"], name="n", ratio=0.5)
    assert list(n.input) == ["x", "w", "", "pw", "pb", "", "o"]
    assert onnx.helper.get_attribute_value(n.attribute[0]) == pytest.approx(0.5)


@pytest.mark.parametrize("call, message", [
    (lambda: OPS["ConvRelu"].node({"X": "x", "Weights": "w"}, ["y"], name="n"),
     "ConvRelu has no input 'Weights', expected some of X, W, B, other"),
    (lambda: OPS["ConvRelu"].node({"X": "x"}, ["y"], name="n"), "ConvRelu: input 'W' is required"),
    (lambda: OPS["ConvRelu"].node({"X": "x", "W": "w"}, ["y"], name="n", ratio=0.5), "ConvRelu has no attribute 'ratio'"),
    (lambda: OPS["SpatialConv"].node({"X": "x", "W": "w", "mask": "m"}, ["y"], name="n"),
     "SpatialConv: attribute 'patch' is required"),
    (lambda: OPS["ConvRelu"].index("ratio"), "ConvRelu has no input 'ratio'"),
])
def test_misuse_fails_where_the_node_is_made(call, message):
    with pytest.raises((ValueError, KeyError), match=message):
        call()


def test_every_make_node_goes_through_the_spec():
    w = np.ones((8, 4, 3, 3), np.float32)
    nodes = [
        conv_relu.make_node("x", "w", None, "y", other="o")[0],
        lazy.make_node("x", "w", "b", "y", pred_w=np.ones((4, 8), np.float32), pred_b=np.zeros(8, np.float32),
                       ratio_input=setting_input("s", "ratio"))[0],
        early_exit.make_node("x", "w", "b", "y", mode="predictive", n_terms="nt", threshold="th")[0],
        sparse_quant.make_node("x", "w", "b", "y", compressed=sparse_quant.compress(w, threshold=0.5))[0],
        spatial.make_node("x", "w", "b", "y", patch=2, mask_name="m")[0],
    ]
    for n in nodes:
        spec = OPS[n.op_type]
        assert n.domain == onnxzero.DOMAIN
        assert len(n.input) <= len(spec.inputs)
        assert {a.name for a in n.attribute} <= set(spec.attributes)
        for x, name in zip(spec.inputs, n.input):
            assert name or x.optional, (n.op_type, x.name)
    assert list(nodes[1].input) == ["x", "w", "b", "y__pred_W", "y__pred_b", "s__ratio"]
    assert list(nodes[2].input)[3:] == ["nt", "th"]


def test_rewrite_reports_where_each_sites_op_is():
    """The rewrite's typed map site -> (op node, Y, macs output, run-time settings): nobody parses names."""
    from onnxzero.evaluate import MACS_SUFFIX
    from onnxzero.load import load_model
    from onnxzero.passes.rewrite import rewrite

    model = load_model("zoo:resnet-mnist")
    out, rep = rewrite(model, technique="lazy", config={"default": {"ratio": 0.5}},
                       inputs=np.random.default_rng(0).random((8, 1, 28, 28), np.float32))
    nodes = {n.name: n for n in out.graph.node}
    graph_inputs = {i.name for i in out.graph.input}
    assert len(rep.rewritten) == 7
    for s in rep.rewritten:
        n = nodes[s.op]
        assert n.op_type == "LazyConv" and n.output[0] == s.y
        assert s.macs_output == s.y + MACS_SUFFIX
        assert list(s.settings) == ["ratio"] and s.settings["ratio"] in graph_inputs
        assert n.input[OPS["LazyConv"].index("ratio")] == s.settings["ratio"]
    assert all(s.op is None and s.settings == {} for s in rep.sites if not s.technique)
