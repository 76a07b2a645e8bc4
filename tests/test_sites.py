"""find_sites / explain: which Convs become sites, their records, and why the others do not."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnxzero.errors import UserError
from onnxzero.passes.normalize import normalize
from onnxzero.passes.sites import ConvVerdict, NotSite, Site, explain, find_sites

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def text_model(text: str, **weights) -> onnx.ModelProto:
    """An ONNX-text model; keyword arguments are initializers given by shape (random) or value."""
    model = onnx.parser.parse_model(HEAD + text)
    rng = np.random.default_rng(0)
    for name, v in weights.items():
        arr = rng.standard_normal(v).astype(np.float32) if isinstance(v, tuple) else np.asarray(v)
        model.graph.initializer.append(numpy_helper.from_array(arr, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def only(verdicts: list[ConvVerdict]) -> ConvVerdict:
    assert len(verdicts) == 1, verdicts
    return verdicts[0]


# --- sites and their records ----------------------------------------------------------------

SMALL_NET = """g (float[N, 3, 32, 32] x) => (float[N, 10] y) {
    c1 = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu(c1)
    c2 = Conv <group = 16, pads = [1, 1, 1, 1]> (r1, w2)
    r2 = Clip(c2, zero, six)
    c3 = Conv <dilations = [2, 2], pads = [2, 2, 2, 2]> (r2, w3, b3)
    r3 = Clip(c3, zero)
    p = GlobalAveragePool(r3)
    f = Flatten(p)
    y = Gemm <transB = 1> (f, fw)
}"""
SMALL_WEIGHTS = dict(w1=(16, 3, 3, 3), b1=(16,), w2=(16, 1, 3, 3), w3=(32, 16, 3, 3), b3=(32,), fw=(10, 32),
                     zero=np.float32(0), six=np.float32(6))


def test_small_net_sites_shapes_attributes_and_macs():
    sites = find_sites(text_model(SMALL_NET, **SMALL_WEIGHTS))
    assert [s.name for s in sites] == ["Conv", "Conv_1", "Conv_2"]  # unnamed nodes named as normalize names them
    s1, s2, s3 = sites
    assert s1 == Site(name="Conv", conv="Conv", activation="Relu", activation_op="Relu", clip_max=None,
                      x="x", w="w1", b="b1", conv_output="c1", y="r1", x_shape=(3, 32, 32), w_shape=(16, 3, 3, 3),
                      y_shape=(16, 16, 16), strides=(2, 2), pads=(1, 1, 1, 1), auto_pad="NOTSET", dilations=(1, 1),
                      group=1, macs=16 * 16 * 3 * 3 * 3 * 16, input_nonneg=False,
                      nonneg_reason="graph input 'x', not declared non-negative")
    # depthwise: C/group = 1; ReLU6 keeps its upper bound
    assert (s2.group, s2.macs, s2.activation_op, s2.clip_max, s2.b) == (16, 16 * 16 * 9 * 1 * 16, "Clip", 6.0, None)
    assert s2.input_nonneg and s2.nonneg_reason == "Relu 'Relu'"
    # dilation 2 with pads 2 keeps 16x16; Clip with a min only: clip_max None
    assert (s3.y_shape, s3.dilations, s3.macs, s3.clip_max) == ((32, 16, 16), (2, 2), 16 * 16 * 9 * 16 * 32, None)
    assert s3.input_nonneg and s3.nonneg_reason == "Clip 'Clip' (min 0)"
    assert s3.kernel_shape == (3, 3)


def test_auto_pad_is_resolved_and_asymmetric_pads_kept():
    model = text_model("""g (float[1, 4, 9, 9] x) => (float[1, 8, 5, 5] y, float[1, 8, ?, ?] z) {
        c = Conv <auto_pad = "SAME_UPPER", strides = [2, 2]> (x, w)
        y = Relu(c)
        d = Conv <pads = [0, 1, 1, 2]> (x, w)
        z = Relu(d)
    }""", w=(8, 4, 3, 3))
    same, asym = find_sites(model)
    # out 5 = ceil(9 / 2); total pad (5 - 1) * 2 + 3 - 9 = 2: SAME_UPPER puts 1 before, 1 after
    assert (same.pads, same.auto_pad, same.y_shape, same.macs) == ((1, 1, 1, 1), "SAME_UPPER", (8, 5, 5), 25 * 9 * 4 * 8)
    assert (asym.pads, asym.y_shape, asym.macs) == ((0, 1, 1, 2), (8, 8, 10), 80 * 9 * 4 * 8)


def test_symbolic_spatial_size_leaves_macs_unknown():
    model = text_model("""g (float[N, 4, H, W] x) => (float[N, 8, H, W] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = Relu(c)
    }""", w=(8, 4, 3, 3))
    (site,) = find_sites(model)
    assert site.x_shape == (4, "H", "W") and site.macs is None and site.pads == (1, 1, 1, 1)
    assert "MACs unknown" in explain(model)[0].line()


def test_weights_from_a_constant_node_count_as_constant():
    model = onnx.parser.parse_model(HEAD + """g (float[1, 2, 4, 4] x) => (float[1, 1, 4, 4] y) {
        w = Constant <value = float[1, 2, 1, 1] {0.5, -1.0}> ()
        c = Conv (x, w)
        y = Relu(c)
    }""")
    (site,) = find_sites(model)
    assert site.w == "w" and site.macs == 16 * 2


# --- Convs that must not become sites, each with its reason --------------------------------

NOT_SITES = {
    "dynamic weights": ("""g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] w) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        y = Relu(c)
    }""", {}, NotSite.DYNAMIC_WEIGHTS, "dynamic weights: 'w' is a graph input, not a constant"),
    "dynamic bias": ("""g (float[1, 3, 8, 8] x, float[4] b) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w, b)
        y = Relu(c)
    }""", dict(w=(4, 3, 3, 3)), NotSite.DYNAMIC_WEIGHTS, "dynamic bias: 'b' is a graph input, not a constant"),
    "3-D conv": ("""g (float[1, 3, 8, 8, 8] x) => (float[1, 4, 6, 6, 6] y) {
        c = Conv (x, w)
        y = Relu(c)
    }""", dict(w=(4, 3, 3, 3, 3)), NotSite.NOT_2D, "a 3-D convolution (weight rank 5); the kernels are 2-D"),
    "1-D conv": ("""g (float[1, 3, 8] x) => (float[1, 4, 6] y) {
        c = Conv (x, w)
        y = Relu(c)
    }""", dict(w=(4, 3, 3)), NotSite.NOT_2D, "a 1-D convolution (weight rank 3); the kernels are 2-D"),
    "float16": ("""g (float16[1, 3, 8, 8] x) => (float16[1, 4, 6, 6] y) {
        c = Conv (x, w)
        y = Relu(c)
    }""", dict(w=np.zeros((4, 3, 3, 3), np.float16)), NotSite.NOT_FLOAT, "input type is FLOAT16; the kernels take float32"),
    "no ReLU": ("""g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        y = Sigmoid(c)
    }""", dict(w=(4, 3, 3, 3)), NotSite.NO_RELU, "no ReLU after it (its output goes to Sigmoid 'Sigmoid')"),
    "LeakyRelu": ("""g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        y = LeakyRelu(c)
    }""", dict(w=(4, 3, 3, 3)), NotSite.NO_RELU, "no ReLU after it (its output goes to LeakyRelu 'LeakyRelu')"),
    "ReLU and another node": ("""g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y, float[1, 4, 6, 6] z) {
        c = Conv (x, w)
        y = Relu(c)
        z = Sigmoid(c)
    }""", dict(w=(4, 3, 3, 3)), NotSite.SHARED_OUTPUT,
        "its output is used by other nodes as well (Relu 'Relu', Sigmoid 'Sigmoid'), which need the values the ReLU drops"),
    "Clip min -1": ("""g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        y = Clip(c, lo, hi)
    }""", dict(w=(4, 3, 3, 3), lo=np.float32(-1), hi=np.float32(1)), NotSite.CLIP_MIN,
        "Clip 'Clip' after it has min -1, not 0"),
    "Clip without min": ("""g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        y = Clip(c, , hi)
    }""", dict(w=(4, 3, 3, 3), hi=np.float32(6)), NotSite.CLIP_MIN, "Clip 'Clip' after it has no lower bound, so it is no ReLU"),
    "Clip dynamic max": ("""g (float[1, 3, 8, 8] x, float hi) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        y = Clip(c, lo, hi)
    }""", dict(w=(4, 3, 3, 3), lo=np.float32(0)), NotSite.CLIP_MAX,
        "Clip 'Clip' after it has a non-constant max ('hi' is a graph input)"),
    "graph output": ("""g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y, float[1, 4, 6, 6] c) {
        c = Conv (x, w)
        y = Relu(c)
    }""", dict(w=(4, 3, 3, 3)), NotSite.GRAPH_OUTPUT, "its output 'c' is a graph output, which the ReLU would change"),
    "unused output": ("""g (float[1, 3, 8, 8] x) => (float[1, 3, 8, 8] y) {
        c = Conv (x, w)
        y = Relu(x)
    }""", dict(w=(4, 3, 3, 3)), NotSite.NO_RELU, "no ReLU after it (its output is unused)"),
    # residual Adds that do not make a site
    "broadcast Add": ("""g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        s = Add(c, t)
        y = Relu(s)
    }""", dict(w=(4, 3, 3, 3), t=(1, 4, 1, 1)), NotSite.ADD_SHAPE,
        "its residual Add 'Add' adds 't' of shape (1, 4, 1, 1), expected the conv output's (1, 4, 6, 6)"),
    "Add of itself": ("""g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        s = Add(c, c)
        y = Relu(s)
    }""", dict(w=(4, 3, 3, 3)), NotSite.NO_RELU, "no ReLU after it (its output goes to Add 'Add', Add 'Add')"),
    "Sum of three": ("""g (float[1, 3, 8, 8] x, float[1, 4, 6, 6] t) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        s = Sum(c, t, t)
        y = Relu(s)
    }""", dict(w=(4, 3, 3, 3)), NotSite.NO_RELU,
        "no ReLU after it (its output goes to Sum 'Sum', which does not add exactly one other tensor to it)"),
    "Add then Sigmoid": ("""g (float[1, 3, 8, 8] x, float[1, 4, 6, 6] t) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        s = Add(t, c)
        y = Sigmoid(s)
    }""", dict(w=(4, 3, 3, 3)), NotSite.NO_RELU, "no ReLU after it (its residual Add 'Add' goes to Sigmoid 'Sigmoid')"),
    "Add read twice": ("""g (float[1, 3, 8, 8] x, float[1, 4, 6, 6] t) => (float[1, 4, 6, 6] y, float[1, 4, 6, 6] z) {
        c = Conv (x, w)
        s = Add(c, t)
        y = Relu(s)
        z = Sigmoid(s)
    }""", dict(w=(4, 3, 3, 3)), NotSite.SHARED_OUTPUT,
        "its residual Add 'Add' output goes to Relu 'Relu', Sigmoid 'Sigmoid', expected a single ReLU"),
    "Add is a graph output": ("""g (float[1, 3, 8, 8] x, float[1, 4, 6, 6] t) => (float[1, 4, 6, 6] y, float[1, 4, 6, 6] s) {
        c = Conv (x, w)
        s = Add(c, t)
        y = Relu(s)
    }""", dict(w=(4, 3, 3, 3)), NotSite.GRAPH_OUTPUT,
        "the output 's' of its residual Add 'Add' is a graph output, which the ReLU would change"),
}


@pytest.mark.parametrize("case", NOT_SITES)
def test_conv_that_is_not_a_site_says_why(case):
    text, weights, code, reason = NOT_SITES[case]
    model = text_model(text, **weights)
    verdict = only(explain(model))
    assert (verdict.site, verdict.code, verdict.reason) == (None, code, reason)
    assert verdict.line() == f"Conv: not a site: {reason}"
    assert find_sites(model) == []


def test_initializer_listed_as_input_is_dynamic_from_ir4_on():
    # From IR 4 an initializer that is also a graph input may be fed at run time; in IR 3
    # every initializer had to be listed, so there it is a plain constant.
    text = """g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] w) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        y = Relu(c)
    }"""
    model = text_model(text, w=(4, 3, 3, 3))
    assert only(explain(model)).code == NotSite.DYNAMIC_WEIGHTS
    model.ir_version = 3
    assert only(explain(model)).is_site


# --- provably non-negative inputs -----------------------------------------------------------

NONNEG = {
    "ReLU -> MaxPool -> Concat": ("""
        a = Relu(x)
        m = MaxPool <kernel_shape = [2, 2], strides = [1, 1], pads = [0, 0, 1, 1]> (a)
        sg = Sigmoid(x)
        cat = Concat <axis = 1> (m, sg)
        u = Slice(cat, st, en, ax)""", True, "Slice 'Slice' <- Concat 'Concat' of non-negative inputs"),
    "ReLU -> zero Pad -> Reshape": ("""
        a = Relu(x)
        p = Pad(a, pads)
        q = Reshape(p, shp)
        u = Slice(q, st, en, ax)""", True, "Slice 'Slice' <- Reshape 'Reshape' <- Pad 'Pad' <- Relu 'Relu'"),
    "Mul and Add of non-negatives, Max with one": ("""
        a = Relu(x)
        b = Mul(a, half)
        ad = Add(b, a)
        u = Max(x, ad)""", True, "Max 'Max' <- Add 'Add' of non-negative inputs"),
    "BatchNormalization": ("""
        a = Relu(x)
        u = BatchNormalization(a, s, t, mu, var)""", False, "BatchNormalization 'BatchNormalization'"),
    "raw graph input": ("""
        u = Identity(x)""", False, "Identity 'Identity' <- graph input 'x', not declared non-negative"),
    "Sub": ("""
        a = Relu(x)
        u = Sub(a, half)""", False, "Sub 'Sub'"),
    "Add with a negative constant": ("""
        a = Relu(x)
        u = Add(a, minus)""", False, "Add 'Add' <- constant 'minus' has negative values"),
    "Pad with a negative value": ("""
        a = Relu(x)
        q = Pad(a, pads, minus)
        u = Slice(q, st, en, ax)""", False, "Slice 'Slice' <- Pad 'Pad' pads with -1.0"),
    "Conv without ReLU": ("""
        v = Conv <pads = [1, 1, 1, 1]> (x, wv)
        u = MaxPool <kernel_shape = [1, 1]> (v)""", False, "MaxPool 'MaxPool' <- Conv 'Conv' (no ReLU after it)"),
}
NONNEG_WEIGHTS = dict(st=np.array([0]), en=np.array([2]), ax=np.array([1]), pads=np.array([0, 0, 1, 1, 0, 0, 1, 1]),
                      shp=np.array([0, 2, 10, 10]), half=np.float32(0.5), minus=np.float32(-1), s=(2,), t=(2,),
                      mu=(2,), var=np.ones(2, np.float32), wv=(2, 2, 3, 3))


@pytest.mark.parametrize("case", NONNEG)
def test_input_nonneg(case):
    body, nonneg, reason = NONNEG[case]
    model = text_model(f"""g (float[1, 2, 8, 8] x) => (float[1, 4, ?, ?] y) {{
        {body}
        c = Conv (u, w)
        y = Relu(c)
    }}""", w=(4, 2, 1, 1), **{k: v for k, v in NONNEG_WEIGHTS.items() if re.search(rf"\b{k}\b", body)})
    site = find_sites(model)[-1]
    assert (site.input_nonneg, site.nonneg_reason) == (nonneg, reason)


def test_declared_nonneg_graph_input():
    model = text_model("""g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c = Conv (x, w)
        y = Relu(c)
    }""", w=(4, 3, 1, 1))
    (site,) = find_sites(model, nonneg_inputs=["x"])
    assert site.input_nonneg and site.nonneg_reason == "graph input 'x' declared non-negative"
    with pytest.raises(UserError, match=r"^find_sites: nonneg_inputs names 'image', which is not a graph input \(inputs: x\)"):
        find_sites(model, nonneg_inputs=["image"])


# --- residual sites: Conv -> Add(other) -> ReLU ---------------------------------------------

RESIDUAL_NET = """g (float[N, 8, 16, 16] x) => (float[N, 16, 8, 8] y) {
    r0 = Relu(x)
    c1 = Conv <pads = [1, 1, 1, 1]> (r0, w1, b1)
    r1 = Relu(c1)
    c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
    s2 = Add(r0, c2)
    r2 = Relu(s2)
    c3 = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (r2, w3)
    r3 = Relu(c3)
    c4 = Conv <pads = [1, 1, 1, 1]> (r3, w4)
    p = Conv <strides = [2, 2]> (r2, wp)
    s4 = Add(c4, p)
    y = Clip(s4, zero, six)
}"""
RESIDUAL_WEIGHTS = dict(w1=(8, 8, 3, 3), b1=(8,), w2=(8, 8, 3, 3), b2=(8,), w3=(16, 8, 3, 3), w4=(16, 16, 3, 3),
                        wp=(16, 8, 1, 1), zero=np.float32(0), six=np.float32(6))


def test_residual_sites_take_either_operand_order_and_the_main_path_of_a_projection_add():
    verdicts = explain(text_model(RESIDUAL_NET, **RESIDUAL_WEIGHTS))
    assert [v.conv for v in verdicts] == ["Conv", "Conv_1", "Conv_2", "Conv_3", "Conv_4"]
    c1, c2, c3, c4, proj = verdicts
    assert (c1.site.residual, c1.site.add, c3.site.residual) == (None, None, None)
    # identity shortcut as the Add's first operand
    assert (c2.site.residual, c2.site.add, c2.site.activation, c2.site.y) == ("r0", "Add", "Relu_2", "r2")
    # projection shortcut computed after the main path; the 3x3 main path (9x the MACs) is the site
    assert (c4.site.residual, c4.site.add, c4.site.activation_op, c4.site.clip_max) == ("p", "Add_1", "Clip", 6.0)
    assert c4.site.macs == 8 * 8 * 9 * 16 * 16 and c4.site.conv_output == "c4"
    assert (proj.site, proj.code) == (None, NotSite.ADD_PARTNER)
    assert proj.reason == ("its residual add 'Add_1' already has a site: Conv 'Conv_3' (more MACs); "
                           "this Conv's output is that site's other input")
    assert c2.line().startswith("Conv_1: residual site -> add 'Add' (+ 'r0') -> Relu 'Relu_2'; x 8x16x16 -> y 8x16x16")
    # the sum of two non-negative tensors is non-negative: the next conv's input proof goes through it
    assert c3.site.input_nonneg and c3.site.nonneg_reason.startswith("Relu 'Relu_2'")


def test_residual_site_through_sum_of_two():
    model = text_model("""g (float[1, 4, 6, 6] t, float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w)
        s = Sum(c, t)
        y = Relu(s)
    }""", w=(4, 3, 3, 3))
    (site,) = find_sites(model)
    assert (site.residual, site.add, site.y) == ("t", "Sum", "y")


# --- torch exports --------------------------------------------------------------------------

# TinyCNN on 3x32x32: (activation, clip_max, group, x_shape, y_shape, pads, MACs, input non-negative)
TINY_SITES = [
    ("Relu", None, 1, (3, 32, 32), (8, 16, 16), (1, 1, 1, 1), 16 * 16 * 9 * 3 * 8, False),  # c1: stride 2, BN folded
    ("Relu", None, 1, (8, 16, 16), (16, 16, 16), (2, 2, 2, 2), 16 * 16 * 9 * 8 * 16, True),  # c2: dilation 2
    ("Clip", 6.0, 1, (16, 16, 16), (16, 15, 17), (0, 1, 1, 2), 15 * 17 * 9 * 16 * 16, True),  # c3: ZeroPad2d, ReLU6
    ("Relu", None, 4, (16, 15, 17), (16, 15, 17), (1, 1, 1, 1), 15 * 17 * 9 * 4 * 16, True),  # c4: grouped, BN
    ("Relu", None, 16, (16, 15, 17), (16, 15, 17), (1, 1, 1, 1), 15 * 17 * 9 * 1 * 16, True),  # c5: depthwise, Mul/Add
    ("Relu", None, 1, (16, 15, 17), (8, 15, 17), (0, 0, 0, 0), 15 * 17 * 1 * 16 * 8, True),  # b1: after residual add
    ("Relu", None, 1, (16, 15, 17), (8, 15, 17), (1, 1, 1, 1), 15 * 17 * 9 * 16 * 8, True),  # b2
]


def test_torch_export_sites(torch_export_name, torch_exports):
    normalized, _ = normalize(torch_exports[torch_export_name])
    verdicts = explain(normalized)
    assert len(verdicts) == 8
    got = [(s.activation_op, s.clip_max, s.group, s.x_shape, s.y_shape, s.pads, s.macs, s.input_nonneg)
           for s in (v.site for v in verdicts[:7])]
    assert got == TINY_SITES
    head = verdicts[7]
    assert head.code == NotSite.GRAPH_OUTPUT and head.reason == "its output 'y' is a graph output, which the ReLU would change"
    # b1's input is the residual Add of the ReLU6 output and a ReLU output
    assert verdicts[5].site.nonneg_reason.startswith("Add ") and verdicts[5].site.nonneg_reason.endswith("of non-negative inputs")
    names = [v.conv for v in verdicts]
    assert len(set(names)) == 8 and names == [n.name for n in normalized.graph.node if n.op_type == "Conv"]


def test_unnormalized_torchscript_export_keeps_bn_out_of_sites(torch_exports):
    # Before normalize, Conv -> BatchNormalization -> Relu is no site, and the exporter's
    # ReLU6 bounds are still Cast subgraphs: normalize first.
    verdicts = explain(torch_exports["torchscript_nofold"])
    assert verdicts[0].code == NotSite.NO_RELU and "BatchNormalization" in verdicts[0].reason
    assert verdicts[2].code == NotSite.CLIP_MIN and "non-constant min" in verdicts[2].reason
    assert [v.is_site for v in verdicts] == [False, True, False, False, False, True, True, False]


# --- the light models -----------------------------------------------------------------------

# Sites per light model, counted by hand from the graphs: AlexNet and ZFNet have five
# Conv+ReLU; VGG19 sixteen; SqueezeNet's 26 Convs and Inception v1's 57 / v2's 69 all end
# in a ReLU (v2 through BN+Mul+Add, folded). ResNet50: 53 Convs; 33 end in a ReLU and the 16
# ending a residual branch are residual sites (Sum -> Relu): 49; the 4 projection shortcuts
# feed a Sum whose site is their block's main path. DenseNet121 is pre-activation
# (BN-ReLU-Conv): only the stem and the 58 bottleneck 1x1 Convs are followed by their own
# BN-ReLU; the rest feed a Concat, an AveragePool or the output. ShuffleNet: the stem and the
# first group conv of each of its 16 units, plus the 13 units whose last conv ends in a
# residual Sum -> Relu; the others feed a Concat.
LIGHT_SITES = {"bvlc_alexnet": 5, "zfnet512": 5, "vgg19": 16, "squeezenet": 26, "inception_v1": 57,
               "inception_v2": 69, "resnet50": 49, "densenet121": 59, "shufflenet": 30}
LIGHT_RESIDUAL_SITES = {"resnet50": 16, "shufflenet": 13}
LIGHT_CONVS = {"bvlc_alexnet": 5, "zfnet512": 5, "vgg19": 16, "squeezenet": 26, "inception_v1": 57,
               "inception_v2": 69, "resnet50": 53, "densenet121": 121, "shufflenet": 49}


def test_light_model_sites(light_name, light_model):
    normalized, _ = normalize(light_model(light_name))
    verdicts = explain(normalized)
    sites = [v.site for v in verdicts if v.is_site]
    assert len(verdicts) == LIGHT_CONVS[light_name] and len(sites) == LIGHT_SITES[light_name] >= 1
    assert sum(s.residual is not None for s in sites) == LIGHT_RESIDUAL_SITES.get(light_name, 0)
    assert all(v.code in (NotSite.NO_RELU, NotSite.GRAPH_OUTPUT, NotSite.ADD_PARTNER) for v in verdicts if not v.is_site)
    # every plain site but the first Conv (on the raw image) reads a ReLU-derived tensor; ShuffleNet's
    # residual sites read its depthwise convs' outputs (no ReLU), ResNet50's a ReLU
    plain = [s for s in sites if s.residual is None]
    assert [s.input_nonneg for s in plain] == [False] + [True] * (len(plain) - 1)
    assert all(s.input_nonneg != s.nonneg_reason.startswith("Conv ") for s in sites if s.residual)
    assert all(s.macs > 0 and s.w_shape[0] == s.y_shape[0] for s in sites)


def test_alexnet_sites_by_hand(light_model):
    sites = find_sites(normalize(light_model("bvlc_alexnet"))[0])
    # conv1 11x11/4 on 3x224x224 -> 96x54x54; conv2 5x5 group 2 on the 3/2-pooled 96x26x26;
    # conv3-5 3x3 on 12x12 (conv4, conv5 in two groups)
    assert [s.macs for s in sites] == [54 * 54 * 11 * 11 * 3 * 96, 26 * 26 * 5 * 5 * 48 * 256, 12 * 12 * 9 * 256 * 384,
                                       12 * 12 * 9 * 192 * 384, 12 * 12 * 9 * 192 * 256]
    assert [s.group for s in sites] == [1, 2, 1, 2, 2]
    assert [s.name for s in sites] == ["n0", "n4", "n8", "n10", "n12"]  # the model's own node names
    assert sites[1].nonneg_reason == "MaxPool 'n3' <- LRN 'n2' <- Relu 'n1'"


def test_light_model_as_shipped_has_constant_of_shape_weights():
    # Not normalized: every weight is computed by a ConstantOfShape, so no Conv is a site yet.
    model = onnx.load(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_squeezenet.onnx"))
    verdicts = explain(model)
    assert len(verdicts) == 26 and not any(v.is_site for v in verdicts)
    assert verdicts[0].code == NotSite.DYNAMIC_WEIGHTS
    assert re.fullmatch(r"dynamic weights: 'conv1_w_0' is computed by ConstantOfShape 'ConstantOfShape_\d+', not a constant",
                        verdicts[0].reason)


def test_ir_model_is_read_without_changes():
    model = ir.serde.deserialize_model(normalize(text_model(SMALL_NET, **SMALL_WEIGHTS))[0])
    before = ir.to_onnx_text(model) if hasattr(ir, "to_onnx_text") else None
    sites = find_sites(model)
    assert [s.name for s in sites] == ["Conv", "Conv_1", "Conv_2"] and sites[0].macs == 16 * 16 * 27 * 16
    if before is not None:
        assert ir.to_onnx_text(model) == before
