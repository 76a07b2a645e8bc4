"""normalize: any exported CNN in, one shape out, same outputs.

Outputs are compared in onnxruntime (graph optimizations off, so its own fusions do not
hide ours) within 1e-4 relative: |got - want| <= 1e-4 * (|want| + max|want|).
"""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxzero.errors import UserError
from onnxzero.load import load_model
from onnxzero.passes.normalize import NormalizeReport, normalize, normalize_with_report


def assert_close(got, want, what=""):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))), err_msg=what)


def check(model: onnx.ModelProto) -> None:
    """onnx.checker with full_check, on the graph with its large weights turned into inputs.

    Serializing VGG19's 0.5 GB for the checker takes seconds on a small machine; the
    tensors' payloads are checked anyway when onnxruntime reads them in ort_run.
    """
    m = ir.serde.deserialize_model(model)
    for name, v in list(m.graph.initializers.items()):
        if v.const_value is not None and v.const_value.nbytes > (1 << 20):
            v.shape, v.dtype = v.const_value.shape, v.const_value.dtype
            m.graph.initializers.pop(name)
            if v not in m.graph.inputs:
                m.graph.inputs.append(v)
    onnx.checker.check_model(ir.serde.serialize_model(m), full_check=True)


def ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def expose_softmax_inputs(model: onnx.ModelProto) -> None:
    """Add each Softmax's input (the logits) as a graph output: a saturated softmax is one-hot
    in both models and would hide any difference."""
    for node in model.graph.node:
        if node.op_type == "Softmax":
            model.graph.output.append(helper.make_empty_tensor_value_info(node.input[0]))


def text_model(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """An ONNX-text model plus initializers (the text syntax needs every value spelled out)."""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def rand(*shape, seed=0, lo=None):
    rng = np.random.default_rng(seed)
    if lo is not None:
        return rng.uniform(lo, lo + 1.0, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


# --- (a) the onnx wheel's light models, He-normal weights ----------------------------------


def test_light_model_keeps_outputs_and_folds(light_name, light_model, ort_run, random_feeds):
    original = light_model(light_name)
    expose_softmax_inputs(original)
    normalized, report = normalize_with_report(original)

    assert report.modified and report.opset_from == 9 and report.opset_to == 17
    assert normalized.opset_import[0].version == 17 and normalized.ir_version >= 8
    check(normalized)
    feeds = random_feeds(original)
    assert [i.name for i in normalized.graph.input] == list(feeds)  # initializer-inputs of IR 3 dropped
    assert [o.name for o in normalized.graph.output] == [o.name for o in original.graph.output]
    made = producers(normalized)
    assert not any(n.op_type == "BatchNormalization" and made.get(n.input[0], n).op_type == "Conv"
                   for n in normalized.graph.node), "a BatchNormalization after a Conv was not folded"
    for got, want, out in zip(ort_run(normalized, feeds), ort_run(original, feeds), original.graph.output):
        assert_close(got, want, out.name)


def test_light_model_bn_and_affine_counts(light_model):
    # densenet121: Conv -> BN -> Mul -> Add -> Relu 59 times (the other 62 BNs follow a
    # Concat or MaxPool); resnet50 and shufflenet: every Conv has its BN.
    _, dense = normalize_with_report(light_model("densenet121"))
    assert dense.folded_into_conv == {"BatchNormalization": 59, "Mul": 59, "Add": 59}
    _, shuffle = normalize_with_report(light_model("shufflenet"))
    assert shuffle.folded_into_conv == {"BatchNormalization": 49}


def test_constant_of_shape_weights_folded_to_initializers(ort_run, random_feeds):
    # The light models as shipped compute every weight with ConstantOfShape (and densenet's
    # BN scales also through Unsqueeze).
    original = onnx.load(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_densenet121.onnx"))
    normalized, report = normalize_with_report(original)
    assert report.constants_folded
    assert ops(original)["ConstantOfShape"] == 836 and ops(normalized)["ConstantOfShape"] == 0
    assert ops(normalized)["Unsqueeze"] == 0 and ops(normalized)["Constant"] == 0
    inits = {t.name for t in normalized.graph.initializer}
    convs = [n for n in normalized.graph.node if n.op_type == "Conv"]
    assert all(n.input[1] in inits for n in convs)
    feeds = random_feeds(original)
    assert_close(ort_run(normalized, feeds)[0], ort_run(original, feeds)[0])


# --- (b) torch exports --------------------------------------------------------------------

TINY_OPS = {"Conv": 8, "Relu": 6, "Clip": 1, "Add": 1, "MaxPool": 1, "Concat": 1}


def test_torch_export_normalizes_to_the_same_graph(torch_export_name, torch_exports, ort_run, torch_reference):
    original = torch_exports[torch_export_name]
    normalized, report = normalize_with_report(original)
    check(normalized)
    # Every exporter's graph ends up as the same 14 nodes: BN, the per-channel Mul/Add,
    # the Pad and the bound/bias subgraphs are gone.
    assert ops(normalized) == TINY_OPS
    assert report.opset_to == max(17, report.opset_from)
    if torch_export_name in ("torchscript_nofold", "dynamo_noopt"):
        assert report.folded_into_conv == {"BatchNormalization": 2, "Mul": 1, "Add": 1, "Pad": 1}
    # Asymmetric ZeroPad2d((1, 2, 0, 1)) lands in the Conv's pads as (top 0, left 1, bottom 1, right 2).
    c3 = [n for n in normalized.graph.node if n.op_type == "Conv"][2]
    assert list(helper.get_attribute_value(next(a for a in c3.attribute if a.name == "pads"))) == [0, 1, 1, 2]
    # Names and the dynamic batch dimension are kept; shapes are inferred.
    assert [i.name for i in normalized.graph.input] == ["x"] and [o.name for o in normalized.graph.output] == ["y"]
    assert normalized.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert len(normalized.graph.value_info) >= len(normalized.graph.node) - 1
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        want = torch_reference(x)
        assert_close(ort_run(normalized, {"x": x})[0], want, f"batch {batch}")
        assert_close(ort_run(original, {"x": x})[0], want, f"export itself, batch {batch}")


def test_normalize_is_idempotent_and_leaves_its_input_alone(torch_exports):
    original = torch_exports["torchscript_nofold"]
    before = original.SerializeToString()
    once, modified = normalize(original)
    assert modified and original.SerializeToString() == before
    twice, modified_again = normalize(once)
    assert not modified_again
    assert [n.name for n in twice.graph.node] == [n.name for n in once.graph.node]


def test_dynamo_external_data_loads_from_beside_the_model(torch_export_paths, tmp_path, monkeypatch, torch_reference):
    path = torch_export_paths["dynamo_noopt"]
    assert (path.parent / "model.onnx.data").is_file()
    assert any(t.data_location == TensorProto.EXTERNAL for t in onnx.load(path, load_external_data=False).graph.initializer)
    monkeypatch.chdir(tmp_path)  # the data is found beside the model, not in the working directory
    normalized, _ = normalize(load_model(path))
    assert not any(t.data_location == TensorProto.EXTERNAL for t in normalized.graph.initializer)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    from onnxzero.ops import make_session
    assert_close(make_session(normalized, library=False).run(None, {"x": x})[0], torch_reference(x))


def test_unloaded_external_data_is_refused_or_loaded_from_base_dir(torch_export_paths):
    path = torch_export_paths["dynamo_noopt"]
    bare = onnx.load(path, load_external_data=False)
    with pytest.raises(UserError, match=r"^normalize: initializer '.*' keeps its data in an external file .*load_model"):
        normalize(bare)
    normalized, report = normalize_with_report(bare, base_dir=path.parent)
    assert report.external_data_loaded and ops(normalized) == TINY_OPS


# --- folding rules: when they fire and when they must not ----------------------------------

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def run_both(model, feeds, ort_run):
    normalized, report = normalize_with_report(model)
    for got, want in zip(ort_run(normalized, feeds), ort_run(model, feeds)):
        assert_close(got, want)
    return normalized, report


PAD_CASES = {
    # name: (Pad inputs and attrs, extra consumer of the Pad output?, Conv attrs, folds?)
    "zero-hw-asymmetric": ("(x, pads)", False, "pads = [1, 1, 1, 1]", True),
    "zero-value-explicit": ("(x, pads, zero)", False, "", True),
    "other-consumer": ("(x, pads)", True, "", False),
    "nonzero-value": ("(x, pads, one)", False, "", False),
    "reflect": ("<mode = \"reflect\"> (x, pads)", False, "", False),
    "auto-pad-conv": ("(x, pads)", False, "auto_pad = \"SAME_UPPER\"", False),
    "channel-pad": ("(x, cpads)", False, "", False),
}


@pytest.mark.parametrize("case", PAD_CASES)
def test_pad_folds_into_conv_only_when_valid(case, ort_run):
    pad_call, shared, conv_attrs, folds = PAD_CASES[case]
    w_in = 4 if case == "channel-pad" else 3
    extra = "e = Relu(p)" if shared else ""
    outs = "float[N, 8, ?, ?] y" + (", float[N, 3, ?, ?] e" if shared else "")
    model = text_model(HEAD + f"""g (float[N, 3, 10, 10] x) => ({outs}) {{
        p = Pad {pad_call}
        c = Conv <{conv_attrs}> (p, w)
        y = Relu(c)
        {extra}
    }}""".replace("<>", ""), w=rand(8, w_in, 3, 3), pads=np.array([0, 0, 0, 1, 0, 0, 2, 1]),
        cpads=np.array([0, 0, 0, 1, 0, 1, 2, 1]), zero=np.float32(0), one=np.float32(1))
    normalized, report = run_both(model, {"x": rand(2, 3, 10, 10)}, ort_run)
    assert (ops(normalized)["Pad"] == 0) == folds, report
    if case == "zero-hw-asymmetric":
        conv = next(n for n in normalized.graph.node if n.op_type == "Conv")
        assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [1, 2, 3, 2]


AFFINE_CASES = {
    # name: (node after the Conv, constant, folds?)
    "bn": ("z = BatchNormalization <epsilon = 0.001> (c, s, t, mu, var)", None, True),
    "mul-per-channel": ("z = Mul(c, k)", rand(8, 1, 1, lo=0.5), True),
    "mul-per-channel-4d-commuted": ("z = Mul(k, c)", rand(1, 8, 1, 1, lo=0.5), True),
    "add-scalar": ("z = Add(c, k)", np.float32(0.3), True),
    "add-per-channel": ("z = Add(c, k)", rand(8, 1, 1), True),
    "mul-spatial": ("z = Mul(c, k)", rand(1, 1, 8, 8), False),
    "mul-per-channel-wrong-axis": ("z = Mul(c, k)", rand(8, 1), False),
    "mul-dynamic": ("z = Mul(c, x2)", None, False),
}


@pytest.mark.parametrize("case", AFFINE_CASES)
def test_bn_and_channel_affine_fold_into_conv(case, ort_run):
    after, const, folds = AFFINE_CASES[case]
    weights = dict(w=rand(8, 3, 3, 3), b=rand(8, seed=1), s=rand(8, lo=0.5), t=rand(8, seed=2), mu=rand(8, seed=3),
                   var=rand(8, lo=0.5, seed=4))
    if const is not None:
        weights["k"] = const
    model = text_model(HEAD + f"""g (float[N, 3, 10, 10] x, float[N, 8, 8, 8] x2) => (float[N, 8, 8, 8] y) {{
        c = Conv (x, w, b)
        {after}
        y = Relu(z)
    }}""", **weights)
    normalized, report = run_both(model, {"x": rand(2, 3, 10, 10), "x2": rand(2, 8, 8, 8)}, ort_run)
    assert (ops(normalized)["Conv"], sum(report.folded_into_conv.values())) == (1, 1 if folds else 0)
    assert len(normalized.graph.node) == (2 if folds else 3)
    assert normalized.graph.node[0].name == "Conv"  # unnamed nodes get their op type; the fold keeps it


def test_bn_not_folded_when_the_conv_output_has_another_consumer(ort_run):
    model = text_model(HEAD + """g (float[N, 3, 10, 10] x) => (float[N, 8, 8, 8] y, float[N, 8, 8, 8] e) {
        c = Conv (x, w)
        z = BatchNormalization (c, s, t, mu, var)
        y = Relu(z)
        e = Sigmoid(c)
    }""", w=rand(8, 3, 3, 3), s=rand(8, lo=0.5), t=rand(8), mu=rand(8), var=rand(8, lo=0.5))
    normalized, report = run_both(model, {"x": rand(2, 3, 10, 10)}, ort_run)
    assert ops(normalized)["BatchNormalization"] == 1 and not report.folded_into_conv


def test_shared_weights_are_not_folded_into(ort_run):
    # Both Convs read w: scaling it for one would change the other.
    model = text_model(HEAD + """g (float[N, 3, 10, 10] x) => (float[N, 8, 8, 8] y, float[N, 8, 8, 8] v) {
        c = Conv (x, w)
        z = Mul(c, k)
        y = Relu(z)
        v = Conv (x, w)
    }""", w=rand(8, 3, 3, 3), k=rand(8, 1, 1, lo=0.5))
    normalized, report = run_both(model, {"x": rand(2, 3, 10, 10)}, ort_run)
    assert ops(normalized)["Mul"] == 1 and not report.folded_into_conv


def test_auto_pad_same_upper_model(ort_run):
    # auto_pad is kept (the site finder resolves it); the Pad in front does not fold into it.
    w = rand(4, 3, 3, 3)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
             helper.make_node("Conv", ["p", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 0, 0]), "pads")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    normalized, report = run_both(model, {"x": rand(1, 3, 9, 9)}, ort_run)
    assert ops(normalized)["Pad"] == 1 and report.opset_from == 13 and report.opset_to == 17
    conv = next(n for n in normalized.graph.node if n.op_type == "Conv")
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "auto_pad")) == b"SAME_UPPER"


# --- (c) opsets ---------------------------------------------------------------------------


def opset7_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "s", "t", "mu", "var"], ["n1"], epsilon=1e-3),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], name="conv2"),
             helper.make_node("Clip", ["c2"], ["r2"], min=0.0, max=6.0),  # attribute bounds until opset 11
             helper.make_node("Upsample", ["r2"], ["u"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest"),
             helper.make_node("Conv", ["u", "w3"], ["y"], name="head")]
    inits = dict(w1=rand(8, 3, 3, 3), b1=rand(8), s=rand(8, lo=0.5), t=rand(8), mu=rand(8), var=rand(8, lo=0.5),
                 w2=rand(8, 8, 3, 3), w3=rand(4, 8, 1, 1))
    # IR 3, as old converters wrote it: every initializer is listed as a graph input too.
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])]
    inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "old", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)


def test_opset7_model_is_converted(ort_run):
    model = opset7_model()
    onnx.checker.check_model(model)
    normalized, report = run_both(model, {"x": rand(1, 3, 12, 12)}, ort_run)
    assert (report.opset_from, report.opset_to) == (7, 17) and normalized.opset_import[0].version == 17
    assert [i.name for i in normalized.graph.input] == ["x"] and report.initializer_inputs_removed == 8
    assert ops(normalized) == {"Conv": 3, "Relu": 1, "Clip": 1, "Resize": 1}
    clip = next(n for n in normalized.graph.node if n.op_type == "Clip")
    assert len(clip.input) == 3 and not clip.attribute  # bounds moved to inputs


def test_opset_below_7_is_refused():
    model = opset7_model()
    model.opset_import[0].version = 6
    with pytest.raises(UserError, match=r"^normalize: the model uses ONNX opset 6; expected opset >= 7"):
        normalize(model)


def test_newer_opset_is_kept(torch_exports):
    assert torch_exports["dynamo"].opset_import[0].version > 17
    normalized, report = normalize_with_report(torch_exports["dynamo"])
    assert report.opset_to == report.opset_from == normalized.opset_import[0].version


def test_report_type():
    report = NormalizeReport(opset_from=17, opset_to=17)
    assert not report.modified
    assert NormalizeReport(opset_from=9, opset_to=17).modified
