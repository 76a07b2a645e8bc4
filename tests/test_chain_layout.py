"""passes/chain_layout.py: tensors passed only between onnxzero ops become blocked, nothing else."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxzero import DOMAIN, OP_VERSION, zoo
from onnxzero.ops import conv_relu as cr
from onnxzero.ops import lazy
from onnxzero.ops.session import make_session
from onnxzero.passes.chain_layout import apply_chains, block_chains, explain


def _attrs(node) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute if a.name in cr.LAYOUT_ATTRIBUTES}


def _chain(*, k2=32, ort_reader=False, t2_output=False):
    """X -> ConvRelu c1 (16->32) -> t1 -> LazyConv c2 (32->k2) -> t2 -> ConvRelu c3 (k2->32, other=t1) -> Y.

    ort_reader: an onnxruntime Conv also reads t1; t2_output: t2 is a graph output too."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((k2, 32, 3, 3)).astype(np.float32) * 0.1
    w3 = rng.standard_normal((32, k2, 1, 1)).astype(np.float32) * 0.2
    pw = (rng.standard_normal((32, k2)) * 0.1).astype(np.float32)
    pb = (rng.permutation(k2) * 10.0).astype(np.float32)
    c1, _ = cr.make_node("X", "W1", None, "t1", pads=(1, 1, 1, 1), name="c1")
    c2, extra = lazy.make_node("t1", "W2", None, "t2", pred_w=pw, pred_b=pb, ratio=0.5, pads=(1, 1, 1, 1), name="c2")
    c3, _ = cr.make_node("t2", "W3", None, "Y", other="t1", name="c3")
    nodes = [c1, c2, c3]
    inits = {"W1": w1, "W2": w2, "W3": w3, **extra}
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 32, 9, 9])]
    if ort_reader:
        inits["W4"] = rng.standard_normal((8, 32, 1, 1)).astype(np.float32)
        nodes.append(helper.make_node("Conv", ["t1", "W4"], ["Z"], name="ort_conv"))
        outputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [2, 8, 9, 9]))
    if t2_output:
        outputs.append(helper.make_tensor_value_info("t2", TensorProto.FLOAT, [2, k2, 9, 9]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 16, 9, 9])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()],
                              value_info=[helper.make_tensor_value_info("t1", TensorProto.FLOAT, [2, 32, 9, 9])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    ya = make_session(a, threads=2).run(None, feeds)
    yb = make_session(b, threads=2).run(None, feeds)
    assert len(ya) == len(yb)
    for u, v in zip(ya, yb):
        assert u.shape == v.shape  # graph outputs stay NCHW
        np.testing.assert_array_equal(u, v)


X = np.random.default_rng(1).standard_normal((2, 16, 9, 9)).astype(np.float32)


def test_chain_blocks_every_inner_tensor():
    model = _chain()
    assert explain(model) == {"t1": None, "t2": None, "Y": "'Y' is a graph output"}
    out = block_chains(model)
    onnx.checker.check_model(out, full_check=True)
    by_name = {n.name: _attrs(n) for n in out.graph.node}
    assert by_name == {"c1": {"y_blocked": 1}, "c2": {"x_blocked": 1, "y_blocked": 1},
                       "c3": {"x_blocked": 1, "other_blocked": 1}}
    assert [v.name for v in out.graph.value_info] == []  # t1's 4-D value info is gone
    assert _attrs(model.graph.node[0]) == {}  # the input model is untouched
    _same_outputs(model, out, {"X": X})
    # run twice: idempotent
    assert {n.name: _attrs(n) for n in block_chains(out).graph.node} == by_name


def test_producers_limit_which_outputs_are_blocked():
    model = _chain()
    why = explain(model, producers=("ConvRelu",))
    assert why == {"t1": None, "t2": "c2: LazyConv outputs are not blocked (producers)", "Y": "'Y' is a graph output"}
    out = block_chains(model, producers=("ConvRelu",))
    assert {n.name: _attrs(n) for n in out.graph.node} == {"c1": {"y_blocked": 1}, "c2": {"x_blocked": 1},
                                                           "c3": {"other_blocked": 1}}
    _same_outputs(model, out, {"X": X})


def test_chain_edge_read_by_onnxruntime_stays_nchw():
    model = _chain(ort_reader=True)
    why = explain(model)
    assert why["t1"] == "'t1' is also read by ort_conv (Conv)"
    assert why["t2"] is None
    out = block_chains(model)
    onnx.checker.check_model(out, full_check=True)
    assert {n.name: _attrs(n) for n in out.graph.node} == {"c1": {}, "c2": {"y_blocked": 1}, "c3": {"x_blocked": 1},
                                                           "ort_conv": {}}
    assert [v.name for v in out.graph.value_info] == ["t1"]
    _same_outputs(model, out, {"X": X})


def test_graph_output_stays_nchw():
    model = _chain(t2_output=True)
    assert explain(model)["t2"] == "'t2' is a graph output"
    out = block_chains(model)
    assert {n.name: _attrs(n) for n in out.graph.node} == {"c1": {"y_blocked": 1}, "c2": {"x_blocked": 1},
                                                           "c3": {"other_blocked": 1}}
    _same_outputs(model, out, {"X": X})


def test_ops_the_rule_refuses_break_the_chain():
    # c2: K = 24, not a multiple of 16 (takes no blocked tensor); c3: C = 24 (neither, although K = 32)
    model = _chain(k2=24)
    assert explain(model) == {"t1": "c2 cannot read a blocked X",
                              "t2": "c2: its weights cannot write a blocked output",
                              "Y": "c3: its weights cannot write a blocked output"}
    out = block_chains(model)
    assert {n.name: _attrs(n) for n in out.graph.node} == {"c1": {}, "c2": {}, "c3": {}}
    assert out == model


@pytest.fixture(scope="module")
def resnet_lazy():
    from onnxzero.passes.rewrite import rewrite

    data = np.load(zoo.path("mnist"))
    x, y = data["inputs"], data["labels"]
    model, _ = rewrite(onnx.load(zoo.path("resnet-mnist")), technique="lazy", config={"default": {"ratio": 1.0}},
                       inputs=x, labels=y)
    return model, x


def test_resnet_mnist_lazy(resnet_lazy):
    model, x = resnet_lazy
    # By hand from the graph: 7 LazyConv sites (stem 1->16, three stages of conv1/conv2 16, 32, 64
    # wide); stages 1 and 2 have 1x1 projection shortcuts that stay onnxruntime Convs, and stage 2's
    # last output feeds GlobalAveragePool. Blocked: the stem's output (read by stage 0's conv1 as X and
    # its conv2 as `other`, the identity shortcut) and each stage's inner relu. Each stage's output
    # (relu_1) is also read by a shortcut Conv or by the pool: it stays NCHW.
    why = explain(model)
    blocked = sorted(t for t, r in why.items() if r is None)
    assert blocked == ["/stages/stages.0/relu/Relu_output_0", "/stages/stages.1/relu/Relu_output_0",
                       "/stages/stages.2/relu/Relu_output_0", "/stem/stem.2/Relu_output_0"]
    assert why["/stages/stages.0/relu_1/Relu_output_0"] == (
        "'/stages/stages.0/relu_1/Relu_output_0' is also read by /stages/stages.1/shortcut/shortcut.0/Conv (Conv)")
    assert why["/stages/stages.2/relu_1/Relu_output_0"] == (
        "'/stages/stages.2/relu_1/Relu_output_0' is also read by /pool/GlobalAveragePool (GlobalAveragePool)")
    out = block_chains(model)
    onnx.checker.check_model(out, full_check=True)
    attrs = {n.name: _attrs(n) for n in out.graph.node if n.domain == DOMAIN}
    assert attrs == {
        "/stem/stem.0/Conv__lazy": {"y_blocked": 1},
        "/stages/stages.0/conv1/Conv__lazy": {"x_blocked": 1, "y_blocked": 1},
        "/stages/stages.0/conv2/Conv__lazy": {"x_blocked": 1, "other_blocked": 1},
        "/stages/stages.1/conv1/Conv__lazy": {"y_blocked": 1},
        "/stages/stages.1/conv2/Conv__lazy": {"x_blocked": 1},
        "/stages/stages.2/conv1/Conv__lazy": {"y_blocked": 1},
        "/stages/stages.2/conv2/Conv__lazy": {"x_blocked": 1},
    }
    assert not {v.name for v in out.graph.value_info} & set(blocked)
    name = model.graph.input[0].name
    _same_outputs(model, out, {name: x[:64]})
    # and at a run-time ratio of 0.5 (the sites' ratio inputs), still the same outputs
    ratios = {i.name: np.array(0.5, np.float32) for i in model.graph.input if i.name.endswith("__ratio")}
    assert len(ratios) == 7
    _same_outputs(model, out, {name: x[:64], **ratios})


# --- apply_chains: the onnxruntime Convs next to onnxzero ops become ConvRelu, the chain blocked throughout.

def _block(*, shortcut_out=False, head=True):
    """X -> ConvRelu a (16->32) -> t -> main: ConvRelu b (32->32, 3x3, other=s);
    shortcut: onnxruntime Conv s (1x1 32->32, stride 1) -> s_out; b -> u -> onnxruntime Conv r (32->32) -> Relu -> v
    -> ConvRelu d (32->16) -> Y; head (not next to our ops): GlobalAveragePool(Y) -> onnxruntime Conv h -> Z.

    shortcut_out: t and s_out are graph outputs too (no tensor of s can be blocked then)."""
    rng = np.random.default_rng(7)
    w = {k: (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32) for k, s in
         {"Wa": (32, 16, 3, 3), "Wb": (32, 32, 3, 3), "Ws": (32, 32, 1, 1), "Wr": (32, 32, 3, 3),
          "Wd": (16, 32, 1, 1), "Wh": (16, 16, 1, 1)}.items()}
    w["Bs"] = (rng.standard_normal(32) * 0.1).astype(np.float32)
    a, _ = cr.make_node("X", "Wa", None, "t", pads=(1, 1, 1, 1), name="a")
    s = helper.make_node("Conv", ["t", "Ws", "Bs"], ["s_out"], name="s")
    b, _ = cr.make_node("t", "Wb", None, "u", pads=(1, 1, 1, 1), other="s_out", name="b")
    r = helper.make_node("Conv", ["u", "Wr"], ["r_out"], name="r", pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["r_out"], ["v"], name="r_relu")
    d, _ = cr.make_node("v", "Wd", None, "Y", name="d")
    nodes = [a, s, b, r, relu, d]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 16, 9, 9])]
    if head:
        nodes += [helper.make_node("GlobalAveragePool", ["Y"], ["g"], name="pool"),
                  helper.make_node("Conv", ["g", "Wh"], ["Z"], name="h")]
        outputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [2, 16, 1, 1]))
    if shortcut_out:
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 32, 9, 9]) for n in ("t", "s_out")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 16, 9, 9])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])


def _close_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> None:
    ya = make_session(a, threads=2).run(None, feeds)
    yb = make_session(b, threads=2).run(None, feeds)
    for u, v in zip(ya, yb):
        assert u.shape == v.shape
        np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(u).max())))


def _layout(model):
    return {n.name: (n.op_type, _attrs(n), next((a.i for a in n.attribute if a.name == "relu"), 1))
            for n in model.graph.node if n.domain == DOMAIN}


def test_apply_chains_converts_the_convs_next_to_our_ops():
    model = _block()
    out, report = apply_chains(model)
    onnx.checker.check_model(out, full_check=True)
    assert report["converted"] == ["s", "r"]
    assert report["kept"] == {}  # h is not next to an onnxzero op: not even considered
    assert report["blocked"] == ["s_out", "t", "u", "v"]
    assert report["edges"] == {"Y": "'Y' is a graph output"}
    assert _layout(out) == {
        "a": ("ConvRelu", {"y_blocked": 1}, 1),
        "s__chain": ("ConvRelu", {"x_blocked": 1, "y_blocked": 1}, 0),     # projection: no ReLU
        "b": ("ConvRelu", {"x_blocked": 1, "other_blocked": 1, "y_blocked": 1}, 1),
        "r__chain": ("ConvRelu", {"x_blocked": 1, "y_blocked": 1}, 1),     # took over its Relu
        "d": ("ConvRelu", {"x_blocked": 1}, 1),
    }
    assert [n.name for n in out.graph.node] == ["a", "s__chain", "b", "r__chain", "d", "pool", "h"]
    assert [n.op_type for n in model.graph.node].count("Conv") == 3  # the input model is untouched
    _close_outputs(model, out, {"X": X})
    again, report2 = apply_chains(out)  # idempotent
    assert again == out and report2["converted"] == [] and report2["blocked"] == report["blocked"]


def test_apply_chains_puts_back_a_conv_that_would_block_nothing():
    # t and s_out are graph outputs: a converted s would take no blocked tensor, so it stays onnxruntime's.
    model = _block(shortcut_out=True)
    out, report = apply_chains(model)
    onnx.checker.check_model(out, full_check=True)
    assert report["converted"] == ["r"]
    assert report["kept"] == {"s": "s: would pass no blocked tensor"}
    assert [n.name for n in out.graph.node if n.op_type == "Conv"] == ["s", "h"]
    assert report["blocked"] == ["u", "v"]
    assert report["edges"]["t"] == "'t' is a graph output"
    _close_outputs(model, out, {"X": X})


def test_apply_chains_refuses_convs_the_rule_cannot_block():
    model = _block(head=False)
    # r with 24 filters: no blocked tensor possible (K % 16 != 0)
    inits = {t.name: t for t in model.graph.initializer}
    wr = numpy_helper.to_array(inits["Wr"])[:24]
    inits["Wr"].CopyFrom(numpy_helper.from_array(wr, "Wr"))
    wd = numpy_helper.to_array(inits["Wd"])[:, :24]
    inits["Wd"].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(wd), "Wd"))
    out, report = apply_chains(model)
    assert report["converted"] == ["s"]
    assert report["kept"] == {"r": "r: weights (24, 32, 3, 3), group 1 take no blocked tensor"}
    assert [n.name for n in out.graph.node] == ["a", "s__chain", "b", "r", "r_relu", "d"]
    _close_outputs(model, out, {"X": X})


def test_apply_chains_on_a_model_without_our_ops_changes_nothing():
    model = _block()
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    # no onnxzero node: replace them by onnxruntime Conv+Relu is not needed; drop all but the head
    del plain.graph.node[:]
    plain.graph.node.extend([helper.make_node("Conv", ["X", "Wa"], ["c"], name="c", pads=[1, 1, 1, 1]),
                             helper.make_node("Relu", ["c"], ["Y"], name="cr")])
    del plain.graph.output[1:]
    out, report = apply_chains(plain)
    assert out == plain
    assert report == {"converted": [], "kept": {}, "blocked": [], "edges": {}}


def test_conv_relu_sites_every_site_dense():
    from onnxzero.passes.chain_layout import conv_relu_sites

    model = onnx.load(zoo.path("resnet-mnist"))
    dense = conv_relu_sites(model)
    onnx.checker.check_model(dense, full_check=True)
    ops = [n.op_type for n in dense.graph.node]
    # 7 sites (3 residual: their Add and Relu taken over); the two projections stay Convs
    assert ops.count("ConvRelu") == 7 and ops.count("Conv") == 2 and "Relu" not in ops and "Add" not in ops
    x = np.load(zoo.path("mnist"))["inputs"][:16]
    name = model.graph.input[0].name
    _close_outputs(model, dense, {name: x})


def test_apply_chains_resnet_mnist_lazy(resnet_lazy):
    model, x = resnet_lazy
    out, report = apply_chains(model)
    onnx.checker.check_model(out, full_check=True)
    # the two projection shortcuts become ConvRelu relu=0; every stage output but the last (read by
    # the pool) is blocked now: 8 tensors (was 4 with block_chains alone)
    assert report["converted"] == ["/stages/stages.1/shortcut/shortcut.0/Conv", "/stages/stages.2/shortcut/shortcut.0/Conv"]
    assert len(report["blocked"]) == 8
    assert list(report["edges"]) == ["/stages/stages.2/relu_1/Relu_output_0"]
    name = model.graph.input[0].name
    ratios = {i.name: np.array(0.5, np.float32) for i in model.graph.input if i.name.endswith("__ratio")}
    _close_outputs(model, out, {name: x[:32], **ratios})
